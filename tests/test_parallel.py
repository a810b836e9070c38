"""Tensor-parallel generation (leangen.parallel.tensor_parallel) on 2 gloo ranks under torchrun, against
one process: greedy ids, each rank's shards, each rank's anonymous memory, a failing rank.

The torchrun jobs run in subprocesses (tests/tp_worker.py is one rank): one launch runs
every checkpoint and ends with a run in which a rank fails (imports dominate on a 2-core
machine, so launches are few); one goes through ``tune run``. No timing is asserted; the
subprocess timeouts only guard a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import BIG_LLAMA_MIN_BYTES, GOLDEN, TP_CASES

from leangen.checkpoint.convert import Geometry
from leangen.demo import demo_dir
from leangen.errors import ConfigError
from leangen.generate import main as generate_main
from leangen.parallel.tensor_parallel import (
    LLAMA_PLAN,
    check_divisible,
    default_plan,
    resolve_plan,
    shard_range,
)

WORKER = Path(__file__).with_name("tp_worker.py")
# Recipe runs compared with one process: (checkpoint, overrides). Sampling checks that the
# ranks continue with one token (rank 0's); the batch mixes prompt lengths (left padding).
RUNS = {
    "llama3": ("llama3", []), "mistral": ("mistral", []), "qwen2": ("qwen2", []),
    "llama3-sampled": ("llama3", ["temperature=0.8", "top_k=20", "seed=7"]),
    "qwen2-batch": ("qwen2", ["prompts_file={prompts}", "batch_size=2"]),
    "mistral-plan": ("mistral", ["tensor_parallel_plan=torchtune.models.llama3.base_llama_tp_plan"]),
    # int4 on "wide", whose row-wise shards are whole int4 groups: the same math as one
    # process (this prompt: "one two three" alone ends at once on the stop token)
    "wide-int4": ("wide", ["quantize=int4", "quantize_cache=null", "prompt=one two three four"]),
    # int8: each rank's row-wise shards have their own per-row scales, so not one
    # process's model (see test_each_rank_quantizes_exactly_its_own_shard); the cache is asked for
    "llama3-int8": ("llama3", ["quantize=int8", "quantize_cache={root}/cache",
                               "metrics_file={root}/int8-metrics.json"]),
}
# Runs whose greedy ids must equal one process's: all but int8 (above).
SAME_IDS = [run for run in RUNS if run != "llama3-int8"]
# Per-rank quantization jobs (tests/tp_worker.py quant_job): (checkpoint, kind). "uneven"
# int4: rank 0's 49 output rows cannot be packed (a multiple of 16 is needed), rank 1's 48 can.
QUANT = {"llama3-int8": ("llama3", "int8"), "llama3-int4": ("llama3", "int4"), "qwen2-int8": ("qwen2", "int8"),
         "qwen2-int4": ("qwen2", "int4"), "uneven-int4": ("uneven", "int4"), "wide-int8": ("wide", "int8"),
         "wide-int4": ("wide", "int4")}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


def _env() -> dict:
    env = dict(os.environ, LEANGEN_DIST_TIMEOUT_S="60")
    env.pop("LEANGEN_DEBUG", None)
    return env


def _config(root: Path, name: str, checkpoint: Path) -> Path:
    """A generate config for ``checkpoint`` with the demo's sentencepiece tokenizer
    (its 96 ids fit the models' vocabulary): greedy, a few tokens."""
    path = root / f"{name}.yaml"
    path.write_text(OmegaConf.to_yaml({
        "model": "auto", "checkpoint": {"path": str(checkpoint)},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(demo_dir() / "tokenizer.model"), "prompt_template": None},
        "device": "cpu", "prompt": "one two three", "max_new_tokens": 10, "temperature": 0, "top_k": None,
    }))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tp_checkpoints):
    """(a folder for this module's configs and outputs, the checkpoints by name)."""
    return tmp_path_factory.mktemp("tp"), tp_checkpoints


