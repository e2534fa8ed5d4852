"""Token-for-token equivalences of dual-path decoding on the eight tiny architectures of `testing_utils.ARCHS`:
λ = 0 is plain generate, λ = 1 is generate with the history in the prompt, an intermediate λ is the slow reference
(Algorithm 2 without cache or padding), in processor and fused mode, directly and through `SpringForCausalLM`."""

import pytest
import torch
from testing_utils import (
    GREEDY,
    HISTORIES,
    NEW_TOKENS,
    PAD,
    PROMPTS,
    FakeMemory,
    ForwardCounter,
    left_pad,
    make_model,
    make_tokenizer,
    reference_generate,
    run_processor,
)
from transformers import LogitsProcessorList

from transformers_spring.generation import (
    FusedDualPathDecoder,
    RetrievalInterpolationLogitsProcessor,
    SpringConfig,
    SpringForCausalLM,
)

NEW = NEW_TOKENS


@pytest.mark.parametrize("fused", [False, True])
def test_weight_zero_equals_plain_generate(model, fused):
    ids, mask = left_pad(PROMPTS)
    plain = model.generate(ids, attention_mask=mask, **GREEDY)[:, ids.shape[1] :]
    counter = ForwardCounter(model)
    mixed, processor, _ = run_processor(model, 0.0, fused=fused)
    counter.remove()
    assert torch.equal(mixed, plain)
    assert processor.history_forward_calls == 0
    assert counter.calls == NEW  # prefill + NEW - 1 decoding steps: no second path at all


@pytest.mark.parametrize("fused", [False, True])
def test_weight_one_equals_history_in_prompt(model, fused):
    hist, hist_mask = left_pad(HISTORIES)
    plain = model.generate(hist, attention_mask=hist_mask, **GREEDY)[:, hist.shape[1] :]
    mixed, processor, decoder = run_processor(model, 1.0, fused=fused)
    assert torch.equal(mixed, plain)
    if decoder is None or decoder.fallback_reason is not None:  # the processor ran the history path itself
        assert processor.history_forward_calls == NEW


@pytest.mark.parametrize("penalty", [None, 1.2])
@pytest.mark.parametrize("fused", [False, True])
def test_intermediate_weight_equals_slow_reference(model, penalty, fused):
    mixed, _, _ = run_processor(model, 0.5, penalty=penalty, fused=fused)
    for row, (prompt, history) in enumerate(zip(PROMPTS, HISTORIES, strict=True)):
        expected = reference_generate(model, prompt, history, 0.5, NEW, penalty=penalty)
        assert mixed[row].tolist() == expected


@pytest.mark.parametrize("fused", [False, True])
def test_sampling_with_fixed_seed_matches_reference(arch, fused):
    model = make_model(arch)
    prompt, history = PROMPTS[1], HISTORIES[1]
    processor = RetrievalInterpolationLogitsProcessor(model, torch.tensor([history]), None, 0.5)
    extra = {"custom_generate": FusedDualPathDecoder(processor)} if fused else {}
    torch.manual_seed(1234)
    out = model.generate(
        torch.tensor([prompt]),
        logits_processor=LogitsProcessorList([processor]),
        max_new_tokens=NEW,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        pad_token_id=PAD,
        eos_token_id=None,
        **extra,
    )
    torch.manual_seed(1234)
    expected = reference_generate(model, prompt, history, 0.5, NEW, do_sample=True)
    assert out[0, len(prompt) :].tolist() == expected


def test_gate_closed_row_gets_no_second_forward(model):
    """Row 1's gate is closed: every history forward carries row 0 only, and row 1 decodes as plain generate."""
    counter = ForwardCounter(model)
    mixed, processor, _ = run_processor(model, [0.5, 0.0])
    counter.remove()
    assert processor.active_rows == [0]
    assert counter.batch_sizes.count(1) == NEW == processor.history_forward_calls  # history path: row 0 only
    assert counter.batch_sizes.count(2) == NEW  # main path
    ids, mask = left_pad(PROMPTS)
    plain = model.generate(ids, attention_mask=mask, **GREEDY)[:, ids.shape[1] :]
    assert torch.equal(mixed[1], plain[1])
    assert mixed[0].tolist() == reference_generate(model, PROMPTS[0], HISTORIES[0], 0.5, NEW)


