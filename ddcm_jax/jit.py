"""`jit`: `jax.jit` with the package's XLA:CPU options, for every program the package compiles.

Two options, both for XLA:CPU only (other backends compile plainly):

* **No YNNPACK library fusions** (`xla_cpu_experimental_ynn_fusion_type` empty).
  jaxlib 0.10 hands convolutions, dots and reductions to YNNPACK by default,
  and runs many of those single-threaded: a 3x3 convolution at 16 x 16 x 256
  takes the same 3.1 ms on one core as on two. XLA's own (Eigen) kernels use
  both cores. Measured side by side on 2 cores: the ADM forward at batch 1 of
  adm_small_64px 84.7 -> 67.1 ms, of the default model at 128 px 268 -> 254 ms
  (on larger convolutions the two kernels trade places from run to run:
  `benchmarks/results/adm_convs_cpu.json`); one image end to end went from
  1.12x the original's time to 0.79x (`benchmarks/results/e2e_cpu.json`).
* **512-bit vectors** (`xla_cpu_prefer_vector_width`). XLA asks LLVM for 256-bit
  vectors even on processors with 512-bit registers (some older Intel server
  cores lowered their clock for 512-bit work). On AVX-512 Xeons this makes
  codebook scoring (Philox words, Box-Muller, the dot with the residual, fused
  per chunk) up to twice as fast, with bit-identical scores and choices
  (`tests/test_jit.py`).

Both change how XLA sums, so a program's last bits differ from the plain
`jax.jit`'s: the format allows that (a file decodes to the same picture, >= 60 dB
and <= 2 grey levels, on any version and backend; the same bits only within one
version on one backend), and `tests/test_v1_files.py` checks the pinned files
under these options. An option that the XLA_FLAGS environment variable already
sets is not passed, so the user's setting wins.

JAX accepts compile options only on the outermost `jax.jit`. A function made by
`jit` therefore runs its optioned program when called at top level (eagerly, as
a researcher calls `model(x, t)` or `select_atoms`) and becomes a plain nested
`jax.jit` inside somebody else's trace (`jax.jit`, `scan`, `shard_map`), where
the outer program's options apply: pass `compiler_options()` to your own
`jax.jit` to get the same speed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["LIBRARY_FUSION_OPTION", "VECTOR_WIDTH_OPTION", "Jitted", "compiler_options", "jit"]

VECTOR_WIDTH_OPTION = "xla_cpu_prefer_vector_width"
LIBRARY_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_OPTIONS = {VECTOR_WIDTH_OPTION: "512", LIBRARY_FUSION_OPTION: ""}


def compiler_options() -> dict[str, str]:
    """The XLA:CPU options `jit` passes, less those the XLA_FLAGS environment variable sets itself."""
    flags = os.environ.get("XLA_FLAGS", "")
    return {name: value for name, value in _OPTIONS.items() if name not in flags}


class Jitted:
    """`fun` under `jax.jit`: with the package's options at top level, without them inside another trace."""

    def __init__(self, fun: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self._fun, self._kwargs = fun, kwargs
        self._plain = jax.jit(fun, **kwargs)
        self._optioned: Any = None  # built at the first call, once the backend is known
        functools.update_wrapper(self, fun)

    def _top(self) -> Any:
        if self._optioned is None:
            # Only XLA:CPU reads the options; other backends keep the plain program.
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
