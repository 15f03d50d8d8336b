"""export-experts: two stock dense experts and a router that together are the MoE, or a clear refusal."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import moe_config
from transformers import Qwen2_5_VLForConditionalGeneration

from metis.__main__ import main
from metis.export import NotSplittable, export_experts, load_router
from metis.modeling import MetisHomeForConditionalGeneration
from metis.prompting import Message
from metis.serving.engine import Engine
from metis.tiny import world


@pytest.fixture(scope="module")
def embedded():
    return Engine.load("tiny")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    assert main(["export-experts", "tiny", str(out)]) == 0
    return out


def queries(n: int = 6) -> list[list[Message]]:
    """Tiny-world questions with their image, and the same questions as text only."""
    samples = world.generate("test", n)
    with_image = [[Message("user", s.question, [s.image])] for s in samples]
    return with_image + [[Message("user", s.question)] for s in samples]


@pytest.mark.parametrize("expert", ["think", "direct"])
def test_dense_expert_gives_the_logits_of_the_moe_forced_to_it(embedded, exported, expert):
    dense, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported / expert, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    dense.eval()
    worst = 0.0
    for messages in queries(4):
        inputs = embedded.prompts.build(messages)
        with torch.inference_mode():
            moe = embedded.model(**inputs, routing=embedded.model.new_routing(expert)).logits
            worst = max(worst, (moe - dense(**inputs).logits).abs().max().item())
    assert worst <= 1e-4


def test_dense_experts_load_with_plain_transformers_and_no_metis_code(exported):
    script = (
        "import sys\n"
        "from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, "
        "GenerationConfig\n"
        "for name in ('think', 'direct'):\n"
        f"    path = {str(exported)!r} + '/' + name\n"
        "    model = AutoModelForImageTextToText.from_pretrained(path)\n"
        "    assert type(model).__name__ == 'Qwen2_5_VLForConditionalGeneration', type(model)\n"
        "    assert AutoConfig.from_pretrained(path).model_type == 'qwen2_5_vl'\n"
        "    assert AutoTokenizer.from_pretrained(path).chat_template\n"
        "    AutoImageProcessor.from_pretrained(path)\n"
        "    assert GenerationConfig.from_pretrained(path).eos_token_id is not None\n"
        "assert not any(m == 'metis' or m.startswith('metis.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=exported, timeout=600)
    config = json.loads((exported / "think" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert not {"num_experts", "moe_intermediate_size", "thinking_expert"} & (set(config) | set(config["text_config"]))


def test_router_holds_only_what_the_decision_reads(embedded, exported):
    router = load_router(exported / "router").model
    names = {n for n, _ in router.named_parameters()}
    assert not any("lm_head" in n or ".layers.1." in n for n in names)
    assert sum(p.numel() for p in router.parameters()) < embedded.model.num_parameters() / 2
    assert router.config.system_prompt == embedded.model.config.system_prompt


@pytest.mark.parametrize("source", ["embedded", "random-init"])
def test_router_trace_equals_the_full_models_in_auto_mode(source, embedded, exported, tiny_checkpoint, tmp_path):
    """Text and image queries; the random-init model's p_think is not saturated at 0 or 1."""
    if source == "embedded":
        full, folder = embedded, exported / "router"
    else:
        full = Engine.load(str(tiny_checkpoint))
        export_experts(str(tiny_checkpoint), tmp_path)
        folder = tmp_path / "router"
    router = Engine(load_router(folder))
    for messages in queries():
        want, got = full.route(messages, mode="auto"), router.route(messages, mode="auto")
        assert abs(want.p_think - got.p_think) <= 1e-5
        assert (got.decision, got.mode, got.threshold) == (want.decision, want.mode, want.threshold)


@pytest.mark.parametrize(
    "overrides, reason",
    [(dict(shared_expert_intermediate_size=16), "shared expert"),
     (dict(num_experts_per_tok=2), "routes per token"),
     (dict(shared_expert_intermediate_size=16, num_experts_per_tok=2), "per token.*shared expert")],
)
def test_refuses_a_model_that_is_not_two_query_routed_experts(tmp_path, capsys, overrides, reason):
    MetisHomeForConditionalGeneration(moe_config(**overrides)).save_pretrained(tmp_path / "moe")
    with pytest.raises(NotSplittable, match=reason):
        export_experts(str(tmp_path / "moe"), tmp_path / "out")
    assert main(["export-experts", str(tmp_path / "moe"), str(tmp_path / "out")]) == 2
    assert re.search(reason, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
