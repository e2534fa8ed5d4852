"""What the benchmark measures is what users run: every SPRInG-family row the benchmark decodes equals a user's own
`SpringForCausalLM(model, memory, config).generate(personalization=...)` call on the same memory and adapters (greedy
tokens) and its `score` (NLL). Also the shared decoding helpers."""

import pytest
import torch
from test_benchmark import bench_args, stream
from testing_utils import TRAINING_VOCAB, make_model, make_tokenizer
from transformers import StoppingCriteriaList

from transformers_spring.evaluation import METHODS, ContinualBenchmark
from transformers_spring.evaluation.decoding import LineEndCriteria, first_line
from transformers_spring.generation import Personalization, SpringConfig, SpringForCausalLM

SPRING_FAMILY = ("spring", "spring-nogate", "spring-logo", "spring-lambda0")


def user_call(bench, row):
    """The row as a user decodes it: a fresh wrapper over the benchmark's model and memory, configured as a user
    would configure it (the buffer region, λ, k, σ as the gate), and one prompt alone (no batch, no padding)."""
    spec, args = METHODS[row.method], bench.args
    config = SpringConfig(
        interpolation_weight=args.interpolation_weight if spec.weight is None else spec.weight,
        top_k=args.spring_k, history_item_template=args.history_item_template, retrieval_region="buffer",
        use_global=spec.retrieval == "buffer+global", gate=row.gate_threshold,
        adapter_name_template="{user_id}__spring",  # the benchmark's naming rule for SPRInG's adapters
    )  # fmt: skip
    spring = SpringForCausalLM(bench.peft_model, memory=bench.memory, config=config, tokenizer=bench.tokenizer)
    formatter = bench._formatter
    inputs = bench.tokenizer([formatter.prompt_text(row.item)], return_tensors="pt", add_special_tokens=False)
    before = {"before": row.item.timestamp} if config.use_global else None
    # The query is the raw input, as an app that templates its prompts passes it (the default would be the whole
    # templated prompt).
    personalization = Personalization(user=row.item.user_id, query=row.item.prompt, retrieval_kwargs=before)
    stop = StoppingCriteriaList([LineEndCriteria(bench._line_end_tokens)]) if bench._line_end_tokens else None
    with torch.no_grad():
        out = spring.generate(
            **inputs, personalization=personalization, max_new_tokens=bench._budget, do_sample=False,
            repetition_penalty=args.repetition_penalty, pad_token_id=formatter.pad_token_id, stopping_criteria=stop,
        )  # fmt: skip
    text = first_line(bench.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    sample = formatter.encode(row.item)
    logprobs = spring.score(
        inputs["input_ids"], [list(sample.input_ids[sample.prompt_length :])], inputs["attention_mask"],
        personalization=personalization,
    )[0]  # fmt: skip
    return (
        text,
        float(-logprobs.mean()),
        [(hit.interaction.id, hit.source) for hit in spring.last_personalization[0].items],
    )


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("equivalence")
    model, tokenizer = make_model("llama", TRAINING_VOCAB.size), make_tokenizer(TRAINING_VOCAB, chat=True)
    # Batches of 4 mixed rows: the benchmark's batching and deduplication must not change a row's result either.
    args = bench_args(
        tmp_path, methods=",".join((*SPRING_FAMILY, "base", "all-100")), generation_batch_size=4, max_new_tokens=6
    )
    bench = ContinualBenchmark(args, model, tokenizer, stream())
    captured = []
    original = bench._generate

    def spy(rows):  # the user's call, made while the benchmark's adapters and memory are in that period's state
        outputs = original(rows)
        captured.extend((row, user_call(bench, row) if row.method in SPRING_FAMILY else None) for row in rows)
        return outputs

    bench._generate = spy
    return bench.run(progress=False), captured


def test_every_spring_row_equals_the_users_generate_and_score(equivalence):
    results, captured = equivalence
    assert len(captured) == len(results["records"])
    checked = {name: 0 for name in SPRING_FAMILY}
    open_rows = 0
    for (row, user), record in zip(captured, results["records"], strict=True):
        assert (row.method, row.item.id) == (record["method"], record["test_id"])
        if user is None:
            continue
        text, nll, items = user
        assert record["prediction"] == text, (row.method, row.item.id)
        assert record["nll"] == pytest.approx(nll, abs=1e-4), (row.method, row.item.id)
        if row.weight > 0:  # the same retrieved and gated history (at λ = 0 it is never used)
            assert items == [(hit.interaction.id, hit.source) for hit in row.history], (row.method, row.item.id)
        open_rows += bool(row.history) and row.weight > 0
        checked[row.method] += 1
    assert all(count == 10 for count in checked.values()), checked  # 2 users x (4 periods + 1 forgetting)
    assert open_rows >= 10  # the history path really ran


def test_spring_rows_route_to_the_users_own_adapter(equivalence):
    _, captured = equivalence
    for row, _ in captured:
        if row.method in ("spring", "spring-nogate", "spring-logo", "spring-lambda0"):
            assert row.personalization.adapter is None and row.adapter == f"{row.item.user_id}__spring"


def test_first_line_strips_quotes_and_blank_lines():
    assert first_line('\n\n  "Cats Rule"  \nmore') == "Cats Rule"
    assert first_line("   \n") == ""
