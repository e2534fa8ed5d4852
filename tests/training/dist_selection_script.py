"""Runs SPRInG on a tiny model and writes what it did as JSON, one file per process (`<out>/rank<i>.json`).

`python dist_selection_script.py OUT`: one period (period 1) of one user, from a fixed previous adapter.
`python dist_selection_script.py OUT continual`: a ContinualPersonalizer over 2 users x 2 periods with one resident
adapter (trainers re-wrap the same model in DDP again and again), then a save from the main process.
`python dist_selection_script.py OUT sharded`: each process claims its shard of 4 users (`claim_user_shard`), trains
them alone for 2 periods and saves its state to `OUT/shard<i>` (no process group: the workers never talk).

Launched by `test_distributed_training.py` as a plain process and with 2 processes, with `tests/` on `PYTHONPATH`
(for `testing_utils`).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from testing_utils import (  # noqa: E402
    TRAINING_VOCAB,
    make_adapted_model,
    make_args,
    make_buffer_memory,
    make_interactions,
    make_model,
    make_tokenizer,
)

from transformers_spring.training import SpringTrainer  # noqa: E402


def _personalizer(work_dir: Path, **kwargs):
    """The 2-user-periods personalizer both multi-process modes run: tiny Llama, buffer 3, one resident adapter."""
    from transformers_spring.training import ContinualPersonalizer

    return ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size),
        make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(work_dir, buffer_size=3, per_device_train_batch_size=2),
        make_buffer_memory(),
        max_resident_adapters=1,
        **kwargs,
    )


def continual(out_dir: str) -> None:
    import hashlib

    torch.set_num_threads(1)
    state = PartialState()
    personalizer = _personalizer(Path(out_dir))
    selected = {}
    for period in range(2):
        for user in ("alice", "bob"):
            output = personalizer.observe(user, make_interactions(user, 7, start=100 * period))
            selected[f"{user}/{period}"] = output.selected_ids
    digests = {}
    for user in ("alice", "bob"):
        weights = personalizer.state_dict(user)
        digests[user] = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    personalizer.save_pretrained(Path(out_dir) / "state")
    result = {"num_processes": state.num_processes, "selected": selected, "digests": digests}
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as handle:
        json.dump(result, handle)
    state.wait_for_everyone()


SHARDED_USERS = ("alice", "bob", "carol", "dave")


def sharded(out_dir: str) -> None:
    from transformers_spring.training import claim_user_shard

    shard = claim_user_shard()  # before any TrainingArguments: this process then trains alone
    torch.set_num_threads(1)
    personalizer = _personalizer(Path(out_dir) / f"work{shard.index}", shard=shard)
    for period in range(2):
        for user in SHARDED_USERS:
            personalizer.observe(user, make_interactions(user, 7, start=100 * period))
    personalizer.save_pretrained(Path(out_dir) / f"shard{shard.index}")
    result = {"shard": [shard.index, shard.count], "users": personalizer.users, "world": PartialState().num_processes}
    with open(os.path.join(out_dir, f"rank{shard.index}.json"), "w") as handle:
        json.dump(result, handle)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    state = PartialState()
    # The same "previous" adapter in every run: a fixed non-zero LoRA, so that the scores are distinct.
    model = make_adapted_model("llama", vocab_size=TRAINING_VOCAB.size, r=8, lora_seed=3)
    memory = make_buffer_memory(buffer_size=4)
    memory.set_buffer("alice", make_interactions("alice", 3, start=500), scores=[0.0, 0.0, 0.0])
    args = make_args(Path(out_dir), scoring_batch_size=2, buffer_size=4, per_device_train_batch_size=2)
    trainer = SpringTrainer(
        model=model, args=args, user_id="alice", period=1, train_interactions=make_interactions("alice", 13),
        memory=memory, processing_class=make_tokenizer(TRAINING_VOCAB, chat=True),
    )  # fmt: skip
    output = trainer.run_period()
    result = {
        "num_processes": state.num_processes,
        "selected_ids": output.selected_ids,
        "scores": output.scores,
        "buffer_ids": output.buffer_ids,
        "steps": output.train_output.global_step,
    }
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as handle:
        json.dump(result, handle)
    state.wait_for_everyone()


if __name__ == "__main__":
    if sys.argv[2:] == ["continual"]:
        continual(sys.argv[1])
    elif sys.argv[2:] == ["sharded"]:
        sharded(sys.argv[1])
    else:
        main(sys.argv[1])
