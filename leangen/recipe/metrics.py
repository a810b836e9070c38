"""Run figures for the recipes: timing, model bytes, peak memory, and the summary line."""

from __future__ import annotations

import dataclasses
import math
import resource
from typing import Any

import torch

from leangen.quant.quantize import tensor_bytes


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters; quantized ones (tensor subclasses) count their inner
    tensors, a tensor-parallel rank's DTensors only its own shard."""
    from torch.distributed.tensor import DTensor

    return sum(tensor_bytes(p.to_local() if isinstance(p, DTensor) else p) for p in model.parameters())


def load_metrics(model: torch.nn.Module) -> dict[str, Any]:
    """``load_seconds``; ``quantization``: what the load quantized (scheme, int4 groups used,
    counts, description), None at full precision; ``quantize_cache``: hit | written | off,
    with the entry's file when one was used (all from ``model.leangen``, what load_model did)."""
    report = model.leangen
    cache = report.quant_cache
    quantization = dataclasses.asdict(report.quantization) if report.quantization else None
    return {"load_seconds": report.seconds, "quantization": quantization,
            "quantize_cache": cache["status"], "quantize_cache_file": cache["file"]}


def peak_host_rss_bytes() -> int:
    """This process's own peak RSS. Linux's ru_maxrss survives exec, so a recipe started
    from a big parent would report the parent's peak; VmHWM is the process's own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def summary(metrics: dict[str, Any]) -> str:
    """One human line for stderr; figures a recipe does not record are left out.

    Decimal units throughout (GB = 1e9 bytes, as in GB/s); three significant digits, so
    a tiny model's bandwidth does not print as 0.0."""
    device = metrics.get("peak_device_bytes")
    parts = [
        f"load {metrics['load_seconds']:.2f} s" + _cache_note(metrics),
        (metrics.get("quantization") or {}).get("description"),  # int4 g32, int8, ...
        f"first token {metrics['first_token_seconds']:.2f} s" if "first_token_seconds" in metrics else None,
        f"{metrics['tokens_per_second']:.1f} tok/s" if metrics.get("tokens_per_second") else None,
        f"{_figure(metrics['bandwidth_gb_per_s'])} GB/s" if metrics.get("bandwidth_gb_per_s") else None,
        f"peak host RSS {_figure(metrics['peak_host_rss_bytes'] / 1e9)} GB"
        if metrics.get("peak_host_rss_bytes") else None,
        f"peak device {_figure(device / 1e9)} GB" if device is not None else None,
    ]
    return " | ".join(p for p in parts if p)


def _cache_note(metrics: dict[str, Any]) -> str:
    """A hit, or where a new entry went (the one place a run says it wrote to the cache)."""
    status = metrics.get("quantize_cache")
    if status == "hit":
        return " (quantized cache hit)"
    return f" (quantized cache written: {metrics['quantize_cache_file']})" if status == "written" else ""


def _figure(value: float) -> str:
    """Three significant digits, never in exponent form: 1235, 37.5, 0.483, 0.00412."""
    if value == 0:
        return "0"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"
