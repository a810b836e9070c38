"""``model: auto``: an HF ``model_type`` to the torchtune builder and keyword arguments that
build exactly that network (``HF_FAMILIES``); whatever torchtune's modules cannot represent
is refused in one line naming the field and its value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from leangen.errors import ConversionError

if TYPE_CHECKING:
    from leangen.hf.config import ModelConfig


# ---------------------------------------------------------------------------------------
# model_type -> builder


@dataclass(frozen=True)
class HFFamily:
    """How one HF ``model_type`` maps onto a torchtune builder."""

    builder: Callable[[ModelConfig], tuple[str, dict]]  # refuses what it cannot build
    hidden_act: str = "silu"  # transformers' default, and the only one the builder has
    act_aliases: dict = field(default_factory=dict)  # config spellings of the same function
    act_keys: tuple[str, ...] = ("hidden_act",)  # where transformers reads it, in order
    tied: bool = False  # transformers' default tie_word_embeddings
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    attention_bias: str | None = None  # fixed by the architecture (Qwen2: q, k, v)
    norm: str = "rms"  # "rms": x * w; "gemma": x * (1 + w)
    embedding_scale: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    sliding_window: Callable[[dict], int | None] = lambda raw: raw.get("sliding_window")
    compares_windows: bool = False  # the builder has sliding-window attention to compare
    layer_types: Callable[[int], tuple[str, ...]] = lambda n: ("full_attention",) * n


def refuse(field_name: str, value: Any, why: str) -> ConversionError:
    return ConversionError(f"config.json: {field_name} = {value!r}: {why}")


def _base_kwargs(c: ModelConfig) -> dict:
    return dict(vocab_size=c.vocab_size, num_layers=c.num_layers, num_heads=c.num_heads,
                num_kv_heads=c.num_kv_heads, embed_dim=c.embed_dim,
                intermediate_dim=c.intermediate_dim, max_seq_len=c.max_seq_len,
                norm_eps=c.norm_eps, rope_base=c.rope_base)


def _check_common(c: ModelConfig, name: str, *, head_dim_free: bool = False) -> None:
    """What none of torchtune's builders for ``name`` can represent."""
    family = HF_FAMILIES[c.model_type]
    if c.hidden_act != family.hidden_act:
        raise refuse("hidden_act", c.hidden_act, f"torchtune's {name} uses {family.hidden_act} only.")
    if family.attention_bias is None and c.attention_bias != "none":
        raise refuse("attention_bias", True, f"torchtune's {name} attention has no biases.")
    if c.mlp_bias:
        raise refuse("mlp_bias", True, f"torchtune's {name} MLP has no biases.")
    if not head_dim_free and c.head_dim * c.num_heads != c.embed_dim:
        raise refuse("head_dim", c.head_dim,
                     f"torchtune's {name} uses hidden_size / num_attention_heads = "
                     f"{c.embed_dim // c.num_heads}.")
    if c.partial_rotary_factor != 1.0:
        raise refuse("partial_rotary_factor", c.partial_rotary_factor,
                     f"torchtune's {name} rotates the whole head.")


def _no_scaling(c: ModelConfig, name: str) -> None:
    if c.rope_scaling is not None:
        kind = c.rope_scaling.get("rope_type")
        raise refuse("rope_scaling", kind, f"torchtune's {name} has plain RoPE only "
                     "(no yarn, dynamic, linear, longrope or llama3 scaling).")


# torchtune's Llama3ScaledRoPE fixes everything but the factor (llama3_2 passes no more).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama(c: ModelConfig, *, untied_plain: str = "torchtune.models.llama2.llama2",
           name: str = "llama") -> tuple[str, dict]:
    _check_common(c, name)
    kwargs = _base_kwargs(c)
    if c.rope_scaling is None:
        return (untied_plain if not c.tied else "leangen.hf.builders.llama2_tied"), kwargs
    kind = c.rope_scaling.get("rope_type")
    if kind != "llama3":
        raise refuse("rope_scaling", kind, "torchtune's Llama has llama3 scaling only "
                     "(no yarn, dynamic, linear or longrope).")
    for key, fixed in LLAMA3_FIXED.items():
        if c.rope_scaling.get(key) != fixed:
            raise refuse(f"rope_scaling.{key}", c.rope_scaling.get(key),
                         f"torchtune's Llama3ScaledRoPE fixes it at {fixed}.")
    return "torchtune.models.llama3_2.llama3_2", dict(
        kwargs, scale_factor=c.rope_scaling["factor"], tie_word_embeddings=c.tied)


