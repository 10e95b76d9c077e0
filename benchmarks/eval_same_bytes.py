"""JPEG and WebP at exactly our bytes on the 24 Kodak images, whole: coded smaller and scaled back.

    python benchmarks/eval_same_bytes.py --json benchmarks/results/kodak_same_bytes.json

Pillow cannot make a full-size Kodak JPEG smaller than about 8.5 KB or a WebP
smaller than about 5 KB, while our default file is 2,531 bytes. A codec that
must fit fewer bytes codes a smaller picture, as ours does (192 px, scaled back
4x), so that is the fair baseline: for each image, each format and each scale
s in --scales, the photo is scaled down by s (Lanczos, as our `fit` policy
does), given the highest quality whose file is no larger than our .ddcm file
for that image (header, payload and CRC: the whole file), decoded and scaled
back to full size (Lanczos, as our decoder does). PSNR and LPIPS (AlexNet) are
measured on the full-size picture.

Our side is read from `eval_psnr_target.py`'s JSON (its real .ddcm files at
the default M = 128 and the ladder's top M = 512): the same bytes, PSNR and
LPIPS per image. The summary gives, per format, every fixed scale and two
per-image choices of scale (the best LPIPS and the best PSNR, choices an
encoder that has the original can make), with the mean difference to ours and
on how many images ours is better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np
from eval_kodak import at_bytes
from PIL import Image

from ddcm_jax import images, metrics

FORMATS = ("JPEG", "WEBP")


def scaled(pixels: np.ndarray, scale: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    if scale == 1:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((round(w / scale), round(h / scale)), Image.LANCZOS))


def baseline(pixels: np.ndarray, budget: int, fmt: str, scale: int) -> dict:
    """`fmt` at `scale` in at most `budget` bytes, scaled back; `fits` False when even its smallest file is over."""
    h, w = pixels.shape[:2]
    got = at_bytes(scaled(pixels, scale), budget, fmt)
    if not got["fits"]:
        return {"fits": False, "bytes": got["bytes"]}
    back = np.asarray(Image.fromarray(got["decoded"]).resize((w, h), Image.LANCZOS)) if scale > 1 else got["decoded"]
    return {"fits": True, "quality": got["quality"], "bytes": got["bytes"], "psnr": metrics.psnr(pixels, back),
            "lpips": metrics.lpips(pixels, back)}  # fmt: skip


def compare(ours: dict[str, dict], theirs: dict[str, dict]) -> dict:
    """Means of both sides over the images `theirs` covers, and per-image wins of ours."""
    names = sorted(theirs)
    mean = statistics.mean
    return {
        "images": len(names),
        "bytes": mean(theirs[n]["bytes"] for n in names),
        "psnr": mean(theirs[n]["psnr"] for n in names),
        "lpips": mean(theirs[n]["lpips"] for n in names),
        "ours_psnr": mean(ours[n]["psnr"] for n in names),
        "ours_lpips": mean(ours[n]["lpips"] for n in names),
        "ours_minus_psnr": mean(ours[n]["psnr"] - theirs[n]["psnr"] for n in names),
        "ours_minus_lpips": mean(ours[n]["lpips"] - theirs[n]["lpips"] for n in names),
        "ours_better_psnr": sum(ours[n]["psnr"] > theirs[n]["psnr"] for n in names),
        "ours_better_lpips": sum(ours[n]["lpips"] < theirs[n]["lpips"] for n in names),
        "scales": {n: theirs[n]["scale"] for n in names},
    }


def summarise(ours: dict[str, dict], rows: dict[str, dict[str, dict[str, dict]]], scales: list[int]) -> dict:
    out: dict[str, dict] = {}
    for fmt in FORMATS:
        per_scale = {}
        for s in scales:
            fitting = {n: {**rows[n][fmt][str(s)], "scale": s} for n in ours if rows[n][fmt][str(s)]["fits"]}
            per_scale[str(s)] = compare(ours, fitting) if fitting else {"images": 0}
        chosen = {}
        for crit, pick in (("best_lpips", min), ("best_psnr", max)):
            key = "lpips" if crit == "best_lpips" else "psnr"
            best = {}
            for n in ours:
                fitting = [{**r, "scale": int(s)} for s, r in rows[n][fmt].items() if r["fits"]]
                if fitting:
                    best[n] = pick(fitting, key=lambda r, k=key: r[k])
            chosen[crit] = compare(ours, best)
        out[fmt.lower()] = {"per_scale": per_scale, **chosen}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve()
    ap.add_argument("--kodak", type=Path, default=here.parents[2] / "shared" / "data" / "kodak")
    ap.add_argument("--ours", type=Path, default=here.parent / "results" / "kodak_psnr_target.json",
                    help="eval_psnr_target.py's JSON: our encodes per image and M")  # fmt: skip
    ap.add_argument("--points", nargs="+", default=["128", "512"], help="our M values to match")
    ap.add_argument("--scales", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6, 8])
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    encodes = json.loads(args.ours.read_text())["encodes"]
    state = json.loads(args.json.read_text()) if args.json.exists() else {}
    state["meta"] = {"ours": str(args.ours.name), "scales": args.scales, "resample": "Lanczos both ways",
                     "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}  # fmt: skip
    for m in args.points:
        ours = {n: e[m] for n, e in sorted(encodes.items()) if m in e and "lpips" in e[m]}
        point = state.setdefault(f"M{m}", {"rows": {}})
        for n, mine in ours.items():
            pixels, _ = images.load_image(args.kodak / f"{n}.png")
            row = point["rows"].setdefault(n, {})
            for fmt in FORMATS:
                done = row.setdefault(fmt, {})
                for s in args.scales:
                    if str(s) not in done:
                        done[str(s)] = baseline(pixels, mine["bytes"], fmt, s)
            args.json.write_text(json.dumps(state, indent=1))  # resumable: one image at a time
            print(f"M {m} {n}: ours {mine['bytes']} B", flush=True)
        point["ours"] = {"images": len(ours), **{k: statistics.mean(o[k] for o in ours.values())
                                                  for k in ("bytes", "bpp", "psnr", "lpips")}}  # fmt: skip
        point["summary"] = summarise(ours, point["rows"], args.scales)
        args.json.write_text(json.dumps(state, indent=1))


if __name__ == "__main__":
    main()
