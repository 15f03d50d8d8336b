"""The GPU and ZeroGPU path, exercised on CPU: import order with a stand-in `spaces`, device maps
inferred for GPUs that are not there (meta-device models, accelerate's max_memory), the real Qwen2.5
vocabulary, accelerate's process state, and the bench's pinning and partial results."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from accelerate import PartialState
from conftest import moe_config
from torch.utils._python_dispatch import TorchDispatchMode

from metis.configuration import MetisHomeConfig
from metis.loading import EMBEDDED, NotEnoughGPUMemory, gpu_device_map, load, pick_runtime, placement
from metis.modeling import MetisHomeMoeBlock
from metis.serving.batch import ThinkingBudget
from metis.streaming import IncrementalDecoder

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
FAKE_SPACES = '''
"""Stand-in for Hugging Face's `spaces`: records what it wraps and each call's duration. Like
ZeroGPU, which runs the function in another process, it requires arguments and results to pickle."""
import pickle

WRAPPED = []
CALLS = []


def _crosses(value):
    pickle.dumps(value)  # raises if it could not reach the GPU process or come back
    return value


def GPU(duration=None):
    def wrap(fn):
        WRAPPED.append(fn.__name__)

        def call(*args, **kwargs):
            CALLS.append((fn.__name__, duration(*args, **kwargs)))
            result = fn(*_crosses(args), **_crosses(kwargs))
            if hasattr(result, "__next__"):
                return (_crosses(item) for item in result)
            return _crosses(result)

        return call

    return wrap
'''


def _python(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _fake_spaces(monkeypatch) -> ModuleType:
    spaces = ModuleType("spaces")
    exec(FAKE_SPACES, spaces.__dict__)
    monkeypatch.setitem(sys.modules, "spaces", spaces)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return spaces


# -- 1. ZeroGPU: spaces first, loud when missing --------------------------------------------------

def test_zero_gpu_app_imports_spaces_before_anything_touches_torch(tmp_path):
    """`spaces` here reports what was imported before it and ends the process: the order is all."""
    (tmp_path / "spaces.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'gradio', 'metis') if m in sys.modules)))\n"
        "sys.stdout.flush(); os._exit(0)\n")
    env = dict(os.environ, SPACES_ZERO_GPU="true", PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = _python("import app", env)
    assert out.returncode == 0 and json.loads(out.stdout) == [], out.stderr[-2000:]


def test_zero_gpu_stops_the_app_when_spaces_fails_to_import(tmp_path):
    (tmp_path / "spaces.py").write_text("raise ImportError('spaces cannot start here')\n")
    env = dict(os.environ, SPACES_ZERO_GPU="1", PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = _python("import app", env)
    assert out.returncode != 0 and "ImportError: spaces cannot start here" in out.stderr


def test_zero_gpu_load_and_gateway_refuse_a_missing_spaces(monkeypatch, tiny_checkpoint):
    from metis.ui.runtime import gpu

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    with pytest.raises(RuntimeError, match="import spaces first"):
        load(str(tiny_checkpoint))
    with pytest.raises(ImportError):  # no longer swallowed: the model would silently run on CPU
        gpu(duration=lambda: 1)


# -- 2. fine-tuning goes through the GPU gateway --------------------------------------------------

def test_every_model_call_of_the_app_is_wrapped_for_the_gpu(engine, monkeypatch):
    from metis.ui import build_demo

    spaces = _fake_spaces(monkeypatch)
    build_demo(engine)
    assert sorted(spaces.WRAPPED) == ["events", "features", "route"]


def test_finetune_tab_extracts_features_through_the_gpu_gateway(engine, monkeypatch):
    spaces = _fake_spaces(monkeypatch)
    from metis.ui.finetune import start
    from metis.ui.runtime import Runner
    from metis.ui.session import Job

    run = start(Runner(engine), [], True, 2, 0.05, 16, 0.2, 0, 0, 0.5, Job())
    statuses = [update.status for update in run]
    assert statuses[-1] == "Done.", statuses[-1]
    names = [name for name, _ in spaces.CALLS]
    assert "features" in names and all(seconds > 0 for _, seconds in spaces.CALLS)


# -- 3. no silent CPU offload ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size():
    from bench.gpu import full_config

    return full_config()


def test_a_gpu_smaller_than_the_model_is_refused_with_the_memory_it_needs(full_size):
    with pytest.raises(NotEnoughGPUMemory) as error:
        gpu_device_map(full_size, torch.bfloat16, max_memory={0: 24 * GiB, "cpu": 200 * GiB})
    message = str(error.value)
    assert "26.1 GiB" in message and "GPU 0: 24.0 GiB" in message and "METIS_OFFLOAD=1" in message
    assert "lm_head" in message


@pytest.mark.parametrize("gpus, size", [(1, 80), (2, 24), (4, 24), (2, 48)])
def test_gpu_maps_keep_layers_whole_and_the_vision_tower_on_gpu_0(full_size, gpus, size):
    device_map = gpu_device_map(full_size, torch.bfloat16, max_memory={i: size * GiB for i in range(gpus)} | {
        "cpu": 200 * GiB})
    assert set(device_map.values()) <= set(range(gpus))
    if gpus == 1:
        assert device_map == {"": 0}
        return
    assert device_map["model.visual"] == 0 and device_map["model.language_model.embed_tokens"] == 0
    layers = [name for name in device_map if ".layers." in name]
    assert all(name.count(".") == 3 for name in layers)  # model.language_model.layers.N: never split
    assert len(layers) == full_size.text_config.num_hidden_layers and len(set(device_map.values())) > 1


def test_one_named_gpu_holds_the_whole_model(full_size):
    two = {0: 80 * GiB, 1: 80 * GiB, "cpu": 200 * GiB}
    assert gpu_device_map(full_size, torch.bfloat16, "cuda:1", max_memory=two) == {"": 1}
    with pytest.raises(NotEnoughGPUMemory, match="GPU 1: 21.6 GiB"):
        gpu_device_map(full_size, torch.bfloat16, "cuda:1", max_memory={0: 80 * GiB, 1: 24 * GiB, "cpu": 200 * GiB})


def test_placement_offloads_only_when_asked(full_size, monkeypatch):
    assert placement(full_size, "cpu", torch.float32, offload=False) == {}
    assert placement(full_size, "cuda", torch.bfloat16, offload=True) == {"device_map": "auto"}
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # ZeroGPU: one emulated device, `.to("cuda")`
    assert placement(full_size, "cuda", torch.bfloat16, offload=False) == {}


# -- 5. accelerate launch: one device and one shard per process ----------------------------------

def test_each_process_features_its_own_shard(engine, tmp_path, monkeypatch):
    from metis.finetune.cli import process_device, process_features
    from metis.finetune.data import Example
    from metis.finetune.features import Features, extract_features

    examples = [Example(f"Name the shape ({i}).", (), "direct" if i % 2 else "think", i) for i in range(5)]
    state = PartialState()
    assert process_device(state) is None  # alone: the model may spread over every GPU
    whole = extract_features(engine, examples)
    shards = []
    monkeypatch.setattr(state, "num_processes", 2)
    assert process_device(state) == str(state.device)
    for rank in range(2):
        monkeypatch.setattr(state, "process_index", rank)
        shards.append(process_features(engine, examples, str(tmp_path), state))
    assert [len(s.targets) for s in shards] == [3, 2]
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2  # each process cached its own shard
    joined = Features.concat(shards)
    assert torch.allclose(joined.inputs, whole.inputs, atol=1e-6) and torch.equal(joined.targets, whole.targets)
    assert joined.router.keys() == engine.model.router_state_dict().keys()


# -- 6. thinking budget with the real vocabulary --------------------------------------------------

@pytest.fixture(scope="module")
def qwen():
    from metis.qwen_vocab import build_qwen_tokenizer

    return build_qwen_tokenizer()


def _replay(tokenizer, text: str, budget: int) -> list[bool]:
    """Feed the processor as `generate` does, one generated token at a time; True where it forced."""
    close = tokenizer("</think>", add_special_tokens=False)["input_ids"]
    hidden = set(tokenizer.all_special_ids)
    generated = tokenizer(text, add_special_tokens=False)["input_ids"]
    processor = ThinkingBudget(budget, close, IncrementalDecoder(tokenizer, hidden))
    return [processor.forced(generated[n - 1 : n]) is not None for n in range(len(generated) + 1)]


def test_real_vocabulary_splits_the_tags(qwen):
    pieces = lambda text: [qwen.decode([i]) for i in qwen(text, add_special_tokens=False)["input_ids"]]  # noqa: E731
    assert pieces("</think>") == ["</", "think", ">"]
    assert pieces("ok.\n</think>\n<answer>")[2:5] == ["</", "think", ">\n"]
    assert "></" in pieces("<think></think><answer>42")
    assert qwen.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>", "<|image_pad|>"]) == [151645, 151652, 151655]


@pytest.mark.parametrize("text", [
    "<think>\nTwo circles, one square.\n</think>\n<answer>The answer is one, since two minus one is one.</answer>",
    "<think></think><answer>Blue, and it is the only shape in the picture.</answer>",
])
def test_budget_sees_the_models_own_close_in_real_tokens(qwen, text):
    forced = _replay(qwen, text, budget=2)
    close_at = len(qwen(text[: text.index("</think>") + 8], add_special_tokens=False)["input_ids"])
    assert not any(forced[close_at:])  # the answer runs free once the model closed its reasoning


def test_budget_forces_the_close_when_the_reasoning_runs_on(qwen):
    close = qwen("</think>", add_special_tokens=False)["input_ids"]
    hidden = set(qwen.all_special_ids)
    processor = ThinkingBudget(3, close, IncrementalDecoder(qwen, hidden))
    new = qwen("<think>\nfirst, second, third", add_special_tokens=False)["input_ids"]
    for expected in close:  # one token of </think> per step
        assert processor.forced(new) == expected
        new = [expected]
    assert processor.forced(new + qwen("\n<answer>3", add_special_tokens=False)["input_ids"]) is None


# -- 7. bench on a GPU host ------------------------------------------------------------------------

def test_bench_pins_cpu_sections_guards_the_gpu_and_keeps_partial_results(tiny_checkpoint, tmp_path, monkeypatch):
    import contextlib

    import bench.__main__ as bench

    loaded = []
    real_load = bench.Engine.load

    def load_engine(spec, **kwargs):
        loaded.append(kwargs.get("device"))
        return real_load(spec, **kwargs)

    @contextlib.contextmanager
    def app(path, new_tokens):
        yield SimpleNamespace(peak_rss_mib=lambda: 1.0)

    def out_of_memory(quick):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host, as far as defaults go
    monkeypatch.setattr(bench, "machine", lambda: {"cpus": 2})
    monkeypatch.setattr(bench.Engine, "load", load_engine)
    monkeypatch.setattr(bench.server, "App", app)
    devices = []
    for name in ("streaming", "routing", "server", "hybrid", "scaling", "memory"):
        section = getattr(bench, name)

        def record(engine, *args, name=name):
            devices.append(str(engine.model.device))
            return {"ratio": 1.0, "prefill_ratio": 1.0, "decode_ratio": 1.0, "forward_passes_for_routing": {},
                    "section": name}

        monkeypatch.setattr(section, "run", record)
    monkeypatch.setattr(bench.gpu, "run", out_of_memory)
    monkeypatch.setattr(bench.remote, "run", lambda quick: {"section": "remote"})  # its own CPU engine and servers
    saved = []
    results = bench.measure(str(tiny_checkpoint), True, save=lambda r: saved.append(json.loads(json.dumps(r))))
    assert loaded == ["cpu"] and set(devices) == {"cpu"} and len(devices) == 6
    assert results["gpu"].startswith("failed: OutOfMemoryError") and results["memory"]["section"] == "memory"
    assert saved[0]["details"]["streaming"]["section"] == "streaming" and "gpu" not in saved[-2]

    def broken(engine, quick):
        raise RuntimeError("scaling broke")

    monkeypatch.setattr(bench.scaling, "run", broken)
    saved.clear()
    with pytest.raises(RuntimeError, match="scaling broke"):
        bench.measure(str(tiny_checkpoint), True, save=saved.append)
    assert "auto_vs_think" in saved[-1] and "server_ratio" in saved[-1]  # what ran before stays


def test_bench_child_processes_see_no_gpu():
    from bench.common import cpu_only_children

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with cpu_only_children():
        out = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"],
                             capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "''" and os.environ.get("CUDA_VISIBLE_DEVICES") == before


# -- 8. the checkpoint's dtype ---------------------------------------------------------------------

def test_gpu_defaults_to_the_checkpoints_saved_dtype():
    saved = MetisHomeConfig.from_pretrained(EMBEDDED).dtype
    assert saved == torch.float32
    assert pick_runtime("cuda", None, "sdpa", saved) == ("cuda", torch.float32, "sdpa")
    assert pick_runtime("cuda", None, "sdpa", "bfloat16")[1] == torch.bfloat16
    assert pick_runtime("cuda", None, "sdpa", None)[1] == torch.bfloat16
    assert pick_runtime("cuda", "float16", "sdpa", saved)[1] == torch.float16  # asked for: wins
    assert pick_runtime("cpu", None, None, torch.bfloat16)[1] == torch.float32


# -- 9. token mode without host syncs per expert ---------------------------------------------------

def _old_route_tokens(block: MetisHomeMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The previous dispatch (boolean masks and `if sel.any()`), the reference for identical results."""
    weights, chosen = block.gate(x).float().softmax(-1).topk(block.top_k, dim=-1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e, expert in enumerate(block.experts):
        hit = chosen == e
        sel = hit.any(-1)
        if sel.any():
            out[sel] += (weights * hit).sum(-1)[sel].unsqueeze(-1).to(x.dtype) * expert(x[sel])
    return out


class _Ops(TorchDispatchMode):
    """Names of the ops run; a boolean-mask index (a hidden nonzero, so a GPU sync) as "mask index"."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, list | tuple)
                    for i in a)
        self.ops.append("mask index" if masks else str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("top_k, norm, dtype", [(1, False, torch.float32), (2, False, torch.float32),
                                                (2, True, torch.bfloat16), (1, False, torch.bfloat16)])
def test_token_mode_dispatch_is_identical_and_branch_free(top_k, norm, dtype):
    config = moe_config(num_experts_per_tok=top_k, norm_topk_prob=norm).text_config
    torch.manual_seed(top_k)
    block = MetisHomeMoeBlock(config, 0).to(dtype).eval()
    for shape in [(1, 1), (2, 7), (3, 40)]:  # a decode step, short and longer prompts
        x = torch.randn(*shape, config.hidden_size, dtype=dtype)
        with torch.no_grad(), _Ops() as log:
            out = block._route_tokens(x, None)
        assert torch.equal(out, _old_route_tokens(block, x))
        syncs = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default", "mask index"}
        assert not syncs & set(log.ops), log.ops  # the group sizes' `.tolist()` is the one read left


# -- 10. pickled weights from the Hub --------------------------------------------------------------

def test_allow_pickle_downloads_the_bin_weights(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    from metis.modeling import MetisHomeForConditionalGeneration

    folder = tmp_path / "hub"
    model = MetisHomeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    folder.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        return str(folder) if "*.bin" in allow_patterns else str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = load("someone/metis-home-bin", allow_pickle=True).model
    assert "*.bin" in asked[-1]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    load("someone/metis-home-bin")
    assert "*.bin" not in asked[-1]
