"""torchrun's ranks: which process this is, its device, and its process group.

torchrun (and ``tune run --nproc_per_node N``, which is torchrun) starts one process per
rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables. A
recipe calls ``start(device)`` once: without ``WORLD_SIZE > 1`` it is a single process
and nothing is initialised; with it, the process group is created with the device's
backend (gloo on CPU, NCCL on CUDA) and a timeout, so a rank whose peer died exits
instead of waiting forever. Only rank 0 prints and writes files (``Ranks.is_main``).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

from leangen.errors import ConfigError, LeangenError

# The collective backend for each device type leangen runs tensor- or data-parallel on.
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}

# How long a collective waits for a peer before failing; a rank that died (its error
# is printed by that rank) then ends the others. torchrun also stops the survivors when
# one worker exits with an error, so this bounds the cases torchrun cannot see (a rank
# stuck rather than dead, a peer on another node).
DEFAULT_TIMEOUT = timedelta(minutes=10)
TIMEOUT_ENV = "LEANGEN_DIST_TIMEOUT_S"

# Whether start() made the process group: stop() leaves alone one that the caller made
# (a script that runs several recipes in one torchrun job keeps its group).
_started = False


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints text and the summary and writes output files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    """The ranks torchrun set in the environment; one process when it did not."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); launch with torchrun.") from e


def rank_device(device: str | torch.device, ranks: Ranks) -> str | torch.device:
    """Each rank its own GPU: ``auto`` and a bare ``cuda`` mean ``cuda:LOCAL_RANK``."""
    if not ranks.distributed:
        return device
    if device == "auto":
        from leangen.load.device import auto_device

        device = auto_device().type
    if str(device) == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def start(device: torch.device, ranks: Ranks | None = None) -> Ranks:
    """Initialise the process group for ``device`` when torchrun started several ranks."""
    import torch.distributed as dist

    ranks = ranks or ranks_from_env()
    if not ranks.distributed or dist.is_initialized():
        return ranks
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise ConfigError(f"device '{device}' cannot run on several ranks: use "
                          f"{' or '.join(BACKENDS)} (backends {', '.join(BACKENDS.values())}).")
    if backend == "nccl":
        _check_gpus(ranks)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=_timeout(), rank=ranks.rank, world_size=ranks.world_size)
    global _started
    _started = True
    return ranks


def _check_gpus(ranks: Ranks) -> None:
    if not torch.cuda.is_available():
        raise LeangenError(f"device cuda with {ranks.world_size} ranks needs NCCL and GPUs, but this "
                           f"torch ({torch.__version__}) sees no GPU. Use device: cpu (gloo).")
    if ranks.local_rank >= torch.cuda.device_count():
        raise LeangenError(f"rank {ranks.rank} wants GPU {ranks.local_rank}, but this machine has "
                           f"{torch.cuda.device_count()}. Use --nproc_per_node {torch.cuda.device_count()} or fewer.")


def _timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        return timedelta(seconds=float(value))
    except ValueError as e:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds.") from e


def stop() -> None:
    """Leave the process group, if ``start`` made it."""
    import torch.distributed as dist

    global _started
    if _started and dist.is_initialized():
        dist.destroy_process_group()
    _started = False


# What gloo and NCCL say when the rank at the other end of a collective is gone or stuck.
_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
               "collective operation timeout", "NCCL communicator was aborted", "Broken pipe")


def peer_failure(error: BaseException) -> LeangenError | None:
    """A collective that failed because another rank died or hung, as a one-line error;
    None for anything else. torchrun also stops the survivors once a rank has exited."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or isinstance(error, LeangenError):
        return None
    distributed_error = isinstance(error, getattr(dist, "DistError", ()))
    if not distributed_error and not (isinstance(error, RuntimeError)
                                      and any(s in str(error) for s in _PEER_SIGNS)):
        return None
    detail = " ".join(str(error).split())[:300]
    failure = LeangenError(f"a collective with the other ranks failed, so another rank probably failed "
                           f"first (its error is above) or stopped answering ({detail})")
    failure.__cause__ = error
    return failure


def error_prefix() -> str:
    """'rank N: ' in a torchrun job, so that a failure names the rank it happened on."""
    ranks = ranks_from_env()
    return f"rank {ranks.rank}: " if ranks.distributed else ""



def all_gather_object(obj: Any, what: str) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process).

    A monitored barrier comes first, so that when a peer died or did not answer within
    the process group's timeout, rank 0's one-line error (``what`` names the exchange)
    says which rank it was."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    with _peer_errors(what):
        dist.monitored_barrier(_monitor_group(), timeout=_timeout(), wait_all_ranks=True)
        dist.all_gather_object(out, obj)
    return out


# (the default process group, a gloo group over the same ranks): monitored_barrier
# exists on gloo only, so an NCCL job watches its ranks through a gloo side group.
_monitor: tuple[Any, Any] | None = None


def _monitor_group():
    import torch.distributed as dist

    global _monitor
    if dist.get_backend() == "gloo":
        return None
    world = dist.distributed_c10d._get_default_group()
    if _monitor is None or _monitor[0] is not world:  # a new process group since the last
        _monitor = (world, dist.new_group(backend="gloo", timeout=_timeout()))
    return _monitor[1]


_BARRIER_FAILED = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


@contextmanager
def _peer_errors(what: str) -> Iterator[None]:
    """A failed exchange as one line; rank 0 names the ranks that failed or hung."""
    import torch.distributed as dist

    try:
        yield
    except (RuntimeError, dist.DistError) as e:  # gloo/NCCL errors, timeouts included
        within = f"within {_timeout().total_seconds():g} s ({TIMEOUT_ENV})"
        failed = _BARRIER_FAILED.search(str(e))
        if failed:
            ranks = failed.group(1).strip(" ,")
            who = f"rank {ranks}" if "," not in ranks else f"ranks {ranks}"
            raise LeangenError(f"{what}: {who} stopped or did not answer {within}; a rank that "
                               "stopped on an error printed it.") from e
        detail = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split())).split(". ")[0]
        raise LeangenError(f"{what}: another rank stopped or did not answer {within} ({detail}).") from e
