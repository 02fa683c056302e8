"""Atomic writes: whole files or nothing, with the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from capwrap.files import write_json_atomic, write_text_atomic


def test_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert path.read_text() == '{\n  "a": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_files_are_readable_by_others_as_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
