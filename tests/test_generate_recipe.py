"""The generate recipe end to end on the shipped demo model and tiny checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import GOLDEN, GOLDEN_IDS

from leangen.demo import demo_dir
from leangen.generate import main


def run(capsys, *overrides):
    code = main(["--config", "demo", *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_golden_output_streams_to_stdout(capsys, tmp_path):
    out_file, metrics_file = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    code, out, err = run(capsys, f"output_file={out_file}", f"metrics_file={metrics_file}")
    assert code == 0
    assert out.strip() == GOLDEN
    [record] = records(out_file)
    assert record["tokens"] == GOLDEN_IDS
    assert record["prompt_tokens"] == [1, 46, 47, 44]
    assert "one two three " + record["text"].lstrip() == GOLDEN
    metrics = json.loads(metrics_file.read_text())
    assert metrics["generated_tokens"] == 20 and metrics["peak_device_bytes"] is None
    for key in ("load_seconds", "first_token_seconds", "tokens_per_second", "model_bytes",
                "bandwidth_gb_per_s", "peak_host_rss_bytes"):
        assert metrics[key] > 0, key
    assert "load" in err and "tok/s" in err


def test_greedy_ids_equal_transformers_on_the_demo_files(capsys, tmp_path):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(demo_dir()).eval()
    prompt = [1, 34, 46, 34, 47, 34, 44]  # "thirty one thirty two thirty three"
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=30)[0, 7:].tolist()
    out_file = tmp_path / "out.jsonl"
    run(capsys, "prompt=thirty one thirty two thirty three", "max_new_tokens=30", f"output_file={out_file}")
    [record] = records(out_file)
    assert record["prompt_tokens"] == prompt
    assert record["tokens"] == expected


def test_top_k_one_equals_greedy_and_a_seed_reproduces(capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    run(capsys, "temperature=1.5", "top_k=1", f"output_file={out}")
    assert records(out)[0]["tokens"] == GOLDEN_IDS
    texts = []
    for _ in range(2):
        run(capsys, "temperature=2.0", "seed=5", f"output_file={out}")
        texts.append(records(out)[0]["text"])
    assert texts[0] == texts[1]


def test_batch_of_different_lengths_equals_one_by_one(capsys, tmp_path):
    prompts = ["one two three", "forty one forty two forty three forty four", "seventy"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    assert run(capsys, f"prompts_file={prompts_file}", "max_new_tokens=12", f"output_file={out}")[0] == 0
    batched = [r["tokens"] for r in records(out)]
    single = []
    for prompt in prompts:
        run(capsys, f"prompt={prompt}", "max_new_tokens=12", f"output_file={out}")
        single.append(records(out)[0]["tokens"])
    assert batched == single
    assert batched[0] == GOLDEN_IDS[:12]


def test_jsonl_prompts_and_chat_messages(capsys, tmp_path):
    from torchtune.data import Message
    from torchtune.models.llama2 import llama2_tokenizer

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "one two three"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "five six"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert run(capsys, f"prompts_file={prompts_file}", "max_new_tokens=4", f"output_file={out}")[0] == 0
    first, chat = records(out)
    assert first["tokens"] == GOLDEN_IDS[:4]
    tok = llama2_tokenizer(str(demo_dir() / "tokenizer.model"), prompt_template=None)
    messages = [Message(role="user", content="five six"), Message(role="assistant", content="")]
    assert chat["prompt_tokens"] == tok({"messages": messages}, inference=True)["tokens"]


def test_torchtune_checkpointer_block_gives_the_same_tokens(capsys, tmp_path, digest):
    before = digest(demo_dir())
    config = tmp_path / "tt.yaml"
    config.write_text(_checkpointer_config(tmp_path))
    out = tmp_path / "out.jsonl"
    code = main(["--config", str(config), f"output_file={out}"])
    capsys.readouterr()
    assert code == 0
    assert records(out)[0]["tokens"] == GOLDEN_IDS
    assert not (tmp_path / "tt_output").exists() or not any((tmp_path / "tt_output").iterdir())
    assert digest(demo_dir()) == before


def _checkpointer_config(tmp_path):
    from leangen.recipe.cli import resolve_config_path

    text = resolve_config_path("demo").read_text()
    start, end = text.index("checkpoint:\n"), text.index("tokenizer:\n")
    block = (
        f"output_dir: {tmp_path / 'tt_output'}\n"
        "checkpointer:\n"
        "  _component_: torchtune.training.FullModelHFCheckpointer\n"
        f"  checkpoint_dir: {demo_dir()}\n"
        "  checkpoint_files: [model.safetensors]\n"
        "  output_dir: ${output_dir}\n"
        "  model_type: LLAMA2\n\n"
    )
    return text[:start] + block + text[end:]


def test_checkpointer_with_filename_format(capsys, tmp_path):
    from transformers import LlamaForCausalLM

    shards = tmp_path / "demo-sharded"
    LlamaForCausalLM.from_pretrained(demo_dir()).save_pretrained(shards, max_shard_size="150KB")
    names = sorted(p.name for p in shards.glob("model-*.safetensors"))
    total = names[0].split("-of-")[1].split(".")[0]
    assert len(names) > 1
    config = tmp_path / "fmt.yaml"
    config.write_text(_checkpointer_config(tmp_path).replace(str(demo_dir()), str(shards)).replace(
        "[model.safetensors]",
        "{filename_format: 'model-{}-of-{}.safetensors', max_filename: '" + total + "'}"))
    out = tmp_path / "out.jsonl"
    assert main(["--config", str(config), "max_new_tokens=6", f"output_file={out}"]) == 0
    capsys.readouterr()
    assert records(out)[0]["tokens"] == GOLDEN_IDS[:6]


@pytest.mark.parametrize("overrides, message", [
    (["prompt=" + "one " * 300], "max_seq_len of 256"),
    (["tokenizer.path=/no/such/tokenizer.model"], "/no/such/tokenizer.model"),
    (["checkpoint.path=/no/such/dir"], "/no/such/dir"),
    (["device=cuda"], "sees no CUDA"),
    (["max_new_tokens=many"], "max_new_tokens=many: max_new_tokens takes an integer"),
    (["not_a_key=1"], "'not_a_key'"),
    (["top_p=2"], "top_p"),
])
def test_bad_input_exits_1_with_one_line(capsys, overrides, message):
    code, out, err = run(capsys, *overrides)
    assert code == 1
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_variable_shows_the_traceback(monkeypatch):
    from leangen.errors import LeangenError

    monkeypatch.setenv("LEANGEN_DEBUG", "1")
    with pytest.raises(LeangenError):
        main(["--config", "demo", "checkpoint.path=/no/such/dir"])


def _env():
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_tune_run_from_another_directory(tmp_path):
    result = subprocess.run(["tune", "run", "leangen/generate", "--config", "demo", "max_new_tokens=5"],
                            cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "one two three four five six seven eight"


@pytest.mark.slow
def test_python_dash_m_and_bad_config_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "leangen.generate", "--config", "demo",
                             "checkpoint.path=/missing"], cwd=tmp_path, capture_output=True,
                            text=True, env=_env(), timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "error: /missing: checkpoint path does not exist. Check checkpoint.path."
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_compile_gives_the_same_tokens_on_cpu(capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(capsys, "compile=true", "max_new_tokens=6", f"output_file={out}")[0] == 0
    assert records(out)[0]["tokens"] == GOLDEN_IDS[:6]


def _converted_demo(tmp_path, layout):
    """The demo's weights re-saved as torchtune's own (.pt) or Meta's (consolidated.00.pth),
    converted from its HF safetensors by torchtune's convert_weights, as torchtune does."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune, tune_to_meta

    from leangen.recipe.cli import resolve_config_path

    model = OmegaConf.load(resolve_config_path("demo")).model
    state = hf_to_tune(load_file(demo_dir() / "model.safetensors"), num_heads=model.num_heads,
                       num_kv_heads=model.num_kv_heads, dim=model.embed_dim)
    state = {k: v.clone() for k, v in state.items()}
    folder = tmp_path / layout
    folder.mkdir()
    name = {"torchtune": "model.pt", "meta": "consolidated.00.pth"}[layout]
    torch.save(tune_to_meta(state) if layout == "meta" else state, folder / name)
    return folder, name


