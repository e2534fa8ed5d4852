"""Many processes on one folder: a load's recovery never takes a live save's staging folder for a crashed one, loads
during saves never fail nor see a torn version, and two saves at once are serialized (real spawned processes, see
concurrency_figures.py for the larger run)."""

import fcntl
import os

import pytest
from concurrency_figures import content, race, version

from transformers_spring.persistence import UnsafeSaveError, read_manifest, save_folder
from transformers_spring.persistence import folder as folder_module


def rest(target):
    """What an interrupted or in-flight save would leave: staging folders, temporary files, the lock file."""
    return sorted(p.name for p in target.rglob("*") if p.name.startswith(".spring") or ".spring-tmp-" in p.name)


def test_loads_in_another_process_never_break_its_saves_nor_see_a_torn_version(tmp_path):
    figures = race(tmp_path / "mem", [range(1, 21)], loads=20, timeout=600)
    assert figures["failed_saves"] == [] and figures["failed_loads"] == [] and figures["torn"] == []
    assert figures["loads"] >= 20 and read_manifest(tmp_path / "mem")["generation"] == 21
    assert rest(tmp_path / "mem") == []


def test_two_processes_saving_at_once_are_serialized(tmp_path):
    target = tmp_path / "mem"
    figures = race(target, [range(100, 110), range(200, 210)], timeout=600)
    assert figures["failed_saves"] == []
    assert read_manifest(target)["generation"] == 21  # every save committed, one after the other
    from transformers_spring.memory import LoGoMemory

    assert content(LoGoMemory.from_pretrained(target)) in figures["written"] and rest(target) == []


def test_a_save_waits_for_another_processes_save_then_names_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "mem"
    version(1).save_pretrained(target)
    # Another open file description of the lock file conflicts like another process's would.
    fd = os.open(target / folder_module.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(folder_module, "LOCK_TIMEOUT", 0.2)
    try:
        with pytest.raises(TimeoutError, match=f"{target}.*locked by another process"):
            version(2).save_pretrained(target)
    finally:
        os.close(fd)
    version(2).save_pretrained(target)  # released: the save goes through and removes the lock file
    assert read_manifest(target)["generation"] == 2 and rest(target) == []


def test_a_staged_lock_file_is_refused(tmp_path):
    with (
        pytest.raises(ValueError, match="reserved path|already holds .spring-lock"),
        save_folder(tmp_path / "t") as staging,
    ):
        (staging / folder_module.LOCK_FILE).write_text("x")


@pytest.mark.parametrize("path", ["..", "../..", "sub/..", "sub/.", "sub/./", "ancestor"])
def test_saving_into_a_parent_folder_is_refused(path, tmp_path, monkeypatch):
    here = tmp_path / "a" / "b"
    (here / "sub").mkdir(parents=True)
    monkeypatch.chdir(here)
    path = str(tmp_path / "a") if path == "ancestor" else path
    with pytest.raises(UnsafeSaveError, match="`save_directory`.*(working directory|ends in)"):
        version(1).save_pretrained(path)
    assert not any(p.name == "config.json" for p in tmp_path.rglob("*"))
    version(1).save_pretrained("../sibling")  # a sibling of the working directory is a folder of its own
    assert read_manifest(tmp_path / "a" / "sibling")["generation"] == 1


def test_reading_holds_the_folder_at_one_version_for_other_readers_only(tmp_path):
    target = tmp_path / "mem"
    version(1).save_pretrained(target)
    with folder_module.reading(target) as manifest:
        assert manifest["generation"] == 1
        fd = os.open(target / folder_module.LOCK_FILE, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # a save (of any process) waits until the read is over
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another read goes on
        finally:
            os.close(fd)
    assert rest(target) == []
