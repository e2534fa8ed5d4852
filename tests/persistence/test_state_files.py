"""Red-team tests of the state files of a `ContinualPersonalizer` folder (issue 26): a folder someone else wrote must
not act (push, report, write elsewhere), exhaust memory, or put two users on one adapter."""

import json
import os
import time
from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub import HfApi
from testing_utils import TRAINING_VOCAB, make_args, make_buffer_memory, make_interactions, make_model, make_tokenizer

from transformers_spring.generation.config import SpringConfig
from transformers_spring.persistence import json_files
from transformers_spring.persistence.continual_state import read_continual_state, read_training_args
from transformers_spring.training import ContinualPersonalizer, SpringTrainingArguments
from transformers_spring.training.drift import BaseLogProbCache


def _state(users):
    return {"format_version": 1, "adapter_name_template": "{user_id}", "users": users}


def _sparse(path, size):
    """A file of `size` bytes that takes no disk space (the cap must refuse it from its size alone)."""
    with open(path, "wb") as handle:
        handle.truncate(size)


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    root = tmp_path_factory.mktemp("state")
    p = ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(root, buffer_size=3, num_train_epochs=1), make_buffer_memory(),
    )  # fmt: skip
    p.observe("alice", make_interactions("alice", 4))
    p.save_pretrained(root / "saved")
    return root / "saved"


# ------------------------------------------------------------------------------------------ a state file that acts
HOSTILE_ARGS = {
    "push_to_hub": True,
    "hub_model_id": "attacker/exfil",
    "hub_strategy": "all_checkpoints",
    "report_to": ["wandb"],
    "output_dir": "/tmp/attacker-owned",
    "resume_from_checkpoint": "/etc",
    "save_strategy": "steps",
    "save_steps": 1,
    "learning_rate": 0.02,
}


def test_hostile_training_args_never_push_report_or_write_elsewhere(saved_state, tmp_path, monkeypatch):
    import shutil

    folder = shutil.copytree(saved_state, tmp_path / "hostile")
    args = json.loads((folder / "training_args.json").read_text())
    (folder / "training_args.json").write_text(json.dumps({**args, **HOSTILE_ARGS}))
    # Only the library may stop the push: not HF_HUB_OFFLINE.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with (
        mock.patch.object(HfApi, "create_repo", side_effect=AssertionError("create_repo")) as create_repo,
        mock.patch.object(HfApi, "upload_folder", side_effect=AssertionError("upload_folder")) as upload,
    ):
        p = ContinualPersonalizer.from_pretrained(
            make_model("llama", TRAINING_VOCAB.size), folder, memory=make_buffer_memory(),
            offload_dir=tmp_path / "work",
        )  # fmt: skip
        p.observe("alice", make_interactions("alice", 4, start=100))
        p.observe("bob", make_interactions("bob", 4))
    create_repo.assert_not_called()
    upload.assert_not_called()
    assert p.args.push_to_hub is False and p.args.hub_model_id is None
    assert p.args.report_to in ([], ["none"], "none") and p.args.resume_from_checkpoint is None
    assert p.args.save_strategy == "no"
    assert os.path.commonpath([p.args.output_dir, str(tmp_path / "work")]) == str(tmp_path / "work")
    assert p.args.learning_rate == 0.02  # hyperparameters are restored
    assert not os.path.exists("/tmp/attacker-owned")


def test_ignored_training_args_are_named(tmp_path, caplog):
    from transformers.utils import logging

    (tmp_path / "training_args.json").write_text(json.dumps({"push_to_hub": True, "deepspeed": "/x.json"}))
    logging.enable_propagation()
    try:
        args = read_training_args(tmp_path, SpringTrainingArguments)
    finally:
        logging.disable_propagation()
    assert "push_to_hub" in caplog.text and "deepspeed" in caplog.text
    assert args.push_to_hub is False and args.deepspeed is None and "trainer_output" in args.output_dir


