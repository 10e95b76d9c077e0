"""Per-step progress out of the jitted scan, kept out of the math.

With `progress=True` the sampler emits a host callback with the respaced step
index after each step; this module forwards it to whatever listeners the
caller installed (`on_step`), e.g. a progress bar. Without listeners the
callback does nothing, and without `progress=True` it is not compiled in.
The callback is unordered (ordered effects cannot span devices) and, under
sharding, every device reports every step: count distinct indices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["on_step", "report_step"]

_listeners: list[Callable[[int], None]] = []


def report_step(i: object) -> None:
    """Host side of the callback: the respaced index of the step that just ran."""
    for listener in list(_listeners):
        listener(int(i))  # type: ignore[call-overload]


@contextlib.contextmanager
def on_step(listener: Callable[[int], None]) -> Iterator[None]:
    """Call `listener(i)` after each sampler step run inside the `with` block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
