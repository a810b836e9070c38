"""prepack: true: full-precision Linears in oneDNN's blocked layout, same results."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEMO_TOKENS, GOLDEN_IDS, load_demo, mapped_file, run_recipe

import leangen
from leangen.errors import ConfigError
from leangen.load.prepack import PrepackedLinear


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_prepacked_logits_equal_the_plain_model(dtype):
    plain, packed = load_demo(dtype=dtype), load_demo(dtype=dtype, prepack=True)
    assert packed.leangen.prepacked == 15 and plain.leangen.prepacked is None  # 2x7 + output
    assert all(type(m) is not torch.nn.Linear for m in packed.modules())
    with torch.no_grad():
        want, got = plain(DEMO_TOKENS), packed(DEMO_TOKENS)
    # oneDNN's blocked kernel sums in another order than torch's plain linear: fp32 rounding
    # differs in the last bits; bf16 results were bit-identical when measured
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
    assert list(packed.state_dict()) == list(plain.state_dict())  # same names


def test_golden_greedy_output_survives_prepacking():
    from torchtune.models.llama2 import llama2_tokenizer

    from leangen.demo import demo_dir

    model = load_demo(dtype="bf16", prepack=True)
    tokenizer = llama2_tokenizer(str(demo_dir() / "tokenizer.model"), prompt_template=None)
    assert leangen.generate_text(model, tokenizer, "one two three", max_new_tokens=20).tokens == GOLDEN_IDS


def test_tied_output_gets_a_packed_copy_and_the_embedding_stays_the_mmap(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama3_2")  # tied
    model = leangen.load_model(ckpt.builder, ckpt.path, prepack=True, **ckpt.builder_kwargs)
    reference = leangen.load_model(ckpt.builder, ckpt.path, **ckpt.builder_kwargs)
    assert isinstance(model.output, PrepackedLinear)
    mapped = mapped_file(model.tok_embeddings.weight)
    assert mapped is not None and mapped[0] in {str(f.resolve()) for f in ckpt.path.glob("*.safetensors")}
    tokens = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=1e-5)


def test_quantized_layers_are_left_to_torchao():
    model = load_demo(dtype="bf16", quantize="int8", prepack=True)
    assert model.leangen.quantized == {"quantized": 15, "skipped": 0}
    assert model.leangen.prepacked == 0


def test_recipe_prepack_gives_the_golden_tokens(capsys, tmp_path):
    import json

    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    code, _, _ = run_recipe(capsys, "--config", "demo", "prepack=true", "dtype=bf16", "max_new_tokens=6",
                            f"output_file={out}", f"metrics_file={metrics}")
    assert code == 0
    assert json.loads(out.read_text())["tokens"] == GOLDEN_IDS[:6]
    assert json.loads(metrics.read_text())["prepacked"] == 15


def test_recipe_refuses_prepack_with_compile_before_loading(capsys):
    """inductor's freezing was meant to pack for a compiled run, but its decode-step code
    keeps plain matmuls (no gain), and PrepackedLinear cannot be compiled: one line."""
    code, _, err = run_recipe(capsys, "--config", "demo", "prepack=true", "compile=true", "dtype=bf16")
    assert code != 0
    assert "prepack and compile do not combine" in err and "Traceback" not in err
    assert "load " not in err  # refused before anything was loaded


def test_prepack_settings_that_cannot_work_are_one_line():
    with pytest.raises(ConfigError, match="dtype bf16 or fp32"):
        load_demo(dtype="fp16", prepack=True)