@pytest.fixture(scope="module")
def tp_run(folders):
    """One torchrun launch: memory and shards on their checkpoints, then the generate
    recipe on each case. Returns (out dir, the completed process)."""
    root, paths = folders
    out = root / "out"
    out.mkdir()
    jobs = {"out": str(out), "memory": str(paths["big"]), "shards": str(paths["uneven"]),
            "refusals": {name: str(paths[name]) for name in ("kv3", "mlp131")},
            "quant": {job: [str(paths[case]), kind] for job, (case, kind) in QUANT.items()},
            "generate": [[name, _args(root, name, paths, out / f"{name}.jsonl")] for name in RUNS],
            # last: rank 1 fails while loading; prompt "zero" tells its echo apart
            "fail_last": {"rank": 1, "args": ["--config", str(_config(root, "llama3", paths["llama3"])),
                                              "prompt=zero"]}}
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([*TORCHRUN, str(WORKER), str(root / "jobs.json")], capture_output=True,
                          text=True, timeout=600, env=_env())  # a hang fails here
    jobs_done = ("memory", "shards", "refusals", *RUNS, *(f"quant-{job}" for job in QUANT))
    results = [f"{job}-rank{r}.json" for job in jobs_done for r in (0, 1)]
    assert all((out / name).exists() for name in results), done.stderr[-3000:]
    return out, done


def _args(root: Path, run: str, paths: dict, output: Path) -> list[str]:
    case, overrides = RUNS[run]
    prompts = root / "prompts.txt"
    prompts.write_text("one two three\nfour\nfive six seven eight nine\n")
    return ["--config", str(_config(root, case, paths[case])), f"output_file={output}",
            *(o.format(prompts=prompts, root=root) for o in overrides)]


def _result(out: Path, job: str, rank: int) -> dict:
    return json.loads((out / f"{job}-rank{rank}.json").read_text())


def _ids(path: Path) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("run", SAME_IDS)
@pytest.mark.distributed
def test_tensor_parallel_ids_equal_one_process(run, folders, tp_run, tmp_path, capsys):
    root, paths = folders
    out, _ = tp_run
    single = tmp_path / "single.jsonl"
    assert generate_main(_args(tmp_path, run, paths, single)) == 0
    capsys.readouterr()
    assert _ids(out / f"{run}.jsonl") == _ids(single)
    if run == "wide-int4":  # its prompt was chosen to decode every step
        assert [len(ids) for ids in _ids(single)] == [10]
    # Mistral's ends early on its stop token: the ranks stop together
    assert all(1 <= len(ids) <= 10 for ids in _ids(single))
    assert all(_result(out, run, rank)["exit_code"] == 0 for rank in (0, 1))


def test_checkpoints_are_sharded_across_files(folders):
    """Each rank's q/k/v rows of some layer come from more than one file."""
    _, paths = folders
    for case in TP_CASES:
        weight_map = json.loads((paths[case] / "model.safetensors.index.json").read_text())["weight_map"]
        layer_files = {weight_map[f"model.layers.{i}.self_attn.{p}_proj.weight"] for i in range(2) for p in "qkv"}
        assert len(set(weight_map.values())) >= 3 and len(layer_files) >= 2, case


@pytest.mark.distributed
def test_only_rank_0_prints_and_writes(tp_run):
    out, done = tp_run
    # each completion once: streamed (single prompts) or printed after its batch
    assert done.stdout.count("one two three") == len(RUNS)
    assert done.stdout.count("five six seven eight nine") == 1
    assert done.stderr.count("tok/s") == len(RUNS)  # the summary line, once per run
    assert not list(out.glob("*.jsonl.*"))  # no stray per-rank files


@pytest.mark.parametrize("job", ["shards", "shards-permuted"])
@pytest.mark.distributed
def test_each_rank_holds_only_its_shard(job, tp_run):
    """``shards-permuted``: the model keeps its interleaved RoPE, so the HF q/k rows are
    permuted, on a rank within its own heads (2 of 4 for q, 1 of 2 for k)."""
    out, _ = tp_run
    ranks = [_result(out, job, r) for r in (0, 1)]
    assert all(r["q_permuted_heads"] == (4 if job == "shards-permuted" else 0) for r in ranks)
    for rank, result in enumerate(ranks):
        params = result["params"]
        assert all(p["equal"] for p in params.values()), [n for n, p in params.items() if not p["equal"]]
        q = params["layers.0.attn.q_proj.weight"]  # 4 heads of 16: 2 heads a rank
        assert q["placement"] == "S(0)" and q["global"] == [64, 64] and q["local"] == [32, 64]
        k = params["layers.0.attn.k_proj.weight"]  # 2 kv heads: 1 a rank
        assert k["local"] == [16, 64]
        o = params["layers.0.attn.output_proj.weight"]
        assert o["placement"] == "S(1)" and o["local"] == [64, 32]
        w2 = params["layers.0.mlp.w2.weight"]
        assert w2["placement"] == "S(1)" and w2["local"] == [64, 64]
        # vocabulary 97 splits as torch.chunk does: 49 rows on rank 0, 48 on rank 1
        assert params["tok_embeddings.weight"]["local"] == [[49, 64], [48, 64]][rank]
        assert params["output.weight"]["local"] == [[49, 64], [48, 64]][rank]
        # only the norms are whole on every rank
        plain = {n for n, p in params.items() if p["type"] != "DTensor"}
        assert plain and all(n.endswith("scale") for n in plain), plain
        assert result["logits_max_diff"] < 1e-4


