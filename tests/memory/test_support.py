"""The collective memory's sharing rule: only content that at least `min_contributors` distinct users wrote closely
matching versions of is served to others; a user's unique text never leaves their local memory."""

import json

import numpy as np
import pytest
from testing_utils import TOPICS, topical

from transformers_spring.memory import GlobalMemory, Interaction, LoGoMemory
from transformers_spring.memory.support import ContributorSupport


def test_support_counts_distinct_other_users():
    support = ContributorSupport(min_contributors=3, match_threshold=0.8)
    for label, user in ((0, 0), (1, 1), (2, 1), (3, 2)):
        support.register(label, user)
    assert support.needed == 2
    assert support.link(0, 1) == [0, 1]
    assert support.link(0, 2) == [2]  # item 0 already counted user 1; item 2 gains user 0
    assert support.link(1, 2) == []  # the same user's items never back each other
    assert support.backers(0) == 1 and support.link(0, 3) == [0, 3] and support.backers(0) == 2
    assert sorted(support.unregister(1)) == []  # user 1 still backs item 0 through item 2
    assert support.backers(0) == 2
    assert sorted(support.unregister(2)) == [0]
    assert support.backers(0) == 1 and support.backers(3) == 1


def _unique(user: str, i: int) -> Interaction:
    """A record with words nobody else uses (an individual's own story)."""
    words = " ".join(f"{user}secret{i}w{j}" for j in range(6))
    return Interaction(user, f"cat {words}", f"my cat {user}secret{i}", timestamp=1e9 + i, id=f"{user}-unique-{i}")


def _shared(user: str, i: int = 0) -> Interaction:
    return Interaction(
        user, "fed raises interest rates again", f"rates rise {i}", timestamp=1e9 + i, id=f"{user}-s{i}"
    )


def _victim_memory(make_memory, n_sybils: int) -> LoGoMemory:
    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None)
    memory.add_many(_unique("victim", i) for i in range(6))
    memory.add_many(topical("victim", "cats", i) for i in range(6))
    # Sybils copy the victim's topic (the same topic vocabulary, their own wording) and query with everything the
    # victim wrote about it, unique records included.
    memory.add_many(topical(f"sybil{s}", "cats", 100 * s + i) for s in range(n_sybils) for i in range(10))
    memory.add_many(_shared(user) for user in ["victim"] + [f"sybil{s}" for s in range(n_sybils)])
    return memory


@pytest.mark.parametrize("n_sybils", [4, 10])
def test_sybils_copying_a_topic_never_receive_unique_items(make_memory, n_sybils):
    memory = _victim_memory(make_memory, n_sybils)
    unique_ids = {f"victim-unique-{i}" for i in range(6)}
    queries = [_unique("victim", i).prompt for i in range(6)] + [TOPICS["cats"], "cat secret", "my cat"]
    received = set()
    for s in range(n_sybils):
        for query in queries:
            for scope in ("own", "all"):
                for region in ("history", "all"):
                    context = memory.retrieve_context(f"sybil{s}", query, k=50, scope=scope, region=region)
                    received |= {h.interaction.id for h in context.items + context.global_hits}
    assert not received & unique_ids
    # The rule still serves what several users wrote alike: the victim's record that everyone else wrote too.
    assert "victim-s0" in received


def test_a_community_without_matching_content_serves_nothing(make_memory):
    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None)
    memory.add_many(_unique(f"u{u}", i) for u in range(8) for i in range(5))
    assert len(memory.global_memory.communities()[0]) == 8  # one community of 8 >= min_contributors users
    for u in range(8):
        for query in ("cat", _unique(f"u{(u + 1) % 8}", 0).prompt):
            assert memory.retrieve_context(f"u{u}", query, k=10).global_hits == []
    assert memory.retrieve_context("newcomer", "cat", k=10).global_hits == []


def test_shared_content_needs_enough_contributors_and_forget_or_opt_out_withdraws_support(make_memory):
    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None)
    memory.add_many([_shared("a"), _shared("b")])
    memory.add(_unique("reader", 0))
    assert memory.retrieve_context("reader", "interest rates", k=5).global_hits == []  # 2 < 3 contributors
    memory.add(_shared("c"))
    served = {h.interaction.user_id for h in memory.retrieve_context("reader", "interest rates", k=5).global_hits}
    assert served == {"a", "b", "c"}
    memory.forget_user("c")
    assert memory.retrieve_context("reader", "interest rates", k=5).global_hits == []
    memory.add(_shared("c"))
    memory.set_sharing("b", False)
    assert memory.retrieve_context("reader", "interest rates", k=5).global_hits == []
    memory.set_sharing("b", True)
    assert len(memory.retrieve_context("reader", "interest rates", k=5).global_hits) == 3
    memory.delete("a", "a-s0")
    assert memory.retrieve_context("reader", "interest rates", k=5).global_hits == []


