"""``prepack: true``: CPU Linear weights copied into oneDNN's blocked layout while loading.

Why it is a setting and not the default: a decode step multiplies one row by every
weight, and torch's plain CPU ``linear`` reads a row-major bf16 weight at about a third
of the machine's memory bandwidth (measured, one 8192x2048 layer, one token: 2.6 ms
plain, 1.0 ms prepacked, bit-identical results). It is a copy: the weights then live
in anonymous memory (about the model's size) instead of being the checkpoint's mmap,
which is leangen's low-memory default.

Like quantization, packing is a per-module hook of the move stage, so at most one
Linear is in flight; the packed weight stays the module's ``weight`` Parameter (an
oneDNN tensor), so ``state_dict()`` keeps its names. Quantized and non-plain Linears are
left alone.
"""

from __future__ import annotations

import torch

from leangen.errors import ConfigError
from leangen.load.output import output_projection

# Dtypes oneDNN packs with a measured gain on CPU (fp16 has no fast path without AVX512-FP16).
PACKABLE = (torch.bfloat16, torch.float32)


class PrepackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with W in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # 1: the batch size to pack for; oneDNN's layout for a decode step's single row
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


class Prepacker:
    """The move stage's per-module hook: a parent's plain Linear children (and a tied
    output) become ``PrepackedLinear`` once final. Counts them in ``count``, which
    ``load_model`` reports as ``model.leangen.prepacked``."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        if device.type != "cpu":
            raise ConfigError(f"prepack: true is for CPU runs (oneDNN); on {device.type} set prepack: false.")
        if dtype not in PACKABLE or not torch.backends.mkldnn.is_available():
            raise ConfigError(f"prepack: true needs dtype bf16 or fp32 and a torch built with oneDNN, "
                              f"not {dtype}. Set prepack: false or dtype: bf16.")
        self.count = 0

    @classmethod
    def for_load(cls, prepack: bool, device: torch.device, dtype: torch.dtype) -> "Prepacker | None":
        return cls(device, dtype) if prepack else None

    def __call__(self, name: str, module: torch.nn.Module) -> None:
        for child_name, child in list(module.named_children()):
            if _packable(child):
                setattr(module, child_name, self._pack(child.weight, child.bias))
        if name == "":  # the root comes last: the embedding a tied output shares is final
            output = output_projection(module)
            # a tied output is no child; one inside a wrapper was a TiedLinear when the
            # wrapper's turn came, and may be a plain Linear now (quantization skipped it)
            if output is not None and (output.tied or _packable(output.module)):
                output.replace(self._pack(output.weight, getattr(output.module, "bias", None)))

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> PrepackedLinear:
        self.count += 1
        return PrepackedLinear(weight, bias)


def _packable(module) -> bool:
    return type(module) is torch.nn.Linear and _plain(module.weight)


def _plain(weight: torch.Tensor) -> bool:
    """A dense float weight, not torchao's quantized tensor subclass."""
    return type(weight.data) is torch.Tensor and weight.is_floating_point()
