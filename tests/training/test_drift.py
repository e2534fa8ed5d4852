import copy
import math
import random

import pytest
import torch
from testing_utils import TRAINING_VOCAB, make_adapted_model, make_interactions, make_model

from transformers_spring.training import (
    BaseLogProbCache,
    SpringFormatter,
    compute_logprobs,
    drift_scores,
    num_selected,
    select_top,
)
from transformers_spring.training.drift import (
    LogProb,
    _SharedPrefix,
    base_logprobs,
    response_logits,
    shared_prefix_length,
    top_n,
)
from transformers_spring.training.lora import create_adapter
from transformers_spring.utils.compat import supports_logits_to_keep_mask


def peft_model(arch="llama", seed=0):
    """A tiny model with a non-trivial adapter "alice" (LoRA B is zero at init, which would make p_adap = p_base)."""
    return make_adapted_model(arch, seed, vocab_size=TRAINING_VOCAB.size).eval()


def hand_logprob(model, sample) -> tuple[float, int]:
    """The response log-prob by an explicit loop over tokens, one unpadded sequence, log_softmax per position."""
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    total, count = 0.0, 0
    for t in range(sample.prompt_length, len(sample.input_ids)):
        total += float(torch.log_softmax(logits[t - 1], dim=-1)[sample.input_ids[t]])
        count += 1
    return total, count


SYSTEM = "w1 w2 w3 w4 w5 w6"  # a system turn: every sample starts with the same tokens (the shared-prefix path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_drift_score_equals_hand_computation(tokenizer, arch, reduction, alpha, system):
    model = peft_model(arch)
    samples = SpringFormatter(tokenizer, system_prompt=system).encode_many(make_interactions("alice", 7))
    assert (shared_prefix_length(samples) >= 4) == (system is not None)
    result = drift_scores(model, samples, alpha=alpha, reduction=reduction, batch_size=3)
    for sample, score in zip(samples, result.scores, strict=True):
        adapted, n = hand_logprob(model, sample)
        with model.disable_adapter():
            base, _ = hand_logprob(model, sample)
        if reduction == "mean":
            adapted, base = adapted / n, base / n
        expected = -math.log(math.exp(adapted - base)) + alpha * base  # −log(p_adap / p_base) + α·log p_base
        assert score == pytest.approx(expected, abs=1e-4)
    assert len(set(result.scores)) == len(samples)  # the adapter really changes things


def test_base_pass_is_the_model_without_adapter(tokenizer):
    plain = make_model("llama", TRAINING_VOCAB.size)
    reference = copy.deepcopy(plain)
    from peft import LoraConfig

    model = create_adapter(plain, "alice", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.3)
    samples = SpringFormatter(tokenizer).encode_many(make_interactions("alice", 5))
    expected = compute_logprobs(reference, samples, batch_size=2)
    got = base_logprobs(model, samples, batch_size=2)
    assert [round(v.total, 4) for v in got] == [round(v.total, 4) for v in expected]
    adapted = compute_logprobs(model, samples, batch_size=2)
    assert all(abs(a.total - b.total) > 1e-3 for a, b in zip(adapted, got, strict=True))


def test_batching_does_not_change_logprobs(tokenizer):
    model = peft_model()
    samples = SpringFormatter(tokenizer).encode_many(make_interactions("alice", 9))
    one = compute_logprobs(model, samples, batch_size=1)
    many = compute_logprobs(model, samples, batch_size=4)
    for a, b in zip(one, many, strict=True):
        assert a.num_tokens == b.num_tokens and a.total == pytest.approx(b.total, abs=1e-4)


