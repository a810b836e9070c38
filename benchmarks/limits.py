"""The machine's limits, measured in the same run as the systems.

- Memory read bandwidth (an fp32 ``sum`` over a 4 GiB buffer, far larger than any
  cache, with all of torch's threads, and with one): decode must read every weight
  once per token, so bandwidth / bytes read per token is the decode ceiling (the
  roofline) in tokens/s.
- bf16 GEMV bandwidth (``F.linear`` of one token, what a decode step's matmuls
  are), the practical ceiling of an eager decode step.
- Page-cache read speed of the checkpoint files, read once to warm the cache and
  then timed: model bytes / that speed is the floor for a load that copies.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

_BANDWIDTH_BYTES = 4 << 30
_MIN_BANDWIDTH_BYTES = 1 << 30
_GEMV_SHAPE = (8192, 8192)  # 128 MiB of bf16, far beyond any cache
_REPEATS = 5
_READ_CHUNK = 64 << 20


def measure_limits(files: list[Path]) -> dict:
    threads = torch.get_num_threads()
    nbytes = _bandwidth_buffer_bytes()
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    all_threads = memory_read_bandwidth(x)
    torch.set_num_threads(1)
    one_thread = memory_read_bandwidth(x)
    torch.set_num_threads(threads)
    del x
    return {
        "memory_read_gb_per_s": all_threads,
        "memory_read_one_thread_gb_per_s": one_thread,
        "memory_read_buffer_bytes": nbytes,
        "gemv_bf16_gb_per_s": gemv_bandwidth(),
        "page_cache_read_gb_per_s": page_cache_read_speed(files),
        "torch_threads": torch.get_num_threads(),
    }


def memory_read_bandwidth(x: torch.Tensor) -> float:
    """GB/s of ``x.sum()`` at torch's current thread count, best of a few."""
    x.sum()  # thread-pool start-up is not bandwidth
    best = min(_timed(x.sum) for _ in range(_REPEATS))
    return x.numel() * x.element_size() / best / 1e9


def _bandwidth_buffer_bytes() -> int:
    """4 GiB, or a quarter of the memory available now if that is less (the machine is shared)."""
    available = _BANDWIDTH_BYTES * 4
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    return max(_MIN_BANDWIDTH_BYTES, min(_BANDWIDTH_BYTES, available // 4))


def gemv_bandwidth() -> float:
    w = torch.randn(_GEMV_SHAPE).to(torch.bfloat16)
    x = torch.randn(1, 1, _GEMV_SHAPE[1]).to(torch.bfloat16)
    F.linear(x, w)
    best = min(_timed(lambda: F.linear(x, w)) for _ in range(_REPEATS * 4))
    return w.numel() * w.element_size() / best / 1e9


def page_cache_read_speed(files: list[Path]) -> float:
    """GB/s for reading ``files`` (already cached) into a reused buffer."""
    buffer = bytearray(_READ_CHUNK)
    _read_all(files, buffer)  # warm the page cache; the systems then all start warm
    start = time.perf_counter()
    nbytes = _read_all(files, buffer)
    return nbytes / (time.perf_counter() - start) / 1e9


def _read_all(files: list[Path], buffer: bytearray) -> int:
    view, total = memoryview(buffer), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
