import json
import random
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from huggingface_hub import HfApi
from safetensors.numpy import load_file
from testing_utils import BACKENDS, populated, topical

from transformers_spring.memory import HashingEncoder, Interaction, LoGoMemory, Mediator
from transformers_spring.memory.config import LoGoMemoryConfig
from transformers_spring.persistence import memory_files as memory_files_module

# The memory suite that runs on every backend: the in-process default and Milvus Lite (the `milvus` extra).
on_every_backend = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def summary(hits):
    return [(h.interaction.id, h.source, round(h.score, 6)) for h in hits]


# --------------------------------------------------------------- round trip
@on_every_backend
def test_save_load_round_trip(make_memory, backend, tmp_path):
    memory = populated(make_memory, gate="auto")
    memory.set_buffer("u1", [topical("u1", "bread", 99)], scores=[1.5])
    memory.set_sharing("u3", False)
    queries = [("u0", "kitten purr report"), ("u1", "rocket orbit"), ("nobody", "meow whiskers")]
    for user, query in queries * 5:  # warm the auto gate so its state matters
        memory.retrieve(user, query, k=3)
    before = [summary(memory.retrieve(u, q, k=3)) for u, q in queries]

    memory.save_pretrained(tmp_path / "mem")
    files = ["README.md", "config.json", "embeddings.safetensors", "records.jsonl", "spring_manifest.json"]
    if backend is not None:  # a manifest naming the collections: no record, text or vector in the folder
        files.remove("records.jsonl")
        assert load_file(str(tmp_path / "mem" / "embeddings.safetensors"))["embeddings"].shape == (0, 64)
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == files
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem", num_threads=1)  # reconnects to what the manifest names

    assert loaded.users() == memory.users() and len(loaded) == len(memory)
    for user in memory.users():
        assert loaded.history(user) == memory.history(user)
        assert loaded.buffer(user) == memory.buffer(user)
        for rec in memory.history(user):
            np.testing.assert_array_equal(
                loaded._locals[user].history.vector(rec.id), memory._locals[user].history.vector(rec.id)
            )
    assert loaded.buffer_scores("u1") == {memory.buffer("u1")[0].id: 1.5}
    assert not loaded.is_shared("u3")
    assert [summary(loaded.retrieve(u, q, k=3)) for u, q in queries] == before
    config = json.loads((tmp_path / "mem" / "config.json").read_text())
    assert config["format_version"] == 1 and config["encoder"] == "hashing:64" and config["dim"] == 64
    assert config["counts"]["records"] == len(memory) and config["counts"]["buffer_records"] == 1


def test_settings_are_one_dataclass_with_the_saved_keys(make_memory):
    memory = make_memory(scorer="bm25", buffer_size=7)
    config = memory.config()
    assert set(config) == {
        "encoder", "dim", "metric", "normalized", "scorer", "gate", "gate_quantile", "use_global", "global_scope",
        "min_community_users", "sharing_policy", "min_contributors", "match_threshold", "max_matches",
        "exact_match_below", "n_communities", "capacity", "dedup_threshold", "buffer_size", "bm25_idf", "max_text_chars",
        "share_by_default", "hnsw_M", "hnsw_ef_construction", "hnsw_ef", "exact_below", "seed",
    }  # fmt: skip
    assert set(config) - {"encoder", "dim", "metric", "normalized"} == set(LoGoMemoryConfig.names())
    assert memory.scorer == "bm25" and memory.buffer_size == 7 and memory.settings.buffer_size == 7
    memory.global_memory.set_support_rule(min_contributors=2)  # saved as the memory runs now
    assert memory.config()["min_contributors"] == 2 and memory.min_contributors == 2
    with pytest.raises(ValueError, match="buffer_size"):
        LoGoMemoryConfig(buffer_size=-1)
    with pytest.raises(TypeError, match="use_global"):
        make_memory(use_global="no")


def test_model_card_has_library_counts_and_privacy(make_memory, tmp_path):
    populated(make_memory).save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: transformers_spring" in card and "| history records | 48 |" in card
    assert "hashing:64" in card and "Privacy" in card


# --------------------------------------------------------- isolation/privacy
@on_every_backend
def test_local_isolation_and_community_threshold(make_memory):
    memory = populated(make_memory, users=6, use_global=False)
    for user in memory.users():
        hits = memory.retrieve(user, "cat kitten rocket orbit report", k=20)
        assert hits and {h.interaction.user_id for h in hits} == {user}

    # Cats: u0, u2, u4 (3 users). With min_community_users=4 the cats community may not feed anyone.
    strict = populated(make_memory, users=6, min_community_users=4, n_communities=2)
    ctx = strict.retrieve_context("newcomer", "kitten purr whiskers", k=4)
    assert ctx.global_hits == []
    ok = populated(make_memory, users=6, n_communities=2)
    ctx = ok.retrieve_context("newcomer", "kitten purr whiskers", k=4)
    assert ctx.global_hits and all(h.source == "global" for h in ctx.global_hits)


