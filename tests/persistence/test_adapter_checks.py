"""Loading an adapter folder the library did not write is as safe as loading safetensors (issue 26): every load path
checks the folder (`persistence.adapter_checks`) before any of it reaches the model, and no symlink is followed out
of it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from testing_utils import (
    TRAINING_VOCAB,
    find_traces,
    make_args,
    make_buffer_memory,
    make_interactions,
    make_model,
    make_tokenizer,
)
from transformers import AutoModelForCausalLM

from transformers_spring.generation import SpringForCausalLM
from transformers_spring.memory import HashingEncoder
from transformers_spring.persistence.adapter_checks import MAX_LORA_RANK, check_adapter_folder
from transformers_spring.persistence.continual_state import UserState
from transformers_spring.persistence.spring_folder import load_saved_adapters
from transformers_spring.training import ContinualPersonalizer
from transformers_spring.training.lora import create_adapter

SECRET = "TOP-SECRET-3f9a1c"
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])
MEMORY = {"memory_kwargs": {"encoder": HashingEncoder(32)}}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base_logits(model):
    with model.disable_adapter():
        return logits(model)


def has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_modules())


# ------------------------------------------------------------------------------------------------ saved folders
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_model("llama", TRAINING_VOCAB.size).save_pretrained(path)
    return path


def base_model(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture(scope="module")
def spring_template(base_dir, tmp_path_factory):
    """A SpringForCausalLM folder with one non-trivial adapter, "alice", on the query/value projections."""
    model = create_adapter(
        base_model(base_dir), "alice", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 0
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("spring") / "spring"
    SpringForCausalLM(model, tokenizer=make_tokenizer(TRAINING_VOCAB, chat=True)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def state_template(tmp_path_factory):
    """A ContinualPersonalizer state with one trained user, "alice"."""
    root = tmp_path_factory.mktemp("state")
    p = ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size),
        make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(root, buffer_size=3),
        make_buffer_memory(),
    )
    p.observe("alice", make_interactions("alice", 6))
    p.save_pretrained(root / "state")
    return root / "state"


@pytest.fixture
def spring_dir(spring_template, tmp_path):
    return Path(shutil.copytree(spring_template, tmp_path / "spring"))


@pytest.fixture
def state_dir(state_template, tmp_path):
    return Path(shutil.copytree(state_template, tmp_path / "state"))


def edit_config(folder: Path, **fields) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))  # json writes a float NaN as `NaN`, which peft's loader reads back


def edit_weights(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def secret_elsewhere(tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text(SECRET)
    return elsewhere / "secret.txt"


# ------------------------------------------------------------------------------------------------ accepted adapters
ACCEPTED = {
    "as saved": {},
    "alpha pattern": {"alpha_pattern": {"v_proj": 16}},
    "rslora": {"use_rslora": True},
}


@pytest.mark.parametrize("fields", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_base_outputs_are_bit_identical_after_loading_an_accepted_adapter(base_dir, spring_dir, state_dir, fields):
    edit_config(spring_dir / "adapters" / "alice", **fields)
    edit_config(state_dir / "adapters" / "alice", **fields)
    reference = logits(base_model(base_dir))
    config = check_adapter_folder(spring_dir / "adapters" / "alice", base_model=base_model(base_dir))
    assert config["peft_type"] == "LORA" and config["r"] == 4

    model = base_model(base_dir)
    before = logits(model)
    loaded = load_saved_adapters(model, spring_dir / "adapters", is_trainable=False)
    assert torch.equal(base_logits(loaded), before) and not torch.equal(logits(loaded), before)

    spring = SpringForCausalLM.from_pretrained(spring_dir, **MEMORY)
    assert torch.equal(base_logits(spring.base_model), reference)

    model = make_model("llama", TRAINING_VOCAB.size)
    before = logits(model)
    p = ContinualPersonalizer.from_pretrained(model, state_dir, **MEMORY)
    p.load_user("alice")
    assert torch.equal(base_logits(p.model), before) and not torch.equal(logits(p.model), before)


# ------------------------------------------------------------------------------------------------ refused adapters
def _lm_head(folder: Path) -> None:
    edit_config(folder, modules_to_save=["lm_head"])
    edit_weights(folder, lambda t: t.update({"base_model.model.lm_head.weight": torch.ones(TRAINING_VOCAB.size, 32)}))


def _bin_weights(folder: Path) -> None:
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


REFUSED = {
    # (tamper, file, field)
    "layer_replication": (lambda f: edit_config(f, layer_replication=[[0, 2], [1, 2]]), "adapter_config.json", "layer_replication"),
    "modules_to_save lm_head": (_lm_head, "adapter_config.json", "modules_to_save"),
    "dora": (lambda f: edit_config(f, use_dora=True), "adapter_config.json", "use_dora"),
    "ia3": (lambda f: edit_config(f, peft_type="IA3"), "adapter_config.json", "peft_type"),
    "nan alpha": (lambda f: edit_config(f, lora_alpha=float("nan")), "adapter_config.json", "lora_alpha"),
    "bias all": (lambda f: edit_config(f, bias="all"), "adapter_config.json", "bias"),
    "rank 2**24": (lambda f: edit_config(f, r=2**24), "adapter_config.json", "r"),
    "pickle weights": (_bin_weights, "adapter_model.bin", "pickle"),
    "pissa init": (lambda f: edit_config(f, init_lora_weights="pissa"), "adapter_config.json", "init_lora_weights"),
    "nan weight": (
        lambda f: edit_weights(f, lambda t: next(v for k, v in t.items() if "lora_B" in k).fill_(float("nan"))),
        "adapter_model.safetensors",
        "NaN",
    ),
    "target not in model": (lambda f: edit_config(f, target_modules=["q_proj", "gate"]), "adapter_config.json", "target_modules"),
}  # fmt: skip


def refusal(folder: Path, file: str, field: str) -> str:
    return re.escape(str(folder / file)) + ".*" + re.escape(field)


@pytest.mark.parametrize("tamper, file, field", REFUSED.values(), ids=REFUSED.keys())
def test_a_spring_folder_with_a_refused_adapter_leaves_the_model_untouched(base_dir, spring_dir, tamper, file, field):
    folder = spring_dir / "adapters" / "alice"
    tamper(folder)
    model = base_model(base_dir)
    before = logits(model)
    with pytest.raises(ValueError, match=refusal(folder, file, field)):
        load_saved_adapters(model, spring_dir / "adapters", is_trainable=False)
    assert not has_lora(model) and torch.equal(logits(model), before)
    with pytest.raises(ValueError, match=refusal(folder, file, field)):
        SpringForCausalLM.from_pretrained(spring_dir, **MEMORY)


@pytest.mark.parametrize("tamper, file, field", REFUSED.values(), ids=REFUSED.keys())
def test_a_state_with_a_refused_adapter_leaves_the_model_untouched(state_dir, tmp_path, tamper, file, field):
    folder = state_dir / "adapters" / "alice"
    tamper(folder)
    model = make_model("llama", TRAINING_VOCAB.size)
    before = logits(model)
    with pytest.raises(ValueError, match=refusal(folder, file, field)):
        p = ContinualPersonalizer.from_pretrained(model, state_dir, offload_dir=tmp_path / "offload", **MEMORY)
        p.load_user("alice")
    assert not has_lora(model) and torch.equal(logits(model), before)
    assert list((tmp_path / "offload").rglob("adapter_*")) == []  # nothing refused was left in the offload folder


def test_adapters_for_other_targets_than_the_personalizers_are_refused(state_dir):
    model = make_model("llama", TRAINING_VOCAB.size)
    args = make_args(state_dir.parent, buffer_size=3, lora_target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"adapter_config\.json: field 'target_modules'"):
        ContinualPersonalizer.from_pretrained(model, state_dir, args=args, **MEMORY)


def test_rank_and_alpha_bounds(spring_dir):
    folder = spring_dir / "adapters" / "alice"
    edit_config(folder, r=MAX_LORA_RANK + 1)
    with pytest.raises(ValueError, match=f"field r is {MAX_LORA_RANK + 1}"):
        check_adapter_folder(folder)
    edit_config(folder, r=4, lora_alpha=0)
    with pytest.raises(ValueError, match="field lora_alpha is 0"):
        check_adapter_folder(folder)
    edit_config(folder, lora_alpha=8, r=8)  # weights of rank 4 under a config saying 8
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: the lora_A / lora_B shapes"):
        check_adapter_folder(folder)
    edit_config(folder, r=4, rank_pattern={"q_proj": 2})  # peft would give q_proj rank 2: its weights do not fit
    with pytest.raises(ValueError, match=r"shapes of 'model\.layers\.0\.self_attn\.q_proj'"):
        check_adapter_folder(folder)
    edit_config(folder, rank_pattern={}, notes="x" * 2**20)  # a config is read only up to 1 MiB
    with pytest.raises(ValueError, match=r"adapter_config\.json is \d+ bytes, above the limit"):
        check_adapter_folder(folder)


# ------------------------------------------------------------------------------------------------ symlinks
def _link_file(adapters: Path, secret: Path) -> Path:
    link = adapters / "alice" / "notes.txt"
    link.symlink_to(secret)
    return link


def _link_user_folder(adapters: Path, secret: Path) -> Path:
    outside = secret.parent / "alice"
    shutil.move(adapters / "alice", outside)
    shutil.copy(secret, outside / "notes.txt")
    (adapters / "alice").symlink_to(outside, target_is_directory=True)
    return adapters / "alice"


def _link_adapters_folder(adapters: Path, secret: Path) -> Path:
    outside = secret.parent / "adapters"
    shutil.move(adapters, outside)
    shutil.copy(secret, outside / "alice" / "notes.txt")
    adapters.symlink_to(outside, target_is_directory=True)
    return adapters


LINKS = {
    "file in adapters/<user>": _link_file,
    "adapters/<user>": _link_user_folder,
    "adapters/": _link_adapters_folder,
}


@pytest.mark.parametrize("link", LINKS.values(), ids=LINKS.keys())
def test_a_symlink_in_a_saved_state_is_never_followed(state_dir, tmp_path, link):
    path = link(state_dir / "adapters", secret_elsewhere(tmp_path))
    model = make_model("llama", TRAINING_VOCAB.size)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        p = ContinualPersonalizer.from_pretrained(model, state_dir, offload_dir=tmp_path / "offload", **MEMORY)
        p.load_user("alice")
        p.save_pretrained(tmp_path / "next")
    assert not has_lora(model)
    assert find_traces(tmp_path / "offload", SECRET) == []
    assert not (tmp_path / "next").exists()


@pytest.mark.parametrize("link", [_link_file, _link_user_folder], ids=["file", "folder"])
def test_add_user_never_copies_a_symlinked_file_into_the_offload_folder_or_the_next_save(state_dir, tmp_path, link):
    path = link(state_dir / "adapters", secret_elsewhere(tmp_path))
    p = ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size),
        make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3),
        offload_dir=tmp_path / "offload",
    )
    with pytest.raises(ValueError, match=re.escape(str(path))):
        p.add_user("alice", UserState("alice", 1, 6), state_dir / "adapters" / "alice")
    p.save_pretrained(tmp_path / "next")
    assert p.users == [] and find_traces(tmp_path / "offload", SECRET) == []
    assert find_traces(tmp_path / "next", SECRET) == []


@pytest.mark.parametrize("link", LINKS.values(), ids=LINKS.keys())
def test_a_symlink_in_a_spring_folder_is_never_followed(spring_dir, tmp_path, link):
    path = link(spring_dir / "adapters", secret_elsewhere(tmp_path))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SpringForCausalLM.from_pretrained(spring_dir, **MEMORY)


def test_a_hub_cache_snapshot_loads_through_its_blob_links(state_template, tmp_path):
    """The Hub cache's own links (snapshot files → `blobs/`) are not a symlink attack: such a state still loads."""
    repo = tmp_path / "hub" / "models--me--state"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    blobs.mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in state_template.rglob("*") if p.is_file())):
        blob = blobs / f"blob-{i}"
        shutil.copyfile(path, blob)
        target = snapshot / path.relative_to(state_template)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(Path(*[".."] * (len(target.relative_to(repo).parts) - 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    model = make_model("llama", TRAINING_VOCAB.size)
    before = logits(model)
    p = ContinualPersonalizer.from_pretrained(
        model, "me/state", cache_dir=tmp_path / "hub", local_files_only=True, **MEMORY
    )
    p.load_user("alice")
    assert torch.equal(base_logits(p.model), before) and not torch.equal(logits(p.model), before)


def test_an_all_linear_personalizer_loads_its_own_save(tmp_path):
    """peft saves `"all-linear"` as the expanded list of layer names: the personalizer's own targets accept it."""
    p = ContinualPersonalizer(
        make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True),
        make_args(tmp_path, buffer_size=3, lora_target_modules="all-linear"), make_buffer_memory(),
    )  # fmt: skip
    p.observe("alice", make_interactions("alice", 6))
    p.save_pretrained(tmp_path / "state")
    loaded = ContinualPersonalizer.from_pretrained(make_model("llama", TRAINING_VOCAB.size), tmp_path / "state")
    loaded.load_user("alice")
    for name, tensor in p.state_dict("alice").items():
        assert torch.equal(loaded.state_dict("alice")[name], tensor), name
