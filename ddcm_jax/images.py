"""Image files in and out: any Pillow-readable input to RGB, size policies, atomic PNG writes.

Size policies (the model sees an image of the "coded" size; the decoder
restores the geometry recorded in the bitstream header):

  crop    (default, as the original DDCM code) centre crop to a square of side
          m = min(H0, W0), resized to the model's native size. Decoding returns
          that square at its original side m (the cropped-away borders were
          never coded).
  resize  resize the whole image to the native square (aspect not kept);
          decoding resizes back to H0 x W0.
  pad     keep the resolution: pad the bottom and right edges (replicating
          the last row/column) up to a multiple of the network's size multiple;
          decoding crops the padding away, so the output is exactly H0 x W0.
          Needs a fully convolutional model (ADM is).

Resampling is Pillow's BICUBIC (antialiased when reducing). Pixels map to the
model's range by x = p / 127.5 - 1 and back by round((x + 1) * 127.5), clipped.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from ddcm_jax import interrupt

try:
    import fcntl
except ImportError:  # not POSIX: commits are not locked against each other
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_CODING_SIZE",
    "MAX_PIXELS",
    "POLICIES",
    "ImageError",
    "coded_size",
    "commit_files",
    "fit_content",
    "from_model",
    "load_image",
    "load_mask",
    "png_bytes",
    "prepare",
    "reference",
    "restore_geometry",
    "to_model",
    "write_atomic",
]

POLICIES = ("fit", "crop", "resize", "pad")
DEFAULT_CODING_SIZE = 192  # the fit policy's longer side (README: how it was chosen)
MAX_PIXELS = 16384 * 16384  # also the bitstream's side limit squared
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".tga"}


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""


def load_image(path: str | os.PathLike, *, budget: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(H, W, 3) uint8 RGB pixels and notes on any conversion that was needed.

    Grayscale, palette, alpha (composited onto white), CMYK and 16-bit inputs
    become 8-bit RGB; EXIF orientation is applied. Images over MAX_PIXELS, or whose
    decoding would need more than `budget` bytes, are refused before their pixels are decoded.
    """
    path = Path(path)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{path}: {w}x{h} is larger than {MAX_PIXELS} pixels")
                if budget is not None:
                    from ddcm_jax.memory import MemoryBudgetError, check_host

                    try:
                        check_host("load", h, w, what=str(path), budget=budget)
                    except MemoryBudgetError as e:
                        raise ImageError(str(e)) from None
                img.load()
                orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation tag
                if orientation not in (1, None):
                    img = ImageOps.exif_transpose(img)
                    notes.append(f"EXIF orientation {orientation} applied")
                pixels = _to_rgb(img, notes)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    return pixels, notes


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """An inpainting mask from an image: (H, W, 1) float32, 1 where observed (white: mean >= 128), else 0."""
    pixels, _ = load_image(path)
    return (pixels.mean(axis=-1, keepdims=True) >= 128).astype(np.float32)


def _to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        notes.append(f"{mode} ({'16' if mode.startswith('I;16') or a.max() > 255 else '32'}-bit) "
                     "input reduced to 8-bit grayscale")  # fmt: skip
        if a.max() > 255:
            a = a / 257.0
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        notes.append("float input: values clipped to 0..255 and rounded")
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        notes.append(f"{mode} input: alpha composited onto white")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        notes.append(f"{mode} input converted to RGB")
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def fit_content(original: tuple[int, int], coded: tuple[int, int]) -> tuple[int, int]:
    """Under the fit policy, the (h, w) of the picture inside the (padded) coded frame.

    A pure function of the header's two sizes: either the input was not scaled
    (it fits the frame: content = original) or its longer side was scaled to the
    frame's (then the frame is smaller than the input along that side).
    """
    (h0, w0), (hc, wc) = original, coded
    if hc >= h0 and wc >= w0:
        return h0, w0
    side = hc if h0 >= w0 else wc
    s = side / max(h0, w0)
    return (side, max(1, round(w0 * s))) if h0 >= w0 else (max(1, round(h0 * s)), side)


