"""The compatibility layer: both cache keyword names, cache rows, generate() internals and the fused decoder's
fallback, checked against the installed transformers."""

import pytest
import torch
from testing_utils import PAD, left_pad, make_model
from transformers import GenerationConfig, LogitsProcessorList

from transformers_spring.generation import FusedDualPathDecoder, RetrievalInterpolationLogitsProcessor
from transformers_spring.utils import compat

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
HISTORIES = [[20, 21, 22, 23, 24, 25, 5, 6, 7, 8], [30, 31, 32, 9, 10, 11, 12, 13, 14]]
GREEDY = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD, "eos_token_id": None}


class _NewName(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
        return input_ids


class _OldName(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
        return input_ids


class _KwargsOnly(torch.nn.Module):
    def forward(self, *args, **kwargs):
        return args


def test_cache_kwarg_name_follows_the_forward_signature():
    assert compat.cache_kwarg_name(_NewName()) == "cache"
    assert compat.cache_kwarg_name(_OldName()) == "past_key_values"
    expected = "cache" if compat.TRANSFORMERS_VERSION >= compat.version.parse("5.24.0") else "past_key_values"
    assert compat.cache_kwarg_name(_KwargsOnly()) == expected
    assert compat.cache_kwargs(_OldName(), "c") == {"past_key_values": "c"}


@torch.no_grad()
def test_installed_models_take_the_name_compat_reports():
    model = make_model("llama")
    ids = torch.tensor([PROMPTS[0]])
    out = model(ids, use_cache=True)
    cache = compat.output_cache(out)
    assert cache is not None and compat.is_stackable_cache(cache)
    step = model(ids[:, -1:], **compat.cache_kwargs(model, cache), use_cache=True)
    assert compat.output_cache(step).get_seq_length() == ids.shape[1] + 1  # the cache was really used


def test_output_cache_and_pop_cache_read_both_names():
    assert compat.output_cache({"cache": 1}) == 1
    assert compat.output_cache({"past_key_values": 2}) == 2
    assert compat.output_cache(None) is None
    kwargs = {"past_key_values": 3, "attention_mask": None}
    assert compat.pop_cache(kwargs) == 3 and kwargs == {"attention_mask": None}
    kwargs = {"cache": 4}
    assert compat.pop_cache(kwargs) == 4 and kwargs == {}


def test_pad_token_tensor_falls_back_to_public_fields():
    config = GenerationConfig(pad_token_id=None, eos_token_id=[7, 8])
    assert int(compat.pad_token_tensor(config, torch.device("cpu"))) == 7
    assert compat.pad_token_tensor(GenerationConfig(), torch.device("cpu")) is None


@torch.no_grad()
def test_stack_and_select_cache_rows():
    model = make_model("llama")
    a = compat.output_cache(model(torch.tensor([PROMPTS[0]]), use_cache=True))
    b = compat.output_cache(model(torch.tensor([HISTORIES[0]]), use_cache=True))
    stacked = compat.stack_cache_rows(a, b, len(HISTORIES[0]))
    assert stacked.layers[0].keys.shape[0] == 2 and stacked.get_seq_length() == len(HISTORIES[0])
    compat.select_cache_rows(stacked, torch.tensor([1]))
    assert stacked.layers[0].keys.shape[0] == 1
    repeated = compat.repeat_cache_rows(stacked, 3)
    assert repeated.layers[0].keys.shape[0] == 3 and stacked.layers[0].keys.shape[0] == 1


@torch.no_grad()
def test_sliding_window_cache_is_not_stackable():
    model = make_model("gemma3")
    cache = compat.output_cache(model(torch.tensor([HISTORIES[0]]), use_cache=True))
    assert not compat.is_stackable_cache(cache)
    assert compat.stack_cache_rows(cache, cache, 12) is None


def _processor(model, weight=0.5):
    ids, mask = left_pad(PROMPTS)
    hist, hist_mask = left_pad(HISTORIES)
    return ids, mask, RetrievalInterpolationLogitsProcessor(model, hist, hist_mask, weight, prompt_attention_mask=mask)


def _processor_mode(model):
    ids, mask, processor = _processor(model)
    out = model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]), **GREEDY)
    return out[:, ids.shape[1] :]


def test_fused_decoder_takes_the_model_kwargs_installed_generate_builds():
    """A spy custom_generate records what this transformers' generate() hands over; the fused decoder, fed exactly
    that, runs fused (no fallback) and matches processor mode."""
    model = make_model("llama")
    seen = {}

    def spy(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen.update(model_kwargs)
        decoder = FusedDualPathDecoder(processor)
        output = decoder(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)
        seen["__reason__"] = decoder.fallback_reason
        return output

    ids, mask, processor = _processor(model)
    out = model.generate(
        ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]), custom_generate=spy, **GREEDY
    )
    assert seen["__reason__"] is None
    assert torch.equal(out[:, ids.shape[1] :], _processor_mode(model))


