"""The copy path (`generation/copying.py`): the n-gram copy distribution against a slow reference, μ = 0 as today's
decoding, greedy decoding and `score` against a slow hand-written mixture, copying a prompt, banned tokens."""

import math
import random
from collections import Counter

import pytest
import torch
from testing_utils import (
    HISTORIES,
    OPTION_GREEDY,
    OPTION_HISTORY,
    OPTION_NEW,
    OPTION_TEXTS,
    PROMPTS,
    _penalise,
    encode_texts,
    left_pad,
    make_model,
    make_tokenizer,
    option_score_case,
    option_wrapper,
    reference_generate,
)

from transformers_spring.generation import Personalization
from transformers_spring.generation.copying import (
    CopyIndex,
    CopyMixtureLogitsProcessor,
    copy_mixture,
    parse_copy_sources,
)
from transformers_spring.memory import Interaction

NEW, GREEDY = OPTION_NEW, OPTION_GREEDY


def slow_copy_distribution(sources, context, max_ngram):
    """`p_copy` as defined, written naively: the longest n with a match wins, votes counted by scanning."""
    for n in range(max_ngram, 0, -1):
        if len(context) < n:
            continue
        votes = Counter()
        for source in sources:
            for j in range(n, len(source)):
                if list(source[j - n : j]) == list(context[-n:]):
                    votes[source[j]] += 1
        if votes:
            total = sum(votes.values())
            return {token: count / total for token, count in votes.items()}
    return None


# ------------------------------------------------------------------------------------------------ the distribution
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_copy_index_matches_slow_reference(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 8])
    for _ in range(30):
        sources = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 15))] for _ in range(rng.randrange(0, 4))]
        max_ngram = rng.randrange(1, 6)
        index = CopyIndex(sources, max_ngram)
        for _ in range(10):
            context = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
            expected = slow_copy_distribution(sources, context, max_ngram)
            got = index.distribution(context)
            if expected is None:
                assert got is None
                continue
            ids, probs = got
            assert ids == sorted(expected) and math.isclose(sum(probs), 1.0)
            assert probs == pytest.approx([expected[t] for t in ids], abs=1e-12)


def test_copy_index_backs_off_and_never_crosses_sources():
    index = CopyIndex([[1, 2, 3], [3, 4], [9, 2, 5]], max_ngram=4)
    assert index.distribution([7, 1, 2]) == ([3], [1.0])  # "1 2" matched: the longer n wins over "2" -> {3, 5}
    assert index.distribution([8, 2]) == ([3, 5], [0.5, 0.5])
    assert index.distribution([4]) is None  # 4 ends its source: nothing follows it (no span across sources)
    assert index.distribution([]) is None
    assert not CopyIndex([[5]], 3) and not CopyIndex([], 3)


def test_parse_copy_sources():
    assert parse_copy_sources("input, history") == ("input", "history")
    with pytest.raises(ValueError, match="twice"):
        parse_copy_sources("input,input")
    with pytest.raises(ValueError, match="copy_sources"):
        parse_copy_sources("")


def test_processor_mixes_normalises_and_keeps_bans():
    index = CopyIndex([[4, 5, 6]], 2)
    processor = CopyMixtureLogitsProcessor([index, None, index], [0.5, 0.5, 0.5], [2, 2, 2])
    input_ids = torch.tensor([[4, 5], [4, 5], [1, 1]])  # row 2's context has no match
    scores = torch.randn(3, 8)
    scores[0, 1] = -math.inf
    out = processor(input_ids, scores)
    expected = torch.logaddexp(torch.log_softmax(scores[0], -1) + math.log(0.5), torch.full((8,), -math.inf))
    expected[6] = torch.logaddexp(torch.log_softmax(scores[0], -1)[6] + math.log(0.5), torch.tensor(math.log(0.5)))
    assert torch.allclose(out[0], expected) and torch.isneginf(out[0, 1])
    assert torch.logsumexp(out[0], -1).abs() < 1e-5
    assert torch.equal(out[1], scores[1]) and torch.equal(out[2], scores[2])  # no index / no match: unchanged
    # A banned token that the copy path alone would pick stays banned.
    scores = torch.randn(3, 8)
    scores[0, 6] = -math.inf
    out = CopyMixtureLogitsProcessor([index, None, None], [0.9, 0, 0], [2, 2, 2])(input_ids, scores)
    assert torch.isneginf(out[0, 6]) and int(out[0].argmax()) != 6


def test_copy_mixture_is_the_formula():
    log_p, log_c = torch.log(torch.tensor([0.2, 0.8])), torch.log(torch.tensor([1.0, 0.0]))
    out = copy_mixture(log_p, log_c, 0.25).exp()
    assert torch.allclose(out, torch.tensor([0.75 * 0.2 + 0.25, 0.75 * 0.8]))


