"""The remote backend against real `transformers serve` processes serving the exported tiny experts,
compared with the local engine; a small mock server adds the failures a real one will not produce
on demand (5xx, a stalled answer, an error mid-stream, a retried 503)."""

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from deploy.transformers_serve import stock_servers
from metis.export import export_experts
from metis.prompting import Message
from metis.serving.engine import Engine, GenerationSettings
from metis.serving.remote import ClientPolicy, RemoteEngine
from metis.streaming import AnswerDelta, Done, Failed, ReasoningDelta, Routed
from metis.tiny import world
from metis.ui.model_tab import info_markdown
from metis.ui.runtime import Runner

ROOT = Path(__file__).resolve().parent.parent
GREEDY = GenerationSettings(max_new_tokens=96)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    export_experts("tiny", out)
    return out


@pytest.fixture(scope="module")
def servers(exported):
    with stock_servers(exported / "think", exported / "direct") as (think, direct):
        yield {"think": think.url, "direct": direct.url}


@pytest.fixture(scope="module")
def local():
    return Engine.load("tiny")


@pytest.fixture(scope="module")
def remote(exported, servers):
    return RemoteEngine.load(str(exported / "router"), servers["think"], servers["direct"])


def question(sample) -> list[Message]:
    return [Message("user", sample.question, [sample.image])]


def thinking_sample(local):
    return next(s for s in world.generate("test", 20) if local.route(question(s)).decision == "think")


def test_remote_answers_like_the_local_engine_through_real_servers(local, remote):
    samples = world.generate("test", 40)
    same_answer = same_route = 0
    for sample in samples:
        want, got = local.run(question(sample), GREEDY), remote.run(question(sample), GREEDY)
        assert got.error is None, got.error
        same_route += got.trace.decision == want.trace.decision
        same_answer += (got.answer, got.reasoning) == (want.answer, want.reasoning)
    assert same_route == len(samples)
    assert same_answer >= 0.95 * len(samples), f"{same_answer}/{len(samples)} identical answers"


def test_reasoning_and_answer_arrive_as_the_local_engines_events(local, remote):
    messages = question(thinking_sample(local))
    events = list(remote.stream(messages, GREEDY))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "Routed" and kinds[-1] == "Done"
    assert kinds.index("AnswerDelta") > kinds.index("ReasoningDelta")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == local.run(messages, GREEDY).reasoning
    stats = events[-1].stats
    assert stats.stop_reason in ("eos", "end_of_answer") and stats.tokens > stats.thinking_tokens > 0


def test_text_only_and_follow_up_questions(local, remote):
    sample = world.generate("test", 1)[0]
    history = question(sample) + [Message("assistant", "<think>x</think><answer>2</answer>"),
                                  Message("user", "How many shapes are there?")]
    for messages in ([Message("user", sample.question)], history):
        want, got = local.run(messages, GREEDY), remote.run(messages, GREEDY)
        assert got.error is None and got.trace.decision == want.trace.decision
        assert got.answer == want.answer


def test_stop_closes_the_stream_and_the_server_carries_on(local, remote):
    messages = question(thinking_sample(local))
    cancel = threading.Event()
    events = []
    for event in remote.stream(messages, GREEDY, cancel=cancel):
        events.append(event)
        if isinstance(event, ReasoningDelta):
            cancel.set()
    assert isinstance(events[-1], Done) and events[-1].stats.stop_reason == "cancelled"
    assert not any(isinstance(e, AnswerDelta) for e in events)
    stream = remote.stream(messages, GREEDY)  # closing the generator (the UI's Stop) also ends it
    assert isinstance(next(stream), Routed) and isinstance(next(stream), ReasoningDelta)
    stream.close()
    assert remote.run(messages, GREEDY).answer == local.run(messages, GREEDY).answer


def test_unreachable_and_refusing_servers_become_chat_messages(exported, servers, remote):
    router = str(exported / "router")
    messages = [Message("user", "How many shapes are there?")]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    fast = ClientPolicy(retries=0)
    for mode in ("think", "direct"):
        urls = {**servers, mode: down}
        result = RemoteEngine.load(router, urls["think"], urls["direct"], policy=fast).run(
            messages, GenerationSettings(mode=mode))
        assert f"The {mode} expert's server ({down}) cannot be reached" in result.error
    wrong_name = RemoteEngine.load(router, servers["think"], servers["direct"], direct_model="no-such-model")
    result = wrong_name.run(messages, GenerationSettings(mode="direct"))
    assert "refused the request (HTTP 400)" in result.error and "pinned" in result.error
    turn = list(Runner(wrong_name).answer(messages, GenerationSettings(mode="direct")))[-1]
    assert "HTTP 400" in turn.error  # the chat shows it as an error message
    assert remote.run(messages, GenerationSettings(mode="direct")).error is None  # the servers are fine


