"""`SpringConfig`: validation naming the field, JSON round trip, tolerant loading, the shared λ / gate checks."""

import json
import math
import os
from unittest import mock

import pytest

from transformers_spring.generation import SPRING_CONFIG_NAME, SpringConfig
from transformers_spring.generation.config import check_early_exit, check_gate, check_weight


def test_measured_defaults_and_the_paper_preset():
    config = SpringConfig()
    assert (config.interpolation_weight, config.top_k, config.gate, config.mode) == (0.25, 2, None, "fused")
    assert config.retrieval_region == "all" and config.adapter_name_template == "{user_id}"
    assert config.spring_preset == "measured" and config.adaptive_weight == 0.0 and config.copy_weight == 0.0
    paper = SpringConfig(spring_preset="paper")
    assert (paper.interpolation_weight, paper.top_k, paper.retrieval_region) == (0.5, 2, "buffer")
    # A value you pass wins over the preset's, and a saved config reloads as saved.
    assert (
        SpringConfig(spring_preset="paper", interpolation_weight=0.1, retrieval_region="all").interpolation_weight
        == 0.1
    )
    assert SpringConfig.from_dict(paper.to_dict()) == paper
    assert SpringConfig.from_dict({"interpolation_weight": 0.5}).interpolation_weight == 0.5  # a 0.1 file
    with pytest.raises(ValueError, match="spring_preset"):
        SpringConfig(spring_preset="fast")
    assert (config.penalty_mode, config.chat_insertion, config.early_exit_epsilon) == ("per_path", "auto", 0.0)
    assert config.use_memory_weight is False and config.use_global is True


def test_config_json_round_trip(tmp_path):
    config = SpringConfig(interpolation_weight=0.3, top_k=4, gate=1.25, mode="processor", early_exit_epsilon=0.01)
    config.save_pretrained(tmp_path)
    assert SpringConfig.from_pretrained(tmp_path) == config
    assert json.loads((tmp_path / "spring_config.json").read_text())["spring_config_version"] == 1
    with pytest.raises(TypeError, match="gate"):  # a str is the wrong type for a threshold
        SpringConfig(gate="sometimes")
    with pytest.raises(ValueError, match="mode"):
        SpringConfig(mode="parallel")
    with pytest.raises(ValueError, match="retrieval_template"):
        SpringConfig(retrieval_template="no placeholder")
    with pytest.raises(ValueError, match="history_item_template"):
        SpringConfig(history_item_template="{title}")


def test_from_dict_ignores_fields_of_a_newer_version(caplog):
    from transformers.utils import logging

    data = {**SpringConfig(top_k=3).to_dict(), "spring_config_version": 1, "future_field": True}
    logging.enable_propagation()
    try:
        config = SpringConfig.from_dict(data)
    finally:
        logging.disable_propagation()
    assert config == SpringConfig(top_k=3)
    assert "future_field" in caplog.text
    with pytest.raises(TypeError, match="dict"):
        SpringConfig.from_dict([("top_k", 3)])


def test_from_pretrained_needs_the_file(tmp_path):
    assert SPRING_CONFIG_NAME == "spring_config.json"
    with pytest.raises(FileNotFoundError, match=SPRING_CONFIG_NAME):
        SpringConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"interpolation_weight": 1.5}, ValueError, "interpolation_weight"),
        ({"interpolation_weight": "half"}, TypeError, "interpolation_weight"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"gate": float("nan")}, ValueError, "gate"),
        ({"chat_insertion": "middle"}, ValueError, "chat_insertion"),
        ({"max_history_tokens": 0}, ValueError, "max_history_tokens"),
        ({"penalty_mode": "both"}, ValueError, "penalty_mode"),
        ({"early_exit_epsilon": -0.1}, ValueError, "early_exit_epsilon"),
        ({"early_exit_patience": 0}, ValueError, "early_exit_patience"),
        ({"skinny_cpu_linear": "yes"}, TypeError, "skinny_cpu_linear"),
        ({"adapter_name_template": "user"}, ValueError, "adapter_name_template"),
        ({"copy_weight": 1.0}, ValueError, "copy_weight"),
        ({"copy_weight": -0.1}, ValueError, "copy_weight"),
        ({"copy_weight": "high"}, TypeError, "copy_weight"),
        ({"copy_max_ngram": 0}, ValueError, "copy_max_ngram"),
        ({"copy_max_ngram": 2.0}, TypeError, "copy_max_ngram"),
        ({"copy_sources": "input,prompt"}, ValueError, "copy_sources"),
        ({"copy_sources": ["input"]}, TypeError, "copy_sources"),
    ],
)
def test_invalid_values_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpringConfig(**kwargs)


def test_config_rejects_non_bool():
    with pytest.raises(TypeError, match="skinny_cpu_linear"):
        SpringConfig(skinny_cpu_linear="yes")


def test_shared_checks():
    assert check_weight(1, "w") == 1.0 and isinstance(check_weight(0, "w"), float)
    for bad in (True, "0.5", None):
        with pytest.raises(TypeError, match="`w`"):
            check_weight(bad, "w")
    for bad in (-0.01, 1.01, math.inf, math.nan):
        with pytest.raises(ValueError, match="`w`"):
            check_weight(bad, "w")
    assert check_gate(None, "g") is None and check_gate(2, "g") == 2.0
    for bad in ("never", "auto", True):
        with pytest.raises(TypeError, match="`g`"):
            check_gate(bad, "g")
    with pytest.raises(ValueError, match="`g`"):
        check_gate(math.inf, "g")
    check_early_exit(0.0, 1)
    with pytest.raises(ValueError, match="early_exit_epsilon"):
        check_early_exit(math.inf, 4)
    with pytest.raises(TypeError, match="early_exit_patience"):  # a float is the wrong type for a count
        check_early_exit(0.1, 2.0)
    with pytest.raises(ValueError, match="early_exit_patience"):
        check_early_exit(0.1, 0)


