"""Text in and out: prompts to token ids, and generated ids back to text, incrementally."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune.data import Message

from leangen.errors import ConfigError


@dataclass
class Prompt:
    source: Any  # what the user gave: a string, or a list of {role, content} messages
    tokens: list[int]
    raw: bool  # a plain completion (echo the prompt), not a chat turn


def prompts_from_config(cfg: DictConfig, tokenizer) -> list[Prompt]:
    """``prompts_file`` if set, else ``prompt``: a string (raw completion after BOS)
    or ``{system, user}`` through the tokenizer's chat template."""
    if cfg.get("prompts_file"):
        return [tokenize(item, tokenizer) for item in read_prompts_file(Path(cfg.prompts_file))]
    if cfg.get("prompt") is None:
        raise ConfigError("set 'prompt' (a string or {system, user}) or 'prompts_file'.")
    prompt = OmegaConf.to_container(cfg.prompt) if OmegaConf.is_config(cfg.prompt) else cfg.prompt
    if isinstance(prompt, dict):
        if not prompt.get("user"):
            raise ConfigError("prompt.user is empty: give the user's message.")
        prompt = [{"role": r, "content": prompt[r]} for r in ("system", "user") if prompt.get(r)]
    return [tokenize(prompt, tokenizer)]


def read_prompts_file(path: Path) -> list[Any]:
    """A .txt (one prompt a line) or .jsonl ({"prompt": str} or {"messages": [...]}) file."""
    if not path.is_file():
        raise ConfigError(f"prompts_file: '{path}' does not exist.")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    items = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            items.append(record["prompt"] if "prompt" in record else record["messages"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{path}:{number}: each line must be JSON with 'prompt' (a string) or "
                f"'messages' (a list of {{role, content}}): {e}"
            ) from e
    if not items:
        raise ConfigError(f"prompts_file: '{path}' holds no prompts.")
    return items


def tokenize(prompt: str | list[dict], tokenizer) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(prompt, tokenizer.encode(prompt, add_bos=True, add_eos=False), raw=True)
    messages = [Message(role=m["role"], content=m["content"]) for m in prompt]
    if messages[-1].role != "assistant":  # an empty assistant turn starts the reply
        messages.append(Message(role="assistant", content=""))
    tokens = tokenizer({"messages": messages}, inference=True)["tokens"]
    return Prompt(prompt, tokens, raw=False)


class IncrementalDecoder:
    """Text of the generated ids, decoded with the prompt as context so that
    SentencePiece's leading spaces and multi-byte characters come out right."""

    def __init__(self, tokenizer, prompt_tokens: list[int]):
        self.tokenizer = tokenizer
        self.prompt_tokens = list(prompt_tokens)
        self.prefix = tokenizer.decode(self.prompt_tokens)
        self.shown = 0

    def text(self, generated: list[int]) -> str:
        full = self.tokenizer.decode(self.prompt_tokens + list(generated))
        if full.startswith(self.prefix):
            return full[len(self.prefix):]
        return self.tokenizer.decode(list(generated))

    def new_text(self, generated: list[int]) -> str:
        """What to print now: the text not yet shown, minus an unfinished character."""
        text = self.text(generated).rstrip("\ufffd")
        new, self.shown = text[self.shown:], max(self.shown, len(text))
        return new
