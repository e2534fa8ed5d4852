"""The benchmark's checkpoint: what a continued run says."""

from transformers_spring.evaluation import BenchmarkArguments
from transformers_spring.evaluation.checkpoint import fingerprint, load_checkpoint, save_checkpoint


def test_a_resumed_run_says_how_far_it_got_and_how_to_start_over(tmp_path, caplog):
    # `spring demo` / `spring bench` resume by default and show warnings only: a silent resume looks like a bug.
    args = BenchmarkArguments(out=str(tmp_path / "out"))
    identity = {"split_sha256": "0" * 64, "model": "tiny"}
    path = tmp_path / "out" / "checkpoint.json"
    save_checkpoint(path, {"fingerprint": fingerprint(args), "identity": identity, "done": ["alice", "bob"]})
    with caplog.at_level("WARNING"):
        state = load_checkpoint(path, args, identity, users=6)
    assert state["done"] == ["alice", "bob"]
    assert [r.getMessage() for r in caplog.records] == [
        f"Resuming from {path}: 2 of 6 users already done (delete it or pass a new --out to start over)."
    ]
