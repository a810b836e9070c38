"""A model folder's ``config.json``: the builder it needs, and a check of any other builder.

``ModelConfig.from_json`` parses config.json once (transformers 4's ``rope_theta`` /
``rope_scaling`` and transformers 5's ``rope_parameters`` alike). ``HF_FAMILIES`` maps
an HF ``model_type`` to the torchtune component builder and keyword arguments that
build exactly that network (``model: auto``); whatever torchtune's modules cannot
represent is refused in one line naming the field and its value.

``check_model`` compares config.json with a *built* (meta) model: the RoPE module's
base and scaling, the norms' eps and kind, the attention modules' heads, the MLP,
tying and biases. It reads modules, not builder kwargs, so a named builder such as
``llama3_2_1b`` (which takes none) is checked as well as a component builder.

What is recorded but not compared: ``max_position_embeddings`` (a smaller
``max_seq_len`` only caps the length) and a ``sliding_window`` that torchtune's
module does not implement (Mistral, Qwen2, Phi-3: exact while prompt plus new tokens
stay within the window; see ``ModelConfig.sliding_window``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from leangen.errors import ConversionError
from leangen.load.output import OutputWrapper, output_projection

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
        family = HF_FAMILIES.get(model_type, _GENERIC)
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
        return (untied_plain if not c.tied else "leangen.hf.config.llama2_tied"), kwargs
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
    return "leangen.hf.config.gemma2", dict(
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
_GENERIC = HFFamily(lambda c: None)  # defaults for a model_type leangen cannot build


def builder_for(config: ModelConfig) -> tuple[str, dict]:
    """(dotted builder path, kwargs) that build ``config``'s network exactly, or a refusal."""
    family = HF_FAMILIES.get(config.model_type)
    if family is None:
        raise refuse("model_type", config.model_type,
                     f"model: auto supports {', '.join(HF_FAMILIES)}. Name a torchtune builder instead.")
    return family.builder(config)


# ---------------------------------------------------------------------------------------
# builders torchtune lacks, made of torchtune's own modules


def llama2_tied(**kwargs: Any) -> nn.Module:
    """torchtune's llama2 (plain RoPE, any base) with the output tied to the embedding,
    as in SmolLM-style Llama checkpoints. llama3_2 ties but always scales its RoPE."""
    from torchtune.models.llama2 import llama2
    from torchtune.modules import TiedLinear

    model = llama2(**kwargs)
    del model.output
    model.output = TiedLinear(model.tok_embeddings)
    return model


class SoftCappedOutput(OutputWrapper):
    """Gemma 2's output: the tied projection, then ``cap * tanh(logits / cap)``.

    A module, so that a quantized or packed copy of the projection put in its place is
    a child like any other Linear (its bytes counted, its weight cached); while tied,
    the projection is torchtune's ``TiedLinear``, a plain attribute with no parameters."""

    def __init__(self, tied_module: nn.Module, cap: float | None):
        from torchtune.modules import TiedLinear

        super().__init__()
        self.projection = TiedLinear(tied_module)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.projection(x)
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap


def gemma2(final_capping_value: float | None = 30.0, **kwargs: Any) -> nn.Module:
    """torchtune's gemma2 with the final soft-capping on the logits, as transformers does.

    torchtune 0.6.1 caps the final norm's output (the hidden state) instead, which
    changes every logit (1e-3 on a tiny model)."""
    from torchtune.models.gemma2 import gemma2 as tune_gemma2

    model = tune_gemma2(final_capping_value=final_capping_value or 30.0, **kwargs)
    model.norm.logit_capping = nn.Identity()
    model.output = SoftCappedOutput(model.tok_embeddings, final_capping_value)
    return model


# ---------------------------------------------------------------------------------------
# the cross-check: config.json against a built model


def expected_fields(c: ModelConfig) -> dict[str, Any]:
    """What the built model must show, by config.json field name."""
    family = HF_FAMILIES.get(c.model_type)
    out = {
        "vocab_size": c.vocab_size, "num_hidden_layers": c.num_layers,
        "hidden_size": c.embed_dim, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_dim, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base, "rope_scaling": _scaling_text(c.rope_scaling),
        "rotary_dim": int(c.head_dim * c.partial_rotary_factor),
        "tie_word_embeddings": c.tied, "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias, "hidden_act": c.hidden_act,
        "attn_logit_softcapping": c.attn_logit_softcapping,
        "final_logit_softcapping": c.final_logit_softcapping,
        "query_pre_attn_scalar": c.query_pre_attn_scalar or c.head_dim,
    }
    if family is not None:
        out.update(norm=family.norm, embedding_scale=family.embedding_scale)
        if family.compares_windows:
            out["sliding_window (per layer)"] = tuple(
                c.sliding_window if t == "sliding_attention" else None
                for t in c.layer_types)
    return out


