"""Unit tests of RetrievalInterpolationLogitsProcessor on synthetic tensors and tiny models."""

import math
import re

import pytest
import torch
from testing_utils import PAD, make_model
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from transformers_spring.generation import FusedDualPathDecoder, RetrievalInterpolationLogitsProcessor, js_divergence
from transformers_spring.generation.logits_process import apply_repetition_penalty


class ConstantModel(torch.nn.Module):
    """A fake causal LM that returns fixed next-token logits for every row and counts its forwards."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.calls = []

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        self.calls.append({"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask})
        batch = input_ids.shape[0]
        out = type("Out", (), {})()
        out.logits = self.logits[:batch].unsqueeze(1).repeat(1, input_ids.shape[1], 1)
        out.past_key_values = _FakeCache()
        return out


class _FakeCache:
    def batch_select_indices(self, indices):
        self.selected = indices


def test_class_contract():
    assert RetrievalInterpolationLogitsProcessor.supports_continuous_batching is False


def test_returns_log_of_probability_mixture_without_touching_scores():
    torch.manual_seed(0)
    history_logits = torch.randn(2, 10) * 3
    scores = torch.randn(2, 10) * 3
    before = scores.clone()
    model = ConstantModel(history_logits)
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([[3, 4], [5, 6]]), None, [0.25, 0.8])
    out = processor(torch.tensor([[7, 8], [9, 9]]), scores)
    assert torch.equal(scores, before)  # never modified in place
    assert out.data_ptr() != scores.data_ptr()
    weights = torch.tensor([[0.25], [0.8]])
    expected = torch.log(weights * history_logits.softmax(-1) + (1 - weights) * scores.softmax(-1))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))  # normalised
    # A mixture of probabilities is not a mixture of logits.
    assert not torch.allclose(out.softmax(-1), (weights * history_logits + (1 - weights) * scores).softmax(-1))


def test_left_padded_positions_and_decode_positions():
    model = ConstantModel(torch.zeros(2, 10))
    history = torch.tensor([[PAD, PAD, 3, 4], [5, 6, 7, 8]])
    processor = RetrievalInterpolationLogitsProcessor(model, history, (history != PAD).long(), 0.5)
    processor(torch.tensor([[1], [2]]), torch.zeros(2, 10))
    processor(torch.tensor([[1, 3], [2, 3]]), torch.zeros(2, 10))
    assert model.calls[0]["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert model.calls[1]["position_ids"].tolist() == [[2], [4]]
    assert model.calls[1]["input_ids"].tolist() == [[3], [3]]
    assert model.calls[1]["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_closed_rows_skip_the_second_forward():
    model = ConstantModel(torch.randn(3, 10))
    history = torch.tensor([[3, 4], [5, 6], [7, 8]])
    processor = RetrievalInterpolationLogitsProcessor(model, history, None, [0.0, 0.5, 0.0])
    scores = torch.randn(3, 10)
    out = processor(torch.tensor([[1], [1], [1]]), scores)
    assert [call["input_ids"].shape[0] for call in model.calls] == [1]
    assert model.calls[0]["input_ids"].tolist() == [[5, 6]]
    torch.testing.assert_close(out[[0, 2]], scores[[0, 2]].log_softmax(-1))

    all_closed = RetrievalInterpolationLogitsProcessor(model, history, None, 0.0)
    all_closed(torch.tensor([[1], [1], [1]]), scores)
    assert len(model.calls) == 1


def test_banned_tokens_stay_banned_after_the_mix():
    model = ConstantModel(torch.zeros(1, 10))  # the history path likes every token equally
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([[3, 4]]), None, 0.5)
    scores = torch.zeros(1, 10)
    scores[0, 2] = -math.inf  # e.g. EOS banned by min_new_tokens
    out = processor(torch.tensor([[1]]), scores)
    assert out[0, 2] == -math.inf
    assert torch.isfinite(out[0, [0, 1, 3]]).all()


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    ids, scores = torch.randint(0, 10, (3, 6)), torch.randn(3, 10)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    assert torch.equal(apply_repetition_penalty(ids, scores, 1.3), expected)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, :2] = False  # padding is not penalised
    partial = apply_repetition_penalty(ids, scores, 1.3, valid)
    assert torch.equal(partial, RepetitionPenaltyLogitsProcessor(1.3)(ids[:, 2:], scores.clone()))


def test_js_divergence():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]).log()
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]).log()
    divergence = js_divergence(p, q)
    torch.testing.assert_close(divergence, torch.tensor([0.0, math.log(2)]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weight": 1.5}, ValueError, "weight"),
        ({"weight": -0.1}, ValueError, "weight"),
        ({"weight": [0.5]}, ValueError, "weight"),
        ({"weight": "half"}, TypeError, "weight"),
        ({"penalty_mode": "both"}, ValueError, "penalty_mode"),
        ({"early_exit_epsilon": -1.0}, ValueError, "early_exit_epsilon"),
        ({"early_exit_patience": 0}, ValueError, "early_exit_patience"),
        ({"history_attention_mask": torch.tensor([[1, 0], [1, 1]])}, ValueError, "left-padded"),
        ({"history_attention_mask": torch.ones(2, 3, dtype=torch.long)}, ValueError, "history_attention_mask"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = {"history_attention_mask": None, "weight": 0.5, **kwargs}
    with pytest.raises(error, match=match):
        RetrievalInterpolationLogitsProcessor(ConstantModel(torch.zeros(2, 4)), torch.tensor([[1, 2], [3, 4]]), **args)


def test_beam_search_raises_a_clear_error():
    model = make_model("llama")
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([[3, 4, 5]]), None, 0.5)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(
            torch.tensor([[5, 6]]),
            logits_processor=LogitsProcessorList([processor]),
            num_beams=2,
            max_new_tokens=3,
            pad_token_id=PAD,
        )


def test_processor_is_single_use():
    """A second generate() with the same processor is told so first, before the token counts."""
    model = make_model("llama")
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([[3, 4, 5]]), None, 0.5)
    kwargs = {"logits_processor": LogitsProcessorList([processor]), "max_new_tokens": 3, "pad_token_id": PAD}
    model.generate(torch.tensor([[5, 6]]), **kwargs)
    cause = (
        "this RetrievalInterpolationLogitsProcessor was already used by an earlier generate() call; a processor is "
        "single-use: build a fresh one (SpringForCausalLM.logits_processor(...)) for every generate() call."
    )
    with pytest.raises(RuntimeError, match="^" + re.escape(cause) + r" \(This call passed 2 token\(s\); the last"):
        model.generate(torch.tensor([[5, 6]]), **kwargs)


def test_several_tokens_per_step_names_speculative_decoding():
    processor = RetrievalInterpolationLogitsProcessor(
        ConstantModel(torch.zeros(1, 10)), torch.tensor([[3]]), None, 0.5
    )
    processor(torch.tensor([[1, 2]]), torch.zeros(1, 10))
    with pytest.raises(RuntimeError, match=r"^assisted / speculative decoding \(several tokens per step\) is not"):
        processor(torch.tensor([[1, 2, 7, 8]]), torch.zeros(1, 10))


def test_standard_processors_still_apply():
    """min_new_tokens (a built-in that runs before the mixture) keeps EOS out even when history wants it."""
    model = make_model("llama")
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([[3, 4, 5]]), None, 0.9)
    out = model.generate(
        torch.tensor([[5, 6]]),
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=6,
        min_new_tokens=6,
        eos_token_id=[int(t) for t in range(10, 64)],  # most of the vocabulary counts as EOS
        pad_token_id=PAD,
        do_sample=False,
    )
    assert out.shape[1] == 2 + 6
    assert all(token < 10 for token in out[0, 2:].tolist())


@pytest.mark.parametrize("fused", [False, True])
def test_early_exit_stops_history_path(fused):
    model = make_model("llama")
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    history = torch.tensor([[20, 21, 5, 6, 7, 8], [30, 31, 9, 10, 11, 12]])

    def run(epsilon):
        processor = RetrievalInterpolationLogitsProcessor(
            model, history, None, 0.5, early_exit_epsilon=epsilon, early_exit_patience=2
        )
        extra = {"custom_generate": FusedDualPathDecoder(processor)} if fused else {}
        out = model.generate(
            prompt,
            logits_processor=LogitsProcessorList([processor]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
            **extra,
        )
        return out, processor

    full, off = run(0.0)
    assert off.exit_steps == {} and off.history_row_steps == 20
    exited_out, on = run(1.0)  # JS <= ln 2 < 1: every row exits after `patience` steps
    assert on.exit_steps == {0: 2, 1: 2}
    assert on.history_row_steps == 4
    assert torch.equal(exited_out[:, :6], full[:, :6])  # identical until the exit takes effect
