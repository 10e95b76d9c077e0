"""Linear degradations y = A(x) for compressed posterior sampling, as pytrees.

Each operator maps one image (H, W, C) to its observation and is a registered
dataclass: arrays (a mask, a blur sigma) are leaves, so a new mask does not
recompile and gradients reach them; sizes and factors are static.

Super-resolution uses exactly this kernel (MATLAB `imresize` semantics for an
integer factor f): Keys' cubic convolution with a = -0.5, stretched by f
(4f taps), sampled at half-pixel centres (output j sits at input coordinate
(j + 0.5) f - 0.5), weights normalised to sum to 1, symmetric (half-sample)
boundary extension. It is separable and applied as two small matrices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.pytree import pytree_dataclass, static_field

__all__ = ["Colorization", "GaussianBlur", "Inpainting", "SuperResolution", "operator_by_name"]


@pytree_dataclass
class Colorization:
    """Grayscale observation: the channel mean, (H, W, 3) -> (H, W, 1)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=-1, keepdims=True)


@pytree_dataclass
class Inpainting:
    """Observation of the pixels where `mask` (H, W, 1 or C) is 1, zeros elsewhere."""

    mask: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jnp.broadcast_to(jnp.asarray(self.mask, x.dtype), x.shape)


def _keys_cubic(s: np.ndarray, a: float = -0.5) -> np.ndarray:
    s = np.abs(s)
    return np.where(
        s <= 1, (a + 2) * s**3 - (a + 3) * s**2 + 1,
        np.where(s < 2, a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a, 0.0),
    )  # fmt: skip


def _symmetric(i: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric extension: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ..."""
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n: int, factor: int) -> np.ndarray:
    """(n // factor, n) antialiased bicubic downsampling matrix (float64)."""
    if n % factor:
        raise ValueError(f"size {n} is not divisible by the factor {factor}")
    m = n // factor
    out = np.zeros((m, n))
    for j in range(m):
        centre = (j + 0.5) * factor - 0.5
        taps = np.arange(int(np.floor(centre - 2 * factor)), int(np.ceil(centre + 2 * factor)) + 1)
        w = _keys_cubic((taps - centre) / factor)
        np.add.at(out[j], _symmetric(taps, n), w)
        out[j] /= w.sum()
    return out


@pytree_dataclass
class SuperResolution:
    """Downsampling by an integer factor with the antialiased bicubic kernel above."""

    factor: int = static_field()

    def __call__(self, x: jax.Array) -> jax.Array:
        h, w = x.shape[-3], x.shape[-2]
        mh = jnp.asarray(bicubic_matrix(h, self.factor), x.dtype)
        mw = jnp.asarray(bicubic_matrix(w, self.factor), x.dtype)
        return jnp.einsum("ih,jw,hwc->ijc", mh, mw, x)


@pytree_dataclass
class GaussianBlur:
    """Separable Gaussian blur, `kernel_size` taps (odd), std `sigma`; reflect boundary."""

    sigma: jax.Array
    kernel_size: int = static_field(9)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        r = self.kernel_size // 2
        offsets = jnp.arange(-r, r + 1, dtype=x.dtype)
        k = jnp.exp(-0.5 * jnp.square(offsets / self.sigma))
        k = k / jnp.sum(k)
        h, w = x.shape[-3], x.shape[-2]
        xp = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
        rows = sum(k[o] * xp[o : o + h] for o in range(self.kernel_size))
        return sum(k[o] * rows[:, o : o + w] for o in range(self.kernel_size))


def operator_by_name(name: str, **kwargs: object) -> object:
    """'colorization' | 'inpainting' (mask=) | 'super-resolution' (factor=) | 'blur' (sigma=, kernel_size=)."""
    makers = {
        "colorization": Colorization,
        "inpainting": Inpainting,
        "super-resolution": SuperResolution,
        "super_resolution": SuperResolution,
        "blur": GaussianBlur,
    }
    if name not in makers:
        raise ValueError(f"unknown operator {name!r} ({', '.join(sorted(makers))})")
    return makers[name](**kwargs)
