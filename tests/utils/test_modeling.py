"""`is_peft_model`, `unwrap_model`, `base_name_or_path` and `base_model_hub_id` on plain and peft-wrapped tiny models
and on names and paths."""

import pytest
from peft import LoraConfig, get_peft_model
from testing_utils import make_model

from transformers_spring.utils.modeling import base_name_or_path, is_peft_model, unwrap_model


def test_plain_and_peft_models(tmp_path):
    model = make_model("llama")
    assert not is_peft_model(model) and unwrap_model(model) is model
    assert base_name_or_path(model) is None  # built in code
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="alice")
    assert is_peft_model(peft) and unwrap_model(peft) is model
    model.config._name_or_path = str(tmp_path / "tiny")
    assert base_name_or_path(peft) == base_name_or_path(model) == str(tmp_path / "tiny")


def test_objects_without_a_base_model():
    thing = object()
    assert unwrap_model(thing) is thing
    assert base_name_or_path(thing) is None and not is_peft_model(thing)


def test_base_model_hub_id(tmp_path, monkeypatch):
    from transformers_spring.utils.modeling import base_model_hub_id, is_hub_repo_id
    from transformers_spring.utils.models import SMOLLM2_HUB_ID

    monkeypatch.chdir(tmp_path)
    assert base_model_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == SMOLLM2_HUB_ID
    assert base_model_hub_id("gpt2") == "gpt2"
    snapshot = tmp_path / "hub" / "models--org--tiny-model" / "snapshots" / ("0" * 40)
    assert base_model_hub_id(snapshot) == "org/tiny-model"  # the Hub cache layout, present or not
    snapshot.mkdir(parents=True)
    assert base_model_hub_id(str(snapshot)) == "org/tiny-model"
    assert base_model_hub_id(tmp_path / "hub" / "models--gpt2" / "snapshots" / "main") == "gpt2"
    (tmp_path / "gpt2").mkdir()
    assert base_model_hub_id("gpt2") is None  # a local folder of that name is what loads
    for local in (str(tmp_path / "my-model"), "./my-model", "a/b/c", "", None):
        assert base_model_hub_id(local) is None
    converted = tmp_path / "smollm2-135m-instruct"
    converted.mkdir()
    assert base_model_hub_id(converted) is None
    (converted / ".converted-from-gguf").write_text("SmolLM2-135M-Instruct.Q4_1.gguf\n")
    assert base_model_hub_id(str(converted)) == SMOLLM2_HUB_ID
    model = make_model("llama")
    assert base_model_hub_id(model) is None  # built in code
    model.config._name_or_path = str(converted)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="alice")
    assert base_model_hub_id(peft) == SMOLLM2_HUB_ID
    with pytest.raises(TypeError, match="model_or_path"):
        base_model_hub_id(42)
    assert is_hub_repo_id("org/name") and not is_hub_repo_id("org--name") and not is_hub_repo_id(None)
