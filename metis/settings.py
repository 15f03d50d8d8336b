"""Every server setting the environment gives, read once at the edge (app.py, `python -m metis`)
into one record. The library takes them as arguments and reads no variable itself, except
ZeroGPU's SPACES_ZERO_GPU, the platform's own switch, read where `spaces` reads it
(loading.zero_gpu).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .budget import RequestLimits
from .serving.requests import BatchLimits

OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class PublicLimits:
    """Bounds for a public deployment (the app's gate, metis/ui/gate.py)."""

    per_client: int = 3  # requests one client may have waiting or running at once
    queue_size: int = 64  # requests waiting, all clients together (Gradio's `max_size`)
    finetune: bool = True  # the fine-tuning and evaluation tabs; off on a public Space that should not train

    def __post_init__(self):
        if self.per_client < 1 or self.queue_size < 1:
            raise ValueError(f"limits must be positive, got {self.per_client} per client, queue of {self.queue_size}")


@dataclass(frozen=True)
class Settings:
    """What one server runs with. Defaults are the library's; `from_env` reads the METIS_* variables."""

    model: str | None = None  # METIS_MODEL: checkpoint folder or Hub id; None: the default (loading.load_default)
    router: str | None = None  # METIS_ROUTER, METIS_THINK_URL, METIS_DIRECT_URL: the remote backend
    think_url: str | None = None
    direct_url: str | None = None
    requests: RequestLimits = field(default_factory=RequestLimits)  # per request (metis/budget.py)
    batch: BatchLimits = field(default_factory=BatchLimits)  # the running batch (serving/requests.py)
    public: PublicLimits = field(default_factory=PublicLimits)
    offload: bool = False  # METIS_OFFLOAD=1: a model larger than the GPUs may spill to CPU/disk
    allow_cpu: bool = False  # METIS_ALLOW_CPU=1: a model over 2B parameters may run on CPU
    decode_tokens_per_s: float | None = None  # METIS_DECODE_TOKENS_PER_S: measured, for ZeroGPU reservations

    def engine_options(self) -> dict:
        """What `Engine.load` takes of these settings."""
        return dict(batch=self.batch, limits=self.requests, decode_tokens_per_s=self.decode_tokens_per_s,
                    offload=self.offload, allow_cpu=self.allow_cpu)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def number(name: str, default, kind=int):
            return kind(env[name]) if env.get(name) else default

        requests, batch, public = RequestLimits(), BatchLimits(), PublicLimits()
        return cls(
            model=env.get("METIS_MODEL") or None,
            router=env.get("METIS_ROUTER") or None,
            think_url=env.get("METIS_THINK_URL") or None,
            direct_url=env.get("METIS_DIRECT_URL") or None,
            requests=RequestLimits(number("METIS_MAX_PROMPT_TOKENS", requests.max_prompt_tokens),
                                   env.get("METIS_PROMPT_OVERFLOW") or requests.overflow,
                                   number("METIS_MAX_SECONDS", requests.max_seconds, float)),
            batch=BatchLimits(number("METIS_MAX_BATCH", batch.max_batch),
                              number("METIS_MAX_BATCH_TOKENS", batch.max_batch_tokens),
                              number("METIS_MAX_KV_TOKENS", None)),
            public=PublicLimits(number("METIS_CLIENT_REQUESTS", public.per_client),
                                number("METIS_QUEUE_SIZE", public.queue_size),
                                env.get("METIS_FINETUNE", "1").strip().lower() not in OFF),
            offload=env.get("METIS_OFFLOAD") == "1",
            allow_cpu=env.get("METIS_ALLOW_CPU") == "1",
            decode_tokens_per_s=number("METIS_DECODE_TOKENS_PER_S", None, float),
        )
