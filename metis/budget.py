"""What one request may cost the shared model, known before the prefill: prompt tokens and time.

The prompt is counted from the text's tokens and each image's size (the image processor's own
resize rule; no pixel is processed). Over the limit, a request is refused, or its oldest turns
are dropped and the answer says so (`overflow`, a server setting). The deadline bounds how long
one answer may hold the model slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .prompting import Message, PromptBuilder, PromptError


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_tokens: int = 8192  # the model's context may lower it
    overflow: str = "refuse"  # or "trim": drop the oldest turns, with a note in the answer
    max_seconds: float = 120.0  # no answer holds the model slot longer

    def __post_init__(self):
        if self.overflow not in ("refuse", "trim"):
            raise ValueError(f"overflow must be refuse or trim, got {self.overflow!r}")


def image_tokens(prompts: PromptBuilder, width: int, height: int) -> int:
    processor = prompts.image_processor
    bounds = processor.size
    lo = prompts.config.min_pixels or bounds["shortest_edge"]
    hi = prompts.config.max_pixels or bounds["longest_edge"]
    factor = processor.patch_size * processor.merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=lo, max_pixels=hi)
    return (h // processor.patch_size) * (w // processor.patch_size) // processor.merge_size**2


def count_tokens(prompts: PromptBuilder, messages: list[Message]) -> int:
    counts = [image_tokens(prompts, *image.size) for m in messages for image in m.images]
    return len(prompts.token_ids(messages, counts))


def _message_tokens(prompts: PromptBuilder, message: Message, frame: int) -> int:
    """One message's tokens: its turn is the same ids wherever it sits in the conversation."""
    return count_tokens(prompts, [message]) - frame


def prompt_limit(limits: RequestLimits, context: int | None) -> int:
    """The server's setting, lowered to the model's context (positions it was trained on)."""
    return min(limits.max_prompt_tokens, context) if context else limits.max_prompt_tokens


def fit(prompts: PromptBuilder, messages: list[Message], limit: int, overflow: str) -> tuple[list[Message], str | None]:
    """The messages within `limit` prompt tokens, and a note when turns were dropped; or a
    PromptError saying the request is over. Counting goes from the newest message back and stops
    at the limit, so refusing a huge request costs no more than serving one at the limit."""
    prompts.validate(messages)
    frame = count_tokens(prompts, [])  # the system turn and the assistant's header
    total, first = frame, len(messages)  # messages[first:] fit in `total` tokens
    for i in range(len(messages) - 1, -1, -1):
        n = _message_tokens(prompts, messages[i], frame)
        if total + n > limit:
            break
        total, first = total + n, i
    if first == 0:
        return messages, None
    if overflow == "trim":  # keep whole turns: the kept part starts with a question
        start = next((j for j in range(first, len(messages)) if messages[j].role == "user"), None)
        if start is not None:
            kept = messages[start:]
            return kept, (f"The conversation was over this server's limit of {limit:,} tokens: its oldest {start} "
                          f"message(s) were left out ({count_tokens(prompts, kept):,} tokens kept).")
    raise PromptError(f"The conversation is over this server's limit of {limit:,} tokens per request (images "
                      f"included). Start a new chat or send less text or fewer images.")
