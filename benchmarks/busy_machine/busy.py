"""Helpers: start/stop CPU hogs, and measure how busy the rest of the machine was."""
import os
import subprocess
import sys
import time

HOG = [sys.executable, "-c", "while True: pass"]


def start_hogs(n):
    hogs = [subprocess.Popen(HOG) for _ in range(n)]
    time.sleep(0.3 if n else 0)
    return hogs


def stop_hogs(hogs):
    for h in hogs:
        h.kill()
    for h in hogs:
        h.wait()


def cpu_busy():
    """(busy jiffies, total jiffies) machine-wide."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class Window:
    """Fraction of the machine's CPUs used by processes other than us, our children and our hogs."""

    def __init__(self, hogs=()):
        self.pids = [h.pid for h in hogs]

    def _hogs(self):
        n = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
            n += int(v[11]) + int(v[12])  # utime, stime
        return n

    def __enter__(self):
        self.h0 = self._hogs()
        self.b0, self.t0 = cpu_busy()
        self.o0 = os.times()
        return self

    def __exit__(self, *a):
        b1, t1 = cpu_busy()
        o1 = os.times()
        hog = self._hogs() - self.h0
        tick = os.sysconf("SC_CLK_TCK")
        ours = sum(o1[i] - self.o0[i] for i in range(4)) * tick  # user, sys, children user, children sys
        self.total = (b1 - self.b0) / max(1, t1 - self.t0)
        self.others = max(0.0, (b1 - self.b0) - ours - hog) / max(1, t1 - self.t0)
        self.hogs = hog / max(1, t1 - self.t0)
