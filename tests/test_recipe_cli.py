"""What a new user meets around the recipes: --help, listing and copying configs, one-line
errors that name the key, read-only outputs, Ctrl-C, threads, and a quiet stderr."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_models import GOLDEN_IDS

from leangen.eval import EvalConfig
from leangen.eval import main as eval_main
from leangen.generate import GenerateConfig, main
from leangen.recipe.cli import packaged_config_names, resolve_config_path

GENERATE = [sys.executable, "-m", "leangen.generate"]


def run(capsys, *argv, recipe=main):
    code = recipe(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _quiet_env(**extra):
    """The user's environment: no PYTHONWARNINGS filter that would hide what they see."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return {**env, **extra}


# -- help and discovery -----------------------------------------------------------

@pytest.mark.parametrize("recipe, schema", [(main, GenerateConfig), (eval_main, EvalConfig)])
def test_help_lists_every_key_with_its_type_default_and_the_packaged_configs(capsys, recipe, schema):
    import dataclasses

    with pytest.raises(SystemExit) as exit_:
        recipe(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()]
    assert {f.name for f in dataclasses.fields(schema)} <= set(keys)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
            if line.startswith("  ") and len(line.split()) > 2}
    assert rows["dtype"] == ["str", '"auto"'] and rows["threads"] == ["int|null", "null"]
    assert rows["enable_kv_cache" if schema is GenerateConfig else "lm_eval.apply_chat_template"][0] == "bool"
    own = {GenerateConfig: ("max_new_tokens", ["int", "300"]), EvalConfig: ("max_seq_len", ["int", "2048"])}[schema]
    assert rows[own[0]] == own[1]
    if schema is GenerateConfig:
        assert rows["prompt"] == ["str|mapping|null", "null"] and rows["temperature"][0] == "float"
    else:
        assert rows["lm_eval.tasks"] == ["list[str]", "[]"]
    assert ("demo" if schema is GenerateConfig else "eval_demo") in keys


