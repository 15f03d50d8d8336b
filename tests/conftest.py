"""Small random-init models built in the tests: no download, seconds to build."""

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from metis.configuration import MetisHomeConfig

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 90, 91, 92, 93

TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=0,
)
VISION = dict(
    depth=2,
    hidden_size=16,
    intermediate_size=24,
    num_heads=2,
    out_hidden_size=32,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
)
TOKENS = dict(
    image_token_id=IMAGE_TOKEN,
    video_token_id=VIDEO_TOKEN,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
)


def dense_config() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION), **TOKENS)


def moe_config(**text_overrides) -> MetisHomeConfig:
    text = dict(TEXT, num_experts=2, moe_intermediate_size=40, **text_overrides)
    return MetisHomeConfig(text_config=text, vision_config=dict(VISION), **TOKENS)


@pytest.fixture
def dense_model():
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(dense_config()).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init Metis-HOME saved with the tiny world's tokenizer and image processor."""
    from metis.modeling import MetisHomeForConditionalGeneration
    from metis.tiny.tokenizer import build_image_processor, build_tokenizer

    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = dict(TEXT, vocab_size=len(tokenizer), num_experts=2, moe_intermediate_size=40,
                eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    config = MetisHomeConfig(
        text_config=text, vision_config=dict(VISION), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), system_prompt="Answer.",
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-moe")
    MetisHomeForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_image_processor().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    from metis.serving.engine import Engine

    return Engine.load(str(tiny_checkpoint))


@pytest.fixture
def stream_log(engine, monkeypatch):
    """Records every `engine.stream` call: its events, whether it ran to its end or was closed
    early, and a `first_text` flag a test can wait on instead of sleeping."""
    import contextlib
    import threading
    from types import SimpleNamespace

    from metis.streaming import AnswerDelta, ReasoningDelta

    log = SimpleNamespace(calls=[], first_text=threading.Event())
    original = engine.stream

    def stream(*args, **kwargs):
        call = SimpleNamespace(events=[], finished=False)
        log.calls.append(call)
        with contextlib.closing(original(*args, **kwargs)) as events:
            for event in events:
                call.events.append(event)
                if isinstance(event, ReasoningDelta | AnswerDelta):
                    log.first_text.set()
                yield event
        call.finished = True

    monkeypatch.setattr(engine, "stream", stream)
    return log


@pytest.fixture(scope="session")
def rehearsal_checkpoint(tmp_path_factory):
    """The published checkpoint's packaging with random weights (metis/rehearsal.py)."""
    from metis.rehearsal import build_rehearsal

    return build_rehearsal(tmp_path_factory.mktemp("metis-home-rehearsal"))


@pytest.fixture(scope="session")
def rehearsal(rehearsal_checkpoint):
    from metis.serving.engine import Engine

    return Engine.load(str(rehearsal_checkpoint))
