"""transformers as a user would run it: ``from_pretrained`` then greedy ``generate``.

Run by the benchmark in a fresh process:
    python benchmarks/hf_driver.py CHECKPOINT_DIR --prompt-ids 1,2,3 --new-tokens 64

It writes ``first token`` to stdout, flushed, the moment the first new token
exists (the runner stamps its arrival, as it does leangen's streamed text), and
at the end one line ``RESULT {json}`` with its own timings and the generated ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

_START = time.perf_counter()

import torch  # noqa: E402  (imports are part of what is timed)
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


class StepClock(BaseStreamer):
    """Stamps each generated token; the first ``put`` is the prompt itself."""

    def __init__(self):
        self.stamps: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            print("first token", flush=True)

    def end(self) -> None:
        pass


def main() -> None:
    args = _parse()
    imported = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16)
    model.eval()
    loaded = time.perf_counter()
    ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    clock = StepClock()
    # min_new_tokens masks EOS, so every run decodes exactly --new-tokens tokens.
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
        pad_token_id=model.config.eos_token_id, streamer=clock,
    )
    generated = out[0, ids.shape[1]:].tolist()
    stamps = clock.stamps
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else None
    result = {
        "import_seconds": imported - _START,
        "load_seconds": loaded - imported,
        "first_token_seconds": stamps[0] - _START,
        "tokens_per_second": (len(stamps) - 1) / decode if decode else None,
        "generated_tokens": len(generated),
        "tokens": generated,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    p.add_argument("--new-tokens", type=int, default=64)
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
