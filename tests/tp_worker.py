"""One torchrun rank for tests/test_parallel.py (not a test module itself).

``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/tp_worker.py JOBS``
where JOBS is a JSON file: {"out": dir, "memory": checkpoint or null, "shards": checkpoint
or null, "refusals": {name: checkpoint}, "generate": [[name, [recipe args...]], ...],
"fail_last": {"rank": r, "args": [recipe args...]} or null}: after everything else, rank r
fails while loading that run, and the job ends with it. Each rank
writes what it saw to ``out/<job>-rank<N>.json``; the test compares.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

from leangen.errors import LeangenError
from leangen.parallel import ranks as distributed

TOKENS = torch.tensor([[5, 17, 33, 2, 60, 9, 41], [7, 7, 80, 3, 12, 90, 1]])


def anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAnon:
    """The highest RssAnon seen while the block runs (sampled every millisecond)."""

    def __enter__(self):
        self.peak, self._done = anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self.peak = max(self.peak, anon_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes())


def tp():
    from leangen.parallel.tensor_parallel import TensorParallel

    return TensorParallel.start(torch.device("cpu"))


def memory_job(path: str) -> dict:
    """Peak anonymous memory growth of this rank while it loads its shard."""
    from leangen import load_model
    from leangen.checkpoint.view import open_checkpoint

    parallel = tp()
    view = open_checkpoint(path)
    model_bytes = sum(view.shape(n).numel() * view.dtype(n).itemsize for n in view)
    before = anon_bytes()  # imports, process group, mesh: the baseline subtracted
    start = time.perf_counter()
    with PeakAnon() as peak:
        model = load_model("auto", path, parallel=parallel)
    seconds = time.perf_counter() - start
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else
                p.numel() * p.element_size() for p in model.parameters())
    return {"model_bytes": model_bytes, "baseline_anon": before, "peak_anon_growth": peak.peak - before,
            "local_param_bytes": local, "load_seconds": seconds}


def shards_job(path: str, *, permute: bool = False) -> dict:
    """Each parameter of this rank: its placement and local shape, and whether its local
    tensor equals the single-process model's rows or columns; then the logits.

    ``permute``: keep the model's interleaved RoPE (no RotateHalf), so that the HF
    rotate-half q/k rows are permuted: per tensor in one process, per shard (its own
    heads) on a rank."""
    from torch.distributed.tensor import DTensor

    import leangen.load.pipeline
    from leangen import load_model
    from leangen.parallel.tensor_parallel import shard_range

    if permute:
        original = leangen.load.pipeline.match_stored_layout
        leangen.load.pipeline.match_stored_layout = lambda model, stored: None
        try:
            return shards_job(path)
        finally:
            leangen.load.pipeline.match_stored_layout = original
    parallel = tp()
    model = load_model("auto", path, parallel=parallel)
    single_model = load_model("auto", path)
    single = dict(single_model.named_parameters())
    params = {}
    for name, p in model.named_parameters():
        ref = single[name]
        if isinstance(p, DTensor):
            (placement,) = p.placements
            local = p.to_local()
            if placement.is_shard():
                start, stop = shard_range(ref.shape[placement.dim], parallel.size, parallel.index)
                expected = ref.narrow(placement.dim, start, stop - start)
            else:
                expected = ref
            params[name] = {"placement": str(placement), "global": list(p.shape), "local": list(local.shape),
                            "equal": torch.equal(local, expected), "type": "DTensor"}
        else:
            params[name] = {"placement": "plain", "global": list(p.shape), "local": list(p.shape),
                            "equal": torch.equal(p, ref), "type": type(p).__name__}
    with torch.inference_mode():
        diff = (model(TOKENS) - single_model(TOKENS)).abs().max().item()
    view = leangen.load.pipeline.open_checkpoint(path, qk_layout=leangen.load.pipeline.qk_layout(single_model))
    return {"params": params, "logits_max_diff": diff, "world_size": parallel.size,
            "q_permuted_heads": view.entries["layers.0.attn.q_proj.weight"].transform.permute_heads}


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 matrix a (quantized) weight multiplies by, read through its own kernel:
    the identity's rows pick one column each, exactly. Int4's opaque CPU format has no
    dequantize(); this works for both kinds and for plain tensors."""
    eye = torch.eye(weight.shape[1], dtype=torch.float32)
    return torch.nn.functional.linear(eye, weight).T


# int4 here in groups of 128, not the default 32: the tiny models' row shards (32 and 64
# wide) then take a smaller group than their whole layers (64 and 128 wide), so the
# inexact case is checked too; the "wide" model's shards still take 128 (exact)
INT4_GROUP = 128


def quant_spec(kind: str):
    from leangen.quant.quantize import QuantSpec

    return QuantSpec(kind, group_size=INT4_GROUP) if kind == "int4" else QuantSpec(kind)