def coded_size(original: tuple[int, int], policy: str, native: int, multiple: int) -> tuple[int, int]:
    """(H, W) the model sees for an (H0, W0) input under `policy`.

    `native`: the square side of crop / resize, or the longer side of fit (rounded down
    to the network's `multiple`; inputs already smaller are not enlarged).
    """
    h0, w0 = original
    if policy in ("crop", "resize"):
        return native, native
    if policy == "fit":
        side = max(multiple, native - native % multiple)
        if max(h0, w0) > side:
            s = side / max(h0, w0)
            h, w = (side, max(1, round(w0 * s))) if h0 >= w0 else (max(1, round(h0 * s)), side)
            return -(-h // multiple) * multiple, -(-w // multiple) * multiple
        policy = "pad"
    if policy == "pad":
        return -(-h0 // multiple) * multiple, -(-w0 // multiple) * multiple
    raise ValueError(f"unknown size policy {policy!r} ({', '.join(POLICIES)})")


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if pixels.shape[:2] == tuple(size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.BICUBIC))


def _centre_square(pixels: np.ndarray) -> np.ndarray:
    h, w = pixels.shape[:2]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return pixels[top : top + m, left : left + m]


def prepare(pixels: np.ndarray, policy: str, native: int, multiple: int) -> np.ndarray:
    """The coded image (H, W, 3) uint8 for an input (H0, W0, 3) under `policy`."""
    size = coded_size(pixels.shape[:2], policy, native, multiple)
    if policy == "crop":
        return _resize(_centre_square(pixels), size)
    if policy == "resize":
        return _resize(pixels, size)
    if policy == "fit":
        h, w = fit_content(pixels.shape[:2], size)
        if (h, w) != pixels.shape[:2]:
            pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.LANCZOS))
    # Edge padding: the network sees a plausible continuation, not a black band.
    h0, w0 = pixels.shape[:2]
    return np.pad(pixels, ((0, size[0] - h0), (0, size[1] - w0), (0, 0)), mode="edge")


def restore_geometry(coded: np.ndarray, policy: str, original: tuple[int, int]) -> np.ndarray:
    """Decoder side: the coded image back to the geometry the policy promises."""
    h0, w0 = original
    if policy == "crop":
        m = min(h0, w0)
        return _resize(coded, (m, m))
    if policy == "resize":
        return _resize(coded, (h0, w0))
    if policy == "pad":
        return coded[:h0, :w0]
    if policy == "fit":
        h, w = fit_content((h0, w0), coded.shape[:2])
        if (h, w) == (h0, w0):
            return coded[:h, :w]
        # Lanczos: sharper than bicubic for the 3-4x enlargements this policy makes (LPIPS 0.384 vs 0.388
        # on kodim23 at the medium level).
        return np.asarray(Image.fromarray(coded[:h, :w]).resize((w0, h0), Image.LANCZOS))
    return coded


def reference(pixels: np.ndarray, policy: str) -> np.ndarray:
    """The part of the input a decoded image should be compared with."""
    return _centre_square(pixels) if policy == "crop" else pixels


