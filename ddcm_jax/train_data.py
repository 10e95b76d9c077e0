"""Training photographs: Debian's wallpaper packages plus the photos inside pip wheels.

    ddcm train --fetch-data [--data-cache DIR]     # apt-get download + dpkg -x, no system install

The Debian packages are fetched with `apt-get download` (no root, no install)
and unpacked with `dpkg -x` into a cache folder (default
`$XDG_CACHE_HOME/ddcm_jax/train_data`, or `DDCM_TRAIN_DATA`). Only the files
listed in `DEBIAN_PHOTOS` are used: photographs, chosen by eye from the
packages' contents (abstract renders and drawings are left out). Every file
used is recorded with its package, version, licence (from the package's
machine-readable `copyright`), copyright line and SHA-256.

The Kodak images are the evaluation set and never enter training:
`check_not_kodak` refuses a file whose bytes are a Kodak file's (SHA-256) or
whose content is a Kodak image's, also re-encoded, resized, mirrored or rotated
(correlation of a 16 x 16 grey signature with those of the 24 images, stored
in `kodak_signatures.json`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "DEBIAN_PHOTOS",
    "KodakError",
    "check_not_kodak",
    "default_cache",
    "fetch",
    "locate",
    "package_info",
    "signature",
]

# (package, path inside the package). Photographs only; see the module docstring.
DEBIAN_PHOTOS: tuple[tuple[str, str], ...] = tuple(
    [("lomiri-wallpapers-16.04", f"usr/share/backgrounds/{n}.jpg") for n in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
        "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")]
    + [("lomiri-wallpapers-20.04", f"usr/share/backgrounds/{n}.jpg") for n in (
        "Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus")]
    + [("mate-backgrounds", f"usr/share/backgrounds/mate/nature/{n}.jpg") for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")]
    + [("plasma-workspace-wallpapers", f"usr/share/wallpapers/{n}/contents/images/{s}.jpg") for n, s in (
        ("BytheWater", "2560x1600"), ("ColdRipple", "2560x1600"), ("ColorfulCups", "2560x1600"),
        ("DarkestHour", "2560x1600"), ("EveningGlow", "2560x1600"), ("FallenLeaf", "2560x1600"),
        ("Grey", "2560x1600"), ("Kite", "2560x1600"), ("OneStandsOut", "2560x1600"), ("Path", "2560x1600"),
        ("Volna", "5120x2880"), ("summer_1am", "2560x1600"))]
)  # fmt: skip

_SIGNATURES = Path(__file__).with_name("kodak_signatures.json")
SIGNATURE_SIDE = 16
# Correlations of re-encoded / resized Kodak copies with their own signature are > 0.99;
# the closest distinct photograph (of all the training photos) stays below 0.9.
KODAK_CORRELATION = 0.97


class KodakError(ValueError):
    """A training file is (a copy of) a Kodak image."""


def default_cache() -> Path:
    env = os.environ.get("DDCM_TRAIN_DATA")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ddcm_jax" / "train_data"


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise OSError(f"{cmd[0]} is not installed (the training data comes from Debian packages)") from None
    except subprocess.TimeoutExpired:
        raise OSError(f"{' '.join(cmd)}: no answer in 15 minutes") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise OSError(f"{' '.join(cmd)} failed: {last}")


def _debs(cache: Path) -> dict[str, Path]:
    found = {}
    for deb in sorted((cache / "debs").glob("*.deb")):
        found[deb.name.split("_", 1)[0]] = deb
    return found


def fetch(cache: Path | None = None, packages: Iterable[str] | None = None, *, log=print) -> Path:
    """Download and unpack the wallpaper packages into `cache` (idempotent); returns the cache."""
    cache = Path(cache) if cache is not None else default_cache()
    wanted = sorted(set(packages) if packages is not None else {p for p, _ in DEBIAN_PHOTOS})
    (cache / "debs").mkdir(parents=True, exist_ok=True)
    for pkg in wanted:
        if pkg not in _debs(cache):
            log(f"apt-get download {pkg}")
            _run(["apt-get", "download", pkg], cache / "debs")
        deb = _debs(cache)[pkg]
        target = cache / "pkgs" / pkg
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(deb), str(target)], cache)
            (target / ".complete").write_text(deb.name)
    return cache


def locate(cache: Path, package: str, path: str) -> Path:
    target = cache / "pkgs" / package
    if not (target / ".complete").exists():
        raise ValueError(f"debian:{package}: not fetched into {cache} (run: ddcm train --fetch-data)")
    found = target / path
    if not found.is_file():
        raise ValueError(f"debian:{package}/{path}: not in the unpacked package under {target}")
    return found


def _copyright_paragraphs(text: str) -> list[dict[str, str]]:
    paras, cur, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                paras.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    if cur:
        paras.append(cur)
    return paras


def package_info(cache: Path, package: str, path: str) -> dict[str, str]:
    """Version, licence and copyright of one file, from the .deb name and the DEP-5 copyright file."""
    deb = _debs(cache).get(package)
    version = deb.name.split("_")[1].replace("%3a", ":") if deb is not None else "unknown"
    licence, holder = "unknown", ""
    doc = cache / "pkgs" / package / "usr" / "share" / "doc" / package / "copyright"
    if doc.is_file():
        name = Path(path).name
        generic, specific = None, None
        for para in _copyright_paragraphs(doc.read_text(errors="replace")):
            for pattern in para.get("files", "").split():
                if pattern.startswith("debian/"):
                    continue
                base = Path(pattern).name
                # Debian lists source-tree paths; the package installs them elsewhere: a named file
                # matches by its name, a glob by the tail of the installed path. Last match wins (DEP-5).
                if not any(c in base for c in "*?["):
                    if base == name:
                        specific = para
                elif fnmatch.fnmatch(path, "*" + pattern.lstrip("*")) or pattern == "*":
                    generic = para
        para = specific or generic
        if para is not None:
            licence = para.get("license", licence).splitlines()[0] or licence
            holder = para.get("copyright", holder).splitlines()[0]
    return {"package": package, "version": version, "licence": licence, "copyright": holder}


# --- the Kodak guard ------------------------------------------------------------------------------


def signature(pixels: np.ndarray) -> np.ndarray:
    """(16, 16) zero-mean, unit-norm grey thumbnail: what re-encoding and resizing leave unchanged."""
    from PIL import Image

    grey = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).resize((SIGNATURE_SIDE, SIGNATURE_SIDE),
                                                                        Image.BOX)  # fmt: skip
    s = np.asarray(img, np.float64)
    s -= s.mean()
    return s / max(float(np.linalg.norm(s)), 1e-12)


def _variants(s: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(4):
        r = np.rot90(s, k)
        out += [r, r[:, ::-1]]
    return out


def _kodak() -> tuple[set[str], np.ndarray]:
    data = json.loads(_SIGNATURES.read_text())
    sigs = np.array([np.frombuffer(bytes.fromhex(e["signature"]), np.int8) for e in data["images"]], np.float64)
    sigs = sigs.reshape(-1, SIGNATURE_SIDE, SIGNATURE_SIDE)
    sigs -= sigs.mean(axis=(1, 2), keepdims=True)
    sigs /= np.linalg.norm(sigs, axis=(1, 2), keepdims=True)
    return {e["sha256"] for e in data["images"]}, sigs


def kodak_similarity(pixels: np.ndarray) -> float:
    """Largest correlation of the image's signature with any Kodak image (any rotation or mirror)."""
    _, sigs = _kodak()
    s = signature(pixels)
    return max(float(np.max(np.einsum("kij,ij->k", sigs, v))) for v in _variants(s))


