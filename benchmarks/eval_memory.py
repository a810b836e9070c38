"""Peak RSS of the eval recipe's perplexity at a 128k vocabulary, against full logits.

    python -m benchmarks.eval_memory [--cache-dir DIR] [--out benchmarks/RESULTS_eval_memory.md]

The checkpoint is random bf16 weights of a small Llama 3 shape with Llama 3's vocabulary
(128256, tied output; ``PRESET`` below), written once under ``--cache-dir`` with the
benchmark's own tiktoken file. Each run is ``python -m leangen.eval --config eval_auto`` in
a fresh process on a text of exactly one batch of windows (``batch_size`` windows of
``max_seq_len=2048`` tokens: the peak is per batch, so more text adds time, not memory):

- ``leangen``: the recipe as shipped, at its default batch of 8 and at batch 1;
- ``full-logits``: the same process with perplexity's scoring replaced by the plain
  ``model(tokens)`` way: the whole ``[batch, seq, vocab]`` logits of a batch, float32,
  log-softmaxed in chunks of 1024 positions. Only at batch 1 and 2: at batch 8 they alone are 8.4 GB
  (plus 4.2 GB of bf16 logits before torchtune's ``.float()``), more than a shared
  machine should be asked for.

Figures per run: the child's ``ru_maxrss`` (``os.wait4``; the parent never imports torch:
Linux keeps the peak of the memory a child had before ``exec``) and the recipe's own VmHWM
(``metrics.peak_host_rss_bytes`` in its results file). Both count the checkpoint's
mmap'd pages the process touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WINDOW = 2048  # eval_auto's max_seq_len
RUNS = [("leangen", 8), ("leangen", 1), ("full-logits", 1), ("full-logits", 2)]


def preset():
    from benchmarks.presets import LLAMA3_2_1B, Preset

    config = {**LLAMA3_2_1B.hf_config, "hidden_size": 512, "intermediate_size": 1536,
              "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 64}
    return Preset(name="llama3_vocab128k_d512", hf_config=config, builder=LLAMA3_2_1B.builder,
                  torchtune_model_type="LLAMA3_2", tokenizer_kind="tiktoken_llama3",
                  tokenizer_builder=LLAMA3_2_1B.tokenizer_builder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_eval_memory.md")
    parser.add_argument("--child", choices=["leangen", "full-logits"], help=argparse.SUPPRESS)
    parser.add_argument("--make-text", nargs=3, metavar=("FOLDER", "TOKENS", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", type=Path, metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.make_checkpoint:
        from benchmarks.checkpoints import ensure_checkpoint

        ensure_checkpoint(preset(), args.make_checkpoint)
        return
    if args.make_text:
        folder, tokens, path = args.make_text
        return make_text(Path(folder), int(tokens), Path(path))
    if args.child:
        return child(args.child, rest)
    run_all(args.cache_dir, args.out)


def run_all(cache_dir: Path, out: Path) -> None:
    model = preset()
    folder = cache_dir / model.name
    # in a child, as everything that imports torch: see measure()
    subprocess.run([sys.executable, "-m", "benchmarks.eval_memory", "--make-checkpoint", str(cache_dir)],
                   check=True)
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    work = cache_dir / "eval_memory"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, batch in RUNS:
        text = work / f"text_{batch}.txt"
        # a little short of `batch` full windows (re-encoding the text may move its
        # length by a few tokens), so the text is exactly `batch` windows: one batch
        subprocess.run([sys.executable, "-m", "benchmarks.eval_memory", "--make-text", str(folder),
                        str(batch * WINDOW - 64), str(text)], check=True)
        results = work / f"results_{method}_{batch}.json"
        cmd = [sys.executable, "-m", "benchmarks.eval_memory", "--child", method, "--config", "eval_auto",
               f"checkpoint.path={folder}", f"perplexity.files=[{text}]", f"batch_size={batch}",
               f"output_file={results}"]
        rows.append(measure(cmd, method, batch, results))
        print(json.dumps(rows[-1]), file=sys.stderr)
    write_report(out, model, model_bytes, rows)


def measure(cmd: list[str], method: str, batch: int, results: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} batch {batch} failed: {' '.join(cmd)}")
    report = json.loads(results.read_text())
    windows = report["perplexity"]["all"]["tokens"] // (WINDOW - 1) + 1  # each window leaves its first out
    return {"method": method, "batch_size": batch, "windows": windows,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "vmhwm_bytes": report["metrics"]["peak_host_rss_bytes"],
            "ppl": report["perplexity"]["all"]["ppl"], "tokens": report["perplexity"]["all"]["tokens"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def make_text(folder: Path, n_tokens: int, path: Path) -> None:
    """Text of about ``n_tokens`` tokens (BOS included) in the folder's own tokenizer."""
    from benchmarks.tokenizer_files import _corpus
    from leangen.hf.tokenizer import tokenizer_from_folder

    tokenizer = tokenizer_from_folder(folder)
    words = " ".join(_corpus(n_tokens))  # more than enough: a sentence is several tokens
    ids = tokenizer.encode(words, add_bos=False, add_eos=False)[:n_tokens - 1]
    path.write_text(tokenizer.decode(ids), encoding="utf-8")


