"""The figures of many processes on one folder (not a test; run `python tests/persistence/concurrency_figures.py`
from the repository root): one process saves a `LoGoMemory` 200 times into a folder while another loads it 200
times (and on until the saves end), then two processes save 200 times each into one folder at once. Failed saves,
failed loads and torn versions (a load that matches no saved version) should each be 0. test_concurrency.py runs
the same races, smaller."""

import multiprocessing
import tempfile
import time
from pathlib import Path

from transformers_spring import Interaction
from transformers_spring.memory import HashingEncoder, LoGoMemory
from transformers_spring.persistence import read_manifest

USER = "alice"


def version(number: int) -> LoGoMemory:
    """The memory of version `number`: 1 to 4 records (so that files of two versions disagree on the count) whose
    prompts name the version."""
    memory = LoGoMemory(HashingEncoder(32), gate=None, num_threads=1)
    memory.add_many(
        [Interaction(USER, f"v{number} r{i}", f"headline {i}", timestamp=1e9 + i) for i in range(number % 4 + 1)]
    )
    return memory


def content(memory: LoGoMemory) -> tuple[str, ...]:
    """What a version holds, to tell versions apart."""
    return tuple(sorted(record.prompt for record in memory.history(USER) + memory.buffer(USER)))


def _save(target: str, numbers: range, start, done, results) -> None:
    failed = []
    start.wait()
    for number in numbers:
        try:
            version(number).save_pretrained(target)
        except Exception as err:  # a figure, not a crash: count it and go on
            failed.append(f"save {number}: {type(err).__name__}: {err}")
    done.set()
    results.put(("save", failed, []))


def _load(target: str, loads: int, start, done, results) -> None:
    failed, seen = [], []
    start.wait()
    while len(seen) + len(failed) < loads or not done.is_set():
        try:
            seen.append(content(LoGoMemory.from_pretrained(target)))
        except Exception as err:
            failed.append(f"load: {type(err).__name__}: {err}")
    results.put(("load", failed, seen))


def race(target: Path, writers: list[range], loads: int = 0, timeout: float = 3600.0) -> dict:
    """Saves the versions of each of `writers` (one process each) into `target` while another process loads it at
    least `loads` times, all at once (spawned processes, released together once they have imported everything).

    Returns:
        `dict`: `failed_saves` and `failed_loads` (their errors), `torn` (loaded contents that match no version
        written), `loads` (how many loads succeeded) and `seconds` (the wall time of the race).
    """
    version(0).save_pretrained(target)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(len(writers) + (loads > 0) + 1), context.Queue()
    dones = [context.Event() for _ in writers]
    processes = [
        context.Process(target=_save, args=(str(target), n, start, d, results))
        for n, d in zip(writers, dones, strict=True)
    ]
    if loads:
        # One writer's end is enough to stop after `loads`: with two writers the loads only need to overlap one.
        processes.append(context.Process(target=_load, args=(str(target), loads, start, dones[0], results)))
    for process in processes:
        process.start()
    start.wait(timeout=600)
    began = time.perf_counter()
    outcomes = [results.get(timeout=timeout) for _ in processes]
    seconds = time.perf_counter() - began
    for process in processes:
        process.join(timeout=60)
    written = {content(version(n)) for numbers in [range(1), *writers] for n in numbers}
    seen = [c for kind, _, contents in outcomes if kind == "load" for c in contents]
    return {
        "failed_saves": [e for kind, errors, _ in outcomes if kind == "save" for e in errors],
        "failed_loads": [e for kind, errors, _ in outcomes if kind == "load" for e in errors],
        "torn": [c for c in seen if c not in written],
        "loads": len(seen),
        "seconds": seconds,
        "written": written,
    }


def report(title: str, figures: dict) -> None:
    print(
        f"{title}: failed saves {len(figures['failed_saves'])}, failed loads {len(figures['failed_loads'])}, "
        f"torn versions {len(figures['torn'])}, successful loads {figures['loads']}, "
        f"wall time {figures['seconds']:.1f} s"
    )
    for error in (figures["failed_saves"] + figures["failed_loads"])[:5]:
        print(f"  {error}")


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="spring-concurrency-"))
    report("1 saver x 200 saves, 1 loader x 200+ loads", race(root / "one", [range(1, 201)], loads=200))
    target = root / "two"
    figures = race(target, [range(1000, 1200), range(2000, 2200)])
    final = content(LoGoMemory.from_pretrained(target))
    report("2 savers x 200 saves each", figures)
    print(
        f"  final folder: generation {read_manifest(target)['generation']} (401 expected), "
        f"one complete version: {final in figures['written']}, lock file left: {(target / '.spring-lock').exists()}"
    )