def check_not_kodak(name: str, data: bytes, pixels: np.ndarray) -> float:
    """Refuse (KodakError) a Kodak file or a copy of a Kodak image's content; returns the similarity."""
    digests, _ = _kodak()
    if hashlib.sha256(data).hexdigest() in digests or re.search(r"kodim\d\d", name.lower()):
        raise KodakError(f"{name}: is a Kodak image; Kodak is the evaluation set and is never trained on")
    sim = kodak_similarity(pixels)
    if sim > KODAK_CORRELATION:
        raise KodakError(f"{name}: its content matches a Kodak image (correlation {sim:.3f}); "
                         "Kodak is the evaluation set and is never trained on")  # fmt: skip
    return sim


def write_signatures(kodak_dir: Path) -> None:
    """Regenerate `kodak_signatures.json` from the 24 Kodak PNGs (developer tool)."""
    from ddcm_jax.images import load_image

    entries = []
    for path in sorted(Path(kodak_dir).glob("kodim*.png")):
        pixels, _ = load_image(path)
        q = np.clip(np.round(signature(pixels) * 127 / np.abs(signature(pixels)).max()), -127, 127).astype(np.int8)
        entries.append({"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "signature": q.tobytes().hex()})  # fmt: skip
    _SIGNATURES.write_text(json.dumps({"side": SIGNATURE_SIDE, "images": entries}, indent=1) + "\n")
