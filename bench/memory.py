"""Memory: what the MoE costs over its dense source, and what the running app holds.

Upcycling duplicates only the decoder MLPs; attention, embeddings, the LM head and the vision
tower stay shared. Per token the MoE runs shared + one expert, i.e. exactly the dense model's
parameters plus the router gates, so its extra memory buys no extra compute.
"""

from __future__ import annotations

import re
import resource

from accelerate import init_empty_weights
from transformers import Qwen2_5_VLForConditionalGeneration

from metis.conversion import to_dense_config
from metis.loading import describe
from metis.serving.engine import Engine

from .common import Row


def _mib(n: float) -> float:
    return round(n / 2**20, 2)


def run(engine: Engine, app_peak_rss_mib: float | None) -> dict:
    model = engine.model
    info = describe(model, "", "")
    itemsize = model.dtype.itemsize
    router = sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.mlp\.gate\.weight$", n))
    with init_empty_weights():  # shapes only: the dense twin is never allocated
        dense = Qwen2_5_VLForConditionalGeneration(to_dense_config(model.config))
    dense_params = sum(p.numel() for p in dense.parameters())
    active = info.params_shared + info.params_per_expert
    return dict(
        dtype=info.dtype,
        moe=dict(params_total=info.params_total, params_shared=info.params_shared,
                 params_per_expert=info.params_per_expert, params_router=router,
                 params_active_per_token=active, bytes=info.memory_bytes, mib=_mib(info.memory_bytes)),
        dense=dict(params_total=dense_params, bytes=dense_params * itemsize, mib=_mib(dense_params * itemsize)),
        moe_over_dense_params=round(info.params_total / dense_params, 3),
        active_over_dense_params=round(active / dense_params, 5),
        app_peak_rss_mib=app_peak_rss_mib,
        bench_peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def rows(m: dict) -> list[Row]:
    return [
        ("Memory: MoE / dense parameters (active per token / dense)",
         f"{m['moe_over_dense_params']:.3f} ({m['moe']['params_total'] / 1e6:.2f}M vs "
         f"{m['dense']['params_total'] / 1e6:.2f}M; active {m['active_over_dense_params']:.4f})", "", ""),
        ("Memory: peak RSS of the app process", f"{m['app_peak_rss_mib']:.0f} MiB", "", ""),
    ]
