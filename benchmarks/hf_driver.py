"""transformers as a user would run it: ``from_pretrained`` then greedy ``generate``.

Run by the benchmark in a fresh process:
    python benchmarks/hf_driver.py CHECKPOINT_DIR --prompt-ids 1,2,3 --new-tokens 64 [--quantize int8|int4] [--device cuda]

``--quantize`` applies torchao weight-only quantization to the loaded model with
``torchao.quantization.quantize_``, the same configs leangen uses on CPU (int8:
``Int8WeightOnlyConfig``; int4: ``Int4WeightOnlyConfig(group_size=32,
int4_packing_format="opaque")``). transformers' own ``TorchAoConfig`` would be the
usual route, but transformers 5 requires torchao >= 0.15 for it, and torchtune 0.6.1
(leangen's base) needs torchao < 0.15: ``TorchAoConfig`` then raises "TorchAoConfig
requires torchao to be installed". ``quantize_`` after ``from_pretrained`` is what
``TorchAoConfig`` does at the end of loading, so the model that decodes is the same.

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
    # On CPU exactly the call the CPU results were measured with; elsewhere load straight there.
    placement = {} if args.device == "cpu" else {"device_map": args.device}
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16, **placement)
    model.eval()
    bf16_loaded = time.perf_counter()
    if args.quantize:
        _quantize(model, args.quantize, args.device)
    _synchronize(args.device)  # CUDA copies are asynchronous: the load ends when they land
    loaded = time.perf_counter()
    ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]], device=args.device)
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
        "quantize_seconds": loaded - bf16_loaded if args.quantize else None,
        "first_token_seconds": stamps[0] - _START,
        "tokens_per_second": (len(stamps) - 1) / decode if decode else None,
        "generated_tokens": len(generated),
        "tokens": generated,
        "model_bytes": sum(_tensor_bytes(p) for p in model.parameters()),
        "peak_device_bytes": (torch.cuda.max_memory_allocated()
                              if args.device.startswith("cuda") else None),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _quantize(model, kind: str, device: str) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    # The packing leangen uses on each device (leangen/quantize.py)
    packing = "opaque" if device == "cpu" else "tile_packed_to_4d"
    config = (Int8WeightOnlyConfig() if kind == "int8"
              else Int4WeightOnlyConfig(group_size=32, int4_packing_format=packing))
    quantize_(model, config)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass counts its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quantize", choices=("int8", "int4"), default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/cuda_checks.py)")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