def test_list_configs_shows_this_recipes_configs_only(capsys):
    with pytest.raises(SystemExit):
        main(["--list-configs"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [n for n in packaged_config_names() if not n.startswith("eval_")]


def test_copy_config_copies_and_never_overwrites(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--copy-config", "mistral7b", str(tmp_path)])
    copied = tmp_path / "mistral7b.yaml"
    assert copied.read_text() == resolve_config_path("mistral7b").read_text()
    capsys.readouterr()
    code, _, err = run(capsys, "--copy-config", "demo", str(copied))
    assert code == 1 and err == f"error: --copy-config: '{copied}' already exists; choose another destination.\n"
    assert copied.read_text() == resolve_config_path("mistral7b").read_text()


def test_copy_config_into_a_missing_folder_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "--copy-config", "demo", f"{tmp_path}/new/")
    assert code == 1 and "the folder" in err and "does not exist" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_tune_run_passes_help_through(tmp_path):
    result = subprocess.run(["tune", "run", "leangen/generate", "--config", "demo", "--help"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "max_new_tokens" in result.stdout and "mistral7b" in result.stdout


# -- one-line errors --------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["max_new_token=3"], "unknown key 'max_new_token'. Did you mean 'max_new_tokens'? "
                          "(--help lists every key.)"),
    (["max_new_tokens=abc"], "error: max_new_tokens=abc: max_new_tokens takes an integer, "
                             "e.g. max_new_tokens=300."),
    (["device=mps"], "device 'mps' was asked for, but this torch"),
    (["device=xla"], "leangen runs on cpu, cuda, mps"),
    (["threads=0"], "threads=0: give at least 1"),
    (["prompt={usr: hi}"], "prompt.usr: a chat prompt has only 'system' and 'user'"),
])
def test_config_mistakes_name_the_key(capsys, argv, message):
    code, _, err = run(capsys, "--config", "demo", *argv)
    assert code == 1 and message in err
    assert err.count("\n") == 1 and "?." not in err and "invalid key" not in err


def test_one_value_for_a_list_key_is_a_list_of_one(capsys, tmp_path):
    code, out, _ = run(capsys, "--config", "eval_demo", "~perplexity", "lm_eval.tasks=counting_mc",
                       f"output_file={tmp_path / 'r.json'}", recipe=eval_main)
    assert code == 0 and "counting_mc" in out


def test_a_mapping_over_a_list_is_one_line_naming_the_override(capsys):
    code, _, err = run(capsys, "--config", "eval_demo", "checkpoint.path=[a, b]", "checkpoint.path={x: y}",
                       recipe=eval_main)
    assert code == 1
    assert err == "error: checkpoint.path={x: y}: gives a mapping where the config has a list.\n"


@pytest.mark.slow
def test_help_into_a_closed_pipe_is_quiet():
    result = subprocess.run(f"{sys.executable} -m leangen.eval --help | head -1", shell=True,
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("usage: leangen-eval") and "Traceback" not in result.stderr


def test_nested_typo_suggests_the_nested_key(capsys):
    code, _, err = run(capsys, "--config", "eval_demo", "perplexity.strid=4", recipe=eval_main)
    assert code == 1 and "unknown key 'perplexity.strid'. Did you mean 'perplexity.stride'?" in err


def test_packaged_config_without_its_download_blames_checkpoint_path(capsys):
    code, _, err = run(capsys, "--config", "mistral7b")
    assert code == 1
    assert err.startswith("error: checkpoint.path: '/models/Mistral-7B-v0.1' does not exist")


@pytest.mark.parametrize("key", ["output_file", "metrics_file"])
def test_read_only_output_fails_before_the_model_loads(capsys, read_only_dir, key):
    # a missing checkpoint would fail at load time: the output error must come first
    code, out, err = run(capsys, "--config", "demo", f"{key}={read_only_dir / 'out.jsonl'}",
                         "checkpoint.path=/no/such/dir")
    assert code == 1 and out == ""
    assert err.startswith(f"error: {key}: cannot write to the folder of") and err.count("\n") == 1
    assert not any(read_only_dir.iterdir())


# -- Ctrl-C -----------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_ctrl_c_or_kill_exits_with_one_line_and_keeps_the_finished_completions(tmp_path, signum, code):
    prompts = [f"{word} one two" for word in ("three", "seven", "eleven", "twenty")] * 100
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [*GENERATE, "--config", "demo", "prompts_file=prompts.txt", "batch_size=1",
         "max_new_tokens=100", f"output_file={out}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_quiet_env(),
        # a shell's background job (`cmd &`) ignores SIGINT, and children inherit that: give
        # the recipe the default disposition a terminal's Ctrl-C meets
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        printed, deadline = 0, time.monotonic() + 240
        while printed < 3 and time.monotonic() < deadline:  # completions end with a blank line
            line = proc.stdout.readline()
            if not line:
                break
            printed += line == "\n"
        assert printed == 3, proc.stderr.read()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == code
    assert err == (f"interrupted: {len(saved)} of {len(prompts)} completions were finished; "
                   f"they are in {out}.\n")
    assert 3 <= len(saved) < len(prompts)
    assert [r["prompt"] for r in saved] == prompts[:len(saved)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.txt"]  # no .part left


ENTRY_POINTS = {
    "python -m leangen.generate": [*GENERATE, "--config", "demo", "prompts_file=prompts.txt", "batch_size=1"],
    "leangen-generate": [sys.executable, "-c", "import sys; from leangen.recipe.console import generate; "
                         "sys.exit(generate())", "--config", "demo", "prompts_file=prompts.txt", "batch_size=1"],
    "python -m leangen.eval": [sys.executable, "-m", "leangen.eval", "--config", "eval_demo",
                               "perplexity.files=text.txt", "batch_size=1", "output_file=null"],
}


def _loaded(pid: int, library: str) -> bool:
    """Whether the process has ``library`` mapped (or has ended)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return library in maps.read()
    except FileNotFoundError:
        return True


# Libraries mapped at successive moments of the imports: torch's own, numpy's FFT and
# random modules (which torch imports later; a KeyboardInterrupt inside numpy's import
# once surfaced as numpy's "cannot load module more than once" traceback).
LANDMARKS = ["libtorch_cpu", "_pocketfft_umath", "mtrand"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc to see torch being imported")
@pytest.mark.parametrize("entry, landmark", [(e, LANDMARKS[0]) for e in ENTRY_POINTS]
                         + [("python -m leangen.generate", m) for m in LANDMARKS[1:]])
def test_ctrl_c_while_torch_imports_is_one_line(tmp_path, entry, landmark):
    """The signal goes once ``landmark`` is mapped: Python's handler is in place and the
    imports are under way. Whatever moment it lands from then on (imports, load, decode),
    the answer is one 'interrupted' line and exit 130."""
    (tmp_path / "prompts.txt").write_text("one two three\n" * 400)  # long enough to be running
    (tmp_path / "text.txt").write_text("one two three four five six seven eight nine ten\n" * 4000)
    proc = subprocess.Popen(ENTRY_POINTS[entry], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_quiet_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not _loaded(proc.pid, landmark):
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("interrupted") and "Traceback" not in err


# -- threads and stderr -----------------------------------------------------------

def test_threads_key_sets_torch_threads(capsys, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        code, _, _ = run(capsys, "--config", "demo", "threads=2", "max_new_tokens=2",
                         f"metrics_file={tmp_path / 'm.json'}")
    finally:
        torch.set_num_threads(before)
    assert code == 0 and json.loads((tmp_path / "m.json").read_text())["threads"] == 2


@pytest.mark.slow
def test_omp_num_threads_is_honoured_and_a_bf16_run_prints_only_the_summary(tmp_path):
    """bf16 on CPU makes torchtune's RMSNorm warn; torchao warns at import: neither may
    reach a recipe's stderr, which holds the one summary line."""
    result = subprocess.run([*GENERATE, "--config", "demo", "dtype=bf16", "max_new_tokens=8",
                             "metrics_file=m.json"], cwd=tmp_path, capture_output=True, text=True,
                            env=_quiet_env(OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("load ") and " GB" in line and "GiB" not in line
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["threads"] == 1 and metrics["generated_tokens"] == 8


class _Terminal:
    """A stderr that says it is a terminal, keeping what is written."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


def test_prompts_file_shows_progress_only_on_a_terminal(capsys, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\nfive six\nten eleven\n")
    code, out, err = run(capsys, "--config", "demo", f"prompts_file={prompts}", "batch_size=1",
                         "max_new_tokens=3")
    assert code == 0 and err.count("\n") == 1 and "prompts" not in err  # not a terminal: summary only
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, out, _ = run(capsys, "--config", "demo", f"prompts_file={prompts}", "batch_size=1",
                       "max_new_tokens=3")
    shown = terminal.buffer.getvalue()
    assert code == 0 and "prompts: " in shown and "0/3 [" in shown  # done/total
    assert out.split("\n\n")[:3] == ["one two three four five", "five six seven eight nine",
                                     "ten eleven twelve thirteen fourteen"]


# -- quantization through the recipes ---------------------------------------------

def test_quantize_int8_keeps_the_demo_golden_tokens_and_counts_its_bytes(capsys, tmp_path):
    out, metrics = tmp_path / "out.jsonl", tmp_path / "m.json"
    code, _, err = run(capsys, "--config", "demo", "quantize=int8", f"output_file={out}",
                       f"metrics_file={metrics}")
    assert code == 0, err
    assert json.loads(out.read_text())["tokens"] == GOLDEN_IDS
    fp32 = sum(p.numel() * 4 for p in _demo_parameters())
    assert json.loads(metrics.read_text())["model_bytes"] < 0.5 * fp32  # int8 weights + scales


def _demo_parameters():
    from omegaconf import OmegaConf

    import leangen
    from leangen.demo import demo_dir

    return leangen.load_model(OmegaConf.load(resolve_config_path("demo")).model, demo_dir()).parameters()


def test_a_torchtune_quantizer_block_runs_as_int4(capsys, tmp_path):
    metrics = tmp_path / "m.json"
    code, _, err = run(capsys, "--config", "demo", "quantizer={_component_: "
                       "torchtune.training.quantization.Int4WeightOnlyQuantizer, groupsize: 32}",
                       "max_new_tokens=4", f"metrics_file={metrics}")
    assert code == 0, err
    figures = json.loads(metrics.read_text())
    assert figures["generated_tokens"] == 4 and figures["quantized"] == {"quantized": 15, "skipped": 0}


@pytest.mark.parametrize("argv, message", [
    (["quantize=int9"], "quantize: 'int9' is unknown"),
    (["quantizer={_component_: x.Y}"], "quantizer: 'x.Y' is not supported"),
    (["quantize=int8", "quantizer={_component_: torchtune.training.quantization.Int4WeightOnlyQuantizer}"],
     "either 'quantize' or a torchtune 'quantizer' block"),
])
def test_bad_quantize_settings_fail_before_the_load(capsys, argv, message):
    code, _, err = run(capsys, "--config", "demo", "checkpoint.path=/no/such/dir", *argv)
    assert code == 1 and message in err and err.count("\n") == 1


# -- tokenizer.path with tokenizer: auto --------------------------------------------

@pytest.fixture(scope="module")
def folder_without_tokenizer(tmp_path_factory):
    """``folder_without_tokenizer(vocab)``: a tiny llama folder as the Hub has it, minus
    its tokenizer files, with the vocabulary of the tokenizer it will be given."""
    from tiny_models import make_hf_model

    cache = {}

    def get(vocab: int = 512):  # 512: room for the BPE of make_llama_tokenizer_folder; the demo's has 96
        if vocab not in cache:
            cache[vocab] = tmp_path_factory.mktemp(f"no-tokenizer-{vocab}")
            make_hf_model("llama", vocab_size=vocab).save_pretrained(cache[vocab])
        return cache[vocab]

    return get


def _bpe_folder(root):
    from tiny_models import make_llama_tokenizer_folder

    return make_llama_tokenizer_folder(root)


def _spm_folder(root):
    from leangen.demo import demo_dir

    root.mkdir()
    (root / "tokenizer.model").write_bytes((demo_dir() / "tokenizer.model").read_bytes())
    return root


@pytest.mark.parametrize("make, pick, vocab", [
    (_bpe_folder, lambda folder: folder / "tokenizer.json", 512),
    (_bpe_folder, lambda folder: folder, 512),
    (_spm_folder, lambda folder: folder / "tokenizer.model", 96),
])
def test_tokenizer_path_with_tokenizer_auto_reads_that_file_or_folder(capsys, tmp_path, folder_without_tokenizer,
                                                                       make, pick, vocab):
    from leangen.decode.text import tokenize
    from leangen.hf.tokenizer import tokenizer_from_folder

    folder = make(tmp_path / "tok")
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--config", "auto", f"checkpoint.path={folder_without_tokenizer(vocab)}",
                       f"tokenizer.path={pick(folder)}", "prompt=ruti sa vo", "max_new_tokens=2",
                       f"output_file={out}")
    assert code == 0, err
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt_tokens"] == tokenize("ruti sa vo", tokenizer_from_folder(folder), add_bos="auto").tokens


@pytest.mark.parametrize("argv, message", [
    (["tokenizer.path=/no/such/tokenizer.json"], "error: tokenizer.path: '/no/such/tokenizer.json' does not exist."),
    (["tokenizer.path=CONFIG"], "is not a file tokenizer: auto reads"),
    (["tokenizer.max_len=3"], "error: tokenizer.max_len: without a _component_, the tokenizer block takes path"),
])
def test_tokenizer_path_mistakes_are_one_line(capsys, folder_without_tokenizer, argv, message):
    folder = folder_without_tokenizer()
    argv = [a.replace("CONFIG", str(folder / "config.json")) for a in argv]
    code, _, err = run(capsys, "--config", "auto", f"checkpoint.path={folder}", *argv)
    assert code == 1 and message in err and err.count("\n") == 1


# -- the other recipe's config --------------------------------------------------------

@pytest.mark.parametrize("recipe, name, other", [(main, "eval_auto", "eval"), (eval_main, "demo", "generate"),
                                                 (main, "eval_demo", "eval")])
def test_the_other_recipes_packaged_config_says_which_recipe_runs_it(capsys, recipe, name, other):
    code, _, err = run(capsys, "--config", name, recipe=recipe)
    assert code == 1
    assert err == (f"error: {name} is a config for leangen/{other}: run `tune run leangen/{other} "
                   f"--config {name}` (or leangen-{other}).\n")


def test_a_user_config_whose_keys_fit_the_other_recipe_says_so(capsys, tmp_path):
    mine = tmp_path / "mine.yaml"  # no header comment: the keys tell
    lines = resolve_config_path("eval_demo").read_text().splitlines()
    mine.write_text("".join(line + "\n" for line in lines if not line.startswith("#")))
    code, _, err = run(capsys, "--config", str(mine))
    assert code == 1 and err.startswith(f"error: {mine} is a config for leangen/eval: run `tune run leangen/eval")


def test_a_user_config_with_a_stray_key_is_still_this_recipes(capsys, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(resolve_config_path("demo").read_text() + "max_seq_len: 64\n")
    code, _, err = run(capsys, "--config", str(mine))
    assert code == 1 and err.startswith(f"error: {mine}: unknown key 'max_seq_len'. Did you mean 'max_new_tokens'?")


@pytest.mark.parametrize("recipe, config, override", [
    (main, "demo", "max_new_tokens=0"), (main, "demo", "batch_size=0"),
    (eval_main, "eval_demo", "max_seq_len=1"), (eval_main, "eval_demo", "batch_size=0"),
])
def test_a_too_small_count_names_its_key(capsys, recipe, config, override):
    code, _, err = run(capsys, "--config", config, override, recipe=recipe)
    least = 2 if override.startswith("max_seq_len") else 1
    assert code == 1 and err == f"error: {override}: give at least {least}.\n"


def test_strict_config_false_is_one_warning_line_that_says_what_happened(capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "--config", "demo", "checkpoint.strict_config=false", "model.rope_base=500000",
                       "max_new_tokens=2", f"output_file={out}")
    assert code == 0 and out.is_file()
    warning, summary = err.splitlines()
    assert warning == ("warning: the model builder does not match the checkpoint's config.json (rope_theta: "
                       "builder 500000, checkpoint 10000.0); loaded anyway because checkpoint.strict_config is "
                       "false (strict_config=False): its outputs may be wrong. Use model: auto, or fix the "
                       "builder's arguments.")
    assert summary.startswith("load ")


def test_a_tokenizer_smaller_than_the_model_is_one_line_when_the_model_leaves_it(capsys, folder_without_tokenizer):
    """A 512-id model with the demo's 96-id sentencepiece tokenizer: the first generated id
    past 95 cannot be decoded; that is a wrong tokenizer, said in one line."""
    from leangen.demo import demo_dir

    code, _, err = run(capsys, "--config", "auto", f"checkpoint.path={folder_without_tokenizer(512)}",
                       f"tokenizer.path={demo_dir() / 'tokenizer.model'}", "prompt=one two",
                       "max_new_tokens=40", "temperature=0")
    assert code == 1
    assert err.count("\n") == 1 and "which the tokenizer does not have (its vocabulary has 96 ids)" in err


@pytest.mark.parametrize("override, line", [
    ("checkpoint.strict_confg=false",
     "error: unknown key 'checkpoint.strict_confg'. Did you mean 'checkpoint.strict_config'? (--help lists every key.)"),
    ("checkpoint.strict_config=maybe", "error: checkpoint.strict_config=maybe: give true or false."),
])
def test_a_wrong_checkpoint_key_or_value_is_one_line_not_ignored(capsys, override, line):
    code, out, err = run(capsys, "--config", "demo", override, "max_new_tokens=2")
    assert (code, out, err) == (1, "", line + "\n")
