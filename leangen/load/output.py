"""The output projection of a torchtune decoder: where it is, and whether it is tied.

A tied output is torchtune's ``TiedLinear``, which is not an ``nn.Module``: it is a
plain attribute, invisible to ``named_children``/``named_modules``/``parameters``, so
every stage that treats "each Linear" (quantize, prepack, the quantized cache, the
tensor-parallel plan, the config.json check) finds it here. An output may also sit
inside an ``OutputWrapper`` that post-processes the logits (Gemma 2's soft-capping):
the projection is then the wrapper's ``projection`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class OutputWrapper(nn.Module):
    """An output that runs ``self.projection`` and then changes the logits. While the
    projection is a ``TiedLinear`` it is a plain attribute (no parameters of its own);
    a Linear put there (a quantized or packed copy) is a child module like any other."""

    projection: object


@dataclass(frozen=True)
class OutputProjection:
    """The output projection: attribute ``attr`` of ``owner``, ``name`` from the root."""

    owner: nn.Module
    attr: str
    name: str

    @property
    def module(self):
        return getattr(self.owner, self.attr)

    @property
    def tied(self) -> bool:
        """Still the embedding's weight (torchtune's ``TiedLinear``), not a copy of its own."""
        from torchtune.modules import TiedLinear

        return isinstance(self.module, TiedLinear)

    @property
    def weight(self) -> torch.Tensor:
        module = self.module
        return module.tied_module.weight if self.tied else module.weight

    def replace(self, linear: nn.Module) -> None:
        """Put ``linear`` (e.g. a quantized copy) where the projection was."""
        setattr(self.owner, self.attr, linear)


def output_projection(model: nn.Module) -> OutputProjection | None:
    """``model.output``, or the projection inside an ``OutputWrapper`` there; None for a
    model without an ``output`` (not a torchtune decoder)."""
    if getattr(model, "output", None) is None:
        return None
    found = OutputProjection(model, "output", "output")
    while isinstance(found.module, OutputWrapper):
        found = OutputProjection(found.module, "projection", f"{found.name}.projection")
    return found
