"""Weight-only int8/int4 quantization with torchao, one ``nn.Linear`` at a time.

``load_model(..., quantize="int8" | "int4" | QuantSpec(...))`` hands a ``Quantizer`` to
the move stage, which calls it on each module as soon as that module's tensors are
final (children before parents). A Linear is quantized right there, while the rest of
the model is still the checkpoint's mmap, so at most one Linear is ever resident in
full precision: peak memory is the quantized model plus one layer, never the
full-precision model.

Quantization is not a ``Transform``: torchao's weights are tensor subclasses, which
``tensor.data = t`` cannot install, so ``quantize_`` sets a new Parameter on the module.
A tied output projection (torchtune's ``TiedLinear``, not an nn.Module) is replaced by
a plain ``nn.Linear`` whose quantized weight is made from the embedding's: the output
gets its own quantized copy and the embedding stays as it was (the file's mmap on CPU).

What torchao 0.14 offers, per device:
- int8: ``Int8WeightOnlyConfig`` (per-row scales), any shape, any float dtype; on CPU it
  runs through ``aten._weight_int8pack_mm`` (``leangen.int8_kernel``: torchao's own eager
  path converts the whole weight on every call).
- int4 on CPU: ``Int4WeightOnlyConfig(int4_packing_format="opaque")``, which packs for
  ``aten::_weight_int4pack_mm_for_cpu``; a layer whose ``out_features`` is not a multiple
  of 16 cannot be packed and is skipped (counted) like one no group divides.
- int4 on CUDA: ``int4_packing_format="tile_packed_to_4d"`` (tinygemm); bf16 only.
  (The default "plain" format needs fbgemm-gpu-genai, absent from CPU wheels.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from leangen.errors import ConfigError

KINDS = ("int8", "int4")
# An int4 layer whose in_features the asked group does not divide falls back to the
# largest of these that does; a layer none divides stays in full precision.
FALLBACK_GROUPS = (128, 64, 32)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: ``kind`` int8 or int4; ``group_size`` (int4 only) is the
    number of input features sharing one scale and zero point."""

    kind: str
    group_size: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"quantize: '{self.kind}' is unknown. Use null, int8 or int4.")
        if self.group_size not in (256, *FALLBACK_GROUPS):
            raise ConfigError(f"quantize: int4 group size {self.group_size} is not one of "
                              f"256, {', '.join(map(str, FALLBACK_GROUPS))}.")

    def group_for(self, in_features: int) -> int | None:
        """The int4 group for a layer with ``in_features`` inputs; None: leave it unquantized."""
        candidates = [self.group_size, *(g for g in FALLBACK_GROUPS if g < self.group_size)]
        return next((g for g in candidates if in_features % g == 0), None)


QuantSetting = Union[None, str, QuantSpec]


def parse_spec(setting: QuantSetting) -> QuantSpec | None:
    """``None``/"null"/"none" -> None; "int8", "int4" or a QuantSpec -> a QuantSpec."""
    if setting is None or isinstance(setting, QuantSpec):
        return setting
    if isinstance(setting, str):
        if setting.lower() in ("null", "none", ""):
            return None
        return QuantSpec(setting.lower())
    raise ConfigError(f"quantize: {setting!r} is not a setting. Use null, int8 or int4.")