@on_every_backend
def test_global_never_returns_own_items_and_respects_opt_out(make_memory):
    # 8 users: after u2 opts out, three cat writers (u0, u4, u6) still back each other's items (min_contributors=3).
    memory = populated(make_memory, users=8, n_communities=2)
    for user in memory.users():
        ctx = memory.retrieve_context(user, "kitten rocket orbit purr report", k=10)
        assert all(h.interaction.user_id != user for h in ctx.global_hits)
    memory.set_sharing("u2", False)
    seen = {
        h.interaction.user_id for u in memory.users() for h in memory.retrieve_context(u, "kitten", k=10).global_hits
    }
    assert "u2" not in seen
    assert memory.retrieve_context("u2", "kitten purr", k=10).global_hits  # opting out does not stop receiving


@on_every_backend
def test_cold_start_falls_back_to_global(make_memory):
    memory = populated(make_memory, users=6, n_communities=2)
    ctx = memory.retrieve_context("brand-new", "rocket launch orbit booster", k=3)
    assert ctx.cold_start and len(ctx.items) == 3 and all(h.source == "global" for h in ctx.items)
    assert all("rockets" in h.interaction.response for h in ctx.items) and ctx.weight == 0.25
    memory.add(topical("brand-new", "rockets", 1))  # one item: still cold start, own item first
    ctx = memory.retrieve_context("brand-new", "rocket launch orbit booster", k=3)
    assert ctx.cold_start and ctx.items[0].source == "local" and ctx.items[1].source == "global"


@on_every_backend
def test_dedup_at_write(make_memory):
    memory = make_memory()
    first = memory.add(Interaction("a", "The cat sat on the mat", "Cat news"))
    again = memory.add(Interaction("a", "the cat sat on the mat!", "cat news"))
    other_user = memory.add(Interaction("b", "The cat sat on the mat", "Cat news"))
    assert again == first and other_user != first and len(memory) == 2


@on_every_backend
def test_delete_and_forget_user(make_memory, backend, tmp_path):
    memory = populated(make_memory, n_communities=2)
    victim = memory.history("u0")[0]
    assert memory.delete("u0", victim.id) and not memory.delete("u0", victim.id)
    assert memory.get("u0", victim.id) is None and len(memory) == 47

    memory.set_buffer("u2", [topical("u2", "bread", 50)])
    assert memory.forget_user("u2") and not memory.forget_user("u2")
    assert "u2" not in memory.users() and memory.buffer("u2") == [] and len(memory) == 39
    assert memory.global_memory.user_labels("u2") == []
    for user in memory.users() + ["stranger"]:
        hits = memory.retrieve(user, "kitten purr whiskers cat report by u2", k=40)
        assert all(h.interaction.user_id != "u2" for h in hits)
    memory.save_pretrained(tmp_path / "m")
    if backend is None:
        assert "u2" not in (tmp_path / "m" / "records.jsonl").read_text()
    else:  # deleted by filter in both collections, and checked empty
        assert memory.backend.count("local", "u2") == memory.backend.count("global", "u2") == 0
        assert memory.backend.count("local") == len(memory) + memory.num_buffer_items
    assert all(b"u2" not in path.read_bytes() for path in (tmp_path / "m").iterdir())


