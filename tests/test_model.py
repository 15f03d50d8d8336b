"""Config, modeling, routing, upcycling and loading of Metis-HOME on small random models."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import moe_config
from safetensors.torch import load_file, save_file

from metis.configuration import MetisHomeConfig
from metis.loading import CheckpointMismatch, load, to_model_name
from metis.modeling import MetisHomeForConditionalGeneration, MetisHomeMoeBlock
from metis.upcycle import upcycle

PUBLISHED = Path(__file__).resolve().parents[1] / "assets" / "reference" / "metis-home-config.json"


def published_config() -> MetisHomeConfig:
    raw = json.loads(PUBLISHED.read_text())
    return MetisHomeConfig(**{k: v for k, v in raw.items() if k != "model_type"})


def test_published_config_round_trip(tmp_path):
    config = published_config()
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_experts, text.num_experts_per_tok) == (3584, 28, 2, 1)
    assert (text.moe_intermediate_size, text.shared_expert_intermediate_size) == (1408, 5632)
    assert text.norm_topk_prob is False and list(text.mlp_only_layers) == []
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    config.save_pretrained(tmp_path)
    again = MetisHomeConfig.from_pretrained(tmp_path)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(again.to_dict()) == drop(config.to_dict())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_vl_moe"


def test_full_size_skeleton_parameter_count():
    """The meta-device skeleton of the published config has exactly the arithmetic's parameters."""
    config = published_config()
    config.text_config.moe_intermediate_size = 18944  # experts are copies of the dense FFN
    config.text_config.shared_expert_intermediate_size = 0
    with init_empty_weights():
        model = MetisHomeForConditionalGeneration(config)
    t, v = config.text_config, config.vision_config
    head = t.hidden_size // t.num_attention_heads
    kv = t.num_key_value_heads * head
    attn = t.hidden_size * t.hidden_size * 2 + t.hidden_size * kv * 2 + t.hidden_size + 2 * kv  # q,o + k,v + biases
    expert = 3 * t.hidden_size * t.moe_intermediate_size
    layer = attn + t.num_experts * expert + t.num_experts * t.hidden_size + 2 * t.hidden_size
    text = t.num_hidden_layers * layer + 2 * t.vocab_size * t.hidden_size + t.hidden_size
    vblock = 4 * v.hidden_size * v.hidden_size + 4 * v.hidden_size + 3 * v.hidden_size * v.intermediate_size \
        + 2 * v.intermediate_size + v.hidden_size + 2 * v.hidden_size
    merged = v.hidden_size * v.spatial_merge_size**2
    vision = v.depth * vblock + 3 * v.temporal_patch_size * v.patch_size**2 * v.hidden_size \
        + v.hidden_size + merged * merged + merged + merged * v.out_hidden_size + v.out_hidden_size
    assert sum(p.numel() for p in model.parameters()) == text + vision
    assert t.num_experts * expert * t.num_hidden_layers == sum(
        p.numel() for n, p in model.named_parameters() if ".experts." in n
    )


@pytest.fixture
def upcycled(dense_model):
    return upcycle(dense_model)


def _inputs():
    torch.manual_seed(1)
    return dict(input_ids=torch.randint(3, 80, (2, 12)))


@pytest.mark.parametrize("mode", ["auto", "think", "direct", "token"])
def test_upcycled_model_equals_dense(dense_model, upcycled, mode):
    inputs = _inputs()
    with torch.no_grad():
        ref = dense_model(**inputs).logits
        out = upcycled(**inputs, routing=upcycled.new_routing(mode)).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _expert_calls(model):
    calls = []
    for block in model.moe_blocks():
        for e, expert in enumerate(block.experts):
            expert.register_forward_hook(lambda m, i, o, e=e: calls.append(e))
    return calls


@pytest.mark.parametrize("mode,expected", [("think", 0), ("direct", 1)])
def test_forced_modes_use_their_expert(mode, expected):
    torch.manual_seed(0)
    model = MetisHomeForConditionalGeneration(moe_config()).eval()
    calls = _expert_calls(model)
    model.generate(**_inputs(), routing=model.new_routing(mode), max_new_tokens=3, do_sample=False)
    assert calls and set(calls) == {expected}


def test_auto_decides_by_threshold():
    torch.manual_seed(0)
    model = MetisHomeForConditionalGeneration(moe_config()).eval()
    inputs = dict(input_ids=torch.randint(3, 80, (1, 12)))
    probe = model.new_routing("auto")
    with torch.no_grad():
        model(**inputs, routing=probe)
    p = probe.trace().p_think
    assert len(probe.trace().per_layer) == 3 and probe.trace().threshold == 0.5
    calls = _expert_calls(model)
    for threshold, decision, expert in [(p - 0.01, "think", 0), (p + 0.01, "direct", 1)]:
        calls.clear()
        routing = model.new_routing("auto", threshold)
        with torch.no_grad():
            model(**inputs, routing=routing)
        assert routing.trace().decision == decision and routing.trace().p_think == pytest.approx(p)
        assert set(calls) == {expert}


