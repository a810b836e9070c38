"""The quantized cache (leangen.quant.cache): written once, then mmap'd instead of quantizing."""

from __future__ import annotations

import json
import os
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import copy_checkpoint, load_demo
from tiny_models import mapped_file as _mapped_file

import leangen
import leangen.quant.cache as quant_cache
from leangen.errors import ConfigError
from leangen.quant.cache import QuantCacheWarning, cache_dir
from leangen.quant.quantize import Quantizer

TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 3]])


def load(ckpt, **kwargs) -> torch.nn.Module:
    return leangen.load_model(ckpt.builder, ckpt.path, **{**ckpt.builder_kwargs, **kwargs})


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def status(model: torch.nn.Module) -> str:
    return model.leangen.quant_cache["status"]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def cache_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, QuantCacheWarning)]


def load_warned(ckpt, **kwargs) -> tuple[torch.nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(ckpt, **kwargs)
    return model, cache_warnings(caught)


@pytest.fixture
def own_checkpoint(tiny_checkpoint, tmp_path):
    """A tiny tied llama3_2 checkpoint this test may change (touch, overwrite)."""
    return copy_checkpoint(tiny_checkpoint("llama3_2"), tmp_path / "checkpoint")


# -- a hit is the same model, made without quantizing ------------------------------------

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_cached_load_gives_bit_identical_logits(tiny_checkpoint, cache_home, kind, tied):
    ckpt = tiny_checkpoint("llama3_2", tied=tied)
    fresh = load(ckpt, quantize=kind)
    written = load(ckpt, quantize=kind, quantize_cache="auto")
    hit = load(ckpt, quantize=kind, quantize_cache="auto")
    assert (status(fresh), status(written), status(hit)) == ("off", "written", "hit")
    assert len(entries(cache_home / "leangen")) == 1
    assert hit.leangen.quantized == fresh.leangen.quantized == {"quantized": 15, "skipped": 0}
    assert type(hit.output.weight) is type(fresh.output.weight) is not torch.nn.Parameter
    assert torch.equal(logits(hit), logits(fresh)) and torch.equal(logits(written), logits(fresh))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_row_chunked_weights_are_cached_and_read_back_as_the_whole_layers(tiny_checkpoint, cache_home,
                                                                          monkeypatch, kind):
    """Quantized in 64-row chunks (leangen.quant.quantize.CHUNK_BYTES), the joined tensors are
    written and read back like whole-layer ones: the same logits as quantizing whole."""
    import leangen.quant.quantize as quantize

    ckpt = tiny_checkpoint("llama3_2")  # tied: the 128-row output is chunked in untie
    whole = logits(load(ckpt, quantize=kind))
    monkeypatch.setattr(quantize, "CHUNK_BYTES", 1)
    written = load(ckpt, quantize=kind, quantize_cache="auto")
    hit = load(ckpt, quantize=kind, quantize_cache="auto")
    assert (status(written), status(hit)) == ("written", "hit")
    assert torch.equal(logits(written), whole) and torch.equal(logits(hit), whole)


def test_a_pickled_checkpoint_is_cached_too(tiny_checkpoint):
    ckpt = tiny_checkpoint("llama", fmt="bin")  # untied llama2, pytorch_model*.bin: no header to hash
    fresh = load(ckpt, quantize="int4")
    assert status(load(ckpt, quantize="int4", quantize_cache="auto")) == "written"
    hit = load(ckpt, quantize="int4", quantize_cache="auto")
    assert status(hit) == "hit" and torch.equal(logits(hit), logits(fresh))


def test_a_hit_quantizes_nothing_and_only_the_linears_come_from_the_cache(tiny_checkpoint, cache_home,
                                                                          monkeypatch):
    ckpt = tiny_checkpoint("llama3_2")  # tied: the output is a Linear of its own from the cache
    load(ckpt, quantize="int8", quantize_cache="auto")

    def refuse(*args):
        raise AssertionError("a cache hit quantized or wrote")

    monkeypatch.setattr(Quantizer, "quantize_linear", refuse)
    monkeypatch.setattr(quant_cache, "_atomic_save", refuse)  # a hit writes nothing either
    model = load(ckpt, quantize="int8", quantize_cache="auto")
    assert status(model) == "hit"
    entry = str(entries(cache_home / "leangen")[0].resolve())
    shards = {str(f.resolve()) for f in ckpt.path.glob("*.safetensors")}
    quantized = 0
    for name, p in model.named_parameters():
        if type(p) is torch.nn.Parameter:  # embedding, norms: still the checkpoint's mmap
            assert _mapped_file(p)[0] in shards, name
        else:  # the packed int8 rows and their scales: the cache file's mmap
            quantized += 1
            assert _mapped_file(p.tensor_impl.int_data)[0] == entry, name
            assert _mapped_file(p.tensor_impl.scale)[0] == entry, name
    assert quantized == 15


def test_a_hit_reads_no_full_precision_linear_weight(own_checkpoint):
    """Zero every Linear weight in the checkpoint's files, keeping their size, header and
    mtime (the key): a hit still gives the same logits, so it never read those bytes."""
    first = load(own_checkpoint, quantize="int8", quantize_cache="auto")
    for shard in own_checkpoint.path.glob("*.safetensors"):
        _zero_tensors(shard, lambda name: name.endswith("proj.weight"))
    hit = load(own_checkpoint, quantize="int8", quantize_cache="auto")
    assert status(hit) == "hit" and torch.equal(logits(hit), logits(first))
    assert not torch.equal(logits(load(own_checkpoint, quantize="int8")), logits(first))  # zeroing shows


def _zero_tensors(path: Path, which) -> None:
    stat = path.stat()
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__" and which(name):
                start, end = info["data_offsets"]
                f.seek(8 + length + start)
                f.write(bytes(end - start))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# -- where it lives ----------------------------------------------------------------------

def test_auto_is_xdg_cache_home_else_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("auto") == tmp_path / "xdg" / "leangen"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset_or_relative in ("", "relative/cache"):  # the XDG spec ignores a relative one
        monkeypatch.setenv("XDG_CACHE_HOME", unset_or_relative)
        assert cache_dir("auto") == tmp_path / "home" / ".cache" / "leangen"
    assert cache_dir("~/elsewhere") == tmp_path / "home" / "elsewhere"
    assert cache_dir(None) is None and cache_dir("null") is None


def test_a_folder_can_be_given_and_null_turns_the_cache_off(tiny_checkpoint, cache_home, tmp_path):
    ckpt = tiny_checkpoint("llama3_2")
    model = load(ckpt, quantize="int8", quantize_cache=tmp_path / "mine")
    assert status(model) == "written" and len(entries(tmp_path / "mine")) == 1
    assert model.leangen.quant_cache["file"] == str(entries(tmp_path / "mine")[0])
    for off in (None, "null"):
        assert status(load(ckpt, quantize="int4", quantize_cache=off)) == "off"
    assert status(load(ckpt, quantize_cache="auto")) == "off"  # nothing quantized, nothing cached
    assert not (cache_home / "leangen").exists()


def test_the_checkpoint_folder_is_never_written(tiny_checkpoint, digest):
    ckpt = tiny_checkpoint("llama3_2")
    before = digest(ckpt.path)
    for kind in ("int8", "int4", "int8"):
        load(ckpt, quantize=kind, quantize_cache="auto")
    assert digest(ckpt.path) == before  # same listing, same bytes
    for inside in (ckpt.path, ckpt.path / "cache"):
        with pytest.raises(ConfigError, match="never writes"):
            load(ckpt, quantize="int8", quantize_cache=inside)
    assert digest(ckpt.path) == before


# -- what invalidates it -----------------------------------------------------------------

def test_a_changed_file_or_version_is_stale_and_rebuilt_in_place(own_checkpoint, cache_home, monkeypatch):
    load(own_checkpoint, quantize="int8", quantize_cache="auto")
    [entry] = entries(cache_home / "leangen")
    shard = sorted(own_checkpoint.path.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # touched
    model, warned = load_warned(own_checkpoint, quantize="int8", quantize_cache="auto")
    assert status(model) == "written" and warned == [f"quantized cache {entry} is stale (files changed); "
                                                      "rebuilding it."]
    real = quant_cache._versions()
    monkeypatch.setattr(quant_cache, "_versions", lambda: {**real, "torchao": "99.0"})
    model, warned = load_warned(own_checkpoint, quantize="int8", quantize_cache="auto")
    assert status(model) == "written" and len(warned) == 1 and "(versions changed)" in warned[0]
    assert entries(cache_home / "leangen") == [entry]  # replaced, not piled up
    model, warned = load_warned(own_checkpoint, quantize="int8", quantize_cache="auto")
    assert status(model) == "hit" and warned == []


def test_a_changed_header_is_stale(own_checkpoint):
    """Same size and mtime, another header (its metadata, here): the header's hash tells."""
    load(own_checkpoint, quantize="int8", quantize_cache="auto")
    shard = sorted(own_checkpoint.path.glob("*.safetensors"))[0]
    stat, data = shard.stat(), shard.read_bytes()
    assert b'"format":"pt"' in data[:4096]
    shard.write_bytes(data.replace(b'"format":"pt"', b'"format":"PT"', 1))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    model, warned = load_warned(own_checkpoint, quantize="int8", quantize_cache="auto")
    assert status(model) == "written" and len(warned) == 1 and "(files changed)" in warned[0]


def test_other_settings_are_other_entries(tiny_checkpoint, cache_home):
    ckpt = tiny_checkpoint("llama3_2")
    settings = [dict(quantize="int8"), dict(quantize="int4"),
                dict(quantize=leangen.quant.quantize.QuantSpec("int4", group_size=64)),
                dict(quantize="int8", dtype="bf16"), dict(quantize="int8", max_seq_len=256)]
    for setting in settings:
        model, warned = load_warned(ckpt, quantize_cache="auto", **setting)
        assert status(model) == "written" and warned == []
    assert len(entries(cache_home / "leangen")) == len(settings)
    for setting in settings:
        assert status(load(ckpt, quantize_cache="auto", **setting)) == "hit"


def test_an_int4_entry_is_named_by_the_groups_its_layers_use(tiny_checkpoint, cache_home, capfd):
    """The tiny model is 64 wide with a 128-wide MLP: group 128 fits only its down
    projections, the other 13 Linears fall back to 64; a hit reports what quantizing did."""
    ckpt = tiny_checkpoint("llama3_2")
    capfd.readouterr()  # transformers' progress bars, when this test made the checkpoint
    asked_128 = leangen.quant.quantize.QuantSpec("int4", group_size=128)
    written = load(ckpt, quantize=asked_128, quantize_cache="auto")
    hit = load(ckpt, quantize=asked_128, quantize_cache="auto")
    assert (status(written), status(hit)) == ("written", "hit")
    [entry] = entries(cache_home / "leangen")
    assert "-int4-g128-g64-" in entry.name
    done, read = written.leangen.quantization, hit.leangen.quantization
    assert (read.counts, read.groups, read.fallbacks) == (done.counts, done.groups, done.fallbacks)
    assert read.description == done.description == "int4 g128 (g64 on 13 of 15 Linears: in_features 64)"
    assert read.groups == {128: 2, 64: 13}
    notes = capfd.readouterr().err.splitlines()
    assert len(notes) == 2 and notes[0] == notes[1]  # once per load, the hit included
    assert notes[0].startswith("note: int4 group 128 does not divide every layer's inputs: group 64 on "
                               "13 of 15 Linears (in_features 64).")
    load(ckpt, quantize="int4", quantize_cache="auto")  # the default group, 32, fits every layer
    assert [e.name for e in entries(cache_home / "leangen") if "-int4-g32-" in e.name] != []
    assert capfd.readouterr().err == ""


def test_the_key_says_which_groups_a_width_takes(tmp_path):
    """Asked for the same group, a model its group divides and one it does not are two
    entries: the fallback is in the key and the file name, not only in the setting."""
    from leangen.quant.quantize import QuantSpec

    (tmp_path / "checkpoint").mkdir()
    files = (tmp_path / "checkpoint" / "model.safetensors",)
    save_file({"x": torch.zeros(1)}, str(files[0]))
    quantizer = Quantizer(QuantSpec("int4", group_size=128), torch.device("cpu"), torch.bfloat16)
    entry = {}
    for width in (256, 576):
        with torch.device("meta"):
            model = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.Linear(256, 64))
        entry[width] = quant_cache.open_cache(tmp_path / "cache", files, None, quantizer, torch.bfloat16, model)
    assert entry[256].key["quantize"] == {"kind": "int4", "groups_used": [128]}
    assert entry[576].key["quantize"] == {"kind": "int4", "groups_used": [128, 64]}
    assert "-int4-g128-bfloat16-" in entry[256].path.name
    assert "-int4-g128-g64-bfloat16-" in entry[576].path.name


# -- corrupt and unwritable --------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"
    path.write_bytes(bytes(data))


def _rewrite(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def _drop_a_tensor(path: Path) -> None:
    _rewrite(path, lambda t: t.pop(next(k for k in t if k.endswith("int_data"))))


def _wrong_shape(path: Path) -> None:
    def change(tensors):
        name = next(k for k in tensors if k.endswith("int_data"))
        tensors[name] = tensors[name][:-1].contiguous()
    _rewrite(path, change)


def _foreign_class(path: Path) -> None:
    """A tampered entry naming a class outside torchao must not get it imported."""
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()
    entry = json.loads(meta["leangen"])
    next(iter(entry["weights"].values()))["class"] = "os:system"
    save_file(tensors, str(path), metadata={"leangen": json.dumps(entry)})


@pytest.mark.parametrize("corrupt, reason", [
    (_truncate, ""), (_bad_header, ""), (_drop_a_tensor, "int_data"),
    (_wrong_shape, "not int8 ["), (_foreign_class, "os:system is not torchao's"),
])
def test_a_corrupt_entry_is_reported_in_one_line_and_rebuilt(tiny_checkpoint, cache_home, corrupt, reason):
    ckpt = tiny_checkpoint("llama3_2")
    reference = logits(load(ckpt, quantize="int8", quantize_cache="auto"))
    [entry] = entries(cache_home / "leangen")
    corrupt(entry)
    model, warned = load_warned(ckpt, quantize="int8", quantize_cache="auto")
    assert status(model) == "written" and len(warned) == 1 and "\n" not in warned[0]
    assert warned[0].startswith(f"quantized cache {entry} is corrupt (") and reason in warned[0]
    assert warned[0].endswith("rebuilding it.")
    again = load(ckpt, quantize="int8", quantize_cache="auto")
    assert status(again) == "hit" and torch.equal(logits(again), reference)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp files left


def test_an_unwritable_cache_folder_warns_once_and_the_run_goes_on(tiny_checkpoint, read_only_dir):
    ckpt = tiny_checkpoint("llama3_2")
    reference = logits(load(ckpt, quantize="int4"))
    for folder in (read_only_dir, read_only_dir / "sub"):  # can't write; can't even create
        model, warned = load_warned(ckpt, quantize="int4", quantize_cache=folder)
        assert status(model) == "off" and len(warned) == 1 and "\n" not in warned[0]
        assert warned[0].startswith(f"cannot write the quantized cache {folder}/")
        assert torch.equal(logits(model), reference)
    assert list(read_only_dir.iterdir()) == []


def test_a_failed_write_leaves_neither_an_entry_nor_a_temp_file(tiny_checkpoint, cache_home, monkeypatch):
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    model, warned = load_warned(tiny_checkpoint("llama3_2"), quantize="int8", quantize_cache="auto")
    assert status(model) == "off" and len(warned) == 1 and "No space left on device" in warned[0]
    assert list((cache_home / "leangen").iterdir()) == []


# -- the recipes ---------------------------------------------------------------------------

def test_the_recipes_write_then_hit_the_cache_and_say_so(capsys, cache_home, tmp_path):
    from tiny_models import GOLDEN_IDS
    from tiny_models import run_recipe as run

    from leangen.eval import main as eval_main

    out, metrics = tmp_path / "out.jsonl", tmp_path / "metrics.json"
    for expected in ("written", "hit"):
        code, _, err = run(capsys, "--config", "demo", "quantize=int8", f"output_file={out}",
                           f"metrics_file={metrics}")
        assert code == 0, err
        figures = json.loads(metrics.read_text())
        [entry] = entries(cache_home / "leangen")
        assert figures["quantize_cache"] == expected and figures["quantize_cache_file"] == str(entry)
        assert json.loads(out.read_text())["tokens"] == GOLDEN_IDS
        assert err.count("\n") == 1 and ("quantized cache hit" if expected == "hit"
                                          else f"quantized cache written: {entry}") in err
        assert " | int8 | " in err and figures["quantization"]["description"] == "int8"
    results = tmp_path / "eval.json"
    for setting, expected in (("null", "off"), ("auto", "written"), ("auto", "hit")):
        code, _, err = run(capsys, "--config", "eval_demo", "~lm_eval", "quantize=int8",
                           f"quantize_cache={setting}", f"output_file={results}", recipe=eval_main)
        assert code == 0, err
        assert json.loads(results.read_text())["metrics"]["quantize_cache"] == expected
        assert " | int8 | " in err


def test_the_recipes_report_the_int4_groups_used(capsys, cache_home, tmp_path):
    """The demo is 64 and 192 wide: the default group (32) fits; 128 falls back to 64
    everywhere, which a note says once and the summary and the metrics carry."""
    from tiny_models import run_recipe as run

    from leangen.eval import main as eval_main

    metrics, results = tmp_path / "metrics.json", tmp_path / "eval.json"
    code, _, err = run(capsys, "--config", "demo", "quantize=int4", f"metrics_file={metrics}")
    assert code == 0, err
    assert err.count("\n") == 1 and " | int4 g32 | " in err
    figures = json.loads(metrics.read_text())["quantization"]
    assert (figures["group_size"], figures["groups"], figures["fallbacks"]) == (32, {"32": 15}, {})
    assert "-int4-g32-" in json.loads(metrics.read_text())["quantize_cache_file"]
    for cache in ("null", "auto", "auto"):  # quantized, written, hit: each says it
        code, _, err = run(capsys, "--config", "eval_demo", "~lm_eval", "quantize=int4",
                           "quantize_group_size=128", f"quantize_cache={cache}",
                           f"output_file={results}", recipe=eval_main)
        assert code == 0, err
        lines = err.splitlines()  # the note, eval's progress bar, the summary
        note, line = lines[0], lines[-1]
        assert [n for n in lines if n.startswith("note:")] == [note]
        assert note.startswith("note: int4 group 128 does not divide every layer's inputs: group 64 on "
                               "15 of 15 Linears (in_features 64, 192).")
        assert " | int4 g128 (g64 on 15 of 15 Linears: in_features 64, 192) | " in line
        figures = json.loads(results.read_text())["metrics"]["quantization"]
        assert (figures["group_size"], figures["groups"]) == (128, {"64": 15})


def test_version_of_a_source_tree_run(monkeypatch):
    """Run from a checkout on PYTHONPATH (as on a lent GPU machine), leangen has no
    installed metadata: the key then names its source instead of failing the load."""
    from importlib import metadata

    from leangen.quant import cache as quant_cache

    real = metadata.version

    def uninstalled(name):
        if name == "leangen":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(quant_cache.metadata, "version", uninstalled)
    versions = quant_cache._versions()
    assert versions["leangen"].startswith("source-")
    assert versions["leangen"] == quant_cache._versions()["leangen"]  # stable: a usable key
    assert versions["torch"] == real("torch")


def test_a_killed_writers_part_file_is_removed_and_a_live_ones_kept(tiny_checkpoint, cache_home):
    """A write cut off by SIGKILL leaves its temp file (as big as the entry) behind; the next
    write of that entry removes it once it is older than any write takes, not before."""
    ckpt = tiny_checkpoint("llama3_2", tied=True)
    load(ckpt, quantize="int8", quantize_cache="auto")
    (entry,) = entries(cache_home / "leangen")
    entry.unlink()  # the next load writes this entry again
    stale = entry.parent / f".{entry.name}.killed.part"
    live = entry.parent / f".{entry.name}.writing.part"
    other = entry.parent / ".another-entry.safetensors.killed.part"
    for part in (stale, live, other):
        part.write_bytes(b"partial")
    old = time.time() - quant_cache.STALE_PART_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert status(load(ckpt, quantize="int8", quantize_cache="auto")) == "written"
    assert not stale.exists()
    assert live.exists()  # may be another process's write in flight
    assert other.exists()  # another entry's: its own next write cleans it


def test_a_group_that_falls_back_everywhere_shares_the_entry_of_the_group_it_fell_to(cache_home, capfd):
    """The demo is 64 and 192 wide: asking 128 quantizes every Linear at 64, exactly as
    asking 64 does, so the second load is a hit on the first's entry."""
    spec = leangen.quant.quantize.QuantSpec
    asked_128 = load_demo(quantize=spec("int4", group_size=128), dtype="bf16", quantize_cache="auto")
    asked_64 = load_demo(quantize=spec("int4", group_size=64), dtype="bf16", quantize_cache="auto")
    assert (status(asked_128), status(asked_64)) == ("written", "hit")
    assert len(entries(cache_home / "leangen")) == 1
    assert asked_64.leangen.quantization.groups == asked_128.leangen.quantization.groups == {64: 15}