def _mistral(c: ModelConfig) -> tuple[str, dict]:
    _no_scaling(c, "mistral")  # torchtune's mistral == llama2's network
    return _llama(c, untied_plain="torchtune.models.mistral.mistral", name="mistral")


def _qwen2(c: ModelConfig) -> tuple[str, dict]:
    _check_common(c, "qwen2")
    _no_scaling(c, "qwen2")
    return "torchtune.models.qwen2.qwen2", dict(_base_kwargs(c), tie_word_embeddings=c.tied)


def _gemma_checks(c: ModelConfig, name: str) -> None:
    """What torchtune's gemma and gemma2 share: any head_dim, plain RoPE, always tied."""
    _check_common(c, name, head_dim_free=True)
    _no_scaling(c, name)
    if not c.tied:
        raise refuse("tie_word_embeddings", False, f"torchtune's {name} always ties the output.")


def _gemma(c: ModelConfig) -> tuple[str, dict]:
    _gemma_checks(c, "gemma")
    return "torchtune.models.gemma.gemma", dict(_base_kwargs(c), head_dim=c.head_dim)


def _gemma2(c: ModelConfig) -> tuple[str, dict]:
    _gemma_checks(c, "gemma2")
    if c.layer_types != _alternating(c.num_layers):
        raise refuse("layer_types", list(c.layer_types), "torchtune's gemma2 alternates sliding "
                     "and full attention, starting with sliding.")
    return "leangen.hf.builders.gemma2", dict(
        _base_kwargs(c), head_dim=c.head_dim, hidden_capping_value=c.attn_logit_softcapping,
        final_capping_value=c.final_logit_softcapping, sliding_window_size=c.sliding_window,
        query_pre_attn_scalar=c.query_pre_attn_scalar)


def _phi3(c: ModelConfig) -> tuple[str, dict]:
    _check_common(c, "phi3")
    _no_scaling(c, "phi3")
    if c.tied:
        raise refuse("tie_word_embeddings", True, "torchtune's phi3 has its own output projection.")
    return "torchtune.models.phi3.phi3", _base_kwargs(c)


def _qwen2_window(raw: dict) -> int | None:
    sliding = "sliding_attention" in (raw.get("layer_types") or []) or (
        not raw.get("layer_types") and raw.get("use_sliding_window"))
    return raw.get("sliding_window") if sliding else None


def _alternating(n: int) -> tuple[str, ...]:
    """Gemma 2's layers: sliding, full, sliding, ... (transformers 4 configs do not say)."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


_GEMMA_ACTS = {"gelu": "gelu_pytorch_tanh"}  # transformers reads Gemma's legacy "gelu" as tanh

# HF model_type -> how to build it. The convert.py family (key table) follows from the
# same model_type through convert.ALIASES.
HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(_llama),
    "mistral": HFFamily(_mistral, max_seq_len=4096 * 32),
    "qwen2": HFFamily(_qwen2, attention_bias="qkv", max_seq_len=32768, sliding_window=_qwen2_window),
    "gemma": HFFamily(_gemma, hidden_act="gelu_pytorch_tanh", act_aliases=_GEMMA_ACTS, tied=True,
                      max_seq_len=8192, norm="gemma", embedding_scale=True),
    "gemma2": HFFamily(_gemma2, hidden_act="gelu_pytorch_tanh", act_aliases=_GEMMA_ACTS, tied=True,
                       act_keys=("hidden_activation", "hidden_act"),
                       max_seq_len=8192, norm="gemma", embedding_scale=True, compares_windows=True,
                       layer_types=_alternating),
    "phi3": HFFamily(_phi3, norm_eps=1e-5, max_seq_len=4096),
}
GENERIC = HFFamily(lambda c: None)  # defaults for a model_type leangen cannot build


def builder_for(config: ModelConfig) -> tuple[str, dict]:
    """(dotted builder path, kwargs) that build ``config``'s network exactly, or a refusal."""
    family = HF_FAMILIES.get(config.model_type)
    if family is None:
        raise refuse("model_type", config.model_type,
                     f"model: auto supports {', '.join(HF_FAMILIES)}. Name a torchtune builder instead.")
    return family.builder(config)


