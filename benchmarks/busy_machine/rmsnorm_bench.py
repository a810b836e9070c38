"""Q1a: per-call cost of torchtune's RMSNorm (bf16 scale -> composite fallback) vs fused variants.

Interleaved A/B/C/D timing, several repetitions, medians. Also numerics (max abs diff vs torchtune)
and which aten ops each variant dispatches to.

usage: python rmsnorm_bench.py [--threads N] [--reps R]
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchtune.modules import RMSNorm

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=0)
p.add_argument("--reps", type=int, default=7)
p.add_argument("--dim", type=int, default=2048)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
warnings.simplefilter("ignore")  # we count the warning elsewhere

D = args.dim
torch.manual_seed(0)
norm = RMSNorm(D, eps=1e-5).to(torch.bfloat16)
with torch.no_grad():
    norm.scale.copy_(1 + 0.1 * torch.randn(D))  # a non-trivial scale, as in a real checkpoint
w_bf16 = norm.scale.detach()
w_fp32 = w_bf16.float()
eps = norm.eps


def tt_current(x):  # torchtune 0.6.1 as shipped: fp32 input, bf16 weight -> composite fallback
    return norm(x)


def fused_fp32_cached_w(x):  # fp32 input + fp32 weight (weight cast once, kept) -> fused, then cast
    return F.rms_norm(x.float(), (D,), weight=w_fp32, eps=eps).to(x.dtype)


def fused_fp32_cast_w(x):  # same but casting the bf16 weight on every call
    return F.rms_norm(x.float(), (D,), weight=w_bf16.float(), eps=eps).to(x.dtype)


def fused_bf16(x):  # bf16 input + bf16 weight -> fused kernel directly in bf16
    return F.rms_norm(x, (D,), weight=w_bf16, eps=eps)


VARIANTS = {
    "torchtune (fp32 x, bf16 w) [current]": tt_current,
    "F.rms_norm fp32 x, fp32 w (cached)": fused_fp32_cached_w,
    "F.rms_norm fp32 x, w.float() per call": fused_fp32_cast_w,
    "F.rms_norm bf16 x, bf16 w": fused_bf16,
}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def time_calls(fn, x, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t0) / n * 1e6  # us per call


print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dim {D}")
with torch.inference_mode():
    for seq, n in ((1, 3000), (84, 300)):
        x = (torch.randn(1, seq, D) * 3).to(torch.bfloat16)
        ref = tt_current(x)
        print(f"\n## seq={seq} (x shape {tuple(x.shape)}), {n} calls per sample, {args.reps} interleaved reps")
        for name, fn in VARIANTS.items():
            with RecordOps() as rec:
                out = fn(x)
            diff = (out.float() - ref.float()).abs().max().item()
            neq = (out != ref).sum().item()
            print(f"  {name:42s} ops={rec.ops}  max|diff| vs torchtune={diff:.3g}  elems differing={neq}/{out.numel()}  out dtype={out.dtype}")
        for fn in VARIANTS.values():  # warm-up
            time_calls(fn, x, n // 10)
        samples = {k: [] for k in VARIANTS}
        for _ in range(args.reps):
            for name, fn in VARIANTS.items():
                samples[name].append(time_calls(fn, x, n))
        base = statistics.median(samples["torchtune (fp32 x, bf16 w) [current]"])
        print(f"  {'variant':42s} {'median us/call':>14s} {'min':>7s} {'x33 (us/step)':>14s} {'vs current':>10s}")
        for name, s in samples.items():
            m = statistics.median(s)
            print(f"  {name:42s} {m:14.2f} {min(s):7.2f} {33 * m:14.1f} {m / base:10.2f}")