# ------------------------------------------------------------- atomic saves
def test_crash_mid_save_leaves_previous_version(make_memory, tmp_path, monkeypatch):
    memory = populated(make_memory)
    memory.save_pretrained(tmp_path / "m")
    memory.add(topical("u0", "bread", 77))

    def crash(*args, **kwargs):  # records.jsonl is already written when the embeddings write dies
        raise OSError("disk full")

    monkeypatch.setattr(memory_files_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        memory.save_pretrained(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp directory left behind
    assert len(LoGoMemory.from_pretrained(tmp_path / "m")) == 48 and len(memory) == 49


def test_interrupted_swap_is_recovered(make_memory, tmp_path):
    memory = populated(make_memory)
    memory.save_pretrained(tmp_path / "m")
    (tmp_path / "m").rename(tmp_path / ".m.spring-old-abc")  # killed between the two renames
    assert len(LoGoMemory.from_pretrained(tmp_path / "m")) == 48


# --------------------------------------------------------------- threading
@on_every_backend
def test_thread_storm_loses_nothing(make_memory, backend, tmp_path):
    memory = make_memory(n_communities=2, min_community_users=2, dedup_threshold=None)
    written, errors = [[] for _ in range(8)], []
    steps = 500 if backend is None else 60  # every Milvus write is a round trip and a flush

    def worker(t):
        rng = random.Random(t)
        try:
            for i in range(steps):
                op = rng.random()
                if op < 0.6:
                    rec = Interaction(f"user{t}", f"thread {t} item {i} unique{t}x{i}", f"r{t}-{i}", id=f"{t}-{i}")
                    assert memory.add(rec) == rec.id
                    written[t].append(rec.id)
                elif op < 0.95:
                    memory.retrieve(f"user{rng.randrange(8)}", f"item {rng.randrange(steps)}", k=3)
                else:
                    memory.save_pretrained(tmp_path / "storm")
        except Exception as err:  # surfaced below: pytest does not see thread exceptions
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = {(f"user{t}", rid) for t in range(8) for rid in written[t]}
    assert {(u, r.id) for u in memory.users() for r in memory.history(u)} == expected
    if backend is not None:  # every acknowledged write reached the store
        assert memory.backend.count("local") == len(expected)
    memory.save_pretrained(tmp_path / "storm")
    loaded = LoGoMemory.from_pretrained(tmp_path / "storm")
    assert {(u, r.id) for u in loaded.users() for r in loaded.history(u)} == expected


# --------------------------------------------------------------------- Hub
def test_push_to_hub_is_one_commit_with_the_files(make_memory):
    memory = populated(make_memory)
    pushed = {}

    def fake_upload(self, *, repo_id, folder_path, **kwargs):
        pushed["repo"] = repo_id
        pushed["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        pushed["records"] = len((Path(folder_path) / "records.jsonl").read_text().splitlines())
        pushed["calls"] = pushed.get("calls", 0) + 1
        return "https://huggingface.co/me/mem/commit/abc"

    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create,
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake_upload),
    ):
        create.return_value.repo_id = "me/mem"
        url = memory.push_to_hub("me/mem", private=True)
    assert url.endswith("abc") and pushed["calls"] == 1 and pushed["repo"] == "me/mem"
    assert pushed["files"] == [
        "README.md", "config.json", "embeddings.safetensors", "records.jsonl", "spring_manifest.json",
    ]  # fmt: skip
    assert pushed["records"] == 48
    assert create.call_args.kwargs["private"] is True


def test_loads_from_hub_cache_offline(make_memory, tmp_path, monkeypatch):
    memory = populated(make_memory)
    cache = tmp_path / "hub"
    snapshot = cache / "models--me--mem" / "snapshots" / ("a" * 40)
    memory.save_pretrained(snapshot)
    (cache / "models--me--mem" / "refs").mkdir(parents=True)
    (cache / "models--me--mem" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = LoGoMemory.from_pretrained("me/mem", cache_dir=cache)
    assert len(loaded) == 48 and loaded.users() == memory.users()


# -------------------------------------------------------------- bad input
@on_every_backend
@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(user_id="u0", prompt="", response="x"), "prompt"),
        (dict(user_id="u0", prompt=None, response="x"), "prompt"),
        (dict(user_id="u0", prompt="q", response=5), "response"),
        (dict(user_id="", prompt="q", response="x"), "user_id"),
        (dict(user_id="u0", prompt="q", response="x", timestamp=float("nan")), "timestamp"),
        (dict(user_id="u0", prompt="q" * 30_000, response="x"), "prompt"),
        (dict(user_id="u0", prompt="q"), "response"),
    ],
)
def test_bad_records_are_refused_and_nothing_is_lost(make_memory, bad, field):
    memory = populated(make_memory)
    snapshot = {u: memory.history(u) for u in memory.users()}
    with pytest.raises((TypeError, ValueError), match=field):
        memory.add_many([topical("u0", "bread", 1000), bad])  # the good record must not land either
    assert {u: memory.history(u) for u in memory.users()} == snapshot


@on_every_backend
def test_bad_queries(make_memory):
    memory = populated(make_memory)
    for kwargs, field in [
        (dict(user_id="", query="x"), "user_id"),
        (dict(user_id="u0", query=""), "query"),
        (dict(user_id="u0", query=None), "query"),
        (dict(user_id="u0", query="x" * 20_001), "query"),
        (dict(user_id="u0", query="x", k=0), "k"),
        (dict(user_id="u0", query="x", k=2.5), "k"),
        (dict(user_id="u0", query="x", region="attic"), "region"),
        (dict(user_id="u0", query="x", before=float("nan")), "before"),
    ]:
        with pytest.raises((TypeError, ValueError), match=field):
            memory.retrieve(**kwargs)
    assert len(memory.retrieve("u0", "kitten", k=10_000, use_global=False)) == 8  # k beyond the memory: clamped


