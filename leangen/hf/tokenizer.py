"""A torchtune ``ModelTokenizer`` over a Hugging Face ``tokenizer.json`` folder.

Encoding goes through the ``tokenizers`` library (the same Rust code transformers
uses), so ``tokenizer(text)`` in transformers and ``encode`` here give the same ids:

- BOS/EOS are what ``tokenizer.json``'s post-processor adds. transformers 5 ignores
  ``add_bos_token``/``add_eos_token`` of ``tokenizer_config.json`` when there is a
  ``tokenizer.json`` (it pops them in ``from_pretrained``), and so does leangen;
- ``bos``/``eos``/``pad`` are the named tokens of ``tokenizer_config.json``, with
  ``special_tokens_map.json`` merged in when the config lists no added tokens;
- stop tokens are the eos plus every ``eos_token_id`` of ``generation_config.json``;
- chat messages are rendered with the folder's chat template and encoded without
  adding special tokens again (``leangen.hf.chat_template``).

``tokenizer_from_folder`` picks the tokenizer of a model folder (``tokenizer: auto``):
``tokenizer.json`` with this class, else ``tokenizer.model`` (sentencepiece or
tiktoken, told apart by content) with torchtune's tokenizer for the family, else
``vocab.json`` + ``merges.txt`` with torchtune's qwen2 tokenizer.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from leangen.checkpoint import read_config
from leangen.checkpoint import read_json as read_folder_json
from leangen.errors import ConfigError
from leangen.hf.chat_template import SPECIAL_TOKEN_NAMES, ChatTemplate

__all__ = ["HFTokenizer", "tokenizer_from_folder", "tokenizer_model_kind", "read_json", "generation_eos_ids"]


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} when there is no such file."""
    return read_folder_json(path) or {}


def generation_eos_ids(folder: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (an int or a list) as a list."""
    eos = read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) for i in ids):
        raise ConfigError(f"{folder / 'generation_config.json'}: eos_token_id must be an int or a list of ints.")
    return ids


def _token_string(value: Any) -> Optional[str]:
    """A token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``special_tokens_map.json``,
    ``generation_config.json``, ``chat_template.jinja``) as a torchtune ModelTokenizer."""

    def __init__(self, folder: str | Path, *, max_seq_len: Optional[int] = None):
        from tokenizers import AddedToken, Tokenizer

        self.folder = Path(folder)
        self.max_seq_len = max_seq_len
        try:
            self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a plain Exception
            raise ConfigError(f"{self.folder / 'tokenizer.json'}: cannot be read by `tokenizers` ({e}).") from e
        config = read_json(self.folder / "tokenizer_config.json")
        named = {k: config.get(k) for k in SPECIAL_TOKEN_NAMES}
        if "added_tokens_decoder" not in config:  # transformers' legacy merge
            named.update({k: v for k, v in read_json(self.folder / "special_tokens_map.json").items()
                          if k in SPECIAL_TOKEN_NAMES})
        self.special_tokens: dict[str, str] = {k: s for k, v in named.items() if (s := _token_string(v))}
        # transformers adds a named special token the vocabulary lacks
        missing = [s for s in self.special_tokens.values() if self._tok.token_to_id(s) is None]
        if missing:
            self._tok.add_special_tokens([AddedToken(s, special=True) for s in dict.fromkeys(missing)])

        self.bos_id = self._id("bos_token")
        self.eos_id = self._id("eos_token")
        pad = self._id("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        if self.eos_id is None and not generation_eos_ids(self.folder):
            raise ConfigError(f"{self.folder}: no eos_token in tokenizer_config.json and no eos_token_id in "
                              "generation_config.json, so generation could not stop.")
        self.stop_tokens = sorted(set(generation_eos_ids(self.folder)) | {i for i in [self.eos_id] if i is not None})

        # transformers 5 ignores add_bos_token/add_eos_token of tokenizer_config.json when
        # there is a tokenizer.json: its post-processor alone decides
        self.add_bos_default, self.add_eos_default = self._post_processor_adds()
        self.chat_template = ChatTemplate.from_folder(self.folder, config, self.special_tokens)

    def _id(self, name: str) -> Optional[int]:
        token = self.special_tokens.get(name)
        return None if token is None else self._tok.token_to_id(token)

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """Whether ``tokenizer(text)`` starts with BOS / ends with EOS."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        return (self.bos_id is not None and self.bos_id in full[:start],
                self.eos_id is not None and self.eos_id in full[start + len(plain):])

    # -- BaseTokenizer ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """The text's ids (no post-processor), with BOS/EOS as asked. transformers'
        ``tokenizer(text)`` is ``encode(text, add_bos=t.add_bos_default, add_eos=t.add_eos_default)``."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``, as transformers' ``decode(..., skip_special_tokens=True)``
        (which ignores ``clean_up_tokenization_spaces`` for BPE models)."""
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # -- ModelTokenizer ---------------------------------------------------------

    def tokenize_messages(self, messages: list, *, add_end_tokens: bool = True) -> tuple[list[int], list[bool]]:
        """A conversation of torchtune Messages as the model's chat template writes it.

        ``add_end_tokens=False`` (inference) drops a final empty assistant turn and
        ends with the assistant's header (``add_generation_prompt``). The mask is
        all False: which template tokens belong to which message is not tracked.
        """
        if self.chat_template is None:
            raise ConfigError(f"{self.folder} has no chat template (tokenizer_config.json 'chat_template' or "
                              "chat_template.jinja): give the prompt as a string.")
        turns = [{"role": m.role, "content": m.text_content} for m in messages]
        generation_prompt = not add_end_tokens
        if generation_prompt and turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]
        text = self.chat_template.render(turns, add_generation_prompt=generation_prompt)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.max_seq_len is not None:
            ids = ids[: self.max_seq_len]
        return ids, [False] * len(ids)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        tokens, mask = self.tokenize_messages(sample["messages"], add_end_tokens=not inference)
        return {**sample, "tokens": tokens, "mask": mask}



# -- a model folder's tokenizer (tokenizer: auto) ------------------------------------

# torchtune's tokenizer per (tokenizer.model kind, config.json model_type); None: any family.
TORCHTUNE_TOKENIZERS: dict[tuple[str, Optional[str]], str] = {
    ("sentencepiece", None): "torchtune.models.llama2.llama2_tokenizer",
    ("sentencepiece", "mistral"): "torchtune.models.mistral.mistral_tokenizer",
    ("sentencepiece", "gemma"): "torchtune.models.gemma.gemma_tokenizer",
    ("sentencepiece", "gemma2"): "torchtune.models.gemma.gemma_tokenizer",
    ("sentencepiece", "phi3"): "torchtune.models.phi3.phi3_mini_tokenizer",
    ("tiktoken", None): "torchtune.models.llama3.llama3_tokenizer",
}


def tokenizer_model_kind(path: Path) -> str:
    """"sentencepiece" (a protobuf) or "tiktoken" (base64 "token rank" lines) from the
    content of a ``tokenizer.model``."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0].split(b" ")
    if len(first) == 2 and first[1].strip().isdigit():
        try:
            base64.b64decode(first[0], validate=True)
            return "tiktoken"
        except ValueError:
            pass
    if head[:1] == b"\x0a":  # protobuf field 1 (pieces), length-delimited
        return "sentencepiece"
    raise ConfigError(f"{path}: neither a sentencepiece model nor a tiktoken rank file.")


