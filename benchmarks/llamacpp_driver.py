"""llama.cpp as a user of llama-cpp-python would run it: a GGUF file, greedy decode.

Run by the benchmark in a fresh process:
    python benchmarks/llamacpp_driver.py run MODEL.gguf --prompt-ids 1,2,3 --new-tokens 64 --threads 2
    python benchmarks/llamacpp_driver.py quantize IN.gguf OUT.gguf Q8_0 --threads 2

``run`` feeds the prompt ids to ``Llama.generate`` (top_k 1, temperature 0: greedy),
writes ``first token`` to stdout, flushed, the moment the first new token exists (the
runner stamps its arrival, as for the other systems), and at the end one line
``RESULT {json}`` with its own timings and the generated ids. ``Llama.generate`` does
not stop on an end-of-sequence token, so exactly ``--new-tokens`` tokens are decoded,
as ``min_new_tokens`` makes transformers do.

``quantize`` is llama-quantize through the binding: ``llama_cpp.llama_model_quantize``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_START = time.perf_counter()

import llama_cpp  # noqa: E402  (imports are part of what is timed)

FTYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def run(args: argparse.Namespace) -> None:
    ids = [int(t) for t in args.prompt_ids.split(",")]
    imported = time.perf_counter()
    model = llama_cpp.Llama(
        model_path=args.model, n_ctx=len(ids) + args.new_tokens, n_batch=max(len(ids), 8),
        n_threads=args.threads, n_threads_batch=args.threads, use_mmap=True, verbose=False,
    )
    loaded = time.perf_counter()
    stamps, generated = [], []
    for token in model.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
        stamps.append(time.perf_counter())
        generated.append(int(token))
        if len(stamps) == 1:
            print("first token", flush=True)
        if len(generated) == args.new_tokens:
            break
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    result = {
        "import_seconds": imported - _START,
        "load_seconds": loaded - imported,
        "first_token_seconds": stamps[0] - _START,
        "tokens_per_second": (len(stamps) - 1) / decode if decode else None,
        "generated_tokens": len(generated),
        "tokens": generated,
        "model_bytes": os.path.getsize(args.model),
        "threads": args.threads,
    }
    print("RESULT " + json.dumps(result), flush=True)


def quantize(args: argparse.Namespace) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[args.type]
    params.nthread = args.threads
    params.allow_requantize = args.allow_requantize
    start = time.perf_counter()
    code = llama_cpp.llama_model_quantize(args.source.encode(), args.target.encode(), params)
    if code != 0:
        raise SystemExit(f"llama_model_quantize({args.source} -> {args.type}) returned {code}")
    print("RESULT " + json.dumps({"quantize_seconds": time.perf_counter() - start}), flush=True)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--threads", type=int, required=True)
    q = sub.add_parser("quantize")
    q.add_argument("source")
    q.add_argument("target")
    q.add_argument("type", choices=sorted(FTYPES))
    q.add_argument("--threads", type=int, required=True)
    q.add_argument("--allow-requantize", action="store_true")
    return p.parse_args()


def main() -> None:
    args = _parse()
    run(args) if args.command == "run" else quantize(args)


if __name__ == "__main__":
    sys.exit(main())
