"""The output projection of every tied family, Gemma 2's soft-capped one included, is
quantized, prepacked and counted in the model's bytes like any other Linear."""

from __future__ import annotations

import pytest
import torch
from tiny_models import mapped_file as _mapped_file

import leangen
from leangen.load.prepack import PrepackedLinear
from leangen.quant.quantize import is_tensor_subclass, tensor_bytes
from leangen.recipe.metrics import model_bytes

TIED = ["llama3_2", "qwen2", "gemma", "gemma2"]
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


def _load(ckpt, **kwargs) -> torch.nn.Module:
    return leangen.load_model(ckpt.builder, ckpt.path, dtype="fp32", **ckpt.builder_kwargs, **kwargs)


def _vocab_weights(model: torch.nn.Module, kind: type) -> list[torch.nn.Module]:
    """Modules of type ``kind`` outside the layers: only an output projection can be one."""
    return [m for name, m in model.named_modules() if isinstance(m, kind) and not name.startswith("layers.")]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).float()


def _dense_copy(linear: torch.nn.Module) -> torch.nn.Linear:
    """A plain Linear computing what ``linear`` computes (its weight, dequantized)."""
    with torch.no_grad():
        weight = linear(torch.eye(linear.in_features)).T  # row j of W is W @ e_j
    dense = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
    dense.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    return dense


@pytest.mark.parametrize("family", TIED)
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_tied_output_is_quantized_and_counted(tiny_checkpoint, family, kind):
    ckpt = tiny_checkpoint(family)
    full, model = _load(ckpt), _load(ckpt, quantize=kind)
    [(name, output)] = [(n, m) for n, m in model.named_modules()
                        if type(m) is torch.nn.Linear and not n.startswith("layers.")]
    assert is_tensor_subclass(output.weight)  # torchao's quantized weight
    # every Linear of the layers plus the output: none left in full precision
    linears = [m for m in full.modules() if type(m) is torch.nn.Linear]
    quantized = [m for m in model.modules() if type(m) is torch.nn.Linear and is_tensor_subclass(m.weight)]
    assert len(quantized) == len(linears) + 1
    # the embedding is untouched: still the file's mmap
    assert _mapped_file(model.tok_embeddings.weight) is not None
    # the model's bytes count the output's quantized copy besides the embedding
    others = sum(tensor_bytes(p) for p in model.parameters() if p is not output.weight)
    assert model_bytes(model) == others + tensor_bytes(output.weight)
    assert any(p is output.weight for p in model.parameters())
    # the logits come through that quantized copy, and whatever follows it (Gemma 2's
    # soft-capping) still applies: a dense copy of the same weight in its place agrees
    logits = _logits(model)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, _dense_copy(output))
    torch.testing.assert_close(logits, _logits(model), atol=1e-4 * logits.abs().max().item(), rtol=0)


@pytest.mark.parametrize("family", TIED)
def test_tied_output_is_prepacked(tiny_checkpoint, family):
    ckpt = tiny_checkpoint(family)
    plain, packed = _load(ckpt), _load(ckpt, prepack=True)
    assert len(_vocab_weights(packed, PrepackedLinear)) == 1
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    assert _mapped_file(packed.tok_embeddings.weight) is not None
    torch.testing.assert_close(_logits(packed), _logits(plain), atol=1e-4, rtol=1e-4)


def test_gemma2_output_comes_back_from_the_quantized_cache(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("gemma2")
    written = _load(ckpt, quantize="int8", quantize_cache=tmp_path)
    hit = _load(ckpt, quantize="int8", quantize_cache=tmp_path)
    assert (written.leangen.quant_cache["status"], hit.leangen.quant_cache["status"]) == ("written", "hit")
    assert hit.leangen.quantized == written.leangen.quantized == {"quantized": 2 * 7 + 1, "skipped": 0}
    torch.testing.assert_close(_logits(hit), _logits(written), atol=0, rtol=0)