class Quantizer:
    """The per-module hook for the move stage: ``quantizer(name, module)`` once a
    module's tensors (and its children's) are final.

    Counts what it did in ``counts`` (``{"quantized": n, "skipped": m}``), and puts them
    on the root module as ``model.leangen_quantized`` when the root's turn comes (last).
    """

    def __init__(self, spec: QuantSpec, device: torch.device, dtype: torch.dtype):
        from torchao.quantization import quantize_  # the import takes ~1 s: only when asked

        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self._quantize_ = quantize_
        if spec.kind == "int4" and self.device.type == "cuda" and dtype != torch.bfloat16:
            raise ConfigError(f"quantize: int4 on CUDA needs dtype bf16 (torchao's tinygemm "
                              f"kernel), not {dtype}. Set dtype: bf16, or use int8.")
        if spec.kind == "int4" and self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"quantize: int4 runs on cpu or cuda, not {self.device.type}. "
                              "Use int8 there.")
        self.counts = {"quantized": 0, "skipped": 0}
        if spec.kind == "int8":
            from leangen import int8_kernel

            int8_kernel.install()  # torchao's eager int8 linear is ~10x slower than bf16 on CPU

    @classmethod
    def for_load(cls, setting: QuantSetting, device: torch.device,
                 dtype: torch.dtype) -> "Quantizer | None":
        spec = parse_spec(setting)
        return cls(spec, device, dtype) if spec is not None else None

    def __call__(self, name: str, module: torch.nn.Module) -> None:
        if type(module) is torch.nn.Linear:  # subclasses (LoRA, ...) are not plain matmuls
            self.quantize_linear(module)
        elif any(next(child.children(), None) is not None for child in module.children()):
            _return_freed_memory()  # a layer's Linears are done: their temporaries go back
        for attr, tied in tied_linears(module):  # the embedding is final: children come first
            setattr(module, attr, self.untie(tied))
        if name == "":
            module.leangen_quantized = dict(self.counts)

    def config(self, linear: torch.nn.Linear):
        """torchao's config for this layer, or None when it cannot be quantized."""
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        # set_inductor_config=False: a library load must not change global inductor flags
        if self.spec.kind == "int8":
            return Int8WeightOnlyConfig(set_inductor_config=False)
        group = self.spec.group_for(linear.in_features)
        if group is None or (self.device.type == "cpu" and linear.out_features % 16):
            return None
        packing = "opaque" if self.device.type == "cpu" else "tile_packed_to_4d"
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format=packing,
                                    set_inductor_config=False)

    def quantize_linear(self, linear: torch.nn.Linear) -> None:
        config = self.config(linear)
        if config is None:
            self.counts["skipped"] += 1
            return
        self._quantize_(linear, config)
        self.counts["quantized"] += 1

    def targets(self, model: torch.nn.Module) -> dict[str, torch.Size | None]:
        """Every Linear this hook would meet, by module name (a tied output under its
        attribute's name): its weight's shape, or None for one it would leave unquantized.
        The quantized cache checks an entry against it before trusting the entry."""
        found = {}
        for prefix, module in model.named_modules():
            if type(module) is torch.nn.Linear:
                found[prefix] = module.weight.shape if self.config(module) is not None else None
            for attr, tied in tied_linears(module):
                rows, cols = tied.tied_module.weight.shape
                linear = torch.nn.Linear(cols, rows, bias=False, device="meta")
                name = f"{prefix}.{attr}" if prefix else attr
                found[name] = linear.weight.shape if self.config(linear) is not None else None
        return found

    def untie(self, tied) -> torch.nn.Linear:
        """A Linear sharing the embedding's weight, then quantized: its own quantized copy,
        and the embedding's tensor untouched. Unquantized (skipped), it stays shared."""
        weight = tied.tied_module.weight
        with torch.device("meta"):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.quantize_linear(linear)
        return linear.requires_grad_(False)


def _return_freed_memory() -> None:
    """Give the layer's freed full-precision temporaries back to the OS. glibc keeps freed
    blocks under its (adaptive, up to 32 MiB) mmap threshold in the heap, so without this
    the process's anonymous memory grows up to ~3x the quantized model (measured: 1B, int8)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)
    except OSError:
        return None


_LIBC = _load_libc()


def tied_linears(module: torch.nn.Module) -> list[tuple[str, object]]:
    """(attribute, torchtune TiedLinear) pairs of ``module``: a tied output is a plain
    attribute, not a child module, so ``named_children`` does not list it."""
    from torchtune.modules import TiedLinear

    return [(attr, value) for attr, value in vars(module).items() if isinstance(value, TiedLinear)]


def is_tensor_subclass(t: torch.Tensor) -> bool:
    """A wrapper tensor (torchao's quantized weights) made of inner tensors."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's) counts its inner tensors."""
    if is_tensor_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


