"""`transformers_spring`'s top-level exports: the public API only, lazily imported, each name resolving; the building
blocks behind it importable from their subpackages, not from the top level."""

import importlib
import subprocess
import sys

import pytest

import transformers_spring

PUBLIC = {
    "SpringForCausalLM", "SpringConfig", "Personalization", "RetrievalInterpolationLogitsProcessor", "SpringTrainer",
    "SpringTrainingArguments", "SpringPeriodOutput", "ContinualPersonalizer", "UserShard", "claim_user_shard",
    "drift_scores", "LoGoMemory", "MilvusBackend", "VectorBackend", "BackendError", "HashingEncoder", "RelevanceGate",
    "Mediator", "CalibratedMediator", "Interaction", "RetrievedItem", "MediatedContext", "PeriodSplit",
    "convert_news_category", "read_interactions_jsonl", "read_lamp", "read_news_jsonl", "write_interactions_jsonl",
    "select_users", "temporal_split", "BenchmarkArguments", "ContinualBenchmark", "run_benchmark", "rouge_scores",
    "resolve_encoder", "PersonalizationTuner", "TuningArguments", "ServeArguments", "BackgroundServer", "__version__",
}  # fmt: skip

# internals that were top-level once -> the subpackage that keeps exporting them
INTERNAL = {
    "AdapterRouter": "generation",
    "FusedDualPathDecoder": "generation",
    "HistoryPromptBuilder": "generation",
    "skinny_cpu_linear": "generation",
    "BM25Index": "memory",
    "ContributorSupport": "memory",
    "MediatorExample": "memory",
    "BufferStore": "records",
    "RetrievalMemory": "records",
    "BaseLogProbCache": "training",
    "find_lora_target_modules": "training",
    "load_smollm2": "utils",
}


def test_all_is_the_public_api_and_every_name_resolves():
    assert set(transformers_spring.__all__) == PUBLIC
    assert len(transformers_spring.__all__) == len(PUBLIC)  # no duplicates
    assert set(transformers_spring.__all__) == set(transformers_spring._SOURCE) | {"__version__"}
    for name in transformers_spring.__all__:
        value = getattr(transformers_spring, name)
        assert value is not None, name
        if name != "__version__":
            module = importlib.import_module(f"transformers_spring.{transformers_spring._SOURCE[name]}")
            assert getattr(module, name) is value, name
    assert set(transformers_spring.__all__) <= set(dir(transformers_spring))


@pytest.mark.parametrize("name", sorted(INTERNAL))
def test_internals_are_not_top_level_but_stay_importable(name):
    assert name not in transformers_spring.__all__
    assert name not in transformers_spring._SOURCE
    with pytest.raises(AttributeError, match=f"transformers_spring.{INTERNAL[name]}"):  # where it went
        getattr(transformers_spring, name)
    assert transformers_spring._MOVED[name] == INTERNAL[name]
    with pytest.raises(ImportError):
        exec(f"from transformers_spring import {name}", {})
    module = importlib.import_module(f"transformers_spring.{INTERNAL[name]}")
    assert getattr(module, name) is not None


def test_type_checking_block_matches_the_lazy_map():
    """The `if TYPE_CHECKING:` imports name exactly the lazily exported names, from the same submodules."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(transformers_spring.__file__).read_text(encoding="utf-8"))
    block = next(
        node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
    )
    eager = {
        alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert eager == transformers_spring._SOURCE


def test_the_package_exports_lazily_and_data_needs_no_ann_index():
    code = (
        "import sys, transformers_spring, transformers_spring.data, transformers_spring.records;"
        "print('hnswlib' in sys.modules, 'transformers_spring.memory' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
