"""buffers: nothing left on meta, and RoPE bit-identical to an eager build."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import FAMILIES

import leangen
from leangen import ConfigError, LeangenError
from leangen.load.buffers import check_no_meta, materialise_buffers


def _eager(builder: str, kwargs: dict) -> torch.nn.Module:
    from torchtune import config

    with torch.device("cpu"):
        return config.instantiate(OmegaConf.create({"_component_": builder}), **kwargs)


def _unwrapped(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers under the names an eager build gives them (RotateHalf holds the RoPE as .rope)."""
    return {n.replace("pos_embeddings.rope.", "pos_embeddings."): b for n, b in model.named_buffers()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_free_and_rope_identical_to_eager(tiny_checkpoint, family):
    path, builder, kwargs, _ = tiny_checkpoint(family)
    model = leangen.load_model(builder, path, **kwargs)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and not any(t.is_meta for t in tensors)
    loaded, eager = _unwrapped(model), dict(_eager(builder, kwargs).named_buffers())
    assert loaded.keys() == eager.keys()
    assert [n.rpartition(".")[2] for n in eager] == ["theta", "cache"]  # one RoPE, shared
    ropes = {id(layer.attn.pos_embeddings) for layer in model.layers}
    rope = model.layers[-1].attn.pos_embeddings
    assert len(ropes) == 1 and getattr(rope, "rope", rope).cache.device.type == "cpu"
    for name, buffer in eager.items():
        assert loaded[name].dtype == buffer.dtype == torch.float32, name
        assert torch.equal(loaded[name], buffer), name


def test_scaled_rope_registers_nothing_on_meta_yet_is_rebuilt():
    builder, kwargs = FAMILIES["llama3_2"].builder, FAMILIES["llama3_2"].builder_kwargs
    from leangen.load.pipeline import build_on_meta

    model = build_on_meta(builder, **kwargs)
    assert dict(model.named_buffers()) == {}  # why leangen looks for rope_init, not for meta buffers
    materialise_buffers(model, torch.device("cpu"))
    eager = dict(_eager(builder, kwargs).named_buffers())
    assert eager and all(torch.equal(b, eager[n]) for n, b in model.named_buffers())


def test_rope_identical_under_bf16_default_dtype(tiny_checkpoint):
    """torchtune recipes build under a bf16 default dtype; RoPE stays fp32 either way."""
    from torchtune.training import set_default_dtype

    path, builder, kwargs, _ = tiny_checkpoint("llama3_2")
    with set_default_dtype(torch.bfloat16):
        model = leangen.load_model(builder, path, dtype="bf16", **kwargs)
        eager = dict(_eager(builder, kwargs).named_buffers())
    for name, buffer in _unwrapped(model).items():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, eager[name]), name


# --- rope_positions: a cache for what the run needs -------------------------------------

@pytest.mark.parametrize("positions", [1, 7, 100, 333])
@pytest.mark.parametrize("family", ["llama", "llama3_2", "qwen2"])  # plain, Llama 3 scaled, rotate-half
def test_rope_positions_keep_the_eager_rows(tiny_checkpoint, family, positions):
    path, builder, kwargs, _ = tiny_checkpoint(family)
    model = leangen.load_model(builder, path, rope_positions=positions, **kwargs)
    eager = dict(_eager(builder, kwargs).named_buffers())
    loaded = _unwrapped(model)
    assert loaded.keys() == eager.keys()
    for name, buffer in eager.items():
        expected = buffer[:positions] if name.endswith("cache") else buffer
        assert loaded[name].shape[0] == expected.shape[0], name
        assert torch.equal(loaded[name], expected), name  # bit-identical rows


def test_rope_positions_check_the_forward(tiny_checkpoint):
    path, builder, kwargs, _ = tiny_checkpoint("llama3_2")
    model = leangen.load_model(builder, path, rope_positions=16, **kwargs)
    full = leangen.load_model(builder, path, **kwargs)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        assert torch.equal(model(ids), full(ids))
        with pytest.raises(LeangenError, match="needs 17 RoPE positions.*rope_positions=16"):
            model(torch.arange(3, 20)[None])
        with pytest.raises(LeangenError, match="needs 21 RoPE positions.*rope_positions=21 or more"):
            model(ids[:, :2], input_pos=torch.tensor([[3, 20]]))
        model(ids[:, :2], input_pos=torch.tensor([[3, 15]]))  # within the cache


def test_rope_positions_past_the_model_keep_the_full_cache(tiny_checkpoint):
    path, builder, kwargs, _ = tiny_checkpoint("llama")
    full = leangen.load_model(builder, path, **kwargs)
    model = leangen.load_model(builder, path, rope_positions=10_000, **kwargs)
    for (name, buffer), (_, want) in zip(model.named_buffers(), full.named_buffers()):
        assert torch.equal(buffer, want), name


@pytest.mark.parametrize("positions", [0, -1, 2.5, True])
def test_bad_rope_positions(tiny_checkpoint, positions):
    path, builder, kwargs, _ = tiny_checkpoint("llama")
    with pytest.raises(ConfigError, match=r"rope_positions=.* must be a whole number, at least 1"):
        leangen.load_model(builder, path, rope_positions=positions, **kwargs)


def test_check_no_meta_names_module_and_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].register_buffer("mask", torch.empty(2, device="meta"))
    with pytest.raises(LeangenError, match=r"'mask' of module '0' \(Linear\) is still on the meta device"):
        check_no_meta(model)
    with torch.device("meta"):
        root = torch.nn.Linear(2, 2)
    with pytest.raises(LeangenError, match=r"'weight' of module 'model' \(Linear\)"):
        check_no_meta(root)
