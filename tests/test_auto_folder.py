"""One command for any folder: ``--config auto`` / ``eval_auto`` on real HF folders
(config.json, safetensors, tokenizer.json with a chat template, generation_config.json),
against transformers on the same folder: chat greedy ids and sliding-window perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import HUB_TOKENIZERS, HUB_VOCAB, made_up_texts

from leangen.eval import EvalConfig
from leangen.eval import main as eval_main
from leangen.generate import GenerateConfig
from leangen.generate import main as generate_main
from leangen.recipe.cli import packaged_config_names, parse_args, resolve_config_path

MESSAGES = [{"role": "system", "content": "kalo mine"}, {"role": "user", "content": "ruti sa vo ze"}]


def _transformers(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) <= HUB_VOCAB
    # eager attention: the reference; sdpa has no attention soft-capping (Gemma 2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), tokenizer


def _ids(encoded) -> list[int]:
    """apply_chat_template's ids, whether transformers returns a list or a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("variant", list(HUB_TOKENIZERS))
def test_chat_greedy_ids_equal_transformers_generate(hub_folder, variant, tmp_path, capsys):
    folder = hub_folder(variant)
    prompts, out = tmp_path / "chat.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    code = generate_main(["--config", "auto", f"checkpoint.path={folder}", f"prompts_file={prompts}",
                          "temperature=0", "max_new_tokens=12", f"output_file={out}"])
    assert code == 0, capsys.readouterr().err
    [record] = [json.loads(line) for line in out.read_text().splitlines()]

    hf_model, hf_tokenizer = _transformers(folder)
    prompt = _ids(hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: generate would mask BOS, whose id is the config's pad id
        generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=12)
    assert record["prompt_tokens"] == prompt
    assert record["tokens"] == generated[0, len(prompt):].tolist()


@torch.no_grad()
def transformers_perplexity(folder, text: str, max_length: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide on ``tokenizer(text)``: (ppl, scored tokens)."""
    hf_model, hf_tokenizer = _transformers(folder)
    ids = torch.tensor([hf_tokenizer(text)["input_ids"]])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        targets = ids[:, begin:end].clone()
        targets[:, :-(end - prev_end)] = -100
        loss = hf_model(ids[:, begin:end], labels=targets).loss
        scored = int((targets[:, 1:] != -100).sum())
        nll_sum, n_tokens, prev_end = nll_sum + float(loss) * scored, n_tokens + scored, end
        if end == ids.size(1):
            break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens, dtype=torch.float64))), n_tokens


@pytest.mark.parametrize("variant", list(HUB_TOKENIZERS))  # BOS added (Llama-style), and not (Qwen)
def test_perplexity_with_add_bos_auto_equals_transformers(hub_folder, variant, tmp_path, capsys):
    folder = hub_folder(variant)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(made_up_texts(7)[:6]))
    out = tmp_path / "results.json"
    code = eval_main(["--config", "eval_auto", f"checkpoint.path={folder}", f"perplexity.files={text}",
                      "max_seq_len=48", "perplexity.stride=16", f"output_file={out}"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["perplexity"][str(text)]
    want_ppl, want_tokens = transformers_perplexity(folder, text.read_text(), 48, 16)
    assert result["tokens"] == want_tokens
    assert result["ppl"] == pytest.approx(want_ppl, rel=1e-4)


def test_packaged_auto_configs_need_only_the_folder():
    assert {"auto", "eval_auto"} <= set(packaged_config_names())
    for name, schema, recipe in [("auto", GenerateConfig, "generate"), ("eval_auto", EvalConfig, "eval")]:
        cfg = parse_args(["--config", name, "checkpoint.path=/models/X"], schema)
        assert cfg.model == "auto" and cfg.tokenizer == "auto" and cfg.add_bos == "auto"
        assert f"tune run leangen/{recipe} --config {name} checkpoint.path=" in resolve_config_path(name).read_text()


def test_a_prompt_past_the_sliding_window_is_refused(hub_folder, capsys):
    folder = hub_folder("mistral")  # sliding_window 4096, max_position_embeddings larger
    code = generate_main(["--config", "auto", f"checkpoint.path={folder}", "prompt=kalo",
                          "max_new_tokens=5000"])
    err = capsys.readouterr().err
    assert code == 1 and "more than the model's sliding window of 4096" in err and err.count("\n") == 1
