"""The engine's per-row sampler and controller, against a hand computation."""

import torch
from testing_utils import TRAINING_VOCAB, make_tokenizer

from transformers_spring.server import GenerationJob, RowController, RowSampler


def test_a_greedy_row_keeps_only_its_argmax_and_top_p_keeps_the_smallest_prefix():
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]))
    out = RowSampler([0.0, 1.0, 2.0], [1.0, 0.7, 1.0])(None, scores)
    assert torch.isinf(out[0]).tolist() == [True, False, True]
    assert torch.isinf(out[1]).tolist() == [False, False, True]  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    torch.testing.assert_close(out[2], scores[2] / 2)


def test_rows_stop_on_their_own_terms_and_stream_only_safe_text():
    tok = make_tokenizer(TRAINING_VOCAB)
    ids = tok.convert_tokens_to_ids
    events = {0: [], 1: [], 2: []}
    jobs = [
        GenerationJob([1], max_tokens=2, on_event=lambda e, v: events[0].append((e, v))),
        GenerationJob([1], max_tokens=9, stop=["sun"], on_event=lambda e, v: events[1].append((e, v))),
        GenerationJob([1], max_tokens=9, on_event=lambda e, v: events[2].append((e, v))),
    ]
    controller = RowController(jobs, tok, {tok.eos_token_id})
    steps = [["cats", "rain", "cats"], ["dogs", "sun", "</s>"], ["rain", "dogs", "cats"]]
    done = []
    for step in steps:
        column = torch.tensor([[ids(w)] for w in step])
        done.append(controller(column, None).tolist())
    assert done == [[False, False, False], [True, True, True], [True, True, True]]
    assert [j.finish_reason for j in jobs] == ["length", "stop", "stop"]
    assert jobs[0].text == "cats dogs" and jobs[1].text == "rain " and jobs[2].text == "cats"
    assert "".join(v for e, v in events[1] if e == "delta") == "rain "  # "sun" was held back, then cut


def test_a_batch_of_users_decodes_token_for_token_as_generate(tmp_path, served_state):
    from transformers_spring.server import ServerState, ServingEngine

    state = ServerState(served_state, tmp_path / "w")
    tok = state.tokenizer
    messages = [[{"role": "user", "content": "write a headline for cats"}], [{"role": "user", "content": "vote"}]]
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for m in messages]  # fmt: skip
    expected = {}
    for user in ("alice", "bob"):
        for i, ids in enumerate(prompts):
            with torch.no_grad():
                out = state.spring.generate(
                    torch.tensor([ids]), personalization=user, max_new_tokens=6, do_sample=False
                )
            tokens = out[0, len(ids) :].tolist()
            expected[user, i] = tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens
    engine = ServingEngine(state, max_batch_size=4, batch_wait_s=0.5).start()
    try:
        jobs = {
            (u, i): GenerationJob(ids, user=u, max_tokens=6) for u in ("alice", "bob") for i, ids in enumerate(prompts)
        }
        for job in jobs.values():
            engine.submit(job)
        for job in jobs.values():
            assert job.done.wait(60) and job.error is None
    finally:
        engine.stop()
    assert engine.stats.batch_size_counts == {4: 1}
    assert {key: job.token_ids for key, job in jobs.items()} == expected
