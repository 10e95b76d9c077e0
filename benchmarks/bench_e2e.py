"""End to end on CPU: one DDCM compression, ours vs the original's per-step loop, both in this run.

    python benchmarks/bench_e2e.py --json benchmarks/results/e2e_cpu.json

The 64 x 64 configuration `adm_small_64px` (6.4 M parameters, attention at
three resolutions; `benchmarks/configs.py`), K = 256, 25 respaced steps,
random weights (timing does not depend on them), after a warm-up call.

- ours: `ddcm_jax.compress(model, image(s), steps=25, codebook_size=256, key=0)`
  called eagerly, as a user calls it; batch 1 and batch 4 (one vmapped call).
- original: the per-step loop of the original code (`ddcm/` runners): the
  PyTorch UNet forward (`tests/torch_adm.py`, guided-diffusion's module tree),
  x0_hat (clipped), residual, `torch.randn(K, D)` from a generator seeded per
  step, matmul, argmax, DDIM step (eta 1). The original codes one image at a
  time, so its batch-of-4 time is 4 x its one-image time.

Each side runs in its own subprocess (threads: torch's default = the number of
cores; XLA's own pool), sides alternate, and each reports the median of
`--repeats` timed calls. Ratios (ours / original) are of medians from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from configs import CONFIGS  # noqa: E402

CONFIG, STEPS, K = "adm_small_64px", 25, 256


def _cfg(dtype: str = "float32"):
    from ddcm_jax.models.adm import ADMConfig

    return ADMConfig.from_create_model({**CONFIGS[CONFIG], "compute_dtype": dtype})


def _images(batch: int, n: int):
    import numpy as np

    return np.stack([np.random.default_rng(1000 + i).uniform(-1, 1, (n, n, 3)) for i in range(batch)]).astype(
        np.float32
    )


def _time(fn, repeats: int) -> dict:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "all_s": times}


def ours(batch: int, repeats: int) -> dict:
    import jax
    import numpy as np

    import ddcm_jax
    from ddcm_jax.model import DiffusionModel, ModelConfig
    from ddcm_jax.models.adm import abstract_params

    cfg = _cfg()
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (rng.standard_normal(s.shape) / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))).astype(np.float32),
        abstract_params(cfg),
    )
    model = DiffusionModel(ModelConfig(cfg), params, "sha256:benchmark")
    x = _images(batch, cfg.image_size)
    image = x[0] if batch == 1 else x

    def run():
        res = ddcm_jax.compress(model, image, steps=STEPS, codebook_size=K, key=0)
        return jax.block_until_ready(res.indices)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    out = _time(run, repeats)
    out["first_call_s"] = first
    return out


def original(repeats: int) -> dict:
    import numpy as np
    import torch
    from torch_adm import random_torch_adm

    from ddcm_jax.pixel import schedule_xs
    from ddcm_jax.schedule import Schedule

    cfg = _cfg()
    net = random_torch_adm(cfg, seed=0)
    n = cfg.image_size
    D = 3 * n * n
    xs = schedule_xs(Schedule.create("linear", 1000, str(STEPS)))
    s = [[float(v) for v in np.asarray(a)] for a in (xs.sqrt_recip_ab, xs.sqrt_recipm1_ab, xs.sqrt_ab_prev,
                                                      xs.dir_coef, xs.sigma)]  # fmt: skip
    ts = [torch.full((1,), int(v), dtype=torch.long) for v in np.asarray(xs.t)]
    target = torch.from_numpy(_images(1, n).transpose(0, 3, 1, 2).copy())
    x_T = torch.randn(1, 3, n, n, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator()

    def run():
        x = x_T.clone()
        for j in range(STEPS):
            eps = net(x, ts[j])[:, :3]
            x0 = (s[0][j] * x - s[1][j] * eps).clamp(-1, 1)
            eps = (s[0][j] * x - x0) / s[1][j]
            if j < STEPS - 1:
                gen.manual_seed(j)
                book = torch.randn(K, D, generator=gen)
                noise = book[torch.argmax(book @ (target - x0).reshape(-1))].view_as(x)
            else:
                noise = torch.zeros_like(x)
            x = s[2][j] * x0 + s[3][j] * eps + s[4][j] * noise
        return x

    with torch.inference_mode():
        out = _time(run, repeats)
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        side, batch = args.case.split("/")
        row = original(args.repeats) if side == "original" else ours(int(batch), args.repeats)
        print(json.dumps(row))
        return
    rows = {}
    for case in ("original/1", "ours/1", "ours/4"):
        proc = subprocess.run([sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"{case}: failed: {proc.stderr.strip()[-2000:]}")
        rows[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{case:12s} {rows[case]['seconds']:8.2f} s", flush=True)
    orig = rows["original/1"]["seconds"]
    summary = {
        "original_one_image_s": orig,
        "ours_one_image_s": rows["ours/1"]["seconds"],
        "ours_batch4_per_image_s": rows["ours/4"]["seconds"] / 4,
        "ratio_one_image": rows["ours/1"]["seconds"] / orig,
        "ratio_batch4_per_image": rows["ours/4"]["seconds"] / 4 / orig,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        import jax
        import torch

        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "jax": jax.__version__, "torch": torch.__version__, "config": CONFIG, "steps": STEPS, "K": K,
                "params_M": 6.38}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
