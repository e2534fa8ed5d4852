"""`export_adapters_for_serving`: what `serving_manifest.json` records about the base model (the Hub id a server
loads, the local path the adapters were trained on, the GGUF note) and how `read_serving_manifest` reads it."""

import json

import pytest
from testing_utils import make_adapted_model

from transformers_spring.persistence.serving import SERVING_MANIFEST, read_serving_manifest
from transformers_spring.persistence.serving_export import export_adapters_for_serving
from transformers_spring.utils.modeling import unwrap_model
from transformers_spring.utils.models import SMOLLM2_GGUF_FILE, SMOLLM2_HUB_ID


def export(tmp_path, name_or_path, caplog=None, **kwargs):
    """Exports the tiny adapted model's adapter "alice", the model loaded (as far as its config says) from
    `name_or_path`; returns the manifest read back and the warnings logged."""
    from transformers.utils import logging

    model = make_adapted_model()
    unwrap_model(model).config._name_or_path = name_or_path
    logging.enable_propagation()
    try:
        export_adapters_for_serving(
            tmp_path / "serve", model, {"alice": "alice"}, lambda name: None, max_lora_rank=16, **kwargs
        )
    finally:
        logging.disable_propagation()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] if caplog is not None else []
    return read_serving_manifest(tmp_path / "serve"), warnings


def test_the_converted_smollm2_folder_is_recorded_as_its_hub_id_with_a_note(tmp_path, caplog):
    local = tmp_path / "smollm2-135m-instruct"
    local.mkdir()
    (local / ".converted-from-gguf").write_text(f"{SMOLLM2_GGUF_FILE}\n")
    manifest, warnings = export(tmp_path, str(local), caplog)
    assert manifest["base_model_name_or_path"] == SMOLLM2_HUB_ID
    assert manifest["base_model_local_path"] == str(local)
    note = manifest["base_model_note"]
    assert "dequantized" in note and "Q4_1" in note and "differ slightly" in note
    assert len(warnings) == 1 and "Q4_1" in warnings[0]


def test_a_hub_cache_snapshot_is_recorded_as_its_repo_id(tmp_path, caplog):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    manifest, warnings = export(tmp_path, str(snapshot), caplog)
    assert manifest["base_model_name_or_path"] == "org/tiny" and manifest["base_model_local_path"] == str(snapshot)
    assert "base_model_note" not in manifest and warnings == []


def test_a_hub_id_is_recorded_as_it_is(tmp_path, caplog):
    manifest, warnings = export(tmp_path, "org/tiny", caplog)
    assert manifest["base_model_name_or_path"] == "org/tiny" and warnings == []
    assert "base_model_local_path" not in manifest and "base_model_note" not in manifest


def test_a_local_path_without_a_hub_id_is_recorded_with_a_warning(tmp_path, caplog):
    local = tmp_path / "my-finetune"
    local.mkdir()
    manifest, warnings = export(tmp_path, str(local), caplog)
    assert manifest["base_model_name_or_path"] == str(local) and "base_model_local_path" not in manifest
    assert len(warnings) == 1 and str(local) in warnings[0] and "base_model_id=" in warnings[0]


def test_an_explicit_base_model_id_is_recorded_and_checked(tmp_path, caplog):
    local = tmp_path / "my-finetune"
    local.mkdir()
    manifest, warnings = export(tmp_path, str(local), caplog, base_model_id="me/my-finetune")
    assert manifest["base_model_name_or_path"] == "me/my-finetune" and warnings == []
    assert manifest["base_model_local_path"] == str(local)
    with pytest.raises(ValueError, match="`base_model_id`"):
        export(tmp_path / "bad", str(local), base_model_id=str(local))
    with pytest.raises(TypeError, match="`base_model_id`"):
        export(tmp_path / "bad", str(local), base_model_id=local)
    assert not (tmp_path / "bad").exists()  # checked before anything is written


def test_a_manifest_of_an_earlier_release_still_reads_and_the_fields_are_checked(tmp_path):
    manifest, _ = export(tmp_path, "org/tiny")
    path = tmp_path / "serve" / SERVING_MANIFEST
    data = json.loads(path.read_text())
    assert "base_model_local_path" not in data  # exactly what earlier releases wrote
    data["base_model_name_or_path"] = None  # a model built in code
    path.write_text(json.dumps(data))
    assert read_serving_manifest(tmp_path / "serve")["base_model_name_or_path"] is None
    path.write_text(json.dumps({**data, "base_model_local_path": 3}))
    with pytest.raises(ValueError, match="'base_model_local_path' must be a string"):
        read_serving_manifest(tmp_path / "serve")
