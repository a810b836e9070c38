"""Peak anonymous memory of a first quantized load, against its bound: the quantized
weights plus the largest Linear in full precision (what streaming one Linear at a time promises).

    python -m benchmarks.quant_memory [--folder DIR] [--kind int8 int4] [--repeat 1] [--chunk-mib N]

Each load runs in a fresh subprocess (``--child``): ``load_model(..., quantize=kind,
quantize_cache=None)`` while a thread samples RssAnon (/proc/self/status) every 2 ms.
VmHWM is no use here: it counts the checkpoint's mmap'd file pages. The child reports
the peak anon growth over its value after imports, the step (the Linear being
quantized, by module name) running when the peak was seen, the load time (wall and
process CPU: on a busy machine OpenMP threads spin-waiting for a preempted peer burn
CPU at every parallel region, so OMP_WAIT_POLICY=PASSIVE tells that cost apart), and the
bound: quantized model bytes + the largest Linear in bf16 + 64 MiB. ``--chunk-mib`` sets
``leangen.quant.quantize.CHUNK_BYTES`` (how much full-precision weight torchao gets at once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_FOLDER = Path(__file__).resolve().parent / ".cache" / "llama3_2_1b"
SLACK = 64 << 20


def _rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakAnon:
    """Samples RssAnon on a thread; ``step`` names what was running at the peak."""

    def __init__(self):
        self.step, self.peak, self.peak_step = "start", 0, "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.002)

    def sample(self):
        now = _rss_anon()
        if now > self.peak:
            self.peak, self.peak_step = now, self.step

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _label_steps(meter: PeakAnon) -> None:
    """Name each module the move stage finishes, so the peak can be pinned to one."""
    from leangen.quant.quantize import Quantizer

    original = Quantizer.__call__

    def labelled(self, name, module):
        meter.step = name or "<root>"
        try:
            original(self, name, module)
        finally:
            meter.sample()  # the module's temporaries may be gone by the next tick
            meter.step = f"after {name or '<root>'}"
    Quantizer.__call__ = labelled


def child(folder: str, kind: str, chunk_mib: int | None) -> dict:
    import torch

    import leangen
    import leangen.quant.quantize
    from leangen.quant.quantize import tensor_bytes

    if chunk_mib is not None:
        leangen.quant.quantize.CHUNK_BYTES = chunk_mib << 20

    import torchao.quantization  # noqa: F401  imports before the baseline
    base = _rss_anon()
    meter = PeakAnon()
    _label_steps(meter)
    with meter:
        start, cpu = time.perf_counter(), time.process_time()
        model = leangen.load_model("auto", folder, device="cpu", dtype="bf16", quantize=kind,
                                   quantize_cache=None)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    quantized = sum(tensor_bytes(p) for p in model.parameters())
    # the embedding stays the file's mmap: it is not anonymous memory
    embedding = model.tok_embeddings.weight
    anon_params = quantized - tensor_bytes(embedding)
    largest = max(m.in_features * m.out_features * 2 for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    return {"kind": kind, "seconds": seconds, "cpu_seconds": cpu, "peak_anon": meter.peak - base,
            "peak_step": meter.peak_step, "after_anon": _rss_anon() - base,
            "quantized_bytes": anon_params, "largest_linear_bf16": largest,
            "bound": anon_params + largest + SLACK, "counts": model.leangen.quantized}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(DEFAULT_FOLDER))
    parser.add_argument("--kind", nargs="+", default=["int8", "int4"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--chunk-mib", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.folder, args.kind[0], args.chunk_mib)))
        return
    for _ in range(args.repeat):
        for kind in args.kind:
            chunk = [] if args.chunk_mib is None else ["--chunk-mib", str(args.chunk_mib)]
            out = subprocess.run([sys.executable, "-m", "benchmarks.quant_memory", "--child",
                                  "--folder", args.folder, "--kind", kind, *chunk],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{kind}: peak anon {r['peak_anon'] / 1e9:.3f} GB at {r['peak_step']!r} | "
                  f"bound {r['bound'] / 1e9:.3f} GB (quantized {r['quantized_bytes'] / 1e9:.3f} "
                  f"+ largest Linear {r['largest_linear_bf16'] / 1e9:.3f} + 64 MiB) | "
                  f"after {r['after_anon'] / 1e9:.3f} GB | load {r['seconds']:.2f} s "
                  f"({r['cpu_seconds']:.2f} s CPU)", flush=True)


if __name__ == "__main__":
    main()
