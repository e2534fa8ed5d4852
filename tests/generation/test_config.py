"""`SpringConfig`: validation naming the field, JSON round trip, tolerant loading, the shared λ / gate checks."""

import json
import math

import pytest

from transformers_spring.generation import SPRING_CONFIG_NAME, SpringConfig
from transformers_spring.generation.config import check_early_exit, check_gate, check_weight


def test_paper_defaults():
    config = SpringConfig()
    assert (config.interpolation_weight, config.top_k, config.gate, config.mode) == (0.5, 2, "auto", "fused")
    assert (config.penalty_mode, config.chat_insertion, config.early_exit_epsilon) == ("per_path", "auto", 0.0)
    assert config.use_memory_weight is False and config.use_global is True


def test_config_json_round_trip(tmp_path):
    config = SpringConfig(interpolation_weight=0.3, top_k=4, gate=1.25, mode="processor", early_exit_epsilon=0.01)
    config.save_pretrained(tmp_path)
    assert SpringConfig.from_pretrained(tmp_path) == config
    assert json.loads((tmp_path / "spring_config.json").read_text())["spring_config_version"] == 1
    with pytest.raises(ValueError, match="gate"):
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
        ({"top_k": True}, ValueError, "top_k"),
        ({"gate": float("nan")}, ValueError, "gate"),
        ({"chat_insertion": "middle"}, ValueError, "chat_insertion"),
        ({"max_history_tokens": 0}, ValueError, "max_history_tokens"),
        ({"penalty_mode": "both"}, ValueError, "penalty_mode"),
        ({"early_exit_epsilon": -0.1}, ValueError, "early_exit_epsilon"),
        ({"early_exit_patience": 0}, ValueError, "early_exit_patience"),
        ({"skinny_cpu_linear": "yes"}, TypeError, "skinny_cpu_linear"),
        ({"adapter_name_template": "user"}, ValueError, "adapter_name_template"),
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
    assert check_gate("auto", "g") == "auto" and check_gate(2, "g") == 2.0
    for bad in ("never", True, math.inf):
        with pytest.raises(ValueError, match="`g`"):
            check_gate(bad, "g")
    check_early_exit(0.0, 1)
    with pytest.raises(ValueError, match="early_exit_epsilon"):
        check_early_exit(math.inf, 4)
    with pytest.raises(ValueError, match="early_exit_patience"):
        check_early_exit(0.1, 2.0)
