"""UI and API values -> checked library values, every refusal naming the parameter and its type.

The `/chat` and `/route` endpoints take their values raw (Gradio's own preprocessing fails on a
wrong type with an error that names no parameter and reaches the client as `error: null`), so
everything a client can send is checked here: wrong types, NaN, booleans posing as numbers,
fractional token counts, unknown modes, malformed messages. Pure functions, tested directly;
Gradio is imported only for the form's sliders (`slider`), built from the same limits.
"""

from __future__ import annotations

import math

import gradio as gr

from ..routing import MODES, QUERY_MODES
from ..serving.interface import GenerationSettings


class ValueProblem(ValueError):
    """A request value of the wrong type or out of range; the message names the parameter."""


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def number(name: str, value, *, optional: bool = False) -> float | None:
    """A finite number; strings, booleans, lists, NaN and infinities are refused."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueProblem(f"{name} must be a number, got {value!r} ({_kind(value)})")
    if not math.isfinite(value):
        raise ValueProblem(f"{name} must be a finite number, got {value!r}")
    return float(value)


def integer(name: str, value, *, optional: bool = False) -> int | None:
    """A whole number; 2.0 is accepted (JSON and sliders send floats), 2.5 is refused, not rounded."""
    value = number(name, value, optional=optional)
    if value is None:
        return None
    if value != int(value):
        raise ValueProblem(f"{name} must be a whole number (integer), got {value:g}")
    return int(value)


def mode(value) -> str:
    """The public modes (QUERY_MODES), or `token` (per-token routing, works but is not advertised:
    kept for experiments and the rehearsal of the real checkpoint); the message lists the public
    ones only."""
    if not isinstance(value, str) or value.strip().lower() not in MODES:
        raise ValueProblem(f"mode must be one of {', '.join(QUERY_MODES)} (a string), got {value!r}")
    return value.strip().lower()


_mode = mode  # `settings` names its keyword `mode`


def settings(*, mode: object, threshold, thinking_budget, max_new_tokens, temperature, top_p) -> GenerationSettings:
    """The generation settings of a request, checked field by field, then against the library's
    ranges. `threshold=None` is the model's own threshold; `thinking_budget` 0 or None is none.
    Keyword-only: six loose values are easy to pass in the wrong order."""
    budget = integer("thinking_budget", thinking_budget, optional=True)
    return GenerationSettings(
        mode=_mode(mode),
        threshold=number("threshold", threshold, optional=True),
        max_new_tokens=integer("max_new_tokens", max_new_tokens),
        thinking_budget=budget or None,
        temperature=number("temperature", temperature),
        top_p=number("top_p", top_p),
    )


def message_parts(payload) -> tuple[str, list[str]]:
    """An API `message` ({"text": str, "files": [uploaded files]}) -> its text and file paths.

    Only files Gradio has checked and moved into its cache reach here: they carry the FileData
    marker, which Gradio requires before it moves a file (see `ApiMessage`)."""
    if not isinstance(payload, dict):
        raise ValueProblem('message must be an object {"text": str, "files": [handle_file(...)]}, '
                           f"got {payload!r} ({_kind(payload)})")
    text, files = payload.get("text") or "", payload.get("files") or []
    if not isinstance(text, str):
        raise ValueProblem(f"message.text must be a string, got {text!r} ({_kind(text)})")
    if not isinstance(files, list):
        raise ValueProblem(f"message.files must be a list of files, got {_kind(files)}")
    paths = []
    for i, file in enumerate(files):
        path = file.get("path") if isinstance(file, dict) else None
        if not isinstance(path, str) or not path:
            raise ValueProblem(f"message.files[{i}] must be a file uploaded with handle_file(), got {file!r}")
        paths.append(path)
    return text, paths


def slider(name: str, label: str, step: float, **kwargs) -> gr.Slider:
    """A slider over the library's own range for setting `name`, at its default: the UI offers
    exactly what `GenerationSettings` accepts."""
    lo, hi = GenerationSettings.LIMITS[name]
    return gr.Slider(lo, hi, value=getattr(GenerationSettings(), name), step=step, label=label, **kwargs)
