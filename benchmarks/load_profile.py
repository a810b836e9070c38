"""leangen's load, stage by stage: seconds and anonymous memory after each stage.

    python benchmarks/load_profile.py BUILDER CHECKPOINT_DIR [--dtype bf16] [--builder-kwargs JSON]

Prints one JSON object. It calls the same stage functions, in the same order, as
``leangen.load_model``, so that where a load's time and memory go is measured, not
guessed: the q/k permutation copies and the RoPE cache show up as their own rows.
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

    from leangen.buffers import check_no_meta, materialise_buffers
    from leangen.convert import Geometry
    from leangen.load import assign, build_on_meta, resolve_device, resolve_dtype
    from leangen.move import move_to_device
    from leangen.view import open_checkpoint
    mark("import torch + leangen (torchtune, torchao)")

    device = resolve_device("cpu")
    model = build_on_meta(builder, **builder_kwargs)
    mark("build on meta")
    view = open_checkpoint(checkpoint, geometry=Geometry.from_model(model))
    resolved = resolve_dtype(dtype, view, device)
    mark("open checkpoint (headers, key plan)")
    pending = assign(model, view)
    mark("assign mmap views")
    materialise_buffers(model, device)
    rope = sum(b.numel() * b.element_size() for b in model.buffers())
    mark("buffers (rope_init)", bytes=rope)
    copied = sum(view.shape(n).numel() * resolved.itemsize for n in pending)
    move_to_device(model, pending, device, resolved)
    check_no_meta(model)
    mark("move: q/k permutation and casts", bytes=copied, tensors=len(pending))
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
