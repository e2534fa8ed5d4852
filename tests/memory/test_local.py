import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from transformers_spring.memory import BM25Index, HashingEncoder, Interaction, LocalMemory, bm25_tokenize

ENC = HashingEncoder(64)


def rec(i, text=None, ts=None, user="u"):
    return Interaction(
        user, text or f"prompt number{i} token{i} word{i}", f"resp{i}", timestamp=ts or float(i), id=f"r{i}"
    )


def add(local, item):
    return local.add(item, ENC.encode([item.text])[0])


def test_dedup_returns_existing_id():
    local = LocalMemory("u", 64)
    assert add(local, rec(1, "a cat on the mat")) == ("r1", True, [])
    stored, added, _ = add(local, Interaction("u", "a cat on the mat", "resp1", id="other"))
    assert (stored, added, len(local)) == ("r1", False, 1)


def test_capacity_evicts_oldest_by_timestamp_and_spares_the_buffer():
    local = LocalMemory("u", 64, capacity=3)
    for i, ts in [(1, 30.0), (2, 10.0), (3, 20.0)]:
        add(local, rec(i, ts=ts))
    local.set_buffer([rec(9)], ENC.encode([rec(9).text]))
    _, _, evicted = add(local, rec(4, ts=40.0))
    assert [e.id for e in evicted] == ["r2"]  # the oldest, not the first written
    assert sorted(local.history.ids) == ["r1", "r3", "r4"] and local.buffer.ids == ["r9"]


def test_remove_is_real_and_keeps_rows_consistent():
    local = LocalMemory("u", 64)
    for i in range(5):
        add(local, rec(i))
    assert local.remove("r1") and not local.remove("r1")
    assert len(local) == 4 and "r1" not in local
    for rid in local.history.ids:  # every surviving row still holds its own vector
        np.testing.assert_array_equal(local.history.vector(rid), ENC.encode([local.history.records[rid].text])[0])


def test_set_buffer_replaces_only_the_buffer():
    local = LocalMemory("u", 64, buffer_size=2)
    add(local, rec(1))
    local.set_buffer([rec(7), rec(8)], ENC.encode([rec(7).text, rec(8).text]), scores=[0.5, 0.1])
    local.set_buffer([rec(9)], ENC.encode([rec(9).text]))
    assert local.buffer.ids == ["r9"] and local.history.ids == ["r1"]
    with pytest.raises(ValueError, match="buffer_size"):
        local.set_buffer([rec(i) for i in range(3)], ENC.encode(["a", "b", "c"]))


def test_dense_search_matches_numpy_and_regions():
    local = LocalMemory("u", 64)
    items = [rec(i) for i in range(6)]
    for item in items:
        add(local, item)
    local.set_buffer([rec(10, "a buffer only item")], ENC.encode(["a buffer only item\nresp10"]))
    q = ENC.encode(["prompt number3 token3"])[0]
    hits = local.search(q, "prompt number3 token3", k=2, region="history")
    expected = np.argsort(-(ENC.encode([i.text for i in items]) @ q), kind="stable")[:2]
    assert [h.interaction.id for h in hits] == [items[j].id for j in expected]
    assert all(h.source == "local" for h in hits)
    assert [h.interaction.id for h in local.search(q, "x", k=5, region="buffer")] == ["r10"]
    assert len(local.search(q, "x", k=50, region="all")) == 7  # k beyond the memory is clamped


def test_bm25_scores_match_rank_bm25_by_hand():
    texts = ["the storm hit the coast", "a storm of votes", "bakery wins award", "coast guard rescue"]
    corpus = [bm25_tokenize(t) for t in texts]
    expected = BM25Okapi(corpus).get_scores(["storm", "coast"])
    np.testing.assert_allclose(BM25Index(texts).scores("Storm, coast!"), expected)


def test_lucene_idf_is_positive_on_two_items():
    texts = ["storm coast", "storm vote"]
    assert BM25Index(texts, idf="okapi").scores("storm coast").max() <= 0.0  # the paper's tiny-buffer trap
    assert BM25Index(texts, idf="lucene").scores("storm coast")[0] > 0


def test_before_filters_by_time():
    local = LocalMemory("u", 64)
    for i in range(1, 5):
        add(local, rec(i, ts=float(i)))
    q = ENC.encode(["prompt"])[0]
    assert {h.interaction.id for h in local.search(q, "prompt", k=10, before=3.0)} == {"r1", "r2"}
