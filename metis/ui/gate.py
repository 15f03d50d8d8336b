"""What may join the queue on a public server: a few requests per client, a bounded queue, and
the API's raw HTTP calls completed with their documented defaults.

Every queued request passes `Queue.push` (the page's `/queue/join`, the API's `/call/<name>`,
gradio_client's calls), so the checks wrap that one method (Gradio 6.31). Counting a client's
requests from the queue's own record of its events (`event_ids_to_events`: from push until the
event ends or leaves the queue) keeps no state of our own that could leak when a request ends in
an unexpected way.
"""

from __future__ import annotations

import copy
import ipaddress

import gradio as gr
from gradio import route_utils

from ..settings import PublicLimits
from .values import ValueProblem

# parameters that must be sent even though Gradio reports a default (an empty message asks nothing)
REQUIRED = frozenset({"message"})


def client_of(request) -> str:
    """Who sent a request, by address. Gradio's `gr.Request.client.host` is the connection's peer
    as uvicorn reports it; uvicorn replaces it with the X-Forwarded-For address only for peers it
    trusts (`FORWARDED_ALLOW_IPS`, default loopback). Behind the Spaces proxy the peer is the
    proxy's private address, so when the peer is not a public address, the client is the last
    X-Forwarded-For entry: the address the nearest proxy saw, which a caller cannot forge (what a
    caller writes into the header itself stays to the left of it)."""
    host = request.client.host if request.client else ""
    forwarded = ",".join(request.headers.getlist("x-forwarded-for")).split(",")[-1].strip()
    return forwarded if forwarded and not _is_public(host) else host


def _is_public(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return False


def api_arguments(fn, parameters: list[dict], data: list) -> list:
    """A raw `/call/<name>` body's positional values -> a value for every input of `fn`. Missing
    trailing parameters get their documented defaults (what gradio_client fills in); surplus
    values and missing required parameters are refused by name. Gradio itself would fail on the
    count with an error it does not show (`{"error": null}`)."""
    skip = [block.skip_api for block in fn.inputs]
    if len(data) == len(skip) and any(skip) and all(v is None for v, s in zip(data, skip) if s):
        data = [v for v, s in zip(data, skip) if not s]  # Gradio has already spread them around the State
    names = [p["parameter_name"] for p in parameters]
    if len(data) > len(names):
        raise ValueProblem(f"/{fn.api_name} takes {len(names)} parameters ({', '.join(names)}); the "
                           f"{len(data) - len(names)} value(s) after {names[-1]} have no parameter")
    rest = parameters[len(data):]
    missing = [p["parameter_name"] for p in rest if p["parameter_name"] in REQUIRED or not p["parameter_has_default"]]
    if missing:
        raise ValueProblem(f"/{fn.api_name} needs {', '.join(missing)}")
    values = iter([*data, *(copy.deepcopy(p["parameter_default"]) for p in rest)])
    return [None if s else next(values) for s in skip]


def serve(demo: gr.Blocks, limits: PublicLimits, concurrency: int) -> gr.Blocks:
    """Enable the queue (`concurrency` requests run at once) and guard its entrance. `api_open`
    False (Gradio's default on a Space, not elsewhere): no queued event can be run by a direct
    POST that skips the queue."""
    demo.queue(default_concurrency_limit=concurrency, max_size=limits.queue_size, api_open=False)
    # the public endpoints' parameters, defaults included, as the API page documents them
    parameters = {name: info["parameters"] for name, info in demo.get_api_info()["named_endpoints"].items()}
    queue = demo._queue
    push = queue.push

    async def guarded_push(body, request, username):
        if body.fn_index is None:
            return await push(body, request, username)  # Gradio's own refusal
        fn = route_utils.get_fn(demo, None, body)
        if body.simple_format:  # `/call/<name>`: the documented HTTP API
            if f"/{fn.api_name}" not in parameters:  # the page's own events: private
                return False, f"/{fn.api_name} is not an API endpoint; the API is {', '.join(parameters)}", "error"
            try:
                body.data = api_arguments(fn, parameters[f"/{fn.api_name}"], body.data)
            except ValueProblem as exc:
                return False, str(exc), "error"
        client = client_of(request)
        if sum(client_of(e.request) == client for e in list(queue.event_ids_to_events.values())) >= limits.per_client:
            return False, (f"Too many requests from your address: at most {limits.per_client} may wait or run at "
                           "once. Try again when one has finished."), "queue_full"
        if len(queue) >= limits.queue_size:
            return False, f"The server is busy ({len(queue)} requests waiting). Try again in a minute.", "queue_full"
        return await push(body, request, username)

    queue.push = guarded_push
    return demo
