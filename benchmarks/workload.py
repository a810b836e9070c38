"""What every system is asked to do: one prompt, greedy, a fixed number of new tokens.

All systems get the same prompt tokens. torchtune's generate recipe only takes a
chat prompt (``{system, user}`` through the tokenizer's template), so that is the
form used everywhere: leangen gets the same ``prompt:`` block and the same
tokenizer block, and transformers gets the token ids the runner computed with the
same torchtune tokenizer call the recipe makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.presets import Preset
from benchmarks.tokenizer_files import TOKENIZER_FILE

PROMPT = (
    "In the early morning the old road from the village crossed the river at a stone "
    "bridge, and the market town on the south bank was still quiet. Describe the town "
    "as the first light reaches the harbour."
)
DTYPE = "bf16"
SEED = 1234


@dataclass
class Workload:
    preset: Preset
    checkpoint_dir: Path
    work_dir: Path           # generated configs and per-run outputs
    new_tokens: int
    prompt_text: str = PROMPT
    prompt_tokens: list[int] | None = None
    tokenizer: Any = None    # the torchtune tokenizer, for decoding checks
    cache_dir: Path | None = None  # where derived files (GGUF) are cached
    threads: int = 1         # torch's intra-op threads; llama.cpp is given the same number
    gguf_kinds: list[str] = field(default_factory=list)  # the llama.cpp files this run needs
    device: str = "cpu"      # where leangen, torchtune and transformers run (cuda_checks.py: cuda)

    @property
    def tokenizer_block(self) -> dict:
        # prompt_template null: a raw user turn, identical in every system.
        return {
            "_component_": self.preset.tokenizer_builder,
            "path": str(self.checkpoint_dir / TOKENIZER_FILE),
            "max_seq_len": None,
            "prompt_template": None,
        }

    @property
    def model_block(self) -> dict:
        return {"_component_": self.preset.builder, **self.preset.builder_kwargs}

    @property
    def prompt_block(self) -> dict:
        return {"system": None, "user": self.prompt_text}


def tokenize_prompt(workload: Workload) -> None:
    """Fill ``prompt_tokens`` exactly as torchtune's generate recipe computes them."""
    from omegaconf import OmegaConf
    from torchtune import config
    from torchtune.data import Message

    tokenizer = config.instantiate(OmegaConf.create(workload.tokenizer_block))
    messages = [Message(role="user", content=workload.prompt_text),
                Message(role="assistant", content="")]
    workload.prompt_tokens = tokenizer({"messages": messages}, inference=True)["tokens"]
    workload.tokenizer = tokenizer