def _saved(make_memory, tmp_path):
    populated(make_memory).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_corrupt_or_missing_files_are_named(make_memory, tmp_path):
    target = _saved(make_memory, tmp_path)
    good = {name: (target / name).read_bytes() for name in ("config.json", "records.jsonl", "embeddings.safetensors")}

    def expect(match):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            LoGoMemory.from_pretrained(target)
        for name, data in good.items():
            (target / name).write_bytes(data)

    (target / "config.json").unlink()
    expect("config.json")
    (target / "records.jsonl").unlink()
    expect("records.jsonl")
    (target / "embeddings.safetensors").unlink()
    expect("embeddings.safetensors")
    (target / "config.json").write_text("{not json")
    expect("config.json")
    (target / "embeddings.safetensors").write_bytes(b"garbage" * 10)
    expect("embeddings.safetensors")
    (target / "records.jsonl").write_text('{"user_id": "u0"}\n')
    expect("records.jsonl line 1")
    lines = good["records.jsonl"].decode().splitlines()
    (target / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    expect("records.jsonl has 47 records")
    config = json.loads(good["config.json"])
    (target / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    expect("format_version")
    assert len(LoGoMemory.from_pretrained(target)) == 48  # every failure above left the files loadable


def test_dim_mismatch_on_load(make_memory, tmp_path):
    target = _saved(make_memory, tmp_path)
    with pytest.raises(ValueError, match="embedding dim mismatch"):
        LoGoMemory.from_pretrained(target, encoder=HashingEncoder(32))
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "dim": 32, "encoder": "hashing:32"}))
    with pytest.raises(ValueError, match="embedding dim mismatch"):
        LoGoMemory.from_pretrained(target)


def test_custom_encoder_must_be_passed_back(tmp_path):
    fn = HashingEncoder(16).encode
    memory = LoGoMemory(lambda texts: fn(texts), gate=None)
    memory.add(Interaction("a", "q", "r"))
    memory.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="encoder"):
        LoGoMemory.from_pretrained(tmp_path / "m")
    assert len(LoGoMemory.from_pretrained(tmp_path / "m", encoder=lambda texts: fn(texts))) == 1


def test_safetensors_holds_only_arrays(make_memory, tmp_path):
    target = _saved(make_memory, tmp_path)
    tensors = load_file(str(target / "embeddings.safetensors"))
    assert tensors["embeddings"].shape == (48, 64) and tensors["labels"].dtype == np.int64


def test_set_buffer_encodes_only_new_items(make_memory):
    memory = make_memory()
    first = [topical("u1", "bread", i) for i in range(3)]
    memory.set_buffer("u1", first)
    before = {item.id: memory.retrieve("u1", item.text, k=1, region="buffer")[0].score for item in first}
    kept, new = first[1:], topical("u1", "cats", 7)
    with mock.patch.object(memory, "_encode", wraps=memory._encode) as encode:
        memory.set_buffer("u1", [*kept, new], scores=[1.0, 2.0, 3.0])
    assert encode.call_args.args[0] == [new.text]  # the kept items reuse their stored vectors
    assert [item.id for item in memory.buffer("u1")] == [kept[0].id, kept[1].id, new.id]
    for item in kept:
        assert memory.retrieve("u1", item.text, k=1, region="buffer")[0].score == pytest.approx(before[item.id])


def test_bm25_reads_do_not_run_the_encoder(make_memory):
    """A BM25 read of the local memory needs no embedding: the encoder (a transformer forward with the default
    MiniLM) runs only for dense scores or the global memory."""
    encoder = HashingEncoder(64)
    memory = make_memory(encoder=encoder, scorer="bm25", use_global=False)
    memory.add_many([Interaction("alice", f"rates and inflation {i}", f"Fed {i}", timestamp=i) for i in range(5)])
    with mock.patch.object(encoder, "encode", wraps=encoder.encode) as encode:
        hits = memory.retrieve("alice", "inflation rates", k=2)
        assert len(hits) == 2 and encode.call_count == 0
        memory.retrieve("alice", "inflation rates", k=2, use_global=True)
        assert encode.call_count == 1
    dense = make_memory(encoder=encoder, scorer="dense", use_global=False)
    dense.add_many([Interaction("alice", "rates", "Fed", timestamp=1)])
    with mock.patch.object(encoder, "encode", wraps=encoder.encode) as encode:
        dense.retrieve("alice", "inflation rates", k=1)
        assert encode.call_count == 1


