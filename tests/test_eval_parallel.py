"""Data-parallel eval: the recipe under torchrun (2 CPU ranks, gloo) gives the numbers of
one process, on the shipped demo: perplexity to 1e-6 relative, lm-eval results (few-shot
included) identical; and a failing or stuck rank ends the job with its rank named.

Each test is one torchrun launch of two ranks; each rank imports torch, torchtune and
lm-eval, which takes a few seconds on a busy 2-core machine.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from leangen.demo import demo_dir
from leangen.eval import main
from leangen.evaluation.perplexity import windows

HERE = Path(__file__).parent
_VENV_TUNE = Path(sys.executable).with_name("tune")
TUNE = str(_VENV_TUNE) if _VENV_TUNE.exists() else "tune"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]

# 8 perplexity windows in batches of 3: 3 batches, 2 for rank 0 and 1 for rank 1.
# counting_mc: 23 documents x 4 choices, 92 requests in 31 batches, with two few-shot
# examples per document, which lm-eval's own document split would draw differently on
# rank 1. The two tasks below add lm-eval's other request types on the same documents.
PERPLEXITY = ["--config", "eval_demo", "max_seq_len=24", "batch_size=3"]
TASKS = ["counting_mc", "counting_gen", "counting_rolling"]
LM_EVAL = ["lm_eval.limit=23", "lm_eval.num_fewshot=2", f"lm_eval.tasks=[{','.join(TASKS)}]"]

OTHER_TASKS = """
task: counting_gen
custom_dataset: !function counting_mc.load
output_type: generate_until
test_split: test
doc_to_text: context
doc_to_target: "{{choices[answer]}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 3}
filter_list:
  - name: first_word
    filter: [{function: regex, regex_pattern: '(\\w+)'}, {function: take_first}]
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
metadata: {version: 1.0}
---
task: counting_rolling
custom_dataset: !function counting_mc.load
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: context
metadata: {version: 1.0}
"""


def launch(command, tmp_path, timeout_s=None, **env):
    env = {**os.environ, "LEANGEN_DIST_TIMEOUT_S": str(timeout_s or 60), **env}
    env.pop("LEANGEN_DEBUG", None)  # errors as users see them: one line per rank
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """counting_mc, plus a generate_until and a loglikelihood_rolling task on its documents."""
    folder = tmp_path_factory.mktemp("tasks")
    for name in ["counting_mc.yaml", "counting_mc.py", "counting_mc.jsonl"]:
        shutil.copy(demo_dir() / "eval" / "tasks" / name, folder)
    for i, task in enumerate(OTHER_TASKS.split("---")):
        (folder / f"other_{i}.yaml").write_text(task)
    return [*LM_EVAL, f"lm_eval.include_path={folder}"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tasks):
    out = tmp_path_factory.mktemp("one") / "results.json"
    assert main([*PERPLEXITY, *tasks, f"output_file={out}"]) == 0
    return json.loads(out.read_text())


def assert_same_perplexity(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name]["tokens"] == want[name]["tokens"], name
        assert got[name]["ppl"] == pytest.approx(want[name]["ppl"], rel=1e-6), name
        assert got[name]["nll"] == pytest.approx(want[name]["nll"], rel=1e-6), name


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path, tasks, one_process):
    tokens = len((demo_dir() / "eval" / "counting.txt").read_text().split())  # one token a word here
    assert len(windows(tokens + 1, 24, 24)) == 8  # BOS + words: 3 batches of 3, split 2 + 1

    proc = launch([*TORCHRUN, "-m", "leangen.eval", *PERPLEXITY, *tasks, "output_file=r.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "r.json").read_text())

    assert_same_perplexity(got["perplexity"], one_process["perplexity"])
    assert got["lm_eval"]["n-shot"]["counting_mc"] == 2
    assert got["lm_eval"]["n-samples"] == one_process["lm_eval"]["n-samples"]
    results, want = got["lm_eval"]["results"], one_process["lm_eval"]["results"]
    assert results.keys() == want.keys() == set(TASKS)
    for metric in ["acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"]:
        assert results["counting_mc"][metric] == want["counting_mc"][metric], metric
    assert results["counting_gen"] == want["counting_gen"]  # greedy: the same texts
    assert want["counting_gen"]["exact_match,first_word"] > 0.2  # real texts: some the right number
    for metric, value in want["counting_rolling"].items():  # sums of log-probabilities
        same = pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
        assert results["counting_rolling"][metric] == same, metric

    metrics = got["metrics"]
    assert metrics["world_size"] == 2 and len(metrics["per_rank"]) == 2
    assert metrics["tokens_per_second"] > 0 and metrics["peak_host_rss_bytes"] > 0
    # rank 0 alone reports: one results table, one summary line
    assert proc.stdout.count("counting_mc") == 1 and proc.stdout.count("counting.txt") == 1
    assert proc.stderr.count("peak host RSS") == 1


@pytest.mark.distributed
def test_tune_run_with_a_failing_rank_ends_the_job_and_names_the_rank(tmp_path):
    """`tune run --nproc_per_node 2 leangen/eval` is torchrun with `python -m leangen.eval`.
    A text file missing on one node, here on rank 1 only (the path holds the rank):
    that rank says so, and the job exits instead of waiting for it."""
    (tmp_path / "text0.txt").write_text((demo_dir() / "eval" / "counting.txt").read_text())
    proc = launch([TUNE, "run", "--nproc_per_node", "2", "leangen/eval", *PERPLEXITY, "~lm_eval",
                   f"perplexity.files={tmp_path}/text${{oc.env:RANK}}.txt", "output_file=r.json"],
                  tmp_path)
    assert proc.returncode != 0
    assert f"rank 1: error: perplexity.files: '{tmp_path}/text1.txt' does not exist." in proc.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.distributed
def test_a_stuck_rank_times_out_and_is_named(tmp_path):
    """Rank 1 stops answering while scoring (tests/eval_parallel_worker.py): rank 0 waits
    LEANGEN_DIST_TIMEOUT_S at the exchange, names rank 1 and exits; torchrun ends rank 1."""
    proc = launch([*TORCHRUN, str(HERE / "eval_parallel_worker.py"), *PERPLEXITY, "~lm_eval",
                   "output_file=r.json"], tmp_path, timeout_s=5, LEANGEN_TEST_FAIL="hang")
    assert proc.returncode != 0
    assert ("rank 0: error: gathering the perplexity windows' scores: rank 1 stopped or did not "
            "answer within 5 s (LEANGEN_DIST_TIMEOUT_S)") in proc.stderr, proc.stderr
    assert not (tmp_path / "r.json").exists()


# -- the pieces, in one process ----------------------------------------------------------

def test_rank_0_names_the_ranks_that_missed_the_barrier():
    from leangen.errors import LeangenError
    from leangen.parallel.ranks import _peer_errors

    with pytest.raises(LeangenError, match=r"^gathering x: ranks 1, 3 stopped or did not answer "
                                           r"within \d+ s \(LEANGEN_DIST_TIMEOUT_S\)"):
        with _peer_errors("gathering x"):
            raise RuntimeError("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms")
    with pytest.raises(LeangenError, match=r"another rank stopped .*\(Connection closed by peer "
                                           r"\[127.0.0.1\]:1\)\.$"):
        with _peer_errors("gathering x"):
            raise RuntimeError("[/pytorch/gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1. "
                               "This is typically caused by a remote worker crashing.")


def test_ranks_split_batches_and_refuse_ranks_with_other_inputs(monkeypatch):
    from leangen.errors import LeangenError
    from leangen.evaluation import scoring
    from leangen.parallel.ranks import Ranks

    ranks = Ranks(1, 3, 1)
    assert scoring.my_share(list(range(8)), ranks) == [1, 4, 7]
    monkeypatch.setattr(scoring, "all_gather_object",
                        lambda obj, what: [obj, ("another digest", {1: "b"}), obj])
    with pytest.raises(LeangenError, match=r"^lm-eval x: ranks \[1\] built other inputs than rank 0"):
        scoring.gather_answers({0: "a"}, ranks, "lm-eval x", lambda: [[1, 2]])
    monkeypatch.setattr(scoring, "all_gather_object",
                        lambda obj, what: [(obj[0], {i: str(i)}) for i in range(3)])
    assert scoring.gather_answers({1: "1"}, ranks, "x", lambda: [[1, 2]]) == {0: "0", 1: "1", 2: "2"}