@pytest.mark.distributed
def test_each_rank_maps_its_slice_without_copying_the_model(tp_run):
    """Peak anonymous memory growth while a rank loads: the anon memory after imports,
    process group and mesh is the baseline subtracted. Row shards are mmap views; only
    column shards (attention output, w2) are copied."""
    out, _ = tp_run
    for rank in (0, 1):
        result = _result(out, "memory", rank)
        assert result["model_bytes"] > BIG_LLAMA_MIN_BYTES
        assert result["peak_anon_growth"] < 0.6 * result["model_bytes"], result
        assert result["local_param_bytes"] < 0.6 * result["model_bytes"], result


@pytest.mark.distributed
def test_readme_command_tune_run_nproc_per_node(tmp_path):
    """The README's ``tune run --nproc_per_node 2 leangen/generate --config demo``: the
    demo's golden count, printed once, and the metrics of rank 0."""
    metrics_file = tmp_path / "metrics.json"
    done = subprocess.run(["tune", "run", "--nproc_per_node", "2", "leangen/generate", "--config", "demo",
                           f"metrics_file={metrics_file}"],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == GOLDEN
    assert done.stdout.count(GOLDEN) == 1 and done.stderr.count("tok/s") == 1
    metrics = json.loads(metrics_file.read_text())
    assert metrics["tensor_parallel"]["ranks"] == 2 and metrics["generated_tokens"] == 20


@pytest.mark.distributed
def test_a_failing_rank_ends_the_job_and_is_named(tp_run):
    _, done = tp_run
    assert done.returncode != 0
    assert "rank 1: error: injected failure while taking shards" in done.stderr
    # rank 0 was waiting in a collective for rank 1: one line (or torchrun's SIGTERM got
    # there first), no traceback
    assert ("rank 0: error: a collective with the other ranks failed" in done.stderr
            or "rank 0: interrupted (SIGTERM)." in done.stderr), done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr


@pytest.mark.distributed
def test_what_the_ranks_cannot_split_is_refused_in_one_line(tp_run):
    out, _ = tp_run
    for rank in (0, 1):
        errors = _result(out, "refusals", rank)
        assert errors["kv3"] == ("2 ranks cannot split the kv heads evenly: the model has 6 attention "
                                 "heads and 3 kv heads. Use --nproc_per_node 1 or 3.")
        assert errors["mlp131"].startswith("2 ranks cannot split 'layers.0.mlp.w1.weight' (size 131 along dim 0)")


def _quant(out: Path, job: str) -> list[dict]:
    return [_result(out, f"quant-{job}", rank) for rank in (0, 1)]


@pytest.mark.parametrize("job", list(QUANT))
@pytest.mark.distributed
def test_each_rank_quantizes_exactly_its_own_shard(job, tp_run):
    """Every sharded Linear's local weight is the rank's slice quantized on its own
    (compared as the dense matrix each kernel multiplies by), and where the math allows,
    the same rows or columns as the one-process quantized layer."""
    from tp_worker import quant_spec

    out, _ = tp_run
    kind = QUANT[job][1]
    ranks = _quant(out, job)
    # 7 Linears a layer, 2 layers, and an untied output
    assert all(len(r["layers"]) == (14 if job.startswith("qwen2") else 15) for r in ranks)
    for name in ranks[0]["layers"]:
        layer = [r["layers"][name] for r in ranks]
        assert all(shard["alone_equal"] for shard in layer), (name, layer)
        if layer[0]["placement"] == "S(0)":
            # output rows: int8 scales and int4 groups are per row, as in the whole layer;
            # unless one of the two is not quantized (uneven-int4: one process cannot pack
            # the output's 97 rows, rank 1 can pack its 48)
            assert [shard["whole_equal"] for shard in layer] == \
                [shard["quantized"] == shard["whole_quantized"] for shard in layer], (name, layer)
        elif kind == "int8":
            # input columns: a rank's per-row scale is its half's maximum, not the row's
            assert not all(shard["whole_equal"] for shard in layer), (name, layer)
        else:
            # int4 groups run along the inputs: exact when the rank's width takes the
            # whole layer's group size (then the group boundaries coincide)
            spec = quant_spec("int4")
            aligned = spec.group_for(layer[0]["local_in_features"]) == spec.group_for(layer[0]["in_features"])
            assert all(shard["whole_equal"] == aligned for shard in layer), (name, layer)
            assert aligned == job.startswith("wide"), name  # both cases are covered


@pytest.mark.parametrize("job", list(QUANT))
@pytest.mark.distributed
def test_tensor_parallel_quantized_logits(job, tp_run):
    """(a) The ranks compute exactly the one-process model whose Linears hold the
    per-shard quantized weights: 1e-4 as for fp32 above (the all-reduce sums partial
    products in another order; measured up to 3e-6). (b) Against the fp32 model the
    error is the size of one process's quantization error: a shard's rounding step is at
    most the whole layer's (an int8 row's maximum over half the inputs is at most the
    row's; int4 groups are no wider), so the bound is twice the one-process error, for
    errors that add up differently (measured: at most 1.2 times)."""
    out, _ = tp_run
    for result in _quant(out, job):
        diffs = result["diffs"]
        assert diffs["emulated"] < 1e-4, diffs
        assert diffs["tp_error"] < 2 * diffs["one_process_error"], diffs
        if job == "wide-int4":  # every shard as in the whole layer: one process's model
            assert diffs["one_process_quantized"] < 1e-4, diffs


@pytest.mark.parametrize("job", list(QUANT))
@pytest.mark.distributed
def test_each_rank_counts_what_it_quantized_and_a_tied_output_is_quantized_whole(job, tp_run):
    out, _ = tp_run
    weight = {"int8": "AffineQuantizedTensor", "int4": "Int4OpaqueTensor"}[QUANT[job][1]]
    for rank, result in enumerate(_quant(out, job)):
        if job == "uneven-int4":  # rank 0's 49 output rows stay fp32 (a DTensor), rank 1's 48 do not
            assert result["layers"]["output"]["quantized"] == bool(rank)
            assert result["counts"] == [{"quantized": 14, "skipped": 1}, {"quantized": 15, "skipped": 0}][rank]
            continue
        assert result["counts"] == result["one_process_counts"] == {"quantized": 15, "skipped": 0}
        assert all(layer["quantized"] for layer in result["layers"].values())
        # tied: each rank quantizes its own whole copy of the replicated embedding
        assert result["output"] == ["Linear" if job.startswith("qwen2") else "ShardLinear", weight]


@pytest.mark.distributed
def test_the_int8_recipe_reports_per_rank_quantization_and_no_cache(folders, tp_run):
    root, paths = folders
    out, _ = tp_run
    assert all(_result(out, "llama3-int8", rank)["exit_code"] == 0 for rank in (0, 1))
    assert all(len(ids) == 10 for ids in _ids(out / "llama3-int8.jsonl"))
    metrics = json.loads((root / "int8-metrics.json").read_text())
    assert metrics["quantized"] == {"quantized": 15, "skipped": 0}  # rank 0's
    assert metrics["quantize_cache"] == "off" and not (root / "cache").exists()
    assert "quantize_cache is off: each rank quantizes its own shards on every load" in \
        metrics["tensor_parallel"]["notes"]
    # rank 0's share: half of each sharded Linear at a byte a weight, against 4 in the file
    checkpoint_bytes = sum(f.stat().st_size for f in paths["llama3"].glob("*.safetensors"))
    assert metrics["model_bytes"] < 0.25 * checkpoint_bytes, metrics["model_bytes"]


# --- without a launcher -------------------------------------------------------------------

def test_heads_that_the_ranks_do_not_divide_are_one_line():
    with pytest.raises(ConfigError, match=r"^3 ranks cannot split the attention heads and the kv heads "
                                          r"evenly: the model has 32 attention heads and 8 kv heads. "
                                          r"Use --nproc_per_node 1 or 2 or 4 or 8.$"):
        check_divisible(Geometry(32, 8, 128), 3)
    with pytest.raises(ConfigError, match="4 ranks cannot split the kv heads evenly: the model has "
                                          "8 attention heads and 2 kv heads"):
        check_divisible(Geometry(8, 2, 64), 4)
    check_divisible(Geometry(32, 8, 128), 8)


@pytest.mark.parametrize("size,parts", [(97, 2), (128, 2), (10, 4), (3, 4)])
def test_shard_ranges_follow_torch_chunk(size, parts):
    chunks = torch.arange(size).chunk(parts)
    for index in range(parts):
        start, stop = shard_range(size, parts, index)
        expected = chunks[index].tolist() if index < len(chunks) else []
        assert list(range(start, stop)) == expected


@pytest.mark.parametrize("builder", ["torchtune.models.llama3_2.llama3_2", "torchtune.models.llama3_1.llama3_1_70b",
                                     "torchtune.models.mistral.mistral", "torchtune.models.qwen2.qwen2",
                                     "torchtune.models.qwen2_5.qwen2_5_7b_instruct", "leangen.hf.builders.llama2_tied"])
def test_llama_style_families_default_to_torchtunes_plan(builder):
    assert default_plan(builder) == LLAMA_PLAN
    plan = resolve_plan(None, builder)
    assert "layers.*.attn.q_proj" in plan


def test_a_family_without_a_plan_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="no tensor-parallel plan for builder 'torchtune.models.gemma.gemma'"):
        default_plan("torchtune.models.gemma.gemma")
    from torchtune.models.phi3 import phi3

    with pytest.raises(ConfigError, match="torchtune.models.phi3._model_builders.phi3|phi3"):
        default_plan(phi3)


