"""Benchmark leangen against torchtune's generate recipe, transformers and llama.cpp.

    python benchmarks/run.py --preset llama3_2_1b --reps 3
    python benchmarks/run.py --preset small --reps 1 --systems leangen --results-dir /tmp/bench
    python benchmarks/run.py --preset llama3_2_1b --reps 3 --update-tracked

Writes a random-weight HF checkpoint of the preset's shape (cached under
``benchmarks/.cache/``), measures the machine's limits, then runs every system in
a fresh process, interleaved A B C A B C, and writes RESULTS.md and results.json
(RESULTS_<preset>.md and results_<preset>.json for the other presets).

They go to ``benchmarks/.results/`` (git-ignored) or ``--results-dir``. The
tracked copies in ``benchmarks/``, which the README links, are rewritten only
with ``--update-tracked``: a trial run must not replace measured results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import the package from the repo root, and do not let this
    # directory's module names shadow installed ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import measure, tp_memory  # noqa: E402
from benchmarks import systems as system_defs
from benchmarks.checkpoints import checkpoint_bytes, ensure_checkpoint, shard_files  # noqa: E402
from benchmarks.limits import measure_limits  # noqa: E402
from benchmarks.measure import IDLE_SHARE, run_process, wait_for_idle  # noqa: E402
from benchmarks.memcap import CapUnavailable, MemoryCap, probe  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402
from benchmarks.report import DISTURBED, json_path, ratios_to, summarise, write_results  # noqa: E402
from benchmarks.systems import REPO_ROOT, SYSTEMS, LlamaCpp, System  # noqa: E402
from benchmarks.workload import Workload, tokenize_prompt  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
# Untracked (.gitignore), so that an ordinary run leaves the published results alone.
DEFAULT_RESULTS_DIR = BENCH_DIR / ".results"
HEADLINE_PRESET = "llama3_2_1b"
# What each figure spans, for the results file: per system, then how memory and
# the CPU share of other processes are measured.
BOUNDARIES = "\n\n".join(m.__doc__.split("\n", 1)[1].strip() for m in (system_defs, measure))
# Left to the rest of the machine when a cap is set by default.
_CAP_HEADROOM = 4 << 30
# Peak RSS over checkpoint bytes, used only to skip systems when no cap can be
# made: torchtune holds the state dict and a fully allocated model at once.
_EXPECTED_RSS_FACTOR = {"leangen": 1.1, "transformers": 1.1, "torchtune": 2.1,
                        "leangen-int8": 0.6, "leangen-int4": 0.4,
                        "leangen-int8-cached": 0.6, "leangen-int4-cached": 0.4, "transformers-int8": 1.1,
                        "transformers-int4": 1.1, "llama.cpp-bf16": 1.1, "llama.cpp-Q8_0": 0.6,
                        "llama.cpp-Q4_0": 0.4}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return render_only(args)
    if args.nproc:
        return run_nproc(args, argv)
    preset = PRESETS[args.preset]
    notes: list[str] = []
    systems, skipped = available_systems([SYSTEMS[name] for name in args.systems], notes)

    # 1. checkpoint, prompt and configs
    _progress(f"checkpoint for '{preset.name}' in {args.cache_dir}")
    checkpoint = ensure_checkpoint(preset, args.cache_dir)
    work_dir = args.cache_dir / "runs" / preset.name
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    workload = Workload(preset, checkpoint, work_dir, args.new_tokens, cache_dir=args.cache_dir,
                        threads=torch_threads(),
                        gguf_kinds=[s.kind for s in systems if isinstance(s, LlamaCpp)])
    tokenize_prompt(workload)
    systems = prepare_systems(systems, workload, skipped, notes)

    # 2. limits (this also warms the page cache for every system alike)
    _progress("measuring memory bandwidth and page-cache read speed")
    files = [checkpoint / f for f in shard_files(checkpoint)]
    if args.idle_wait > 0:
        wait_for_idle(args.idle_wait)
    limits = measure_limits(files)

    # 3. memory cap
    cap_bytes = plan_cap(preset, args, notes)
    if preset.needs_memory_cap and cap_bytes is None:
        systems = [s for s in systems if _fits_uncapped(s, preset, notes)]

    # 4. runs, interleaved
    runs = []
    for rep in range(1, args.reps + 1):
        for system in systems:
            runs += run_with_retries(system, workload, rep, cap_bytes, args)

    # 5. where leangen's load goes, stage by stage (its own fresh process)
    names = [s.name for s in systems]
    profile = load_profile(preset, checkpoint) if "leangen" in names else None
    # Quantized loads are profiled against the bf16 load, so only when leangen bf16 ran too.
    kinds = [s.quantize for s in systems if s.name.startswith("leangen-") and profile]
    quantize_profile = {k: load_profile(preset, checkpoint, quantize=k) for k in kinds}

    # 6. outputs
    summary = summarise(runs, names)
    document = {
        "meta": machine_meta(args),
        "workload": {
            "preset": preset.name, "checkpoint_dir": str(checkpoint), "shards": len(files),
            "model_bytes": checkpoint_bytes(preset), "prompt": workload.prompt_text,
            "prompt_tokens": workload.prompt_tokens, "prompt_token_count": len(workload.prompt_tokens),
            "new_tokens": args.new_tokens, "memory_cap_bytes": cap_bytes,
            "threads": workload.threads, "shape": weight_shape(preset.hf_config),
        },
        "limits": limits,
        "load_profile": profile,
        "quantize_profile": {k: v for k, v in quantize_profile.items() if v},
        "weights": {s.name: s.weights for s in systems},
        "skipped": skipped,
        "summary": summary,
        "ratios": ratios_to(summary),
        "runs": runs,
        "checks": consistency_checks(runs, workload),
        "notes": notes,
        "boundaries": BOUNDARIES,
        "commands": commands(argv, runs),
        "see_also": see_also(args),
        "configs": generated_configs(work_dir),
    }
    write_results(args.out, document)
    _progress(f"wrote {args.out} and {json_path(args.out)}")
    # Under a memory cap a failing system is a result, not a runner error.
    failed = [r for r in runs if r["status"] != "ok" and not r["status"].startswith(DISTURBED)]
    return 0 if not failed or cap_bytes else 1


def render_only(args) -> int:
    """Rewrite the markdown from the JSON beside it: the figures stay as measured,
    the explanatory text and links are refreshed."""
    if not json_path(args.out).is_file():
        hint = "" if args.update_tracked else " (the tracked copy in benchmarks/ needs --update-tracked)"
        _progress(f"--render-only: no {json_path(args.out)}{hint}")
        return 1
    document = json.loads(json_path(args.out).read_text())
    if "nproc" in document:  # --nproc results have their own report
        tp_memory.write_results(args.out, document)
        _progress(f"rewrote {args.out} from {json_path(args.out)}")
        return 0
    document.update(boundaries=BOUNDARIES, see_also=see_also(args))
    if "configs" not in document:  # written before configs were recorded; still on disk
        document["configs"] = generated_configs(args.cache_dir / "runs" / args.preset)
    write_results(args.out, document)
    _progress(f"rewrote {args.out} from {json_path(args.out)}")
    return 0


def run_nproc(args, argv: list[str] | None) -> int:
    """--nproc N: tp_memory.py's per-rank loads and generate runs, interleaved like the systems."""
    preset, notes = PRESETS[args.preset], []
    _progress(f"checkpoint for '{preset.name}' in {args.cache_dir}")
    checkpoint = ensure_checkpoint(preset, args.cache_dir)
    # Its own folder: the single-process runner's runs/<preset> is left alone.
    work_dir = args.cache_dir / "runs" / f"{preset.name}_nproc{args.nproc}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    workload = Workload(preset, checkpoint, work_dir, args.new_tokens, cache_dir=args.cache_dir,
                        threads=torch_threads())
    tokenize_prompt(workload)
    systems = prepare_systems([tp_memory.MEASUREMENTS[name](args.nproc) for name in args.systems],
                              workload, {}, notes)
    runs = [run for rep in range(1, args.reps + 1) for system in systems
            for run in run_with_retries(system, workload, rep, None, args)]
    document = {
        "meta": machine_meta(args), "nproc": args.nproc,
        "workload": {"preset": preset.name, "checkpoint_dir": str(checkpoint),
                     "model_bytes": checkpoint_bytes(preset), "prompt_token_count": len(workload.prompt_tokens),
                     "new_tokens": args.new_tokens, "threads": workload.threads, "cores": os.cpu_count()},
        "runs": runs, "checks": consistency_checks(runs, workload) + same_tokens(runs),
        "notes": notes, "commands": commands(argv, runs),
    }
    tp_memory.write_results(args.out, document)
    _progress(f"wrote {args.out} and {json_path(args.out)}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith(DISTURBED) for r in runs) else 1


def same_tokens(runs: list[dict], reference: str = "generate-one-process") -> list[str]:
    """Each generate measurement's greedy tokens against one process's. The ranks add bf16
    partial sums in another order, which can flip a near-tie of the random weights."""
    tokens = {r["system"]: r["tokens"] for r in runs if r["status"] == "ok" and r.get("tokens")}
    ref = tokens.pop(reference, None)
    checks = []
    for name, seq in tokens.items() if ref else ():
        agree = next((i for i, (x, y) in enumerate(zip(ref, seq)) if x != y), min(len(ref), len(seq)))
        checks.append(f"Greedy tokens, {name} vs {reference}: the first {agree} of "
                      f"{min(len(ref), len(seq))} agree.")
    return checks


def available_systems(systems: list[System], notes: list[str]) -> tuple[list[System], dict[str, str]]:
    """The systems that can run here, and why each other one is skipped (also in ``notes``)."""
    skipped = {s.name: reason for s in systems if (reason := s.unavailable())}
    for name, reason in skipped.items():
        notes.append(f"{name} skipped: {reason}.")
        _progress(f"{name} skipped: {reason}")
    return [s for s in systems if s.name not in skipped], skipped


def prepare_systems(systems: list[System], w: Workload, skipped: dict[str, str],
                    notes: list[str]) -> list[System]:
    """Write each system's configs (and llama.cpp's GGUF files); a system whose files
    cannot be made is skipped with a note, the others still run."""
    ready = []
    for system in systems:
        try:
            system.prepare(w)
            ready.append(system)
        except RuntimeError as e:
            reason = f"its files could not be made ({str(e).splitlines()[0]})"
            skipped[system.name] = reason
            notes.append(f"{system.name} skipped: {reason}.")
            _progress(f"{system.name} skipped: {e}")
    return ready


def torch_threads() -> int:
    """The intra-op threads a fresh torch process gets here (OMP_NUM_THREADS or the cores)."""
    import torch

    return torch.get_num_threads()


def weight_shape(config: dict) -> dict:
    """Parameters read per decoded token: the transformer blocks' matmuls, and the
    output projection (a tied one reads the embedding's rows once as well)."""
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // heads
    block = d * (heads * hd) * 2 + d * (kv * hd) * 2 + 3 * d * ff
    return {"block_linear_params": block * config["num_hidden_layers"], "output_params": v * d}


def load_profile(preset, checkpoint: Path, quantize: str | None = None) -> dict | None:
    """benchmarks/load_profile.py on the same files, in bf16 like the systems; with
    ``quantize``, the streamed quantized load and a bf16 load quantized afterwards."""
    argv = [sys.executable, str(BENCH_DIR / "load_profile.py"), preset.builder, str(checkpoint),
            "--dtype", "bf16", "--builder-kwargs", json.dumps(preset.builder_kwargs)]
    if quantize:
        argv += ["--quantize", quantize]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        _progress(f"load profile failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def generated_configs(work_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(work_dir.glob("*.yaml"))}


def see_also(args) -> list[str]:
    """The headline file links the other presets' results written beside it."""
    if args.preset != HEADLINE_PRESET:
        return []
    return sorted(p.name for p in args.out.parent.glob("RESULTS_*.md"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--systems", default=None,
                   type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: all); with --nproc, "
                        f"from: {', '.join(tp_memory.MEASUREMENTS)} (default: all)")
    p.add_argument("--new-tokens", type=int, default=64)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                       help="folder for RESULTS.md (headline llama3_2_1b preset) or "
                            "RESULTS_<preset>.md, with the results JSON beside it "
                            "(default: benchmarks/.results/, git-ignored)")
    where.add_argument("--update-tracked", action="store_true",
                       help="write the tracked results in benchmarks/ that the README links")
    where.add_argument("--out", type=Path, default=None, metavar="PATH.md",
                       help="exact markdown path instead; the results JSON goes beside it")
    p.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    p.add_argument("--idle-wait", type=float, default=300,
                   help="before each run, wait up to this many seconds for other processes to "
                        "leave the CPUs idle (0: do not wait)")
    p.add_argument("--retries", type=int, default=2,
                   # argparse %-formats help strings, so a literal percent sign is %%.
                   help="repeat a run this many times at most while other processes used over "
                        f"{100 * IDLE_SHARE:.0f}%% of the CPUs during it")
    p.add_argument("--render-only", action="store_true",
                   help="only rewrite the markdown from the existing results JSON in the "
                        "chosen location")
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="run every system under this hard cap (default: only for presets "
                        "expected to exceed RAM, at total RAM minus 4 GiB)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="tensor parallelism instead of the systems: per-rank peak anon memory and "
                        "load time of N gloo ranks (leangen's sharded load against a full state dict "
                        "per rank), and the generate recipe on 1 process against N ranks; writes "
                        "RESULTS_<preset>_nprocN.md")
    args = p.parse_args(argv)
    if args.nproc is not None:
        _check_nproc(p, args)
    choices = tp_memory.MEASUREMENTS if args.nproc else SYSTEMS
    args.systems = list(choices) if args.systems is None else args.systems
    unknown = [s for s in args.systems if s not in choices]
    if unknown or not args.systems:
        p.error(f"--systems: unknown {unknown}{' with --nproc' if args.nproc else ''}; "
                f"choose from {', '.join(choices)}")
    if args.reps < 1 or args.new_tokens < 2:
        p.error("--reps must be >= 1 and --new-tokens >= 2 (decode rate needs two tokens)")
    args.out, args.cache_dir = results_path(args).resolve(), args.cache_dir.resolve()
    if args.out.parent == BENCH_DIR and not args.update_tracked:
        p.error(f"{args.out} is beside the tracked results; pass --update-tracked to write there")
    return args


