import numpy as np
import pytest

from transformers_spring.memory import CalibratedMediator, Interaction, Mediator, MediatorExample, RetrievedItem


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


# ------------------------------------------------------------------------------------------- calibrated mediator
WEIGHTS = [0.0, 0.25, 0.5]


def table(best_slots, best_column, slots=2):
    nll = np.full((slots + 1, len(WEIGHTS)), 5.0)
    nll[best_slots, best_column] = 4.0
    return nll


def test_fit_picks_the_lowest_validation_nll_per_cell_and_falls_back_when_thin():
    examples = [MediatorExample(0, False, None, table(2, 1)) for _ in range(12)]  # cold: 2 global slots, λ 0.25
    examples += [MediatorExample(40, True, 0.9, table(0, 2)) for _ in range(12)]  # warm, agreeing: local only, λ 0.5
    examples += [MediatorExample(40, True, 0.1, table(1, 1)) for _ in range(3)]  # warm, conflicting: too few
    mediator = CalibratedMediator.fit(examples, WEIGHTS, min_examples=10)
    assert mediator.rule_for(0, False, None) == [2, 0.25]
    assert mediator.rule_for(40, True, 0.9) == [0, 0.5]
    assert "n4|l1|a0" not in mediator.rules and mediator.fit_counts["n4|l1|a0"] == 3
    assert mediator.rule_for(40, True, 0.1) == mediator.rules["n4|l1"]  # the coarser cell answers
    local = [item("local", [1, 0, 0])]
    glob = [item("global", [1, 0.1, 0], 0.8, "x"), item("global", [0.9, 0, 0.2], 0.7, "y")]
    cold = mediator.mediate([], glob, n_local=0, k=2)
    assert cold.items == glob and cold.weight == 0.25 and cold.cold_start
    warm = mediator.mediate(local, glob, n_local=40, k=2)
    assert warm.items == local and warm.weight == 0.5
    assert mediator.mediate([], [], n_local=0, k=2).weight == 0.0  # an empty context scores the plain path
    # A cell too thin for a rule of its own, with no coarser rule, gets the local decision: '*' is never fitted.
    thin = CalibratedMediator.fit(examples[:3], WEIGHTS, min_examples=10)
    assert thin.rules == {"*": [0, 0.5]} and thin.mediate([], glob, 0, 2).items == []
    assert thin.mediate(local, glob, 0, 2).items == local and thin.mediate(local, glob, 0, 2).weight == 0.5


def noisy(rng, local, chosen, n, spread):
    """`n` tables whose local decision (slot 0 at λ 0.5) scores `local` and whose 2-slot λ 0.25 scores `chosen`,
    each with paired noise of the given spread."""
    out = []
    for _ in range(n):
        nll = np.full((3, len(WEIGHTS)), 9.0)
        noise = rng.normal(0.0, spread)
        nll[0, 2], nll[2, 1] = local + noise, chosen + noise + rng.normal(0.0, spread)
        out.append(nll)
    return out


def test_a_cell_without_a_clear_validation_gain_keeps_the_local_decision():
    rng = np.random.default_rng(0)
    clear = [MediatorExample(0, False, None, t) for t in noisy(rng, 5.0, 4.0, 30, 0.3)]  # gain 1.0, tight
    unclear = [MediatorExample(40, True, 0.9, t) for t in noisy(rng, 5.0, 4.95, 30, 1.0)]  # gain 0.05 ± 0.18
    worse = [MediatorExample(8, True, 0.9, t) for t in noisy(rng, 5.0, 5.5, 30, 0.3)]  # global hurts
    mediator = CalibratedMediator.fit(clear + unclear + worse, WEIGHTS, min_examples=10)
    assert mediator.rules["n0|l0|a-"] == [2, 0.25]
    gain, bound = mediator.fit_gains["n0|l0|a-"]
    assert gain > 0.9 and bound > 0.8
    # The mean of the 2-slot choice beats local in the unclear cell, but its bound does not clear 0.
    gain, bound = mediator.fit_gains["n4|l1|a1"]
    assert bound <= 0 and mediator.rules["n4|l1|a1"] == [0, 0.5]
    assert mediator.rules["n3|l1|a1"] == [0, 0.5] and mediator.fit_gains["n3|l1|a1"][0] == 0.0
    assert mediator.rules["*"] == [0, 0.5]
    # The same data with gain_z=0 keeps any mean gain: the unclear cell then uses global slots.
    loose = CalibratedMediator.fit(clear + unclear + worse, WEIGHTS, min_examples=10, gain_z=0.0)
    assert loose.rules["n4|l1|a1"] == ([2, 0.25] if loose.fit_gains["n4|l1|a1"][0] > 0 else [0, 0.5])
    # Reloads with the memory's config, and the fit's diagnostics are checked by name.
    assert CalibratedMediator(**{k: v for k, v in mediator.config().items()}).config() == mediator.config()
    with pytest.raises(ValueError, match="fit_gains"):
        CalibratedMediator(fit_gains={"*": ["a", 1]})
    with pytest.raises(ValueError, match="min_examples"):
        CalibratedMediator.fit(clear, WEIGHTS, min_examples=1)
    with pytest.raises(ValueError, match="gain_z"):
        CalibratedMediator.fit(clear, WEIGHTS, gain_z=-1)


