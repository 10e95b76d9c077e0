"""Compressed restoration of one image at the command line's defaults, and its figure.

    python benchmarks/restore_figure.py --image ../shared/data/kodak/kodim23.png \
        --json benchmarks/results/restore_kodim23.json --figure docs/restore_kodim23.png

Runs `ddcm restore IMAGE --task T` with nothing else set, for colorization and
4x super-resolution, and records what the command reports: bytes, bpp, the
consistency of the result with the measurement (PSNR of A(result) vs y at the
coded size), PSNR / LPIPS against the original, wall time. The figure has one
row per task: input | degraded (the measurement as the command saved it) |
restored.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from ddcm_jax.cli import main as ddcm

TASKS = ("colorization", "super-resolution")


def _label(im: Image.Image, text: str) -> Image.Image:
    im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    box = draw.textbbox((6, 6), text)
    draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
    draw.text((6, 6), text, fill=(255, 255, 255))
    return im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--tile", type=int, default=384, help="width of each panel in the figure")
    args = ap.parse_args()
    rows, panels = {}, []
    original = Image.open(args.image).convert("RGB")
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            out, report = Path(tmp) / task, Path(tmp) / f"{task}.json"
            t0 = time.perf_counter()
            code = ddcm(["restore", str(args.image), "--task", task, "-o", str(out), "--json", str(report), "-q"])
            wall = time.perf_counter() - t0
            if code != 0:
                raise SystemExit(f"ddcm restore --task {task} failed ({code})")
            rec = json.loads(report.read_text())["items"][0]
            rows[task] = {k: rec[k] for k in ("bytes", "bpp", "coded_size", "consistency_psnr", "psnr", "lpips")}
            rows[task]["wall_s"] = round(wall, 1)
            stem = out / args.image.stem
            restored = Image.open(stem.with_suffix(".png")).convert("RGB")
            degraded = Image.open(stem.with_name(stem.name + "_degraded.png")).convert("RGB")
            panels.append((task, degraded, restored, rows[task]))
            print(task, rows[task], flush=True)
    if args.json:
        args.json.write_text(json.dumps({"image": args.image.name, "command": "ddcm restore IMAGE --task T",
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip
    if args.figure:
        w = args.tile
        h = round(original.height * w / original.width)
        fig = Image.new("RGB", (3 * w, len(panels) * h), "white")
        for r, (task, degraded, restored, rec) in enumerate(panels):
            small = degraded.size != original.size  # super-resolution's measurement: shown with its pixels
            resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            tiles = [
                _label(original.resize((w, h), Image.Resampling.LANCZOS), "input"),
                _label(degraded.resize((w, h), resample), f"{task}: degraded ({degraded.width}x{degraded.height})"),
                _label(restored.resize((w, h), Image.Resampling.LANCZOS),
                       f"restored: {rec['bytes']} B, consistency {rec['consistency_psnr']:.1f} dB, "
                       f"PSNR {rec['psnr']:.1f} dB, LPIPS {rec['lpips']:.2f}"),
            ]  # fmt: skip
            for c, tile in enumerate(tiles):
                fig.paste(tile, (c * w, r * h))
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.save(args.figure)


if __name__ == "__main__":
    main()
