"""Through the server: what a `gradio_client` sees from the launched app versus the engine itself.

The app (`app.py`, its real wiring and queue) runs in its own process on 127.0.0.1, so the HTTP
and event-stream path, the UI's event folding and the process boundary are all in the measured
path. Both sides produce exactly the same fixed number of tokens; time to first token counts
from the request to the first streamed update (the app yields once the router has chosen, i.e.
at the first token), and tokens/s counts after it, like `GenerationStats.tokens_per_s`. CPU
seconds per request (the app process versus this process's engine call) show how much of a gap
is work the server adds rather than cores lost to other processes.

`python -m bench.server PORT MODEL NEW_TOKENS [APP ARGS...]` is the app process itself (internal;
NEW_TOKENS 0 leaves answers their natural length).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradio_client import Client, handle_file

from metis.serving.engine import Engine, GenerationSettings
from metis.streaming import Done, Routed

from .common import Row, fixed_length, interleave, ratio, sample_messages, verdict

TARGET = 0.90
ROOT = Path(__file__).resolve().parent.parent


class App:
    """The app in a child process, for the length of a `with` block."""

    def __init__(self, model: str, new_tokens: int = 0, start_timeout: float = 180.0, app_args: tuple[str, ...] = ()):
        self.model, self.new_tokens, self.start_timeout = model, new_tokens, start_timeout
        self.app_args = app_args

    def __enter__(self) -> App:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-app-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.server", str(self.port), self.model, str(self.new_tokens), *self.app_args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}/"
        try:
            self.client = self._connect()
        except BaseException:
            self._stop()
            raise
        return self

    def _connect(self) -> Client:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited with {self.process.returncode}; log: {self.log.name}")
            try:
                return Client(self.url, verbose=False)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return round(int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) / 1024, 1)

    def cpu_seconds(self) -> float:
        """User + system CPU of the app process so far (clock-tick resolution, usually 10 ms)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, exc_type, *_):
        self.client.close()
        self._stop()
        if exc_type is None:  # the log is kept only when something went wrong
            os.unlink(self.log.name)

    def _stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def _via_client(app: App, image: str, question: str) -> tuple[float, float, float]:
    """(time to first update, decode tokens/s, app process CPU seconds) of one `/chat` request."""
    cpu = app.cpu_seconds()
    start = time.perf_counter()
    job = app.client.submit(message={"text": question, "files": [handle_file(image)]}, mode="auto",
                            max_new_tokens=app.new_tokens, api_name="/chat")
    times = [time.perf_counter() for _ in job]
    return times[0] - start, (app.new_tokens - 1) / (times[-1] - times[0]), app.cpu_seconds() - cpu


def _direct(engine: Engine, messages, new_tokens: int) -> tuple[float, float, float]:
    """Same three numbers for `engine.stream` in this process, timed at the same points."""
    cpu, start = time.process_time(), time.perf_counter()
    first = None
    for event in engine.stream(messages, GenerationSettings(max_new_tokens=new_tokens)):
        if isinstance(event, Routed):
            first = time.perf_counter()
        elif isinstance(event, Done):
            assert event.stats.tokens == new_tokens, "the engine did not produce the fixed length"
            return first - start, (new_tokens - 1) / (time.perf_counter() - first), time.process_time() - cpu
    raise RuntimeError("the engine stream ended without Done")


def run(engine: Engine, app: App, quick: bool) -> dict:
    messages = sample_messages()
    with tempfile.TemporaryDirectory(prefix="bench-img-") as folder, fixed_length(engine.model, app.new_tokens):
        image = Path(folder) / "question.png"  # what a user uploads
        messages[0].images[0].save(image)
        cases = {"gradio_client": lambda: _via_client(app, str(image), messages[0].text),
                 "engine": lambda: _direct(engine, messages, app.new_tokens)}
        medians = interleave(cases, repeats=5 if quick else 11)
    ttft, rate, cpu = ({name: m[i] for name, m in medians.items()} for i in range(3))
    return dict(
        new_tokens=app.new_tokens,
        ttft_ms={k: round(v * 1e3, 1) for k, v in ttft.items()},
        tokens_per_s={k: round(v, 1) for k, v in rate.items()},
        ratio=ratio(rate["gradio_client"], rate["engine"]),
        cpu_s_per_request={k: round(v, 3) for k, v in cpu.items()},
        cpu_ratio=ratio(cpu["engine"], cpu["gradio_client"]),
        target=TARGET,
    )


def serve(port: int, model: str, new_tokens: int, app_args: list[str]) -> None:
    """Start `app.py` as deployed, forced to fixed-length answers for a fair comparison (unless
    `new_tokens` is 0)."""
    sys.argv = ["app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port), *app_args]
    sys.path.insert(0, str(ROOT))
    import app  # noqa: PLC0415  (the app loads its model at import)

    with fixed_length(app.engine.model, new_tokens) if new_tokens else contextlib.nullcontext():
        app.demo.launch(server_name="127.0.0.1", server_port=port)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:])


def rows(s: dict) -> list[Row]:
    tps, ttft = s["tokens_per_s"], s["ttft_ms"]
    return [("Server: gradio_client / engine decode tokens/s",
             f"{s['ratio']:.3f} ({tps['gradio_client']:.0f} vs {tps['engine']:.0f} tok/s; TTFT "
             f"{ttft['gradio_client']:.0f} vs {ttft['engine']:.0f} ms; "
             f"engine CPU/request {s['cpu_ratio']:.2f}× the app's)",
             "≥ 0.90", verdict(s["ratio"] >= TARGET))]
