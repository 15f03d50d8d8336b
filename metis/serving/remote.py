"""The remote backend: Metis-HOME's own router here, the answer from one of two OpenAI-compatible pools.

request -> prompt -> route (the exported router, in process: the full model's decision) -> the
chosen expert's `/v1/chat/completions` (stream=True, images as data URLs) -> `reasoning_content`
and `content` deltas -> the same events as the local engine (streaming.py). It implements the
serving interface (interface.py), so the UI, the HTTP API and the CLI do not know which one serves.

Servers differ in where the reasoning arrives: vLLM with `--reasoning-parser deepseek_r1` and
`transformers serve` move `<think>…</think>` into `reasoning_content` (newer vLLM: `reasoning`);
a server without a parser leaves the tags in `content`. Both end up as the same events.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import openai

from ..export import load_router
from ..finetune.data import Example
from ..finetune.features import Features
from ..prompting import Message, strip_reasoning
from ..routing import RouterWeights, RoutingTrace
from ..streaming import (
    Done,
    Event,
    Failed,
    GenerationStats,
    OutputParser,
    Progress,
    ReasoningDelta,
    Routed,
)
from .engine import Engine
from .interface import Answer, GenerationSettings, ModelDescription, collect

REASONING_FIELDS = ("reasoning_content", "reasoning")  # vLLM renamed the first to the second


@dataclass(frozen=True)
class Endpoint:
    """One expert's pool: an OpenAI-compatible base URL (ending in /v1) and the served model name
    (None: the first model the server lists, asked once)."""

    url: str
    model: str | None = None
    api_key: str = "EMPTY"  # vLLM and `transformers serve` accept any key unless started with one


@dataclass(frozen=True)
class ClientPolicy:
    """How long to wait and how often to retry, chosen for an interactive chat.

    connect_s: a pool that does not accept a connection in this time is down; say so quickly.
    read_s: the longest silence allowed between two streamed chunks (and before the first one,
        which includes the server's prefill and its queue); past it the answer fails with a
        message instead of hanging the chat.
    retries: attempts after the first, with the client's exponential backoff, for connection
        errors, 408/409/429 and 5xx answers *before* streaming starts (a replica restarting behind
        a load balancer); a stream that breaks midway is reported, never replayed.
    """

    connect_s: float = 5.0
    read_s: float = 120.0
    write_s: float = 30.0  # request upload, images included
    retries: int = 2

    def timeout(self) -> openai.Timeout:
        return openai.Timeout(connect=self.connect_s, read=self.read_s, write=self.write_s, pool=self.connect_s)


@dataclass(frozen=True)
class RemoteInfo:
    """What the Model tab shows for this backend."""

    backend: str
    router: str
    think_endpoint: str
    direct_endpoint: str
    routing: str
    params_router: int
    timeouts: str

    def to_dict(self) -> dict:
        return asdict(self)


class RemoteEngine:
    """Routes with the router export, then streams the answer from the chosen expert's server."""

    concurrency = 32  # answers streamed at once: each waits on HTTP only, the pools batch their own
    available, error = True, None

    def __init__(self, local: Engine, think: Endpoint, direct: Endpoint, policy: ClientPolicy | None = None,
                 router_path: str = "router"):
        self.local = local  # the router export in this process: routes, never answers
        self.prompts = local.prompts  # the system prompt the router saw goes to the servers too
        self.endpoints = {"think": think, "direct": direct}
        self.policy = policy or ClientPolicy()
        self.clients = {
            name: openai.OpenAI(base_url=e.url, api_key=e.api_key, timeout=self.policy.timeout(),
                                max_retries=self.policy.retries)
            for name, e in self.endpoints.items()
        }
        self._models = {name: e.model for name, e in self.endpoints.items()}  # filled on first use
        self.info = RemoteInfo(
            backend="remote: router in process, answers from two OpenAI-compatible servers",
            router=router_path,
            think_endpoint=self._describe(think),
            direct_endpoint=self._describe(direct),
            routing="once per query by the exported router (first MoE layer's gate), then one server answers",
            params_router=local.model.num_parameters(),
            timeouts=f"connect {self.policy.connect_s:g} s, between chunks {self.policy.read_s:g} s, "
                     f"{self.policy.retries} retries before streaming",
        )

    @classmethod
    def load(cls, router: str, think_url: str, direct_url: str, think_model: str | None = None,
             direct_model: str | None = None, policy: ClientPolicy | None = None) -> RemoteEngine:
        if not (router and think_url and direct_url):
            raise ValueError("the remote backend needs all three of --router, --think-url and --direct-url")
        return cls(Engine(load_router(router)), Endpoint(_v1(think_url), think_model),
                   Endpoint(_v1(direct_url), direct_model), policy, router_path=str(router))

    # -- the serving interface (serving/interface.py) --------------------------------------------
    @property
    def default_threshold(self) -> float:
        return self.local.default_threshold

    def describe(self) -> ModelDescription:
        """The backend and its servers; attention and limits are the servers' own, unknown here."""
        return ModelDescription(self.info.to_dict())

    def features(self, examples: list[Example], cache_dir: str | Path | None = None) -> Iterator[int | Features]:
        """The in-process router's features: its gate is the one that decides, so a router trained
        on them routes this backend's queries."""
        return self.local.features(examples, cache_dir)

    def check_router(self, router: RouterWeights) -> None:
        self.local.check_router(router)

    def save_model(self, router: RouterWeights, out: str | Path) -> Path:
        raise NotImplementedError(
            "The remote backend holds only the router, not the experts, so it cannot write a full checkpoint. "
            "Bake the router in with the local engine: python -m metis finetune --model CHECKPOINT --save-model DIR")

    def route(self, messages: list[Message], mode: str = "auto", threshold: float | None = None,
              router: RouterWeights | None = None) -> RoutingTrace:
        _check_supported(GenerationSettings(mode=mode, threshold=threshold))
        return self.local.route(messages, mode, threshold, router=router)

    def stream(self, messages: list[Message], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, router: RouterWeights | None = None) -> Iterator[Event]:
        """Events of one answer. Stop (closing this generator, or `cancel`) closes the HTTP stream,
        which is how OpenAI-compatible servers learn to stop generating."""
        settings = settings or GenerationSettings()
        _check_supported(settings)
        cancel = cancel or threading.Event()
        start = time.perf_counter()
        trace = self.local.route(messages, settings.mode, settings.threshold, router=router)
        yield Routed(trace)
        answer = _Answer(start)
        name = trace.decision
        try:
            request = self._request(name, messages, settings)
            with self.clients[name].chat.completions.create(**request) as chunks:
                for chunk in chunks:
                    yield from answer.feed(chunk)
                    if cancel.is_set():
                        answer.finish_reason = "cancelled"
                        break
        except openai.APIError as exc:
            yield from answer.parser.finish()
            yield Failed(self._explain(name, exc), answer.stats("error"))
            return
        yield from answer.parser.finish()
        if answer.finish_reason is None:
            yield Failed(f"The {name} expert's server closed the answer before finishing it.", answer.stats("error"))
        else:
            yield Done(answer.stats())

    def run(self, messages: list[Message], settings: GenerationSettings | None = None, **kwargs) -> Answer:
        return collect(self.stream(messages, settings, **kwargs))

    # -- helpers ----------------------------------------------------------------------------------
    def _request(self, name: str, messages: list[Message], settings: GenerationSettings) -> dict:
        request = dict(
            model=self._model(name),
            messages=self._chat_messages(messages),
            stream=True,
            stream_options={"include_usage": True},  # token counts in the last chunk (vLLM needs asking)
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
        )
        if settings.temperature > 0:
            request["top_p"] = settings.top_p
        if settings.seed is not None:
            request["seed"] = settings.seed
        return request

    def _chat_messages(self, messages: list[Message]) -> list[dict]:
        """The prompt the router saw, as OpenAI chat messages: the model's system prompt, images as
        PNG data URLs before the text (the order PromptBuilder uses), past answers without their
        reasoning."""
        out = []
        if self.prompts.system_prompt:
            out.append({"role": "system", "content": self.prompts.system_prompt})
        for m in messages:
            if m.role == "user":
                parts = [{"type": "image_url", "image_url": {"url": image_data_url(img)}} for img in m.images]
                out.append({"role": "user", "content": parts + [{"type": "text", "text": m.text}]})
            else:
                out.append({"role": "assistant", "content": strip_reasoning(m.text)})
        return out

    def _model(self, name: str) -> str:
        if self._models[name] is None:
            served = self.clients[name].models.list().data
            if not served:
                raise openai.APIError(f"{self.endpoints[name].url} serves no model", request=None, body=None)
            self._models[name] = served[0].id
        return self._models[name]

    def _explain(self, name: str, exc: openai.APIError) -> str:
        """One sentence a person can act on; the chat shows it and the app carries on."""
        where = f"The {name} expert's server ({self.endpoints[name].url})"
        if isinstance(exc, openai.APITimeoutError):
            return f"{where} did not answer within {self.policy.read_s:g} s. It may be overloaded; try again."
        if isinstance(exc, openai.APIConnectionError):
            return f"{where} cannot be reached: it may be down or still starting. Try again in a moment."
        if isinstance(exc, openai.APIStatusError):
            side = "refused the request" if exc.status_code < 500 else "failed"
            return f"{where} {side} (HTTP {exc.status_code}): {_detail(exc)}"
        return f"{where} reported an error: {exc.message}"

    @staticmethod
    def _describe(endpoint: Endpoint) -> str:
        return f"{endpoint.url} (model {endpoint.model or 'as the server lists it'})"


class _Answer:
    """Chunks of one streamed completion -> events, token counts and the stop reason."""

    def __init__(self, start: float):
        self.start = start
        self.parser = OutputParser()
        self.ttft: float | None = None
        self.chunks = 0
        self.thinking = 0
        self.usage_tokens: int | None = None
        self.finish_reason: str | None = None

    def feed(self, chunk) -> Iterator[Event]:
        if chunk.usage is not None:
            self.usage_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        delta = choice.delta
        extra = delta.model_extra or {}
        reasoning = next((extra[f] for f in REASONING_FIELDS if extra.get(f)), None)
        events: list[Event] = []
        if reasoning or delta.content:
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.start
            self.chunks += 1
            if reasoning:
                events.append(ReasoningDelta(reasoning))
                self.thinking += 1
            if delta.content:
                events += self.parser.feed(delta.content)
                self.thinking += self.parser.in_reasoning
            if not events:
                events.append(Progress(self.chunks))
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        yield from events

    def stats(self, reason: str | None = None) -> GenerationStats:
        total = time.perf_counter() - self.start
        if reason is None:
            reason = {"length": "max_new_tokens", "cancelled": "cancelled"}.get(
                self.finish_reason, "end_of_answer" if self.parser.closed else "eos")
        tokens = self.usage_tokens if self.usage_tokens is not None else self.chunks
        return GenerationStats(self.ttft or total, total, tokens, self.thinking, reason)


def _check_supported(settings: GenerationSettings) -> None:
    if settings.mode == "token":
        raise ValueError("Per-token routing mixes both experts inside every answer; the remote backend "
                         "serves one expert per query. Choose auto, think or direct.")
    if settings.thinking_budget is not None:
        raise ValueError("A thinking budget needs control over each decoding step, which an OpenAI-compatible "
                         "server does not give; the remote backend cannot apply one. Leave it at 0.")


def image_data_url(image) -> str:
    """PNG (lossless), so the server decodes the very pixels the router saw."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("detail") or body.get("message") or body.get("error") or body
    return str(body or exc.message)[:300]


def _v1(url: str) -> str:
    """Accept `http://host:port` as well as `http://host:port/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"
