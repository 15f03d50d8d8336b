"""Sizing from a config (full-width experts) and from a checkpoint's tensor shapes, the CLI, the
README's hardware claims, and the ZeroGPU reservation that follows from them."""

import re
from pathlib import Path

import pytest

from metis.__main__ import PUBLISHED_CONFIG, main
from metis.sizing import SPACES_TIERS, decode_tokens_per_s, model_size, report
from metis.ui.runtime import gpu_seconds

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def published():
    return model_size(PUBLISHED_CONFIG)


def test_published_config_with_full_width_experts(published):
    assert round(published.params_total / 1e9, 1) == 14.0
    assert published.num_experts == 2 and round(published.params_per_expert / 1e9, 2) == 5.70
    assert round(published.weight_bytes / 2**30, 1) == 26.1
    assert published.kv_bytes_per_token == 28 * 2 * 4 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16
    assert round(published.literal_config_params / 1e9, 2) == 5.13  # the config's Qwen2-MoE defaults


def test_cli_prints_the_published_size(capsys):
    assert main(["size"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 14.0B" in out and "26.1 GiB" in out and "57.3 MB per 1k tokens" in out
    assert main(["size", str(PUBLISHED_CONFIG), "--json"]) == 0
    assert '"params_total": 13995572224' in capsys.readouterr().out


def test_shapes_of_a_checkpoint_agree_with_the_loaded_model(rehearsal, rehearsal_checkpoint, capsys):
    size = model_size(rehearsal_checkpoint)
    assert size.source == "tensor shapes"
    info = rehearsal.info
    assert (size.params_total, size.params_per_expert, size.num_experts) == (
        info.params_total, info.params_per_expert, info.num_experts)
    config = rehearsal.model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    assert size.kv_bytes_per_token == config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    assert main(["size", str(rehearsal_checkpoint)]) == 0
    assert "source: tensor shapes" in capsys.readouterr().out


def test_readme_hardware_fits_with_room_for_the_full_context(published):
    front = README.read_text().split("---")[1]
    suggested = re.search(r"^suggested_hardware:\s*(\S+)", front, re.M).group(1)
    (gpus, gb), = [(g, m) for name, g, m in SPACES_TIERS if name == suggested]
    assert published.kv_room(gpus, gb) >= published.max_context
    assert published.kv_room(1, 24) == 0  # a10g-large, the old suggestion, cannot hold the weights


def test_readme_tier_table_is_the_tools_output(published):
    table = [line for line in report(published).splitlines() if line.startswith("|")]
    assert "\n".join(table) in README.read_text()


def test_zerogpu_duration_follows_tokens_and_rate(published, monkeypatch):
    rate = decode_tokens_per_s(published)
    assert 10 < rate < 30  # an eighth of the bandwidth of a ZeroGPU slice (70 of an H200's 141 GB) over 8.3B bf16
    short, longer = gpu_seconds(256, rate), gpu_seconds(1024, rate)
    assert short < longer and longer - short == pytest.approx(1.25 * 768 / rate, abs=1)
    assert gpu_seconds(16384, rate) == 300  # ZeroGPU's cap
    assert decode_tokens_per_s(published, measured=100) == 100 and gpu_seconds(1000, 100) == 15 + 13
