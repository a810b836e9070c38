"""Stored checkpoint names to torchtune names, with a small per-tensor transform.

Nothing is read here: ``plan`` looks at names and shapes only and returns, per
torchtune parameter, which stored tensor feeds it and how (a row range of a fused
tensor, a q/k head permutation). The key tables are torchtune's own.

q/k rows are permuted only where the layout they are stored in differs from the
layout of the model they are for (``plan``'s ``layout``, which ``load_model`` reads
from the built model's RoPE module: see ``leangen.load.rope``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torchtune.models.convert_weights import _FROM_HF, _FROM_META
from torchtune.models.gemma2._convert_weights import _GEMMA2_FROM_HF as _TUNE_GEMMA2_FROM_HF
from torchtune.models.phi3._convert_weights import _PHI3_MINI
from torchtune.models.qwen2._convert_weights import _FROM_HF as _QWEN2_FROM_HF

from leangen.errors import ConversionError

# torchtune 0.6.1's Gemma 2 table swaps the MLP's two norms: HF's pre_feedforward_layernorm
# runs before the MLP (torchtune's mlp_norm), post_feedforward_layernorm after it (mlp_scale).
_GEMMA2_FROM_HF = {
    **_TUNE_GEMMA2_FROM_HF,
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
}


# q/k row layouts. HF's RoPE rotates halves (element i pairs with i + head_dim/2), so
# HF files store q/k rows for that; Meta's reference and torchtune's stock
# RotaryPositionalEmbeddings rotate interleaved pairs (2i, 2i+1).
ROTATE_HALF, INTERLEAVED = "rotate_half", "interleaved"


@dataclass(frozen=True)
class Geometry:
    """Attention head layout, needed to permute q/k rows and to split fused qkv."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Geometry | None":
        for module in model.modules():  # torchtune's MultiHeadAttention carries all three
            if all(hasattr(module, a) for a in ("num_heads", "num_kv_heads", "head_dim")):
                return cls(module.num_heads, module.num_kv_heads, module.head_dim)
        return None

    @classmethod
    def from_config(cls, config: dict | None) -> "Geometry | None":
        if not config:
            return None
        heads = config.get("num_attention_heads", config.get("n_heads"))
        dim = config.get("hidden_size", config.get("dim"))
        if heads is None or dim is None:
            return None
        kv = config.get("num_key_value_heads", config.get("n_kv_heads")) or heads
        return cls(heads, kv, config.get("head_dim") or dim // heads)


@dataclass(frozen=True)
class Transform:
    """What turns a stored tensor into the torchtune parameter; identity by default."""

    rows: tuple[int, int] | None = None  # row range of a fused stored tensor: a view
    permute_heads: int = 0  # >0: permute q/k rows within each of this many heads...
    to_layout: str = INTERLEAVED  # ...from the other layout into this one

    @property
    def computes(self) -> bool:
        """Whether ``apply`` makes new memory (the row view does not)."""
        return self.permute_heads > 0

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if not self.permute_heads:
            return t
        n, rows = self.permute_heads, t.shape[0]
        half = rows // n // 2
        # To interleaved: torchtune's convert_weights.hf_to_tune::_permute; else its inverse.
        split = (n, 2, half) if self.to_layout == INTERLEAVED else (n, half, 2)
        return t.reshape(*split, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


@dataclass(frozen=True)
class Entry:
    key: str  # stored name
    shape: torch.Size  # torchtune shape
    dtype: torch.dtype
    transform: Transform = Transform()
    unavailable: str | None = None  # why it cannot be taken (listed, shaped, but not readable)


SplitFn = Callable[[str, torch.Size, Geometry], list[tuple[str, tuple[int, int]]]]


@dataclass(frozen=True)
class Family:
    name: str
    hf_table: Mapping[str, str | None]
    tune_layout: str = ROTATE_HALF  # the q/k layout of torchtune's own RoPE for the family
    split: SplitFn | None = None  # fused HF tensors to several torchtune ones
    extra_tune_keys: tuple[str, ...] = ()  # torchtune keys only reachable through split
    tables: dict[str, Mapping[str, str | None]] = field(default_factory=dict, compare=False)
    layouts: dict[str, str | None] = field(default_factory=dict, compare=False)  # per table: stored q/k

    def __post_init__(self):
        tune = {v: v for v in list(self.hf_table.values()) + list(self.extra_tune_keys) if v}
        self.tables.update(hf=self.hf_table, torchtune=tune)
        # A torchtune-format file holds q/k as the torchtune model it came from wants them,
        # which its key names cannot tell (a Phi-3 .pt has Llama's names): None, taken as is.
        self.layouts.update(hf=ROTATE_HALF, torchtune=None)
        if self.tune_layout == INTERLEAVED and self.hf_table is _FROM_HF:
            self.tables["meta"] = _FROM_META  # Meta's consolidated.pth is already interleaved
            self.layouts["meta"] = INTERLEAVED


def _split_phi3(tune_key: str, shape: torch.Size, g: Geometry) -> list[tuple[str, tuple[int, int]]]:
    """Phi-3's fused qkv_proj and gate_up_proj become row ranges (views, no copy)."""
    if tune_key.endswith("attn.q_proj.weight"):
        q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        base = tune_key[: -len("q_proj.weight")]
        return [(base + "q_proj.weight", (0, q)), (base + "k_proj.weight", (q, q + kv)),
                (base + "v_proj.weight", (q + kv, q + 2 * kv))]
    if tune_key.endswith("mlp.w1.weight"):
        half = shape[0] // 2
        return [(tune_key, (0, half)), (tune_key.replace("w1", "w3"), (half, shape[0]))]
    return [(tune_key, None)]


# Order matters for detection from key names: the first family whose table accounts
# for every stored key wins (a Gemma 2 checkpoint also has all of Llama's keys).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", _FROM_HF, tune_layout=INTERLEAVED),
        Family("qwen2", _QWEN2_FROM_HF),
        Family("gemma2", _GEMMA2_FROM_HF, tune_layout=INTERLEAVED),
        Family("phi3", _PHI3_MINI, split=_split_phi3,
               extra_tune_keys=("layers.{}.attn.k_proj.weight", "layers.{}.attn.v_proj.weight",
                                "layers.{}.mlp.w3.weight")),
    )
}

