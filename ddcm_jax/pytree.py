"""Frozen dataclasses as pytrees whose structure knows their class.

`jax.tree_util.register_dataclass` (jaxlib 0.10) builds tree structures that
compare equal across *different* classes with the same field layout:
`tree_structure(DDCM()) == tree_structure(Random())` and
`tree_structure(Turbo(3)) == tree_structure(GuidedSubset(3))` are True while
their hashes differ. `jax.jit`'s C++ dispatch cache then breaks the hash /
equality contract: when two signatures land in one probe group, a call with
the second rule can run the program compiled for the first. That is not a
theory: `compress(..., rule="random")` once returned the `ddcm` rule's image
in this project's CI. Every pytree dataclass of the package is registered
here instead, with the class in the structure's auxiliary data, so structures
of different classes are never equal.

`static_field` marks a field that goes into the structure (hashable settings
such as M or K); the other fields are the leaves, traced under `jit`.
Unflattening restores the fields without calling `__init__` (JAX unflattens
with tracers or placeholders, which the constructors' checks must not see).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

__all__ = ["pytree_dataclass", "static_field"]

T = TypeVar("T")


def static_field(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field kept out of the leaves: part of the tree structure (must be hashable)."""
    return dataclasses.field(default=default, metadata=dict(static=True), **kw)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """`dataclasses.dataclass(frozen=True)` + registration as a pytree whose structure names `cls`."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def aux(obj: Any) -> tuple[type, tuple[Any, ...]]:
        return cls, tuple(getattr(obj, name) for name in meta)

    def flatten(obj: Any) -> tuple[tuple[Any, ...], tuple[type, tuple[Any, ...]]]:
        return tuple(getattr(obj, name) for name in data), aux(obj)

    def flatten_with_keys(obj: Any) -> tuple[tuple[tuple[Any, Any], ...], tuple[type, tuple[Any, ...]]]:
        return tuple(zip(keys, (getattr(obj, name) for name in data), strict=True)), aux(obj)

    def unflatten(aux_data: tuple[type, tuple[Any, ...]], children: Any) -> Any:
        obj = object.__new__(cls)
        for name, value in zip(data, children, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(meta, aux_data[1], strict=True):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