def quantized_alone(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight`` (a plain tensor) quantized on its own as leangen would, as dense fp32;
    a layer the quantizer skips stays as it is."""
    from leangen.quant.quantize import Quantizer

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    Quantizer(quant_spec(kind), torch.device("cpu"), weight.dtype).quantize_linear(linear)
    return dense(linear.weight)


def _placement(module: torch.nn.Module):
    """The weight's placement of a sharded Linear, quantized (ShardLinear) or not; else
    None (the embedding is sharded too, but not a Linear: never quantized)."""
    from torch.distributed.tensor import DTensor

    from leangen.quant.sharded import ShardLinear

    if isinstance(module, ShardLinear):
        return module.placement
    if type(module) is torch.nn.Linear and isinstance(module.weight, DTensor):
        return module.weight.placements[0]
    return None


def quant_job(path: str, kind: str) -> dict:
    """Per-rank quantization on this rank. For each sharded Linear: is the local
    quantized shard the rank's slice quantized alone, and is it the same rows or columns
    of the one-process quantized layer? Then the logits against (a) ``emulated``: the
    one-process quantized model whose sharded Linears have the per-shard quantized
    weights (dense fp32), the exact model the ranks compute; (b) the one-process fp32 and
    quantized models, for the size of the quantization error."""
    from leangen import load_model
    from leangen.parallel.tensor_parallel import shard_range
    from leangen.quant.sharded import ShardLinear

    parallel = tp()
    model = load_model("auto", path, parallel=parallel, quantize=quant_spec(kind))
    single = load_model("auto", path)  # fp32: the reference weights
    single_q = load_model("auto", path, quantize=quant_spec(kind))
    emulated = load_model("auto", path, quantize=quant_spec(kind))
    layers = {}
    for name, module in model.named_modules():
        placement = _placement(module)
        if placement is None:
            continue
        full = single.get_submodule(name).weight
        ranges = [shard_range(full.shape[placement.dim], parallel.size, i) for i in range(parallel.size)]
        pieces = [quantized_alone(full.narrow(placement.dim, a, b - a), kind) for a, b in ranges]
        start, stop = ranges[parallel.index]
        whole = dense(single_q.get_submodule(name).weight).narrow(placement.dim, start, stop - start)
        local = dense(module.weight if isinstance(module, ShardLinear) else module.weight.to_local())
        one_process = single_q.get_submodule(name).weight
        layers[name] = {"placement": str(placement), "quantized": isinstance(module, ShardLinear),
                        "whole_quantized": type(one_process) not in (torch.Tensor, torch.nn.Parameter),
                        "in_features": full.shape[1], "local_in_features": local.shape[1],
                        "alone_equal": torch.equal(local, pieces[parallel.index]),
                        "whole_equal": torch.equal(local, whole)}
        emulated.get_submodule(name).weight = torch.nn.Parameter(torch.cat(pieces, placement.dim),
                                                                 requires_grad=False)
    with torch.inference_mode():
        logits, reference = model(TOKENS), single(TOKENS)
        diffs = {"emulated": (logits - emulated(TOKENS)).abs().max().item(),
                 "one_process_quantized": (logits - single_q(TOKENS)).abs().max().item(),
                 "tp_error": (logits - reference).abs().max().item(),
                 "one_process_error": (single_q(TOKENS) - reference).abs().max().item()}
    return {"layers": layers, "diffs": diffs, "counts": model.leangen.quantized,
            "one_process_counts": single_q.leangen.quantized,
            # a tied output: a Linear of the rank's whole (replicated) copy, quantized
            "output": [type(model.output).__name__, type(model.output.weight).__name__]}


def refusals_job(paths: dict[str, str]) -> dict:
    """The one-line error each checkpoint's load gives on these ranks."""
    from leangen import load_model

    parallel, errors = tp(), {}
    for name, path in paths.items():
        try:
            load_model("auto", path, parallel=parallel)
            errors[name] = None
        except LeangenError as e:
            errors[name] = str(e)
    return errors


def generate_job(args: list[str]) -> dict:
    from leangen.generate import main

    return {"exit_code": main(args)}


def fail_on(rank: int) -> None:
    """Make ``rank`` fail while it loads, as a bad disk or a missing file would."""
    from leangen.parallel import tensor_parallel as parallel

    if distributed.ranks_from_env().rank != rank:
        return

    def broken(self, view, device, dtype):
        raise LeangenError("injected failure while taking shards")

    parallel.TensorParallel.taker = broken


def main(jobs_file: str) -> int:
    jobs = json.loads(Path(jobs_file).read_text())
    out, rank = Path(jobs["out"]), distributed.ranks_from_env().rank

    def save(name: str, result: dict) -> None:
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(result))

    # One process group for every job: each recipe run below finds it and leaves it be.
    torch.distributed.init_process_group("gloo")
    if jobs.get("memory"):
        save("memory", memory_job(jobs["memory"]))
    if jobs.get("shards"):
        save("shards", shards_job(jobs["shards"]))
        save("shards-permuted", shards_job(jobs["shards"], permute=True))
    for name, (path, kind) in jobs.get("quant", {}).items():
        save(f"quant-{name}", quant_job(path, kind))
    if jobs.get("refusals"):
        save("refusals", refusals_job(jobs["refusals"]))
    codes = []
    for name, args in jobs.get("generate", []):
        result = generate_job(args)
        save(name, result)
        codes.append(result["exit_code"])
    if jobs.get("fail_last"):
        fail_on(jobs["fail_last"]["rank"])
        codes.append(generate_job(jobs["fail_last"]["args"])["exit_code"])
    torch.distributed.destroy_process_group()
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
