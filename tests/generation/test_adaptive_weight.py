"""The per-token adaptive λ (`SpringConfig.adaptive_weight`, `adaptive_log_weights`): its formula by hand, β = 0 as
today's decoding (bit-identical), greedy decoding (fused and processor) and `score` against a slow reference that
recomputes both paths in full at every step."""

import math

import pytest
import torch
from testing_utils import (
    OPTION_GREEDY,
    OPTION_HISTORY,
    OPTION_NEW,
    OPTION_TEXTS,
    _penalise,
    encode_texts,
    make_model,
    option_score_case,
    option_wrapper,
)

from transformers_spring.generation import Personalization, SpringConfig
from transformers_spring.generation.logits_process import (
    RetrievalInterpolationLogitsProcessor,
    adaptive_log_weights,
    entropy,
    mix_logprobs,
)

NEW, GREEDY = OPTION_NEW, OPTION_GREEDY


def hand_lambda(lam, beta, log_hist, log_main):
    """λ_t by hand: σ(logit λ + β (H_main − H_hist)), entropies summed term by term."""
    h_hist = -sum(float(p) * math.log(float(p)) for p in log_hist.double().exp() if p > 0)
    h_main = -sum(float(p) * math.log(float(p)) for p in log_main.double().exp() if p > 0)
    return 1.0 / (1.0 + math.exp(-(math.log(lam / (1 - lam)) + beta * (h_main - h_hist))))


# ------------------------------------------------------------------------------------------------ the formula
def test_adaptive_log_weights_by_hand():
    torch.manual_seed(0)
    log_hist = torch.log_softmax(torch.randn(2, 7, dtype=torch.float64), -1)
    log_main = torch.log_softmax(3 * torch.randn(2, 7, dtype=torch.float64), -1)
    lam, beta = torch.tensor([[0.3], [0.7]], dtype=torch.float64), torch.tensor([[1.5], [0.5]], dtype=torch.float64)
    log_w, log_1mw = adaptive_log_weights(lam, beta, entropy(log_hist)[:, None], entropy(log_main)[:, None])
    for row in range(2):
        expected = hand_lambda(float(lam[row]), float(beta[row]), log_hist[row], log_main[row])
        assert float(log_w[row].exp()) == pytest.approx(expected, rel=1e-9)
        assert float(log_1mw[row].exp()) == pytest.approx(1 - expected, rel=1e-9)


def test_more_confident_path_weighs_more():
    flat = torch.log_softmax(torch.zeros(1, 8), -1)  # maximal entropy
    peaked = torch.log_softmax(torch.tensor([[9.0, 0, 0, 0, 0, 0, 0, 0]]), -1)
    lam, beta = torch.tensor([[0.5]]), torch.tensor([[1.0]])
    log_w, _ = adaptive_log_weights(lam, beta, entropy(peaked)[:, None], entropy(flat)[:, None])
    assert float(log_w.exp()) > 0.5  # a confident history path takes over
    log_w, _ = adaptive_log_weights(lam, beta, entropy(flat)[:, None], entropy(peaked)[:, None])
    assert float(log_w.exp()) < 0.5


def test_beta_zero_and_lambda_one_are_fixed():
    log_hist = torch.log_softmax(torch.randn(3, 5), -1)
    log_main = torch.log_softmax(torch.randn(3, 5), -1)
    lam = torch.tensor([[0.25], [0.5], [1.0]])
    log_w, log_1mw = adaptive_log_weights(
        lam, torch.zeros(3, 1), entropy(log_hist)[:, None], entropy(log_main)[:, None]
    )
    assert torch.equal(log_w, torch.log(lam)) and torch.equal(log_1mw, torch.log1p(-lam))  # bit-identical
    log_w, log_1mw = adaptive_log_weights(lam, torch.full((3, 1), 2.0), entropy(log_hist)[:, None],
                                          entropy(log_main)[:, None])  # fmt: skip
    assert float(log_w[2]) == 0.0 and float(log_1mw[2]) == -math.inf  # λ = 1 stays the history path alone


def test_mix_logprobs_adaptive_needs_entropies_and_validates():
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -3.0])
    with pytest.raises(ValueError, match="entropies"):
        mix_logprobs(a, b, 0.5, adaptive_weight=1.0)
    with pytest.raises(ValueError, match="adaptive_weight"):
        mix_logprobs(a, b, 0.5, adaptive_weight=-1.0)
    assert torch.equal(mix_logprobs(a, b, 0.5, adaptive_weight=0.0), mix_logprobs(a, b, 0.5))
    assert torch.equal(mix_logprobs(a, b, 1.0, adaptive_weight=3.0), a)  # λ = 1: no entropy needed


def test_config_and_personalization_validate_beta():
    assert SpringConfig().adaptive_weight == 0.0
    with pytest.raises(ValueError, match="adaptive_weight"):
        SpringConfig(adaptive_weight=-0.5)
    with pytest.raises(ValueError, match="Personalization.adaptive_weight"):
        Personalization(user="a", adaptive_weight=float("nan"))
    with pytest.raises(ValueError, match="adaptive_weight"):
        RetrievalInterpolationLogitsProcessor(make_model("llama"), torch.ones(2, 3, dtype=torch.long),
                                              adaptive_weight=[1.0])  # fmt: skip
    assert SpringConfig.from_dict(SpringConfig(adaptive_weight=1.5).to_dict()).adaptive_weight == 1.5


