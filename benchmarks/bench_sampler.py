"""Where a DDCM step's time goes, what decoding costs, and batched compression throughput.

    python benchmarks/bench_sampler.py --json benchmarks/results/sampler_cpu.json

Per configuration (ADM architecture, batch B, T steps, K atoms), all in one run:
  network     T calls of the network alone (one jitted scan)
  plain       plain DDIM sampling (`ddcm_jax.sample`: the same scan, fresh Gaussian noise)
  compress    `ddcm_jax.compress` (DDCM rule, philox codebooks)
  decompress  `ddcm_jax.decompress` of those indices (regenerates only the chosen atoms)
and derived per-step splits: network, codebook = compress - plain, rest = plain
- network; and decompress / plain, the decoder's overhead over plain sampling.
Then images per second of batched `compress` for B in --throughput-batches.
Median of --repeats timed calls after a compiling warm-up. Random weights
(timing does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ddcm_jax
from ddcm_jax.model import DiffusionModel, ModelConfig
from ddcm_jax.models import ADMConfig, adm_init
from ddcm_jax.pixel import schedule_xs
from ddcm_jax.schedule import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS


def random_model(kwargs: dict) -> DiffusionModel:
    cfg = ADMConfig.from_create_model(kwargs)
    params = jax.jit(adm_init, static_argnums=0)(cfg, jax.random.key(0))
    # Replace the zero-initialised layers' zeros too, so every path computes something.
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
    return DiffusionModel(ModelConfig(cfg), params, "sha256:benchmark")


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def split(name: str, model: DiffusionModel, batch: int, steps: int, k: int, repeats: int) -> dict:
    n = model.config.architecture.image_size
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, n, n, 3)).astype(np.float32))
    xs = schedule_xs(Schedule.create("linear", 1000, str(steps)))
    ts = jnp.asarray(xs.t)

    @jax.jit
    def network_only(model, x):
        def body(h, t):
            return model.apply(model.params, h, jnp.full((batch,), t), None)[..., :3], None

        return jax.lax.scan(body, x, ts)[0]

    kw = dict(steps=steps, codebook_size=k, key=0)
    keys = jax.random.split(jax.random.key(1), batch)

    def plain():
        one = lambda kk: ddcm_jax.sample(model, steps=steps, key=kk, image_shape=(n, n, 3))  # noqa: E731
        return one(keys[0]) if batch == 1 else jax.vmap(one)(keys)

    res = ddcm_jax.compress(model, x, **kw)
    t = {
        "network": timed(lambda: network_only(model, x), repeats),
        "plain": timed(plain, repeats),
        "compress": timed(lambda: ddcm_jax.compress(model, x, **kw).image, repeats),
        "decompress": timed(lambda: ddcm_jax.decompress(model, res, image_shape=(n, n, 3), **kw), repeats),
    }
    per = {f"{key}_s_per_step": v / steps for key, v in t.items()}
    return {
        "config": name, "batch": batch, "steps": steps, "K": k, "D": n * n * 3, **{f"{a}_s": b for a, b in t.items()},
        **per,
        "split_per_step": {"network": t["network"] / steps, "codebook": (t["compress"] - t["plain"]) / steps,
                           "rest": (t["plain"] - t["network"]) / steps},
        "decompress_over_plain": t["decompress"] / t["plain"],
    }  # fmt: skip


def throughput(name: str, model: DiffusionModel, batches: list[int], steps: int, k: int, repeats: int) -> list[dict]:
    n = model.config.architecture.image_size
    rows = []
    for b in batches:
        x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, n, n, 3)).astype(np.float32))
        s = timed(lambda x=x: ddcm_jax.compress(model, x, steps=steps, codebook_size=k, key=0).image, repeats)
        rows.append({"config": name, "batch": b, "steps": steps, "K": k, "seconds": s, "images_per_s": b / s})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--throughput-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    splits, tput = [], []
    for name in args.configs:
        model = random_model(CONFIGS[name])
        for b in args.batches:
            row = split(name, model, b, args.steps, args.k, args.repeats)
            splits.append(row)
            sp = row["split_per_step"]
            print(f"{name} B={b}: per step network {sp['network']*1e3:.1f} ms, codebook {sp['codebook']*1e3:.1f} ms, "
                  f"rest {sp['rest']*1e3:.1f} ms; compress {row['compress_s_per_step']*1e3:.1f} ms, "
                  f"decompress {row['decompress_s_per_step']*1e3:.1f} ms = {row['decompress_over_plain']:.3f} x plain",
                  flush=True)  # fmt: skip
        if name == "adm_tiny_32px":
            for r in throughput(name, model, args.throughput_batches, 20, 256, args.repeats):
                tput.append(r)
                print(f"{name} compress B={r['batch']}: {r['images_per_s']:.2f} images/s", flush=True)
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
                "backend": jax.default_backend(), "devices": jax.device_count()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "split": splits, "throughput": tput}, f, indent=2)


if __name__ == "__main__":
    main()
