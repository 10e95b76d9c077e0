"""Headers from flat keywords, the way the tests name fields (`rule=`, `size=`, `seed=`, `task=`, ...).

`Header` nests its fields in five parts; these helpers route each flat keyword
to its part, so a test states only the fields it is about. `forge` builds a
header that skips validation, for files no encoder may write.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ddcm_jax.bitstream import Geometry, Header, ModelId, Provenance, StoredSpec, Task

PARTS = {"spec": StoredSpec, "geometry": Geometry, "model": ModelId, "task": Task, "provenance": Provenance}
RENAMED = {"task": "name"}  # flat keyword -> the part's field


def _part_of(key: str) -> tuple[str, str]:
    field = RENAMED.get(key, key)
    for part, cls in PARTS.items():
        if field in {f.name for f in dataclasses.fields(cls)}:
            return part, field
    raise TypeError(f"no header field {key!r}")


def _split(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {p: {} for p in PARTS}
    for key, value in flat.items():
        part, field = _part_of(key)
        parts[part][field] = value
    return parts


def make_header(**flat: Any) -> Header:
    """A validated header from flat keywords (rule, steps, codebook_size, fingerprint and size are required)."""
    return Header(**{p: PARTS[p](**kw) for p, kw in _split(flat).items()})


def flat_fields(h: Header) -> dict[str, Any]:
    """The inverse of `make_header`: every field of every part under its flat keyword."""
    inverse = {v: k for k, v in RENAMED.items()}
    return {inverse.get(f.name, f.name) if p == "task" else f.name: getattr(getattr(h, p), f.name)
            for p in PARTS for f in dataclasses.fields(PARTS[p])}  # fmt: skip


def forge(h: Header, **raw: Any) -> Header:
    """`h` with flat fields replaced, without validation or canonical forms (for hostile files)."""
    split = _split(raw)
    fake = object.__new__(Header)
    for p, cls in PARTS.items():
        part = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(part, f.name, split[p].get(f.name, getattr(getattr(h, p), f.name)))
        object.__setattr__(fake, p, part)
    return fake
