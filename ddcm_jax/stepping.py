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


def _rows(tree: Any, lo: Any, n: int, total: int) -> Any:
    """Rows [lo, lo + n) of each leaf's leading axis (length `total`); `lo` may be traced.

    The whole axis passes through untouched, so a one-call run is the plain scan.
    """
    if tree is None or n == total:
        return tree
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, lo, n), tree)


class Window(NamedTuple):
    """Steps [lo, lo + n) of `total`; `final` when it ends with the last (sigma = 0) step.

    What one compiled call runs. A whole run is one window (one scan). Run step
    by step (to report progress between calls, with no host callback in the
    program, so that XLA's persistent cache can keep it), `lo` is traced and
    every step reuses one program: the last step runs through it too, as a
    noise-adding step whose noise the sampler zeroes (step index 0), and its
    code row is dropped. One compilation instead of two, per direction.
    """

    lo: Any
    n: int
    total: int
    final: bool

    @property
    def noisy(self) -> int:  # noise-adding steps in the window
        return self.n - int(self.final)

    def schedule(self, xs: Any) -> Any:  # rows of per-step schedule values (a pytree of (total,) arrays)
        return _rows(xs, self.lo, self.n, self.total)

    def code_rows(self, a: Any) -> Any:  # rows of a (total - 1, ...) per-step array
        return _rows(a, self.lo, self.noisy, self.total - 1)


def whole(steps: int) -> Window:
    return Window(0, steps, steps, True)


Progress = Callable[[int, int], None]
"""Called as `progress(done, total)` with the steps run so far: (0, T) before the first, whose call compiles."""


def run_steps(call: Callable[[Any, Window], tuple[Any, Any]], x_T: Any, steps: int,
              progress: Progress | None) -> tuple[Any, Any]:  # fmt: skip
    """`call(x, window) -> (x, ys)` over all steps: one call, or one per step reporting `progress`.

    The ys of the calls (per-step codes, steps on axis -2) are joined; the
    step-by-step run computes what the one call computes (the same step
    function, in the same order).
    """
    if progress is None:
        return call(x_T, whole(steps))
    x, parts = x_T, []
    progress(0, steps)
    for i in range(steps):
        x, ys = call(x, Window(np.int32(i), 1, steps, False))
        x = jax.block_until_ready(x)
        if i < steps - 1:  # the last (sigma = 0) step carries no bits: its row is not part of the code
            parts.append(ys)
        progress(i + 1, steps)
    ys = None if parts[0] is None else jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=-2), *parts)
    return x, ys
