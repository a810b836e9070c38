"""Tokenizer files made locally, so no download is ever needed.

Random weights make any vocabulary as good as another; what matters is that the
file loads in torchtune's tokenizer builders, that its size equals the model's
vocabulary (a larger id would fail to decode), and that the prompt encodes to a
realistic number of tokens.
"""

from __future__ import annotations

import base64
import itertools
import random
import string
from pathlib import Path
from typing import Iterator

from benchmarks.presets import Preset

TOKENIZER_FILE = "tokenizer.model"

# English words for the prompt and the corpus, so the prompt tokenizes into word pieces.
_WORDS = (
    "the of and to in is was for on that with as by at from it his an were are which be "
    "this has had not but its they their one first also new after two been who other time "
    "year city during when some more these over most many may into only world would about "
    "river mountain valley north south east west small large old early late long short "
    "road bridge station market school church garden house village town farm harbour "
    "morning evening winter summer spring autumn weather rain snow wind light water stone"
).split()
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"
_CORPUS_SEED = 0

# Llama 3's tiktoken file has 128000 regular ranks; the 256 special tokens follow.
_LLAMA3_REGULAR_RANKS = 128000


def write_tokenizer(preset: Preset, path: Path) -> None:
    if preset.tokenizer_kind == "sentencepiece":
        train_sentencepiece(path, preset.vocab_size)
    elif preset.tokenizer_kind == "tiktoken_llama3":
        write_tiktoken_ranks(path, _LLAMA3_REGULAR_RANKS)
    else:
        raise ValueError(f"unknown tokenizer kind {preset.tokenizer_kind!r}")


def train_sentencepiece(path: Path, vocab_size: int) -> None:
    """A BPE model like Llama 2's and Mistral's (byte fallback, <unk>=0, <s>=1, </s>=2)."""
    import sentencepiece as spm

    # Enough distinct sentences that BPE can reach exactly ``vocab_size`` pieces.
    sentences = max(5_000, vocab_size * 3)
    prefix = path.with_suffix("")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(sentences), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    prefix.with_suffix(".vocab").unlink()
    if prefix.with_suffix(".model") != path:
        prefix.with_suffix(".model").rename(path)


def write_tiktoken_ranks(path: Path, n_ranks: int) -> None:
    """``n_ranks`` distinct byte strings in tiktoken's ``base64 rank`` format.

    All 256 bytes come first (tiktoken needs them to encode anything), then printable
    pairs, then lowercase/space triples and quadruples; every longer string's prefix
    precedes it, so BPE can reach each one by merges.
    """
    lines = []
    for rank, token in enumerate(itertools.islice(_byte_strings(), n_ranks)):
        lines.append(f"{base64.b64encode(token).decode()} {rank}")
    if len(lines) != n_ranks:
        raise ValueError(f"only {len(lines)} byte strings available, {n_ranks} asked")
    path.write_text("\n".join(lines) + "\n")


def _byte_strings() -> Iterator[bytes]:
    yield from (bytes([b]) for b in range(256))
    printable = [c.encode() for c in string.printable[:95]]
    yield from (a + b for a, b in itertools.product(printable, repeat=2))
    letters = [c.encode() for c in " " + string.ascii_lowercase]
    for n in (3, 4, 5):
        yield from (b"".join(t) for t in itertools.product(letters, repeat=n))


def _corpus(n_sentences: int) -> Iterator[str]:
    rng = random.Random(_CORPUS_SEED)
    syllables = [c + v + e for c in _CONSONANTS for v in _VOWELS for e in ("", "n", "r", "s")]
    # Invented words give BPE enough distinct pairs to fill a 32000-piece vocabulary.
    invented = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(60_000)]
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) if rng.random() < 0.5 else rng.choice(invented)
                 for _ in range(rng.randint(5, 15))]
        yield " ".join(words).capitalize() + rng.choice(".,;!?")