# ------------------------------------------------------------------------------------------------ the wrapper
def spring(model, memory, **config):
    return SpringForCausalLM(model, memory=memory, config=SpringConfig(**config), tokenizer=make_tokenizer())


def encode(texts):
    return make_tokenizer()(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_wrapper_two_users_batch_equals_each_alone(model, memory, mode):
    wrapper = spring(model, memory, mode=mode)
    texts = ["cats rain sun", "dogs vote dogs w10 w11"]
    batch = encode(texts)
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "repetition_penalty": 1.2, "pad_token_id": PAD}
    together = wrapper.generate(**batch, personalization=["alice", "bob"], **kwargs)
    together = together[:, batch["input_ids"].shape[1] :]
    assert all(info.gate_open for info in wrapper.last_personalization)
    for row, (text, user) in enumerate(zip(texts, ["alice", "bob"], strict=True)):
        single = encode([text])
        alone = wrapper.generate(**single, personalization=user, **kwargs)[:, single["input_ids"].shape[1] :]
        # A row alone stops at its EOS; in the batch it is padded until the other row ends.
        width = alone.shape[1]
        assert together[row, :width].tolist() == alone[0].tolist(), (row, user)
        assert set(together[row, width:].tolist()) <= {PAD}, (row, user)


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_wrapper_gate_closed_is_plain_generate(model, mode):
    closed = FakeMemory({"alice": [("cats", "w1")]}, threshold=100.0)  # nothing passes the gate
    wrapper = spring(model, closed, mode=mode)
    batch = encode(["cats rain sun", "dogs vote"])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "repetition_penalty": 1.2, "pad_token_id": PAD}
    plain = model.generate(**batch, **kwargs)
    counter = ForwardCounter(model)
    out = wrapper.generate(**batch, personalization="alice", **kwargs)
    counter.remove()
    assert torch.equal(out, plain)
    assert counter.calls == NEW and set(counter.batch_sizes) == {2}
    assert len(closed.calls) == 2  # retrieval ran for both rows; the gate closed them


def test_wrapper_weight_one_equals_history_in_prompt(model, memory):
    wrapper = spring(model, memory, interpolation_weight=1.0)
    batch = encode(["cats rain sun"])
    out = wrapper.generate(**batch, personalization="alice", max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    history_ids = torch.tensor([wrapper.last_personalization[0].history_ids])
    plain = model.generate(history_ids, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    assert out[0, batch["input_ids"].shape[1] :].tolist() == plain[0, history_ids.shape[1] :].tolist()


@pytest.mark.parametrize("mode", ["fused", "processor"])
def test_wrapper_early_exit_and_outputs(memory, mode):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    model = make_model("llama")
    batch = encode(["cats rain sun"])
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD}
    config = {"mode": mode, "early_exit_epsilon": 1.0, "early_exit_patience": 3}  # JS < ln 2 < 1: exits at step 3
    wrapper = spring(model, memory, **config)
    streamer = Collect()
    out = wrapper.generate(
        **batch, personalization="alice", return_dict_in_generate=True, output_scores=True, streamer=streamer, **kwargs
    )
    stats = wrapper.last_generation_stats
    assert stats["early_exit_steps"] == {0: 3} and stats["history_row_steps"] == 3
    assert len(out.scores) == NEW
    assert streamer.ended and [t for chunk in streamer.chunks[1:] for t in chunk] == out.sequences[0, -NEW:].tolist()
    no_exit = spring(model, memory, mode=mode).generate(**batch, personalization="alice", **kwargs)
    assert torch.equal(
        out.sequences[:, : batch["input_ids"].shape[1] + 3], no_exit[:, : batch["input_ids"].shape[1] + 3]
    )
