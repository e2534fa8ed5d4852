import numpy as np

from transformers_spring.memory import Interaction, Mediator, RetrievedItem


def item(source, vec, score=0.9, user="u"):
    v = np.asarray(vec, dtype=np.float32)
    return RetrievedItem(Interaction(user, f"q{vec}{score}", "a"), score, source, embedding=v / np.linalg.norm(v))


def test_cold_start_leans_on_global():
    g = [item("global", [1, 0], 0.8, "x"), item("global", [0, 1], 0.7, "y")]
    ctx = Mediator().mediate([], g, n_local=50, k=2)  # nothing passed the gate
    assert ctx.cold_start and ctx.items == g and ctx.weight == 0.25
    ctx = Mediator().mediate([item("local", [1, 0])], g, n_local=2, k=2)  # too little history
    assert ctx.cold_start and [h.source for h in ctx.items] == ["local", "global"] and ctx.weight == 0.5


def test_strong_local_drops_conflicting_global():
    local = [item("local", [1, 0, 0])]
    agree, conflict = item("global", [0.9, 0.1, 0], 0.9, "x"), item("global", [0, 0, 1], 0.95, "y")
    ctx = Mediator().mediate(local, [conflict, agree], n_local=30, k=4)
    assert not ctx.cold_start
    assert ctx.dropped == [conflict] and conflict not in ctx.items and ctx.items[0] is local[0]
    assert agree in ctx.items


def test_global_share_shrinks_with_history():
    local = [item("local", [1, 0, i]) for i in range(4)]
    glob = [item("global", [1, 0.1, i], 0.5, "x") for i in range(4)]
    few = Mediator(strong_local_items=10**9).mediate(local, glob, n_local=6, k=4)  # w = 6/26: 3 global slots
    many = Mediator(strong_local_items=10**9).mediate(local, glob, n_local=380, k=4)  # w = 0.95: none
    assert sum(h.source == "global" for h in few.items) == 3
    assert all(h.source == "local" for h in many.items)


def test_empty_context_has_zero_weight():
    ctx = Mediator().mediate([], [], n_local=0, k=3)
    assert ctx.is_empty and ctx.weight == 0.0
