"""The CUDA paths, checked and measured on a lent GPU machine (CI has no GPU).

    python benchmarks/cuda_checks.py --out DIR [--reps 2] [--new-tokens 64]
    python benchmarks/cuda_checks.py --out /tmp/x --device cpu --preset small --reps 1  # dry run

Each check runs on its own, so that one failure still leaves the others' figures:
1. ``Stager``: a checkpoint tensor (the mmap) to the GPU through the two pinned staging
   buffers; the bytes must arrive equal. Against ``tensor.to(device)`` on the same tensor.
2. The shipped demo with ``device=cuda``, eager and with ``compile=true``: the text must be
   the CPU run's.
3. A packaged preset (``llama3_2_1b``) on the benchmark's checkpoint with ``device=cuda``.
4. The benchmark systems on that checkpoint, interleaved: leangen bf16 / int8 / int4 /
   int4 from the quantized cache, leangen compiled, torchtune's recipe and transformers,
   each a fresh process, with load, first token, decode, peak host anon and peak device
   memory, and whether their greedy tokens agree.
It writes ``cuda_checks.json`` and ``RESULTS_cuda.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

from benchmarks.checkpoints import ensure_checkpoint  # noqa: E402
from benchmarks.measure import run_process  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402
from benchmarks.run import prepare_systems  # noqa: E402
from benchmarks.systems import REPO_ROOT, SYSTEMS, Leangen  # noqa: E402
from benchmarks.workload import Workload, tokenize_prompt  # noqa: E402


class LeangenCompiled(Leangen):
    name = "leangen-compile"
    extra = {"compile": True}


GPU_SYSTEMS = ["leangen", "leangen-int8", "leangen-int4", "leangen-int4-cached",
               "torchtune", "transformers", "transformers-int8", "leangen-compile"]


def main() -> int:
    args = _parse()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"meta": _meta(args), "checks": {}}
    preset = PRESETS[args.preset]
    checkpoint = ensure_checkpoint(preset, args.cache_dir)
    for name, check in (("stager", lambda: check_stager(checkpoint, args.device)),
                        ("demo", lambda: check_demo(args.device)),
                        ("preset_config", lambda: check_preset_config(checkpoint, args)),
                        ("systems", lambda: check_systems(preset, checkpoint, args))):
        if name not in args.checks:
            continue
        started = time.perf_counter()
        try:
            report["checks"][name] = {"ok": True, **check()}
        except Exception as e:  # noqa: BLE001 - one failed check must not lose the others
            report["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()[-3000:]}
        report["checks"][name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {'ok' if report['checks'][name]['ok'] else 'FAILED'}", flush=True)
        (args.out / "cuda_checks.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "RESULTS_cuda.md").write_text(render(report))
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


def check_stager(checkpoint: Path, device: str) -> dict:
    """The largest stored tensor, from the mmap to the device: Stager against ``.to``."""
    from leangen.checkpoint.view import open_checkpoint
    from leangen.load.move import Stager

    view = open_checkpoint(checkpoint)
    name = max(view.names(), key=lambda n: view.shape(n).numel())
    src = view.stored(name)
    gb = src.numel() * src.element_size() / 1e9
    stager = Stager(device)
    timings = {"stager": [], "to": []}
    for _ in range(3):
        for way in timings:
            _sync(device)
            start = time.perf_counter()
            if way == "stager":
                dst = stager.copy(src)
                stager.finish()
            else:
                dst = src.to(device)
            _sync(device)
            timings[way].append(time.perf_counter() - start)
            if not torch.equal(dst.cpu(), src):
                raise AssertionError(f"{way}: {name} arrived different on {device}")
            del dst
    best = {way: min(t) for way, t in timings.items()}
    return {"tensor": name, "gb": round(gb, 3), "pinned": bool(stager.buffers[0].is_pinned()),
            "stager_gb_per_s": round(gb / best["stager"], 2),
            "to_gb_per_s": round(gb / best["to"], 2)}


def check_demo(device: str) -> dict:
    """The shipped demo: the same text on ``device`` as on CPU, eager and compiled."""
    out = {}
    reference = _leangen(["--config", "demo", "device=cpu"])
    for label, extra in (("eager", []), ("compile", ["compile=true"])):
        run = _leangen(["--config", "demo", f"device={device}", *extra])
        out[label] = {"same_text_as_cpu": run["text"] == reference["text"], **run["metrics"]}
        if run["text"] != reference["text"]:
            raise AssertionError(f"demo ({label}) on {device}: {run['text']!r} != "
                                 f"CPU {reference['text']!r}")
    return out


def check_preset_config(checkpoint: Path, args) -> dict:
    """A packaged preset, pointed at the benchmark's random-weight checkpoint of its shape."""
    run = _leangen(["--config", args.preset_config, f"checkpoint.path={checkpoint}",
                    f"device={args.device}", "temperature=0", "max_new_tokens=32"])
    return {"config": args.preset_config, **run["metrics"]}


