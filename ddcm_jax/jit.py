"""`jit`: `jax.jit` with 512-bit CPU vectors, for the research entry points that score codebooks.

XLA:CPU asks LLVM for 256-bit vectors even on processors with 512-bit registers
(some older Intel server cores lowered their clock for 512-bit work). On this
project's AVX-512 Xeons 512-bit vectors make codebook scoring (Philox words,
Box-Muller, the dot with the residual, fused per chunk) up to twice as fast,
with bit-identical scores and choices (`tests/test_jit.py`). `select_atoms` is
compiled this way.

The codec's programs are not: there the option changes how XLA sums long
reductions, and Turbo's noise, normalised over all D values, moves in its last
bits. A file coded before would then decode one grey level off in about 1e-4
of its values (158 of kodim23's 1,179,648 at the main command's settings),
which the format does not allow. The networks gain nothing from it.

An `--xla_cpu_prefer_vector_width=N` in the XLA_FLAGS environment variable wins
(then no option is passed), and only XLA:CPU gets it.

JAX accepts compile options only on the outermost `jax.jit`. A function made by
`jit` therefore runs its optioned program when called at top level (eagerly, as
a researcher calls `select_atoms`) and becomes a plain nested `jax.jit` inside
somebody else's trace (`jax.jit`, `scan`, `shard_map`), where the outer
program's options apply: pass `compiler_options()` to your own `jax.jit` to get
the same speed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["VECTOR_WIDTH_OPTION", "Jitted", "compiler_options", "jit"]

VECTOR_WIDTH_OPTION = "xla_cpu_prefer_vector_width"


def compiler_options() -> dict[str, str]:
    """The options `jit` passes: none when XLA_FLAGS sets the vector width itself."""
    if VECTOR_WIDTH_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {VECTOR_WIDTH_OPTION: "512"}


class Jitted:
    """`fun` under `jax.jit`: with the package's options at top level, without them inside another trace."""

    def __init__(self, fun: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self._fun, self._kwargs = fun, kwargs
        self._plain = jax.jit(fun, **kwargs)
        self._optioned: Any = None  # built at the first call, once the backend is known
        functools.update_wrapper(self, fun)

    def _top(self) -> Any:
        if self._optioned is None:
            # Only XLA:CPU reads the option; other backends keep the plain program.
            options = compiler_options() if jax.default_backend() == "cpu" else {}
            self._optioned = jax.jit(self._fun, compiler_options=options, **self._kwargs) if options else self._plain
        return self._optioned

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        top = self._top()
        if top is not self._plain:
            try:
                return top(*args, **kwargs)
            except ValueError as e:  # raised while staging into an outer trace, before anything ran
                if "compiler_options" not in str(e):
                    raise
        return self._plain(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, _cache_size: the top-level program's
        if name.startswith("__") or name in ("_fun", "_kwargs", "_plain", "_optioned"):
            raise AttributeError(name)
        return getattr(self._top(), name)


def jit(fun: Callable[..., Any] | None = None, /, **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()` at top level (see the module docstring).

    Usable as a decorator, bare or as `functools.partial(jit, static_argnames=...)`.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    return Jitted(fun, kwargs)
