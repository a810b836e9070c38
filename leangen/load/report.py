"""``model.leangen``: what ``load_model`` did, in one object the recipes and callers read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Quantization:
    """Weight-only quantization of a load: what was asked, what was done, and the cache."""

    scheme: str  # "int8" | "int4"
    group_size: int | None  # int4: the group asked for (a layer it does not divide falls back)
    counts: dict[str, Any]  # the quantizer's Linear counts: {"quantized": n, "skipped": m}
    groups: dict[int, int] = field(default_factory=dict)  # int4: Linears per group used
    fallbacks: dict[int, list[int]] = field(default_factory=dict)  # int4: group -> in_features it served
    description: str = ""  # one phrase for the summary: "int8", "int4 g32", "int4 g128 (g64 on ...)"
    cache: str = "off"  # the quantized cache: "hit" | "written" | "off"
    cache_file: str | None = None  # the entry read or written


@dataclass
class LoadReport:
    """Set by ``load_model`` as ``model.leangen``."""

    checkpoint: tuple[str, ...]  # the files read
    device: str
    dtype: str  # the parameters' dtype, as ``leangen.load.dtypes.dtype_name`` writes it
    config: Any = None  # config.json parsed (``leangen.hf.config.ModelConfig``), None without one
    seconds: float = 0.0  # load_model's wall time
    quantization: Quantization | None = None  # None: full precision
    prepacked: int | None = None  # Linears in oneDNN's layout; None: prepack off

    @property
    def quantized(self) -> dict[str, Any] | None:
        """The quantizer's Linear counts, or None without quantization."""
        return self.quantization.counts if self.quantization else None

    @property
    def quant_cache(self) -> dict[str, str | None]:
        """``{"status": "hit" | "written" | "off", "file": path or None}``."""
        q = self.quantization
        return {"status": q.cache, "file": q.cache_file} if q else {"status": "off", "file": None}
