"""The figures of the persistence attack (not a test; run `python tests/persistence/attack_figures.py` from the
repository root): foreign files deleted by saves, stale versions and leftovers after kill -9 trials, corrupted
folders that load into a broken state, and bytes of a forgotten user under a saved folder. Each should be 0."""

import json
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "persistence")]

import test_folder  # noqa: E402
import test_memory_files  # noqa: E402
from testing_utils import (  # noqa: E402
    TRAINING_VOCAB,
    find_traces,
    make_args,
    make_interactions,
    make_model,
    make_tokenizer,
    populated,
)

from transformers_spring import ContinualPersonalizer, Interaction  # noqa: E402
from transformers_spring.memory import HashingEncoder, LoGoMemory  # noqa: E402


def make_memory(**kwargs):
    kwargs.setdefault("gate", None)
    kwargs.setdefault("num_threads", 1)
    return LoGoMemory(HashingEncoder(64), **kwargs)


def foreign_files(root: Path) -> tuple[int, bool]:
    ckpt = root / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    foreign = [ckpt / "model.safetensors", ckpt / "sub" / "notes.txt"]
    for path in foreign:
        path.write_bytes(b"the user's")
    memory = populated(make_memory)
    for _ in range(3):
        memory.save_pretrained(ckpt)
    out = root / "out"
    (out / "checkpoints").mkdir(parents=True)
    foreign += [out / "train.log", out / "checkpoints" / "c.bin"]
    for path in foreign[2:]:
        path.write_bytes(b"the user's")
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    personalizer = ContinualPersonalizer(model, tokenizer, make_args(root, buffer_size=3), make_memory(buffer_size=3))
    for period in range(2):
        personalizer.observe("alice", make_interactions("alice", 6, start=100 * period))
        personalizer.save_pretrained(out)
    here = os.getcwd()
    os.chdir(root)
    try:
        memory.save_pretrained(".")
        refused = False
    except ValueError:
        refused = True
    finally:
        os.chdir(here)
    return sum(not path.exists() for path in foreign), refused


def crashes(root: Path) -> tuple[int, int, int]:
    target = root / "state"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("the user's")
    test_folder.save(target, {"a.json": json.dumps({"v": 0}), "sub/b.bin": (0).to_bytes(8, "little") * 500})
    rng = random.Random(7)
    plans = [(f"{step}:{n}", None) for step in test_folder.STEPS for n in (1, 2, 3, 4)]
    plans += [(None, rng.uniform(0.0, 0.1)) for _ in range(300)]
    version = stale = leftovers = 0
    for kill_at, delay in plans:
        acked = test_folder._trial(target, version + 1, kill_at, delay)
        loaded = test_folder._load(target)
        stale += loaded < (acked if acked is not None else version)
        leftovers += len(test_folder.leftovers(target))
        version = loaded
    assert (target / "notes.txt").read_text() == "the user's"
    return len(plans), stale, leftovers


def corrupted(root: Path) -> tuple[int, int]:
    broken = tried = 0
    for name, (corrupt, _) in test_memory_files.CORRUPTIONS.items():
        target = test_memory_files._saved_shared(make_memory, Path(tempfile.mkdtemp(dir=root)))
        if corrupt is None:  # the two label edits that need the saved rows
            continue
        corrupt(target)
        tried += 1
        try:
            LoGoMemory.from_pretrained(target)
            broken += 1
            print(f"  loaded into a broken state: {name}")
        except (ValueError, FileNotFoundError):
            pass
    return tried, broken


def forgotten(root: Path) -> tuple[int, int]:
    memory = populated(make_memory, gate="auto", use_global=True)
    memory.add_many(
        [Interaction("zq-gone", f"kitten purr zqsecret{i}", f"zqheadline{i}", timestamp=1e9 + i) for i in range(6)]
    )
    for i in range(10):
        memory.retrieve("zq-gone", f"kitten {i}", k=3)
    target = root / "mem"
    memory.save_pretrained(target)
    before = len(find_traces(target, "zq-gone", "zqsecret", "zqheadline"))
    memory.forget_user("zq-gone")
    memory.save_pretrained(target)
    return before, len(find_traces(target, "zq-gone", "zqsecret", "zqheadline"))


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="spring-attack-"))
    deleted, refused = foreign_files(root)
    print(f"foreign files deleted by saves: {deleted} of 4; a save into the working directory refused: {refused}")
    trials, stale, leftovers = crashes(root)
    print(f"kill -9 trials: {trials}; stale versions loaded: {stale}; leftovers after recovery: {leftovers}")
    classes, broken = corrupted(root)
    print(f"corrupted-folder classes: {classes} (the tests add 2 label edits and a symlink); loaded broken: {broken}")
    before, after = forgotten(root)
    print(f"a forgotten user's id/text under the folder: {before} places before, {after} after forget + save")
