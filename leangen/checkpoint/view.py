"""The lazy, torchtune-named view of a checkpoint: ``open_checkpoint`` and ``load_tensors``."""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator

import torch

from leangen.checkpoint import CheckpointPath, RawCheckpoint, open_raw
from leangen.checkpoint.convert import Entry, Family, Geometry, detect_family, plan, stored_layout
from leangen.errors import ConversionError

# load_tensors' fallbacks for checkpoints that tie the output projection to the embedding.
TIED_ALIASES = {"output.weight": "tok_embeddings.weight"}


class Checkpoint:
    """A checkpoint under torchtune's names. Listing reads only headers; tensors are
    mmap views (transformed only where the format needs it, e.g. q/k rows stored in
    another layout than ``qk_layout``: the one asked for, by default torchtune's for
    the family; ``load_model`` asks for its model's RoPE layout)."""

    def __init__(self, raw: RawCheckpoint, family: Family, geometry: Geometry | None,
                 qk_layout: str | None = None):
        self.raw = raw
        self.family = family
        self.geometry = geometry
        self.stored_layout = stored_layout(raw.names(), family)  # of the q/k rows in the files
        self.entries: dict[str, Entry] = plan(raw.names(), raw.shape, raw.dtype, family, geometry,
                                              qk_layout)

    def with_qk_layout(self, qk_layout: str | None) -> "Checkpoint":
        """The same checkpoint with its q/k rows given in ``qk_layout`` (nothing is reread)."""
        return Checkpoint(self.raw, self.family, self.geometry, qk_layout)

    @property
    def files(self):
        return self.raw.files

    @property
    def config(self) -> dict | None:
        """config.json (HF) or params.json (Meta) beside the files, as read; None if absent."""
        return self.raw.config

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, name: str) -> torch.Size:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def stored(self, name: str) -> torch.Tensor:
        """The stored bytes for ``name`` as a CPU mmap view, before any computing transform."""
        entry = self._entry(name)
        if entry.unavailable:
            raise ConversionError(entry.unavailable)
        rows = entry.transform.rows
        return self.raw.slice(entry.key, 0, *rows) if rows else self.raw.tensor(entry.key)

    def tensor(self, name: str) -> torch.Tensor:
        return self._entry(name).transform.apply(self.stored(name))

    def slice(self, name: str, start: int, stop: int, *, dim: int = 0) -> torch.Tensor:
        """Rows or columns ``[start, stop)`` of one tensor, reading only what they need.

        A permuted q/k tensor is read in whole heads (the permutation stays inside a
        head), so a tensor-parallel rank's head-aligned shard reads exactly its rows.
        """
        entry = self._entry(name)
        size = entry.shape[dim]
        if not 0 <= start <= stop <= size:
            raise IndexError(f"slice [{start}:{stop}] out of range for '{name}' (dim {dim} has {size}).")
        t = entry.transform
        if dim != 0 or not t.permute_heads:  # the permutation moves rows only
            return t.apply(self.stored(name).narrow(dim, start, stop - start))
        head = size // t.permute_heads
        first, last = start // head, -(-stop // head)
        rows = self.stored(name).narrow(0, first * head, (last - first) * head)
        shard = replace(t, rows=None, permute_heads=last - first).apply(rows)
        return shard.narrow(0, start - first * head, stop - start)

    def _entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise ConversionError(
                f"'{name}' is not in the checkpoint ({', '.join(map(str, self.files))}). "
                f"It has {len(self.entries)} tensors, e.g. {', '.join(list(self.entries)[:3])}."
            ) from None


def open_checkpoint(checkpoint: CheckpointPath | RawCheckpoint, *, model_type: str = "auto",
                    geometry: Geometry | None = None, qk_layout: str | None = None) -> Checkpoint:
    """A lazy view of ``checkpoint`` (directory, file, index or list of files, or one
    already opened with ``open_raw``).

    ``model_type`` is 'auto' (config.json, else key names), a torchtune ModelType name
    (llama2, llama3, llama3_2, mistral, qwen2, gemma, gemma2, phi3_mini, phi4) or an HF
    model_type. ``geometry`` defaults to config.json's head counts.

    Tensors come under torchtune's names, with q/k rows in the layout ``qk_layout``
    asks for: "rotate_half" (HF's), "interleaved" (Meta's), or None (the default):
    torchtune's layout for the family, what torchtune's own ``convert_weights`` gives
    (interleaved for Llama, Mistral, Gemma; rotate-half for Qwen2, Phi-3). Rows stored
    in another layout are permuted, a copy. ``load_model`` asks for its model's RoPE
    layout instead, so an HF model's q/k there are the stored rows
    (``Checkpoint.stored_layout``).
    """
    raw = checkpoint if isinstance(checkpoint, RawCheckpoint) else open_raw(checkpoint)
    family = detect_family(model_type, raw.config, raw.names())
    return Checkpoint(raw, family, geometry or Geometry.from_config(raw.config),
                      qk_layout)


def load_tensors(checkpoint: CheckpointPath, names: Iterable[str], *, model_type: str = "auto",
                 qk_layout: str | None = None) -> dict[str, torch.Tensor]:
    """Selected tensors by torchtune name, without building a model or reading others.

    q/k rows come in ``qk_layout`` (as in ``open_checkpoint``): by default torchtune's
    layout for the family, as torchtune's converters give them, which for an HF Llama
    is not the rotate-half rows of ``load_model``'s model (pass "rotate_half" for those).
    """
    view = open_checkpoint(checkpoint, model_type=model_type, qk_layout=qk_layout)
    return {name: view.tensor(_tied_fallback(view, name)) for name in names}


def _tied_fallback(view: Checkpoint, name: str) -> str:
    if name not in view and TIED_ALIASES.get(name) in view:
        return TIED_ALIASES[name]
    return name