def _check_nproc(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nproc < 2:
        p.error("--nproc must be >= 2 (1 process is always measured as the reference)")
    if args.memory_cap_gb is not None:
        p.error("--nproc cannot be combined with --memory-cap-gb: it measures each rank uncapped")


def results_path(args: argparse.Namespace) -> Path:
    """The markdown to write: --out as given, else the preset's usual name in the chosen folder."""
    if args.out is not None:
        return args.out
    folder = BENCH_DIR if args.update_tracked else args.results_dir or DEFAULT_RESULTS_DIR
    # A run under an explicit cap is its own scenario, beside the preset's usual results.
    cap = f"_cap{args.memory_cap_gb:g}gb" if args.memory_cap_gb else ""
    # So is a tensor-parallel run (--nproc).
    scenario = cap + (f"_nproc{args.nproc}" if args.nproc else "")
    headline = args.preset == HEADLINE_PRESET and not scenario
    return folder / ("RESULTS.md" if headline else f"RESULTS_{args.preset}{scenario}.md")


def plan_cap(preset, args, notes: list[str]) -> int | None:
    """The cap in bytes for every run, or None; notes say why."""
    if args.memory_cap_gb is None and not preset.needs_memory_cap:
        return None
    limit = int(args.memory_cap_gb * 1e9) if args.memory_cap_gb else _mem_total() - _CAP_HEADROOM
    reason = probe()
    if reason:
        notes.append(f"No memory cap could be made here ({reason}); systems expected to "
                     "exceed RAM were skipped, the others ran uncapped.")
        return None
    notes.append(f"Every system ran under a hard cgroup memory cap of {limit / 1e9:.1f} GB "
                 "(the kernel OOM-kills only the capped process). In cgroup v1 the cap also counts "
                 "page cache the process brings in; pages already cached by an earlier process are "
                 "not charged to it.")
    return limit


def run_with_retries(system: System, w: Workload, rep: int, cap_bytes: int | None, args) -> list[dict]:
    """One repetition; repeated (up to ``--retries`` times) while other processes
    took a large CPU share during it. Disturbed attempts are kept, marked, and
    left out of the summary."""
    attempts = []
    for attempt in range(args.retries + 1):
        result = run_one(system, w, rep, attempt, cap_bytes, args.idle_wait)
        share = result.get("background_cpu_share") or 0.0
        retry = result["status"] == "ok" and share > IDLE_SHARE and attempt < args.retries
        if retry:
            result["status"] = f"{DISTURBED}: others used {share:.0%} of the CPUs; repeated"
        _progress(_one_line(result, args.reps))
        attempts.append(result)
        if not retry:
            return attempts
    return attempts


def run_one(system: System, w: Workload, rep: int, attempt: int, cap_bytes: int | None,
            idle_wait: float) -> dict:
    run_dir = w.work_dir / f"rep{rep}-{system.name}" / f"try{attempt}"
    run_dir.mkdir(parents=True)
    argv = system.argv(w, run_dir)
    try:
        with MemoryCap(cap_bytes) if cap_bytes else contextlib.nullcontext() as cap:
            run = run_process(argv, cwd=REPO_ROOT, cap=cap, idle_wait=idle_wait)
    except CapUnavailable as e:
        return {"rep": rep, "system": system.name, "status": f"not run: {e}", "argv": argv}
    finally:
        system.cleanup(run_dir)
    (run_dir / "stdout.txt").write_text(run.stdout)
    (run_dir / "stderr.txt").write_text(run.stderr)
    result = {
        "rep": rep, "system": system.name, "argv": argv, "returncode": run.returncode,
        "wall_seconds": run.wall_seconds, "peak_rss_bytes": run.peak_rss_bytes,
        "peak_anon_bytes": run.peak_anon_bytes, "cap": run.cap,
        "background_cpu_share": run.background_cpu_share, "idle_wait_seconds": run.idle_wait_seconds,
    }
    result["status"] = _status(run)
    if result["status"] == "ok":
        try:
            result.update(system.parse(run, w, run_dir))
        except (OSError, ValueError, KeyError, AttributeError, IndexError) as e:
            result["status"] = f"failed: output not understood ({type(e).__name__}: {e})"
    return result


def consistency_checks(runs: list[dict], w: Workload) -> list[str]:
    ok = [r for r in runs if r["status"] == "ok"]
    checks = []
    repeated = sum(r["status"].startswith(DISTURBED) for r in runs)
    if repeated:
        checks.append(f"{repeated} run(s) were repeated because other processes used more than "
                      f"{IDLE_SHARE:.0%} of the CPUs during them (listed under Runs, not summarised).")
    busy = [f"rep {r['rep']} {r['system']} ({r['background_cpu_share']:.0%})" for r in ok
            if (r.get("background_cpu_share") or 0) > IDLE_SHARE]
    if busy:
        checks.append(f"Still disturbed after retries (kept, timings skewed): {', '.join(busy)}.")
    else:
        checks.append(f"Other processes used under {IDLE_SHARE:.0%} of the CPUs during every summarised run.")
    seen = [r for r in ok if r["system"] == "leangen"]
    if seen:
        same = all(r["prompt_tokens"] == w.prompt_tokens for r in seen)
        checks.append(f"leangen's prompt tokens {'equal' if same else 'DIFFER from'} the ids given to "
                      f"transformers and computed with torchtune's recipe call ({len(w.prompt_tokens)} tokens).")
    short = sorted({(r["system"], r["generated_tokens"]) for r in ok
                    if r.get("generated_tokens") is not None and r["generated_tokens"] < w.new_tokens})
    if short:
        checks.append("Stopped early on a stop token: " + ", ".join(f"{s} ({n} tokens)" for s, n in short))
    else:
        checks.append(f"Every completed run generated {w.new_tokens} tokens.")
    pairs = {(r["system"], tuple(r["tokens"])) for r in ok if r.get("tokens")}
    by_system = {}
    for name, tokens in pairs:
        by_system.setdefault(name, set()).add(tokens)
    for other in sorted(by_system):
        if other == "leangen" or "leangen" not in by_system:
            continue
        a, b = next(iter(by_system["leangen"])), next(iter(by_system[other]))
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        checks.append(f"Greedy tokens, leangen (bf16) vs {other}: the first {agree} of "
                      f"{min(len(a), len(b))} agree (rounding and quantization split near-ties of "
                      "random weights).")
    for name, variants in sorted(by_system.items()):
        if len(variants) > 1:
            checks.append(f"{name} produced {len(variants)} different token sequences across repetitions.")
    return checks


def machine_meta(args) -> dict:
    cpu = _cpuinfo_field("model name") or platform.processor()
    flags = _cpuinfo_field("flags").split()
    features = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    versions = {pkg: _version(pkg) for pkg in ("torch", "torchtune", "torchao", "transformers",
                                               "safetensors", "llama-cpp-python")}
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu}, {os.cpu_count()} cores ({features}), {_mem_total() / 2**30:.1f} GiB RAM, "
                   f"Linux {platform.release()}",
        "software": "Python " + platform.python_version() + ", "
                    + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "reps": args.reps,
    }