def test_a_plan_from_the_config_is_instantiated_and_copied():
    from torchtune.models.llama3 import base_llama_tp_plan

    plan = resolve_plan(OmegaConf.create({"_component_": LLAMA_PLAN}), "anything")
    assert plan == base_llama_tp_plan() and plan is not base_llama_tp_plan()
    with pytest.raises(ConfigError, match="tensor_parallel_plan gave a list"):
        resolve_plan(lambda: [1], "anything")
    with pytest.raises(ConfigError, match="tensor_parallel_plan failed"):
        resolve_plan("no.such.plan", "anything")


@pytest.fixture
def own_group(tmp_path):
    """A one-rank gloo group made by the caller (not by leangen.parallel.ranks.start)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_stop_leaves_a_group_it_did_not_make(own_group):
    from leangen.parallel import ranks as distributed

    distributed.stop()
    assert torch.distributed.is_initialized()


def test_a_dead_peer_in_a_collective_is_one_line(own_group):
    from leangen.errors import LeangenError
    from leangen.parallel.ranks import peer_failure

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:28572.\nmore")
    failure = peer_failure(gloo)
    assert isinstance(failure, LeangenError) and failure.__cause__ is gloo
    assert str(failure).startswith("a collective with the other ranks failed, so another rank probably failed")
    assert "\n" not in str(failure)
    assert peer_failure(RuntimeError("shape mismatch")) is None
    assert peer_failure(LeangenError("x")) is None


@pytest.mark.parametrize("override,key", [("compile=true", "compile"), ("prepack=true", "prepack")])
def test_what_tensor_parallelism_does_not_support_yet_is_refused_early(override, key):
    from leangen.generate import GenerateConfig, _reject_bad_options
    from leangen.parallel.ranks import Ranks
    from leangen.recipe.cli import parse_args

    cfg = parse_args(["--config", "demo", override], GenerateConfig)
    _reject_bad_options(cfg)  # one process: fine
    with pytest.raises(ConfigError, match=f"^{key} with tensor parallelism \\(2 ranks\\) is not supported yet"):
        _reject_bad_options(cfg, Ranks(0, 2, 0))


@pytest.mark.parametrize("override", ["quantize=int8", "quantize=int4"])
def test_quantize_is_accepted_under_tensor_parallelism(override):
    from leangen.generate import GenerateConfig, _reject_bad_options
    from leangen.parallel.ranks import Ranks
    from leangen.recipe.cli import parse_args

    _reject_bad_options(parse_args(["--config", "demo", override], GenerateConfig), Ranks(0, 2, 0))


def test_load_model_refuses_prepack_under_tensor_parallelism():
    """From Python too, not only in the recipe: the refusal comes before any mesh is used."""
    import leangen
    from leangen.parallel.tensor_parallel import TensorParallel

    with pytest.raises(ConfigError, match="prepack with tensor parallelism is not supported"):
        leangen.load_model("auto", demo_dir(), device="cpu", dtype="fp32",
                           prepack=True, parallel=TensorParallel(mesh=None))
