"""Q2b: decode tok/s of a random-weight bf16 Llama-3.2-1B (torchtune llama3_2_1b, 1.24B params) with
torch.set_num_threads(1) vs (2), beside 0, 1, 2 busy-loop hogs.

One process, model built once. For each rep, for each hog count (hogs started once), for each thread
count (order alternated per rep): reset KV cache, short prefill (8 tokens), 1 warm-up decode step, then
time N single-token decode steps -> tok/s = N / time.
usage: python model_threads.py [reps] [steps]
"""
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
import torch
from busy import Window, start_hogs, stop_hogs
from torchtune.models.llama3_2 import llama3_2_1b

warnings.simplefilter("ignore")
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cpu"):
    m = llama3_2_1b()
torch.set_default_dtype(torch.float32)
m.eval()
MAXLEN = 128
m.setup_caches(batch_size=1, dtype=torch.bfloat16, decoder_max_seq_len=MAXLEN)
causal = torch.tril(torch.ones(MAXLEN, MAXLEN, dtype=torch.bool)).unsqueeze(0)
prompt = torch.randint(0, 128000, (1, 8))
print(f"llama3_2_1b bf16 random weights, {sum(p.numel() for p in m.parameters())/1e9:.2f}B params; "
      f"default threads {torch.get_num_threads()}", flush=True)


def decode_tps():
    m.reset_caches()
    L = prompt.shape[1]
    tok = m(prompt, input_pos=torch.arange(L).unsqueeze(0), mask=causal[:, :L])[:, -1].argmax(-1, keepdim=True)
    tok = m(tok, input_pos=torch.tensor([[L]]), mask=causal[:, L:L + 1])[:, -1].argmax(-1, keepdim=True)  # warm-up
    t = time.perf_counter()
    for i in range(STEPS):
        pos = L + 1 + i
        tok = m(tok, input_pos=torch.tensor([[pos]]), mask=causal[:, pos:pos + 1])[:, -1].argmax(-1, keepdim=True)
    return STEPS / (time.perf_counter() - t)


THREADS = [1, 2]
HOGS = [0, 1, 2]
res = {(h, t): [] for h in HOGS for t in THREADS}
oth = {(h, t): [] for h in HOGS for t in THREADS}
with torch.inference_mode():
    torch.set_num_threads(2); decode_tps()  # warm-up of everything
    for r in range(REPS):
        for h in HOGS:
            hogs = start_hogs(h)
            try:
                for t in (THREADS if r % 2 == 0 else THREADS[::-1]):
                    torch.set_num_threads(t)
                    with Window(hogs) as w:
                        tps = decode_tps()
                    res[(h, t)].append(tps)
                    oth[(h, t)].append(w.others)
                    print(f"rep {r} hogs {h} threads {t}: {tps:6.2f} tok/s  (others used {100*w.others:.0f}%, our hogs {100*w.hogs:.0f}% of CPUs)", flush=True)
            finally:
                stop_hogs(hogs)
print("\n| hogs | threads | median tok/s | min | max | vs 1 thread same hogs | median others' CPU |")
print("|---|---|---|---|---|---|---|")
for h in HOGS:
    b = statistics.median(res[(h, 1)])
    for t in THREADS:
        s = res[(h, t)]
        print(f"| {h} | {t} | {statistics.median(s):.2f} | {min(s):.2f} | {max(s):.2f} | {statistics.median(s)/b:.2f} | {100*statistics.median(oth[(h,t)]):.0f}% |")
