"""`resolve_folder`, the one resolver of every `from_pretrained`: a name that is neither a local folder nor a Hub repo
it can read is reported as the missing folder it most likely is, with why the Hub did not have it either."""

import re
from unittest import mock

import pytest
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from testing_utils import TRAINING_VOCAB, make_model

from transformers_spring.generation import SpringConfig
from transformers_spring.memory import LoGoMemory
from transformers_spring.persistence.hub import resolve_folder
from transformers_spring.training import ContinualPersonalizer


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """`HF_HUB_OFFLINE=1` with an empty Hub cache, run from `tmp_path`."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once, when huggingface_hub loads
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _missing(tmp_path, name):
    return "^" + re.escape(f"no local folder '{name}' ({tmp_path / name})")


LOADERS = {
    "LoGoMemory": LoGoMemory.from_pretrained,
    "SpringConfig": SpringConfig.from_pretrained,
    "ContinualPersonalizer": lambda name: ContinualPersonalizer.from_pretrained(
        make_model("llama", TRAINING_VOCAB.size), name
    ),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_a_typo_offline_names_the_missing_folder_then_the_hub(offline, kind):
    with pytest.raises(FileNotFoundError, match=_missing(offline, "typo-dir")) as info:
        LOADERS[kind]("typo-dir")
    message = str(info.value)
    assert f"to load the {kind} from; tried as a Hub repo id too" in message
    assert f"not in the Hub cache ({offline / 'hub-cache'}) and the Hub is offline (HF_HUB_OFFLINE=1)" in message
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)  # the Hub's own error stays reachable


def test_local_files_only_is_the_reason_given(offline):
    with pytest.raises(FileNotFoundError, match=_missing(offline, "me/typo")) as info:
        LoGoMemory.from_pretrained("me/typo", local_files_only=True)
    assert "`local_files_only=True` forbids downloading it" in str(info.value)


def test_a_repo_the_hub_does_not_have(tmp_path, monkeypatch):
    class NotFound(RepositoryNotFoundError):
        def __init__(self):  # the Hub's 404, without an HTTP response to build it from
            Exception.__init__(self, "404 Client Error. Repository Not Found for url: .../api/models/me/typo.")

    monkeypatch.chdir(tmp_path)
    with (
        mock.patch("huggingface_hub.snapshot_download", side_effect=NotFound()),
        pytest.raises(FileNotFoundError, match=_missing(tmp_path, "me/typo")) as info,
    ):
        LoGoMemory.from_pretrained("me/typo")
    assert "the Hub has no such repository" in str(info.value)
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)


def test_a_name_that_is_no_valid_repo_id(offline):
    with pytest.raises(FileNotFoundError, match=_missing(offline, "typo dir")) as info:
        LoGoMemory.from_pretrained("typo dir")
    assert "tried as a Hub repo id too, it is not a valid one (" in str(info.value)
    assert isinstance(info.value.__cause__, HFValidationError)


@pytest.mark.parametrize("name", ["./typo", "a/b/c"])
def test_a_path_that_cannot_be_a_repo_id(offline, name):
    with pytest.raises(FileNotFoundError, match=_missing(offline, name) + ".*cannot be a Hub repo id"):
        LoGoMemory.from_pretrained(name)


def test_a_file_is_not_a_folder(offline):
    (offline / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=_missing(offline, "config.json") + ".*: it is a file"):
        LoGoMemory.from_pretrained("config.json")


def test_probe_still_returns_none(offline):
    for name in ("typo-dir", "typo dir", "./typo"):
        assert resolve_folder(name, marker="config.json", kind="LoGoMemory", probe=True) is None


def test_a_cached_repo_still_loads_offline(offline):
    snapshot = offline / "hub-cache" / "models--me--mem" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (offline / "hub-cache" / "models--me--mem" / "refs").mkdir()
    (offline / "hub-cache" / "models--me--mem" / "refs" / "main").write_text("a" * 40)
    assert resolve_folder("me/mem", marker="config.json", kind="LoGoMemory") == snapshot
    assert resolve_folder("me/mem", marker="config.json", kind="LoGoMemory", probe=True) == snapshot
