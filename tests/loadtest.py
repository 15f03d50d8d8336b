"""Many users at once against a launched app, loopback only, bounded in count and time.

Each session is its own HTTP client asking its own questions through `/chat`; every
answer is checked against the engine's own answer to the same question (greedy decoding is
deterministic), so a lost, mixed-up or crossed answer is caught whatever the model's quality.

    python -m tests.loadtest --sessions 16 --turns 3          # the full run (embedded model)

The full run serves the same sessions twice from `app.py` in its own process, as deployed, one
answer at a time (`--max-batch 1`) and with the default batch, and reports both with their
ratios. The sessions use plain HTTP because they share this machine's cores with the app (see
`session`); the Stop check uses gradio_client, whose `cancel` is what the browser's Stop does.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from gradio_client import Client, handle_file

from bench.common import fixed_length
from metis.prompting import Message
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.scheduler import BatchLimits
from metis.tiny import world

MAX_NEW_TOKENS = 48
LONG_ANSWER = 16384  # ~20 s of tokens on this CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def questions(n: int, folder: Path) -> list[dict]:
    """n distinct held-out questions with their images saved for upload."""
    out = []
    for i, sample in enumerate(world.generate("test", n)):
        path = folder / f"q{i}.png"
        sample.image.save(path)
        out.append(dict(text=sample.question, image=str(path), sample=sample))
    return out


def reference_answers(engine: Engine, qs: list[dict]) -> None:
    for q in qs:
        result = engine.run([Message("user", q["text"], [q["sample"].image])],
                            GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
        q["expected"] = result.answer


def text_of(message: dict) -> str:
    """Gradio 6 sends message content as a list of blocks."""
    content = message["content"]
    if isinstance(content, list):
        content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return str(content).strip()


def ask(http: httpx.Client, q: dict) -> tuple[float | None, list]:
    """One question through Gradio's documented HTTP API, as a browser or `curl` sends it: upload
    the image, `POST /call/v2/chat`, read the event stream. (first output seconds, last messages)"""
    start = time.perf_counter()
    with open(q["image"], "rb") as image:
        path = http.post("/upload", files={"files": (Path(q["image"]).name, image, "image/png")}).json()[0]
    message = {"text": q["text"], "files": [{"path": path, "meta": {"_type": "gradio.FileData"}}]}
    event_id = http.post("/call/v2/chat", json={"message": message, "mode": "auto",
                                                "max_new_tokens": MAX_NEW_TOKENS}).json()["event_id"]
    first, event, data = None, None, None
    with http.stream("GET", f"/call/v2/chat/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event in ("generating", "complete", "error"):
                first = first if first is not None else time.perf_counter() - start
                data = json.loads(line[5:])
    if event != "complete":
        raise RuntimeError(f"the app answered {event}: {data}")
    return first, data[0]


def session(url: str, qs: list[dict], timeout: float, user: int = 0) -> list[dict]:
    """One user asking `qs` in turn. Plain HTTP (httpx) rather than gradio_client: the sessions
    share this machine's cores with the app, and gradio_client spent about as much CPU per request
    as the server did, so the load generator measured itself. Each user comes from an address of
    its own, as a proxy reports it (the app limits requests per address, metis/ui/gate.py)."""
    results = []
    address = {"X-Forwarded-For": f"198.51.100.{user % 250 + 1}"}  # documentation range (RFC 5737)
    with httpx.Client(base_url=url.rstrip("/") + "/gradio_api", timeout=timeout, headers=address) as http:
        for q in qs:
            start = time.perf_counter()
            record = dict(question=q["text"], expected=q["expected"])
            try:
                first, messages = ask(http, q)
                record.update(answer=text_of(messages[-1]), first_output_s=first,
                              latency_s=time.perf_counter() - start, ok=True)
            except Exception as exc:  # counted as failed, with the reason
                record.update(ok=False, error=f"{type(exc).__name__}: {exc}", latency_s=time.perf_counter() - start)
            results.append(record)
    return results


def run(url: str, engine: Engine, sessions: int, turns: int, timeout: float = 120.0) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        qs = questions(sessions * turns, Path(folder))
        reference_answers(engine, qs)
        start = time.perf_counter()
        with ThreadPoolExecutor(sessions) as pool:
            per_session = list(pool.map(lambda i: session(url, qs[i * turns:(i + 1) * turns], timeout, i),
                                        range(sessions)))
        wall = time.perf_counter() - start
    records = [r for rs in per_session for r in rs]
    done = [r for r in records if r["ok"]]
    latencies = sorted(r["latency_s"] for r in done)
    firsts = sorted(r["first_output_s"] for r in done if r["first_output_s"] is not None)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None

    return dict(
        sessions=sessions, turns=turns, requests=len(records), completed=len(done),
        failed=len(records) - len(done), wrong_or_crossed=sum(r["answer"] != r["expected"] for r in done),
        latency_p50_s=pct(latencies, 0.5), latency_p95_s=pct(latencies, 0.95),
        first_output_p50_s=pct(firsts, 0.5), first_output_p95_s=pct(firsts, 0.95),
        mean_latency_s=statistics.fmean(latencies) if latencies else None, wall_s=wall,
        errors=[r["error"] for r in records if not r["ok"]][:5],
        mismatches=[r for r in done if r["answer"] != r["expected"]][:5],
    )


def stop_frees_the_slot(url: str, engine: Engine, timeout: float = 120.0) -> dict:
    """Session A starts a very long answer, session B queues behind it, A cancels: how soon B's
    answer starts, and whether B still gets its own full answer. Answers are forced to full
    length (no early end of sequence) so that A is surely still generating when it stops."""
    with tempfile.TemporaryDirectory() as folder, fixed_length(engine.model, LONG_ANSWER):
        q, = questions(1, Path(folder))
        reference_answers(engine, [q])
        message = {"text": q["text"], "files": [handle_file(q["image"])]}
        a, b = Client(url, verbose=False), Client(url, verbose=False)
        long = a.submit(message=message, mode="think", max_new_tokens=LONG_ANSWER, api_name="/chat")
        deadline = time.monotonic() + timeout
        while not long.outputs() and time.monotonic() < deadline:  # A is generating
            time.sleep(0.02)
        queued = b.submit(message=message, mode="auto", max_new_tokens=MAX_NEW_TOKENS, api_name="/chat")
        time.sleep(0.5)  # B's request is in the queue behind A
        running = not long.done()
        stopped = time.perf_counter()
        long.cancel()
        first = None
        for _ in queued:
            first = first if first is not None else time.perf_counter() - stopped
        answer = text_of(queued.result(timeout=timeout)[-1])
    return dict(stopped_while_generating=running, stop_to_next_answer_s=first,
                other_session_answer_ok=answer == q["expected"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-batch", type=int, default=BatchLimits.max_batch, help="the batched run's batch size")
    args = parser.parse_args()
    from bench.common import checkpoint
    from bench.server import App
    from metis.ui import build_demo

    model, _ = checkpoint(args.model)
    engine = Engine.load(model)  # the reference answers, and the in-process Stop check
    reports = {}
    for max_batch in (1, args.max_batch):
        with App(model, app_args=("--max-batch", str(max_batch))) as app:
            reports[f"max_batch_{max_batch}"] = run(app.url, engine, args.sessions, args.turns)
    serial, batched = reports["max_batch_1"], reports[f"max_batch_{args.max_batch}"]
    reports["wall_ratio"] = round(batched["wall_s"] / serial["wall_s"], 3)  # target <= 1/3
    reports["p95_ratio"] = round(batched["latency_p95_s"] / serial["latency_p95_s"], 3)  # target <= 1/2
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=engine.concurrency)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        reports["stop"] = stop_frees_the_slot(demo.local_url, engine)
    finally:
        demo.close()
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
