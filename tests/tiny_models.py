"""Every tiny model folder, tokenizer file and shared helper the tests use: the one place
test modules import from (conftest.py exposes the folders as cached session fixtures).

* HF checkpoints per family (``make_hf_checkpoint``: safetensors or .bin, sharded or not,
  tied or not) and config variants of them (``VARIANTS``, ``make_variant_folder``);
* tokenizer folders trained offline (``make_llama_tokenizer_folder``: tokenizers BPE with a
  Llama-3 chat template; ``make_qwen_tokenizer_folder``: ChatML in tokenizer_config.json;
  ``make_vocab_merges_folder``; ``write_tiktoken_file``); the sentencepiece model is the
  demo's ``tokenizer.model``;
* folders as the Hub has them, model and tokenizer together (``make_hub_folder``);
* the tensor-parallel checkpoints (``make_tp_folders``);
* the demo model's golden output and loader, and ``mapped_file`` (which file holds a tensor).

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

A test that changes files copies a folder first (``copy_folder``, ``copy_checkpoint``).
"""

from __future__ import annotations

import json
import random
import shutil
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
        "Gemma2ForCausalLM", "leangen.hf.builders.gemma2",
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


def copy_folder(folder: Path, to: Path) -> Path:
    """A copy of ``folder`` at ``to``, for a test that changes files: the cached folders
    are shared by the whole session."""
    shutil.copytree(folder, to, dirs_exist_ok=True)
    return to


def copy_checkpoint(checkpoint: TinyCheckpoint, to: Path) -> TinyCheckpoint:
    """``checkpoint`` with its files copied to ``to`` (see ``copy_folder``)."""
    return checkpoint._replace(path=copy_folder(checkpoint.path, to))


# --- config variants: one folder per config.json that model: auto must read ----------