# ------------------------------------------------------------------------------------------------- size limits
@pytest.mark.parametrize(
    "name, limit, load",
    [
        ("continual_state.json", "MAX_STATE_BYTES", read_continual_state),
        ("training_args.json", "MAX_TRAINING_ARGS_BYTES", lambda d: read_training_args(d, SpringTrainingArguments)),
        ("base_logprobs.json", "MAX_BASE_LOGPROBS_BYTES", lambda d: BaseLogProbCache.load(d / "base_logprobs.json")),
        ("spring_config.json", "MAX_SPRING_CONFIG_BYTES", SpringConfig.from_pretrained),
    ],
)
def test_oversized_state_files_are_refused_before_parsing(tmp_path, name, limit, load):
    limit = getattr(json_files, limit)
    _sparse(tmp_path / name, limit + 1)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{name} is {limit + 1} bytes, above the limit of {limit} bytes"):
        load(tmp_path)
    assert time.perf_counter() - start < 1.0  # refused from its size, never read


def test_deeply_nested_json_is_a_value_error(tmp_path):
    (tmp_path / "continual_state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        read_continual_state(tmp_path)


# ----------------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize(
    "build, field",
    [
        (lambda t: SpringTrainingArguments(output_dir="unused", prompt_template="{prompt} " + t), "prompt_template"),
        (lambda t: SpringConfig(history_item_template="{prompt} " + t), "history_item_template"),
        (
            lambda t: SpringConfig(retrieval_template="{history} " + t.replace("user_id", "history")),
            "retrieval_template",
        ),
    ],
)
def test_huge_template_widths_are_refused_without_formatting(build, field):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"`{field}`: field \{{\w+\}} has the width or precision 3000000000"):
        build("{user_id:>3000000000}")
    assert time.perf_counter() - start < 1.0


def test_template_attribute_access_and_conversions_are_refused():
    with pytest.raises(ValueError, match=r"prompt\.__class__"):
        SpringConfig(history_item_template="{prompt.__class__.__init__.__globals__}")
    with pytest.raises(ValueError, match="conversion"):
        SpringConfig(history_item_template="{prompt!r}")
    with pytest.raises(ValueError, match="nested field"):
        SpringTrainingArguments(output_dir="unused", prompt_template="{prompt:{user_id}}")
    assert SpringConfig(history_item_template="{score:.2f} {prompt:<20}").history_item_template


# -------------------------------------------------------------------------------------------- one user, one adapter
def test_users_sharing_an_adapter_name_are_refused_at_load(tmp_path):
    users = {"a.b": {"adapter": "a_b", "next_period": 1}, "a_b": {"adapter": "a_b", "next_period": 1}}
    (tmp_path / "continual_state.json").write_text(json.dumps(_state(users)))
    with pytest.raises(ValueError, match=r"users 'a\.b' and 'a_b' map to the same adapter name 'a_b'"):
        read_continual_state(tmp_path)


def test_observe_refuses_a_new_user_on_another_users_adapter(saved_state, tmp_path):
    p = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), saved_state, memory=make_buffer_memory(),
        offload_dir=tmp_path / "work",
    )  # fmt: skip
    p.observe("a.b", make_interactions("a.b", 4, prefix="ab"))
    with pytest.raises(ValueError, match=r"'a_b' and 'a\.b' map to the same adapter name 'a_b'"):
        p.observe("a_b", make_interactions("a_b", 4, prefix="a_b"))


def test_a_saved_lora_rank_beyond_the_validator_bound_is_refused(tmp_path):
    """`lora_r` from a folder is held to the adapter validator's bound: `2**24` would allocate without limit."""
    (tmp_path / "training_args.json").write_text(json.dumps({"lora_r": 2**24}))
    with pytest.raises(ValueError, match=r"`lora_r` must be an int in \[1, 1024\]"):
        read_training_args(tmp_path, SpringTrainingArguments)
