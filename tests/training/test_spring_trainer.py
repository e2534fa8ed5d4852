import pytest
import torch
from testing_utils import TRAINING_VOCAB, lora_params, make_buffer_memory, make_interactions, make_model
from testing_utils import make_args as make_tiny_args
from transformers import TrainerCallback

from transformers_spring.training import (
    BaseLogProbCache,
    SpringFormatter,
    SpringTrainer,
    SpringTrainingArguments,
    drift_scores,
    num_selected,
)


def make_args(tmp_path, **kwargs):
    """Tiny-model arguments with the paper's drift selection (top 30 %), which most of these tests check: the default
    preset trains on every sample."""
    return make_tiny_args(tmp_path, **{"selection_ratio": 0.3, **kwargs})


def run(model, args, user, period, items, memory=None, tokenizer=None, cache=None, **kwargs):
    trainer = SpringTrainer(
        model=model, args=args, user_id=user, period=period, train_interactions=items, memory=memory,
        processing_class=tokenizer, score_cache=cache, **kwargs,
    )  # fmt: skip
    return trainer, trainer.run_period()


def test_period_zero_trains_on_all(tmp_path, model, tokenizer, memory):
    items = make_interactions("alice", 7)
    trainer, out = run(model, make_args(tmp_path), "alice", 0, items, memory, tokenizer)
    assert out.selected_ids == [i.id for i in items] and out.scores == {}
    assert [s.id for s in trainer.train_dataset.samples] == out.selected_ids
    assert out.train_output.global_step == 4  # 7 samples, batch 4, 2 epochs
    assert memory.buffer("alice") == [] and out.buffer_ids == []  # B(0) = ∅
    peft_model = trainer.model
    assert "alice" in peft_model.peft_config
    assert any((p != 0).any() for n, p in lora_params(peft_model, "alice").items() if "lora_B" in n)
    logged = [entry for entry in trainer.state.log_history if "spring/selected" in entry]
    assert logged and logged[-1]["spring/selected"] == 7 and logged[-1]["spring/selected_fraction"] == 1.0


def test_selection_keeps_the_top_ceil_by_pre_update_score(tmp_path, model, tokenizer, memory):
    args = make_args(tmp_path)
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 6), memory, tokenizer)
    peft_model = trainer.model
    new = make_interactions("alice", 11, start=6)
    samples = SpringFormatter.from_args(tokenizer, args).encode_many(new)
    expected = drift_scores(peft_model, samples, alpha=args.drift_alpha, reduction=args.score_reduction).scores
    k = num_selected(11, 0.3)
    top = sorted(range(11), key=lambda i: -expected[i])[:k]
    trainer, out = run(peft_model, args, "alice", 1, new, memory, tokenizer)
    assert k == 4 and out.selected_ids == [new[i].id for i in sorted(top)]
    assert [out.scores[item.id] for item in new] == pytest.approx(expected, abs=1e-6)
    assert [s.id for s in trainer.train_dataset.samples] == out.selected_ids  # trained on the selection only
    metrics = out.metrics
    assert metrics["spring/selected"] == 4 and metrics["spring/num_new"] == 11
    assert metrics["spring/threshold"] == pytest.approx(min(out.scores[i] for i in out.selected_ids))


@pytest.mark.parametrize("options", [{}, {"scoring_shared_prefix": False, "scoring_dtype": "bfloat16"}])
def test_scoring_options_reach_every_scoring_pass(tmp_path, model, tokenizer, monkeypatch, options):
    import transformers_spring.training.spring_trainer as spring_trainer

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return drift_scores(*args, **kwargs)

    monkeypatch.setattr(spring_trainer, "drift_scores", spy)
    args = make_args(tmp_path, buffer_size=2, **options)
    memory = make_buffer_memory()
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 4), memory, tokenizer)
    run(trainer.model, args, "alice", 1, make_interactions("alice", 10, start=4), memory, tokenizer)
    assert len(calls) == 2  # the selection and the buffer re-scoring (3 candidates > 2)
    expected = (options.get("scoring_shared_prefix", True), options.get("scoring_dtype"))
    assert all((kwargs["shared_prefix"], kwargs["dtype"]) == expected for kwargs in calls)


