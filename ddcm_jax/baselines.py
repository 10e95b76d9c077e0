"""The image codecs a user would pick instead of ours, run one way for `ddcm eval`: JPEG, WebP, AVIF, JPEG XL.

    jpeg = BASELINES["jpeg"]
    data = jpeg.encode(pixels, 30)             # (H, W, 3) uint8 -> file bytes at quality 30
    back = jpeg.decode(data)                   # -> (H, W, 3) uint8
    hit = at_bytes(jpeg, pixels, budget=2531)  # the largest quality whose file fits 2,531 bytes

Each codec is a frozen `Baseline`: its library and encoder settings (recorded in the results, so a
number can be reproduced with the codec's own tools), its quality range, and the ladder of qualities
`ddcm eval` measures. JPEG, WebP and AVIF come from Pillow (libjpeg, libwebp, libavif as Pillow's
wheels ship them); JPEG XL from `imagecodecs` (libjxl). A codec whose library is missing is reported
by `missing_reason`, never faked.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["BASELINES", "Baseline", "at_bytes", "resample"]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One codec: `encode(pixels, quality) -> bytes`, `decode(bytes) -> pixels`, its qualities."""

    name: str  # the results' "name"
    suffix: str  # of the files it writes
    qualities: tuple[int, int]  # the encoder's quality range, both ends included; size grows with quality
    ladder: tuple[int, ...]  # the qualities of its rate-distortion curve
    settings: str  # every encoder setting besides the quality, as the results' description states it
    _encode: Callable[[np.ndarray, int], bytes]
    _decode: Callable[[bytes], np.ndarray]
    _library: Callable[[], str]  # the library and version; raises ImportError / OSError when missing

    def encode(self, pixels: np.ndarray, quality: int) -> bytes:
        """(H, W, 3) uint8 RGB -> the codec's file at `quality` (in `qualities`)."""
        lo, hi = self.qualities
        if not lo <= quality <= hi:
            raise ValueError(f"{self.name}: quality {quality} is outside {lo}..{hi}")
        return self._encode(np.ascontiguousarray(pixels, np.uint8), quality)

    def decode(self, data: bytes) -> np.ndarray:
        """The codec's file -> (H, W, 3) uint8 RGB."""
        out = np.asarray(self._decode(data))
        if out.ndim == 2:
            out = np.repeat(out[..., None], 3, axis=2)
        return np.ascontiguousarray(out[..., :3], np.uint8)

    def library(self) -> str:
        return self._library()

    def missing_reason(self) -> str | None:
        """Why this codec cannot run here (None when it can)."""
        try:
            self._library()
        except (ImportError, OSError, RuntimeError) as e:
            return str(e)
        return None

    def describe(self) -> str:
        return f"{self.library()}; {self.settings}"


def _pillow_encode(fmt: str, **options: Any) -> Callable[[np.ndarray, int], bytes]:
    def encode(pixels: np.ndarray, quality: int) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, quality=quality, **options)
        return buf.getvalue()

    return encode


def _pillow_decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _pillow_library(feature: str, label: str) -> Callable[[], str]:
    def library() -> str:
        import PIL
        from PIL import features

        if not features.check(feature):
            raise ImportError(f"{label}: this Pillow ({PIL.__version__}) was built without {feature}")
        return f"Pillow {PIL.__version__} ({label} {features.version(feature)})"

    return library


def _jxl_encode(pixels: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(pixels, level=quality, effort=7))


def _jxl_decode(data: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpegxl_decode(data)


def _jxl_library() -> str:
    try:
        import imagecodecs
    except ImportError:
        raise ImportError("JPEG XL needs imagecodecs (pip install imagecodecs, or the eval extra)") from None
    if not imagecodecs.JPEGXL.available:
        raise ImportError(f"imagecodecs {imagecodecs.__version__} was built without JPEG XL")
    return f"imagecodecs {imagecodecs.__version__} ({imagecodecs.jpegxl_version()})"


BASELINES: dict[str, Baseline] = {
    "jpeg": Baseline(
        "JPEG", ".jpg", (1, 95), (2, 5, 10, 20, 30, 50, 75, 90),
        "Pillow's JPEG encoder, optimize=True (optimised Huffman tables), 4:2:0 chroma subsampling, baseline",
        _pillow_encode("JPEG", optimize=True, subsampling="4:2:0"), _pillow_decode, _pillow_library("jpg", "libjpeg"),
    ),
    "webp": Baseline(
        "WebP", ".webp", (0, 100), (0, 5, 10, 20, 30, 50, 75, 90),
        "lossy, method=6 (slowest, best compression)",
        _pillow_encode("WEBP", method=6), _pillow_decode, _pillow_library("webp", "libwebp"),
    ),
    "avif": Baseline(
        "AVIF", ".avif", (0, 100), (0, 10, 20, 30, 40, 50, 65, 80),
        "Pillow's AVIF encoder (libavif, its default AV1 codec), speed=4, 4:2:0 chroma subsampling",
        _pillow_encode("AVIF", speed=4, subsampling="4:2:0"), _pillow_decode, _pillow_library("avif", "libavif"),
    ),
    "jxl": Baseline(
        "JPEG XL", ".jxl", (0, 100), (0, 10, 20, 30, 40, 50, 65, 80),
        "libjxl through imagecodecs.jpegxl_encode, level=quality (libjxl's quality -> distance mapping), effort=7",
        _jxl_encode, _jxl_decode, _jxl_library,
    ),
}


def resample(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos resampling to (height, width), as our own `fit` policy scales."""
    from PIL import Image

    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.LANCZOS))


@dataclasses.dataclass(frozen=True)
class AtBytes:
    """The codec's file for a byte budget: the largest quality that fits, or its smallest file (`fits` False)."""

    quality: int
    data: bytes
    fits: bool


def at_bytes(codec: Baseline, pixels: np.ndarray, budget: int) -> AtBytes:
    """The largest quality whose file is at most `budget` bytes, by bisection over the quality (file size
    grows with quality; where a codec's is not monotone, the bisection may miss a larger fitting quality,
    never return one that does not fit)."""
    lo, hi = codec.qualities
    smallest = codec.encode(pixels, lo)
    if len(smallest) > budget:
        return AtBytes(lo, smallest, False)
    best = smallest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        data = codec.encode(pixels, mid)
        if len(data) <= budget:
            lo, best = mid, data
        else:
            hi = mid - 1
    return AtBytes(lo, best, True)
