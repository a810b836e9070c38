"""``check_model`` compares config.json with a *built* (meta) model: the RoPE module's
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
from typing import Any

from torch import nn

from leangen.errors import ConversionError
from leangen.hf.config import ModelConfig
from leangen.hf.families import HF_FAMILIES, LLAMA3_FIXED
from leangen.load.output import output_projection

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