def _from_tokenizer_json(folder: Path, max_seq_len: Optional[int]):
    return HFTokenizer(folder, max_seq_len=max_seq_len)


def _from_tokenizer_model(folder: Path, max_seq_len: Optional[int]):
    from torchtune.config._utils import _get_component_from_path

    path = folder / "tokenizer.model"
    kind = tokenizer_model_kind(path)
    family = (read_config(folder) or {}).get("model_type")
    builder = TORCHTUNE_TOKENIZERS.get((kind, family), TORCHTUNE_TOKENIZERS[(kind, None)])
    try:
        tokenizer = _get_component_from_path(builder)(str(path), max_seq_len=max_seq_len)
    except Exception as e:  # sentencepiece/tiktoken raise their own errors on a bad file
        raise ConfigError(f"{path}: {builder} cannot read it ({e}).") from e
    return _with_folder_settings(tokenizer, folder)


def _from_vocab_merges(folder: Path, max_seq_len: Optional[int]):
    from torchtune.models.qwen2 import qwen2_tokenizer

    warnings.warn(f"{folder} has no tokenizer.json: using vocab.json + merges.txt with torchtune's qwen2 "
                  "tokenizer, which splits whitespace and newline runs differently from tokenizer.json.",
                  stacklevel=3)
    tokenizer = qwen2_tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), max_seq_len=max_seq_len)
    return _with_folder_settings(tokenizer, folder)


def _with_folder_settings(tokenizer, folder: Path):
    """A torchtune tokenizer with the folder's stop tokens and BOS default."""
    tokenizer.stop_tokens = sorted(set(tokenizer.stop_tokens) | set(generation_eos_ids(folder)))
    tokenizer.add_bos_default = read_json(folder / "tokenizer_config.json").get("add_bos_token", True) is not False
    return tokenizer


# The tokenizer files of a model folder, most faithful first: the first present is used.
TOKENIZER_FILES: dict[tuple[str, ...], Callable[[Path, Optional[int]], Any]] = {
    ("tokenizer.json",): _from_tokenizer_json,
    ("tokenizer.model",): _from_tokenizer_model,
    ("vocab.json", "merges.txt"): _from_vocab_merges,
}


def tokenizer_from_folder(folder: str | Path, *, max_seq_len: Optional[int] = None):
    """The tokenizer a model folder ships, as a torchtune ModelTokenizer with
    ``stop_tokens`` that include generation_config.json's ``eos_token_id``."""
    folder = Path(folder).expanduser()
    for files, build in TOKENIZER_FILES.items():
        if all((folder / f).is_file() for f in files):
            return build(folder, max_seq_len)
    wanted = ", ".join(" + ".join(files) for files in TOKENIZER_FILES)
    raise ConfigError(f"tokenizer: auto found no tokenizer in '{folder}': it needs one of {wanted}.")