@pytest.mark.parametrize("rescore", ["when_full", "always"])
def test_buffer_keeps_the_top_n_of_the_rescored_pool(tmp_path, model, tokenizer, rescore):
    args = make_args(tmp_path, buffer_size=4, rescore_buffer=rescore)
    memory, cache = make_buffer_memory(), BaseLogProbCache()
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 6), memory, tokenizer, cache)
    peft_model = trainer.model
    _, first = run(peft_model, args, "alice", 1, make_interactions("alice", 10, start=6), memory, tokenizer, cache)
    assert sorted(first.buffer_ids) == sorted(first.selected_ids)  # |C| = 3 <= 4: everything is kept
    if rescore == "when_full":  # not re-scored: the stored scores are the pre-update ones
        assert first.buffer_scores == {i: first.scores[i] for i in first.buffer_ids}
    old = memory.buffer("alice")
    new = make_interactions("alice", 10, start=16)
    _, second = run(peft_model, args, "alice", 2, new, memory, tokenizer, cache)
    # Reference: Eq. 1 with the UPDATED adapter over C = selected ∪ old buffer, top 4
    formatter = SpringFormatter.from_args(tokenizer, args)
    pool = [i for i in new if i.id in second.selected_ids] + old
    scores = drift_scores(peft_model, formatter.encode_many(pool)).scores
    ranked = sorted(range(len(pool)), key=lambda i: -scores[i])
    assert len(pool) == 6
    assert second.buffer_ids == [pool[i].id for i in ranked[:4]]
    assert [i.id for i in memory.buffer("alice")] == second.buffer_ids
    assert memory.buffer_scores("alice") == pytest.approx({pool[i].id: scores[i] for i in ranked[:4]}, abs=1e-6)
    evicted = {pool[i].id for i in ranked[4:]}
    assert set(second.evicted_ids) == evicted & {i.id for i in old}
    assert not evicted & {i.id for i in memory.buffer("alice")}
    # the cache only keeps what can be scored again: the buffer
    assert len(cache) == 4
    # the buffer is retrievable at inference (a buffer-only user, no history)
    assert memory.retrieve("alice", pool[ranked[0]].prompt, k=2)


def test_training_user_b_leaves_user_a_bit_identical(tmp_path, model, tokenizer, memory):
    args = make_args(tmp_path, buffer_size=3)
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 6), memory, tokenizer)
    peft_model = trainer.model
    run(peft_model, args, "alice", 1, make_interactions("alice", 8, start=6), memory, tokenizer)
    alice = lora_params(peft_model, "alice")
    alice_buffer = [(i.id, i.prompt) for i in memory.buffer("alice")]
    assert alice
    run(peft_model, args, "bob", 0, make_interactions("bob", 6), memory, tokenizer)
    run(peft_model, args, "bob", 1, make_interactions("bob", 8, start=6), memory, tokenizer)
    after = lora_params(peft_model, "alice")
    assert alice.keys() == after.keys() and all(torch.equal(alice[k], after[k]) for k in alice)
    assert [(i.id, i.prompt) for i in memory.buffer("alice")] == alice_buffer
    bob = lora_params(peft_model, "bob")
    assert any(not torch.equal(bob[k.replace("alice", "bob")], v) for k, v in alice.items())


def test_gradient_accumulation_gives_the_same_update(tmp_path, tokenizer):
    items = make_interactions("alice", 8)
    results = []
    for batch, steps in ((4, 1), (2, 2), (1, 4)):
        args = make_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                         warmup_steps=0, num_train_epochs=1, learning_rate=1e-2, optim="sgd")  # fmt: skip
        trainer, out = run(make_model("llama", TRAINING_VOCAB.size), args, "alice", 0, items, None, tokenizer)
        assert out.train_output.global_step == 2 and trainer.loss_is_scaled_for_ga is True
        results.append(lora_params(trainer.model, "alice"))
    for other in results[1:]:
        for key, value in results[0].items():
            assert torch.allclose(value, other[key], atol=1e-6), key


def test_loss_is_the_mean_response_token_nll(tmp_path, model, tokenizer):
    args = make_args(tmp_path)
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 3), None, tokenizer)
    from transformers_spring.training import compute_logprobs, response_nll

    samples = SpringFormatter.from_args(tokenizer, args).encode_many(make_interactions("alice", 3, start=10))
    batch = trainer.data_collator([{"input_ids": list(s.input_ids), "labels": [-100] * s.prompt_length
                                    + list(s.input_ids[s.prompt_length:])} for s in samples])  # fmt: skip
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    expected = response_nll(compute_logprobs(trainer.model, samples))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_train_returns_train_output_with_spring_metrics_and_callbacks_see_them(tmp_path, model, tokenizer):
    seen = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    trainer = SpringTrainer(
        model=model, args=make_args(tmp_path), user_id="alice", period=0, train_interactions=make_interactions("alice", 4),
        processing_class=tokenizer, callbacks=[Spy()], eval_interactions=make_interactions("alice", 2, start=9),
    )  # fmt: skip
    output = trainer.train()
    assert output.global_step > 0 and output.metrics["spring/selected"] == 4 and "train_loss" in output.metrics
    assert any("loss" in logs for logs in seen) and any("spring/selected" in logs for logs in seen)
    assert "eval_loss" in trainer.evaluate()
    with pytest.raises(RuntimeError, match="already ran"):
        trainer.train()


