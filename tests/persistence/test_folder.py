"""Folder saves: only owned files are written or removed, unsafe targets are refused, and a crash at any point
recovers to the newest complete version with no leftover (a randomized kill -9 test on a real subprocess)."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformers_spring.persistence import MANIFEST_FILE, UnsafeSaveError, read_manifest, recover, save_folder
from transformers_spring.persistence import folder as folder_module

CHILD = Path(__file__).with_name("crash_child.py")


def save(target, files, kind="test", **kwargs):
    with save_folder(target, kind, **kwargs) as staging:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                (staging / name).write_bytes(data)
            else:
                (staging / name).write_text(data)


def leftovers(target):
    return sorted(p.name for p in Path(target).rglob("*") if ".spring-staging-" in str(p) or ".spring-tmp-" in p.name)


def test_a_save_keeps_the_users_files_and_replaces_only_its_own(tmp_path):
    target = tmp_path / "ckpt"
    (target / "sub").mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"user weights")
    (target / "sub" / "notes.txt").write_text("mine")
    save(target, {"config.json": "1", "sub/data.txt": "a", "only-first.txt": "x"})
    save(target, {"config.json": "2", "sub/data.txt": "b"})
    assert (target / "model.safetensors").read_bytes() == b"user weights"
    assert (target / "sub" / "notes.txt").read_text() == "mine"
    assert (target / "config.json").read_text() == "2" and (target / "sub" / "data.txt").read_text() == "b"
    assert not (target / "only-first.txt").exists()  # ours, dropped by the second generation
    manifest = read_manifest(target)
    assert manifest["generation"] == 2 and manifest["files"] == ["config.json", "sub/data.txt"]
    assert manifest["type"] == "test" and leftovers(target) == []


def test_a_save_never_overwrites_a_file_it_did_not_write(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UnsafeSaveError, match="config.json.*no earlier save wrote"):
        save(target, {"config.json": "memory"})
    assert (target / "config.json").read_text() == '{"model_type": "llama"}' and leftovers(target) == []
    assert read_manifest(target) is None
    save(target, {"config.json": "memory"}, adopt=lambda path: True)  # an earlier save of ours, without a manifest
    assert (target / "config.json").read_text() == "memory"


@pytest.mark.parametrize("where", ["cwd", "home", "root"])
def test_unsafe_targets_are_refused(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    path = {"cwd": ".", "home": str(tmp_path / "home"), "root": "/"}[where]
    with pytest.raises(UnsafeSaveError, match="working directory|home directory|filesystem root"):
        save(path, {"a.txt": "x"})
    assert not (tmp_path / "a.txt").exists()


def test_bad_paths_name_the_argument(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, error, match in [
        (None, TypeError, "`save_directory` must be a str"),
        (123, TypeError, "`save_directory` must be a str"),
        ("", ValueError, "non-empty"),
        (str(tmp_path / "file"), UnsafeSaveError, "is a file"),
        (str(tmp_path / "file" / "sub"), UnsafeSaveError, "parent .* is a file"),
    ]:
        with pytest.raises(error, match=match):
            save(bad, {"a.txt": "x"})


def test_a_failed_save_changes_nothing(tmp_path):
    target = tmp_path / "t"
    save(target, {"a.txt": "1"})
    with pytest.raises(RuntimeError), save_folder(target) as staging:
        (staging / "a.txt").write_text("2")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "1" and read_manifest(target)["generation"] == 1
    assert leftovers(target) == []


def test_hostile_manifests_cannot_reach_outside(tmp_path):
    target, outside = tmp_path / "t", tmp_path / "precious.txt"
    outside.write_text("keep")
    save(target, {"a.txt": "1"})
    for files in (["../precious.txt"], [str(outside)], ["a\x00b"], [MANIFEST_FILE]):
        (target / MANIFEST_FILE).write_text(json.dumps({"generation": 1, "files": files}))
        with pytest.raises(ValueError, match="unsafe path|reserved path"):
            save(target, {"b.txt": "2"})
    assert outside.read_text() == "keep"
    # A symlinked subfolder: a listed file under it is not ours to remove.
    (target / "link").symlink_to(tmp_path)
    (target / MANIFEST_FILE).write_text(json.dumps({"generation": 1, "files": ["a.txt", "link/precious.txt"]}))
    save(target, {"a.txt": "3"})
    assert outside.read_text() == "keep"


def test_recovery_rolls_forward_a_complete_staged_version_and_drops_incomplete_ones(tmp_path):
    target = tmp_path / "t"
    save(target, {"a.txt": "1", "b.txt": "1"})
    complete = target / ".spring-staging-2-aaaa"
    complete.mkdir()
    (complete / "a.txt").write_text("2")  # b.txt already moved into place before the crash
    (target / "b.txt").write_text("2")
    (complete / ".spring-complete").write_text(json.dumps({"generation": 2, "files": ["a.txt", "b.txt"]}))
    incomplete = target / ".spring-staging-3-bbbb"
    incomplete.mkdir()
    (incomplete / "a.txt").write_text("3")
    (target / ".a.txt.spring-tmp-123").write_text("half")
    manifest = recover(target)
    assert manifest["generation"] == 2 and (target / "a.txt").read_text() == "2"
    assert leftovers(target) == [] and not incomplete.exists()


def _load(target):
    """The saved version after recovery, checked to be complete and consistent across its files."""
    recover(target)
    version = json.loads((target / "a.json").read_text())["v"]
    blob = (target / "sub" / "b.bin").read_bytes()
    assert blob == version.to_bytes(8, "little") * (500 + version % 700), "files of different versions"
    assert (target / "odd.txt").exists() == bool(version % 3)
    if version % 3:
        assert (target / "odd.txt").read_text() == str(version)
    return version


def _trial(target, start, kill_at=None, delay=None):
    argv = [sys.executable, str(CHILD), folder_module.__file__, str(target), str(start)]
    child = subprocess.Popen(argv + ([kill_at] if kill_at else []), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    if delay is not None:
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    acked = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved ")]
    return max(acked) if acked else None


STEPS = ["staging", "marker", "complete", "replace", "remove-old", "manifest", "committed", "cleanup"]


def test_kill_9_at_any_point_recovers_the_newest_complete_version(tmp_path):
    """≥ 100 kill -9 trials of a real subprocess: at every named step of the protocol (between the file replaces,
    around the manifest, during cleanup), then at random times. After each, the newest complete version loads (never
    an older one than the last acknowledged save), the user's files survive, and nothing is left over."""
    target = tmp_path / "state"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("user notes")
    (target / "sub" / "user.txt").write_text("user file in an owned folder")
    save(target, {"a.json": json.dumps({"v": 0}), "sub/b.bin": (0).to_bytes(8, "little") * 500})
    rng = random.Random(0)
    plans = [(f"{step}:{n}", None) for step in STEPS for n in (1, 2, 3)]
    plans += [(None, rng.uniform(0.0, 0.08)) for _ in range(100)]
    version, stale, trials = 0, 0, 0
    for kill_at, delay in plans:
        acked = _trial(target, version + 1, kill_at, delay)
        loaded = _load(target)
        trials += 1
        newest_acked = acked if acked is not None else version
        stale += loaded < newest_acked
        assert loaded in (newest_acked, newest_acked + 1), (kill_at, delay, acked, loaded)
        assert (target / "notes.txt").read_text() == "user notes"
        assert (target / "sub" / "user.txt").read_text() == "user file in an owned folder"
        assert leftovers(target) == [], (kill_at, delay)
        version = loaded
    assert trials >= 100 and stale == 0 and version > 50