def child(method: str, recipe_args: list[str]) -> None:
    from leangen.eval import main as recipe

    if method == "full-logits":
        from leangen.evaluation import perplexity

        perplexity.score_rows = full_logits_scores
    sys.exit(recipe(recipe_args))


def full_logits_scores(model, rows, targets):
    """Scoring from ``model(tokens)``: the batch's whole logits, then a float32
    log-softmax over 1024 positions at a time."""
    import torch
    import torch.nn.functional as F

    from leangen.evaluation.scoring import TokenScores

    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
    logits = model(tokens)  # [batch, seq, vocab], float32
    scores = []
    for row_logits, (start, want) in zip(logits, targets):
        predicting, ids = row_logits[start:start + len(want)], torch.tensor(want)
        parts = [F.log_softmax(predicting[i:i + 1024].float(), -1).gather(-1, ids[i:i + 1024, None]).squeeze(-1)
                 for i in range(0, len(ids), 1024)]
        scores.append(TokenScores(torch.cat(parts), bool((predicting.argmax(-1) == ids).all())))
    return scores


def write_report(out: Path, model, model_bytes: int, rows: list[dict]) -> None:
    c = model.hf_config
    gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
    lines = [
        "# Eval memory at a 128k vocabulary",
        "",
        "```",
        "python -m benchmarks.eval_memory",
        "```",
        "",
        f"Checkpoint: random bf16 weights, Llama 3 shape with vocab {c['vocab_size']}, hidden "
        f"{c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads "
        f"({c['num_key_value_heads']} KV), MLP {c['intermediate_size']}, tied output: "
        f"{gb(model_bytes)} GB of weights. Each run: `python -m leangen.eval --config eval_auto` "
        f"(dtype auto = bf16, max_seq_len {WINDOW}) on a text of exactly `batch_size` windows, in a "
        "fresh process. `leangen` is the recipe as shipped; `full-logits` replaces its scoring "
        "with a plain `model(tokens)`, which holds a batch's whole [batch, seq, vocab] float32 "
        "logits.",
        "",
        "| method | batch_size | windows | peak RSS (ru_maxrss) GB | VmHWM GB | ppl | scored tokens | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['windows']} | {gb(r['ru_maxrss_bytes'])} | "
                     f"{gb(r['vmhwm_bytes'])} | {r['ppl']:.6g} | {r['tokens']} | {r['wall_seconds']} |")
    logits = 8 * WINDOW * c["vocab_size"]
    lines += [
        "",
        f"Not run: full-logits at the default batch of 8, whose logits alone are {gb(logits * 6)} GB "
        f"({gb(logits * 2)} GB bf16 from the output projection, {gb(logits * 4)} GB after torchtune's "
        "`.float()`). Same-batch rows score the same tokens, so their ppl must agree to float32 "
        "rounding; the rows' ppl differ between batch sizes because their texts differ.",
        "",
    ]
    out.write_text("\n".join(lines))
    out.with_name(out.stem.lower() + ".json").write_text(
        json.dumps({"checkpoint": c, "model_bytes": model_bytes, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
