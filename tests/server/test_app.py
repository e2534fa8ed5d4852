"""`spring serve` over HTTP, called with the official `openai` client (and raw requests for what it cannot send)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from conftest import USERS
from testing_utils import find_traces

from transformers_spring.generation import SpringForCausalLM
from transformers_spring.server import BackgroundServer, ServeArguments

PROMPT = [{"role": "user", "content": "write a headline for cats"}]
KEYS = {
    "keys": [
        {"key": "alice-key-0123456789", "users": ["alice"]},
        {"key": "bob-key-0123456789ab", "users": ["bob"]},
        {"key": "admin-key-0123456789", "admin": True},
    ]
}


def serve(tmp_path, served_state, **kwargs):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    settings = dict(state=str(served_state), workdir=str(tmp_path / "work"), port=0, api_keys=str(keys), threads=1)
    settings.update(kwargs)
    return BackgroundServer(ServeArguments(**settings))


def client(server, key="admin-key-0123456789"):
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def reference(spring, messages, user, max_new_tokens=8):
    """What `SpringForCausalLM.generate(personalization=user)` decodes greedily (None: the base model)."""
    tok = spring.tokenizer
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        if user is None:
            with spring.base_model.disable_adapter():
                out = spring.base_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            out = spring.generate(**inputs, personalization=user, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def raw(server, path, body=None, key="admin-key-0123456789", method=None, data=None):
    """(status, JSON body) of a request the openai client would not send."""
    url = server.base_url.rsplit("/v1", 1)[0] + path
    payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=payload, method=method or ("POST" if payload is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            return response.status, (json.loads(text) if text.startswith("{") else text)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())


def test_greedy_completions_equal_generate_streamed_or_not(tmp_path, served_state):
    with serve(tmp_path, served_state) as server:
        c = client(server)
        spring = server.engine.state.spring
        for user in ("alice", "bob", None):
            kwargs = {"user": user} if user else {}
            done = c.chat.completions.create(model="spring", messages=PROMPT, max_tokens=8, temperature=0, **kwargs)
            chunks = list(c.chat.completions.create(
                model="spring", messages=PROMPT, max_tokens=8, temperature=0, stream=True, **kwargs
            ))  # fmt: skip
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            expected = reference(spring, PROMPT, user)
            assert done.choices[0].message.content == expected == streamed, user
            assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
            assert done.usage.completion_tokens <= 8
        text = c.completions.create(model="spring", prompt="cats cats", max_tokens=4, temperature=0, user="alice")
        assert text.choices[0].finish_reason in ("stop", "length") and text.usage.prompt_tokens == 2
        # Users differ from each other and from the base model (else equality above would prove little).
        assert len({reference(spring, PROMPT, u) for u in ("alice", "bob", None)}) > 1


def test_two_users_decode_in_one_batch_each_equal_to_generate(tmp_path, served_state):
    with serve(tmp_path, served_state, batch_wait_ms=500) as server:
        c = client(server)
        out = {}

        def ask(user):
            r = c.chat.completions.create(model="spring", messages=PROMPT, max_tokens=8, temperature=0, user=user)
            out[user] = r.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(u,)) for u in USERS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.engine.stats.batch_size_counts.get(2) == 1
        spring = server.engine.state.spring
        assert out == {u: reference(spring, PROMPT, u) for u in USERS}


def test_sampling_settings_seed_and_stop(tmp_path, served_state):
    with serve(tmp_path, served_state) as server:
        c = client(server)
        a = c.chat.completions.create(
            model="spring", messages=PROMPT, max_tokens=6, temperature=1.5, seed=3, user="bob"
        )
        b = c.chat.completions.create(
            model="spring", messages=PROMPT, max_tokens=6, temperature=1.5, seed=3, user="bob"
        )
        assert a.choices[0].message.content == b.choices[0].message.content
        greedy = reference(server.engine.state.spring, PROMPT, "alice")
        word = greedy.split()[1]
        cut = c.chat.completions.create(model="spring", messages=PROMPT, max_tokens=8, temperature=0, user="alice",
                                        stop=[word])  # fmt: skip
        assert cut.choices[0].message.content == greedy[: greedy.index(word)]
        assert cut.choices[0].finish_reason == "stop"


def test_an_interaction_triggers_an_update_that_a_fresh_load_reproduces(tmp_path, served_state):
    with serve(tmp_path, served_state, period_size=2) as server:
        c = client(server, "alice-key-0123456789")
        before = c.chat.completions.create(model="spring", messages=PROMPT, max_tokens=8, temperature=0, user="alice")
        for i in range(2):
            status, body = raw(server, "/v1/interactions", {"user": "alice", "prompt": f"write a headline for cats {i}",
                                                            "response": "w1 w2 w3 w4"}, key="alice-key-0123456789")  # fmt: skip
            assert status == 200 and body["seq"] == i
        status, summary = raw(server, "/v1/users/alice", key="alice-key-0123456789")
        assert status == 200 and summary["periods"] == 2 and summary["pending_items"] == 0
        assert summary["memory_items"] == 8 and "w1" not in json.dumps(summary)  # counts, never content
        after = c.chat.completions.create(model="spring", messages=PROMPT, max_tokens=8, temperature=0, user="alice")
    fresh = SpringForCausalLM.from_pretrained(tmp_path / "work" / "state")
    assert after.choices[0].message.content == reference(fresh, PROMPT, "alice")
    assert after.choices[0].message.content != before.choices[0].message.content


def test_erasure_removes_the_user_everywhere(tmp_path, served_state):
    with serve(tmp_path, served_state) as server:
        status, _ = raw(server, "/v1/interactions", {"user": "bob", "prompt": "write w7", "response": "w8 w9"},
                        key="bob-key-0123456789ab")  # fmt: skip
        assert status == 200
        status, body = raw(server, "/v1/users/bob", key="bob-key-0123456789ab", method="DELETE")
        assert status == 200 and body["deleted"] is True
        status, summary = raw(server, "/v1/users/bob", key="bob-key-0123456789ab")
        assert summary["known"] is False and summary["memory_items"] == 0 and summary["journal_items"] == 0
        base = reference(server.engine.state.spring, PROMPT, None)
        r = client(server).chat.completions.create(model="spring", messages=PROMPT, max_tokens=8, temperature=0,
                                                   user="bob")  # fmt: skip
        assert r.choices[0].message.content == base
    assert find_traces(tmp_path / "work", "w8 w9", "elections headline") == []


def test_bad_requests_get_openai_errors(tmp_path, served_state):
    with serve(tmp_path, served_state, max_body_bytes=4096, max_tokens=16) as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong-key-0123456789").chat.completions.create(model="s", messages=PROMPT, user="alice")
        with pytest.raises(openai.PermissionDeniedError):
            client(server, "bob-key-0123456789ab").chat.completions.create(model="s", messages=PROMPT, user="alice")
        for path, method in (("/v1/users/alice", "GET"), ("/v1/users/alice", "DELETE")):
            assert raw(server, path, key="bob-key-0123456789ab", method=method)[0] == 403
        assert raw(server, "/v1/users/alice", key=None)[0] == 401
        assert raw(server, "/metrics", key="alice-key-0123456789")[0] == 403
        status, body = raw(server, "/v1/interactions", {"user": "alice", "prompt": "a", "response": "b"},
                           key="bob-key-0123456789ab")  # fmt: skip
        assert status == 403 and body["error"]["type"] == "permission_error"
        checks = [
            ({"messages": PROMPT, "bogus": 1}, 400, "bogus"),
            ({"messages": PROMPT, "max_tokens": 17}, 400, "max_tokens"),
            ({"messages": PROMPT, "n": 2}, 400, "n"),
            ({"messages": PROMPT, "temperature": -1}, 400, "temperature"),
            ({"messages": [{"role": "user", "content": "x " * 3000}]}, 413, None),
            ({}, 400, "messages"),
        ]
        for body, code, param in checks:
            status, reply = raw(server, "/v1/chat/completions", body)
            assert status == code, (body, reply)
            assert set(reply["error"]) == {"message", "type", "param", "code"}
            assert param is None or reply["error"]["param"] == param
        status, reply = raw(server, "/v1/chat/completions", data=b"{not json")
        assert status == 400 and reply["error"]["code"] == "invalid_json"
        status, reply = raw(server, "/v1/interactions", {"user": "alice", "prompt": "", "response": "b"})
        assert status == 400 and reply["error"]["param"] == "prompt"
        status, reply = raw(server, "/v1/interactions", {"user": "a/b", "prompt": "a", "response": "b"})
        assert status == 400 and reply["error"]["param"] == "user"
        assert raw(server, "/v1/users/%20x", method="DELETE")[0] == 400
        assert raw(server, "/v1/users/%20x")[0] == 400
        status, reply = raw(server, "/v1/chat/completions", {"messages": PROMPT, "seed": 2**70})
        assert status == 400 and reply["error"]["param"] == "seed"
        once = {"user": "alice", "prompt": "a", "response": "b", "id": "x-1"}
        assert raw(server, "/v1/interactions", once)[0] == 200
        status, reply = raw(server, "/v1/interactions", once)
        assert status == 409 and reply["error"]["code"] == "duplicate_id"
        # Still serving after all of it.
        assert client(server).chat.completions.create(model="s", messages=PROMPT, max_tokens=2, temperature=0)


def test_a_client_that_disconnects_mid_stream_frees_its_row(tmp_path, served_state):
    with serve(tmp_path, served_state, max_tokens=512) as server:
        c = client(server)
        stream = c.chat.completions.create(model="spring", messages=PROMPT, max_tokens=500, temperature=1.0,
                                           stream=True, user="alice")  # fmt: skip
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 30
        while server.engine.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.queue_depth == 0 and server.engine.stats.generated_tokens < 500
        status, metrics = raw(server, "/metrics")
        assert status == 200 and "spring_open_streams 0" in metrics
        assert c.chat.completions.create(model="s", messages=PROMPT, max_tokens=2, temperature=0, user="alice")


def test_acknowledged_interactions_survive_kill_9(tmp_path, served_state):
    port = BackgroundServer.__init__.__globals__["_free_port"]("127.0.0.1")
    command = [sys.executable, "-m", "transformers_spring.cli", "serve", "--state", str(served_state), "--workdir",
               str(tmp_path / "work"), "--port", str(port), "--no_auth", "--period_size", "0", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = f"http://127.0.0.1:{port}"

    def start():
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    return process
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        raise AssertionError("the server did not start")

    process = start()
    acked = []
    try:
        for i in range(20):
            body = json.dumps({"user": "alice", "prompt": f"write {i}", "response": f"w{i}"}).encode()
            request = urllib.request.Request(base + "/v1/interactions", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as response:
                acked.append(json.loads(response.read())["id"])
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    process = start()
    try:
        with urllib.request.urlopen(base + "/v1/users/alice", timeout=30) as response:
            summary = json.loads(response.read())
        assert summary["journal_items"] == 20 and summary["pending_items"] == 20 and summary["memory_items"] == 26
        lines = Path(tmp_path / "work" / "journal.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == acked
    finally:
        process.terminate()
        process.wait()
