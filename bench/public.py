"""A public Space against one hostile client (issue 24), over Gradio's documented HTTP API
(`POST /gradio_api/call/<name>`, then its event stream), on loopback, against `python app.py` in
its own process, as deployed. Each client is an X-Forwarded-For address, as behind the Spaces
proxy (metis/ui/gate.py).

- flood: one client posts 400 `/chat` requests (think, 256 tokens) as fast as 8 threads can; 1 s
  after the flood starts another user asks a short question. Its answer time, against the same
  question alone; how many of the flood were accepted and refused.
- routing flood: a thinking answer streamed alone, during 8 clients calling `/route` in a loop,
  and during the same 8 threads calling `/gradio_api/info` (a cheap endpoint): the ratio of the
  two is the routing calls' own cost to the answer.
- every request's last event is kept: none may end with `{"error": null}`.

    python -m bench.public [--root DIR] [--rounds 3] [--json OUT]

`--root` runs another checkout's app.py with this same script (how BENCHMARKS.md's "before"
numbers were taken: `git worktree add /tmp/before <commit>`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "assets" / "examples" / "shapes-reasoning-2.png"
SHORT = "How many circles are there?"
THINK = "How many more circles than squares are there?"


class Api:
    """One client of the HTTP API, named by its X-Forwarded-For address."""

    def __init__(self, url: str, client: str, timeout: float = 300.0):
        self.http = httpx.Client(base_url=url.rstrip("/") + "/gradio_api", timeout=timeout,
                                 headers={"x-forwarded-for": client})

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            uploaded = self.http.post("/upload", files={"files": (path.name, f, "image/png")}).json()[0]
        return {"path": uploaded, "meta": {"_type": "gradio.FileData"}}

    def post(self, name: str, data: list) -> httpx.Response:
        return self.http.post(f"/call/{name}", json={"data": data})

    def events(self, name: str, event_id: str) -> tuple[str, object]:
        """Read the event stream to its end: (last event, its data)."""
        event, data = None, None
        with self.http.stream("GET", f"/call/{name}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("generating", "complete", "error"):
                    data = json.loads(line[5:])
        return event, data

    def ask(self, name: str, data: list) -> tuple[float, str, object]:
        """(seconds, last event, its data); a refusal is ("refused", its detail), a stream the
        server dropped ("lost", why)."""
        start = time.perf_counter()
        try:
            response = self.post(name, data)
            if response.status_code != 200:
                return time.perf_counter() - start, "refused", response.json().get("detail")
            event, out = self.events(name, response.json()["event_id"])
        except httpx.HTTPError as exc:
            event, out = "lost", f"{type(exc).__name__}: {exc}"
        return time.perf_counter() - start, event, out


def chat(message: dict, mode: str, max_new_tokens: int = 1024) -> list:
    """Every `/chat` parameter, so that an app without defaults over raw HTTP runs it too."""
    return [message, mode, None, 0, max_new_tokens, 0, 1]


def null_errors(outcomes) -> int:
    """Requests that ended with `{"error": null}`: an error nobody can read."""
    return sum(event == "error" and (data is None or (isinstance(data, dict) and data.get("error") is None))
               for event, data in outcomes)


def flood(url: str, message: dict, requests: int = 400, threads: int = 8) -> dict:
    """One client's `requests` think answers posted at once; another user asks 1 s after the start."""
    posted: list[httpx.Response] = []
    clients = [Api(url, "198.51.100.66") for _ in range(threads)]

    def post(i: int) -> None:
        posted.append(clients[i % threads].post("chat", chat(message, "think", 256)))

    start = time.perf_counter()
    pool = ThreadPoolExecutor(threads)
    futures = [pool.submit(post, i) for i in range(requests)]
    time.sleep(max(0.0, 1.0 - (time.perf_counter() - start)))
    other = Api(url, "198.51.100.7")
    seconds, event, data = other.ask("chat", chat({"text": SHORT, "files": message["files"]}, "direct"))
    for f in futures:
        f.result()
    pool.shutdown()
    accepted = [r.json()["event_id"] for r in posted if r.status_code == 200]
    refusals = [r.json().get("detail") for r in posted if r.status_code != 200]
    with ThreadPoolExecutor(threads) as readers:  # every accepted request read to its end
        ends = list(readers.map(lambda e: clients[0].events("chat", e), accepted))
    return dict(other_answer_s=round(seconds, 3), other_answer_event=event, accepted=len(accepted),
                refused=len(refusals), refusal=refusals[0] if refusals else None,
                null_errors=null_errors([*ends, (event, data)]))


