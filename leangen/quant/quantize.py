"""Weight-only int8/int4 quantization with torchao, one ``nn.Linear`` at a time.

``load_model(..., quantize="int8" | "int4" | QuantSpec(...))`` hands a ``Quantizer`` to
the move stage, which calls it on each module as soon as that module's tensors are
final (children before parents). A Linear is quantized right there, while the rest of
the model is still the checkpoint's mmap, so at most one Linear is ever resident in
full precision: peak memory is the quantized model plus one layer, never the
full-precision model. torchao quantizes through temporaries several times a weight's
size, so a Linear over ``CHUNK_BYTES`` goes to torchao in chunks of output rows, joined
into the one tensor quantizing it whole would give (bit for bit; see ``ROW_DIMS``).

Quantization is not a ``Transform``: torchao's weights are tensor subclasses, which
``tensor.data = t`` cannot install, so ``quantize_`` sets a new Parameter on the module.
A tied output projection (torchtune's ``TiedLinear``, not an nn.Module; found by
``leangen.load.output.output_projection``) is replaced by
a plain ``nn.Linear`` whose quantized weight is made from the embedding's: the output
gets its own quantized copy and the embedding stays as it was (the file's mmap on CPU).

What torchao 0.14 offers, per device:
- int8: ``Int8WeightOnlyConfig`` (per-row scales), any shape, any float dtype; on CPU it
  runs through ``aten._weight_int8pack_mm`` (``leangen.quant.int8_kernel``: torchao's own eager
  path converts the whole weight on every call).
- int4 on CPU: ``Int4WeightOnlyConfig(int4_packing_format="opaque")``, which packs for
  ``aten::_weight_int4pack_mm_for_cpu``; a layer whose ``out_features`` is not a multiple
  of 16 cannot be packed and is skipped (counted) like one no group divides.
- int4 on CUDA: ``int4_packing_format="tile_packed_to_4d"`` (tinygemm); bf16 only.
  (The default "plain" format needs fbgemm-gpu-genai, absent from CPU wheels.)
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Union

import torch

from leangen.errors import ConfigError
from leangen.load.output import output_projection

KINDS = ("int8", "int4")
# int4's default group: 32, llama.cpp's Q4_0 group. Measured on SmolLM-135M (576 wide),
# torchao's min-max int4 raised perplexity by 53% at group 64 and 5% at 32 (int8: 1.3%):
# a larger group's text is visibly worse. The cost: 5 bits per weight instead of 4.25 at
# 128, and one CPU decode token's Linears took 1.02x (2 threads) to 1.09x (1 thread) group
# 128's time (benchmarks/RESULTS_int4_groups.md, Llama-3.2-1B shapes).
DEFAULT_GROUP = 32
# An int4 layer whose in_features the asked group does not divide falls back to the
# largest of these that does; a layer none divides stays in full precision.
FALLBACK_GROUPS = (128, 64, 32)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: ``kind`` int8 or int4; ``group_size`` (int4 only) is the
    number of input features sharing one scale and zero point."""

    kind: str
    group_size: int = DEFAULT_GROUP

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

    Counts what it did in ``counts`` (``{"quantized": n, "skipped": m}``) and, for int4,
    the group each Linear got in ``groups`` (``{(group, in_features): n}``); ``load_model``
    reports them as ``model.leangen.quantization``. When the root's turn comes (last) it
    says on stderr, once, when a group fell back.
    """

    def __init__(self, spec: QuantSpec, device: torch.device, dtype: torch.dtype):
        from torchao.quantization import quantize_  # the import takes ~1 s: only when asked

        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self._quantize_ = quantize_
        if spec.kind == "int4" and self.device.type == "cuda" and dtype != torch.bfloat16:
            raise ConfigError(f"quantize: int4 on CUDA needs dtype bf16 (torchao's tinygemm "
                              f"kernel), not {dtype}. Set dtype: bf16, or use int8.")
        if spec.kind == "int4" and self.device.type == "cpu" and spec.group_size not in FALLBACK_GROUPS:
            # torchao's CPU packing asserts on any other group (a traceback, not a message)
            raise ConfigError(f"quantize: int4 on CPU takes groups of {', '.join(map(str, FALLBACK_GROUPS))} "
                              f"(torchao's CPU kernel), not {spec.group_size}. Set quantize_group_size.")
        if spec.kind == "int4" and self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"quantize: int4 runs on cpu or cuda, not {self.device.type}. "
                              "Use int8 there.")
        self.counts = {"quantized": 0, "skipped": 0}
        self.groups: Counter[tuple[int, int]] = Counter()
        if spec.kind == "int8":
            from leangen.quant import int8_kernel

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
        if name == "":  # the root comes last: the embedding a tied output shares is final
            output = output_projection(module)
            if output is not None and output.tied:
                output.replace(self.untie(output.weight))
            self.note_fallbacks()

    def note_fallbacks(self) -> None:
        """Say on stderr, once per load, when a group fell back (a plain line: it is news
        about this load, not a code location's warning)."""
        note = self.fallback_note()
        if note:
            print(note, file=sys.stderr, flush=True)

    def count(self, in_features: int | None) -> None:
        """One Linear met: quantized (with ``in_features`` inputs), or skipped (None)."""
        if in_features is None:
            self.counts["skipped"] += 1
            return
        self.counts["quantized"] += 1
        if self.spec.kind == "int4":
            self.groups[self.spec.group_for(in_features), in_features] += 1

    def count_planned(self, targets: dict[str, torch.Size | None]) -> None:
        """Count ``targets()``'s Linears as quantizing them would have: a cache hit's figures."""
        for shape in targets.values():
            self.count(None if shape is None else shape[1])

    def groups_used(self) -> dict[int, int]:
        """int4: Linears per group actually used, the largest group first ({} for int8)."""
        used: Counter[int] = Counter()
        for (group, _), n in self.groups.items():
            used[group] += n
        return dict(sorted(used.items(), reverse=True))

    def fallbacks(self) -> dict[int, list[int]]:
        """int4: each group used instead of the asked one, with the in_features it serves."""
        found: dict[int, set[int]] = {}
        for group, in_features in self.groups:
            if group != self.spec.group_size:
                found.setdefault(group, set()).add(in_features)
        return {g: sorted(found[g]) for g in sorted(found, reverse=True)}

    def describe(self) -> str:
        """One phrase: ``int8``, ``int4 g32``, or with a fallback
        ``int4 g128 (g64 on 181 of 211 Linears: in_features 576)``; skipped Linears last."""
        text = self.spec.kind
        if self.spec.kind == "int4":
            text += f" g{self.spec.group_size}"
            used, total = self.groups_used(), self.counts["quantized"]
            others = [f"g{g} on {used[g]} of {total} Linears: in_features {_listed(ins)}"
                      for g, ins in self.fallbacks().items()]
            if others:
                text += f" ({'; '.join(others)})"
        skipped = self.counts["skipped"]
        if skipped:
            text += f", {skipped} of {skipped + self.counts['quantized']} Linears left unquantized"
        return text

    def fallback_note(self) -> str | None:
        """The stderr line for a group fallback, None without one."""
        fallbacks = self.fallbacks()
        if not fallbacks:
            return None
        used, total = self.groups_used(), self.counts["quantized"]
        uses = "; ".join(f"group {g} on {used[g]} of {total} Linears (in_features {_listed(ins)})"
                         for g, ins in fallbacks.items())
        # the groups are powers of two: the smallest used divides every quantized layer
        return (f"note: int4 group {self.spec.group_size} does not divide every layer's inputs: "
                f"{uses}. Set quantize_group_size: {min(used)} for one group throughout.")

    def report(self) -> dict:
        """What this load quantized, for the recipes' metrics and API users: the kind, the
        asked group, Linears per group used, the fallbacks, the counts, one-phrase description."""
        int4 = self.spec.kind == "int4"
        return {"kind": self.spec.kind, "group_size": self.spec.group_size if int4 else None,
                "groups": self.groups_used(), "fallbacks": self.fallbacks(), **self.counts,
                "description": self.describe()}

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
            self.count(None)
            return
        # one chunk, or a format whose rows cannot be joined: torchao's whole-layer path
        weight = (self.quantize_rows(linear.weight, config)
                  if chunk_rows(linear.weight) < linear.out_features else None)
        if weight is None:
            self._quantize_(linear, config)
        else:
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.count(linear.in_features)

    def quantize_rows(self, weight: torch.Tensor, config) -> torch.Tensor | None:
        """``weight`` quantized ``chunk_rows`` output rows at a time into one preallocated
        tensor, so torchao's temporaries are one chunk's, not the layer's; None for a
        format not in ``ROW_DIMS`` (nothing is kept then)."""
        rows = chunk_rows(weight)
        out = None
        for start in range(0, weight.shape[0], rows):
            part = self.quantize_weight(weight[start:start + rows], config)
            if out is None:
                out = _empty_rows(part, weight.shape[0])
                if out is None:
                    return None
            _copy_rows(out, part, start)
            del part
            # the chunk's temporaries sit in glibc's heap (under its adaptive mmap
            # threshold): without this, they piled up to 0.6 GB over a 1B model's int4 output
            _return_freed_memory()
        return out

    def quantize_weight(self, weight: torch.Tensor, config) -> torch.Tensor:
        """torchao's quantized tensor for ``weight``, through ``quantize_`` on a Linear
        holding it: the same path, hence the same result, as quantizing a model's Linear."""
        linear = linear_holding(weight)
        self._quantize_(linear, config)
        weight = linear.weight.data
        # int8's handler gives the Linear a bound-method extra_repr, a reference cycle that
        # only the cyclic GC frees: the Linear must not keep the chunk alive until then
        linear._parameters.clear()
        return weight

    def targets(self, model: torch.nn.Module) -> dict[str, torch.Size | None]:
        """Every Linear this hook would meet, by module name (a tied output under its
        attribute's name): its weight's shape, or None for one it would leave unquantized.
        The quantized cache checks an entry against it before trusting the entry."""
        found = {}
        for prefix, module in model.named_modules():
            if type(module) is torch.nn.Linear:
                found[prefix] = module.weight.shape if self.config(module) is not None else None
        output = output_projection(model)
        if output is not None and output.tied:
            rows, cols = output.weight.shape
            linear = torch.nn.Linear(cols, rows, bias=False, device="meta")  # its shape is all config reads
            found[output.name] = linear.weight.shape if self.config(linear) is not None else None
        return found

    def planned_groups(self, model: torch.nn.Module) -> list[int]:
        """int4: the groups quantizing this (meta) model will use, the largest first; [] for int8."""
        if self.spec.kind != "int4":
            return []
        return sorted({self.spec.group_for(shape[1]) for shape in self.targets(model).values()
                       if shape is not None}, reverse=True)

    def untie(self, weight: torch.Tensor) -> torch.nn.Linear:
        """A Linear sharing the embedding's ``weight``, then quantized: its own quantized copy,
        and the embedding's tensor untouched. Unquantized (skipped), it stays shared."""
        linear = linear_holding(weight)
        self.quantize_linear(linear)
        return linear.requires_grad_(False)



def _listed(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


def linear_holding(weight: torch.Tensor) -> torch.nn.Linear:
    """A bias-free Linear whose weight is ``weight`` itself (built on meta: nothing is
    allocated), the form torchao's ``quantize_`` takes."""
    with torch.device("meta"):
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear

# The most bytes of full-precision weight handed to torchao at once. torchao quantizes
# through temporaries several times the weight's size (fp32 copies; int4's codes are int32
# before packing): whole, a Llama-3.2-1B tied output (128256 x 2048, 525 MB in bf16) took
# 0.8 GB (int8) and 1.4 GB (int4) on top of its result (benchmarks/quant_memory.py); in
# 16 MiB chunks, under 0.1 GB. Smaller chunks cost more calls (and OpenMP spin-waits).
CHUNK_BYTES = 16 << 20
# Chunks start at multiples of this many rows: int4's CPU packing
# (aten._convert_weight_to_int4pack_for_cpu) interleaves the rows of each block of 64
# (AVX512; 32 with AVX2), so a chunk boundary inside a block would pack differently.
ROW_MULTIPLE = 64


def chunk_rows(weight: torch.Tensor) -> int:
    """Rows per chunk: as many as fit in CHUNK_BYTES, a multiple of ROW_MULTIPLE, at least that."""
    row_bytes = weight.shape[1] * weight.element_size()
    return max(ROW_MULTIPLE, CHUNK_BYTES // row_bytes // ROW_MULTIPLE * ROW_MULTIPLE)


# Per torchao class whose inner tensors are plain: the dimension that runs over the
# layer's output rows, per inner tensor. Both formats quantize each row on its own (int8:
# one scale per row; int4: groups along a row, packed within blocks of rows that chunks
# do not split: ROW_MULTIPLE), so chunks of rows joined along these dimensions are, bit
# for bit, the whole layer quantized at once (tests/test_quantize.py checks).
# AffineQuantizedTensor only wraps its tensor_impl. Formats not listed (CUDA's
# tile-packed int4, not checked row by row) are quantized whole.
ROW_DIMS = {
    "PlainAQTTensorImpl": {"int_data": 0, "scale": 0, "zero_point": 0},  # int8
    "Int4OpaqueTensor": {"qdata": 0, "scale_and_zero": 1},  # int4 on CPU
}
WRAPPERS = ("AffineQuantizedTensor",)


def _empty_rows(part: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A tensor like the chunk ``part`` (same class, metadata, dtypes) for ``rows`` output
    rows, its inner tensors uninitialised; None if ``part``'s format is not known."""
    name = type(part).__name__
    if name not in ROW_DIMS and name not in WRAPPERS:
        return None
    names, context = part.__tensor_flatten__()
    inner = {}
    for n in names:
        t = getattr(part, n)
        if name in WRAPPERS:
            inner[n] = _empty_rows(t, rows)
            if inner[n] is None:
                return None
        else:
            dim = ROW_DIMS[name].get(n)
            if dim is None:
                return None
            inner[n] = t.new_empty((*t.shape[:dim], rows, *t.shape[dim + 1:]))
    size = torch.Size((rows, *part.shape[1:]))
    if isinstance(context, dict) and "shape" in context:  # Int4OpaqueTensor keeps its own
        context = {**context, "shape": size}
    return type(part).__tensor_unflatten__(inner, context, size, None)


def _copy_rows(out: torch.Tensor, part: torch.Tensor, start: int) -> None:
    """Copy the chunk ``part``'s inner tensors into ``out``'s, from output row ``start``."""
    name = type(part).__name__
    for n in part.__tensor_flatten__()[0]:
        src, dst = getattr(part, n), getattr(out, n)
        if name in WRAPPERS:
            _copy_rows(dst, src, start)
        else:
            dim = ROW_DIMS[name][n]
            dst.narrow(dim, start, src.shape[dim]).copy_(src)


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


def is_tensor_subclass(t: torch.Tensor) -> bool:
    """A wrapper tensor (torchao's quantized weights) made of inner tensors."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's) counts its inner tensors."""
    if is_tensor_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


