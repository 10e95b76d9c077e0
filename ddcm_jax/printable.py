"""Escaping of text that comes from files (names, checkpoint keys, header strings) before it is printed.

A file name may hold a newline, a checkpoint key an ANSI escape: printed raw they split
one error into two lines or drive the terminal. `printable` keeps ordinary text as it
is and writes every control or unprintable character as a Python escape (`\\n`, `\\x1b`,
`\\u2028`), so each message stays one line of plain text.
"""

from __future__ import annotations

import os

__all__ = ["printable"]


def printable(value: object) -> str:
    """`str(value)` with control and other non-printable characters escaped; paths via `os.fsdecode`."""
    text = os.fsdecode(value) if isinstance(value, os.PathLike | bytes) else str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch == "\\":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