def commands(argv: list[str] | None, runs: list[dict]) -> list[str]:
    runner = ["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
    lines = [shlex.join(runner), "# each system, as run in repetition 1 (cwd: repo root):"]
    first: dict[str, list[str]] = {}
    for r in runs:
        if r["rep"] == 1 and "argv" in r:
            first.setdefault(r["system"], r["argv"])
    lines += [shlex.join(argv) for argv in first.values()]
    return lines


def _status(run) -> str:
    if run.timed_out:
        return "failed: timed out"
    if run.returncode == 0:
        return "ok"
    if run.cap and (run.cap.get("oom_kills") or run.returncode == -9):
        return f"OOM-killed under the {run.cap['limit_bytes'] / 1e9:.1f} GB cap"
    tail = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["no stderr"]
    return f"failed (exit {run.returncode}): {tail[0][:160]}"


def _fits_uncapped(system: System, preset, notes: list[str]) -> bool:
    need = _EXPECTED_RSS_FACTOR.get(system.name, 2.0) * checkpoint_bytes(preset)
    fits = need < _mem_total() - _CAP_HEADROOM
    if not fits:
        notes.append(f"{system.name} skipped: expected to need ~{need / 1e9:.0f} GB, "
                     f"more than this machine's {_mem_total() / 1e9:.0f} GB, and no cap could be made.")
    return fits


def _one_line(r: dict, reps: int) -> str:
    text = f"[rep {r['rep']}/{reps}] {r['system']}: {r['status']}"
    if r.get("background_cpu_share") is not None:
        text += f" (others' CPU {100 * r['background_cpu_share']:.0f}%)"
    if r["status"] == "ok":
        text += (f", load {r['load_seconds']:.2f} s, first token {r['first_token_seconds'] or 0:.2f} s, "
                 f"{r['decode_tokens_per_second'] or 0:.2f} tok/s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, "
                 f"anon {r['peak_anon_bytes'] / 1e9:.2f} GB")
    return text


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _cpuinfo_field(name: str) -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