@pytest.mark.parametrize("layout, component", [
    ("torchtune", "FullModelTorchTuneCheckpointer"),
    ("meta", "FullModelMetaCheckpointer"),
])
def test_meta_and_torchtune_checkpointers_give_the_golden_tokens(capsys, tmp_path, layout, component):
    folder, name = _converted_demo(tmp_path, layout)
    config = tmp_path / f"{layout}.yaml"
    config.write_text(_checkpointer_config(tmp_path).replace(str(demo_dir()), str(folder))
                      .replace("FullModelHFCheckpointer", component)
                      .replace("[model.safetensors]", f"[{name}]"))
    out = tmp_path / "out.jsonl"
    assert main(["--config", str(config), f"output_file={out}"]) == 0
    capsys.readouterr()
    assert records(out)[0]["tokens"] == GOLDEN_IDS


@pytest.mark.slow
def test_console_script(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "leangen-generate")
    result = subprocess.run([script, "--config", "demo", "max_new_tokens=3"], cwd=tmp_path,
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "one two three four five six"


@pytest.mark.slow
def test_peak_rss_is_this_process_own_not_its_parents(tmp_path):
    """ru_maxrss survives exec on Linux; the metric must not report a big (2 GiB) parent's peak."""
    # The child imports leangen (torch, torchtune): about 0.5 GB of its own.
    code = ("import sys; big = bytearray(2 << 30); big[::4096] = b'x' * len(big[::4096]);"
            "import subprocess; sys.exit(subprocess.run([sys.executable, '-c', "
            "'from leangen.recipe.metrics import peak_host_rss_bytes; print(peak_host_rss_bytes())']).returncode)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) < 1280 << 20


@pytest.mark.parametrize("overrides, message", [
    (["output_file=/no/such/folder/out.jsonl"], "output_file: the folder of"),
    (["metrics_file=/tmp"], "metrics_file: '/tmp' is a folder"),
    (["prompt={system: be brief}"], "prompt.user is empty"),  # ([1,2] is a raw prompt, as typed)
    (["checkpoint=null", "checkpointer={_component_: torchtune.training.FullModelHFCheckpointer}"],
     "checkpointer.checkpoint_dir is not set"),
])
def test_more_bad_input_fails_before_loading_with_one_line(capsys, overrides, message):
    code, out, err = run(capsys, *overrides)
    assert code == 1 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_number_prompt_and_home_relative_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok.model").write_bytes((demo_dir() / "tokenizer.model").read_bytes())
    code, out, _ = run(capsys, "prompt=7", "max_new_tokens=3", "tokenizer.path=~/tok.model",
                       "output_file=~/out.jsonl")
    assert code == 0 and out.startswith("7")
    assert records(tmp_path / "out.jsonl")[0]["prompt"] == "7"


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompts"),
    ('{"messages": "hi"}\n', "non-empty list"),
    ('{"messages": [{"content": "hi"}]}\n', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "prompt messages"),
])
def test_bad_prompts_files(capsys, tmp_path, content, message):
    suffix = ".txt" if not content else ".jsonl"
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(content)
    code, _, err = run(capsys, f"prompts_file={prompts}")
    assert code == 1 and message in err and err.count("\n") == 1


def test_bad_yaml_is_one_line(capsys, tmp_path):
    for text in ("model: [unclosed\n", "- a list\n- at the top\n"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main(["--config", str(bad)]) == 1
        err = capsys.readouterr().err
        assert str(bad) in err and err.count("\n") == 1
