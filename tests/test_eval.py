"""The eval recipe end to end on the shipped demo, offline: packaged configs, the
local lm-eval task against lm-eval's own HF backend, the ways to run it, and the
one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from leangen.demo import demo_dir
from leangen.eval import EvalConfig, main
from leangen.recipe.cli import parse_args, resolve_config_path

TASKS = demo_dir() / "eval" / "tasks"
COUNTING = demo_dir() / "eval" / "counting.txt"
# the `tune` of this interpreter's environment, even when that environment is not activated
_VENV_TUNE = Path(sys.executable).with_name("tune")
TUNE = str(_VENV_TUNE) if _VENV_TUNE.exists() else "tune"


def run(capsys, *args):
    """The recipe in-process: (return code, stdout, stderr)."""
    code = main(["--config", "eval_demo", *args])
    out, err = capsys.readouterr()
    return code, out, err


# -- shipped task -------------------------------------------------------------------

@pytest.mark.slow
def test_shipped_task_files_are_what_the_script_writes(tmp_path):
    script = resolve_config_path("eval_demo").parents[2] / "tools" / "make_eval_task.py"
    if not script.exists():
        pytest.skip("installed without the repository's tools/")
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ["counting.txt", "tasks/counting_mc.yaml", "tasks/counting_mc.jsonl"]:
        assert (tmp_path / name).read_bytes() == (demo_dir() / "eval" / name).read_bytes(), name


# -- end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "results.json"
    assert main(["--config", "eval_demo", f"output_file={out}"]) == 0
    return json.loads(out.read_text())


def test_demo_results_have_the_promised_shape(demo_results):
    assert set(demo_results) == {"perplexity", "lm_eval", "metrics"}
    assert set(demo_results["perplexity"]) == {str(COUNTING), "all"}
    for report in demo_results["perplexity"].values():
        assert set(report) == {"ppl", "nll", "tokens"}
    assert demo_results["perplexity"]["all"]["tokens"] == 171  # BOS + 171 tokens, first unscored
    assert 1 <= demo_results["perplexity"]["all"]["ppl"] < 1.5  # the model counts well
    assert set(demo_results["metrics"]) == {"threads", "load_seconds", "tokens_per_second", "peak_host_rss_bytes",
                                            "quantization", "quantize_cache", "quantize_cache_file"}
    assert demo_results["metrics"]["tokens_per_second"] > 0
    assert demo_results["lm_eval"]["results"]["counting_mc"]["acc,none"] > 0.9


def test_local_task_accuracy_equals_lm_eval_hf_backend(demo_results):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import LlamaTokenizer

    # The demo ships a bare sentencepiece model: build the HF tokenizer from it offline.
    tokenizer = LlamaTokenizer.from_pretrained(demo_dir(), add_bos_token=True)
    hflm = HFLM(pretrained=str(demo_dir()), tokenizer=tokenizer, device="cpu", batch_size=8)
    out = simple_evaluate(model=hflm, tasks=["counting_mc"], num_fewshot=0, log_samples=False,
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    want = out["results"]["counting_mc"]
    got = demo_results["lm_eval"]["results"]["counting_mc"]
    for metric in ["acc,none", "acc_norm,none"]:
        assert got[metric] == want[metric], metric


def test_local_task_loglikelihoods_equal_lm_eval_hf_backend():
    """Stronger than accuracy: every choice's score, document by document."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from torchtune.models.llama2 import llama2_tokenizer
    from transformers import LlamaTokenizer

    from leangen import load_model
    from leangen.evaluation.lm_eval_adapter import LeangenLM

    cfg = parse_args(["--config", "eval_demo"], EvalConfig)
    model = load_model(cfg.model, demo_dir(), model_type="llama2")
    ours = LeangenLM(model, llama2_tokenizer(str(demo_dir() / "tokenizer.model")), max_length=256)
    hflm = HFLM(pretrained=str(demo_dir()), device="cpu", batch_size=8,
                tokenizer=LlamaTokenizer.from_pretrained(demo_dir(), add_bos_token=True))
    samples = {}
    for name, lm in [("ours", ours), ("hf", hflm)]:
        out = simple_evaluate(model=lm, tasks=["counting_mc"], limit=24, log_samples=True,
                              task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
        samples[name] = {s["doc_id"]: s["resps"] for s in out["samples"]["counting_mc"]}
    assert samples["ours"].keys() == samples["hf"].keys()
    for doc_id, resps in samples["ours"].items():
        got = [r[0][0] for r in resps]
        want = [r[0][0] for r in samples["hf"][doc_id]]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), doc_id


