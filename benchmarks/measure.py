"""Run one command in a fresh process and measure it from outside.

Memory comes from polling ``/proc/PID/status`` of the process and its descendants
(every ``POLL_SECONDS``): peak VmRSS and peak RssAnon, the latter being what a
mmap'd loader does not need. Output is read in raw chunks, each stamped on
arrival, so a token streamed without a newline still gets its time.

The machine is shared and has few cores, so other work skews timings badly (a
2-thread matmul waits for its slowest thread). Each run therefore waits for the
machine to be idle first, and reports the CPU share others used while it ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.memcap import MemoryCap

POLL_SECONDS = 0.02
_TICKS = os.sysconf("SC_CLK_TCK")
# "Idle": others use less than this share of all cores, over IDLE_SECONDS in a row.
IDLE_SHARE = 0.15
IDLE_SECONDS = 3


@dataclass
class Line:
    seconds: float  # since spawn, when the line's last chunk arrived
    stream: str     # "stdout" or "stderr"
    text: str


@dataclass
class ProcessRun:
    argv: list[str]
    returncode: int
    wall_seconds: float
    spawn_unix: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    stdout: str
    stderr: str
    lines: list[Line]
    first_stdout_seconds: float | None
    timed_out: bool = False
    cap: dict | None = field(default=None)  # cgroup limit, peak and OOM kills, when capped
    background_cpu_share: float | None = None  # of all cores, used by other processes
    idle_wait_seconds: float = 0.0

    def find_line(self, needle: str) -> Line | None:
        return next((line for line in self.lines if needle in line.text), None)


def run_process(argv: list[str], *, cwd: Path | None = None, env: dict | None = None,
                timeout: float = 3600, cap: MemoryCap | None = None,
                idle_wait: float = 300) -> ProcessRun:
    """Run ``argv`` to completion, after waiting up to ``idle_wait`` s for an idle machine."""
    command = cap.wrap(argv) if cap else argv
    waited = wait_for_idle(idle_wait) if idle_wait > 0 else 0.0
    busy_before, own_before = _machine_busy_ticks(), _own_ticks()
    spawn = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    chunks: dict[str, list[tuple[float, bytes]]] = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=_read_chunks, args=(pipe, start, chunks[name]), daemon=True)
               for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    poller = _MemoryPoller(proc.pid)
    for t in readers:
        t.start()
    poller.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.perf_counter() - start
    others = (_machine_busy_ticks() - busy_before - (_own_ticks() - own_before)
              - poller.cpu_ticks) / _TICKS
    poller.stop()
    for t in readers:
        t.join()
    lines = _lines(chunks)
    return ProcessRun(
        argv=argv, returncode=proc.returncode, wall_seconds=wall, spawn_unix=spawn,
        peak_rss_bytes=poller.peak_rss, peak_anon_bytes=poller.peak_anon,
        stdout=_text(chunks["stdout"]), stderr=_text(chunks["stderr"]), lines=lines,
        first_stdout_seconds=chunks["stdout"][0][0] if chunks["stdout"] else None,
        timed_out=timed_out, cap=cap.report() if cap else None,
        background_cpu_share=max(others, 0.0) / (wall * os.cpu_count()), idle_wait_seconds=waited,
    )


def wait_for_idle(max_seconds: float = 300) -> float:
    """Block until others leave the CPUs mostly idle (or ``max_seconds``); seconds waited."""
    start = time.perf_counter()
    quiet = 0
    while quiet < IDLE_SECONDS and time.perf_counter() - start < max_seconds:
        busy, own = _machine_busy_ticks(), _own_ticks()
        time.sleep(1)
        share = (_machine_busy_ticks() - busy - (_own_ticks() - own)) / _TICKS / os.cpu_count()
        quiet = quiet + 1 if share < IDLE_SHARE else 0
    return time.perf_counter() - start


def _machine_busy_ticks() -> int:
    """All CPUs' non-idle time so far, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _own_ticks() -> int:
    """This runner's CPU time (its polling and reader threads), in clock ticks."""
    t = os.times()
    return round((t.user + t.system) * _TICKS)


def _process_ticks(pid: int) -> int:
    """utime + stime of a process and its reaped children, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])


def _read_chunks(pipe, start: float, out: list[tuple[float, bytes]]) -> None:
    fd = pipe.fileno()
    while data := os.read(fd, 1 << 16):
        out.append((time.perf_counter() - start, data))
    pipe.close()


def _text(chunks: list[tuple[float, bytes]]) -> str:
    return b"".join(data for _, data in chunks).decode(errors="replace")


def _lines(chunks: dict[str, list[tuple[float, bytes]]]) -> list[Line]:
    lines = []
    for stream, parts in chunks.items():
        pending = b""
        for seconds, data in parts:
            pending += data
            *complete, pending = pending.split(b"\n")
            lines += [Line(seconds, stream, c.decode(errors="replace")) for c in complete]
        if pending:
            lines.append(Line(parts[-1][0], stream, pending.decode(errors="replace")))
    return sorted(lines, key=lambda line: line.seconds)


class _MemoryPoller(threading.Thread):
    """Samples the summed VmRSS/RssAnon of a process tree until stopped.

    The root's VmHWM (the kernel's own peak RSS) is folded in, so a spike shorter
    than the polling interval still counts towards peak RSS.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss = 0
        self.peak_anon = 0
        self.cpu_ticks = 0  # the process tree's CPU time at the last sample
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _sample(self) -> None:
        rss = anon = hwm = ticks = 0
        for pid in _process_tree(self.pid):
            status = _status(pid)
            rss += status.get("VmRSS", 0)
            anon += status.get("RssAnon", 0)
            ticks += _process_ticks(pid)
            if pid == self.pid:
                hwm = status.get("VmHWM", 0)
        self.peak_rss = max(self.peak_rss, rss, hwm)
        self.cpu_ticks = max(self.cpu_ticks, ticks)
        self.peak_anon = max(self.peak_anon, anon)


def _process_tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:  # the process (or a thread) just ended
            continue
    return pids


def _status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status we need, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out
