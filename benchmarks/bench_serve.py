"""`spring serve` under load on SmolLM2-135M-Instruct, measured side by side in one run.

1. **A state.** 16 news authors (the most prolific of the news stream), each with a SPRInG adapter trained on their
   8 newest-but-one items (1 epoch, lr 3e-3) and those items in the memory; saved with `save_pretrained`.
2. **A serial loop.** `SpringForCausalLM.generate(personalization=user)` called once per request, one after another,
   in this process (the server is not running): what a team gets without a server.
   Then where a personalized batch's time goes, in this process: one `generate` of 8 users as plain base rows, with
   per-row adapters at λ 0, with one adapter and the history path, and with per-row adapters and history.
3. **The server** (`spring serve`, a subprocess; start-up time measured until `/health` answers). For N = 1, 4, 8 and
   16 concurrent clients, each a different user, each sending `--requests` streaming chat requests one after another:
   - **personalized**: `user` set (each row its adapter, history and λ, in the fused dual path);
   - **plain**: the same server, no `user` (one model, no history: the base model through the same batching).
   The two arms alternate per N. Reported: completion tokens per second of wall time, time to first token (TTFT)
   and per-token latency after it, p50 and p99, and the ratios personalized / plain and personalized / serial.
4. **A soak** (`--soak_seconds`, default 120): 16 streaming clients for that long, each posting an interaction after
   every completion (period updates run when a user has `--period_size` pending). Reported: requests, errors,
   interactions acknowledged against those in the journal and in `GET /v1/users/{user}` afterwards, and the
   server's RSS after warm-up and at the end.

    python benchmarks/bench_serve.py                      # ~20 minutes on 2 CPU cores
    python benchmarks/bench_serve.py --requests 2 --soak_seconds 30 --clients 1,8
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

TASK = "Write a headline for this news article: {article}"


def build_state(out: Path, users: int, items: int, threads: int) -> tuple[Path, dict]:
    from transformers_spring.data import DEFAULT_NEWS_PATH, group_by_user, read_news_jsonl
    from transformers_spring.memory import LoGoMemory
    from transformers_spring.training import ContinualPersonalizer, SpringTrainingArguments
    from transformers_spring.utils import load_smollm2

    torch.set_num_threads(threads)
    by_author = group_by_user(reversed(read_news_jsonl(DEFAULT_NEWS_PATH, min_items=items + 1)))
    authors = sorted(by_author.items(), key=lambda entry: -len(entry[1]))[:users]
    model, tokenizer = load_smollm2()
    args = SpringTrainingArguments(
        output_dir=str(out / "trainer"), learning_rate=3e-3, num_train_epochs=1, per_device_train_batch_size=4,
        disable_tqdm=True, report_to=[], use_cpu=True, seed=0,
    )  # fmt: skip
    memory = LoGoMemory(scorer="bm25", gate=None)
    personalizer = ContinualPersonalizer(model, tokenizer, args, memory, max_resident_adapters=users + 1)
    requests = {}
    started = time.perf_counter()
    for author, rows in authors:
        history = list(reversed(rows[1 : 1 + items]))  # rows are newest first; rows[0] is the request
        memory.add_many(history)
        personalizer.observe(author, history)
        requests[author] = rows[0].prompt
    personalizer.save_pretrained(out / "state")
    print(f"state: {len(authors)} users x {items} items trained in {time.perf_counter() - started:.0f} s")
    return out / "state", requests


def serial_loop(state: Path, requests: dict, n_requests: int, max_tokens: int, threads: int) -> dict:
    from transformers_spring.generation import SpringForCausalLM

    torch.set_num_threads(threads)
    spring = SpringForCausalLM.from_pretrained(str(state))
    tok = spring.tokenizer
    tok.padding_side = "left"
    tokens, started = 0, None
    for i, (user, article) in enumerate(list(requests.items()) * n_requests):
        messages = [{"role": "user", "content": TASK.format(article=article)}]
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        if i == 1:  # the first call warms up
            started, tokens = time.perf_counter(), 0
        with torch.no_grad():
            out = spring.generate(**inputs, personalization=user, max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    seconds = time.perf_counter() - started
    del spring
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def breakdown(state: Path, requests: dict, n_rows: int, max_tokens: int, threads: int) -> dict[str, float]:
    """Where a personalized batch's time goes: one `generate` of `n_rows` users, `max_tokens` tokens each (EOS
    suppressed), as plain base rows, per-row adapters at λ 0 (no history), one adapter on every row with its history,
    and each row its own adapter and history (what the server decodes). Seconds, the best of two runs."""
    from transformers_spring.generation import Personalization, SpringForCausalLM
    from transformers_spring.generation.adapters import BASE_ADAPTER

    torch.set_num_threads(threads)
    spring = SpringForCausalLM.from_pretrained(str(state))
    tok = spring.tokenizer
    tok.padding_side = "left"
    users = list(requests)[:n_rows]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": TASK.format(article=requests[u])}], tokenize=False,
                                add_generation_prompt=True)
        for u in users
    ]  # fmt: skip
    inputs = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    variants = {
        "plain (base model)": [Personalization(adapter=BASE_ADAPTER, history=[])] * n_rows,
        "per-row adapters, λ 0": [Personalization(user=u, weight=0.0) for u in users],
        "one adapter, with history": [Personalization(user=users[0], query=requests[u]) for u in users],
        "per-row adapters, with history": users,
    }
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, top_k=None, top_p=None,
                  temperature=None)  # fmt: skip
    best = {}
    for _ in range(2):
        for name, rows in variants.items():
            started = time.perf_counter()
            with torch.no_grad():
                spring.generate(**inputs, personalization=rows, **kwargs)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    del spring
    return best


class Server:
    def __init__(self, state: Path, workdir: Path, threads: int, max_batch_size: int, period_size: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "transformers_spring.cli", "serve", "--state", str(state), "--workdir",
                   str(workdir), "--port", str(self.port), "--no_auth", "--threads", str(threads),
                   "--max_batch_size", str(max_batch_size), "--period_size", str(period_size),
                   "--max_concurrent_streams", "64"]  # fmt: skip
        started = time.perf_counter()
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=open(workdir.parent / "server.log", "w")
        )
        while True:
            try:
                self.get("/health")
                break
            except OSError:
                if self.process.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"the server did not start; see {workdir.parent / 'server.log'}") from None
                time.sleep(0.1)
        self.startup_s = time.perf_counter() - started

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())

    def get_text(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("GET", path)
        return conn.getresponse().read().decode()

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def stream(self, user: str | None, article: str, max_tokens: int) -> dict:
        """One streaming chat request: TTFT, per-token latency and completion tokens."""
        body = {
            "model": "spring",
            "messages": [{"role": "user", "content": TASK.format(article=article)}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if user:
            body["user"] = user
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        sent = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        first = last = None
        tokens = 0
        text = ""
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += piece
        end = time.perf_counter()
        ttft = (first or end) - sent
        per_token = ((last or end) - (first or end)) / max(tokens - 1, 1)
        return {"ttft": ttft, "per_token": per_token, "tokens": tokens, "text": text}

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load(server: Server, users: list[str], requests: dict, n_requests: int, max_tokens: int, personalized: bool):
    results, errors = [], []

    def client(user: str) -> None:
        for _ in range(n_requests):
            try:
                results.append(server.stream(user if personalized else None, requests[user], max_tokens))
            except Exception as err:  # counted, not raised: the table reports errors
                errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(u,)) for u in users]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "errors": len(errors),
        "ttft": [r["ttft"] for r in results], "per_token": [r["per_token"] for r in results],
    }  # fmt: skip


def pct(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def soak(server: Server, requests: dict, seconds: float, max_tokens: int) -> dict:
    users = list(requests)
    acked: dict[str, int] = {u: 0 for u in users}
    errors, done = [], [0]
    stop_at = time.perf_counter() + seconds

    def client(user: str) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            try:
                result = server.stream(user, requests[user], max_tokens)
                done[0] += 1
                status, _ = server.post("/v1/interactions", {"user": user, "prompt": f"{requests[user]} ({i})",
                                                             "response": result["text"] or "(empty)"})  # fmt: skip
                if status != 200:
                    raise RuntimeError(f"interaction: HTTP {status}")
                acked[user] += 1
            except Exception as err:
                errors.append(repr(err))
            i += 1

    threads = [threading.Thread(target=client, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = {u: server.get(f"/v1/users/{urllib.parse.quote(u)}")["journal_items"] for u in users}
    return {"requests": done[0], "errors": errors, "acked": sum(acked.values()),
            "in_journal": sum(seen.values()), "lost": sum(max(acked[u] - seen[u], 0) for u in users)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=3, help="Requests per client per arm.")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--items", type=int, default=8, help="Training items per user.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--soak_seconds", type=float, default=120)
    parser.add_argument("--period_size", type=int, default=4, help="The soak's period size.")
    parser.add_argument("--warmup_seconds", type=float, default=30, help="The soak's uncounted warm-up.")
    parser.add_argument("--parts", default="load,soak", help="What to run: load, soak or both.")
    parser.add_argument("--out", default=None, help="Where to keep the state (default: a temporary directory).")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    import transformers

    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs, {args.threads} torch threads; SmolLM2-135M-Instruct fp32, greedy, "
          f"max_tokens {args.max_tokens}")  # fmt: skip
    state, requests = build_state(root, max(clients), args.items, args.threads)
    parts = set(args.parts.split(","))
    if "load" in parts:
        load_part(args, state, requests, clients, root)
    if "soak" in parts and args.soak_seconds > 0:
        soak_part(args, state, requests, clients, root)


def load_part(args, state: Path, requests: dict, clients: list[int], root: Path) -> None:
    users = list(requests)
    serial = serial_loop(state, requests, args.requests, args.max_tokens, args.threads)
    print(f"serial loop of generate(personalization=user): {serial['tokens_per_s']:.1f} tokens/s "
          f"({serial['tokens']} tokens in {serial['seconds']:.1f} s)")  # fmt: skip

    parts = breakdown(state, requests, 8, args.max_tokens, args.threads)
    print(f"\nwhere the time goes: one generate() of 8 users x {args.max_tokens} tokens, in this process")
    print("| rows | seconds | tokens/s | / plain |\n|---|---:|---:|---:|")
    plain_s = parts["plain (base model)"]
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.2f} | {8 * args.max_tokens / seconds:.1f} | {plain_s / seconds:.2f}x |")
    print()

    server = Server(state, root / "work", args.threads, max(clients), period_size=0)
    print(f"server start-up (until /health answers): {server.startup_s:.1f} s")
    rows = []
    try:
        server.stream(users[0], requests[users[0]], 4)  # warm-up
        for n in clients:
            personal = load(server, users[:n], requests, args.requests, args.max_tokens, personalized=True)
            plain = load(server, users[:n], requests, args.requests, args.max_tokens, personalized=False)
            rows.append((n, personal, plain))
    finally:
        server.stop()
    print("\n| clients | arm | tokens/s | TTFT p50 | TTFT p99 | per-token p50 | per-token p99 | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, personal, plain in rows:
        for name, r in (("personalized", personal), ("plain", plain)):
            print(f"| {n} | {name} | {r['tokens_per_s']:.1f} | {pct(r['ttft'], 50):.2f} s | {pct(r['ttft'], 99):.2f} s "
                  f"| {pct(r['per_token'], 50) * 1000:.0f} ms | {pct(r['per_token'], 99) * 1000:.0f} ms | "
                  f"{r['errors']} |")  # fmt: skip
    print("\n| clients | personalized / plain | personalized / serial loop |")
    print("|---:|---:|---:|")
    for n, personal, plain in rows:
        print(f"| {n} | {personal['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
              f"{personal['tokens_per_s'] / serial['tokens_per_s']:.2f}x |")  # fmt: skip


def soak_part(args, state: Path, requests: dict, clients: list[int], root: Path) -> None:
    users = list(requests)
    server = Server(state, root / "soak", args.threads, max(clients), period_size=args.period_size)
    try:
        # Warm-up under the same load (not counted): the first period update allocates the training buffers.
        warm = soak(server, requests, args.warmup_seconds, args.max_tokens)
        rss_start = server.rss_mb()
        result = soak(server, requests, args.soak_seconds, args.max_tokens)
        result["acked"] += warm["acked"]
        result["errors"] = warm["errors"] + result["errors"]
        result["lost"] = result["acked"] - result["in_journal"]
        rss_end = server.rss_mb()
        metrics = server.get_text("/metrics")
    finally:
        server.stop()
    print(f"\nsoak: {len(users)} streaming clients for {args.soak_seconds:.0f} s: {result['requests']} requests, "
          f"{len(result['errors'])} errors, {result['acked']} interactions acknowledged (warm-up included), "
          f"{result['in_journal']} in the journal, {result['lost']} lost; server RSS {rss_start:.0f} MB after warm-up, {rss_end:.0f} MB at "
          f"the end (after a {args.warmup_seconds:.0f} s warm-up under the same load)")  # fmt: skip
    updates = [line.split()[-1] for line in metrics.splitlines() if line.startswith("spring_update_seconds_")]
    print(f"  period updates during the soak: {updates[1]} ({float(updates[0]):.0f} s in all)")
    for error in result["errors"][:5]:
        print(f"  error: {error}")


if __name__ == "__main__":
    main()
