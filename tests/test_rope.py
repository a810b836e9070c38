"""RotateHalf: torchtune's RoPE on HF's rotate-half q/k rows, so q/k need no permutation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, assert_logits_close, hf_logits, tokens, tune_logits
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import RotaryPositionalEmbeddings

import leangen
from leangen.checkpoint.convert import INTERLEAVED, ROTATE_HALF, Transform
from leangen.load.pipeline import build_on_meta
from leangen.load.rope import RotateHalf, match_stored_layout, qk_layout

HEAD_DIM = 16

ROPES = {
    "plain": lambda: RotaryPositionalEmbeddings(HEAD_DIM, max_seq_len=64, base=10_000),
    "llama3_scaled": lambda: Llama3ScaledRoPE(HEAD_DIM, max_seq_len=64, base=500_000, scale_factor=32),
}


def _to_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half order (i, i + d/2) to interleaved pairs (2i, 2i+1) along the last dim."""
    return x.unflatten(-1, (2, x.size(-1) // 2)).transpose(-1, -2).flatten(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", ["none", "input_pos"])
@pytest.mark.parametrize("kind", list(ROPES))
def test_rotate_half_equals_torchtune_rope_on_permuted_input(kind, positions, dtype):
    rope = ROPES[kind]()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, HEAD_DIM, generator=gen).to(dtype)  # [b, s, heads, head_dim]
    input_pos = torch.randint(0, 64, (2, 10), generator=gen) if positions == "input_pos" else None
    ours = RotateHalf(rope)(x, input_pos=input_pos)
    theirs = rope(_to_interleaved(x), input_pos=input_pos)
    assert ours.dtype == dtype
    assert torch.equal(_to_interleaved(ours), theirs)  # bit-identical, not merely close


def test_rotate_half_on_hf_weights_equals_torchtune_on_permuted_weights():
    """The same q through both paths: HF rows + RotateHalf, and leangen's permutation + RoPE."""
    rope, heads, dim = ROPES["llama3_scaled"](), 3, 24
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(heads * HEAD_DIM, dim, generator=gen), torch.randn(2, 7, dim, generator=gen)
    q_hf = (x @ w.T).unflatten(-1, (heads, HEAD_DIM))
    q_tune = (x @ Transform(permute_heads=heads).apply(w).T).unflatten(-1, (heads, HEAD_DIM))
    torch.testing.assert_close(_to_interleaved(RotateHalf(rope)(q_hf)), rope(q_tune), rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_permutation_to_rotate_half_inverts_it(heads):
    w = torch.randn(heads * HEAD_DIM, 8)
    interleaved = Transform(permute_heads=heads).apply(w)
    assert torch.equal(Transform(permute_heads=heads, to_layout=ROTATE_HALF).apply(interleaved), w)


def test_wrapper_keeps_the_cache_and_moves_with_the_model():
    rope = ROPES["plain"]()
    wrapper = RotateHalf(rope)
    assert wrapper.rope is rope and dict(wrapper.named_buffers())["rope.cache"] is rope.cache
    assert wrapper.to(torch.float64).rope.cache.dtype == torch.float64  # buffers follow .to()


def _meta_model(family: str) -> torch.nn.Module:
    return build_on_meta(FAMILIES[family].builder, **FAMILIES[family].builder_kwargs)


def test_match_stored_layout_wraps_the_shared_rope_once():
    model = _meta_model("llama3_2")
    original = model.layers[0].attn.pos_embeddings
    assert qk_layout(model) == INTERLEAVED
    match_stored_layout(model, ROTATE_HALF)
    ropes = {id(layer.attn.pos_embeddings) for layer in model.layers}
    assert len(ropes) == 1 and model.layers[1].attn.pos_embeddings.rope is original
    assert qk_layout(model) == ROTATE_HALF


def test_interleaved_files_and_rotate_half_models_keep_their_rope():
    model = _meta_model("llama")
    match_stored_layout(model, INTERLEAVED)  # Meta consolidated.pth, torchtune .pt
    assert type(model.layers[0].attn.pos_embeddings) is RotaryPositionalEmbeddings
    qwen = _meta_model("qwen2")
    match_stored_layout(qwen, ROTATE_HALF)
    assert type(qwen.layers[0].attn.pos_embeddings) is Qwen2RotaryPositionalEmbeddings
    assert qk_layout(qwen) == ROTATE_HALF


@pytest.mark.parametrize("family,inner", [("llama", RotaryPositionalEmbeddings), ("mistral", RotaryPositionalEmbeddings),
                                          ("gemma", RotaryPositionalEmbeddings), ("llama3_2", Llama3ScaledRoPE)])
def test_a_loaded_hf_model_rotates_halves(tiny_checkpoint, family, inner):
    """load_model keeps HF's q/k rows and wraps the builder's interleaved RoPE in RotateHalf."""
    path, builder, kwargs, _ = tiny_checkpoint(family)
    model = leangen.load_model(builder, path, **kwargs)
    ropes = {id(layer.attn.pos_embeddings) for layer in model.layers}
    rope = model.layers[0].attn.pos_embeddings
    assert len(ropes) == 1 and type(rope) is RotateHalf and type(rope.rope) is inner
    assert rope.rope.cache.device.type == "cpu" and qk_layout(model) == ROTATE_HALF


def test_a_torchtune_format_file_keeps_torchtune_rope(tiny_checkpoint, tmp_path):
    """torchtune's own layout (load_tensors' default) is loaded as is, with the stock RoPE."""
    path, builder, kwargs, hf_model = tiny_checkpoint("llama3_2")
    view = leangen.open_checkpoint(path)
    torch.save({n: view.tensor(n).clone() for n in view}, tmp_path / "model.pt")
    model = leangen.load_model(builder, tmp_path / "model.pt", **kwargs)
    assert type(model.layers[0].attn.pos_embeddings) is Llama3ScaledRoPE
    ids = tokens(64)
    assert_logits_close(tune_logits(model, ids), hf_logits(hf_model, ids))
