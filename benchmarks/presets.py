"""Model shapes the benchmark can write: the real models' HF configs, random weights.

Each preset names the HF ``config.json`` (what transformers and leangen read), the
torchtune builder (what torchtune and leangen build), torchtune's checkpointer
``model_type``, and which kind of tokenizer to make.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    hf_config: dict[str, Any]
    builder: str
    builder_kwargs: dict[str, Any] = field(default_factory=dict)
    torchtune_model_type: str = "LLAMA2"
    tokenizer_kind: str = "sentencepiece"   # or "tiktoken_llama3"
    tokenizer_builder: str = "torchtune.models.llama2.llama2_tokenizer"
    max_shard_bytes: int = 2 << 30
    # True where some system is expected to exceed this machine's RAM: every system
    # then runs under a hard memory cap, so that one fails alone.
    needs_memory_cap: bool = False

    @property
    def vocab_size(self) -> int:
        return self.hf_config["vocab_size"]


_LLAMA_COMMON = {
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

# A llama2-shaped toy: big enough to exercise GQA and sharding, small enough for CI.
SMALL = Preset(
    name="small",
    hf_config={
        **_LLAMA_COMMON,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 1024,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    builder="torchtune.models.llama2.llama2",
    builder_kwargs={
        "vocab_size": 1024, "num_layers": 4, "num_heads": 8, "num_kv_heads": 4,
        "embed_dim": 256, "intermediate_dim": 704, "max_seq_len": 2048,
        "norm_eps": 1e-5, "rope_base": 10000.0,
    },
    # Two shards even for the toy, so the sharded path is what CI exercises.
    max_shard_bytes=2 << 20,
)

# meta-llama/Llama-3.2-1B's config.json.
LLAMA3_2_1B = Preset(
    name="llama3_2_1b",
    hf_config={
        **_LLAMA_COMMON,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    builder="torchtune.models.llama3_2.llama3_2_1b",
    torchtune_model_type="LLAMA3_2",
    tokenizer_kind="tiktoken_llama3",
    tokenizer_builder="torchtune.models.llama3.llama3_tokenizer",
)

# mistralai/Mistral-7B-v0.1's config.json.
MISTRAL7B = Preset(
    name="mistral7b",
    hf_config={
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    builder="torchtune.models.mistral.mistral_7b",
    torchtune_model_type="MISTRAL",
    tokenizer_builder="torchtune.models.mistral.mistral_tokenizer",
    max_shard_bytes=4 << 30,
    needs_memory_cap=True,
)

PRESETS = {p.name: p for p in (SMALL, LLAMA3_2_1B, MISTRAL7B)}
