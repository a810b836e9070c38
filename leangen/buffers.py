"""Stage: materialise non-persistent buffers on the target device, then check for meta.

torchtune's convention is that a module with a ``rope_init()`` method (re)builds its
RoPE ``theta`` and ``cache`` buffers there; ``Llama3ScaledRoPE`` registers nothing at
all while on meta, so leangen looks for the method, not for meta buffers.
"""

from __future__ import annotations

from itertools import chain

import torch

from leangen.errors import LeangenError


def materialise_buffers(model: torch.nn.Module, device: torch.device) -> None:
    # Inside the device context every torch.arange/empty in rope_init lands on
    # `device`; rope_init computes in fp32 itself, exactly as an eager build does.
    with torch.device(device):
        for module in model.modules():  # a RoPE shared by all layers comes once
            if callable(getattr(module, "rope_init", None)):
                module.rope_init()


def check_no_meta(model: torch.nn.Module) -> None:
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            owner, _, attr = name.rpartition(".")
            module = type(model.get_submodule(owner)).__name__
            raise LeangenError(
                f"'{attr}' of module '{owner or 'model'}' ({module}) is still on the meta "
                "device after loading: leangen rebuilds buffers only through rope_init(). "
                "Please report this model."
            )
