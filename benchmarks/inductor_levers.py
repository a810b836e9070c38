"""inductor's CPU levers against eager and ``prepack``: steady-state bf16 decode.

    python benchmarks/inductor_levers.py CHECKPOINT_DIR [--rounds 2] [--threads 2]

Each variant runs in its own process: a second ``torch.compile`` of the same module in
one process reuses the first one's dynamo cache entry, options and all, so in-process
comparisons measure one variant several times. The variants are interleaved round by
round. Each process decodes 33 greedy tokens once to compile (same shapes as the timed
runs), then twice timed; the rate is (tokens - 1) / (last - first token), prefill excluded.
The README's "CPU decode speed" table comes from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

OPTIONS = {
    "eager": None,
    "compile": {},
    "freezing": {"freezing": True},
    "max_autotune_cpp": {"freezing": True, "max_autotune": True,
                         "max_autotune_gemm_backends": "CPP,ATEN"},
    "prepack": None,
}
PROMPT = [list(range(10, 94))]  # 84 ids, inside any vocabulary


def one_variant(name: str, checkpoint: str, threads: int) -> dict:
    import torch

    import leangen
    from leangen.decode.generation import generate_steps

    torch.set_num_threads(threads)
    model = leangen.load_model("auto", checkpoint, device="cpu", dtype="bf16", rope_positions=4096,
                               prepack=(name == "prepack"))
    options = OPTIONS[name]
    decode = None if options is None else torch.compile(model, options=options or None)

    def rate(n: int = 33) -> float:
        stamps = [time.perf_counter() for _ in generate_steps(
            model, PROMPT, max_new_tokens=n, sampler=lambda logits: logits.argmax(-1),
            stop_tokens=[], decode_forward=decode)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    started = time.perf_counter()
    rate()  # compiles
    return {"variant": name, "warmup_seconds": time.perf_counter() - started,
            "tokens_per_second": [rate(), rate()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", choices=sorted(OPTIONS), help=argparse.SUPPRESS)  # one process
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(one_variant(args.variant, args.checkpoint, args.threads)))
        return 0
    rates: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for _ in range(args.rounds):
        for name in OPTIONS:
            done = subprocess.run([sys.executable, __file__, args.checkpoint, "--variant", name,
                                   "--threads", str(args.threads)], capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rates[name] += json.loads(line[len("RESULT "):])["tokens_per_second"]
    print("| variant | decode (tok/s), min-max |\n|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {min(values):.2f}-{max(values):.2f} |" if values else f"| {name} | failed |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
