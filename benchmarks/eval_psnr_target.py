"""Quality targets on the 24 Kodak images, whole, with the packaged default model.

    python benchmarks/eval_psnr_target.py --json benchmarks/results/kodak_psnr_target.json [--target 22]

Every image is coded as `ddcm roundtrip IMAGE --psnr P` codes it: the command
line's default settings (turbo, T = 30, K = 1024, the `fit` policy at 192 px,
seed 0), the ladder of `rate.ladder` (M = 1, 2, 4, ..., 512) and the search of
`rate.search` started at the default M = 128. Each encode is a real .ddcm file
through `ddcm_jax.codec`, cached in the JSON by (image, M), so the run resumes
and a second target reuses the encodes of the first.

Without --target, the run codes every image at the default point (the README's
whole-image table: bpp, PSNR, LPIPS, JPEG and WebP at the same bytes) and at the
top of the ladder (the best PSNR a target can reach; also with LPIPS, JPEG, WebP). With --target P it runs
the search on every image and compares its mean rate with the best fixed
operating point: the lowest M whose PSNR reaches P on every image that the
search brought to P; that point is encoded on every such image to check it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
from eval_kodak import at_bytes

from ddcm_jax import codec, images, metrics, rate
from ddcm_jax.families import load_model
from ddcm_jax.modeldir import default_model_dir
from ddcm_jax.spec import CodeSpec

DEFAULT = CodeSpec.create(steps=30, codebook_size=1024, num_atoms=128, rule="turbo")  # the CLI's "medium"
CODING = {"size_policy": "fit", "coding_size": 192}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kodak", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak")
    ap.add_argument("--json", type=Path, required=True, help="results and the encode cache (resumed)")
    ap.add_argument("--target", type=float, default=None, help="P dB: run the search")
    ap.add_argument("--limit", type=int, default=24)
    args = ap.parse_args()

    state = json.loads(args.json.read_text()) if args.json.exists() else {}
    cache: dict[str, dict[str, dict]] = state.setdefault("encodes", {})
    model = load_model(default_model_dir())
    points = rate.ladder(DEFAULT)
    start = points.index(DEFAULT)
    names = [f"kodim{i:02d}" for i in range(1, args.limit + 1)]
    pixels = {n: images.load_image(args.kodak / f"{n}.png")[0] for n in names}

    def save() -> None:
        state["meta"] = {"model": "default", "settings": "turbo T=30 K=1024 fit 192 seed 0",
                         "ladder_m": [p.rule.num_atoms for p in points], "machine": platform.processor()
                         or platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__}  # fmt: skip
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(args.json)

    def encode(name: str, i: int, full: bool = False) -> dict:
        """The point's encode of image `name` (cached); `full` adds LPIPS and JPEG / WebP at the same bytes."""
        m = str(points[i].rule.num_atoms)
        row = cache.setdefault(name, {}).get(m)
        if row is None or (full and "lpips" not in row):
            px = pixels[name]
            t0 = time.perf_counter()
            enc = codec.encode_image(model, px, points[i], **CODING)
            n = px.shape[0] * px.shape[1]
            row = {"bytes": len(enc.data), "payload_bits": enc.payload_bits, "bpp": 8 * len(enc.data) / n,
                   "psnr": metrics.psnr(px, enc.decoded), "seconds": time.perf_counter() - t0}  # fmt: skip
            if full:
                row["lpips"] = metrics.lpips(px, enc.decoded)
                for fmt in ("JPEG", "WEBP"):
                    ref = at_bytes(px, len(enc.data), fmt)
                    row[fmt.lower()] = {"quality": ref["quality"], "bytes": ref["bytes"], "fits": ref["fits"],
                                        "bpp": 8 * ref["bytes"] / n, "psnr": metrics.psnr(px, ref["decoded"]),
                                        "lpips": metrics.lpips(px, ref["decoded"])}  # fmt: skip
            cache[name][m] = row
            save()
            print(f"{name} M={m}: {row['bytes']} B, {row['bpp']:.4f} bpp, {row['psnr']:.2f} dB, "
                  f"{row['seconds']:.1f} s", flush=True)  # fmt: skip
        return row

    if args.target is None:
        for name in names:
            encode(name, start, full=True)
            encode(name, len(points) - 1, full=True)
        rows = [cache[n][str(DEFAULT.rule.num_atoms)] for n in names]
        state["default_table"] = {
            "images": len(rows), **{k: statistics.mean(r[k] for r in rows) for k in ("bytes", "bpp", "psnr", "lpips")},
            **{f"{f}_{k}": statistics.mean(r[f][k] for r in rows) for f in ("jpeg", "webp")
               for k in ("bytes", "bpp", "psnr", "lpips")},
            **{f"{f}_fits": sum(r[f]["fits"] for r in rows) for f in ("jpeg", "webp")},
            "seconds_per_image": statistics.mean(r["seconds"] for r in rows)}  # fmt: skip
        top = str(points[-1].rule.num_atoms)
        state["top_psnr"] = {n: cache[n][top]["psnr"] for n in names}
        state["top_lpips"] = {n: cache[n][top]["lpips"] for n in names}
        save()
        print(json.dumps(state["default_table"], indent=1))
        return

    p = args.target
    found = {}
    for name in names:
        i = rate.search(len(points), lambda j, name=name: encode(name, j)["psnr"] >= p, start)
        found[name] = i
    reached = [n for n in names if cache[n][str(points[found[n]].rule.num_atoms)]["psnr"] >= p]
    fixed = max(found[n] for n in reached) if reached else len(points) - 1
    fixed_psnr = {n: encode(n, fixed)["psnr"] for n in reached}  # checks the fixed point on each image
    m_fixed = str(points[fixed].rule.num_atoms)

    def mean_bpp(ms: dict[str, str]) -> float:
        return statistics.mean(cache[n][ms[n]]["bpp"] for n in ms)

    searched = {n: str(points[found[n]].rule.num_atoms) for n in reached}
    state.setdefault("targets", {})[f"{p:g}"] = {
        "target_db": p, "images": len(names), "reached": len(reached),
        "missed": {n: cache[n][str(points[-1].rule.num_atoms)]["psnr"] for n in names if n not in reached},
        "per_image_m": {n: points[found[n]].rule.num_atoms for n in names},
        "search_bpp_mean": mean_bpp(searched) if reached else None,
        "fixed_m": int(m_fixed), "fixed_bpp_mean": mean_bpp({n: m_fixed for n in reached}) if reached else None,
        "fixed_reaches_all": all(v >= p for v in fixed_psnr.values()),
        "fixed_min_psnr": min(fixed_psnr.values()) if fixed_psnr else None,
        "encodes_per_image_if_uncached": {n: _cost(len(points), start, found[n], cache[n], points, p) for n in names},
    }  # fmt: skip
    save()
    print(json.dumps({k: v for k, v in state["targets"][f"{p:g}"].items() if k != "encodes_per_image_if_uncached"},
                     indent=1))  # fmt: skip


def _cost(n: int, start: int, found: int, rows: dict, points: list, p: float) -> int:
    """How many encodes `ddcm --psnr` itself makes on this image (it has no cache across runs)."""
    calls: set[int] = set()

    def reaches(j: int) -> bool:
        calls.add(j)
        return rows[str(points[j].rule.num_atoms)]["psnr"] >= p

    assert rate.search(n, reaches, start) == found
    return len(calls)


if __name__ == "__main__":
    main()