def check_systems(preset, checkpoint: Path, args) -> dict:
    """The benchmark's systems on ``args.device``, interleaved, each in a fresh process."""
    work_dir = args.cache_dir / "runs" / f"{preset.name}-{args.device}"
    subprocess.run(["rm", "-rf", str(work_dir)], check=True)
    work_dir.mkdir(parents=True)
    w = Workload(preset, checkpoint, work_dir, args.new_tokens, cache_dir=args.cache_dir,
                 device=args.device, threads=torch.get_num_threads())
    tokenize_prompt(w)
    systems = [LeangenCompiled() if n == "leangen-compile" else SYSTEMS[n] for n in args.systems]
    skipped: dict[str, str] = {}
    ready = prepare_systems(systems, w, skipped, [])  # a system that fails here is reported
    runs: dict[str, list[dict]] = {
        s.name: [{"returncode": None, "error": f"prepare: {skipped[s.name]}"}] if s.name in skipped else []
        for s in systems}
    systems = ready
    for rep in range(args.reps):
        for system in systems:
            runs[system.name].append(_one_run(system, w, rep))
            print(f"  {system.name} rep {rep + 1}: {_brief(runs[system.name][-1])}", flush=True)
            # kept as it goes: a run cut off by the lease's time limit still leaves these
            (args.out / "systems_partial.json").write_text(json.dumps(runs, default=str))
    reference = next((r["tokens"] for r in runs.get("leangen", []) if r.get("tokens")), None)
    for name, results in runs.items():
        for r in results:
            if r.get("tokens") is not None and reference is not None:
                r["same_tokens_as_leangen"] = r["tokens"] == reference
    return {"prompt_tokens": len(w.prompt_tokens), "new_tokens": args.new_tokens, "runs": runs}


def _one_run(system, w: Workload, rep: int) -> dict:
    run_dir = w.work_dir / f"rep{rep}-{system.name}"
    run_dir.mkdir(parents=True)
    run = run_process(system.argv(w, run_dir), cwd=REPO_ROOT, idle_wait=0, timeout=900)
    system.cleanup(run_dir)
    result = {"returncode": run.returncode, "wall_seconds": round(run.wall_seconds, 2),
              "peak_anon_gb": round(run.peak_anon_bytes / 1e9, 3)}
    if run.returncode != 0:
        return {**result, "error": run.stderr[-2000:]}
    figures = system.parse(run, w, run_dir)
    reported = figures.get("reported") or {}
    device_bytes = reported.get("peak_device_bytes") or _torchtune_device_memory(run)
    return {**result, "load_seconds": figures["load_seconds"],
            "first_token_seconds": figures["first_token_seconds"],
            "decode_tokens_per_second": figures["decode_tokens_per_second"],
            "peak_device_gb": round(device_bytes / 1e9, 3) if device_bytes else None,
            "quantize_cache": figures.get("quantize_cache"), "tokens": figures.get("tokens")}


def _torchtune_device_memory(run) -> float | None:
    line = run.find_line("Memory used:")  # torchtune's recipe: max_memory_allocated, GB
    return float(line.text.split("Memory used:")[1].split()[0]) * 1e9 if line else None