def test_fit_refuses_bad_examples():
    with pytest.raises(ValueError, match="examples"):
        CalibratedMediator.fit([], WEIGHTS)
    with pytest.raises(ValueError, match="shape"):
        CalibratedMediator.fit([MediatorExample(0, False, None, np.zeros((3, 2)))], WEIGHTS)
    bad = table(0, 0)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        CalibratedMediator.fit([MediatorExample(0, False, None, table(0, 0)), MediatorExample(0, False, None, bad)],
                               WEIGHTS)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rules": {"n1|x": [0, 0.5]}}, "rules"),
        ({"rules": {"*": [-1, 0.5]}}, "rules"),
        ({"rules": {"*": [1, 1.5]}}, "rules"),
        ({"rules": {"*": [True, 0.5]}}, "rules"),
        ({"count_edges": [3, 1]}, "count_edges"),
        ({"count_edges": []}, "count_edges"),
        ({"agreement_threshold": 2}, "agreement_threshold"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CalibratedMediator(**kwargs)


def test_a_fitted_mediator_is_saved_and_reloaded_with_the_memory(tmp_path):
    from transformers_spring.memory import HashingEncoder, LoGoMemory

    examples = [MediatorExample(0, False, None, table(1, 2)) for _ in range(10)]
    mediator = CalibratedMediator.fit(examples, WEIGHTS, count_edges=(2, 8), agreement_threshold=0.3)
    memory = LoGoMemory(HashingEncoder(16), mediator=mediator, num_threads=1)
    memory.add(Interaction("a", "hello there", "hi"))
    memory.save_pretrained(tmp_path / "m")
    loaded = LoGoMemory.from_pretrained(tmp_path / "m", encoder=HashingEncoder(16)).mediator
    assert type(loaded) is CalibratedMediator and loaded.config() == mediator.config()
    assert loaded.rule_for(0, False, None) == [1, 0.5]


def test_without_a_global_item_the_local_decision_is_untouched():
    """Zero global slots, or no servable global hit, keeps local-only SPRInG's context and λ: LoGo changes a decision
    only by adding global items (so its effect is the global memory's, not a re-tuned λ)."""
    local = [item("local", [1, 0, 0]), item("local", [0.9, 0.1, 0])]
    glob = [item("global", [1, 0.1, 0], 0.8, "x")]
    mediator = CalibratedMediator(rules={"*": [0, 0.125], "n0": [2, 0.75]}, local_weight=0.5)
    warm = mediator.mediate(local, glob, n_local=40, k=2)
    assert warm.items == local and warm.weight == 0.5
    nothing_global = mediator.mediate([], [], n_local=0, k=2)
    assert nothing_global.items == [] and nothing_global.weight == 0.0
    # Fitting knows it: a λ other than the local weight at zero global slots is never chosen, and an example
    # without global hits scores the local decision under every rule.
    tables = [MediatorExample(40, True, None, np.array([[3.0, 5.0, 5.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]]),
                              has_global=False) for _ in range(10)]  # fmt: skip
    fitted = CalibratedMediator.fit(tables, WEIGHTS, min_examples=5)
    assert fitted.rules["*"] == [0, 0.5] and fitted.rules["n4|l1"] == [0, 0.5]
    with pytest.raises(ValueError, match="local weight"):
        CalibratedMediator.fit(tables, [0.0, 0.25], min_examples=5)
