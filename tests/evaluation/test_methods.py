"""The benchmark's method table (`METHODS`, `MethodSpec.weight`, `resolve_methods`, `DEMO_METHODS`) and the
scorers beside it: floors and RAG retrieval."""

import numpy as np
import pytest

from transformers_spring.evaluation import METHODS, floor_prediction, rag_items, resolve_methods
from transformers_spring.evaluation.methods import DEMO_METHODS, MethodSpec
from transformers_spring.memory import Interaction


def test_spring_methods_take_the_benchmark_lambda():
    assert METHODS["spring"].weight is None and METHODS["spring-logo"].weight is None  # the wrapper's λ
    assert METHODS["rag-bm25-each"].weight == 1.0 and METHODS["base"].weight == 0.0


def test_method_table_is_consistent():
    assert DEMO_METHODS and set(DEMO_METHODS) <= set(METHODS)
    for name, spec in METHODS.items():
        assert spec.name == name and spec.label and spec.description
        assert spec.adapter in (None, "spring", "all100", "random30", "oppu_each", "tuned"), name
        assert spec.retrieval in (None, "bm25", "dense", "buffer", "buffer+global", "tuned"), name
        assert (spec.adapter == "tuned") == (spec.retrieval == "tuned"), name  # one search chooses both
        assert (spec.scope is not None) == (spec.retrieval in ("bm25", "dense")), name  # raw history needs a scope
        assert spec.gate is False or spec.retrieval in ("buffer", "buffer+global"), name
    rag = [spec for spec in METHODS.values() if spec.name.startswith("rag-")]
    assert rag and all(spec.weight == 1.0 and spec.adapter is None for spec in rag)  # history in the prompt
    assert METHODS["spring"].gate and not METHODS["spring-nogate"].gate


def test_spring_tuned_is_in_the_demo_and_takes_its_settings_from_the_search():
    spec = METHODS["spring-tuned"]
    assert (spec.adapter, spec.retrieval, spec.weight, spec.gate) == ("tuned", "tuned", None, False)
    assert "spring tune" in spec.description and spec.label == "SPRInG tuned"
    assert DEMO_METHODS[-2:] == ("spring", "spring-tuned")


def test_method_spec_is_frozen():
    spec = MethodSpec("x", "X")
    assert (spec.adapter, spec.retrieval, spec.weight, spec.gate) == (None, None, 0.0, False)
    with pytest.raises(AttributeError):
        spec.weight = 0.5


@pytest.mark.parametrize("names", [None, "all", ["all"]])
def test_all_methods(names):
    assert resolve_methods(names) == list(METHODS.values())


def test_names_keep_their_order_once():
    assert [m.name for m in resolve_methods("base, spring")] == ["base", "spring"]
    assert [m.name for m in resolve_methods(["spring", "base,spring", " rag-bm25-each "])] == [
        "spring", "base", "rag-bm25-each"
    ]  # fmt: skip
    assert resolve_methods(("base",)) == [METHODS["base"]]


def test_unknown_or_empty_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['sprung'\].*known: copy-input, .*base"):
        resolve_methods("base,sprung")
    with pytest.raises(ValueError, match="empty"):
        resolve_methods(" , ")
    with pytest.raises(ValueError, match="empty"):
        resolve_methods([])


def _history():
    return [
        Interaction("u", "cats and dogs", "Pets Rule", timestamp=1.0, id="a"),
        Interaction("u", "rain in spain", "Wet Spain", timestamp=2.0, id="b"),
        Interaction("u", "cats and dogs", "Pets Again", timestamp=3.0, id="c"),
    ]


def test_floors_by_hand():
    test = Interaction("u", "dogs bark at cats", "Dogs Bark", timestamp=4.0, id="t")
    assert floor_prediction("copy_input", _history(), test) == "dogs bark at cats"
    assert floor_prediction("last_response", _history(), test) == "Pets Again"
    # "a" and "c" tie on BM25; the later one wins.
    assert floor_prediction("bm25_nearest", _history(), test) == "Pets Again"
    assert floor_prediction("last_response", [], test) == "" and floor_prediction("bm25_nearest", [], test) == ""
    with pytest.raises(ValueError, match="unknown floor"):
        floor_prediction("echo", _history(), test)


def test_rag_items_rank_by_score_and_prefer_the_recent_on_ties():
    history = _history()
    hits = rag_items(METHODS["rag-bm25-accum"], history, "cats and dogs", 2)
    assert [hit.interaction.id for hit in hits] == ["c", "a"] and hits[0].score == hits[1].score > 0
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    dense = rag_items(METHODS["rag-dense-each"], history, "q", 3, vectors=vectors, query_vector=np.array([0.6, 0.8]))
    assert [hit.interaction.id for hit in dense] == ["b", "c", "a"]
    assert dense[0].score == pytest.approx(0.8) and dense[0].source == "local"
    assert rag_items(METHODS["rag-bm25-each"], [], "q", 4) == []
    with pytest.raises(ValueError, match="vectors"):
        rag_items(METHODS["rag-dense-each"], history, "q", 2)
    with pytest.raises(ValueError, match="no raw history"):
        rag_items(METHODS["spring"], history, "q", 2)