def spy_on_prefix(monkeypatch) -> list:
    """Records what every `_SharedPrefix.build` returns (None: full forwards)."""
    built, original = [], _SharedPrefix.build.__func__

    def build(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(_SharedPrefix, "build", classmethod(build))
    return built


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_equals_full_forwards(tokenizer, arch, monkeypatch):
    model = peft_model(arch)
    samples = SpringFormatter(tokenizer, system_prompt=SYSTEM).encode_many(make_interactions("alice", 9))
    built = spy_on_prefix(monkeypatch)
    full = compute_logprobs(model, samples, batch_size=4, shared_prefix=False)
    assert built == []
    shared = compute_logprobs(model, samples, batch_size=4)
    assert len(built) == 1 and built[0] is not None and built[0].length == shared_prefix_length(samples) >= 4
    with model.disable_adapter():  # the base pass builds its own prefix cache
        base_full = compute_logprobs(model, samples, batch_size=4, shared_prefix=False)
        base_shared = compute_logprobs(model, samples, batch_size=4)
    for a, b in zip(full + base_full, shared + base_shared, strict=True):
        assert a.num_tokens == b.num_tokens and a.total == pytest.approx(b.total, abs=1e-5)
    assert all(abs(a.total - b.total) > 1e-3 for a, b in zip(shared, base_shared, strict=True))


def test_shared_prefix_length_stops_before_the_first_predicting_position(tokenizer):
    formatter = SpringFormatter(tokenizer, system_prompt=SYSTEM)
    samples = formatter.encode_many(make_interactions("alice", 6))
    length = shared_prefix_length(samples)
    assert all(s.input_ids[:length] == samples[0].input_ids[:length] for s in samples)
    assert len({s.input_ids[length] for s in samples}) > 1  # the longest common prefix...
    # ...unless a prompt ends first: the position predicting a sample's first response token stays out
    one = samples[:1]
    assert shared_prefix_length(one) == one[0].prompt_length - 1
    assert shared_prefix_length([]) == 0
    other = formatter.encode_many(make_interactions("alice", 1, start=50))
    assert shared_prefix_length([*one, *other]) <= min(one[0].prompt_length, other[0].prompt_length) - 1


def test_short_prefix_or_single_sample_batches_fall_back_or_agree(tokenizer, monkeypatch):
    model = peft_model()
    built = spy_on_prefix(monkeypatch)
    samples = SpringFormatter(tokenizer).encode_many(make_interactions("alice", 5))  # 3 shared tokens
    compute_logprobs(model, samples, batch_size=2)
    assert built == [None]  # below `min_shared_prefix`: full forwards
    one = SpringFormatter(tokenizer, system_prompt=SYSTEM).encode_many(make_interactions("alice", 1))
    got = compute_logprobs(model, one)
    assert built[-1] is not None
    assert got[0].total == pytest.approx(hand_logprob(model, one[0])[0], abs=1e-5)


def test_scoring_dtype_autocasts_the_forwards(tokenizer):
    model = peft_model()
    samples = SpringFormatter(tokenizer, system_prompt=SYSTEM).encode_many(make_interactions("alice", 6))
    exact = compute_logprobs(model, samples, batch_size=3)
    low = compute_logprobs(model, samples, batch_size=3, dtype="bfloat16")
    assert compute_logprobs(model, samples, batch_size=3, dtype=None) == exact
    differences = [abs(a.total - b.total) / a.num_tokens for a, b in zip(exact, low, strict=True)]
    assert 0 < max(differences) < 0.1  # bf16 really ran, and stays close per token


def test_logits_to_keep_matches_full_logits(tokenizer):
    model = peft_model()
    if not supports_logits_to_keep_mask(model):
        pytest.skip("this transformers' logits_to_keep takes no (batch, seq) mask")
    samples = SpringFormatter(tokenizer).encode_many(make_interactions("alice", 3))
    from transformers_spring.training.drift import _batch

    ids, mask, keep, _ = _batch(samples, 0)
    with torch.no_grad():
        fast = response_logits(model, ids, mask, keep, use_logits_to_keep=True)
        slow = response_logits(model, ids, mask, keep, use_logits_to_keep=False)
    assert fast.shape == slow.shape == (int(keep.sum()), model.config.vocab_size)
    assert torch.allclose(fast, slow, atol=1e-5)


class CountForwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_base_model().register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def test_base_logprobs_are_cached(tokenizer):
    model = peft_model()
    samples = SpringFormatter(tokenizer).encode_many(make_interactions("alice", 6))
    cache = BaseLogProbCache()
    counter = CountForwards(model)
    first = drift_scores(model, samples, cache=cache, batch_size=3)
    assert counter.calls == 4 and len(cache) == 6  # 2 adapter batches + 2 base batches
    second = drift_scores(model, samples, cache=cache, batch_size=3)
    assert counter.calls == 6  # only the adapter pass ran again
    assert first.scores == second.scores
    # JSON round trip, exact
    restored = BaseLogProbCache.from_dict(cache.to_dict())
    assert all(restored.get(k) == cache.get(k) for k in cache.keys())
    assert cache.prune("alice", [samples[0].cache_key]) == 5 and len(cache) == 1


def test_cache_for_another_base_model_is_discarded():
    cache = BaseLogProbCache("model-a")
    cache.put("k", LogProb(-1.0, 2))
    assert len(BaseLogProbCache.from_dict(cache.to_dict(), model_name="model-b")) == 0
    assert len(BaseLogProbCache.from_dict(cache.to_dict(), model_name="model-a")) == 1


@pytest.mark.parametrize(
    "n, ratio, k", [(10, 0.3, 3), (11, 0.3, 4), (1, 0.3, 1), (7, 1.0, 7), (100, 0.3, 30), (3, 0.5, 2)]
)
def test_num_selected_is_ceil(n, ratio, k):
    assert num_selected(n, ratio) == k == math.ceil(round(ratio * n, 9))


@pytest.mark.parametrize("seed", range(5))
def test_selection_keeps_exactly_the_top_ceil(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    ratio = rng.choice([0.1, 0.25, 0.3, 0.5, 0.9])
    scores = [rng.gauss(0, 1) for _ in range(n)]
    chosen = select_top(scores, ratio)
    k = math.ceil(round(ratio * n, 9))
    assert len(chosen) == k and chosen == sorted(chosen)
    assert min(scores[i] for i in chosen) >= max((scores[i] for i in range(n) if i not in chosen), default=-1e9)


def test_selection_ties_are_deterministic():
    assert select_top([1.0, 2.0, 2.0, 2.0], 0.5) == [1, 2]
    assert top_n([1.0, 2.0, 2.0], 2) == [1, 2]