# name -> (family, tied, transformers config overrides, builder model: auto picks)
VARIANTS = {
    "llama-untied": ("llama", False, {}, "torchtune.models.llama2.llama2"),
    "llama-tied": ("llama", True, {}, "leangen.hf.builders.llama2_tied"),
    "llama-theta": ("llama", True, {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
                    "leangen.hf.builders.llama2_tied"),
    "llama3-factor16": ("llama", False, {"max_position_embeddings": 131072, "rope_parameters": {
        **LLAMA3_ROPE, "factor": 16.0, "rope_theta": 500000.0}}, "torchtune.models.llama3_2.llama3_2"),
    "mistral": ("mistral", False, {"sliding_window": 4096}, "torchtune.models.mistral.mistral"),
    "qwen2": ("qwen2", True, {}, "torchtune.models.qwen2.qwen2"),
    "gemma": ("gemma", True, {}, "torchtune.models.gemma.gemma"),
    "gemma2": ("gemma2", True, {}, "leangen.hf.builders.gemma2"),
    "phi3": ("phi3", False, {}, "torchtune.models.phi3.phi3"),
}


def make_variant_model(variant: str, **config: Any) -> torch.nn.Module:
    """The transformers model of ``VARIANTS[variant]``; ``config`` overrides more fields."""
    family, tied, overrides, _ = VARIANTS[variant]
    return make_hf_model(family, tied=tied, **{**overrides, **config})


def make_variant_folder(variant: str, root: Path) -> tuple[Path, torch.nn.Module]:
    """``VARIANTS[variant]`` saved in ``root`` (one safetensors file): (path, transformers model)."""
    hf_model = make_variant_model(variant)
    hf_model.save_pretrained(root)
    return Path(root), hf_model


# --- tokenizer folders, trained offline ------------------------------------------------

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2.5's own, shortened: a default system prompt, ChatML turns, whitespace control
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def made_up_texts(seed: int) -> list[str]:
    """60 lines of made-up words (multi-byte letters, newlines, double spaces)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "é", "ß", "日本", "语", "\n", "  "]
    return [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(8))
            for _ in range(60)]


def train_bpe(specials: list[str], *, seed: int, qwen: bool = False):
    """A ~500-token byte-level BPE (Llama-3 style, or Qwen2's split + NFC)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if qwen:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(made_up_texts(seed), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def edit_json(path: Path, **changes) -> None:
    """Set ``changes`` in the JSON file at ``path`` (created if missing)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data, indent=1))


def make_llama_tokenizer_folder(root: Path) -> Path:
    """Llama-3 style: BOS from tokenizer.json's post-processor, <|eot_id|> as eos,
    a template with {{ bos_token }}, and generation_config's eos a list."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"], seed=0)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            chat_template=LLAMA_TEMPLATE).save_pretrained(root)
    edit_json(root / "generation_config.json",
              eos_token_id=[tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")])
    return root


def make_qwen_tokenizer_folder(root: Path) -> Path:
    """Qwen2.5 style: no BOS (add_bos_token false), <|im_end|> eos, ChatML template
    with a default system prompt in tokenizer_config.json."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], seed=1, qwen=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=QWEN_TEMPLATE).save_pretrained(root)
    (root / "chat_template.jinja").unlink(missing_ok=True)  # the template in tokenizer_config.json instead
    edit_json(root / "tokenizer_config.json", chat_template=QWEN_TEMPLATE, add_bos_token=False, bos_token=None)
    edit_json(root / "generation_config.json",
              eos_token_id=[tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")])
    return root


def make_vocab_merges_folder(root: Path) -> Path:
    """Only vocab.json + merges.txt (the last resort: torchtune's qwen2 tokenizer)."""
    train_bpe([], seed=2, qwen=True).model.save(str(root))
    return root


def write_tiktoken_file(path: Path) -> Path:
    """A tiktoken rank file (base64 token, rank): the 256 bytes and 4 merges."""
    import base64

    merges = [b"ka", b"lo", b"mi", b"kalo"]
    tokens = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def transformers_tokenizer(folder: Path):
    """transformers' tokenizer for ``folder``: the reference the tests compare with."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# --- folders as the Hub has them: model, tokenizer and chat template together ---------

HUB_VOCAB = 512  # room for the ~500-token BPE the tokenizer folders train
# variant of VARIANTS -> the tokenizer folder that goes with it
HUB_TOKENIZERS = {
    "llama-theta": "llama", "llama3-factor16": "llama", "mistral": "llama", "qwen2": "qwen",
    "gemma": "llama", "gemma2": "llama", "phi3": "llama",
}
_TOKENIZER_FOLDERS = {"llama": make_llama_tokenizer_folder, "qwen": make_qwen_tokenizer_folder}


def make_hub_folder(variant: str, root: Path) -> Path:
    """``VARIANTS[variant]`` with ``HUB_VOCAB`` ids, saved in ``root`` next to its tokenizer folder."""
    make_variant_model(variant, vocab_size=HUB_VOCAB).save_pretrained(root)
    return _TOKENIZER_FOLDERS[HUB_TOKENIZERS[variant]](Path(root))


# --- tensor-parallel checkpoints ---------------------------------------------------------

# (family, tied, config overrides): Llama-3-style GQA (4 heads, 2 kv heads, llama3 RoPE
# scaling, untied: the output is sharded), Mistral, Qwen2 (q/k/v biases, tied).
TP_CASES = {
    "llama3": ("llama3_2", False, {}),
    "mistral": ("mistral", False, {}),
    "qwen2": ("qwen2", True, {}),
}
TP_SHARD_BYTES = 60_000  # several files per checkpoint: a layer's q/k/v shards come from two files
TP_VOCAB = 96  # the demo tokenizer's ids fit


def make_tp_folders(root: Path) -> dict[str, Path]:
    """The checkpoints the tensor-parallel tests split across 2 ranks, by name: the
    ``TP_CASES``; "uneven" (vocabulary 97: rows split 49 + 48); "big" (see
    ``make_big_llama``); "wide" (int4 groups of 128 fit a rank's half of o_proj and w2);
    "kv3" and "mlp131" (3 kv heads, an MLP 131 wide: what 2 ranks cannot split)."""
    out = {}
    for name, (family, tied, overrides) in TP_CASES.items():
        out[name] = root / name
        make_hf_model(family, tied=tied, vocab_size=TP_VOCAB, **overrides).save_pretrained(
            out[name], max_shard_size=TP_SHARD_BYTES)
    out["uneven"] = root / "uneven"
    make_hf_model("llama3_2", tied=False, vocab_size=97).save_pretrained(out["uneven"], max_shard_size=TP_SHARD_BYTES)
    out["big"] = make_big_llama(root / "big")
    out["wide"] = root / "wide"
    make_hf_model("llama3_2", tied=False, vocab_size=TP_VOCAB, hidden_size=256, intermediate_size=512,
                  head_dim=64).save_pretrained(out["wide"], max_shard_size=4 * TP_SHARD_BYTES)
    out["kv3"] = root / "kv3"
    make_hf_model("llama3_2", tied=False, num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                  head_dim=8).save_pretrained(out["kv3"])
    out["mlp131"] = root / "mlp131"
    make_hf_model("llama3_2", tied=False, intermediate_size=131).save_pretrained(out["mlp131"])
    return out


# What a rank's load costs whatever the model's size (module state, DTensor bookkeeping,
# the RoPE cache): about 2 MB. The memory test's model must be large next to it.
BIG_LLAMA_MIN_BYTES = 30e6


def make_big_llama(path: Path) -> Path:
    """A Llama of about 40 MB (fp32, 2 safetensors files, untied): heads 8/4, hidden 512.
    Its values do not matter (every weight 0.01), so they are written without a model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, inter, layers, vocab, heads, kv = 512, 1408, 2, 4096, 8, 4
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                tie_word_embeddings=False).save_pretrained(path)
    kv_rows = kv * hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,)})
    names = list(shapes)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: torch.full(shapes[n], 0.01) for n in part}, path / file)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    return path