def stream_during(url: str, message: dict, load: str | None, threads: int = 8) -> tuple[float, str, int, list]:
    """A thinking answer's time while `threads` clients call `load` ("route", "info" or None) in
    a loop; (seconds, its last event, calls made meanwhile, every outcome)."""
    done = threading.Event()
    outcomes: list[tuple[str, object]] = []

    def loader(i: int) -> None:
        api = Api(url, f"192.0.2.{10 + i}")
        for _ in range(100_000):  # bounded: ends with the answer
            if done.is_set():
                return
            if load == "route":
                outcomes.append(api.ask("route", [message, "auto", None])[1:])
            else:
                api.http.get("/info")
                outcomes.append(("complete", "info"))

    pool = [threading.Thread(target=loader, args=(i,)) for i in range(threads if load else 0)]
    for t in pool:
        t.start()
    time.sleep(0.5 if load else 0)  # the flood is under way
    seconds, event, data = Api(url, "198.51.100.8").ask("chat", chat(message, "think"))
    done.set()
    for t in pool:
        t.join()
    return seconds, event, len(outcomes), [*outcomes, (event, data)]


def routing_flood(url: str, message: dict, rounds: int) -> dict:
    """Alone, during a routing flood and during a cheap-endpoint flood, alternated `rounds` times."""
    times: dict[str, list[float]] = {"alone": [], "route": [], "info": []}
    calls: dict[str, int] = {"route": 0, "info": 0}
    outcomes, lost = [], []
    for _ in range(rounds):
        for load in ("alone", "route", "info"):
            seconds, event, n, ends = stream_during(url, message, None if load == "alone" else load)
            times[load].append(seconds)
            if event != "complete":
                lost.append(f"{load}: {event} after {seconds:.1f} s ({n} calls meanwhile)")
            if load != "alone":
                calls[load] += n
            outcomes += ends
    median = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return dict(answer_s=median, answer_s_all={k: [round(x, 3) for x in v] for k, v in times.items()},
                route_vs_info=round(median["route"] / median["info"], 2), calls=calls, unfinished=lost,
                null_errors=null_errors(outcomes))


def launch(root: Path, port: int, log: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(root), GRADIO_ANALYTICS_ENABLED="False")
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the app's lifetime)
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=root, env=env,
                           stdout=out, stderr=subprocess.STDOUT)
    for _ in range(600):  # bounded: up to 5 minutes to load
        try:
            if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        if app.poll() is not None:
            raise RuntimeError(f"{root}/app.py exited with {app.returncode}")
        time.sleep(0.5)
    app.kill()
    raise RuntimeError("the app did not come up")


def run(root: Path, rounds: int, port: int = 7871, log: Path | None = None) -> dict:
    app = launch(root, port, log)
    url = f"http://127.0.0.1:{port}/"
    try:
        message = {"text": THINK, "files": [Api(url, "198.51.100.1").upload(IMAGE)]}
        alone = Api(url, "198.51.100.7")
        short = chat({"text": SHORT, "files": message["files"]}, "direct")
        alone.ask("chat", short)  # warm up
        short_alone = statistics.median(alone.ask("chat", short)[0] for _ in range(5))
        raw = alone.ask("chat", [{"text": SHORT, "files": []}])  # only `message`, over raw HTTP
        report = dict(root=str(root), short_answer_alone_s=round(short_alone, 3),
                      raw_http_message_only=dict(event=raw[1], error=raw[2] if raw[1] != "complete" else None),
                      routing=routing_flood(url, message, rounds), flood=flood(url, message))
        report["null_errors"] = (report["routing"]["null_errors"] + report["flood"]["null_errors"]
                                 + null_errors([raw[1:]]))
        return report
    finally:
        app.terminate()
        app.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose app.py to run (default: this one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--app-log", type=Path, help="where the app's own output goes (default: nowhere)")
    args = parser.parse_args(argv)
    report = run(args.root.resolve(), args.rounds, log=args.app_log)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