# ------------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def slow_reference(model, prompt, history, lam, sources, mu, steps, penalty=None, max_ngram=4):
    """Greedy decoding by hand: both paths recomputed in full at each step, the λ-mixture, then the copy mixture
    with `slow_copy_distribution` over the full vocabulary (μ treated as 0 where p_copy is undefined)."""
    main, hist, out = list(prompt), list(history) if history else None, []
    for _ in range(steps):
        log_p = torch.log_softmax(_penalise(main, model(torch.tensor([main])).logits[0, -1].float(), penalty), -1)
        if hist is not None and lam > 0:
            log_h = torch.log_softmax(_penalise(hist, model(torch.tensor([hist])).logits[0, -1].float(), penalty), -1)
            log_p = torch.logaddexp(log_h + math.log(lam), log_p + math.log1p(-lam))
        dist = slow_copy_distribution(sources, main, max_ngram) if mu > 0 else None
        if dist is not None:
            p = (1 - mu) * log_p.double().exp()
            for token, q in dist.items():
                p[token] += mu * q
            log_p = p.log()
        token = int(torch.argmax(log_p))
        main.append(token)
        out.append(token)
        if hist is not None:
            hist.append(token)
    return out


def sources_by_hand(tokenizer, prompt, items):
    return [prompt] + [tokenizer(item.response, add_special_tokens=False)["input_ids"] for item in items]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_copy_weight_zero_is_todays_decoding(arch, mode):
    model = make_model(arch)
    batch = encode_texts(OPTION_TEXTS)
    rows = [Personalization(history=OPTION_HISTORY[0]), Personalization(history=OPTION_HISTORY[1], copy_weight=0.0)]
    off = option_wrapper(model, mode=mode)
    today = off.generate(**batch, personalization=rows, **GREEDY)
    assert "copy_row_steps" not in off.last_generation_stats
    assert all(info.copy_sources is None for info in off.last_personalization)
    # Against the slow reference of SPRInG alone (the one test_equivalence checks today's decoding with).
    for row in range(2):
        info = off.last_personalization[row]
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        expected = reference_generate(model, prompt, info.history_ids, 0.5, NEW)
        assert today[row, batch["input_ids"].shape[1] :].tolist() == expected
    # Row 1 keeps μ = 0 by its own override under a config with μ > 0; row 0's λ-only mixture is bit-identical.
    on = option_wrapper(model, mode=mode, copy_weight=0.5)
    rows_on = [Personalization(history=OPTION_HISTORY[0], copy_weight=0.0), rows[1]]
    assert torch.equal(on.generate(**batch, personalization=rows_on, **GREEDY), today)
    # Low-level: the processors, and their scores, are those of today's decoding.
    extra = {"return_dict_in_generate": True, "output_scores": True}
    a = off.generate(**batch, personalization=rows, **GREEDY, **extra)
    b = on.generate(**batch, personalization=rows_on, **GREEDY, **extra)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["fused", "processor"])
@pytest.mark.parametrize("penalty", [None, 1.2])
def test_copy_decoding_equals_slow_reference(arch, mode, penalty):
    model = make_model(arch)
    tokenizer = make_tokenizer()
    batch = encode_texts(OPTION_TEXTS + ["sun rain sun w8 rain"])
    # Row 0: open gate; row 1: closed gate (empty history, λ = 0.5) with the input as its only source; row 2: none.
    rows = [Personalization(history=OPTION_HISTORY[0]), Personalization(history=[]), None]
    kwargs = dict(GREEDY, repetition_penalty=penalty) if penalty else GREEDY
    spring = option_wrapper(model, mode=mode, copy_weight=0.5)
    out = spring.generate(**batch, personalization=rows, **kwargs)[:, batch["input_ids"].shape[1] :]
    assert spring.last_generation_stats["copy_row_steps"] > 0
    plain = option_wrapper(model, mode=mode).generate(**batch, personalization=rows, **kwargs)[:, -NEW:]
    assert not torch.equal(out[:2], plain[:2])  # the copy path changed decisions: the comparison is not vacuous
    assert torch.equal(out[2], plain[2])  # a row without personalization is untouched
    for row in range(3):
        info = spring.last_personalization[row]
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        items = (OPTION_HISTORY[0], [], None)[row]
        sources = sources_by_hand(tokenizer, prompt, items) if items is not None else []
        mu = 0.5 if items is not None else 0.0
        if info is not None:
            assert info.copy_sources == sources
        history = info.history_ids if info is not None else None
        expected = slow_reference(model, prompt, history, 0.5, sources, mu, NEW, penalty)
        assert out[row].tolist() == expected, row


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_all_gates_closed_still_copies(mode):
    """No row has a history path (plain generate inside): the copy path still applies to personalized rows."""
    model = make_model("llama")
    batch = encode_texts(OPTION_TEXTS)
    spring = option_wrapper(model, mode=mode, copy_weight=0.5)
    row = Personalization(user="alice", weight=0.0)
    out = spring.generate(**batch, personalization=row, **GREEDY)[:, batch["input_ids"].shape[1] :]
    assert spring.last_generation_stats["mode"] == "plain"
    for row in range(2):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert out[row].tolist() == slow_reference(model, prompt, None, 0.0, [prompt], 0.5, NEW)


