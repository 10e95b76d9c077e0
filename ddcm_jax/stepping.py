"""Keys and step-by-step driving, shared by the pixel and the latent samplers.

`as_key` turns a typed key or an int seed into the key every codebook is
derived from (never a default); `run_steps` runs a sampler's steps either as
one compiled call or one call per step (`Window`), reporting progress between
calls without a host callback inside the program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PRNG_IMPL", "Progress", "Window", "as_key", "run_steps", "whole"]


PRNG_IMPL = "threefry2x32"


def as_key(key: Any) -> jax.Array:
    """A typed key (or a (B,) array of them) from a key or an int seed; never a default."""
    if key is None:
        raise ValueError("a key (typed jax.random.key or an int seed) is required; there is no default")
    if isinstance(key, int | np.integer):
        # Named explicitly: a global jax_default_prng_impl must not change the codebooks.
        return jax.random.key(int(key), impl=PRNG_IMPL)
    if not (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key must be a typed key (jax.random.key) or an int seed, not a raw uint32 PRNGKey")
    if key.ndim > 1:
        raise ValueError(f"key must be one typed key or a (B,) array of them, got shape {key.shape}")
    return key


class Window(NamedTuple):
    """Steps [lo, lo + n) of `total`, in run order: what one compiled call runs.

    A whole run is one window (one scan). Run step by step (to report progress
    between calls, with no host callback in the program, so that XLA's
    persistent cache can keep it), `lo` is traced and every step of a run
    reuses one program: the steps without a code row run through it too, their
    noise zeroed by the sampler and their code rows dropped.
    """

    lo: Any
    n: int
    total: int


def whole(steps: int) -> Window:
    return Window(0, steps, steps)


Progress = Callable[[int, int], None]
"""Called as `progress(done, total)` with the steps run so far: (0, T) before the first, whose call compiles."""


def run_steps(call: Callable[[Any, Window], tuple[Any, Any]], x_T: Any, steps: int, code_rows: int,
              progress: Progress | None) -> tuple[Any, Any]:  # fmt: skip
    """`call(x, window) -> (x, ys)` over all steps: one call, or one per step reporting `progress`.

    ys (one code row per step of the window, steps on axis -2) are cut to the
    first `code_rows` steps, the ones that carry bits; the step-by-step run
    computes what the one call computes (the same step function, in the same
    order).
    """
    if progress is None:
        x, ys = call(x_T, whole(steps))
        return x, _first_rows(ys, code_rows)
    x, parts = x_T, []
    progress(0, steps)
    for i in range(steps):
        x, ys = call(x, Window(np.int32(i), 1, steps))
        x = jax.block_until_ready(x)
        if i < code_rows:
            parts.append(ys)
        progress(i + 1, steps)
    if not parts or parts[0] is None:
        return x, None
    return x, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=-2), *parts)


def _first_rows(ys: Any, n: int) -> Any:
    return None if ys is None else jax.tree_util.tree_map(lambda a: a[..., :n, :], ys)
