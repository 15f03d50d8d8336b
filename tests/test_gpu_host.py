"""What a real GPU host would hit, caught on CPU: routing data on another GPU than the layer
(fake devices), an out-of-memory error inside a batch, KV-cache admission, the attention and
device choices, and what a CUDA host serves when no model is named."""

import pytest
import torch
from conftest import moe_config
from test_batching import MIXED, _messages, _together
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from metis import loading
from metis.modeling import DenseMLP, MetisHomeMoeBlock, masked_mean
from metis.routing import Routing
from metis.serving.engine import GenerationSettings
from metis.serving.interface import collect
from metis.serving.requests import Row
from metis.serving.scheduler import BatchLimits
from metis.sizing import kv_bytes_per_token
from metis.streaming import Done, Failed

# -- 1. routing data on another GPU than the layer (accelerate moves hidden states, not Routing) ----

class _HostReads(TorchDispatchMode):
    """Fake tensors have no values: host reads (`.tolist()`, `.item()`) return 0 here, so the
    device checks of everything else still run."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0
        return func(*args, **(kwargs or {}))


def _on_fake(module: torch.nn.Module, device: str) -> None:
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(torch.empty(p.shape, device=device), requires_grad=False))


@pytest.mark.parametrize("mode", ["auto", "think", "token"])
@pytest.mark.parametrize("rows", [None, (("think", 0.5), ("direct", 0.5))])
def test_a_routed_block_on_cuda1_takes_routing_made_on_cuda0(mode, rows):
    config = moe_config().text_config
    with torch.device("meta"):
        block, dense = MetisHomeMoeBlock(config, 0), DenseMLP(config)
    # token mode's prefill dispatch reads group sizes that fake tensors do not have: a one-token
    # prompt takes the decode dispatch, and the routing record is written all the same
    seq = 1 if mode == "token" else 5
    with torch.no_grad(), FakeTensorMode(), _HostReads():
        _on_fake(block, "cuda:1")
        _on_fake(dense, "cuda:1")
        mask = torch.ones(2, seq, dtype=torch.bool, device="cuda:0")
        labels = torch.zeros(2, dtype=torch.long, device="cuda:0")
        for routing in [Routing(mode=mode, prompt_mask=mask, rows=None if mode == "token" else rows),
                        Routing(mode="auto", prompt_mask=mask, labels=labels)]:
            prefill = block(torch.randn(2, seq, config.hidden_size, device="cuda:1"), routing)
            routing.record.decided = True
            step = block(torch.randn(2, 1, config.hidden_size, device="cuda:1"), routing)
            assert prefill.device == step.device == torch.device("cuda:1")
            assert all(t.device == torch.device("cuda:1") for t in routing.record.layer_logits)
        assert dense(torch.randn(2, 5, config.hidden_size, device="cuda:1"), routing).device.index == 1


def test_a_mask_on_another_device_was_the_crash():
    """The fake-device check itself: a mask on cuda:0 against hidden states on cuda:1 mismatches
    unless it is moved, which is what masked_mean now does."""
    with torch.no_grad(), FakeTensorMode():
        x = torch.randn(2, 5, 8, device="cuda:1")
        mask = torch.ones(2, 5, device="cuda:0")
        with pytest.raises(Exception, match="device"):
            (x * mask.unsqueeze(-1)).sum()
        assert masked_mean(x, mask.bool()).device == torch.device("cuda:1")


# -- 2. out of memory inside a batch ---------------------------------------------------------------

class _OutOfMemoryAt:
    """A forward pre-hook on the first decoder layer that raises CUDA's out-of-memory error on its
    `nth` call with at least `rows` rows (`times` times), as a too-large batch would."""

    def __init__(self, nth: int, rows: int, times: int = 1):
        self.nth, self.rows, self.times, self.calls, self.raised = nth, rows, times, 0, 0

    def __call__(self, module, args):
        if args[0].shape[0] >= self.rows:
            self.calls += 1
            if self.calls >= self.nth and self.raised < self.times:
                self.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _layer(engine):
    return engine.model.model.language_model.layers[0]


def test_an_out_of_memory_step_gives_every_user_their_solo_answer(engine, monkeypatch):
    requests = [(_messages(text, size), GenerationSettings(mode=mode, max_new_tokens=16 + 3 * i), {})
                for i, (mode, text, size) in enumerate(MIXED[:4])]
    requests[3] = (requests[3][0], GenerationSettings(mode="think", max_new_tokens=25, thinking_budget=3), {})
    serial = [collect(engine.stream(m, s)) for m, s, _ in requests]
    freed = []
    monkeypatch.setattr("metis.serving.scheduler.free_accelerator_memory", lambda: freed.append(True))
    oom = _OutOfMemoryAt(nth=6, rows=4)  # the prefill, then four decode steps, then out of memory
    hook = _layer(engine).register_forward_pre_hook(oom)
    try:
        batched, sizes = _together(engine, requests)
    finally:
        hook.remove()
    assert oom.raised == 1 and freed == [True]
    assert sizes[0] == 4 and sum(sizes[1:]) == 4 and max(sizes[1:]) <= 2  # all again, at most half at once
    for alone, events in zip(serial, batched):
        together = collect(events)
        assert together.error is None and isinstance(events[-1], Done)
        assert (together.reasoning, together.answer) == (alone.reasoning, alone.answer)
        assert (together.stats.tokens, together.stats.stop_reason) == (alone.stats.tokens, alone.stats.stop_reason)
        assert sum(type(e).__name__ == "Routed" for e in events) == 1  # routed once, not per retry


def test_an_answer_that_cannot_fit_even_alone_says_what_to_lower(engine, monkeypatch):
    monkeypatch.setattr("metis.serving.scheduler.free_accelerator_memory", lambda: None)
    oom = _OutOfMemoryAt(nth=3, rows=1, times=10)
    hook = _layer(engine).register_forward_pre_hook(oom)
    try:
        results, _ = _together(engine, [(_messages(t, s), GenerationSettings(mode=m, max_new_tokens=12), {})
                                        for m, t, s in MIXED[:2]])
    finally:
        hook.remove()
    for events in results:
        assert isinstance(events[-1], Failed) and events[-1].stats.stop_reason == "out_of_memory"
        assert "ran out of memory" in events[-1].message and "max_new_tokens" in events[-1].message
        assert "OutOfMemoryError" not in events[-1].message
    assert oom.raised == 3  # the pair, then each row alone
    after = list(engine.stream(_messages("Count them.", None), GenerationSettings(max_new_tokens=4)))
    assert isinstance(after[-1], Done)


def test_an_error_keeps_no_frames_alive(engine, monkeypatch):
    def fail(module, args):
        raise RuntimeError("boom")

    ends, end = [], Row.end
    monkeypatch.setattr(Row, "end", lambda self, e: (ends.append(e), end(self, e))[1])
    hook = _layer(engine).register_forward_pre_hook(fail)
    try:
        answer = engine.run(_messages("Count them.", None), GenerationSettings(max_new_tokens=4))
    finally:
        hook.remove()
    assert answer.error == "Generation failed: RuntimeError: boom"
    assert ends[-1].error.__traceback__ is None  # its frames held the batch's KV cache


# -- 3. KV-cache admission -------------------------------------------------------------------------

def test_batches_are_admitted_by_kv_cache_room(engine, monkeypatch):
    limits = engine.scheduler.limits
    requests = [(_messages(t, s), GenerationSettings(mode=m, max_new_tokens=10), {}) for m, t, s in MIXED[:4]]
    prompts = [engine.prompts.build(m)["input_ids"].shape[1] for m, _, _ in requests]
    two_rows = 2 * (max(prompts[:2]) + 10)
    monkeypatch.setattr(engine.scheduler, "limits", BatchLimits(limits.max_batch, limits.max_batch_tokens,
                                                                max_kv_tokens=two_rows))
    monkeypatch.setattr(engine, "batch", engine.scheduler.limits)
    results, sizes = _together(engine, requests)
    assert max(sizes) <= 2 and sum(sizes) == 4 and all(isinstance(r[-1], Done) for r in results)
    with pytest.raises(ValueError, match=r"room for .* tokens of KV cache .* this server has room for"):
        list(engine.stream(_messages("Count them.", None), GenerationSettings(max_new_tokens=two_rows)))


def test_a_cuda_host_budgets_its_free_memory(engine, monkeypatch):
    from metis.serving import engine as engine_module

    class FakeModel:
        device = torch.device("cuda:0")
        config, dtype = engine.model.config, torch.bfloat16

        def parameters(self):
            return [torch.empty(0, device="meta")]

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (10 * 2**30, 80 * 2**30))
    model = FakeModel()
    model.parameters = lambda: [type("P", (), {"device": torch.device("cuda", i)})() for i in (0, 1)]
    limits = engine_module.kv_token_budget(model, BatchLimits())
    per_token = kv_bytes_per_token(model.config.get_text_config(), 2)  # bf16
    assert limits.max_kv_tokens == 2 * 7 * 2**30 // per_token  # 10 GiB free - 3 GiB kept, x2 GPUs
    assert engine_module.kv_token_budget(model, BatchLimits(max_kv_tokens=5)).max_kv_tokens == 5  # set: kept


# -- 4. attention, devices and defaults ------------------------------------------------------------

def test_flash_attention_only_for_half_precision(monkeypatch):
    monkeypatch.setattr(loading, "flash_attention_available", lambda: True)
    assert loading.pick_runtime("cuda", None, None, "bfloat16")[2] == "flash_attention_2"
    assert loading.pick_runtime("cuda", "float16", None, None)[2] == "flash_attention_2"
    assert loading.pick_runtime("cuda", None, None, torch.float32)[2] == "sdpa"  # the embedded tiny model
    assert loading.pick_runtime("cpu", None, None, "bfloat16")[2] == "sdpa"


def test_a_flash_kernel_that_does_not_load_falls_back_to_sdpa(tiny_checkpoint, monkeypatch):
    from metis.modeling import MetisHomeForConditionalGeneration

    real, asked = MetisHomeForConditionalGeneration.from_pretrained.__func__, []

    def from_pretrained(cls, *args, attn_implementation=None, **kwargs):
        asked.append(attn_implementation)
        if attn_implementation == "flash_attention_2":
            raise OSError("kernels-community/flash-attn2: no build for this torch")
        return real(cls, *args, attn_implementation=attn_implementation, **kwargs)

    monkeypatch.setattr(MetisHomeForConditionalGeneration, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(loading, "pick_runtime", lambda *a: ("cpu", torch.float32, "flash_attention_2"))
    loaded = loading.load(str(tiny_checkpoint))
    assert asked == ["flash_attention_2", "sdpa"] and loaded.info.attn_implementation == "sdpa"
    with pytest.raises(OSError):  # asked for by name: its failure is the answer
        loading.load(str(tiny_checkpoint), attn_implementation="flash_attention_2")


def test_a_large_model_is_not_run_on_cpu_silently(monkeypatch):
    with pytest.raises(loading.NoUsableGPU, match=r"14\.0B-parameter model on CPU .* METIS_ALLOW_CPU=1"):
        loading.refuse_large_on_cpu(14_000_000_000)
    loading.refuse_large_on_cpu(3_000_000)  # the embedded model is fine


def _fake_cuda(monkeypatch, gib: float, gpus: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (int(gib * 2**30), int(gib * 2**30)))


@pytest.fixture
def loads(monkeypatch):
    """`loading.load` recording what was asked for; the published checkpoint cannot be had here
    (no network), and everything else loads on CPU."""
    asked, real = [], loading.load

    def load(spec=None, **kwargs):
        asked.append(spec)
        if spec == loading.PUBLISHED:
            raise OSError("no network")
        return real(spec, device="cpu")

    monkeypatch.setattr(loading, "load", load)
    return asked


def test_a_gpu_that_holds_the_checkpoint_tries_it_then_says_why_not(monkeypatch, loads):
    _fake_cuda(monkeypatch, gib=80)
    loaded = loading.load_default()
    assert loads == [loading.PUBLISHED, None]
    assert "embedded tiny model" in loaded.info.notice and "OSError: no network" in loaded.info.notice


def test_a_small_gpu_serves_the_tiny_model_with_the_numbers(monkeypatch, loads):
    _fake_cuda(monkeypatch, gib=24)
    loaded = loading.load_default()
    assert loads == [None]  # the published checkpoint was never fetched
    assert "needs 26.1 GiB" in loaded.info.notice and "21.0 GiB free" in loaded.info.notice


def test_cpu_serves_the_tiny_model_without_a_notice(monkeypatch, loads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.load_default().info.notice is None and loads == [None]


def test_zero_gpu_trains_the_router_on_cpu_and_answers_one_call_at_a_time(engine, monkeypatch):
    from metis.finetune.features import Features
    from metis.finetune.trainer import RouterTrainer, TrainSettings

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what `spaces` reports there
    router = {k: v.cpu() for k, v in engine.model.router_state_dict().items()}
    layers, hidden = len(router), engine.model.config.text_config.hidden_size
    features = Features(torch.randn(8, layers, hidden), torch.tensor([0, 1] * 4), 0.0, router=router,
                        thinking_expert=engine.model.config.thinking_expert)
    trainer = RouterTrainer(features, TrainSettings(epochs=1))
    assert trainer.accelerator.device.type == "cpu"
    assert engine.concurrency == 1
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert engine.concurrency == engine.batch.max_batch


def test_zero_gpu_reservations_follow_a_slice_of_an_h200():
    from types import SimpleNamespace

    from metis.sizing import decode_tokens_per_s

    info = SimpleNamespace(params_total=14_000_000_000, num_experts=2, params_per_expert=5_700_000_000)
    # a 70 GB slice of the 141 GB H200: about half its bandwidth, so about half the tokens per second
    assert decode_tokens_per_s(info) == pytest.approx(4.8e12 * 0.12 * 70 / 141 / (8.3e9 * 2), rel=1e-3)


# -- 5. token mode per row -------------------------------------------------------------------------

def test_token_mode_share_is_each_rows_own(engine):
    requests = [(_messages(t, s), GenerationSettings(mode="token", max_new_tokens=3), {}) for _, t, s in MIXED[:3]]
    alone = [collect(engine.stream(m, s)).trace.token_think_share for m, s, _ in requests]
    results, sizes = _together(engine, requests)
    assert sizes == [3]
    assert [collect(r).trace.token_think_share for r in results] == pytest.approx(alone, abs=1e-6)


def test_the_fallback_notice_is_a_banner_and_a_model_tab_row(engine, monkeypatch):
    from dataclasses import replace

    from metis.ui import build_demo
    from metis.ui.model_tab import info_markdown

    notice = "Serving the embedded tiny model, not the real one: the GPU is too small."
    monkeypatch.setattr(engine, "info", replace(engine.info, notice=notice))
    demo = build_demo(engine)
    banners = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-notice"]
    assert len(banners) == 1 and notice in banners[0].value
    assert f"| Why not the published model | {notice} |" in info_markdown(engine.describe().info)
    assert "Why not" not in info_markdown(replace(engine.info, notice=None).to_dict())
