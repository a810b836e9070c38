"""GGUF files for llama.cpp, made from the preset's HF checkpoint with llama.cpp's own tools.

- bf16: ``convert_hf_to_gguf.py --outtype bf16``, the converter vendored in the
  llama-cpp-python sdist of the installed version (``vendor/llama.cpp/``, with its
  ``gguf-py``). The sdist is fetched once with ``pip download --no-binary :all:``.
- Q8_0 and Q4_0: llama-quantize through the binding (``llama_model_quantize``,
  ``benchmarks/llamacpp_driver.py quantize``) from the bf16 file, with its defaults:
  for Q4_0 that keeps the output projection (the tied embedding for Llama 3.2) at Q6_K.
  When the run needs no bf16 file (the low-RAM runs of a 7B model), the converter
  writes Q8_0 itself (``--outtype q8_0``) and Q4_0 is requantized from it, which saves
  writing a 14.5 GB bf16 file; the weights are random, so only the format matters.

The converter reads the tokenizer only to copy the vocabulary into the file. It takes
a SentencePiece ``tokenizer.model`` (the ``small`` and ``mistral7b`` presets) as is.
Llama 3's tiktoken file is neither SentencePiece nor an HF ``tokenizer.json`` whose
pre-tokenizer it knows, so for that preset it gets a small SentencePiece model and pads
the vocabulary to ``vocab_size`` itself. Every system is handed the same prompt ids and
returns ids, so the vocabulary's text never matters; its size does, and is the same.

Files are cached under ``<cache>/gguf/<preset>/``, keyed by the checkpoint's fingerprint
and the llama-cpp-python version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from benchmarks.tokenizer_files import TOKENIZER_FILE, train_sentencepiece

TYPES = ("bf16", "Q8_0", "Q4_0")
_DRIVER = Path(__file__).resolve().parent / "llamacpp_driver.py"
_PACKAGE = "llama-cpp-python"


def installed_version() -> str | None:
    """llama-cpp-python's version, or None when the bench extra is not installed."""
    try:
        return metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def gguf_path(cache_root: Path, preset_name: str, kind: str) -> Path:
    return cache_root / "gguf" / preset_name / f"model-{kind}.gguf"


def ensure_ggufs(checkpoint: Path, cache_root: Path, preset_name: str, kinds: list[str],
                 threads: int, log=print) -> dict[str, Path]:
    """The GGUF files for ``kinds`` (a subset of TYPES), made first where missing or stale."""
    version = installed_version()
    if version is None:
        raise RuntimeError(f"{_PACKAGE} is not installed (pip install -e '.[bench]')")
    out_dir = cache_root / "gguf" / preset_name
    key = f"{_fingerprint(checkpoint)} {_PACKAGE}=={version}"
    marker = out_dir / ".complete"
    if not (marker.exists() and marker.read_text() == key):
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: gguf_path(cache_root, preset_name, kind) for kind in kinds}
    # The file the converter writes and the others are quantized from.
    base_kind = "bf16" if "bf16" in kinds or gguf_path(cache_root, preset_name, "bf16").exists() else "Q8_0"
    base = gguf_path(cache_root, preset_name, base_kind)
    missing = [k for k, p in paths.items() if not p.exists()]
    if missing and not base.exists():
        converter = converter_script(cache_root, version, log)
        log(f"converting {checkpoint.name} to GGUF {base_kind} with {converter.parent.parent.parent.name}'s "
            "convert_hf_to_gguf.py")
        staging = _staging_dir(checkpoint, out_dir / "hf")
        _run([sys.executable, str(converter), str(staging), "--outtype", base_kind.lower(),
              "--outfile", str(base) + ".partial"])
        Path(str(base) + ".partial").rename(base)
    for kind in missing:
        if kind == base_kind:
            continue
        log(f"quantizing GGUF {base_kind} to {kind} (llama_model_quantize, {threads} threads)")
        partial = str(paths[kind]) + ".partial"
        requantize = ["--allow-requantize"] if base_kind != "bf16" else []
        _run([sys.executable, str(_DRIVER), "quantize", str(base), partial, kind,
              "--threads", str(threads), *requantize])
        Path(partial).rename(paths[kind])
    if base_kind not in kinds and base.exists():
        base.unlink()  # the files asked for are made; do not keep another copy of the weights
    marker.write_text(key)
    return paths


def converter_script(cache_root: Path, version: str, log=print) -> Path:
    """``convert_hf_to_gguf.py`` from the sdist of ``version`` (with ``conversion/`` and
    ``gguf-py/`` beside it), downloaded and extracted once."""
    root = cache_root / f"llama-cpp-python-{version}-converter"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        log(f"fetching the {_PACKAGE} {version} sdist for its vendored converter")
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"{_PACKAGE}=={version}", "-d", tmp])
        sdist = next(Path(tmp).glob("*.tar.gz"))
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/models/ggml-vocab-")
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if rel.startswith(keep) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(partial, members=members, filter="data")
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    return script


def _staging_dir(checkpoint: Path, staging: Path) -> Path:
    """The checkpoint's files as symlinks, and a tokenizer.model the converter can read."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.name != TOKENIZER_FILE and not f.name.startswith("."):
            (staging / f.name).symlink_to(f.resolve())
    source = checkpoint / TOKENIZER_FILE
    if _is_sentencepiece(source):
        (staging / TOKENIZER_FILE).symlink_to(source.resolve())
    else:
        train_sentencepiece(staging / TOKENIZER_FILE, 1024)
    return staging


def _is_sentencepiece(path: Path) -> bool:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
        return True
    except (OSError, RuntimeError):
        return False


def _fingerprint(checkpoint: Path) -> str:
    marker = checkpoint / ".complete"
    return marker.read_text().strip() if marker.exists() else str(checkpoint.stat().st_mtime_ns)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed (exit {done.returncode}):\n{tail}")
