"""What both recipes do before anything else: find their ranks, claim a device, start
the process group under torchrun, and set the CPU threads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from leangen.errors import ConfigError
from leangen.load.device import resolve_device
from leangen.parallel.ranks import Ranks, rank_device, ranks_from_env, start


@dataclass(frozen=True)
class Placement:
    """Where a recipe runs: its ranks, this rank's device, and the CPU threads in use."""

    ranks: Ranks
    device: torch.device
    threads: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Placement":
        """From ``device`` and ``threads``; under torchrun each rank takes its own GPU
        (``auto`` and a bare ``cuda`` mean ``cuda:LOCAL_RANK``) and joins the group."""
        ranks = ranks_from_env()  # one process unless torchrun started several
        device = resolve_device(rank_device(cfg.device, ranks))
        ranks = start(device, ranks)
        return cls(ranks, device, set_threads(cfg.threads))


def set_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads when the config asks; returns the number in use.

    On a machine busy with other work, fewer threads than cores avoids OpenMP workers
    spinning against the other job (docs/performance.md#threads-and-busy-machines)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads={threads}: give at least 1, or null for torch's choice.")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
