"""Atomic saves: `atomic_directory` swaps a directory in whole or not at all, `resolve_saved_directory` finds the
previous version an interrupted swap left, `atomic_write_bytes` / `atomic_write_text` replace files whole."""

import os

import pytest

from transformers_spring.persistence import atomic as io_module
from transformers_spring.persistence.atomic import (
    OLD_SUFFIX,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    looks_like_repo_id,
    resolve_saved_directory,
)


def test_atomic_directory_creates_and_replaces(tmp_path):
    target = tmp_path / "nested" / "save"
    with atomic_directory(target) as tmp:
        assert not tmp.exists() and tmp.parent == target.parent
        tmp.mkdir()
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"
    with atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in target.parent.iterdir()) == ["save"]  # no temporary or backup left


def test_atomic_directory_error_keeps_the_previous_version(tmp_path):
    target = tmp_path / "save"
    target.mkdir()
    (target / "a.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="must be a directory"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_interrupted_swap_is_resolved_to_the_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "save"
    target.mkdir()
    (target / "a.txt").write_text("previous")
    real_rename = os.rename
    calls = []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old version is already moved aside, the new one not yet in place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(io_module.os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            tmp.mkdir()
    monkeypatch.undo()
    assert not target.exists()
    resolved = resolve_saved_directory(target)
    assert resolved is not None and OLD_SUFFIX in resolved.name and (resolved / "a.txt").read_text() == "previous"


def test_resolve_saved_directory(tmp_path):
    assert resolve_saved_directory(tmp_path) == tmp_path
    assert resolve_saved_directory(tmp_path / "missing") is None
    assert resolve_saved_directory(tmp_path / "no" / "parent") is None


def test_looks_like_repo_id(tmp_path):
    assert looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") and looks_like_repo_id("gpt2")
    assert not looks_like_repo_id(str(tmp_path / "model"))  # absolute
    assert not looks_like_repo_id("./model") and not looks_like_repo_id("a/b/c")


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "f.bin"
    assert atomic_write_bytes(path, b"one") == path and path.read_bytes() == b"one"
    atomic_write_text(path, "twö")
    assert path.read_text(encoding="utf-8") == "twö"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions open() would give


def test_atomic_write_failure_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
