"""leangen's load, stage by stage: seconds and anonymous memory after each stage.

    python benchmarks/load_profile.py BUILDER CHECKPOINT_DIR [--dtype bf16] [--builder-kwargs JSON]
        [--quantize int8|int4]

Prints one JSON object. It runs ``leangen.load_model`` itself and records each stage
through its ``on_stage`` callback, so that where a load's time and memory go is
measured, not guessed, and cannot drift from the real load: the RoPE cache and any
q/k permutation copies (none for HF rotate-half files: see ``leangen.load.rope``) show up
as their own rows.
Run it in a fresh process (run.py does) so that imports and anonymous memory start
from nothing.

With ``--quantize``, the load is leangen's streamed quantized load (the move stage
quantizes each Linear as it comes off the mmap), and then, for comparison, the same
files are loaded again in bf16 and quantized afterwards with the same per-layer torchao
configs (leangen's ``Quantizer`` applied to every module, children first): the "bf16
load plus quantization time" that a streamed load should stay close to.
"""

from __future__ import annotations

import argparse
import json
import re
import time


def _anon_bytes() -> int:
    status = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def profile(builder: str, checkpoint: str, dtype: str, builder_kwargs: dict,
            quantize: str | None = None) -> dict:
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

    extra = {"quantize": quantize} if quantize else {}
    model = leangen.load_model(builder, checkpoint, device="cpu", dtype=dtype, on_stage=mark,
                               **extra, **builder_kwargs)
    resolved = next(model.parameters()).dtype
    load = sum(s["seconds"] for s in stages[2:])
    out = {"stages": stages, "load_seconds": load, "dtype": str(resolved)}
    if quantize:
        del model
        out["posthoc"] = posthoc_quantize(builder, checkpoint, dtype, builder_kwargs, quantize)
    return out


def posthoc_quantize(builder: str, checkpoint: str, dtype: str, builder_kwargs: dict,
                     kind: str) -> dict:
    """A bf16 load, then every Linear quantized in place: seconds for each step."""
    import torch

    import leangen
    from leangen.quant.quantize import Quantizer

    start = time.perf_counter()
    model = leangen.load_model(builder, checkpoint, device="cpu", dtype=dtype, **builder_kwargs)
    loaded = time.perf_counter()
    quantizer = Quantizer.for_load(kind, torch.device("cpu"), next(model.parameters()).dtype)
    for name, module in reversed(list(model.named_modules())):  # children before parents
        quantizer(name, module)
    done = time.perf_counter()
    return {"bf16_load_seconds": loaded - start, "quantize_seconds": done - loaded,
            "anon_bytes": _anon_bytes(), "counts": quantizer.counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("builder")
    parser.add_argument("checkpoint")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--builder-kwargs", type=json.loads, default={})
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None)
    args = parser.parse_args()
    print(json.dumps(profile(args.builder, args.checkpoint, args.dtype, args.builder_kwargs,
                             args.quantize)))


if __name__ == "__main__":
    main()
