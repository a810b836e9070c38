"""Summaries and the two output files: ``RESULTS.md`` (tables) and ``results.json``.

Every figure is a median with its min–max over the repetitions that completed,
and each system is also shown as a ratio to leangen: how many times longer it
takes (times), how many times more it holds (memory), how many times its decode
rate is (tokens/s).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

GB = 1e9
# The load and decode targets (both tables below) are stated for this preset.
TARGET_PRESET = "llama3_2_1b"
# The low-RAM targets are stated for this preset (it does not fit a small machine's RAM in bf16).
LOW_RAM_PRESET = "mistral7b"
# Bytes per weight (transformer blocks' matmuls, output projection) that a decode step
# reads, per weight format; scales and zero points included. torchao int8: per-row
# scales (negligible); torchao int4: group 32 (leangen's default) with a bf16 scale and zero point each;
# GGUF Q8_0: 34 bytes per 32; Q4_0: 18 bytes per 32, and llama-quantize's default
# keeps the output projection at Q6_K (210 bytes per 256).
BYTES_PER_WEIGHT = {
    "bf16": (2.0, 2.0), "int8": (1.0, 1.0), "int4": (0.5 + 4 / 32, 0.5 + 4 / 32),
    "Q8_0": (34 / 32, 34 / 32), "Q4_0": (18 / 32, 210 / 256),
}
# Rows of the decode-by-format table: (label, leangen, transformers, llama.cpp).
FORMAT_ROWS = [
    ("bf16", "leangen", "transformers", "llama.cpp-bf16"),
    ("bf16, prepack: true", "leangen-prepack", None, "llama.cpp-bf16"),
    ("8-bit (int8 / Q8_0)", "leangen-int8", "transformers-int8", "llama.cpp-Q8_0"),
    ("4-bit (int4 / Q4_0)", "leangen-int4", "transformers-int4", "llama.cpp-Q4_0"),
]
# Status prefix of a run repeated because other processes loaded the CPUs.
DISTURBED = "disturbed"
# Others' CPU share above which a run counts as disturbed (measure.IDLE_SHARE).
IDLE_SHARE = 0.15

# (key, column title, scale, format); the scale turns bytes into GB for the table.
_FIGURES = [
    ("load_seconds", "load (s)", 1, "{:.2f}"),
    ("first_token_seconds", "first token, whole process (s)", 1, "{:.2f}"),
    ("decode_tokens_per_second", "decode (tok/s)", 1, "{:.2f}"),
    ("peak_rss_bytes", "peak RSS (GB)", GB, "{:.2f}"),
    ("peak_anon_bytes", "peak anon RSS (GB)", GB, "{:.2f}"),
    ("wall_seconds", "process wall (s)", 1, "{:.1f}"),
]


def summarise(runs: list[dict], systems: list[str]) -> dict:
    """Per system: median/min/max of each figure over its completed runs."""
    out = {}
    for name in systems:
        mine = [r for r in runs if r["system"] == name and not r["status"].startswith(DISTURBED)]
        ok = [r for r in mine if r["status"] == "ok"]
        stats = {}
        for key, *_ in _FIGURES + [("generated_tokens", "", 1, "")]:
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                stats[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        out[name] = {"runs": len(mine), "ok": len(ok), "figures": stats,
                     "failures": sorted({r["status"] for r in mine if r["status"] != "ok"})}
    return out


def ratios_to(summary: dict, reference: str = "leangen") -> dict:
    """``system -> figure -> median(system) / median(reference)``."""
    ref = summary.get(reference, {}).get("figures", {})
    out = {}
    for name, s in summary.items():
        out[name] = {key: s["figures"][key]["median"] / ref[key]["median"]
                     for key in s["figures"] if key in ref and ref[key]["median"]}
    return out


def headline_table(summary: dict, ratios: dict) -> str:
    """The systems table; the README copies it as the headline."""
    head = "| system | " + " | ".join(title for _, title, *_ in _FIGURES) + " | runs ok |"
    rule = "|" + "---|" * (len(_FIGURES) + 2)
    rows = [head, rule]
    for name, s in summary.items():
        cells = [_cell(s["figures"].get(key), scale, fmt, ratios.get(name, {}).get(key), name)
                 for key, _, scale, fmt in _FIGURES]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {s['ok']}/{s['runs']} |")
    return "\n".join(rows)


def limits_table(limits: dict, model_bytes: int, summary: dict) -> str:
    bw, gemv, cache = (limits["memory_read_gb_per_s"], limits["gemv_bf16_gb_per_s"],
                       limits["page_cache_read_gb_per_s"])
    ceiling, practical = bw * GB / model_bytes, gemv * GB / model_bytes
    decode = summary.get("leangen", {}).get("figures", {}).get("decode_tokens_per_second")
    if "memory_read_buffer_bytes" in limits:  # 4 GiB, all threads, and one thread
        label = (f"memory read bandwidth (fp32 sum, {limits['memory_read_buffer_bytes'] / 2**30:.0f} GiB, "
                 f"{limits.get('torch_threads', '?')} threads)")
        one = (f"| memory read bandwidth, 1 thread | {limits['memory_read_one_thread_gb_per_s']:.1f} GB/s "
               "| what a single-threaded test reports |")
    else:
        label, one = "memory read bandwidth (fp32 sum, 1 GiB)", None
    rows = [
        "| limit | measured | implies |",
        "|---|---|---|",
        f"| {label} | {bw:.1f} GB/s | decode ceiling {ceiling:.2f} tok/s "
        f"for {model_bytes / GB:.2f} GB of weights |",
        *([one] if one else []),
        f"| bf16 GEMV bandwidth (`F.linear`, 1 token × 8192², eager) | {gemv:.1f} GB/s "
        f"| practical eager ceiling {practical:.2f} tok/s |",
        f"| page-cache read of the checkpoint (warm, `readinto`) | {cache:.1f} GB/s "
        f"| load floor {model_bytes / GB / cache:.2f} s for a loader that copies every byte |",
    ]
    if decode:
        median = decode["median"]
        rows.append(f"| leangen decode | {median:.2f} tok/s | {100 * median / ceiling:.0f}% of the "
                    f"bandwidth ceiling, {100 * median / practical:.0f}% of the GEMV ceiling |")
    return "\n".join(rows)


def targets_table(summary: dict, ratios: dict) -> str:
    """leangen's load and memory targets against transformers and torchtune, checked
    against the medians."""
    figures = {n: s["figures"] for n, s in summary.items()}
    checks = []

    def add(label, ok, detail):
        checks.append(f"| {label} | {'met' if ok else 'NOT met'} | {detail} |")

    lg = figures.get("leangen", {})
    for other, factor in (("transformers", 4), ("torchtune", 40)):
        r = ratios.get(other, {}).get("load_seconds")
        if r is not None:
            add(f"load ≥ {factor}x faster than {other}", r >= factor, f"{r:.1f}x")
    hf = figures.get("transformers", {})
    if "peak_anon_bytes" in lg and "peak_anon_bytes" in hf:
        a, b = lg["peak_anon_bytes"]["median"], hf["peak_anon_bytes"]["median"]
        add("peak anon RSS ≤ transformers'", a <= b, f"{a / GB:.2f} GB vs {b / GB:.2f} GB")
    if "decode_tokens_per_second" in lg and "decode_tokens_per_second" in hf:
        a, b = lg["decode_tokens_per_second"]["median"], hf["decode_tokens_per_second"]["median"]
        add("decode tok/s ≥ transformers'", a >= b, f"{a:.2f} vs {b:.2f} tok/s")
    if not checks:
        return ""
    return "\n".join(["| target | result | medians |", "|---|---|---|", *checks])


def bytes_per_token(shape: dict, weights: str) -> float | None:
    """Weight bytes one decode step reads in format ``weights`` (see BYTES_PER_WEIGHT)."""
    if weights not in BYTES_PER_WEIGHT or not shape:
        return None
    block, output = BYTES_PER_WEIGHT[weights]
    return shape["block_linear_params"] * block + shape["output_params"] * output


def decode_by_format_table(doc: dict) -> str:
    """leangen, transformers and llama.cpp decode at each bit width, each against the
    roofline: the measured bandwidth over the bytes its weight format reads per token."""
    figures = {n: s["figures"] for n, s in doc["summary"].items()}
    bw = doc["limits"]["memory_read_gb_per_s"] * GB
    shape, weights = doc["workload"].get("shape"), doc.get("weights", {})

    def rate(name):
        return figures.get(name, {}).get("decode_tokens_per_second", {}).get("median")

    def cell(name):
        r = rate(name)
        if r is None:
            return "—"
        need = bytes_per_token(shape, weights.get(name, ""))
        return f"{r:.2f} ({100 * r * need / bw:.0f}%)" if need else f"{r:.2f}"

    rows = ["| weights | leangen | transformers + torchao | llama.cpp | leangen / llama.cpp | "
            "roofline (leangen's format / llama.cpp's) |", "|---|---|---|---|---|---|"]
    for label, lg, hf, cpp in FORMAT_ROWS:
        if not any(rate(n) for n in (lg, hf, cpp)):
            continue
        ratio = f"{rate(lg) / rate(cpp):.2f}x" if rate(lg) and rate(cpp) else "—"
        roofs = [bytes_per_token(shape, weights.get(n, "")) for n in (lg, cpp)]
        roof = " / ".join(f"{bw / b:.1f}" for b in roofs if b) or "—"
        rows.append(f"| {label} | {cell(lg)} | {cell(hf)} | {cell(cpp)} | {ratio} | {roof} tok/s |")
    return "\n".join(rows)


def quantized_load_table(doc: dict) -> str:
    """leangen's streamed quantized load against a bf16 load quantized afterwards."""
    rows = ["| quantize | streamed load (s) | anon RSS after (GB) | bf16 load (s) | then quantize (s) "
            "| anon RSS after (GB) | Linears quantized / skipped |", "|---|---|---|---|---|---|---|"]
    for kind, prof in doc.get("quantize_profile", {}).items():
        post = prof.get("posthoc", {})
        counts = post.get("counts", {})
        rows.append(f"| {kind} | {prof['load_seconds']:.2f} | {prof['stages'][-1]['anon_bytes'] / GB:.2f} | "
                    f"{_num(post.get('bf16_load_seconds'), '{:.2f}')} | {_num(post.get('quantize_seconds'), '{:.2f}')} | "
                    f"{_num(post.get('anon_bytes'), '{:.2f}', GB)} | "
                    f"{counts.get('quantized', '—')} / {counts.get('skipped', '—')} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def llama_cpp_targets(doc: dict) -> str:
    """leangen's decode, quantized-load and low-RAM targets against llama.cpp, checked
    against the medians of this run."""
    figures = {n: s["figures"] for n, s in doc["summary"].items()}
    w, checks = doc["workload"], []

    def add(label, ok, detail):
        checks.append(f"| {label} | {'met' if ok else 'NOT met'} | {detail} |")

    def med(name, key):
        return figures.get(name, {}).get(key, {}).get("median")

    if w["preset"] == TARGET_PRESET:
        for _, lg, _, cpp in FORMAT_ROWS:
            a, b = med(lg, "decode_tokens_per_second"), med(cpp, "decode_tokens_per_second")
            if a and b:
                add(f"{lg} decode ≥ 0.8x {cpp}", a >= 0.8 * b, f"{a:.2f} vs {b:.2f} tok/s = {a / b:.2f}x")
            elif lg in figures and cpp in doc.get("skipped", {}):
                checks.append(f"| {lg} decode ≥ 0.8x {cpp} | not measured | {cpp} was skipped |")
        # From load_profile.py: the streamed load, then a bf16 load quantized afterwards, one
        # process, seconds apart, so both see the same machine (the runs may not).
        for kind, prof in doc.get("quantize_profile", {}).items():
            post = prof.get("posthoc", {})
            load, bf16_load, quant = prof.get("load_seconds"), post.get("bf16_load_seconds"), post.get("quantize_seconds")
            if load and bf16_load and quant:
                limit = 2 * bf16_load + quant
                run = med(f"leangen-{kind}", "load_seconds")
                seen = f"; in its benchmark run the load took {run:.2f} s" if run else ""
                add(f"first {kind} load ≤ 2x bf16 load + quantize time", load <= limit,
                    f"{load:.2f} s vs 2 × {bf16_load:.2f} + {quant:.2f} = {limit:.2f} s (load profile{seen})")
        cached = med("leangen-int4-cached", "load_seconds")
        if cached is not None:
            add("cached quantized load ≤ 1 s", cached <= 1, f"leangen-int4-cached {cached:.2f} s")
    if w["preset"] == LOW_RAM_PRESET:
        r = (doc["ratios"].get("transformers") or {}).get("load_seconds")
        anon = med("leangen", "peak_anon_bytes")
        if r is not None and anon is not None:
            add("bf16 load ≥ 4x faster than transformers, peak anon ≤ 0.5 GB", r >= 4 and anon <= 0.5 * GB,
                f"{r:.1f}x, {anon / GB:.2f} GB")
        cap = w.get("memory_cap_bytes")
        if cap and cap <= 6 * GB and "leangen-int4" in figures:
            done = doc["summary"]["leangen-int4"]["ok"]
            add(f"int4 completes under the {cap / GB:.0f} GB cap", done > 0,
                f"{done}/{doc['summary']['leangen-int4']['runs']} runs completed")
    if not checks:
        return ""
    return "\n".join(["| target | result | medians |", "|---|---|---|", *checks])


def llama_cpp_shortfalls(doc: dict) -> list[str]:
    """For each bit width where leangen decodes under 0.8x llama.cpp: how close each
    comes to its own roofline, from this run's figures."""
    figures = {n: s["figures"] for n, s in doc["summary"].items()}
    bw = doc["limits"]["memory_read_gb_per_s"] * GB
    shape, weights = doc["workload"].get("shape"), doc.get("weights", {})
    notes = []
    share = {}
    for r in doc["runs"]:
        if r["status"] == "ok" and r.get("background_cpu_share") is not None:
            share.setdefault(r["system"], []).append(r["background_cpu_share"])
    share = {k: statistics.median(v) for k, v in share.items()}
    for label, lg, _, cpp in FORMAT_ROWS:
        a = figures.get(lg, {}).get("decode_tokens_per_second", {}).get("median")
        b = figures.get(cpp, {}).get("decode_tokens_per_second", {}).get("median")
        need_a = bytes_per_token(shape, weights.get(lg, ""))
        need_b = bytes_per_token(shape, weights.get(cpp, ""))
        if not (a and b and need_a and need_b) or a >= 0.8 * b:
            continue
        notes.append(
            f"{label}: leangen decodes {a:.2f} tok/s against llama.cpp's {b:.2f} ({a / b:.2f}x). "
            f"leangen's weights need {need_a / GB:.2f} GB per token and it moves {a * need_a / GB:.1f} GB/s "
            f"({100 * a * need_a / bw:.0f}% of the measured bandwidth); llama.cpp's need "
            f"{need_b / GB:.2f} GB and it moves {b * need_b / GB:.1f} GB/s ({100 * b * need_b / bw:.0f}%). "
            + _contention_verdict(share.get(lg), share.get(cpp)))
    first = {n: figures.get(n, {}).get("first_token_seconds", {}).get("median") for n in ("leangen", "llama.cpp-bf16")}
    stages = {s["stage"].split(" ")[0]: s for s in (doc.get("load_profile") or {}).get("stages", [])}
    if all(first.values()) and first["leangen"] > first["llama.cpp-bf16"] and "import" in stages:
        notes.append(f"First token, whole process: leangen {first['leangen']:.2f} s, llama.cpp "
                     f"{first['llama.cpp-bf16']:.2f} s; importing torch, torchtune and torchao alone takes "
                     f"{stages['import']['seconds']:.2f} s in leangen's process.")
    return notes


def _contention_verdict(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    if max(a, b) <= IDLE_SHARE:
        return "Both ran undisturbed: the gap is the matmul kernels' efficiency, not the bytes."
    return (f"Other processes used {a:.0%} of the CPUs during leangen's run and {b:.0%} during "
            "llama.cpp's, so this run cannot separate the kernels' efficiency from contention; "
            "re-measure on a quiet machine.")


def load_profile_table(profile: dict) -> str:
    """benchmarks/load_profile.py's stages: seconds and anonymous memory after each."""
    rows = ["| stage | seconds | anon RSS after (GB) | what it made |", "|---|---|---|---|"]
    for s in profile["stages"][1:]:
        made = f"{s['bytes'] / GB:.3f} GB" if "bytes" in s else ""
        made += f" in {s['tensors']} tensors" if "tensors" in s else ""
        rows.append(f"| {s['stage']} | {s['seconds']:.3f} | {s['anon_bytes'] / GB:.3f} | {made} |")
    rows.append(f"| **load (build to move)** | **{profile['load_seconds']:.3f}** | | |")
    return "\n".join(rows)


def shortfall_notes(summary: dict, ratios: dict, profile: dict | None) -> list[str]:
    """For each missed target, the measured stage or limit that accounts for it."""
    figures = {n: s["figures"] for n, s in summary.items()}
    lg, hf = figures.get("leangen", {}), figures.get("transformers", {})
    stages = {s["stage"].split(" ")[0]: s for s in (profile or {}).get("stages", [])}
    notes = []
    slow_load = any((ratios.get(o, {}).get("load_seconds") or 1e9) < f
                    for o, f in (("transformers", 4), ("torchtune", 40)))
    if slow_load and "move:" in stages and "buffers" in stages:
        move, rope = stages["move:"], stages["buffers"]
        notes.append(
            f"Load: of {profile['load_seconds']:.2f} s, {move['seconds']:.2f} s copy the q/k weights "
            f"({move['bytes'] / GB:.2f} GB): HF stores them for rotate-half RoPE and torchtune's "
            f"RoPE wants interleaved rows, so they cannot stay mmap views; {rope['seconds']:.2f} s "
            "is torchtune's own rope_init() building the cache for the builder's whole max_seq_len "
            "(an eager build pays the same). The rest of the load is the mmap and assign.")
    if "peak_anon_bytes" in lg and "peak_anon_bytes" in hf and \
            lg["peak_anon_bytes"]["median"] > hf["peak_anon_bytes"]["median"] and "import" in stages:
        imports, move = stages["import"]["anon_bytes"], stages.get("move:", {}).get("bytes", 0)
        notes.append(
            f"Anonymous memory: importing torch and torchtune (which imports torchao and "
            f"torch._dynamo) already holds {imports / GB:.2f} GB before anything is loaded; the "
            f"q/k copies add {move / GB:.2f} GB and the RoPE cache "
            f"{stages.get('buffers', {}).get('bytes', 0) / GB:.3f} GB. transformers' whole process "
            f"peaks at {hf['peak_anon_bytes']['median'] / GB:.2f} GB.")
    first = "first_token_seconds"
    if first in lg and first in hf and lg[first]["median"] > hf[first]["median"] and "import" in stages:
        notes.append(
            f"First token, whole process: {lg[first]['median']:.2f} s against transformers' "
            f"{hf[first]['median']:.2f} s. Importing torch, torchtune and torchao takes "
            f"{stages['import']['seconds']:.2f} s of it (stage table); "
            "torchtune's package imports torchao unconditionally, so every torchtune builder pays it.")
    if "decode_tokens_per_second" in lg and "decode_tokens_per_second" in hf and \
            lg["decode_tokens_per_second"]["median"] < hf["decode_tokens_per_second"]["median"]:
        notes.append("Decode: both run eager bf16 GEMVs through torch; see the limits table for "
                     "how close each is to the GEMV ceiling on this run.")
    return notes


def write_results(path_md: Path, document: dict) -> None:
    """The markdown and, beside it, the JSON; both from the same document."""
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text(render_markdown(document))
    json_path(path_md).write_text(json.dumps(document, indent=2) + "\n")


def json_path(path_md: Path) -> Path:
    """RESULTS.md -> results.json, RESULTS_small.md -> results_small.json."""
    return path_md.with_name(path_md.stem.lower() + ".json")


def render_markdown(doc: dict) -> str:
    summary, ratios, meta = doc["summary"], doc["ratios"], doc["meta"]
    w = doc["workload"]
    parts = [
        f"# Benchmark results: `{w['preset']}` preset",
        "",
        f"Measured {meta['date']} on {meta['machine']}. {meta['software']}.",
        "",
        f"Workload: random-weight `{w['preset']}` checkpoint ({w['model_bytes'] / GB:.2f} GB bf16, "
        f"{w['shards']} safetensors shards), prompt of {w['prompt_token_count']} tokens (the same ids "
        f"in every system), greedy, {w['new_tokens']} new tokens, bf16, CPU, {meta['reps']} repetition(s) "
        "interleaved system by system, each run a fresh process, page cache warm.",
        "",
        "Each cell: median (min–max) [system's median / leangen's median: above 1 means more "
        "seconds, more memory, or more tokens/s than leangen].",
        "",
        headline_table(summary, ratios),
        "",
        "## Limits (measured in the same run)",
        "",
        limits_table(doc["limits"], w["model_bytes"], summary),
    ]
    if any(n in summary for _, *names in FORMAT_ROWS for n in names if n != "leangen"):
        parts += ["", "## Decode by weight format", "",
                  "Median tokens/s, and in brackets the share of the roofline that the system's "
                  "weight format allows: the measured memory bandwidth over the bytes one decode step "
                  "reads (block matmuls plus the output projection, scales included; "
                  "`report.BYTES_PER_WEIGHT`). llama.cpp's Q4_0 file keeps the output at Q6_K "
                  "(llama-quantize's default).", "", decode_by_format_table(doc)]
    if w.get("memory_cap_bytes"):
        parts += ["", "## Low-RAM scenario", "", low_ram_summary(doc["runs"], w["memory_cap_bytes"])]
    cpp_targets = llama_cpp_targets(doc)
    if cpp_targets:
        parts += ["", "## Targets against llama.cpp", "", cpp_targets]
        shortfalls = llama_cpp_shortfalls(doc)
        if shortfalls:
            parts += ["", "Where leangen falls short of llama.cpp:", "", *[f"- {n}" for n in shortfalls]]
    targets = targets_table(summary, ratios) if w["preset"] == TARGET_PRESET else ""
    if targets:
        parts += ["", "## Targets against transformers and torchtune", "", targets]
    if quantized_load_table(doc):
        parts += ["", "## leangen's quantized load", "",
                  "The streamed load quantizes each Linear as it comes off the mmap "
                  "(`benchmarks/load_profile.py --quantize`); for comparison, the same files loaded "
                  "in bf16 and then quantized with the same torchao configs, in the same process.",
                  "", quantized_load_table(doc)]
    if doc.get("load_profile"):
        parts += ["", "## leangen's load, stage by stage", "", load_profile_table(doc["load_profile"])]
    shortfalls = shortfall_notes(summary, ratios, doc.get("load_profile"))
    if targets and shortfalls:
        parts += ["", "## Where leangen falls short, and why", "", *[f"- {n}" for n in shortfalls]]
    parts += ["", "## Runs", "", _runs_table(doc["runs"])]
    parts += ["", "## Checks", "", *[f"- {c}" for c in doc["checks"]]]
    if doc.get("analysis"):
        parts += ["", "## Analysis", "", *doc["analysis"]]
    if doc.get("notes"):
        parts += ["", "## Notes", "", *[f"- {n}" for n in doc["notes"]]]
    if doc.get("see_also"):
        parts += ["", "## Other presets", "", *[f"- [{name}]({name})" for name in doc["see_also"]]]
    parts += ["", "## How each figure is measured", "", doc["boundaries"].strip()]
    parts += ["", "## Commands", "", "```", *doc["commands"], "```"]
    for name, text in doc.get("configs", {}).items():
        parts += ["", f"`{name}`:", "", "```yaml", text.rstrip(), "```"]
    parts.append("")
    return "\n".join(parts)


def low_ram_summary(runs: list[dict], cap_bytes: int) -> str:
    """Which systems completed under the cap, and with what peak memory."""
    kept = [r for r in runs if not r["status"].startswith(DISTURBED)]
    done = sorted({r["system"] for r in kept if r["status"] == "ok"})
    failed = sorted({r["system"] for r in kept if r["status"] != "ok"} - set(done))
    lines = [f"Each system ran under a hard {cap_bytes / GB:.1f} GB cgroup memory cap on this "
             "machine; peak figures are from the run's own process tree.",
             f"Completed: {', '.join(done) or 'none'}. Did not complete: {', '.join(failed) or 'none'}.", ""]
    for r in runs:
        if r["status"].startswith(DISTURBED):
            continue
        cap = r.get("cap") or {}
        outcome = "completed" if r["status"] == "ok" else r["status"]
        lines.append(f"- {r['system']} (rep {r['rep']}): {outcome}; peak RSS "
                     f"{_num(r.get('peak_rss_bytes'), '{:.2f}', GB)} GB, peak anon "
                     f"{_num(r.get('peak_anon_bytes'), '{:.2f}', GB)} GB, cgroup peak "
                     f"{_num(cap.get('peak_bytes'), '{:.2f}', GB)} GB.")
    return "\n".join(lines)


def _runs_table(runs: list[dict]) -> str:
    rows = ["| rep | system | status | load (s) | first token (s) | decode (tok/s) | tokens | "
            "peak RSS (GB) | peak anon (GB) | cap peak (GB) | others' CPU | idle wait (s) |",
            "|" + "---|" * 12]
    for r in runs:
        cap = r.get("cap") or {}
        rows.append("| " + " | ".join([
            str(r["rep"]), r["system"], r["status"], _num(r.get("load_seconds"), "{:.2f}"),
            _num(r.get("first_token_seconds"), "{:.2f}"), _num(r.get("decode_tokens_per_second"), "{:.2f}"),
            _num(r.get("generated_tokens"), "{}"), _num(r.get("peak_rss_bytes"), "{:.2f}", GB),
            _num(r.get("peak_anon_bytes"), "{:.2f}", GB), _num(cap.get("peak_bytes"), "{:.2f}", GB),
            _num(r.get("background_cpu_share"), "{:.0%}"), _num(r.get("idle_wait_seconds"), "{:.0f}"),
        ]) + " |")
    return "\n".join(rows)


def _cell(stat: dict | None, scale: float, fmt: str, ratio: float | None, name: str) -> str:
    if not stat:
        return "—"
    med, lo, hi = (fmt.format(stat[k] / scale) for k in ("median", "min", "max"))
    text = f"{med} ({lo}–{hi})"
    if ratio is not None and name != "leangen":
        text += f" [{ratio:.2f}x]"
    return text


def _num(value, fmt: str, scale: float = 1) -> str:
    if value is None:
        return "—"
    return fmt.format(value / scale if scale != 1 else value)
