"""Ctrl-C and the files being written: what a handler that ends the process must respect.

The command line ends at once on SIGINT (`os._exit`, no unwinding: see cli._exit_interrupted).
Two things would then go wrong, and this module (no imports beyond the standard library,
so that a handler can use it while JAX is still importing) prevents both:
  - a commit halfway through its renames would leave one file of a pair new and the
    other old: the renames run inside `committing()`, and a stop requested meanwhile
    (`when_no_commit`) waits until they end;
  - temporaries of unfinished writes would stay behind: writers `register` them, and
    `remove_own_temporaries` deletes what is still registered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

_temporaries: set[str] = set()
_depth = 0
_pending: list[Callable[[], object]] = []


def register(path: str) -> None:
    _temporaries.add(path)


def unregister(path: str) -> None:
    _temporaries.discard(path)


@contextlib.contextmanager
def committing() -> Iterator[None]:
    """Renames that must finish together: a stop requested inside waits for the end."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending:
            _pending.pop()()


def when_no_commit(action: Callable[[], object]) -> None:
    """Run `action` now, or as soon as the commit under way has finished (or rolled back)."""
    if _depth:
        _pending[:] = [action]
    else:
        action()


def remove_own_temporaries() -> None:
    for path in list(_temporaries):
        with contextlib.suppress(OSError):
            os.unlink(path)
        _temporaries.discard(path)