def test_decode_never_reroutes():
    torch.manual_seed(0)
    model = MetisHomeForConditionalGeneration(moe_config()).eval()
    gate_calls = []
    for block in model.moe_blocks():
        block.gate.register_forward_hook(lambda *a: gate_calls.append(1))
    routing = model.new_routing("auto")
    calls = _expert_calls(model)
    out = model.generate(input_ids=torch.randint(3, 80, (1, 9)), routing=routing, max_new_tokens=6,
                         min_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape[1] == 15
    assert len(gate_calls) == 3  # one per MoE layer, prefill only
    assert len(calls) == 3 * 6 and len(set(calls)) == 1  # every step through the decided expert
    assert len(routing.record.layer_logits) == 3 and routing.record.decided


def test_token_mode_routes_per_token():
    torch.manual_seed(0)
    model = MetisHomeForConditionalGeneration(moe_config()).eval()
    routing = model.new_routing("token")
    calls = _expert_calls(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 80, (1, 40)), routing=routing)
    assert set(calls) == {0, 1}  # a random gate splits 40 tokens between both experts
    assert routing.trace().decision == "token" and 0 < routing.trace().token_think_share < 1


def test_training_labels_route_each_sample():
    torch.manual_seed(0)
    model = MetisHomeForConditionalGeneration(moe_config())
    ids = torch.randint(3, 80, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :6] = True
    routing = model.new_routing("auto", labels=torch.tensor([0, 1]), prompt_mask=mask)
    out = model(input_ids=ids, routing=routing, labels=ids)
    loss = out.loss + torch.nn.functional.cross_entropy(routing.query_logits, torch.tensor([0, 1]))
    loss.backward()
    assert model.moe_blocks()[0].gate.weight.grad.abs().sum() > 0
    assert routing.record.expert.tolist() == [0, 1]


# -- loading ----------------------------------------------------------------------------------------

def test_load_reads_expert_width_from_checkpoint(tiny_checkpoint, tmp_path):
    """A config that states the wrong expert width still loads: the shapes decide."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 1408
    for f in tiny_checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load(str(tmp_path))
    model, info = loaded.model, loaded.info
    assert model.config.text_config.moe_intermediate_size == 40
    assert info.num_experts == 2 and info.params_per_expert > 0


def test_cpu_threads_one_for_small_models_unless_asked(tiny_checkpoint):
    """Small models decode faster on one intra-op thread from the engine's worker thread."""
    before = torch.get_num_threads()
    try:
        info = load(str(tiny_checkpoint), device="cpu").info
        assert info.cpu_threads == torch.get_num_threads() == 1
        info = load(str(tiny_checkpoint), device="cpu", cpu_threads=2).info
        assert info.cpu_threads == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    save_file(edit(weights), dst / "model.safetensors")
    return dst


def test_mismatched_checkpoint_lists_names(tiny_checkpoint, tmp_path):
    def edit(w):
        w.pop("model.layers.1.mlp.gate.weight")  # saved checkpoints keep the transformers-4 layout
        w["model.layers.0.mlp.router.weight"] = torch.zeros(2, 32)
        w["model.layers.2.mlp.experts.1.up_proj.weight"] = torch.zeros(41, 32)
        return w

    with pytest.raises(CheckpointMismatch) as err:
        load(str(_copy_with_weights(tiny_checkpoint, tmp_path, edit)))
    message = str(err.value)
    assert "missing (1): model.language_model.layers.1.mlp.gate.weight" in message
    assert "unexpected (1): model.language_model.layers.0.mlp.router.weight" in message
    assert "layers.2.mlp.experts.1.up_proj.weight: checkpoint (41, 32)" in message


def test_checkpoints_use_the_published_layout(tiny_checkpoint):
    """Saved names follow transformers 4.x (`model.layers…`, `visual…`) like the published checkpoint."""
    names = set(load_file(tiny_checkpoint / "model.safetensors"))
    assert "model.layers.0.mlp.gate.weight" in names
    assert "model.layers.0.mlp.experts.1.down_proj.weight" in names
    assert any(n.startswith("visual.") for n in names)
    assert to_model_name("model.layers.0.mlp.gate.weight") == "model.language_model.layers.0.mlp.gate.weight"
    assert to_model_name("visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"


def test_pickled_weights_refused(tiny_checkpoint, tmp_path):
    for f in tiny_checkpoint.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointMismatch, match="pickled"):
        load(str(tmp_path))


def test_upcycled_checkpoint_saves_and_loads(dense_model, tmp_path):
    model = upcycle(dense_model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = MetisHomeForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            again(**inputs, routing=again.new_routing("auto")).logits, dense_model(**inputs).logits
        )
    assert isinstance(again.moe_blocks()[0], MetisHomeMoeBlock)


@pytest.mark.parametrize("ours, parent, build", [
    ("MetisHomeDecoderLayer", "Qwen2_5_VLDecoderLayer",
     lambda cls, c: cls(c.text_config, 0, *([0] if "Metis" in cls.__name__ else []))),
    ("MetisHomeTextModel", "Qwen2_5_VLTextModel", lambda cls, c: cls(c.text_config)),
    ("MetisHomeModel", "Qwen2_5_VLModel", lambda cls, c: cls(c)),
    ("MetisHomeForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", lambda cls, c: cls(c)),
])
def test_classes_that_skip_their_parents_init_set_every_attribute_it_sets(ours, parent, build):
    """Our model classes build their own layers instead of calling the parent's __init__, so they
    copy what it sets; an upgrade of transformers that adds an attribute fails here, not at run time."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen

    import metis.modeling as metis_modeling

    config = moe_config()
    mine, theirs = build(getattr(metis_modeling, ours), config), build(getattr(qwen, parent), config)
    missing = {k for k in vars(theirs) if not k.startswith("_") or k == "_attn_implementation"} - set(vars(mine))
    assert not missing, f"{ours} lacks {sorted(missing)}, which {parent}.__init__ sets"
    assert set(theirs._modules) <= set(mine._modules)  # the same submodule names (mlp may differ in kind)
