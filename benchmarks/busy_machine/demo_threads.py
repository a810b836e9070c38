"""Q2a: the demo's tok/s with OMP_NUM_THREADS=1 / 2 / unset, with 0, 1, 2 busy-loop hogs beside it.

Fully interleaved: for each rep, for each hog count (hogs started once for the three runs),
for each thread setting (order rotated per rep) -> one fresh leangen-generate process.
Hogs are killed between hog settings (their CPU time is counted as ours, see busy.py).
usage: python demo_threads.py [reps]
"""
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from busy import Window, start_hogs, stop_hogs

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
OMPS = ["1", "2", "unset"]
HOGS = [0, 1, 2]
MF = "/tmp/m.json"
res = {(h, o): [] for h in HOGS for o in OMPS}
others = {(h, o): [] for h in HOGS for o in OMPS}
for r in range(REPS):
    for h in HOGS:
        hogs = start_hogs(h)
        try:
            order = OMPS[r % 3:] + OMPS[:r % 3]
            for o in order:
                env = dict(os.environ)
                env.pop("OMP_NUM_THREADS", None)
                if o != "unset":
                    env["OMP_NUM_THREADS"] = o
                if os.path.exists(MF):
                    os.remove(MF)
                with Window() as w:
                    subprocess.run(["leangen-generate", "--config", "demo", "max_new_tokens=200", f"metrics_file={MF}"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                tps = json.load(open(MF))["tokens_per_second"]
                res[(h, o)].append(tps)
                others[(h, o)].append(w.others)
                print(f"rep {r} hogs {h} OMP {o:5s}: {tps:8.1f} tok/s  (others used {100*w.others:.0f}% of CPUs)", flush=True)
        finally:
            stop_hogs(hogs)
print("\n| hogs | OMP_NUM_THREADS | median tok/s | min | max | vs OMP=1 same hogs | median others' CPU |")
print("|---|---|---|---|---|---|---|")
for h in HOGS:
    b = statistics.median(res[(h, "1")])
    for o in OMPS:
        s = res[(h, o)]
        print(f"| {h} | {o} | {statistics.median(s):.1f} | {min(s):.1f} | {max(s):.1f} | {statistics.median(s)/b:.2f} | {100*statistics.median(others[(h,o)]):.0f}% |")
json.dump({f"{h}/{o}": v for (h, o), v in res.items()}, open("/tmp/demo_threads.json", "w"), indent=1)