# torchtune ModelType names, HF `model_type`s and HF architectures, to a family.
ALIASES: dict[str, str] = {
    **dict.fromkeys(["llama", "llama2", "llama3", "llama3_1", "llama3_2", "llama3_3",
                     "code_llama2", "mistral", "gemma", "LlamaForCausalLM",
                     "MistralForCausalLM", "GemmaForCausalLM"], "llama"),
    **dict.fromkeys(["qwen2", "qwen2_5", "Qwen2ForCausalLM"], "qwen2"),
    **dict.fromkeys(["gemma2", "Gemma2ForCausalLM"], "gemma2"),
    **dict.fromkeys(["phi3", "phi3_mini", "phi4", "Phi3ForCausalLM"], "phi3"),
}

# Wrappers around a causal LM's weights (VLMs, older exports), stripped before lookup.
_HF_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                ("model.language_model.", "model."))
_LAYER_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")


def family_named(model_type: str) -> Family:
    # torchtune's own YAMLs spell ModelType members in capitals (model_type: LLAMA3_2).
    name = model_type if model_type in ALIASES else model_type.lower()
    if name not in ALIASES:
        raise ConversionError(
            f"unknown model_type '{model_type}'. Use 'auto' or one of: {', '.join(sorted(ALIASES))}."
        )
    return FAMILIES[ALIASES[name]]


def detect_family(model_type: str, config: dict | None, keys: list[str]) -> Family:
    """Explicit name, else config.json's model_type/architectures, else the key names."""
    if model_type != "auto":
        return family_named(model_type)
    for name in [(config or {}).get("model_type")] + list((config or {}).get("architectures") or []):
        if name in ALIASES:
            return FAMILIES[ALIASES[name]]
    templates = {_template(k)[0] for k in keys}
    for family in FAMILIES.values():
        if any(templates <= table.keys() for table in family.tables.values()):
            return family
    raise ConversionError(
        "cannot tell the model family from the checkpoint's keys (e.g. "
        f"{', '.join(sorted(keys)[:3])}). Pass model_type, one of: {', '.join(sorted(ALIASES))}."
    )


def stored_layout(keys: list[str], family: Family) -> str | None:
    """The layout of the checkpoint's q/k rows: the one of the key table its names fit
    (None: the model's own, for torchtune-format files)."""
    return family.layouts[_pick_table(keys, family)[0]]