def test_demo_records_peak_host_rss(demo_results):
    # at least the torch, torchtune and lm-eval imports; far below this machine's RAM
    assert 50 * 2**20 < demo_results["metrics"]["peak_host_rss_bytes"] < 16 * 2**30


@pytest.mark.parametrize("chat", [False, True])
def test_recipe_equals_simple_evaluate_with_few_shot(tmp_path, capsys, chat):
    """The recipe calls lm-eval's `evaluate` itself, with simple_evaluate's seeds and
    few-shot overrides: same model, same numbers, also with few-shot examples drawn."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from torchtune.models.llama2 import llama2_tokenizer

    from leangen import load_model
    from leangen.evaluation.lm_eval_adapter import LeangenLM

    out = tmp_path / "r.json"
    code, _, err = run(capsys, "~perplexity", "lm_eval.num_fewshot=2", "lm_eval.limit=16",
                       f"lm_eval.apply_chat_template={str(chat).lower()}", f"output_file={out}")
    assert code == 0, err
    got = json.loads(out.read_text())["lm_eval"]
    cfg = parse_args(["--config", "eval_demo"], EvalConfig)
    model = load_model(cfg.model, demo_dir(), model_type="llama2")
    lm = LeangenLM(model, llama2_tokenizer(str(demo_dir() / "tokenizer.model")), max_length=256)
    want = simple_evaluate(model=lm, tasks=["counting_mc"], num_fewshot=2, limit=16,
                           apply_chat_template=chat, log_samples=False,
                           task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    assert got["n-shot"] == want["n-shot"] == {"counting_mc": 2}
    assert got["results"] == json.loads(json.dumps(want["results"], default=str))


@pytest.mark.slow
def test_outside_git_no_stray_git_output(tmp_path):
    """lm-eval's simple_evaluate ran `git describe` with stderr inherited, which printed
    "fatal: not a git repository" outside a git folder; the recipe no longer calls it."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}  # no repo above
    proc = subprocess.run(
        [sys.executable, "-m", "leangen.eval", "--config", "eval_demo", "~perplexity",
         "lm_eval.limit=8", "output_file=r.json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fatal:" not in proc.stderr
    assert "peak host RSS" in proc.stderr.strip().splitlines()[-1]  # the summary line
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["peak_host_rss_bytes"] > 0


def test_chat_template_runs(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = run(capsys, "~perplexity", "lm_eval.apply_chat_template=true", "lm_eval.limit=4",
                       f"output_file={out}")
    assert code == 0, err
    assert "acc,none" in json.loads(out.read_text())["lm_eval"]["results"]["counting_mc"]


@pytest.mark.slow
def test_tune_run_finds_the_recipe(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [TUNE, "run", "leangen/eval", "--config", "eval_demo", "~lm_eval", f"output_file={out}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "counting.txt" in proc.stdout and json.loads(out.read_text())["lm_eval"] is None


def test_results_are_written_whole_and_their_path_is_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "~lm_eval", "output_file=results.json")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines[-2] == f"results: {tmp_path.resolve() / 'results.json'}"
    assert "peak host RSS" in lines[-1]  # the summary stays the last line
    assert json.loads((tmp_path / "results.json").read_text())["perplexity"]["all"]["tokens"] == 171
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_an_interrupted_results_write_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    from leangen.recipe import outputs

    def interrupted(part, path):
        raise KeyboardInterrupt  # Ctrl-C as the file is renamed into place

    out = tmp_path / "results.json"
    out.write_text("old\n")
    monkeypatch.setattr(outputs.os, "replace", interrupted)
    code, _, err = run(capsys, "~lm_eval", f"output_file={out}")
    assert code == 130, err
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert "results:" not in err


# -- one-line errors ------------------------------------------------------------------

def assert_one_line_error(code, err, *fragments):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("", "is empty"),
    (" ", "1 token(s)"),  # BOS only: nothing to score
])
def test_bad_text_files_give_one_line_errors(tmp_path, capsys, content, fragment):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content)
    code, _, err = run(capsys, f"perplexity.files=[{path}]", "~lm_eval", f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, str(path), fragment)


def test_a_folder_of_text_gives_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, f"perplexity.files=[{tmp_path}]", "~lm_eval", f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, str(tmp_path), "is a folder", "give the text files")


