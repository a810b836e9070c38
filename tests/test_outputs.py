"""Result files: replaced atomically, whole lines kept on an error, never half-written."""

import os

import pytest

from leangen.recipe.outputs import ResultFile, write_result


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