def test_copy_path_copies_a_prompt_that_holds_the_continuation():
    model = make_model("llama")
    tokenizer = make_tokenizer()
    text = "w1 w2 w3 w4 w5 w6 w7 w8 w1 w2"
    batch = encode_texts([text])
    spring = option_wrapper(model, copy_weight=0.95, copy_sources="input")
    out = spring.generate(**batch, personalization=Personalization(history=[]), **dict(GREEDY, max_new_tokens=6))
    assert tokenizer.decode(out[0, batch["input_ids"].shape[1] :]) == "w3 w4 w5 w6 w7 w8"
    plain = option_wrapper(model).generate(**batch, personalization=Personalization(history=[]), **GREEDY)
    assert tokenizer.decode(plain[0, batch["input_ids"].shape[1] :]) != "w3 w4 w5 w6 w7 w8"


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_banned_tokens_stay_banned(mode):
    model = make_model("llama")
    tokenizer = make_tokenizer()
    batch = encode_texts(["w1 w2 w3 w4 w5 w6 w7 w8 w1 w2"])
    banned = tokenizer("w3", add_special_tokens=False)["input_ids"]
    spring = option_wrapper(model, mode=mode, copy_weight=0.95)
    rows = Personalization(history=[Interaction("alice", "cats", "w3 w4")])
    out = spring.generate(**batch, personalization=rows, bad_words_ids=[banned], **GREEDY)
    assert banned[0] not in out[0, batch["input_ids"].shape[1] :].tolist()


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def test_score_equals_hand_computation():
    model, tokenizer, batch, gold = option_score_case()
    rows = [Personalization(history=OPTION_HISTORY[0]), Personalization(history=OPTION_HISTORY[1], copy_weight=0.3)]
    spring = option_wrapper(model, copy_weight=0.6, copy_max_ngram=3)
    scores = spring.score(batch["input_ids"], gold, batch["attention_mask"], personalization=rows)
    for row, mu in enumerate((0.6, 0.3)):
        info = spring.last_personalization[row]
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        sources = sources_by_hand(tokenizer, prompt, OPTION_HISTORY[row])
        expected = []
        for t, token in enumerate(gold[row]):
            log_main = torch.log_softmax(model(torch.tensor([prompt + gold[row][:t]])).logits[0, -1].double(), -1)
            log_hist = torch.log_softmax(
                model(torch.tensor([info.history_ids + gold[row][:t]])).logits[0, -1].double(), -1
            )
            p_spring = 0.5 * log_main[token].exp() + 0.5 * log_hist[token].exp()
            dist = slow_copy_distribution(sources, prompt + gold[row][:t], 3)
            p = p_spring if dist is None else (1 - mu) * p_spring + mu * dist.get(token, 0.0)
            expected.append(float(torch.log(p)))
        assert scores[row].tolist() == pytest.approx(expected, abs=1e-4), row
    # Some tokens were mixed (and one copied from a response), so the check covers the copy path.
    plain = option_wrapper(model).score(batch["input_ids"], gold, batch["attention_mask"], personalization=rows)
    assert not torch.allclose(scores[0], plain[0])


def test_score_with_copy_weight_zero_is_unchanged():
    model = make_model("llama")
    ids, mask = left_pad(PROMPTS)
    rows = [Personalization(history=["cats rain"]), Personalization(history=["w1 w2"], copy_weight=0.0)]
    gold = [HISTORIES[0][:4], HISTORIES[1][:3]]
    a = option_wrapper(model).score(ids, gold, mask, personalization=rows)
    b = option_wrapper(model, copy_weight=0.5).score(ids, gold, mask, personalization=[rows[0], rows[1]])
    assert torch.equal(a[1], b[1])
    c = option_wrapper(model, copy_weight=0.0).score(ids, gold, mask, personalization=rows)
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