def _leangen(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.json"
        done = subprocess.run([sys.executable, "-m", "leangen.generate", *argv,
                               f"metrics_file={metrics}"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"leangen {' '.join(argv)} failed: {done.stderr[-2000:]}")
        return {"text": done.stdout, "metrics": _headline(json.loads(metrics.read_text()))}


def _headline(metrics: dict) -> dict:
    keys = ("load_seconds", "first_token_seconds", "tokens_per_second", "peak_device_bytes",
            "peak_host_rss_bytes", "device", "dtype", "compile", "quantize_cache")
    return {k: metrics[k] for k in keys if k in metrics}


def _brief(r: dict) -> str:
    if "error" in r:
        return f"FAILED rc={r['returncode']}"
    return (f"load {r['load_seconds']:.2f} s, decode {r['decode_tokens_per_second'] or 0:.1f} tok/s, "
            f"device {r['peak_device_gb']} GB, anon {r['peak_anon_gb']} GB")


def render(report: dict) -> str:
    meta, checks = report["meta"], report["checks"]
    lines = [f"# CUDA checks ({meta['device_name']})", "",
             f"Measured {meta['date']} by `benchmarks/cuda_checks.py` on {meta['device_name']}, "
             f"{meta['cpus']} CPUs. torch {meta['torch']}, torchtune {meta['torchtune']}, "
             f"torchao {meta['torchao']}, transformers {meta['transformers']}.", ""]
    for name, check in checks.items():
        status = "ok" if check["ok"] else f"**failed**: {check['error']}"
        lines.append(f"- **{name}**: {status} ({check['seconds']} s)")
    stager = checks.get("stager", {})
    if stager.get("ok"):
        lines += ["", f"Stager: `{stager['tensor']}` ({stager['gb']} GB) from the mmap, "
                  f"pinned staging {stager['pinned']}: {stager['stager_gb_per_s']} GB/s; "
                  f"`tensor.to(device)` {stager['to_gb_per_s']} GB/s; bytes equal."]
    demo = checks.get("demo", {})
    if demo.get("ok"):
        lines += ["", "Demo on the GPU: same text as on CPU, eager and compiled. "
                  + "; ".join(f"{k}: load {v['load_seconds']:.2f} s, {v.get('tokens_per_second', 0):.0f} "
                              f"tok/s, peak device {(v.get('peak_device_bytes') or 0) / 1e9:.3f} GB"
                              for k, v in demo.items() if isinstance(v, dict))]
    lines += _systems_table(checks.get("systems", {}))
    return "\n".join(lines) + "\n"


def _systems_table(check: dict) -> list[str]:
    if not check.get("ok"):
        return []
    head = ["", f"Systems: prompt {check['prompt_tokens']} tokens, {check['new_tokens']} greedy new "
            "tokens, bf16, each run a fresh process; median of the runs [ratio to leangen's median].",
            "", "| system | load (s) | first token (s) | decode (tok/s) | peak device (GB) | "
            "peak host anon (GB) | same tokens as leangen | runs ok |", "|---|---|---|---|---|---|---|---|"]
    medians = {name: _medians(runs) for name, runs in check["runs"].items()}
    base = medians.get("leangen", {})
    rows = []
    for name, m in medians.items():
        runs = check["runs"][name]
        ok = [r for r in runs if "error" not in r]
        same = {r.get("same_tokens_as_leangen") for r in ok} - {None}
        cells = [_cell(m, base, k) for k in ("load_seconds", "first_token_seconds",
                                               "decode_tokens_per_second", "peak_device_gb",
                                               "peak_anon_gb")]
        rows.append(f"| {name} | " + " | ".join(cells)
                    + f" | {'/'.join(sorted(map(str, same))) or '—'} | {len(ok)}/{len(runs)} |")
    return head + rows


def _medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    keys = ("load_seconds", "first_token_seconds", "decode_tokens_per_second", "peak_device_gb",
            "peak_anon_gb")
    return {k: statistics.median(vals) for k in keys
            if (vals := [r[k] for r in ok if r.get(k) is not None])}


def _cell(m: dict, base: dict, key: str) -> str:
    if key not in m:
        return "—"
    ratio = f" [{m[key] / base[key]:.2f}x]" if base.get(key) else ""
    return f"{m[key]:.3g}{ratio}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _meta(args) -> dict:
    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "torchtune": version("torchtune"), "torchao": version("torchao"),
            "transformers": version("transformers"), "python": platform.python_version()}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="llama3_2_1b", choices=sorted(PRESETS))
    p.add_argument("--preset-config", default="llama3_2_1b",
                   help="packaged recipe config run on the preset's checkpoint")
    p.add_argument("--systems", default=",".join(GPU_SYSTEMS),
                   type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--checks", default="stager,demo,preset_config,systems",
                   type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