def test_settings_the_remote_backend_cannot_honour_are_refused_with_a_reason(remote):
    messages = [Message("user", "How many shapes are there?")]
    with pytest.raises(ValueError, match="one expert per query"):
        remote.route(messages, mode="token")
    with pytest.raises(ValueError, match="thinking budget"):
        list(remote.stream(messages, GenerationSettings(thinking_budget=8)))


# -- a mock server for the failures a healthy server does not produce ---------------------------

def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def chunk(finish=None, **delta) -> dict:
    return {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class MockPool(BaseHTTPRequestHandler):
    """Behaviour by the first path segment: /500, /stall, /error-midway, /503-once, /tags-in-content."""

    release = threading.Event()
    calls: dict[str, int] = {}

    def do_POST(self):
        kind = self.path.split("/")[1]
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if kind == "stall":
            self.release.wait()
            return
        if kind == "500" or (kind == "503-once" and self.calls[kind] == 1):
            status = 500 if kind == "500" else 503
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"detail": "CUDA out of memory"}).encode())
            return
        body = {
            "error-midway": sse(chunk(reasoning_content="let me"), {"error": {"message": "worker died"}}),
            "503-once": sse(chunk(reasoning="newer vLLM field"), chunk(content="<answer>4</answer>"), chunk("stop")),
            "tags-in-content": sse(chunk(content="<think>count"), chunk(content=" them</think><answer>"),
                                   chunk(content="4</answer>"), chunk("stop")),
        }[kind]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def mock_pool():
    server = ThreadingHTTPServer(("127.0.0.1", 0), MockPool)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    MockPool.release.set()
    server.shutdown()


@pytest.mark.parametrize("kind, expect", [
    ("500", "failed (HTTP 500): CUDA out of memory"),
    ("stall", "did not answer within 1 s"),
    ("error-midway", "reported an error: worker died"),
])
def test_server_failures_end_the_answer_with_a_message(exported, mock_pool, kind, expect):
    url = f"{mock_pool}/{kind}/v1"
    engine = RemoteEngine.load(str(exported / "router"), url, url, "m", "m", policy=ClientPolicy(read_s=1, retries=0))
    events = list(engine.stream([Message("user", "Count the shapes.")], GenerationSettings(mode="think")))
    assert isinstance(events[-1], Failed) and expect in events[-1].message
    assert events[-1].stats.stop_reason == "error"


@pytest.mark.parametrize("kind", ["503-once", "tags-in-content"])
def test_retry_before_streaming_and_either_place_of_the_reasoning(exported, mock_pool, kind):
    url = f"{mock_pool}/{kind}/v1"
    engine = RemoteEngine.load(str(exported / "router"), url, url, "m", "m",
                               policy=ClientPolicy(retries=1, read_s=30))
    result = engine.run([Message("user", "Count the shapes.")], GenerationSettings(mode="think"))
    assert result.error is None and result.answer == "4" and result.reasoning
    assert result.stats.stop_reason == "end_of_answer"


# -- the app, started with the remote flags -----------------------------------------------------

def test_app_started_with_remote_flags_serves_chat_and_route(exported, servers, local):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--router", str(exported / "router"),
                            "--think-url", servers["think"], "--direct-url", servers["direct"]], cwd=ROOT)
    try:
        client = connect(f"http://127.0.0.1:{port}/", app)
        sample = world.generate("test", 1)[0]
        image = exported / "question.png"
        sample.image.save(image)
        message = {"text": sample.question, "files": [handle_file(str(image))]}
        trace = client.predict(message, api_name="/route")
        assert trace["decision"] == local.route(question(sample)).decision
        messages = client.predict(message, "auto", api_name="/chat")
        expected = local.run(question(sample), GenerationSettings(max_new_tokens=1024)).answer
        assert expected in str(messages[-1]["content"])
        client.close()
    finally:
        app.terminate()
        app.wait(timeout=30)


def connect(url: str, process: subprocess.Popen) -> Client:
    deadline = time.monotonic() + 900
    while True:
        assert process.poll() is None, f"the app exited with {process.returncode}"
        try:
            return Client(url, verbose=False)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_model_tab_names_the_backend(remote, local):
    assert "remote" in info_markdown(remote.info.to_dict()) and "/v1" in info_markdown(remote.info.to_dict())
    assert "local: the whole MoE in this process" in info_markdown(local.info.to_dict())


def test_fine_tuning_reads_the_in_process_router_and_refuses_a_full_checkpoint(remote):
    """The router that decides is here, so features (and a router trained on them) work; the
    experts are not, so baking a full checkpoint is refused with the way to do it."""
    from metis.finetune.data import Example
    from metis.finetune.features import extract_features

    examples = [Example(f"Name the shape ({i}).", (), "direct" if i % 2 else "think", i) for i in range(3)]
    features = extract_features(remote, examples)
    assert features.inputs.shape[:2] == (3, 1) and len(features.router) == 1  # the first MoE layer decides
    remote.check_router(features.router)
    with pytest.raises(NotImplementedError, match="holds only the router"):
        remote.save_model(features.router, "out")
