"""A model folder's ``config.json``, parsed once: ``ModelConfig.from_json`` reads transformers
4's ``rope_theta`` / ``rope_scaling`` and transformers 5's ``rope_parameters`` alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leangen.errors import ConversionError
from leangen.hf.families import GENERIC, HF_FAMILIES

# ---------------------------------------------------------------------------------------
# config.json, parsed once


@dataclass(frozen=True)
class ModelConfig:
    """The fields of an HF config.json that decide the network, in torchtune's terms."""

    model_type: str
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    head_dim: int
    max_seq_len: int
    norm_eps: float
    rope_base: float
    rope_scaling: dict | None  # None: plain RoPE; else rope_parameters without rope_theta
    partial_rotary_factor: float
    tied: bool
    attention_bias: str  # the projections with a bias: "none", "qkv", "qkvo"
    mlp_bias: bool
    hidden_act: str
    # The window of sliding-window attention where transformers uses one, else None.
    # torchtune's Mistral/Qwen2/Phi-3 attend to everything, and its Gemma 2 masks by
    # absolute position: both equal transformers while prompt + new tokens <= window.
    sliding_window: int | None
    layer_types: tuple[str, ...]  # config.json's, else the family's fixed pattern
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    query_pre_attn_scalar: float | None
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict) -> "ModelConfig":
        model_type = str(raw.get("model_type", ""))
        family = HF_FAMILIES.get(model_type, GENERIC)
        heads = _required(raw, "num_attention_heads")
        hidden = _required(raw, "hidden_size")
        layers = _required(raw, "num_hidden_layers")
        rope = raw.get("rope_parameters") or {}
        if any(isinstance(v, dict) for v in rope.values()):
            raise ConversionError(
                f"config.json: rope_parameters per layer type ({', '.join(rope)}) is not "
                "supported by torchtune's decoders.")
        scaling = dict(raw.get("rope_scaling") or {k: v for k, v in rope.items()
                                                  if k not in ("rope_theta", "partial_rotary_factor")})
        if "type" in scaling:  # transformers 4's spelling
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        act = next((raw[k] for k in family.act_keys if raw.get(k)), family.hidden_act)
        bias = family.attention_bias or ("qkvo" if raw.get("attention_bias") else "none")
        return cls(
            model_type=model_type,
            vocab_size=_required(raw, "vocab_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            embed_dim=hidden,
            intermediate_dim=_required(raw, "intermediate_size"),
            head_dim=raw.get("head_dim") or hidden // heads,
            max_seq_len=raw.get("max_position_embeddings") or family.max_seq_len,
            norm_eps=float(raw.get("rms_norm_eps", family.norm_eps)),
            rope_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                                 raw.get("partial_rotary_factor") or 1.0)),
            tied=bool(raw.get("tie_word_embeddings", family.tied)),
            attention_bias=bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act=family.act_aliases.get(act, act),
            sliding_window=family.sliding_window(raw),
            layer_types=tuple(raw.get("layer_types") or family.layer_types(layers)),
            attn_logit_softcapping=raw.get("attn_logit_softcapping"),
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            query_pre_attn_scalar=raw.get("query_pre_attn_scalar"),
            raw=raw,
        )


def _required(raw: dict, key: str) -> Any:
    if raw.get(key) is None:
        raise ConversionError(f"config.json has no '{key}'; it is needed to build the model.")
    return raw[key]


def parse_config(raw: dict | None) -> ModelConfig | None:
    """config.json's ModelConfig; None for no config or a Meta params.json (no model_type)."""
    if not raw or "model_type" not in raw:
        return None
    return ModelConfig.from_json(raw)


