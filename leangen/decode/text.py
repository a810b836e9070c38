"""Text in and out: prompts to token ids, and generated ids back to text, incrementally."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from torchtune.data import Message, Role

from leangen.errors import ConfigError


@dataclass
class Prompt:
    source: Any  # what the user gave: a string, or a list of {role, content} messages
    tokens: list[int]
    raw: bool  # a plain completion (echo the prompt), not a chat turn


def prompts_for(prompt: str | dict | None, tokenizer, *, prompts_file: str | None = None,
                add_bos: str | bool = "auto") -> list[Prompt]:
    """``prompts_file`` if set, else ``prompt``: a string (raw completion, with BOS as
    ``add_bos`` says) or ``{system, user}`` through the tokenizer's chat template."""
    if prompts_file:
        return [tokenize(item, tokenizer, add_bos=add_bos) for item in read_prompts_file(Path(prompts_file))]
    if prompt is None:
        raise ConfigError("set 'prompt' (a string or {system, user}) or 'prompts_file'.")
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - {"system", "user"})
        if unknown:
            raise ConfigError(f"prompt.{unknown[0]}: a chat prompt has only 'system' and 'user'; "
                              "for several turns use prompts_file with 'messages', and for a raw "
                              "text that reads as a mapping, a .txt prompts_file.")
        if not prompt.get("user"):
            raise ConfigError("prompt.user is empty: give the user's message.")
        prompt = [{"role": r, "content": str(prompt[r])} for r in ("system", "user") if prompt.get(r)]
    elif isinstance(prompt, list):
        raise ConfigError("prompt: give a string or {system, user}; for several prompts use prompts_file.")
    else:
        prompt = str(prompt)  # `prompt: 42` in a YAML arrives as an int
    return [tokenize(prompt, tokenizer, add_bos=add_bos)]


def read_prompts_file(path: Path) -> list[Any]:
    """A .txt (one prompt a line) or .jsonl ({"prompt": str} or {"messages": [...]}) file."""
    if not path.is_file():
        raise ConfigError(f"prompts_file: '{path}' does not exist.")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompts_file: '{path}' holds no prompts.")
    if path.suffix != ".jsonl":
        return lines
    return [_jsonl_prompt(line, f"{path}:{number}") for number, line in enumerate(lines, 1)]


def _jsonl_prompt(line: str, where: str) -> str | list[dict]:
    try:
        record = json.loads(line)
        if isinstance(record.get("prompt"), str):
            return record["prompt"]
        messages = record["messages"]
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
            return messages
    except (ValueError, KeyError, TypeError):
        pass
    raise ConfigError(f"{where}: each line must be JSON with 'prompt' (a string) or 'messages' "
                      "(a non-empty list of {\"role\": ..., \"content\": ...}).")


ADD_BOS_SETTINGS = ("auto", True, False)


def resolve_add_bos(setting: str | bool, tokenizer) -> bool:
    """Whether a raw text (a prompt, a perplexity file) starts with BOS.

    ``auto`` is what transformers' ``tokenizer(text)`` does for the model's folder:
    ``tokenizer.add_bos_default`` when the tokenizer has one (``tokenizer: auto`` sets
    it: for tokenizer.json, whether its post-processor adds BOS; for a tokenizer.model,
    ``add_bos_token`` of tokenizer_config.json, else True), and True
    for a torchtune ``_component_`` tokenizer. No BOS when the tokenizer has none.
    """
    if isinstance(setting, str) and setting.lower() in ("true", "false"):  # `add_bos=false` on a command line
        setting = setting.lower() == "true"
    if setting not in ADD_BOS_SETTINGS or (isinstance(setting, int) and not isinstance(setting, bool)):
        raise ConfigError(f"add_bos: '{setting}' is not one of auto, true, false.")
    if getattr(tokenizer, "bos_id", None) is None:
        return False
    return bool(getattr(tokenizer, "add_bos_default", True)) if setting == "auto" else setting


def tokenize(prompt: str | list[dict], tokenizer, *, add_bos: str | bool = "auto") -> Prompt:
    """A raw string (with BOS as ``add_bos`` says, never EOS), or chat messages in the
    tokenizer's chat format, ending with the assistant's header."""
    if isinstance(prompt, str):
        return Prompt(prompt, tokenizer.encode(prompt, add_bos=resolve_add_bos(add_bos, tokenizer), add_eos=False),
                      raw=True)
    unknown = [m["role"] for m in prompt if m["role"] not in get_args(Role)]
    if unknown:  # torchtune's Message does not check its role
        raise ConfigError(f"prompt messages: unknown role '{unknown[0]}'; use one of "
                          f"{', '.join(get_args(Role))}.")
    messages = [Message(role=m["role"], content=m["content"]) for m in prompt]
    if messages[-1].role != "assistant":  # an empty assistant turn starts the reply
        messages.append(Message(role="assistant", content=""))
    tokens = list(tokenizer({"messages": messages}, inference=True)["tokens"])
    if getattr(tokenizer, "chat_template", None) is None:
        # torchtune's own formats: its Qwen2Tokenizer ends even an inference prompt with
        # <|im_end|>, and a chat prompt must end with the assistant's header, never with an
        # end of turn. A model's own template is left exactly as transformers renders it
        # (Phi-3's legitimately ends in <|assistant|>, one of its stop tokens).
        stops = set(tokenizer.stop_tokens)
        while tokens and tokens[-1] in stops:
            tokens.pop()
    return Prompt(prompt, tokens, raw=False)


def decode(tokenizer, ids: list[int]) -> str:
    """``tokenizer.decode(ids)``; an id the tokenizer does not have (sentencepiece raises
    IndexError) means the tokenizer is not the model's: one line, not a traceback."""
    try:
        return tokenizer.decode(ids)
    except (IndexError, KeyError, OverflowError) as e:
        size = getattr(tokenizer, "vocab_size", None)
        known = f" (its vocabulary has {size} ids)" if size else ""
        raise ConfigError(f"the model produced token id {max(ids)}, which the tokenizer does not have{known}: "
                          "the tokenizer is not this model's. Point tokenizer.path at the model's "
                          "own tokenizer files.") from e


class IncrementalDecoder:
    """Text of the generated ids, decoded with the prompt as context so that
    SentencePiece's leading spaces and multi-byte characters come out right."""

    # Enough of the prompt's end to decide spaces and join split characters; decoding
    # the whole prompt on every token would make streaming quadratic in its length.
    CONTEXT_TOKENS = 8

    def __init__(self, tokenizer, prompt_tokens: list[int]):
        self.tokenizer = tokenizer
        self.prompt_tokens = list(prompt_tokens)[-self.CONTEXT_TOKENS:]
        self.prefix = decode(tokenizer, self.prompt_tokens)
        self.shown = 0

    def text(self, generated: list[int]) -> str:
        full = decode(self.tokenizer, self.prompt_tokens + list(generated))
        if full.startswith(self.prefix):
            return full[len(self.prefix):]
        return decode(self.tokenizer, list(generated))

    def new_text(self, generated: list[int]) -> str:
        """What to print now: the text not yet shown, minus an unfinished character."""
        text = self.text(generated).rstrip("\ufffd")
        new, self.shown = text[self.shown:], max(self.shown, len(text))
        return new