# -------------------------------------------------------------- save semantics
def test_save_keeps_the_users_files_and_refuses_their_folders(make_memory, tmp_path, monkeypatch):
    memory = populated(make_memory)
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "sub" / "notes.txt").write_text("notes")
    memory.save_pretrained(ckpt)
    memory.save_pretrained(ckpt)
    assert (ckpt / "model.safetensors").read_bytes() == b"weights" and (
        ckpt / "sub" / "notes.txt"
    ).read_text() == "notes"
    assert len(LoGoMemory.from_pretrained(ckpt)) == len(memory)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="working directory"):
        memory.save_pretrained(".")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="config.json.*no earlier save wrote"):
        memory.save_pretrained(model_dir)
    assert (model_dir / "config.json").read_text() == '{"model_type": "llama"}'


def test_a_crash_between_file_replaces_loads_the_newest_version(make_memory, tmp_path, monkeypatch):
    from transformers_spring.persistence import folder

    memory = populated(make_memory)
    target = tmp_path / "mem"
    memory.save_pretrained(target)
    memory.add(topical("u0", "cats", 99, ts=2e9))
    calls = {"n": 0}

    def crash(name):
        if name == "replace":
            calls["n"] += 1
            if calls["n"] == 2:  # one file of the new version in place, the others still staged
                raise KeyboardInterrupt

    monkeypatch.setattr(folder, "_step", crash)
    with pytest.raises(KeyboardInterrupt):
        memory.save_pretrained(target)
    monkeypatch.setattr(folder, "_step", lambda name: None)
    loaded = LoGoMemory.from_pretrained(target)
    assert len(loaded) == len(memory)  # the newer, complete version
    assert not [p for p in target.iterdir() if p.name.startswith(".spring")]


def test_an_earlier_release_save_is_adopted(make_memory, tmp_path):
    from transformers_spring.persistence import MANIFEST_FILE

    memory = populated(make_memory)
    target = tmp_path / "mem"
    memory.save_pretrained(target)
    (target / MANIFEST_FILE).unlink()  # as written before manifests
    memory.save_pretrained(target)
    assert (target / MANIFEST_FILE).is_file() and len(LoGoMemory.from_pretrained(target)) == len(memory)


def test_public_arguments_are_checked_by_name(make_memory, tmp_path):
    memory = populated(make_memory)
    with pytest.raises(TypeError, match="`interactions`"):
        memory.add_many(None)
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="`batch_size`"):
            memory.add_many([topical("u0", "cats", 100)], batch_size=bad)
    good = [topical("u0", "cats", 200 + i) for i in range(3)]
    with pytest.raises(TypeError, match=r"^`interactions\[3\]`: `prompt` must be a str, got int\.$"):
        memory.add_many([*good, {"user_id": "u0", "prompt": 3, "response": "r"}])
    with pytest.raises(ValueError, match=r"^`interactions\[1\]`: `response` has no visible character"):
        memory.add_many([good[0], {"user_id": "u0", "prompt": "p", "response": "\u200b"}])
    with pytest.raises(TypeError, match=r"^expected an Interaction or a dict, got str\.$"):  # `add` names no index
        memory.add("u0 said hi")
    with pytest.raises(TypeError, match="`interaction_id`"):
        memory.delete("u0", [])
    with pytest.raises(TypeError, match="`use_global`"):
        memory.retrieve("u0", "cats", use_global="no")
    with pytest.raises(TypeError, match="`use_global`"):
        make_memory(use_global="no")
    for bad in (None, 123):
        with pytest.raises(TypeError, match="`save_directory`"):
            memory.save_pretrained(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="parent .* is a file"):
        memory.save_pretrained(tmp_path / "file" / "mem")


def test_id_clashes_name_the_record(make_memory):
    memory = populated(make_memory)
    memory.add(Interaction("b", "cats purr", "kitten", id="z"))
    batch = [topical("a", "cats", 300 + i) for i in range(10)]
    batch[3], batch[7] = (Interaction("a", f"rockets {i}", "launch", id="x3") for i in (3, 7))
    before = len(memory)
    with pytest.raises(ValueError, match=r"^`interactions\[7\]`: `id` 'x3' repeats `interactions\[3\]` \(user 'a'\)"):
        memory.add_many(batch)
    batch[7] = Interaction("b", "rockets 7", "launch", id="x7")
    batch[9] = Interaction("b", "rockets 9", "launch", id="z")
    with pytest.raises(ValueError, match=r"^`interactions\[9\]`: `id` 'z' is already stored for user 'b'\.$"):
        memory.add_many(batch)
    with pytest.raises(ValueError, match=r"^`id` 'z' is already stored for user 'b'\.$"):  # `add` names no index
        memory.add(batch[9])
    assert len(memory) == before  # all or nothing