def test_single_sample_and_overlong_samples(tmp_path, model, tokenizer, memory):
    from transformers_spring.memory import Interaction

    args = make_args(tmp_path, max_length=12)
    long = Interaction("alice", " ".join(f"w{i}" for i in range(50)), " ".join(f"w{i}" for i in range(30)), id="long")
    trainer, out = run(model, args, "alice", 0, [long], memory, tokenizer)
    assert out.selected_ids == ["long"] and out.train_output.global_step == 2
    assert trainer.train_dataset.samples[0].truncated and len(trainer.train_dataset.samples[0].input_ids) == 12
    _, out = run(trainer.model, args, "alice", 1, [make_interactions("alice", 1, start=5)[0]], memory, tokenizer)
    assert out.selected_ids == ["alice-5"] and out.buffer_ids == ["alice-5"]


def test_empty_period_is_a_logged_no_op(tmp_path, model, tokenizer, memory):
    trainer, out = run(model, make_args(tmp_path), "alice", 0, [], memory, tokenizer)
    assert out.skipped and out.train_output is None and out.selected_ids == []
    assert not hasattr(trainer.model, "peft_config")  # no adapter was created
    assert memory.buffer("alice") == []
    fresh = SpringTrainer(model=model, args=make_args(tmp_path), user_id="alice", processing_class=tokenizer)
    assert fresh.train().global_step == 0


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom")


def test_failure_leaves_adapter_and_buffer_untouched(tmp_path, model, tokenizer, memory):
    args = make_args(tmp_path, buffer_size=3)
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 6), memory, tokenizer)
    peft_model = trainer.model
    run(peft_model, args, "alice", 1, make_interactions("alice", 8, start=6), memory, tokenizer)
    before, buffer = lora_params(peft_model, "alice"), memory.buffer("alice")
    scores = memory.buffer_scores("alice")
    with pytest.raises(RuntimeError, match="boom"):
        run(
            peft_model,
            args,
            "alice",
            2,
            make_interactions("alice", 8, start=20),
            memory,
            tokenizer,
            callbacks=[Boom()],
        )
    after = lora_params(peft_model, "alice")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert memory.buffer("alice") == buffer and memory.buffer_scores("alice") == scores
    # a new user whose first period fails leaves no adapter behind
    with pytest.raises(RuntimeError, match="boom"):
        run(peft_model, args, "bob", 0, make_interactions("bob", 4), memory, tokenizer, callbacks=[Boom()])
    assert "bob" not in peft_model.peft_config


def test_bad_inputs_raise_before_anything_changes(tmp_path, model, tokenizer, memory):
    args = make_args(tmp_path)
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 4), memory, tokenizer)
    peft_model = trainer.model
    before = lora_params(peft_model, "alice")
    with pytest.raises(ValueError, match="unknown user 'carol'"):
        run(peft_model, args, "carol", 1, make_interactions("carol", 3), memory, tokenizer)
    with pytest.raises(ValueError, match=r"train_interactions\[0\]\.user_id"):
        run(peft_model, args, "alice", 1, make_interactions("bob", 3), memory, tokenizer)
    with pytest.raises(ValueError, match=r"train_interactions\[0\].*missing"):
        run(peft_model, args, "alice", 1, [{"user_id": "alice", "response": "w1"}], memory, tokenizer)
    with pytest.raises(TypeError, match="user_id"):
        run(peft_model, args, None, 1, make_interactions("alice", 3), memory, tokenizer)
    with pytest.raises(ValueError, match="period"):
        run(peft_model, args, "alice", -1, make_interactions("alice", 3), memory, tokenizer)
    with pytest.raises(ValueError, match="buffer_size"):
        run(peft_model, make_args(tmp_path, buffer_size=10), "alice", 1, make_interactions("alice", 3), make_buffer_memory(5),
            tokenizer)  # fmt: skip
    with pytest.raises(TypeError, match="args"):
        SpringTrainer(model=peft_model, args=object(), user_id="alice", processing_class=tokenizer)
    with pytest.raises(ValueError, match="processing_class"):
        run(peft_model, args, "alice", 1, make_interactions("alice", 3, start=40), memory, None)
    after = lora_params(peft_model, "alice")
    assert all(torch.equal(before[k], after[k]) for k in before) and "carol" not in peft_model.peft_config