def to_model(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return (np.asarray(pixels, np.float32) / 127.5 - 1.0).astype(np.float32)


def from_model(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8, rounded and clipped."""
    return np.clip(np.round((np.asarray(x, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG file's bytes for uint8 (H, W, 3) pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def commit_files(files: dict[Path, bytes]) -> None:
    """Write several files all or nothing: every one to a temporary name, then rename them all.

    Guarantees (README, "Safety"):
      - a failed commit leaves every target as it was before the call: a file it had
        already replaced is put back from a hard link (or copy) kept for the purpose;
      - commits into one folder from several processes do not interleave: the renames
        run under an exclusive lock on the folder, so the files of one call (an image's
        `.ddcm` and its reconstruction) are always seen together, from the same call.
    A target that is a folder is refused before anything is written. Ctrl-C in the
    command line waits for a commit to end (ddcm_jax.interrupt).
    """
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise IsADirectoryError(f"{path}: is a folder, not a file")
    with interrupt.committing():
        _commit(files)


def _commit(files: dict[Path, bytes]) -> None:
    staged: list[tuple[str, Path]] = []
    kept: list[tuple[Path, str | None]] = []  # (target, what it was: a kept link, or None if absent)
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_parts(path)
            fd, tmp = tempfile.mkstemp(prefix=_part_prefix(path), suffix=".part", dir=path.parent)
            interrupt.register(tmp)
            staged.append((tmp, path))
            os.fchmod(fd, _umask_mode())  # mkstemp creates 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        with _folder_locks({path.parent for path in files}):
            for tmp, path in staged:
                kept.append((path, _keep(path)))
                os.replace(tmp, path)
                interrupt.unregister(tmp)
            try:
                for _, keep in kept:
                    if keep is not None:
                        os.unlink(keep)
                        interrupt.unregister(keep)
            except OSError:
                pass  # a leftover kept link is removed by the next commit (remove_stale_parts)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            interrupt.unregister(tmp)
        for path, keep in reversed(kept):
            with contextlib.suppress(OSError):
                if keep is None:
                    os.unlink(path)
                else:
                    os.replace(keep, path)
            if keep is not None:
                interrupt.unregister(keep)
        raise


def _keep(path: Path) -> str | None:
    """Keep what `path` is now under a temporary name (a hard link, else a copy); None if absent.

    The name has the `.part` form of this process, so that if it is killed before the
    commit ends, a later run removes the leftover like any other temporary.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    keep = f"{path.parent / _part_prefix(path)}keep{os.urandom(2).hex()}.part"
    interrupt.register(keep)
    try:
        os.link(path, keep, follow_symlinks=False)
    except OSError:  # no hard links here: copy (a symlink stays a symlink)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), keep)
        else:
            shutil.copy2(path, keep)
    return keep


@contextlib.contextmanager
def _folder_locks(folders: set[Path]) -> Iterator[None]:
    """Hold an exclusive flock on each folder (in one order, so two callers cannot deadlock)."""
    with contextlib.ExitStack() as stack:
        for folder in sorted(folders, key=str):
            try:
                fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:
                continue  # an unreadable folder cannot be locked; its renames still run
            stack.callback(os.close, fd)
            if fcntl is not None:
                with contextlib.suppress(OSError):  # filesystems without flock: no lock, as before
                    fcntl.flock(fd, fcntl.LOCK_EX)
        yield


# Temporaries are named `.NAME.HOST~PID.XXXXXXXX.part` beside their target, so that a later run
# can tell its own leftovers from a live writer's: a process killed between writing and
# renaming (SIGKILL, power loss) leaves one behind, and nothing else would ever remove it.
_PART_AGE_UNTAGGED = 3600.0  # seconds; `.NAME.XXXXXXXX.part` files of versions before the tag


def _host_tag() -> str:
    return "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:64] or "host"


def _part_prefix(path: Path) -> str:
    return f".{path.name}.{_host_tag()}~{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_parts(path: Path) -> list[Path]:
    """Remove temporaries of `path` left by writers on this host that no longer run; returns them."""
    removed: list[Path] = []
    head = f".{path.name}."
    host = _host_tag()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(head) and name.endswith(".part")) or not entry.is_file(follow_symlinks=False):
            continue
        middle = name[len(head) : -len(".part")]
        tag, _, rand = middle.rpartition(".")
        if tag:  # HOST~PID.RANDOM
            h, _, pid = tag.rpartition("~")
            if h != host or not pid.isdigit() or _pid_alive(int(pid)):
                continue
        elif not (len(rand) == 8 and time.time() - entry.stat(follow_symlinks=False).st_mtime > _PART_AGE_UNTAGGED):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _umask_mode() -> int:
    """0o666 under the process umask: what a plain open() would have created."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike, write: bytes | Callable[[BinaryIO], object]) -> None:
    """Call write(file) on a temporary file in the target's folder, then rename it into place.

    `write` is a callable taking a binary file object, or bytes to write. On any
    failure the temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path)
    fd, tmp = tempfile.mkstemp(prefix=_part_prefix(path), suffix=".part", dir=path.parent)
    interrupt.register(tmp)
    try:
        os.fchmod(fd, _umask_mode())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, bytes | bytearray):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        interrupt.unregister(tmp)


def report_target_problem(path: str | os.PathLike) -> str | None:
    """Why a summary cannot be written to `path` (None when it can), checked before any work."""
    try:
        st = os.stat(path)  # follows symlinks: what a write would reach
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        return "is neither a regular file, a character device nor a pipe"
    return None


def write_report(path: str | os.PathLike, data: bytes) -> None:
    """Write a summary to `path` without changing what `path` is.

    A regular file (or a new one) is replaced atomically; a symlink is followed and its
    target written (the link stays a link); a character device or pipe (/dev/stdout,
    /dev/null, a process substitution) is written through, never replaced by a file.
    """
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    try:
        st = os.stat(target)
    except FileNotFoundError:
        write_atomic(target, data)
        return
    if stat.S_ISREG(st.st_mode):
        write_atomic(target, data)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        with open(target, "wb") as f:
            f.write(data)
    else:
        raise OSError(f"{path}: {report_target_problem(target) or 'cannot be written'}")