# ------------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def slow_adaptive_reference(model, prompt, history, lam, beta, steps, penalty=None):
    """Greedy decoding by hand: both paths recomputed in full at each step (no cache, no padding), λ_t by
    `hand_lambda` from the two (penalised) distributions, the mixture of probabilities, argmax."""
    main, hist, out = list(prompt), list(history), []
    for _ in range(steps):
        log_main = torch.log_softmax(_penalise(main, model(torch.tensor([main])).logits[0, -1].float(), penalty), -1)
        log_hist = torch.log_softmax(_penalise(hist, model(torch.tensor([hist])).logits[0, -1].float(), penalty), -1)
        lam_t = hand_lambda(lam, beta, log_hist, log_main)
        p = lam_t * log_hist.double().exp() + (1 - lam_t) * log_main.double().exp()
        token = int(torch.argmax(p))
        main.append(token)
        hist.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["fused", "processor"])
@pytest.mark.parametrize("penalty", [None, 1.2])
def test_adaptive_decoding_equals_slow_reference(arch, mode, penalty):
    model = make_model(arch)
    batch = encode_texts(OPTION_TEXTS)
    # Row 0 adapts with the config's β; row 1 overrides it (β = 4).
    rows = [
        Personalization(history=OPTION_HISTORY[0]),
        Personalization(history=OPTION_HISTORY[1], adaptive_weight=4.0),
    ]
    kwargs = dict(GREEDY, repetition_penalty=penalty) if penalty else GREEDY
    spring = option_wrapper(model, mode=mode, adaptive_weight=2.0)
    out = spring.generate(**batch, personalization=rows, **kwargs)[:, batch["input_ids"].shape[1] :]
    fixed = option_wrapper(model, mode=mode).generate(**batch, personalization=rows[:1] + [Personalization(
        history=OPTION_HISTORY[1])], **kwargs)[:, batch["input_ids"].shape[1] :]  # fmt: skip
    for row, beta in enumerate((2.0, 4.0)):
        info = spring.last_personalization[row]
        assert info.adaptive_weight == beta
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        expected = slow_adaptive_reference(model, prompt, info.history_ids, 0.5, beta, NEW, penalty)
        assert out[row].tolist() == expected, row
    assert not torch.equal(out, fixed)  # β changed some decision: the comparison is not vacuous


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_beta_zero_is_todays_decoding(mode):
    model = make_model("llama")
    batch = encode_texts(OPTION_TEXTS)
    rows = [
        Personalization(history=OPTION_HISTORY[0]),
        Personalization(history=OPTION_HISTORY[1], adaptive_weight=0.0),
    ]
    extra = {"return_dict_in_generate": True, "output_scores": True}
    today = option_wrapper(model, mode=mode).generate(**batch, personalization=rows, **GREEDY, **extra)
    on = option_wrapper(model, mode=mode, adaptive_weight=3.0)
    rows_on = [Personalization(history=OPTION_HISTORY[0], adaptive_weight=0.0), rows[1]]
    out = on.generate(**batch, personalization=rows_on, **GREEDY, **extra)
    assert torch.equal(out.sequences, today.sequences)
    assert all(torch.equal(x, y) for x, y in zip(out.scores, today.scores, strict=True))


# ------------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def test_score_equals_hand_computation():
    model, tokenizer, batch, gold = option_score_case()
    rows = [
        Personalization(history=OPTION_HISTORY[0], weight=0.3),
        Personalization(history=OPTION_HISTORY[1], adaptive_weight=0.0),
    ]
    spring = option_wrapper(model, adaptive_weight=1.5)
    scores = spring.score(batch["input_ids"], gold, batch["attention_mask"], personalization=rows)
    for row, (lam, beta) in enumerate(((0.3, 1.5), (0.5, 0.0))):
        info = spring.last_personalization[row]
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        expected = []
        for t, token in enumerate(gold[row]):
            log_main = torch.log_softmax(model(torch.tensor([prompt + gold[row][:t]])).logits[0, -1].double(), -1)
            log_hist = torch.log_softmax(
                model(torch.tensor([info.history_ids + gold[row][:t]])).logits[0, -1].double(), -1
            )
            lam_t = hand_lambda(lam, beta, log_hist, log_main) if beta else lam
            expected.append(
                math.log(lam_t * float(log_hist[token].exp()) + (1 - lam_t) * float(log_main[token].exp()))
            )
        assert scores[row].tolist() == pytest.approx(expected, abs=1e-4), row
    fixed = option_wrapper(model).score(batch["input_ids"], gold, batch["attention_mask"], personalization=rows)
    assert not torch.allclose(scores[0], fixed[0])  # β > 0 changed the scores
    assert torch.equal(scores[1], fixed[1])  # β = 0: unchanged, bit for bit
