"""Two processes on CPU (gloo) select exactly what one process selects."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dist_selection_script.py")
ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"  # the script imports `testing_utils`


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",  # CPU processes talking over gloo, even where a GPU exists
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(TESTS), env.get("PYTHONPATH")])),
        }
    )
    return env


def _free_port() -> str:
    """A free local port: accelerate 1.3 passes port 0 to torchrun as is, and the rendezvous never completes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(out: Path, processes: int, *extra: str) -> list[dict]:
    out.mkdir(parents=True)
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), *extra]
    elif importlib.util.find_spec("accelerate") is not None:
        # `accelerate launch --cpu` alone starts the MPI launcher; `--multi_gpu` starts torchrun-style processes,
        # which on a machine without (visible) GPUs run on CPU with the gloo backend. Run through this interpreter so
        # that an `accelerate` script of another environment on PATH is never picked up.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(), str(SCRIPT), str(out), *extra]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", _free_port(),
               str(SCRIPT), str(out), *extra]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=str(ROOT))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(out.glob("rank*.json"))
    assert len(files) == processes
    return [json.loads(f.read_text()) for f in files]


def test_two_processes_select_the_same_samples_as_one(tmp_path):
    (single,) = _launch(tmp_path / "one", 1)
    ranks = _launch(tmp_path / "two", 2)
    assert single["num_processes"] == 1 and all(r["num_processes"] == 2 for r in ranks)
    assert len(single["selected_ids"]) == 4  # ceil(0.3 * 13)
    for result in ranks:
        assert result["selected_ids"] == single["selected_ids"]
        assert result["scores"] == pytest.approx(single["scores"], abs=1e-6)
    # every process ends with the same buffer (scores are gathered, so every process ranks the same values)
    assert ranks[0]["buffer_ids"] == ranks[1]["buffer_ids"] and len(ranks[0]["buffer_ids"]) == 4
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0  # training ran under DDP


def test_continual_personalizer_under_two_processes(tmp_path):
    ranks = _launch(tmp_path / "two", 2, "continual")
    # DDP keeps the replicas in sync: both processes hold bit-identical adapters after repeated re-wrapping
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["selected"] == ranks[1]["selected"]
    assert all(len(ids) == 3 for key, ids in ranks[0]["selected"].items() if key.endswith("/1"))  # ceil(0.3 * 7)
    assert (tmp_path / "two" / "state" / "adapters" / "bob" / "adapter_model.safetensors").is_file()


def test_sharded_workers_merge_into_the_one_process_state(tmp_path):
    """2 workers under `accelerate launch`, each training its own users alone, then `merge_shards`: the same
    adapters (bit for bit), buffers and period counters as one process that trained every user."""
    import torch
    from dist_selection_script import SHARDED_USERS
    from testing_utils import (
        TRAINING_VOCAB,
        make_args,
        make_buffer_memory,
        make_interactions,
        make_model,
        make_tokenizer,
    )

    from transformers_spring.memory import HashingEncoder
    from transformers_spring.training import ContinualPersonalizer

    ranks = _launch(tmp_path / "two", 2, "sharded")
    assert [r["shard"] for r in ranks] == [[0, 2], [1, 2]] and all(r["world"] == 1 for r in ranks)
    assert sorted(ranks[0]["users"] + ranks[1]["users"]) == sorted(SHARDED_USERS)
    assert ranks[0]["users"] and ranks[1]["users"]  # both shards hold users

    single = ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path / "one", buffer_size=3, per_device_train_batch_size=2), make_buffer_memory(),
        max_resident_adapters=1,
    )  # fmt: skip
    for period in range(2):
        for user in SHARDED_USERS:
            single.observe(user, make_interactions(user, 7, start=100 * period))
    merged = ContinualPersonalizer.merge_shards(
        [tmp_path / "two" / "shard0", tmp_path / "two" / "shard1"], tmp_path / "merged",
        make_model("llama", TRAINING_VOCAB.size), memory_kwargs={"encoder": HashingEncoder(32)},
    )  # fmt: skip
    assert sorted(merged.users) == sorted(SHARDED_USERS)
    for user in SHARDED_USERS:
        assert merged.period(user) == single.period(user) == 2
        a, b = single.state_dict(user), merged.state_dict(user)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), user
        assert [i.id for i in merged.memory.buffer(user)] == [i.id for i in single.memory.buffer(user)]
        assert merged.memory.buffer_scores(user) == single.memory.buffer_scores(user)
    reloaded = ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), tmp_path / "merged", memory_kwargs={"encoder": HashingEncoder(32)}
    )
    assert sorted(reloaded.users) == sorted(SHARDED_USERS)