def plan(keys: list[str], shape_of, dtype_of, family: Family, geometry: Geometry | None,
         layout: str | None = None) -> dict[str, Entry]:
    """torchtune name -> Entry for every stored key the family's table knows.

    ``layout`` is the q/k row layout of the model the tensors are for (None: the one of
    torchtune's own RoPE for the family); q/k rows stored in another layout are permuted.
    """
    source, table = _pick_table(keys, family)
    target = layout or family.tune_layout
    stored = family.layouts[source]
    permute_to = target if stored and stored != target else None
    split = family.split if source == "hf" else None
    unknown = [k for k in keys if _template(k)[0] not in table]
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint tensors are unknown to the '{family.name}' {source} key "
            f"table (first: {', '.join(unknown[:3])}). Is model_type right?"
        )
    entries: dict[str, Entry] = {}
    for key in keys:
        template, layers = _template(key)
        target = table[template]
        if target is None:  # e.g. rotary_emb.inv_freq: recomputed, not loaded
            continue
        tune_key = target.format(*layers)
        if geometry is None and _needs_geometry(tune_key, permute_to, split) and not split:
            # Still listed with its shape, so an embedding can be loaded without head counts.
            entries[tune_key] = Entry(key, shape_of(key), dtype_of(key), unavailable=_no_geometry(tune_key))
            continue
        parts = list(_expand(tune_key, shape_of(key), split, permute_to, geometry))
        _check_split(key, shape_of(key), parts, geometry)
        for name, transform in parts:
            shape = shape_of(key) if transform.rows is None else _rows_shape(shape_of(key), transform.rows)
            entries[name] = Entry(key, shape, dtype_of(key), transform)
    return entries


def _expand(tune_key, shape, split: SplitFn | None, permute_to: str | None, geometry):
    """The torchtune tensors one stored tensor becomes, each with its transform."""
    if geometry is None and _needs_geometry(tune_key, permute_to, split):
        raise ConversionError(_no_geometry(tune_key))
    parts = split(tune_key, shape, geometry) if split else [(tune_key, None)]
    for name, rows in parts:
        if permute_to:
            yield name, Transform(rows=rows, permute_heads=_heads_to_permute(name, geometry),
                                  to_layout=permute_to)
        else:
            yield name, Transform(rows=rows)


def _check_split(key: str, shape: torch.Size, parts, g: Geometry | None) -> None:
    """The row ranges of a fused tensor must tile its rows exactly. Head counts that do
    not match the checkpoint would otherwise give right-shaped views of the wrong rows."""
    ranges = [t.rows for _, t in parts if t.rows]
    stops = [stop for _, stop in ranges]
    if not ranges or [start for start, _ in ranges] == [0] + stops[:-1] and stops[-1] == shape[0]:
        return
    heads = f" ({g.num_heads} heads, {g.num_kv_heads} kv heads of {g.head_dim})" if g else ""
    raise ConversionError(
        f"'{key}' has shape {tuple(shape)}, but splitting it into {', '.join(n for n, _ in parts)} "
        f"takes rows {', '.join(f'{a}:{b}' for a, b in ranges)}{heads}. The builder probably "
        "does not match the checkpoint: check its head counts."
    )


def _needs_geometry(tune_key: str, permute_to: str | None, split: SplitFn | None) -> bool:
    return _is_qk(tune_key) and bool(permute_to or split)


def _no_geometry(tune_key: str) -> str:
    return (f"'{tune_key}' needs the attention head counts to convert, and there is no "
            "config.json/params.json beside the checkpoint. Load it through load_model.")


def _is_qk(tune_key: str) -> bool:
    return tune_key.endswith(("attn.q_proj.weight", "attn.k_proj.weight"))


def _heads_to_permute(tune_key: str, g: Geometry) -> int:
    if tune_key.endswith("attn.q_proj.weight"):
        return g.num_heads
    if tune_key.endswith("attn.k_proj.weight"):
        return g.num_kv_heads
    return 0


def _rows_shape(shape: torch.Size, rows: tuple[int, int]) -> torch.Size:
    return torch.Size((rows[1] - rows[0], *shape[1:]))


def _pick_table(keys: list[str], family: Family) -> tuple[str, Mapping[str, str | None]]:
    """The source format (hf, meta, torchtune) whose table accounts for the most keys."""
    templates = [_template(k)[0] for k in keys]
    return max(family.tables.items(), key=lambda item: sum(t in item[1] for t in templates))


def _template(key: str) -> tuple[str, list[str]]:
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', ['3'])."""
    for prefix, replacement in _HF_PREFIXES:
        if key.startswith(prefix):
            key = replacement + key[len(prefix):]
            break
    return _LAYER_NUMBER.sub(".{}", key), _LAYER_NUMBER.findall(key)