# --- the shipped demo model ------------------------------------------------------------

# The demo model's greedy continuation: any loading, conversion or RoPE error changes it.
GOLDEN = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen twenty twenty one twenty")
GOLDEN_IDS = [38, 39, 22, 19, 35, 15, 63, 62, 60, 57, 55, 54, 53, 52, 51, 50, 41, 41, 46, 41]
DEMO_PROMPT = [1, 46, 47, 44]  # BOS "one two three", as the recipe tokenizes it
# the demo's tokens for "one two three four five six seven": a real sequence of its data
DEMO_TOKENS = torch.tensor([DEMO_PROMPT + GOLDEN_IDS[:4]])


def load_demo(**kwargs) -> torch.nn.Module:
    """The demo model as its packaged config builds it; ``kwargs`` go to load_model."""
    from omegaconf import OmegaConf

    import leangen
    from leangen.demo import demo_dir
    from leangen.recipe.cli import resolve_config_path

    model = OmegaConf.to_container(OmegaConf.load(resolve_config_path("demo")).model)
    builder = model.pop("_component_")
    model["norm_eps"] = float(model["norm_eps"])  # YAML reads 1e-5 as a string
    return leangen.load_model(builder, demo_dir(), **{**model, **kwargs})


# --- where a tensor's bytes live -----------------------------------------------------

def _file_mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of every file mapping of this process."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end, fields[1], fields[5].strip()))
    return out


def mapped_file(t: torch.Tensor) -> tuple[str, str] | None:
    """(path, permissions) of the file mapping that holds ``t``'s bytes, if any."""
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size() - 1
    for start, end, perms, path in _file_mappings():
        if start <= first and last < end:
            return path, perms
    return None


def run_recipe(capsys, *argv: str, recipe=None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a recipe's main (generate unless ``recipe``) on ``argv``."""
    if recipe is None:
        from leangen.generate import main as recipe
    code = recipe(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
