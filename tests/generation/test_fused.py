"""`FusedDualPathDecoder`: the same tokens as processor mode on every tiny architecture, one forward per step on the
stacked `[main rows ; history rows]` batch, shrinking when rows exit, and a fallback to processor mode (with
`fallback_reason` set) for caches it cannot stack (Gemma 3's sliding-window layers) or model kwargs it does not
handle."""

import pytest
import torch
from testing_utils import EOS, NEW_TOKENS, PAD, ForwardCounter, left_pad, make_model, make_tokenizer, run_processor
from transformers import LogitsProcessorList

from transformers_spring.generation import (
    FusedDualPathDecoder,
    Personalization,
    RetrievalInterpolationLogitsProcessor,
    SpringConfig,
    SpringForCausalLM,
)

NEW = NEW_TOKENS
# Architectures whose KV cache is not a plain DynamicCache of full-attention layers: fused decoding falls back.
UNSTACKABLE = {"gemma3"}  # layer 0 is a DynamicSlidingWindowLayer


def spring(model, memory, **config):
    config = SpringConfig(**{"interpolation_weight": 0.5, **config})  # stated: the references mix with 0.5
    return SpringForCausalLM(model, memory=memory, config=config, tokenizer=make_tokenizer())


def encode(texts):
    return make_tokenizer()(texts, return_tensors="pt", padding=True)


# ------------------------------------------------------------------------------------------------ the decoder
@pytest.mark.parametrize("weight", [0.3, 0.5, [0.5, 0.0], [1.0, 0.25]])
def test_fused_equals_processor(model, weight):
    serial, _, _ = run_processor(model, weight, penalty=1.2)
    fused, _, _ = run_processor(model, weight, penalty=1.2, fused=True)
    assert torch.equal(serial, fused)


def test_fallback_reason_per_architecture(arch, model):
    """Gemma 3's sliding-window cache cannot be stacked: the decoder says so and decodes in processor mode (same
    tokens). Every other architecture runs the fused loop."""
    serial, _, _ = run_processor(model, 0.5, penalty=1.2)
    fused, _, decoder = run_processor(model, 0.5, penalty=1.2, fused=True)
    assert torch.equal(fused, serial)
    if arch in UNSTACKABLE:
        assert decoder.fallback_reason is not None
    else:
        assert decoder.fallback_reason is None


def test_one_forward_per_step_on_the_stacked_batch(arch, model):
    """Fused: both prefills, then one forward per step on B + R = 4 rows, and the processor runs no forward of its
    own. After a fallback the processor runs the history path (NEW forwards)."""
    counter = ForwardCounter(model)
    _, processor, decoder = run_processor(model, 0.5, fused=True)
    counter.remove()
    if arch in UNSTACKABLE:
        assert decoder.fallback_reason is not None
        assert processor.history_forward_calls == NEW
        assert counter.batch_sizes.count(2) == 2 * NEW  # main and history path, serially
        return
    assert counter.batch_sizes == [2, 2] + [4] * (NEW - 1)
    assert decoder.forward_calls == NEW + 1
    assert processor.history_forward_calls == 0


def test_closed_gate_rows_stay_out_of_the_fused_batch():
    model = make_model("llama")
    counter = ForwardCounter(model)
    _, processor, decoder = run_processor(model, [0.5, 0.0], fused=True)
    counter.remove()
    assert decoder.fallback_reason is None and processor.active_rows == [0]
    assert counter.batch_sizes == [2, 1] + [3] * (NEW - 1)  # 2 main rows + row 0's history row


def test_history_rows_leave_the_batch_on_early_exit():
    model = make_model("llama")
    counter = ForwardCounter(model)
    _, processor, decoder = run_processor(model, 0.5, fused=True, early_exit_epsilon=1.0, early_exit_patience=2)
    counter.remove()
    assert decoder.fallback_reason is None
    assert processor.exit_steps == {0: 2, 1: 2}  # JS <= ln 2 < 1: both rows exit after 2 steps
    steps = counter.batch_sizes[2:]
    assert steps[0] == 4 and steps[-1] == 2 and steps == sorted(steps, reverse=True)
    assert steps.count(4) == 1  # the exit after step 2 drops both history rows before the next forward


