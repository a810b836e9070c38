"""int4 group size: one-token speed of torchao's CPU kernel and bytes per weight, per group.

What ``quantize: int4`` runs on CPU is ``aten._weight_int4pack_mm_for_cpu`` (torchao's
``Int4OpaqueTensor``). This times it for one token (M = 1, decode) on Llama-3.2-1B's Linear
shapes at groups 32, 64 and 128, with a bf16 ``F.linear`` of the same shapes as a
reference. Each (shape, format) cycles through copies of its weight totalling more than
``POOL_BYTES``, so every call reads its weight from DRAM as decode does, not from cache.
Rounds interleave the formats (a busy machine slows all of them alike) and each format's
best round is kept; report ratios within one run, not absolute times across runs.

The kernel's speed does not depend on the weight's values, so the packed weights and the
scales are random tensors of the shapes torchao's packing gives (taken from packing one
small block). Bytes per weight count the packed codes plus the bf16 scale and zero point
each group carries.

    python benchmarks/int4_groups.py [--rounds 7] [--threads 2 1] [--output benchmarks/RESULTS_int4_groups.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GROUPS = (32, 64, 128)
# (name, out_features, in_features) of Llama-3.2-1B's Linears
SHAPES = (
    ("q/o proj 2048x2048", 2048, 2048),
    ("gate/up 8192x2048", 8192, 2048),
    ("down 2048x8192", 2048, 8192),
    ("output 128256x2048", 128256, 2048),
)
POOL_BYTES = 1100 * 10**6  # more than any last-level cache: each call reads DRAM


def packed_shapes(out_features: int, in_features: int, group: int) -> tuple[torch.Size, torch.Size]:
    """The shapes of the packed codes and of scale_and_zero for one weight, from torch's own
    packing of a 64-row block (the codes scale with the rows; scales are [groups, rows, 2])."""
    block = torch.randint(0, 16, (64, in_features), dtype=torch.int32)
    codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(block, 1)
    assert codes.shape[0] == 64, f"unexpected packed layout {tuple(codes.shape)}"  # a row each
    return (torch.Size((out_features, *codes.shape[1:])),
            torch.Size((in_features // group, out_features, 2)))


def int4_pool(out_features: int, in_features: int, group: int) -> tuple[list, int]:
    """Copies of one random packed weight, more than POOL_BYTES in all; and one copy's bytes."""
    codes_shape, scales_shape = packed_shapes(out_features, in_features, group)
    one = codes_shape.numel() + scales_shape.numel() * 2  # uint8 codes, bf16 scale/zero
    codes = torch.randint(0, 256, codes_shape, dtype=torch.uint8)
    scales = (torch.rand(scales_shape) * 0.01 + 0.001).to(torch.bfloat16)
    # copies, each its own memory (what DRAM reads need), cloned: faster than drawing each
    return [(codes.clone(), scales.clone()) for _ in range(copies(one))], one


def bf16_pool(out_features: int, in_features: int) -> tuple[list, int]:
    one = out_features * in_features * 2
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    return [weight.clone() for _ in range(copies(one))], one


