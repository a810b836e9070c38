"""Stage: materialise non-persistent buffers on the target device, then check for meta.

torchtune's convention is that a module with a ``rope_init()`` method (re)builds its
RoPE ``theta`` and ``cache`` buffers there; ``Llama3ScaledRoPE`` registers nothing at
all while on meta, so leangen looks for the method, not for meta buffers.

``positions`` sizes the RoPE cache to what a run needs (e.g. the KV-cache length)
rather than the builder's ``max_seq_len`` (131072 for Llama 3: 32 MiB of cache per
head_dim of 64), and installs a check that a forward needs no more.
"""

from __future__ import annotations

from itertools import chain

import torch

from leangen.errors import ConfigError, LeangenError


def materialise_buffers(model: torch.nn.Module, device: torch.device, *,
                        positions: int | None = None) -> None:
    ropes = [m for m in model.modules() if callable(getattr(m, "rope_init", None))]
    if positions is not None:
        positions = _cache_positions(positions, ropes)
    # Inside the device context every torch.arange/empty in rope_init lands on
    # `device`; rope_init computes in fp32 itself, exactly as an eager build does.
    with torch.device(device):
        for module in ropes:  # a RoPE shared by all layers comes once
            if positions is not None:
                # torchtune's rope_init() takes no length: it builds the cache for
                # self.max_seq_len positions, so lower that first. Each position's row is
                # computed from that position alone: the rows kept equal the full cache's.
                module.max_seq_len = positions
            module.rope_init()
    if positions is not None:
        model.register_forward_pre_hook(_position_check(positions), with_kwargs=True)


def _cache_positions(positions: int, ropes: list[torch.nn.Module]) -> int:
    """At most the model's own max_seq_len: asking for more (a recipe sizing the cache
    before it knows the model) keeps the full cache, and the recipe's own length check
    then says what is too long."""
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ConfigError(f"rope_positions={positions!r} must be a whole number, at least 1.")
    most = min((m.max_seq_len for m in ropes if hasattr(m, "max_seq_len")), default=positions)
    return min(positions, most)


def _position_check(positions: int):
    """A forward pre-hook on the decoder: the positions it is asked for are in the cache."""
    def check(module, args, kwargs):
        if torch.compiler.is_compiling():  # a data-dependent check would break the graph
            return None
        input_pos = kwargs.get("input_pos")
        if input_pos is not None:
            needed = int(input_pos.max()) + 1 if input_pos.numel() else 0
        else:
            tokens = args[0] if args else kwargs.get("tokens")
            needed = tokens.size(1)
        if needed > positions:
            raise LeangenError(
                f"this forward needs {needed} RoPE positions, but the model was loaded with "
                f"rope_positions={positions}. Load it with rope_positions={needed} or more.")
        return None
    return check


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