def test_one_text_file_without_brackets_is_a_list_of_one(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = run(capsys, f"perplexity.files={COUNTING}", "~lm_eval", f"output_file={out}")
    assert code == 0, err
    assert set(json.loads(out.read_text())["perplexity"]) == {str(COUNTING), "all"}


@pytest.mark.parametrize("value, fragment", [  # a command-line value is a path as typed
    ("[1]", "'1' does not exist"),
    (f"[{COUNTING},[a]]", f"'[{COUNTING},[a]]' does not exist"),
    ("3", "'3' does not exist"),
])
def test_text_files_that_are_not_paths_give_one_line_errors(tmp_path, capsys, value, fragment):
    code, _, err = run(capsys, f"perplexity.files={value}", "~lm_eval", f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, "perplexity.files", fragment)


@pytest.mark.slow
def test_unknown_task_gives_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "lm_eval.tasks=[no_such_task]", f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, "unknown task 'no_such_task'", str(TASKS))


def test_max_seq_len_beyond_the_model_gives_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "max_seq_len=512", "~lm_eval", f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, "max_seq_len=512", "256")


@pytest.mark.slow
def test_builtin_task_offline_fails_in_one_line_before_the_model_loads(tmp_path):
    """No network needed: offline mode and an empty cache make `datasets` fail at once.
    The checkpoint does not exist, so reaching the model load would give another error."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HF_HOME")}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "leangen.eval", "--config", "eval_demo", "~perplexity",
         "lm_eval.tasks=[arc_easy]", f"checkpoint.path={tmp_path}/missing", "output_file=r.json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "task 'arc_easy'", "'allenai/ai2_arc'",
                          "offline mode is on", "HF_DATASETS_OFFLINE=1", "lm_eval.include_path")
    assert "missing" not in proc.stderr and not (tmp_path / "r.json").exists()


def test_local_task_with_missing_data_gives_a_one_line_error(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text(
        "task: broken_task\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path}/missing.jsonl\n"
        "output_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    code, _, err = run(capsys, "~perplexity", f"lm_eval.include_path={tmp_path}",
                       "lm_eval.tasks=[broken_task]", f"checkpoint.path={tmp_path}/no_model",
                       f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, "task 'broken_task'", "could not load its dataset",
                          f"{tmp_path}/missing.jsonl")


def test_install_hint_pins_the_eval_extra():
    """The error's `pip install lm-eval==...` is pyproject.toml's `eval` extra."""
    import tomllib

    from leangen.evaluation.lm_eval_tasks import LM_EVAL_REQUIREMENT

    pyproject = resolve_config_path("eval_demo").parents[2] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("installed without the repository's pyproject.toml")
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert extras["eval"] == [LM_EVAL_REQUIREMENT]


def test_without_lm_eval_the_error_says_how_to_install(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: import fails
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run(capsys, f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, "pip install lm-eval==0.4.13", "pip install -e '.[eval]'")


def test_a_negative_num_fewshot_gives_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "lm_eval.num_fewshot=-1", "~perplexity", f"output_file={tmp_path}/r.json")
    assert_one_line_error(code, err, "lm_eval.num_fewshot=-1: give 0 or more")
    assert not (tmp_path / "r.json").exists()