def test_support_counts_only_content_written_before_the_query_time(make_memory):
    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None)
    memory.add_many([_shared("a", 0), _shared("b", 1), _shared("c", 5)])  # c writes at t = 1e9 + 5
    memory.add(_unique("reader", 0))
    assert memory.retrieve_context("reader", "interest rates", k=5, before=1e9 + 3).global_hits == []
    assert len(memory.retrieve_context("reader", "interest rates", k=5, before=1e9 + 6).global_hits) == 3


def test_min_contributors_one_turns_the_rule_off(make_memory):
    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None, min_contributors=1)
    memory.add_many(_unique(f"u{u}", i) for u in range(3) for i in range(3))
    assert memory.retrieve_context("u0", "cat", k=10).global_hits


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        ({"min_contributors": 0}, ValueError, "min_contributors"),
        ({"min_contributors": True}, TypeError, "min_contributors"),
        ({"min_contributors": 2.5}, TypeError, "min_contributors"),
        ({"match_threshold": 0.0}, ValueError, "match_threshold"),
        ({"match_threshold": 1.5}, ValueError, "match_threshold"),
        ({"match_threshold": "0.8"}, TypeError, "match_threshold"),
    ],
)
def test_rule_parameters_are_validated(make_memory, kwargs, error, field):
    with pytest.raises(error, match=field):
        make_memory(**kwargs)
    with pytest.raises(error, match=field):
        GlobalMemory(8, **kwargs)


def test_rule_survives_a_round_trip_and_bad_saved_values_are_refused(make_memory, tmp_path):
    memory = make_memory(n_communities=1, min_community_users=2, dedup_threshold=None, match_threshold=0.9)
    memory.add_many([_shared("a"), _shared("b"), _shared("c"), _unique("reader", 0)])
    memory.save_pretrained(tmp_path / "m")
    loaded = LoGoMemory.from_pretrained(tmp_path / "m", encoder=memory.encoder)
    assert (loaded.global_memory.min_contributors, loaded.global_memory.match_threshold) == (3, 0.9)
    before = [h.interaction.id for h in memory.retrieve_context("reader", "interest rates", k=5).global_hits]
    after = [h.interaction.id for h in loaded.retrieve_context("reader", "interest rates", k=5).global_hits]
    assert before == after and len(after) == 3
    config_path = tmp_path / "m" / "config.json"
    bad_values = (("min_contributors", 0), ("min_contributors", "3"), ("min_contributors", None),
                  ("match_threshold", 2.0), ("match_threshold", None), ("max_matches", 0))  # fmt: skip
    for field, value in bad_values:
        config = json.loads(config_path.read_text())
        config[field] = value
        bad = tmp_path / f"bad-{field}-{value}"
        bad.mkdir()
        for path in (tmp_path / "m").iterdir():
            (bad / path.name).write_bytes(path.read_bytes())
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=field):
            LoGoMemory.from_pretrained(bad, encoder=memory.encoder)


def test_ann_matching_never_serves_more_than_exact_matching():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 32))
    vectors, users = [], []
    for u in range(60):
        for i in range(40):
            v = centers[(u + i) % 20] + 0.25 * rng.normal(size=32)
            vectors.append(v / np.linalg.norm(v))
            users.append(f"u{u}")
    vectors = np.asarray(vectors, dtype=np.float32)
    labels = list(range(len(vectors)))
    kwargs = dict(min_community_users=1, n_communities=1, match_threshold=0.9, num_threads=1)
    exact = GlobalMemory(32, exact_below=10**9, **kwargs)
    ann = GlobalMemory(32, exact_below=0, exact_match_below=0, **kwargs)
    for gm in (exact, ann):
        gm.add(labels, users, vectors, [0.0] * len(labels))
    served_exact = {label for label in labels if exact.is_servable(label)}
    served_ann = {label for label in labels if ann.is_servable(label)}
    assert served_ann <= served_exact and len(served_ann) >= 0.95 * len(served_exact) > 0
    # Changing the rule in place recounts (k) or recomputes (the threshold) the same way a fresh memory would.
    exact.set_support_rule(min_contributors=5)
    fresh = GlobalMemory(32, exact_below=10**9, min_contributors=5, **{**kwargs, "match_threshold": 0.9})
    fresh.add(labels, users, vectors, [0.0] * len(labels))
    assert all(exact.is_servable(label) == fresh.is_servable(label) for label in labels)
    exact.set_support_rule(match_threshold=0.95)
    fresh = GlobalMemory(32, exact_below=10**9, min_contributors=5, **{**kwargs, "match_threshold": 0.95})
    fresh.add(labels, users, vectors, [0.0] * len(labels))
    assert all(exact.is_servable(label) == fresh.is_servable(label) for label in labels)
