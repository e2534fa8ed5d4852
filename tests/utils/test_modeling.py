"""`is_peft_model`, `unwrap_model` and `base_name_or_path` on plain and peft-wrapped tiny models."""

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
