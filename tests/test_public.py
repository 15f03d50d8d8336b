"""A public server against one hostile client (issue 24), over the real HTTP API of a launched app:
per-client and global bounds, routing floods against a streaming answer, raw HTTP calls with
the documented defaults, and the page's own events kept off the API.

No assertion depends on timing: the model slot is held while requests pile up, so what is waiting
is known exactly, and floods are bounded loops that end with the answer they flood.
"""

import threading

import pytest
from test_app import free_port

from bench.public import Api
from metis.ui import build_demo
from metis.ui.gate import PublicLimits, client_of, serve

PER_CLIENT = 3
QUESTION = {"text": "How many circles are there?", "files": []}


def launch(engine, limits: PublicLimits, concurrency: int, finetune: bool = True):
    demo = serve(build_demo(engine, finetune=finetune), limits, concurrency)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo


@pytest.fixture(scope="module")
def app(engine):
    demo = launch(engine, PublicLimits(per_client=PER_CLIENT), engine.concurrency)
    yield demo
    demo.close()


def wait_until(condition, rounds: int = 30_000) -> None:
    """A bounded wait for the server to reach a state (never an assertion on timing)."""
    import time

    for _ in range(rounds):
        if condition():
            return
        time.sleep(0.002)
    raise AssertionError("the server never got there")


def cancel(api: Api, demo, event_id: str) -> None:
    """What a closed tab or gradio_client's cancel does: the answer stops at the next step."""
    fn_index = next(fn._id for fn in demo.fns.values() if fn.api_name == "chat")
    api.http.post("/cancel", json={"session_hash": event_id, "fn_index": fn_index, "event_id": event_id})


@pytest.mark.parametrize("peer, forwarded, client", [
    ("127.0.0.1", None, "127.0.0.1"),  # no proxy
    ("10.16.3.80", "198.51.100.9", "198.51.100.9"),  # behind the Spaces proxy (a private peer)
    ("10.16.3.80", "6.6.6.6, 198.51.100.9", "198.51.100.9"),  # a caller's own header stays to the left
    ("8.8.4.4", "198.51.100.9", "8.8.4.4"),  # a public peer is the client: its header is not trusted
])
def test_a_client_is_the_address_the_nearest_proxy_saw(peer, forwarded, client):
    from starlette.requests import Request

    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    request = Request({"type": "http", "client": (peer, 1234), "headers": headers})
    assert client_of(request) == client


def test_only_chat_and_route_are_api_endpoints(app, engine):
    api = Api(app.local_url, "203.0.113.1")
    assert set(api.http.get("/info").json()["named_endpoints"]) == {"/chat", "/route"}
    for name in ("start", "enqueue", "cancel", "use_in_chat"):  # the fine-tuning tab's events
        refused = api.post(name, [])
        assert refused.status_code == 400 and f"/{name} is not an API endpoint" in refused.json()["detail"]
    skip = api.http.post("/run/chat", json={"data": [QUESTION, "direct", 0.5, 0, 4, 0, 1]})
    assert skip.status_code == 404  # no way around the queue and its limits
    off = build_demo(engine, finetune=False)
    assert "Fine-tune router" not in str(off.config) and "Fine-tune router" in str(app.config)


def test_raw_http_calls_get_the_documented_defaults_and_named_refusals(app):
    api = Api(app.local_url, "203.0.113.2")
    event, trace = api.ask("route", [QUESTION])[1:]
    assert event == "complete" and trace[0]["mode"] == "auto" and trace[0]["threshold"] == 0.5
    event, messages = api.ask("chat", [QUESTION, "direct", 0.5, 0, 4])[1:]  # temperature, top_p left out
    assert event == "complete" and messages[0][-1]["role"] == "assistant"
    event, detail = api.ask("chat", [QUESTION, "direct", 0.5, 0, 4, 0, 1, "surplus"])[1:]
    assert event == "refused" and "/chat takes 7 parameters" in detail and "after top_p" in detail
    assert api.ask("chat", [])[1:] == ("refused", "/chat needs message")
    event, error = api.ask("chat", [QUESTION, "sideways"])[1:]  # a bad value: named by the handler
    assert event == "error" and "mode must be one of" in error["error"]


def test_a_flood_from_one_client_is_refused_and_another_client_keeps_its_place(app, engine):
    """While the model is held, one client floods: exactly PER_CLIENT of its requests are taken,
    every other one is refused at once with a message naming the limit. Another client's short
    answer, asked after the flood, shares the next batch and ends while the flood's answers are
    still running."""
    flooder, other = Api(app.local_url, "203.0.113.3"), Api(app.local_url, "203.0.113.4")
    with engine.slot.hold():
        posted = [flooder.post("chat", [QUESTION, "think", 0.5, 0, 16384]) for _ in range(20)]
        accepted = [r.json()["event_id"] for r in posted if r.status_code == 200]
        refusals = [r.json()["detail"] for r in posted if r.status_code != 200]
        mine = other.post("chat", [QUESTION, "think", 0.5, 0, 4])
        assert mine.status_code == 200
        wait_until(lambda: engine.scheduler.waiting() == PER_CLIENT + 1)
    assert len(accepted) == PER_CLIENT and len(refusals) == 20 - PER_CLIENT
    assert all(f"at most {PER_CLIENT} may wait or run" in r for r in refusals)
    event, _ = other.events("chat", mine.json()["event_id"])
    assert event == "complete"
    assert flooder.post("chat", [QUESTION]).status_code == 503  # its answers are still running
    for event_id in accepted:
        cancel(flooder, app, event_id)
    assert engine.scheduler.idle(timeout=120)


def test_a_full_queue_says_the_server_is_busy(engine):
    demo = launch(engine, PublicLimits(per_client=PER_CLIENT, queue_size=2), concurrency=1)
    try:
        with engine.slot.hold():
            outcomes = [Api(demo.local_url, f"198.51.100.{i}").post("chat", [QUESTION, "direct", 0.5, 0, 1])
                        for i in range(8)]  # 8 clients: the per-client limit plays no part
        refused = [r.json()["detail"] for r in outcomes if r.status_code != 200]
        assert 2 <= 8 - len(refused) <= 3  # one running (concurrency 1), two waiting
        assert all(r.startswith("The server is busy") and "Try again" in r for r in refused)
        api = Api(demo.local_url, "198.51.100.1")
        for r in outcomes:
            if r.status_code == 200:
                assert api.events("chat", r.json()["event_id"])[0] == "complete"
    finally:
        demo.close()


def test_a_routing_flood_cannot_starve_a_streaming_answer(app, engine):
    """Four clients call /route in a loop while a 200-token answer streams: the answer ends
    while they still flood, and at most one routing turn ran per decode step."""
    done = threading.Event()
    routed, ends = [], []

    def flood(i: int) -> None:
        api = Api(app.local_url, f"192.0.2.{i}")
        for _ in range(5_000):  # bounded; ends with the answer
            if done.is_set():
                return
            routed.append(api.ask("route", [QUESTION])[1])
        ends.append(i)  # ran out before the answer ended

    floods = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
    for t in floods:
        t.start()
    wait_until(lambda: len(routed) >= 4)
    turns = engine.slot.turns
    event = Api(app.local_url, "203.0.113.5").ask("chat", [QUESTION, "think", 0.5, 0, 200])[1]
    granted = engine.slot.turns - turns
    done.set()
    for t in floods:
        t.join()
    assert event == "complete" and not ends
    assert granted <= 200 + 1  # one turn per step at most (plus the prefill's)
    assert set(routed) == {"complete"}
