"""A hard memory cap for one child process: a cgroup made under our own.

A virtual-memory ulimit would be wrong here: mmap'd checkpoints reserve address
space without using memory. A cgroup limit counts what is resident (anonymous
memory and page cache charged to the group; clean file pages are reclaimed under
pressure), and the kernel's OOM killer then kills only the capped process.

Both cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``) are handled.
The child joins the group itself before exec'ing the command, so nothing it
allocates escapes the cap.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

_V1_ROOT = Path("/sys/fs/cgroup/memory")
_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
_counter = itertools.count()


class CapUnavailable(RuntimeError):
    """No memory cgroup can be made here; the message says why."""


class MemoryCap:
    """Context manager: ``with MemoryCap(limit) as cap: run_process(argv, cap=cap)``."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.path: Path | None = None
        self.version = 0

    def __enter__(self) -> "MemoryCap":
        parent, self.version = own_memory_cgroup()
        self.path = parent / f"leangen-bench-{os.getpid()}-{next(_counter)}"
        try:
            self.path.mkdir()
            if self.version == 2:
                (self.path / "memory.max").write_text(str(self.limit_bytes))
                _try_write(self.path / "memory.swap.max", "0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        except OSError as e:
            self._remove()
            raise CapUnavailable(f"cannot set a memory limit in {parent}: {e}") from e
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into the group."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def report(self) -> dict:
        peak_file = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        events_file = "memory.events" if self.version == 2 else "memory.oom_control"
        return {
            "limit_bytes": self.limit_bytes,
            "cgroup_version": self.version,
            "peak_bytes": _read_int(self.path / peak_file),
            "oom_kills": _read_field(self.path / events_file, "oom_kill"),
        }

    def _remove(self) -> None:
        if self.path is not None and self.path.exists():
            try:
                self.path.rmdir()
            except OSError:  # a straggler is still inside; the kernel frees it later
                pass


def own_memory_cgroup() -> tuple[Path, int]:
    """The directory of this process's memory cgroup, and the cgroup version."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(",") and _V1_ROOT.is_dir():
            return _V1_ROOT / rel.lstrip("/"), 1
    for line in lines:
        hierarchy, controllers, rel = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            for root in _V2_ROOTS:
                if "memory" in _read_text(root / "cgroup.controllers").split():
                    return root / rel.lstrip("/"), 2
    raise CapUnavailable("no cgroup memory controller is mounted here")


def probe() -> str | None:
    """None if a capped child can be made here, else the reason it cannot."""
    try:
        with MemoryCap(1 << 30):
            return None
    except (CapUnavailable, OSError) as e:
        return str(e)


def _try_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:  # no swap accounting: nothing to limit
        pass


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int | None:
    text = _read_text(path).strip()
    return int(text) if text.isdigit() else None


def _read_field(path: Path, key: str) -> int | None:
    for line in _read_text(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None