def test_a_saved_auto_gate_loads_as_the_memorys_gate_alone():
    """`"auto"` in a spring_config.json of an earlier release meant "the memory's own gate": it loads as None, the
    one value with that meaning now (`"auto"` means an online quantile only in `RelevanceGate`)."""
    assert SpringConfig(gate="auto").gate is None
    assert SpringConfig.from_dict({"gate": "auto"}).gate is None


def test_unknown_user_is_a_checked_choice_that_round_trips(tmp_path):
    assert SpringConfig().unknown_user == "base"
    config = SpringConfig(unknown_user="error")
    config.save_pretrained(tmp_path)
    assert SpringConfig.from_pretrained(tmp_path) == config
    with pytest.raises(ValueError, match="unknown_user"):
        SpringConfig(unknown_user="ignore")
    with pytest.raises(TypeError, match="unknown_user"):
        SpringConfig(unknown_user=True)
    # A spring_config.json saved before the field existed loads as "base", its behaviour then.
    data = json.loads((tmp_path / SPRING_CONFIG_NAME).read_text())
    del data["unknown_user"]
    (tmp_path / SPRING_CONFIG_NAME).write_text(json.dumps(data))
    assert SpringConfig.from_pretrained(tmp_path) == SpringConfig()
    data["unknown_user"] = "strict"  # a hand-edited file is validated too
    (tmp_path / SPRING_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown_user"):
        SpringConfig.from_pretrained(tmp_path)


def test_retrieval_region_and_adapter_template_are_checked():
    with pytest.raises(ValueError, match="retrieval_region"):
        SpringConfig(retrieval_region="everywhere")
    with pytest.raises(ValueError, match="adapter_name_template"):
        SpringConfig(adapter_name_template="{user}")
    with pytest.raises(ValueError, match="adapter_name_template"):
        SpringConfig(adapter_name_template="u.{user_id}")


def test_from_pretrained_reads_a_hub_repo(tmp_path):
    snapshot = tmp_path / "snapshot"
    SpringConfig(top_k=5).save_pretrained(snapshot)
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(snapshot)) as download:
        config = SpringConfig.from_pretrained("me/spring", revision="v1", token="t", local_files_only=True)
    assert config == SpringConfig(top_k=5)
    assert download.call_args.args == ("me/spring",)
    kwargs = download.call_args.kwargs
    assert kwargs["allow_patterns"] == [SPRING_CONFIG_NAME]  # the config alone, never the weights beside it
    assert (kwargs["revision"], kwargs["token"], kwargs["local_files_only"]) == ("v1", "t", True)
    with (
        mock.patch("huggingface_hub.snapshot_download", return_value=str(tmp_path / "empty")),
        pytest.raises(FileNotFoundError, match=SPRING_CONFIG_NAME),
    ):
        SpringConfig.from_pretrained("me/no-config")


def test_save_pretrained_pushes_the_config(tmp_path):
    from huggingface_hub import HfApi

    uploaded = {}

    def fake_upload(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), **kwargs)
        return "commit"

    create = mock.MagicMock(side_effect=lambda repo_id, **kwargs: mock.Mock(repo_id=repo_id))
    with (
        mock.patch.object(HfApi, "create_repo", create),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake_upload),
    ):
        assert SpringConfig(top_k=3).save_pretrained(tmp_path / "cfg") == str(tmp_path / "cfg" / SPRING_CONFIG_NAME)
        assert uploaded == {}
        assert SpringConfig(top_k=3).save_pretrained(tmp_path / "cfg", push_to_hub=True, private=False) == "commit"
        with pytest.raises(TypeError, match="privat"):
            SpringConfig().save_pretrained(tmp_path / "never", push_to_hub=True, privat=False)
    assert uploaded["repo_id"] == "cfg" and uploaded["files"] == [SPRING_CONFIG_NAME]
    assert create.call_args.kwargs["private"] is False and not (tmp_path / "never").exists()
    assert SpringConfig.from_pretrained(tmp_path / "cfg") == SpringConfig(top_k=3)


def test_copy_path_fields_default_off_round_trip_and_old_configs_load(tmp_path):
    config = SpringConfig()
    assert (config.copy_weight, config.copy_max_ngram, config.copy_sources) == (0.0, 4, "input,history")
    config = SpringConfig(copy_weight=0.2, copy_max_ngram=2, copy_sources="history")
    config.save_pretrained(tmp_path)
    assert SpringConfig.from_pretrained(tmp_path) == config
    old = {k: v for k, v in SpringConfig(top_k=3).to_dict().items() if not k.startswith("copy_")}
    assert SpringConfig.from_dict(old) == SpringConfig(top_k=3)  # a config saved before the copy path: off


def test_personalization_copy_weight_is_checked():
    from transformers_spring.generation import Personalization

    assert Personalization(user="a", copy_weight=0.3).copy_weight == 0.3
    with pytest.raises(ValueError, match="Personalization.copy_weight"):
        Personalization(user="a", copy_weight=1.0)
