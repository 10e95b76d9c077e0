"""Does the structured "shift" codebook select as well as iid atoms, and what does its speed buy?

    python benchmarks/eval_shift.py --json benchmarks/results/shift_eval.json

1. Score statistics on real residuals. Run DDCM compression of Kodak crops
   with the default model; at every step take the residual r = x - x0_hat and
   score K atoms of an iid (philox) codebook and of a shift codebook. Compare
   the best normalised score max_k <z_k, r> / |r| (what selection gains per
   step; for K iid Gaussian atoms it concentrates near sqrt(2 ln K)) and the
   correlation of the shift scores at neighbouring shifts.
2. Rate-distortion on Kodak crops: iid vs shift at the same (K, T), and shift
   with much larger K and fewer steps at about the same bits, which is what
   O(D log D) scoring makes affordable.
3. Selection time per step for both at each K.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import codec, metrics
from ddcm_jax.codebook import AtomSource
from ddcm_jax.families import load_model
from ddcm_jax.modeldir import default_model_dir
from ddcm_jax.pixel import predict_x0, schedule_xs, step
from ddcm_jax.schedule import Schedule
from ddcm_jax.spec import CodeSpec

HERE = Path(__file__).resolve()


def centre_crop(path: Path, size: int) -> np.ndarray:
    from ddcm_jax.images import load_image

    px, _ = load_image(path)
    h, w = px.shape[:2]
    return px[(h - size) // 2 : (h - size) // 2 + size, (w - size) // 2 : (w - size) // 2 + size]


def score_statistics(model, crops, steps: int, ks: list[int]) -> dict:
    """Normalised best scores of iid and shift codebooks on the residuals of real DDCM runs."""
    xs = schedule_xs(Schedule.create("linear", 1000, str(steps)))
    out: dict = {str(k): {"iid": [], "shift": [], "shift_lag1_corr": []} for k in ks}
    kmax = max(ks)

    @jax.jit
    def one_step(x_t, target, s, root):
        eps = model(x_t[None], s.t[None])[0, ..., :3]
        x0, _ = predict_x0(x_t, eps, s)
        r = target - x0
        iid = AtomSource(kmax, target.shape, "philox", root=root, step=s.i).scores(r)
        shift = AtomSource(kmax, target.shape, "shift", root=root, step=s.i).with_base().scores(r)
        best = iid.argmax()
        x_prev = step(x_t, eps, s, AtomSource(kmax, target.shape, "philox", root=root, step=s.i).get(best[None])[0])
        return x_prev, iid / jnp.linalg.norm(r), shift / jnp.linalg.norm(r)

    for c, px in enumerate(crops):
        target = jnp.asarray(px, jnp.float32) / 127.5 - 1
        x = jax.random.normal(jax.random.key(c), target.shape)
        root = jax.random.key(1000 + c)
        for n in range(steps - 1):
            s = jax.tree_util.tree_map(lambda a, n=n: a[n], xs)
            x, iid, shift = one_step(x, target, s, root)
            iid, shift = np.asarray(iid), np.asarray(shift)
            for k in ks:
                out[str(k)]["iid"].append(float(iid[:k].max()))
                out[str(k)]["shift"].append(float(shift[:k].max()))
                out[str(k)]["shift_lag1_corr"].append(float(np.corrcoef(shift[: k - 1], shift[1:k])[0, 1]))
    return {k: {"iid_mean_best": statistics.mean(v["iid"]), "shift_mean_best": statistics.mean(v["shift"]),
                "sqrt_2_ln_K": math.sqrt(2 * math.log(int(k))),
                "shift_lag1_corr_mean": statistics.mean(v["shift_lag1_corr"]),
                "samples": len(v["iid"])} for k, v in out.items()}  # fmt: skip


def rd(model, crops, runs: list[tuple[str, dict]]) -> dict:
    res = {}
    for label, kw in runs:
        rows = []
        for px in crops:
            t0 = time.perf_counter()
            enc = codec.encode_image(model, px, CodeSpec.create(**kw))
            rows.append({"bpp": enc.payload_bits / (px.shape[0] * px.shape[1]), "psnr": metrics.psnr(px, enc.decoded),
                         "lpips": metrics.lpips(px, enc.decoded), "seconds": time.perf_counter() - t0})  # fmt: skip
        res[label] = {key: statistics.mean(r[key] for r in rows if r[key] is not None) if rows[0][key] is not None
                      else None for key in rows[0]}  # fmt: skip
        print(label, json.dumps(res[label]), flush=True)
    return res


def timing(shape: tuple[int, ...], ks: list[int]) -> dict:
    r = jax.random.normal(jax.random.key(0), shape)
    out = {}
    for k in ks:
        for gen in ("philox", "shift"):
            f = jax.jit(lambda r, k=k, gen=gen: AtomSource(k, shape, gen, root=jax.random.key(1),
                                                             step=jnp.int32(0)).with_base().best(r)[0])  # fmt: skip
            f(r).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(3):
                f(r).block_until_ready()
            out[f"{gen} K={k}"] = (time.perf_counter() - t0) / 3
            print(f"select {gen} K={k}: {out[f'{gen} K={k}'] * 1e3:.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kodak", type=Path, default=HERE.parents[2] / "shared" / "data" / "kodak")
    ap.add_argument("--model", default=None)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = load_model(args.model or default_model_dir())
    crops = [centre_crop(args.kodak / f"kodim{i:02d}.png", args.crop) for i in range(1, args.images + 1)]
    result = {"score_statistics": score_statistics(model, crops[:3], 20, [256, 1024, 4096])}
    print(json.dumps(result["score_statistics"], indent=1), flush=True)
    d = args.crop * args.crop * 3
    result["rate_distortion"] = rd(model, crops, [  # 820 bits per 128 x 128 crop = 0.05 bpp
        ("iid K=1024 T=83", dict(steps=83, codebook_size=1024)),
        ("shift K=1024 T=83", dict(steps=83, codebook_size=1024, generator="shift")),
        ("shift K=2^15 T=56 (825 bits)", dict(steps=56, codebook_size=2**15, generator="shift")),
        (f"shift K=D={d} T=52 (816 bits)", dict(steps=52, codebook_size=d, generator="shift")),
    ])  # fmt: skip
    result["select_seconds"] = timing((args.crop, args.crop, 3), [1024, 4096, 2**15])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
