"""`jit`: `jax.jit` with the XLA options every program of this package is compiled with.

XLA:CPU asks LLVM for 256-bit vectors even on processors with 512-bit registers
(some older Intel server cores lowered their clock for 512-bit work). On this
project's AVX-512 Xeons 512-bit vectors make codebook scoring (Philox words,
Box-Muller, the dot with the residual, fused per chunk) twice as fast and the
networks a few per cent faster. The codebook scores and choices and the
networks' outputs are bit-identical either way (`tests/test_jit.py`); a long
reduction can round differently in its last bits (Turbo's noise, normalised
over all D values: 6th decimals), which encoder and decoder share because they
run the same programs, and files coded before this option decode to the same
pixels (`tests/test_v1_files.py`). A processor without 512-bit registers caps
the hint at its own width; GPU and TPU compilers ignore `xla_cpu_*` options.

An `--xla_cpu_prefer_vector_width=N` in the XLA_FLAGS environment variable
wins: then no option is passed.

JAX accepts compile options only on the outermost `jax.jit`. A function made
by `jit` therefore runs its optioned program when called at top level (eagerly,
as a researcher calls `select_atoms`, or as the sampler runs its step
programs) and becomes a plain nested `jax.jit` inside somebody else's trace
(`jax.jit`, `scan`, `shard_map`), where the outer program's options apply:
pass `compiler_options()` to your own `jax.jit` to get the same programs.
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
        options = compiler_options()
        self._plain = jax.jit(fun, **kwargs)
        self._top = jax.jit(fun, compiler_options=options, **kwargs) if options else self._plain
        functools.update_wrapper(self, fun)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._top is not self._plain:
            try:
                return self._top(*args, **kwargs)
            except ValueError as e:  # raised while staging into an outer trace, before anything ran
                if "compiler_options" not in str(e):
                    raise
        return self._plain(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, _cache_size: the top-level program's
        return getattr(self._top, name)


def jit(fun: Callable[..., Any] | None = None, /, **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)` compiled with `compiler_options()` at top level (see the module docstring).

    Usable as a decorator, bare or as `functools.partial(jit, static_argnames=...)`.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    return Jitted(fun, kwargs)
