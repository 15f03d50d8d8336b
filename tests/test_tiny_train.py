"""The tiny training recipe runs end to end and writes a checkpoint the demo can load."""

import json
import random

import torch

from metis.modeling import MetisHomeForConditionalGeneration
from metis.tiny import data, phrasing, train, world
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


def test_loss_weighs_the_answer_not_the_prompt():
    """The answer's own tokens weigh ANSWER_WEIGHT, the format tokens 1, the prompt nothing, and the
    weighted loss is the plain one when every weight is 1."""
    tok = build_tokenizer()
    enc = train.Encoder(tok, build_image_processor())
    sample = next(s for s in (world.sample(i, "direct") for i in range(50)) if s.answer in ("red", "blue", "2"))
    example = enc.shapes(sample, False, 1, 1.0)
    n = example["prompt_len"]
    assert example["weights"][:n] == [0.0] * n
    answer = [tok.decode([i]) for i, w in zip(example["ids"][n:], example["weights"][n:]) if w == data.ANSWER_WEIGHT]
    assert "".join(answer) == sample.answer
    assert sorted(set(example["weights"][n:])) == [1.0, data.ANSWER_WEIGHT]
    batch = data.collate([example, enc.shapes(world.sample(7, "reasoning"), True, 0, 1.0)], tok.pad_token_id, 5)
    logits = torch.randn(*batch["labels"].shape, len(tok))
    plain = data.lm_loss(logits, batch["labels"])
    ones = torch.where(batch["labels"] != -100, 1.0, 0.0)
    assert torch.allclose(data.lm_loss(logits, batch["labels"], weights=ones), plain)
    assert not torch.allclose(data.lm_loss(logits, batch["labels"], weights=batch["loss_weights"]), plain)


def test_only_training_wordings_get_filler_words():
    """Filler words teach the model to read content words; the held-out pools stay as written."""
    def fillers(pool):
        rng = random.Random(0)
        texts = [phrasing.surface(rng, "how many circles are there", pool, typo_rate=0) for _ in range(400)]
        return sum(any(f in t.lower().split() for f in phrasing.FILLERS) for t in texts) / len(texts)

    assert 0.05 < fillers("train") < 0.3
    assert fillers("val") == fillers("test") == 0


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
