"""The tiny training recipe runs end to end and writes a checkpoint the demo can load."""

import json

import torch

from metis.modeling import MetisHomeForConditionalGeneration
from metis.tiny import train, world
from metis.tiny.tokenizer import build_image_processor, build_tokenizer


def test_padded_batch_matches_single_samples():
    """Right padding must not move the 3D rope positions of the real tokens."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = train.Qwen2_5_VLForConditionalGeneration(train.dense_config(tok))
    assert train.check_padding(model, train.Encoder(tok, build_image_processor())) < 1e-4


def test_target_tags_are_single_special_tokens():
    tok = build_tokenizer()
    ids = tok(world.format_target(world.sample(0), True), add_special_tokens=False)["input_ids"]
    tags = tok.convert_tokens_to_ids(["<think>", "</think>", "<answer>", "</answer>"])
    assert all(ids.count(t) == 1 for t in tags)


def test_smoke_run_writes_loadable_checkpoint_and_resumes(tmp_path):
    train.main(["--smoke", "--out", str(tmp_path), "--checkpoint-minutes", "0"])
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["stage1"]["steps"] == 3 and report["stage2"]["steps"] == 3
    assert {"acc_direct", "acc_reasoning", "router_acc"} <= report["final_val"].keys()
    assert {"temperature", "ece_before", "ece_after"} <= report["calibration"].keys()
    config = json.loads((tmp_path / "config.json").read_text())
    assert report["router_stage"]["temperature"] == config["router_temperature"]
    assert sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file()) < 40e6
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["step"]) == (2, 3)

    train.main(["--smoke", "--out", str(tmp_path), "--resume", "--steps2", "5"])  # a stopped run goes on
    resumed = json.loads((tmp_path / "training.json").read_text())
    assert resumed["stage1"]["steps"] == 3 and resumed["stage2"]["steps"] == 5
    assert resumed["stage2"]["history"][0] == report["stage2"]["history"][0]

    model = MetisHomeForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.text_config.num_experts == 2 and model.config.system_prompt == world.SYSTEM_PROMPT
    assert model.generation_config.eos_token_id == build_tokenizer().convert_tokens_to_ids("<|im_end|>")