def test_unknown_model_kwarg_falls_back_to_processor_mode(monkeypatch, caplog):
    """A kwarg a future generate() might add never raises: the request decodes in processor mode, same tokens."""
    model = make_model("llama")
    expected = _processor_mode(model)
    ids, mask, processor = _processor(model)
    decoder = FusedDualPathDecoder(processor)
    calls = []
    real_loop = compat.sample_loop

    def recording_loop(*args, **kwargs):
        calls.append(sorted(kwargs))
        kwargs.pop("future_flag")  # what the model would do with it is not ours to test
        return real_loop(*args, **kwargs)

    monkeypatch.setattr("transformers_spring.generation.fused.sample_loop", recording_loop)

    def with_future_kwarg(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        model_kwargs["future_flag"] = torch.tensor(1)
        return decoder(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs)

    out = model.generate(
        ids,
        attention_mask=mask,
        logits_processor=LogitsProcessorList([processor]),
        custom_generate=with_future_kwarg,
        **GREEDY,
    )
    assert decoder.fallback_reason == "kwarg:future_flag"
    assert calls and "future_flag" in calls[0]
    assert decoder.forward_calls == 0
    assert torch.equal(out[:, ids.shape[1] :], expected)


def test_needs_synced_gpus_outside_distributed():
    model = make_model("llama")
    assert compat.needs_synced_gpus(model, None) is False
    assert compat.needs_synced_gpus(model, True) is True


def test_merged_generation_config_applies_generation_kwargs_only():
    model = make_model("llama")
    config = compat.merged_generation_config(model, {"max_new_tokens": 3, "attention_mask": None, "top_k": 5})
    assert config.max_new_tokens == 3 and config.top_k == 5
    assert model.generation_config.max_new_tokens != 3  # a copy


def test_is_lora_parameter_of():
    assert compat.is_lora_parameter_of("base.model.layers.0.q_proj.lora_A.alice.weight", ["alice"])
    assert not compat.is_lora_parameter_of("base.model.layers.0.q_proj.lora_A.bob.weight", ["alice"])
    assert not compat.is_lora_parameter_of("base.model.layers.0.q_proj.weight", ["alice"])


def test_deprecated_names_used_by_our_code_fail_the_suite():
    """The guard in tests/conftest.py: the old cache keyword passed from a `transformers_spring` frame, or the old
    output property read from one, raises on transformers >= 5.24."""
    if compat.TRANSFORMERS_VERSION < compat.version.parse("5.24.0"):
        pytest.skip("the cache rename came with transformers 5.24")
    model = make_model("llama")
    ids = torch.tensor([PROMPTS[0]])
    namespace = {"__name__": "transformers_spring._deprecation_probe"}
    exec(
        "def old_kwarg(model, ids, cache):\n    return model(ids, past_key_values=cache)\n"
        "def old_property(outputs):\n    return outputs.past_key_values\n",
        namespace,
    )
    with torch.no_grad():
        outputs = model(ids, use_cache=True)
        with pytest.raises(AssertionError, match="deprecated"):
            namespace["old_kwarg"](model, ids[:, -1:], compat.output_cache(outputs))
        with pytest.raises(AssertionError, match="deprecated"):
            namespace["old_property"](outputs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_lora_routing_equals_peft_mixed_batch_forward(arch):
    """The router adds plain LoRA deltas with batched matmuls (two ranks and scalings, rows without an adapter); a
    layer whose adapters it cannot batch (a DoRA variant, active dropout) is left to peft."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    from testing_utils import LORA_TARGETS, make_adapted_model

    from transformers_spring.generation.adapters import AdapterRouter

    model = make_adapted_model(arch)
    targets = LORA_TARGETS.get(arch, ["q_proj", "v_proj"])
    model.add_adapter("bob", LoraConfig(r=2, lora_alpha=3, target_modules=targets))  # another rank and scaling
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ".bob." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.eval()
    ids = torch.randint(3, 40, (4, 7), generator=generator)
    names = ["alice", "__base__", "bob", "alice"]
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=names).logits  # peft's own mixed-batch forward
        with AdapterRouter(model).activate(names):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    model.add_adapter("dora", LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True, lora_dropout=0.5))
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    x = torch.zeros(2, 3, layer.in_features)
    assert not compat._batched_lora_applies(layer, ["alice", "bob"], x)  # gradients recorded: peft's forward
    with torch.no_grad():
        assert compat._batched_lora_applies(layer, ["alice", "bob"], x)
        assert not compat._batched_lora_applies(layer, ["alice", "dora"], x)  # a variant: peft's forward
        assert not compat._batched_lora_applies(layer, ["alice"], x)  # not one name per row
        layer.train()
        assert compat._batched_lora_applies(layer, ["alice", "bob"], x)  # no dropout on these two
        layer.lora_dropout["bob"] = torch.nn.Dropout(0.5)
        assert not compat._batched_lora_applies(layer, ["alice", "bob"], x)