def test_a_refused_surrogate_leaves_every_later_save_working(make_memory, tmp_path):
    memory = populated(make_memory)
    bad = json.loads('"\\udc80"')
    with pytest.raises(ValueError, match="surrogate"):
        memory.add({"user_id": "u0", "prompt": f"cats {bad}", "response": "r"})
    memory.save_pretrained(tmp_path / "mem")
    assert len(LoGoMemory.from_pretrained(tmp_path / "mem")) == len(memory)


def test_forget_user_leaves_no_byte_of_them_in_the_next_save(make_memory, tmp_path):
    from testing_utils import find_traces

    memory = populated(make_memory, gate="auto", use_global=True)
    secret = [Interaction("zq-forgotten", f"cats kitten purr zqsecret{i}", f"zqheadline{i}", timestamp=1e9 + i)
              for i in range(6)]  # fmt: skip
    memory.add_many(secret)
    for i in range(12):  # their queries feed the gate; communities include them
        memory.retrieve("zq-forgotten", f"kitten purr {i}", k=3)
    target = tmp_path / "mem"
    memory.save_pretrained(target)
    assert find_traces(target, "zq-forgotten")  # the first save holds them
    assert memory.forget_user("zq-forgotten") and not memory.forget_user("zq-forgotten")
    assert "zq-forgotten" not in memory.global_memory.users and "zq-forgotten" not in memory.gate.owners()
    memory.save_pretrained(target)
    assert find_traces(target, "zq-forgotten", "zqsecret", "zqheadline") == []
    reloaded = LoGoMemory.from_pretrained(target)
    assert "zq-forgotten" not in reloaded.users() and len(reloaded.gate.observed()) == len(memory.gate.observed())


