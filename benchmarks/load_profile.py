"""leangen's load, stage by stage: seconds and anonymous memory after each stage.

    python benchmarks/load_profile.py BUILDER CHECKPOINT_DIR [--dtype bf16] [--builder-kwargs JSON]

Prints one JSON object. It runs ``leangen.load_model`` itself and records each stage
through its ``on_stage`` callback, so that where a load's time and memory go is
measured, not guessed, and cannot drift from the real load: the RoPE cache and any
q/k permutation copies (none for HF rotate-half files: see ``leangen.rope``) show up
as their own rows.
Run it in a fresh process (run.py does) so that imports and anonymous memory start
from nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import time


def _anon_bytes() -> int:
    status = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def profile(builder: str, checkpoint: str, dtype: str, builder_kwargs: dict) -> dict:
    stages: list[dict] = []
    clock = time.perf_counter()

    def mark(stage: str, **extra) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages.append({"stage": stage, "seconds": now - clock, "anon_bytes": _anon_bytes(), **extra})
        clock = now

    mark("interpreter")
    import torch  # noqa: F401

    import leangen
    mark("import torch + leangen (torchtune, torchao)")

    model = leangen.load_model(builder, checkpoint, device="cpu", dtype=dtype, on_stage=mark,
                               **builder_kwargs)
    resolved = next(model.parameters()).dtype
    load = sum(s["seconds"] for s in stages[2:])
    return {"stages": stages, "load_seconds": load, "dtype": str(resolved)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("builder")
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--builder-kwargs", type=json.loads, default={})
    args = parser.parse_args()
    print(json.dumps(profile(args.builder, args.checkpoint, args.dtype, args.builder_kwargs)))


if __name__ == "__main__":
    main()
