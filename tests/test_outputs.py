"""Result files: replaced atomically, whole lines kept on an error, never half-written."""

import os

import pytest

from leangen.recipe.outputs import ResultFile, atomic_path, write_result


def test_lines_reach_the_file_only_on_close_and_replace_the_old_one(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with ResultFile(path) as out:
        out.add_line('{"a": 1}')
        assert path.read_text() == "old\n"
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_an_error_keeps_the_finished_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with ResultFile(path) as out:
            out.add_line("first")
            out.add_line("second")
            raise KeyboardInterrupt
    assert path.read_text() == "first\nsecond\n"


def test_an_error_before_any_line_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with ResultFile(path):
            raise RuntimeError("load failed")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_new_file_gets_the_usual_mode_and_an_old_one_keeps_its_own(tmp_path):
    umask = os.umask(0o022)
    try:
        write_result(tmp_path / "new.json", "{}")
        old = tmp_path / "old.json"
        old.write_text("x")
        old.chmod(0o600)
        write_result(old, "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert old.stat().st_mode & 0o777 == 0o600 and old.read_text() == "{}"


def test_a_failed_write_leaves_the_old_file_and_no_part(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_result(path, '{"text": "' + "x" * 100_000 + '\ud800"}')  # fails after 100 kB
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_interrupted_writer_leaves_no_file_and_no_part(tmp_path):
    path = tmp_path / "cache.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as part:
            with open(part, "w") as f:
                f.write('{"half": ')
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_path(path) as part:
        with open(part, "w") as f:
            f.write("whole")
    assert path.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == [path.name]
