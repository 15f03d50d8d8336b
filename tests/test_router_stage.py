"""The tiny model's router stage changes the gates and the router temperature, nothing else."""

import json

import torch
from safetensors.torch import load_file

from metis.serving.engine import Engine
from metis.tiny import router_stage


def test_router_stage_changes_only_the_gates_and_temperature(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    report = router_stage.run(tiny_checkpoint, out, minutes=0.05, examples=24, val_examples=12)

    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.endswith("mlp.gate.weight") for k in changed)
    assert changed or report["chosen"]["lr"] is None  # the current router wins when nothing beats it on val

    old, new = (json.loads((d / "config.json").read_text()) for d in (tiny_checkpoint, out))
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} <= {"router_temperature"}
    assert new["router_temperature"] == report["temperature"] > 0
    assert report["examples"] == {"train": 48, "val": 36}
    assert {"shapes", "natural_text", "natural_image", "mean"} == report["val_agreement_after"].keys()
    assert report["val_agreement_after"]["mean"] >= report["val_agreement_before"]["mean"]

    engine = Engine.load(str(out))
    assert engine.model.config.router_temperature == report["temperature"]
    assert engine.route(engine_messages()).decision in ("think", "direct")


def test_train_examples_are_seeded_and_labelled(tmp_path):
    a, sources = router_stage.build_examples("train", 10, tmp_path / "a", seed=1)
    b, _ = router_stage.build_examples("train", 10, tmp_path / "b", seed=1)
    assert [(e.text, e.label) for e in a] == [(e.text, e.label) for e in b]
    assert sources[:10] == ["shapes"] * 10 and all(e.images for e in a[:10])
    assert {e.label for e in a} == {"think", "direct"}


def engine_messages():
    from metis.prompting import Message

    return [Message("user", "How many circles are there?")]