def test_unstackable_cache_after_prefill_falls_back(monkeypatch, model):
    """A cache that turns out not to stack after the prefill forwards: processor mode, same tokens."""
    import transformers_spring.generation.fused as fused_module

    expected, _, _ = run_processor(model, 0.5, penalty=1.2)
    monkeypatch.setattr(fused_module, "stack_cache_rows", lambda *args: None)
    fused, _, decoder = run_processor(model, 0.5, penalty=1.2, fused=True)
    assert decoder.fallback_reason == "cache"
    assert torch.equal(fused, expected)


def test_unknown_model_kwarg_falls_back_to_processor_mode():
    """GPT-2 takes `token_type_ids`, which the fused loop does not rebuild: processor mode, same tokens."""
    model = make_model("gpt2")
    ids, mask = left_pad([[5, 6, 7, 8, 15], [9, 10, 11, 12, 13, 14]])
    history, history_mask = left_pad([[20, 21, 5, 6, 7, 8, 15], [30, 9, 10, 11, 12, 13, 14]])
    kwargs = {"attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "max_new_tokens": NEW}
    kwargs |= {"do_sample": False, "pad_token_id": PAD, "eos_token_id": None}

    def run(fused):
        processor = RetrievalInterpolationLogitsProcessor(
            model, history, history_mask, 0.5, prompt_attention_mask=mask
        )
        decoder = FusedDualPathDecoder(processor) if fused else None
        extra = {"custom_generate": decoder} if fused else {}
        out = model.generate(ids, logits_processor=LogitsProcessorList([processor]), **kwargs, **extra)
        return out[:, ids.shape[1] :], decoder

    serial, _ = run(False)
    fused, decoder = run(True)
    assert decoder.fallback_reason == "kwarg:token_type_ids"
    assert torch.equal(fused, serial)


def test_processor_must_be_in_the_logits_processor_list():
    model = make_model("llama")
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([[3, 4, 5]]), None, 0.5)
    with pytest.raises(ValueError, match="logits_processor"):
        model.generate(
            torch.tensor([[5, 6]]), custom_generate=FusedDualPathDecoder(processor), max_new_tokens=3, pad_token_id=PAD
        )


# ------------------------------------------------------------------------------------------------ the wrapper
def test_wrapper_fused_mode_equals_processor_mode(model, memory):
    batch = encode(["cats rain sun", "dogs vote dogs w10 w11"])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "repetition_penalty": 1.2, "pad_token_id": PAD}
    outs = {
        mode: spring(model, memory, mode=mode).generate(**batch, personalization=["alice", "bob"], **kwargs)
        for mode in ("fused", "processor")
    }
    assert outs["fused"].shape == (2, batch["input_ids"].shape[1] + NEW)
    assert torch.equal(outs["fused"], outs["processor"])


def test_wrapper_modes_agree_with_eos_and_mixed_rows(model, memory):
    """Fused == processor with EOS stopping, a personalised row, an unpersonalised row and sampling off."""
    batch = encode(["cats rain sun", "dogs vote dogs w10 w11", "sun w12"])
    rows = ["alice", None, Personalization(user="bob", weight=0.7)]
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": PAD, "eos_token_id": EOS}
    outs = [
        spring(model, memory, mode=mode).generate(**batch, personalization=rows, **kwargs)
        for mode in ("fused", "processor")
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_num_return_sequences_sampling_matches_between_modes(memory, mode):
    model = make_model("llama")
    batch = encode(["cats rain sun", "dogs vote"])
    kwargs = {"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 2, "pad_token_id": PAD, "top_k": 0}
    torch.manual_seed(7)
    out = spring(model, memory, mode=mode).generate(**batch, personalization=["alice", "bob"], **kwargs)
    torch.manual_seed(7)
    other = "processor" if mode == "fused" else "fused"
    expected = spring(model, memory, mode=other).generate(**batch, personalization=["alice", "bob"], **kwargs)
    assert out.shape[0] == 4
    assert torch.equal(out, expected)
