"""The one pattern of every tab: handlers return records, `build` wires them to components.

A tab's handlers are module-level functions that take plain values (the runner, text, numbers,
the session) and return, or yield, an update record: a frozen dataclass with one field per output
of the tab, each field the component's new value or `KEEP` (left as it is). They are tested by
calling them. The tab's `build` lays out the components and names them after the record's fields
(`Outputs`); `Outputs.event` turns a handler into what Gradio calls, a dict keyed by component.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import fields

PRIVATE = {"api_visibility": "private"}  # the page's own events are no API endpoints


class Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()  # an update record's field that leaves its component as it is


def changed(update) -> dict[str, object]:
    """The fields of an update record that change their component."""
    return {f.name: value for f in fields(update) if (value := getattr(update, f.name)) is not KEEP}


class Outputs:
    """A tab's output components, named like the fields of its update record."""

    def __init__(self, record: type, **components):
        names = [f.name for f in fields(record)]
        if sorted(names) != sorted(components):
            raise TypeError(f"{record.__name__} has fields {names}, got components {sorted(components)}")
        self.components = components

    def event(self, handler: Callable, *names: str) -> dict:
        """`fn` and `outputs` of an event running `handler`, whose records may change only the
        components `names`. The wrapper keeps the handler's name (the event's private api_name)
        and signature (Gradio injects `gr.Progress` by it)."""
        outputs = [self.components[name] for name in names]
        function = handler.func if isinstance(handler, functools.partial) else handler
        handler_name = function.__name__

        def updates(update) -> dict:
            values = changed(update)
            if not values.keys() <= set(names):
                extra = sorted(values.keys() - set(names))
                raise TypeError(f"{handler_name} updates {extra}, which are not outputs of its event")
            return {self.components[name]: value for name, value in values.items()}

        if inspect.isgeneratorfunction(handler):
            def fn(*args, **kwargs):
                for update in handler(*args, **kwargs):
                    yield updates(update)
        else:
            def fn(*args, **kwargs):
                return updates(handler(*args, **kwargs))
        functools.update_wrapper(fn, handler)
        fn.__name__, fn.__qualname__, fn.__module__ = handler_name, function.__qualname__, function.__module__
        return {"fn": fn, "outputs": outputs}