class CautiousMediator(Mediator):
    """A subclass with a setting of its own: it must survive a save and load."""

    def __init__(self, caution: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.caution = caution

    def config(self) -> dict:
        return {**super().config(), "caution": self.caution}


def test_a_mediator_subclass_survives_a_round_trip(make_memory, tmp_path):
    memory = populated(make_memory, mediator=CautiousMediator(caution=0.9, kappa=3.0))
    memory.save_pretrained(tmp_path / "mem")
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem")
    assert type(loaded.mediator) is CautiousMediator
    assert loaded.mediator.caution == 0.9 and loaded.mediator.kappa == 3.0
    config = json.loads((tmp_path / "mem" / "config.json").read_text())
    config["mediator"]["class"] = "somewhere.Unknown"
    (tmp_path / "mem" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="somewhere.Unknown.*not registered"):
        LoGoMemory.from_pretrained(tmp_path / "mem")


def test_save_kwargs_pass_through_to_the_hub_mixin(make_memory, tmp_path):
    memory = populated(make_memory)
    memory.save_pretrained(tmp_path / "mem", model_card_kwargs={})
    with mock.patch.object(LoGoMemory, "push_to_hub", autospec=True, return_value="url") as push:
        assert memory.save_pretrained(tmp_path / "mem", push_to_hub=True, repo_id="me/mem", private=True) == "url"
    assert push.call_args.args[1] == "me/mem" and push.call_args.kwargs == {"private": True}


def test_merge_combines_disjoint_memories_without_re_embedding(make_memory):
    from testing_utils import populated, topical

    whole = populated(make_memory, use_global=True, exact_below=10**9, users=6)
    pinned = topical("u1", "bread", 90)
    whole.set_buffer("u1", [pinned], scores=[2.5])
    whole.set_sharing("u4", False)
    parts = [make_memory(use_global=True, exact_below=10**9, min_community_users=2) for _ in range(2)]
    for user in whole.users():  # u0-u2 and u3-u5: both topics in both parts, so matches cross the parts
        parts[int(user[1:]) // 3].add_many(whole.history(user))
    parts[0].set_buffer("u1", [pinned], scores=[2.5])
    parts[1].set_sharing("u4", False)
    calls = []
    encoder = parts[0].encoder
    original = encoder.encode
    encoder.encode = lambda texts: (calls.append(len(texts)), original(texts))[1]
    try:
        merged = LoGoMemory.merge(parts)
    finally:
        encoder.encode = original
    assert calls == []  # nothing re-embedded
    assert sorted(merged.users()) == sorted(whole.users())
    for user in whole.users():
        assert [r.id for r in merged.history(user)] == [r.id for r in whole.history(user)]
        assert [r.id for r in merged.buffer(user)] == [r.id for r in whole.buffer(user)]
        assert merged.buffer_scores(user) == whole.buffer_scores(user)
    assert not merged.is_shared("u4") and len(merged.global_memory) == len(whole.global_memory)

    def servable(memory):
        return {key for label, key in memory._label_keys.items() if memory.global_memory.is_servable(label)}

    assert servable(whole) and servable(merged) == servable(whole)  # items backed from the other part, too
    for query in ("cat kitten purr report", "rocket launch orbit"):
        got = [(h.interaction.user_id, h.interaction.id) for h in merged.retrieve("u0", query, k=4)]
        want = [(h.interaction.user_id, h.interaction.id) for h in whole.retrieve("u0", query, k=4)]
        assert got == want
    with pytest.raises(ValueError, match="disjoint"):
        LoGoMemory.merge([parts[0], parts[0]])
    with pytest.raises(ValueError, match="capacity"):
        LoGoMemory.merge([parts[0], make_memory(capacity=5)])


# ----------------------------------------------------------- sharing policy
def _global_authors(memory, users=None, query="kitten purr whiskers rocket orbit report"):
    """Whose items the global memory serves to anyone (every user and a stranger asking)."""
    askers = (users or memory.users()) + ["stranger"]
    return {h.interaction.user_id for u in askers for h in memory.retrieve_context(u, query, k=40).global_hits}


@on_every_backend
def test_consented_serves_only_users_who_opted_in(make_memory):
    memory = populated(make_memory, users=6, n_communities=1, min_community_users=1, sharing_policy="consented")
    assert memory.sharing_policy == "consented" and not memory.share_by_default
    assert memory.consenting_users() == [] and len(memory.global_memory) == 0 and _global_authors(memory) == set()
    memory.set_sharing("u0", True)
    memory.set_sharing("u2", True)
    memory.set_sharing("u4", True)
    assert memory.consenting_users() == ["u0", "u2", "u4"]
    # Verbatim, without the contributor rule: the global memory serves every item of the users who opted in.
    assert _global_authors(memory) == {"u0", "u2", "u4"}
    assert len(memory.global_memory) == 24 and all(memory.global_memory.is_servable(label) for label in range(24))
    memory.add(topical("u1", "cats", 90))  # u1 never opted in: its new items stay out too
    memory.add(topical("u2", "cats", 91))  # u2 did: its new item is served
    assert len(memory.global_memory) == 25 and "u1" not in _global_authors(memory)
    memory.set_sharing("u4", False)  # opt-out: withdrawn at once
    assert _global_authors(memory) == {"u0", "u2"}
    assert memory.forget_user("u0")
    assert _global_authors(memory) == {"u2"} and memory.consenting_users() == ["u2"]


def test_private_policy_still_needs_contributors(make_memory):
    # The same users under "private": u1's unique item is never served, even though every user shares.
    memory = populated(make_memory, users=6, n_communities=1, min_community_users=1)
    assert memory.sharing_policy == "private" and memory.share_by_default
    unique = Interaction("u1", "zq unique rocket manifest", "zq unique headline", timestamp=2e9)
    memory.add(unique)
    label = memory._labels[("u1", unique.id)]
    assert not memory.global_memory.is_servable(label)
    memory.set_sharing_policy("consented")
    memory.set_sharing("u1", True)
    assert memory.global_memory.is_servable(memory._labels[("u1", unique.id)])


def test_policy_settings_are_checked_by_name(make_memory):
    with pytest.raises(ValueError, match="`sharing_policy`"):
        make_memory(sharing_policy="open")
    with pytest.raises(TypeError, match="`sharing_policy`"):
        make_memory(sharing_policy=1)
    with pytest.raises(ValueError, match="share_by_default=True"):
        make_memory(sharing_policy="consented", share_by_default=True)
    memory = make_memory()
    with pytest.raises(ValueError, match="`sharing_policy`"):
        memory.set_sharing_policy("public")
    assert memory.sharing_policy == "private"  # a refused change changes nothing
    assert make_memory(share_by_default=False).share_by_default is False


@on_every_backend
def test_policy_and_consent_round_trip(make_memory, backend, tmp_path):
    memory = populated(make_memory, users=6, n_communities=1, min_community_users=1, sharing_policy="consented")
    memory.set_sharing("u1", True)
    memory.set_sharing("u3", True)
    memory.set_sharing("u5", False)
    before = _global_authors(memory)
    memory.save_pretrained(tmp_path / "mem")
    config = json.loads((tmp_path / "mem" / "config.json").read_text())
    assert config["sharing_policy"] == "consented" and config["share_by_default"] is False
    assert config["sharing"] == {"u1": True, "u3": True, "u5": False}
    card = (tmp_path / "mem" / "README.md").read_text()
    assert "| sharing policy | `consented`: the items of the 2 user(s) who opted in" in card
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem", num_threads=1)
    assert loaded.sharing_policy == "consented" and loaded.consenting_users() == ["u1", "u3"]
    assert _global_authors(loaded) == before == {"u1", "u3"}
    # A load never changes the policy: the saved flags mean what the saved policy says.
    with pytest.raises(ValueError, match=r"sharing_policy='consented'.*set_sharing_policy\('private'\)"):
        LoGoMemory.from_pretrained(tmp_path / "mem", sharing_policy="private")
    assert LoGoMemory.from_pretrained(tmp_path / "mem", sharing_policy="consented").consenting_users() == ["u1", "u3"]


def test_policy_change_on_a_saved_memory(make_memory, tmp_path):
    memory = populated(make_memory, users=6, n_communities=1, min_community_users=1)
    memory.set_sharing("u0", True)  # under "private": taking part under the rule, not consent to be quoted
    memory.set_sharing("u2", False)
    memory.save_pretrained(tmp_path / "mem")
    assert (
        "`private`: an item is served to other users only when 3 distinct users"
        in (tmp_path / "mem" / "README.md").read_text()
    )
    loaded = LoGoMemory.from_pretrained(tmp_path / "mem")
    assert loaded.sharing_policy == "private" and len(loaded.global_memory) == 40

    change = loaded.set_sharing_policy("consented")
    assert change == {"shared_users": 0, "shared_records": 0, "withdrawn_records": 40}
    assert loaded.consenting_users() == [] and _global_authors(loaded) == set() and not loaded.is_shared("u0")
    assert not loaded.is_shared("u2")  # the opt-out is kept
    loaded.set_sharing("u1", True)
    assert _global_authors(loaded) == {"u1"} and loaded.min_contributors == 3  # kept for a change back
    same = loaded.set_sharing_policy("consented")  # the same policy again keeps the consent
    assert same == {"shared_users": 1, "shared_records": 8, "withdrawn_records": 0} and _global_authors(loaded) == {
        "u1"
    }
    loaded.save_pretrained(tmp_path / "mem")
    again = LoGoMemory.from_pretrained(tmp_path / "mem")
    assert again.sharing_policy == "consented" and _global_authors(again) == {"u1"}

    back = again.set_sharing_policy("private")
    # Everyone but the opted-out u2 shares again, under the contributor rule.
    assert back["shared_users"] == 5 and back["shared_records"] == 40 and back["withdrawn_records"] == 0
    assert again.global_memory.min_contributors == 3 and not again.is_shared("u2")
    assert "u2" not in _global_authors(again)


def test_a_hostile_policy_or_consent_is_refused_on_load(make_memory, tmp_path):
    memory = populated(make_memory, users=4, n_communities=1, min_community_users=1, sharing_policy="consented")
    memory.set_sharing("u1", True)
    memory.save_pretrained(tmp_path / "mem")
    path = tmp_path / "mem" / "config.json"
    config = json.loads(path.read_text())
    for field, value, match in (
        ("sharing_policy", "everyone", "sharing_policy"),
        ("share_by_default", True, "share_by_default=True"),
        ("sharing", {"u1": False}, "u1.*does not share, has a global label"),  # u1's labelled items, no consent
    ):
        path.write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=match):
            LoGoMemory.from_pretrained(tmp_path / "mem")
    # u1's consent edited away and the default turned on, loaded with the default overridden off: still refused.
    path.write_text(json.dumps({**config, "sharing": {}, "share_by_default": True}))
    with pytest.raises(ValueError, match="u1.*does not share, has a global label"):
        LoGoMemory.from_pretrained(tmp_path / "mem", share_by_default=False)


def test_a_policy_change_keeps_a_tightened_rule_and_the_current_default(make_memory):
    memory = populated(make_memory, users=6, n_communities=1, min_community_users=1, share_by_default=False)
    memory.global_memory.set_support_rule(min_contributors=5)
    memory.set_sharing_policy("private")  # the same policy: the default stays False, the rule stays 5
    assert memory.share_by_default is False and memory.global_memory.min_contributors == 5
    memory.set_sharing_policy("consented")
    memory.set_sharing_policy("private", share_by_default=True)
    assert memory.global_memory.min_contributors == 5 and memory.min_contributors == 5