def copies(one: int) -> int:
    """How many copies of a weight of ``one`` bytes make more than POOL_BYTES."""
    return max(2, -(-POOL_BYTES // one))


def time_pass(call, pool, x) -> float:
    """Seconds per call over one pass through the pool."""
    start = time.perf_counter()
    for item in pool:
        call(x, item)
    return (time.perf_counter() - start) / len(pool)


def int4_call(group: int):
    return lambda x, item: torch.ops.aten._weight_int4pack_mm_for_cpu(x, item[0], group, item[1])


def bf16_call(x, w):
    return F.linear(x, w)


def measure_shape(out_features: int, in_features: int, rounds: int) -> dict[str, dict]:
    """Best seconds per call and bytes per weight, per format, for one shape."""
    formats = {}
    for group in GROUPS:
        pool, one = int4_pool(out_features, in_features, group)
        formats[f"int4 g{group}"] = {"pool": pool, "call": int4_call(group), "bytes": one}
    pool, one = bf16_pool(out_features, in_features)
    formats["bf16"] = {"pool": pool, "call": bf16_call, "bytes": one}
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    for f in formats.values():  # warm-up: first-call dispatch, page faults of the pool
        time_pass(f["call"], f["pool"], x)
        f["best"] = float("inf")
    for _ in range(rounds):
        for f in formats.values():
            f["best"] = min(f["best"], time_pass(f["call"], f["pool"], x))
    weights = out_features * in_features
    return {name: {"seconds": f["best"], "bits_per_weight": f["bytes"] * 8 / weights,
                   "gb_per_s": f["bytes"] / f["best"] / 1e9} for name, f in formats.items()}


def check_kernel_matches_torchao() -> None:
    """The call timed here is the one torchao's Int4OpaqueTensor makes (same result)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    quantize_(linear, Int4WeightOnlyConfig(group_size=32, int4_packing_format="opaque",
                                           set_inductor_config=False))
    w = linear.weight
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    direct = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.qdata, 32, w.scale_and_zero)
    assert torch.equal(direct, linear(x)), "torchao's int4 linear is not the timed kernel"
    assert tuple(w.scale_and_zero.shape) == (256 // 32, 128, 2)


def busy_processes() -> str:
    """What else was using the CPU when this ran (ps, top 6 by CPU)."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,comm,args", "--sort=-pcpu"], capture_output=True,
                             check=False, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "(ps unavailable)"
    return "\n".join(line[:140] for line in out[:7])


def report(runs: dict[int, dict], rounds: int, before: str, after: str) -> str:
    threads = " ".join(map(str, runs))
    lines = [
        "# int4 group size: CPU kernel speed and bytes per weight",
        "",
        f"`python benchmarks/int4_groups.py --rounds {rounds} --threads {threads}`: one token (M = 1) "
        "through `aten._weight_int4pack_mm_for_cpu` (what `quantize: int4` runs on CPU) on "
        f"Llama-3.2-1B's Linear shapes, weights cycled through more than {POOL_BYTES / 1e9:.1f} GB per "
        f"format so they come from DRAM, best of {rounds} interleaved rounds. bf16 `F.linear` of the "
        "same shapes for reference.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}. **The machine was shared** with other jobs (below): absolute times are "
        "noisy; compare the ratios within one table.",
        "",
    ]
    for count, results in runs.items():
        lines += [f"## {count} thread{'s' if count > 1 else ''}", "", *speed_tables(results)]
    lines += QUALITY
    lines += ["What else was running (ps, by CPU), before:", "", "```", before, "```", "", "after:",
              "", "```", after, "```", ""]
    return "\n".join(lines)


# Not measured by this script (it needs a real model): perplexity of torchao's int4 against
# bf16, measured earlier on SmolLM-135M (576 wide), quoted for the trade-off.
QUALITY = [
    "## Quality (measured separately, on SmolLM-135M)",
    "",
    "Perplexity increase over bf16 of torchao's min-max weight-only quantization on a real "
    "135M model (576 wide), measured earlier (this script needs no model and does not measure it):",
    "",
    "| format | perplexity vs bf16 |",
    "|---|---:|",
    "| int8 (per row) | +1.3% |",
    "| int4 g32 | +5% |",
    "| int4 g64 | +53% |",
    "| int4 g128 (fell back to g64 on 576-wide inputs) | +63-67% |",
    "",
    "llama.cpp's Q4_0 uses groups of 32 (4.5 bits per weight: a fp16 scale, no zero point).",
    "",
]


def speed_tables(results: dict) -> list[str]:
    lines = [
        "| shape | " + " | ".join(results[SHAPES[0][0]]) + " |",
        "|---|" + "---:|" * len(results[SHAPES[0][0]]),
    ]
    for name, formats in results.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{f['seconds'] * 1e6:.0f} µs ({f['gb_per_s']:.1f} GB/s)" for f in formats.values()) + " |")
    totals = {fmt: sum(results[name][fmt]["seconds"] * count for name, count in LAYER_COUNTS.items())
              for fmt in results[SHAPES[0][0]]}
    base = totals["int4 g128"]
    lines += [
        "",
        "One decode token's Linears (16 layers x (q, k, v, o, gate, up, down) + the output; k/v "
        "counted as a quarter of q), and bits per weight (packed codes + the bf16 scale and zero "
        "point of each group):",
        "",
        "| format | Linears per token | vs int4 g128 | bits per weight |",
        "|---|---:|---:|---:|",
    ]
    bits = {fmt: results[SHAPES[0][0]][fmt]["bits_per_weight"] for fmt in totals}
    for fmt, seconds in totals.items():
        lines.append(f"| {fmt} | {seconds * 1e3:.1f} ms | {seconds / base:.2f}x | {bits[fmt]:.2f} |")
    return [*lines, ""]


# How often each timed shape runs per token in Llama-3.2-1B (16 layers; k and v are
# 512x2048, a quarter of q's 2048x2048, so they count as half a q/o between them).
LAYER_COUNTS = {"q/o proj 2048x2048": 16 * 2.5, "gate/up 8192x2048": 16 * 2,
                "down 2048x8192": 16, "output 128256x2048": 1}


def measure_all(threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    results = {}
    for name, out_features, in_features in SHAPES:
        results[name] = measure_shape(out_features, in_features, rounds)
        print(threads, name, {k: f"{v['seconds'] * 1e6:.0f} us" for k, v in results[name].items()},
              file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(Path(__file__).parent / "RESULTS_int4_groups.md"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_all(args.threads[0], args.rounds)))
        return
    check_kernel_matches_torchao()
    before = busy_processes()
    # one process per thread count: lowering torch's threads in a process whose OpenMP pool
    # was larger made every call take ~20 ms here (the idle workers' wake-ups)
    runs = {threads: json.loads(subprocess.run(
        [sys.executable, __file__, "--worker", "--threads", str(threads), "--rounds", str(args.rounds)],
        check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1]) for threads in args.threads}
    text = report(runs, args.rounds, before, busy_processes())
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
