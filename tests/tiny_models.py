"""Tiny random HF models, saved like the Hub's, with the matching torchtune builder.

One ``TinyFamily`` per supported architecture pairs a transformers config with the
torchtune component builder and kwargs that describe the same network. Every model
is fp32, hidden 64, 2 layers, GQA where the family has it, built deterministically.

q/k weights are scaled up so attention is sharp: with transformers' default 0.02
init every head attends almost uniformly, and a missed q/k permutation or a wrong
RoPE scaling would hide under 1e-5. Norm weights and biases get noise for the same
reason (a swapped sa_norm/mlp_norm must show in the logits).

Usage::

    path, builder, kwargs, hf_model = make_hf_checkpoint("llama", tmp_path)
    model = leangen.load_model(builder, path, **kwargs)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from safetensors.torch import load_file

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_SEQ_LEN = 512  # torchtune's RoPE cache length
QK_SCALE = 8.0  # makes attention sharp (see module docstring)
SHARD_BYTES = 100_000  # ~350 KB models: 4+ shards

# Llama 3.x RoPE scaling; torchtune's Llama3ScaledRoPE fixes everything but the factor.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_COMMON_HF = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON_TUNE = dict(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS,
                    num_kv_heads=KV_HEADS, embed_dim=HIDDEN, intermediate_dim=INTERMEDIATE,
                    max_seq_len=MAX_SEQ_LEN, norm_eps=1e-5)


@dataclass(frozen=True)
class TinyFamily:
    """A transformers architecture and the torchtune builder that matches it."""

    hf_config: Callable[..., Any]  # (tie_word_embeddings=...) -> transformers config
    hf_model: str  # transformers class name
    builder: str  # dotted path of the torchtune component builder
    builder_kwargs: dict
    tied: bool  # what the family ties by default
    tie_kwarg: bool = False  # the builder takes tie_word_embeddings
    model_type: str = "auto"  # torchtune ModelType name for explicit loading


def _config(cls_name: str, **extra):
    def make(**kwargs):
        import transformers

        return getattr(transformers, cls_name)(**{**_COMMON_HF, **extra, **kwargs})
    return make


FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily(
        _config("LlamaConfig", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "LlamaForCausalLM", "torchtune.models.llama2.llama2",
        dict(_COMMON_TUNE, rope_base=10000.0), tied=False, model_type="llama2"),
    "llama3_2": TinyFamily(
        _config("LlamaConfig", max_position_embeddings=131072,
                rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}),
        "LlamaForCausalLM", "torchtune.models.llama3_2.llama3_2",
        dict(_COMMON_TUNE, rope_base=500000, scale_factor=32), tied=True, tie_kwarg=True,
        model_type="llama3_2"),
    "mistral": TinyFamily(
        _config("MistralConfig", sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "MistralForCausalLM", "torchtune.models.mistral.mistral",
        dict(_COMMON_TUNE, rope_base=10000), tied=False, model_type="mistral"),
    "qwen2": TinyFamily(
        _config("Qwen2Config", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        "Qwen2ForCausalLM", "torchtune.models.qwen2.qwen2",
        dict(_COMMON_TUNE, rope_base=1000000.0), tied=True, tie_kwarg=True, model_type="qwen2"),
    "gemma": TinyFamily(  # head_dim 32 != 64 / 4
        _config("GemmaConfig", head_dim=32, hidden_activation="gelu_pytorch_tanh",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "GemmaForCausalLM", "torchtune.models.gemma.gemma",
        dict(_COMMON_TUNE, head_dim=32, rope_base=10000), tied=True, model_type="gemma"),
    "gemma2": TinyFamily(  # torchtune's gemma2 caps hidden states, not logits: leangen's
        _config("Gemma2Config", head_dim=32, query_pre_attn_scalar=32, sliding_window=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "Gemma2ForCausalLM", "leangen.hf.config.gemma2",
        dict(_COMMON_TUNE, head_dim=32, rope_base=10000, query_pre_attn_scalar=32), tied=True,
        model_type="gemma2"),
    "phi3": TinyFamily(
        _config("Phi3Config", max_position_embeddings=MAX_SEQ_LEN,
                original_max_position_embeddings=MAX_SEQ_LEN,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "Phi3ForCausalLM", "torchtune.models.phi3.phi3",
        dict(_COMMON_TUNE, rope_base=10000), tied=False, model_type="phi3_mini"),
}


class TinyCheckpoint(NamedTuple):
    path: Path  # the checkpoint directory
    builder: str  # dotted path of the torchtune builder
    builder_kwargs: dict
    hf_model: torch.nn.Module  # the transformers model the files were saved from (fp32, eval)


def make_hf_model(family: str, *, tied: bool | None = None, seed: int = 0,
                  **config: Any) -> torch.nn.Module:
    """A deterministic tiny transformers model of ``family`` (fp32, eval mode);
    ``config`` overrides fields of the family's transformers config."""
    import transformers

    spec = FAMILIES[family]
    tied = spec.tied if tied is None else tied
    config = spec.hf_config(**{"tie_word_embeddings": tied, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, spec.hf_model)(config).float().eval()
    _sharpen(model)
    return model


@torch.no_grad()
def _sharpen(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1234)
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            p.mul_(QK_SCALE)
        elif name.endswith("qkv_proj.weight"):  # Phi-3: scale the q and k rows only
            q_and_k = p.shape[0] - KV_HEADS * (HIDDEN // HEADS)
            p[:q_and_k].mul_(QK_SCALE)
        elif p.dim() == 1:  # norms and biases: not their trivial init
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def builder_kwargs(family: str, *, tied: bool | None = None) -> dict:
    """The torchtune builder kwargs for ``family``; ``tied`` only where the builder can choose."""
    spec = FAMILIES[family]
    kwargs = dict(spec.builder_kwargs)
    if spec.tie_kwarg:
        kwargs["tie_word_embeddings"] = spec.tied if tied is None else tied
    return kwargs


def make_hf_checkpoint(family: str, tmp_path: Path, *, fmt: str = "safetensors",
                       shards: bool = True, tied: bool | None = None,
                       seed: int = 0) -> TinyCheckpoint:
    """Save a tiny ``family`` model under ``tmp_path/<family>-<fmt>`` as the Hub would.

    ``fmt`` is "safetensors" (``save_pretrained``) or "bin" (the same shards re-saved
    with ``torch.save`` as ``pytorch_model*.bin``: transformers 5 no longer writes
    .bin). ``shards`` gives several files plus an index. ``tied`` overrides the
    family's default; the builder kwargs follow it only where the builder has a
    ``tie_word_embeddings`` argument (so ``tied=True`` with "llama" gives a tied
    checkpoint for an untied llama2 builder).
    """
    hf_model = make_hf_model(family, tied=tied, seed=seed)
    tie_tag = "" if tied is None else ("-tied" if tied else "-untied")
    path = Path(tmp_path) / f"{family}{tie_tag}-{fmt}{'-sharded' if shards else ''}"
    hf_model.save_pretrained(path, max_shard_size=SHARD_BYTES if shards else "50GB")
    if fmt == "bin":
        safetensors_to_bin(path)
    elif fmt != "safetensors":
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    return TinyCheckpoint(path, FAMILIES[family].builder, builder_kwargs(family, tied=tied), hf_model)


def safetensors_to_bin(path: Path) -> None:
    """Rewrite an HF safetensors directory as pytorch_model*.bin (+ index), in place."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        renames = {s: s.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
                   for s in dict.fromkeys(weight_map.values())}
        for src, dst in renames.items():
            torch.save(_owned(load_file(path / src)), path / dst)
            (path / src).unlink()
        index.unlink()
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: renames[v] for k, v in weight_map.items()}}))
    else:
        torch.save(_owned(load_file(path / "model.safetensors")), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()


def _owned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors directory, by stored name."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def tokens(seq_len: int = 64, *, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=ids).logits


@torch.no_grad()
def tune_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-4 of the logits' scale, in fp32."""
    atol = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