def _scaling_text(scaling: dict | None) -> str | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type")
    if kind == "llama3":
        scaling = {"factor": scaling.get("factor"), **{k: scaling.get(k) for k in LLAMA3_FIXED}}
    else:
        scaling = {k: v for k, v in scaling.items() if k != "rope_type"}
    args = ", ".join(f"{k}={_short(v)}" for k, v in scaling.items())
    return f"{kind}({args})"


def _short(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(float(v))
    return f"[{len(v)} values]" if isinstance(v, (list, tuple)) else str(v)


def model_fields(model: nn.Module) -> dict[str, Any]:
    """The same fields, read from a built (meta) torchtune decoder's modules."""
    from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
    from torchtune.models.gemma.rms_norm import GemmaRMSNorm
    from torchtune.models.gemma2._component_builders import Gemma2FinalNorm
    from torchtune.modules import RMSNorm

    attn = [layer.attn for layer in model.layers]
    mlp = model.layers[0].mlp
    rope = next((m for m in model.modules() if hasattr(m, "rope_init")), None)
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, GemmaRMSNorm))]
    eps = {m.eps for m in norms}
    kinds = {"gemma" if isinstance(m, GemmaRMSNorm) else "rms" for m in norms}
    output = model.output
    final_cap = getattr(output, "cap", None)
    if isinstance(model.norm, Gemma2FinalNorm) and not isinstance(model.norm.logit_capping, nn.Identity):
        final_cap = f"{model.norm.capping_value} on the final norm's output, not the logits (torchtune's gemma2)"
    scaling = None
    if hasattr(rope, "scale_factor"):  # Llama3ScaledRoPE
        scaling = _scaling_text({"rope_type": "llama3", "factor": rope.scale_factor,
                                 "low_freq_factor": rope.low_freq_factor,
                                 "high_freq_factor": rope.high_freq_factor,
                                 "original_max_position_embeddings": rope.old_context_len})
    a = attn[0]
    biased = "".join(p for p, proj in zip("qkvo", (a.q_proj, a.k_proj, a.v_proj, a.output_proj))
                     if proj.bias is not None)
    scaling_q = getattr(a, "scaling", None)
    return {
        "vocab_size": model.tok_embeddings.num_embeddings,
        "num_hidden_layers": len(model.layers),
        "hidden_size": model.tok_embeddings.embedding_dim,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim, "intermediate_size": mlp.w1.out_features,
        "rms_norm_eps": eps.pop() if len(eps) == 1 else sorted(eps),
        "rope_theta": getattr(rope, "base", None), "rope_scaling": scaling,
        "rotary_dim": getattr(rope, "dim", None),
        "tie_word_embeddings": output_projection(model).tied,
        "attention_bias": biased or "none", "mlp_bias": mlp.w1.bias is not None,
        "hidden_act": _activation_name(mlp.activation),
        "attn_logit_softcapping": getattr(a, "softcapping", None),
        "final_logit_softcapping": final_cap,
        "query_pre_attn_scalar": a.head_dim if scaling_q is None else round(scaling_q ** -2, 4),
        "norm": kinds.pop() if len(kinds) == 1 else sorted(kinds),
        "embedding_scale": isinstance(model.tok_embeddings, GemmaNormEmbeddings),
        "sliding_window (per layer)": tuple(getattr(x, "sliding_window_size", None) for x in attn),
    }


# torch activation modules to the config.json name of the same function.
_ACTIVATIONS: dict[tuple[type, str | None], str] = {
    (nn.SiLU, None): "silu",
    (nn.GELU, "tanh"): "gelu_pytorch_tanh",
    (nn.GELU, "none"): "gelu",
}


def _activation_name(module: nn.Module) -> str:
    key = (type(module), getattr(module, "approximate", None))
    return _ACTIVATIONS.get(key, type(module).__name__)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def check_model(model: nn.Module, config: ModelConfig, *, strict: bool = True) -> None:
    """Refuse (or, with ``strict=False``, warn about) a model that differs from config.json.

    One line names every field that differs, with the builder's and config.json's value."""
    if not all(hasattr(model, a) for a in ("tok_embeddings", "layers", "norm", "output")):
        return  # not a torchtune text decoder: nothing config.json describes
    built = model_fields(model)
    wrong = [f"{name}: builder {built.get(name)!r}, checkpoint {want!r}"
             for name, want in expected_fields(config).items() if not _same(built.get(name), want)]
    if not wrong:
        return
    differs = f"the model builder does not match the checkpoint's config.json ({'; '.join(wrong)})"
    if strict:
        raise ConversionError(f"{differs}. Use model: auto, or fix the builder's arguments; to load it "
                              "anyway, set checkpoint.strict_config: false (strict_config=False).")
    warnings.warn(f"{differs}; loaded anyway because checkpoint.strict_config is false (strict_config=False): "
                  "its outputs may be wrong. Use model: auto, or fix the builder's arguments.", stacklevel=3)