def test_all_100_mode_skips_scoring(tmp_path, model, tokenizer):
    args = make_args(tmp_path, selection_ratio=1.0, buffer_size=0)
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 4), None, tokenizer)
    _, out = run(
        trainer.model, args, "alice", 1, make_interactions("alice", 5, start=4), make_buffer_memory(), tokenizer
    )
    assert out.scores == {} and len(out.selected_ids) == 5 and out.buffer_ids == []


def test_default_args(tmp_path, model, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SpringTrainer(model=model, user_id="alice", processing_class=tokenizer,
                            train_interactions=make_interactions("alice", 1))  # fmt: skip
    assert isinstance(trainer.args, SpringTrainingArguments) and trainer.args.selection_ratio == 1.0
    assert trainer.args.learning_rate == 3e-3  # "auto": the size default of a tiny model


def test_auto_learning_rate_becomes_the_size_default_before_the_optimizer(tmp_path, model, tokenizer):
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            seen["args"] = args.learning_rate
            seen["optimizer"] = [group["initial_lr"] for group in optimizer.param_groups]

    args = make_tiny_args(tmp_path, learning_rate="auto")
    assert args.learning_rate == "auto"
    trainer = SpringTrainer(model=model, args=args, user_id="alice", train_interactions=make_interactions("alice", 4),
                            processing_class=tokenizer, callbacks=[Spy()])  # fmt: skip
    assert trainer.args.learning_rate == 3e-3 and args.learning_rate == "auto"  # a copy: the caller's args stay
    assert trainer.args.output_dir == args.output_dir and trainer.args.seed == args.seed
    trainer.run_period()
    assert seen["args"] == 3e-3 and seen["optimizer"] and set(seen["optimizer"]) == {3e-3}
    explicit = SpringTrainer(model=trainer.model, args=make_tiny_args(tmp_path, learning_rate=2e-2), user_id="alice",
                             period=1, processing_class=tokenizer)  # fmt: skip
    assert explicit.args.learning_rate == 2e-2


def test_training_on_every_sample_still_rebuilds_the_buffer(tmp_path, model, tokenizer):
    # selection_ratio=1.0 (the default preset): no pre-update scoring, but Eq. 3-4 still keep the best `buffer_size`
    # of (the period's samples + the old buffer), scored with the updated adapter.
    args = make_tiny_args(tmp_path, buffer_size=3, selection_ratio=None)  # (make_args states 0.3)
    assert args.selection_ratio == 1.0
    memory, cache = make_buffer_memory(), BaseLogProbCache()
    trainer, _ = run(model, args, "alice", 0, make_interactions("alice", 4), memory, tokenizer, cache)
    peft_model = trainer.model
    new = make_interactions("alice", 5, start=4)
    _, first = run(peft_model, args, "alice", 1, new, memory, tokenizer, cache)
    assert first.scores == {} and first.selected_ids == [i.id for i in new]
    scores = drift_scores(peft_model, SpringFormatter.from_args(tokenizer, args).encode_many(new)).scores
    ranked = sorted(range(5), key=lambda i: -scores[i])[:3]
    assert first.buffer_ids == [new[i].id for i in ranked]
    assert [i.id for i in memory.buffer("alice")] == first.buffer_ids
    assert memory.buffer_scores("alice") == pytest.approx({new[i].id: scores[i] for i in ranked}, abs=1e-6)
    old = memory.buffer("alice")
    newer = make_interactions("alice", 2, start=20)
    _, second = run(peft_model, args, "alice", 2, newer, memory, tokenizer, cache)
    pool = newer + old
    scores = drift_scores(peft_model, SpringFormatter.from_args(tokenizer, args).encode_many(pool)).scores
    ranked = sorted(range(len(pool)), key=lambda i: -scores[i])
    assert second.buffer_ids == [pool[i].id for i in ranked[:3]]
    assert set(second.evicted_ids) == {pool[i].id for i in ranked[3:]} & {i.id for i in old}
