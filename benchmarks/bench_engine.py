"""The one engine on latent models, CPU: compress + decompress per image, batch 1 and 4, eager and jitted,
against the previous engine (a host loop of three compiled programs per step), both in this run.

    python benchmarks/bench_engine.py --json benchmarks/results/engine_cpu.json [--sd21]

Models: `sd_tiny` (../shared/reference, converted here) at 128 x 128; with
`--sd21`, Stable Diffusion 2.1-base's network shapes (its manifest's configs)
with random weights at 128 x 128 (the timing does not depend on the weights).
Turbo-DDCM with T steps, K, M and one no-bits step.

- new, eager: `ddcm_jax.compress(model, images, ...)` then `decompress`, as a user calls them;
- new, jitted: `jax.jit` of the same two calls (compile seconds reported apart);
- previous: the same calls on the commit before the one engine (`--baseline`, a git
  revision, checked out into a temporary worktree), whose latent path stepped from Python.

Every side runs in its own subprocess, after a warm-up call; the medians of
`--repeats` calls, per image. Ratios are new / previous from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DDCM_SHARED", REPO.parent / "shared"))
BASELINE = "eb4387c"


def _images(side: int, batch: int):
    import numpy as np
    from PIL import Image

    img = Image.open(SHARED / "data" / "kodak" / "kodim23.png").convert("RGB").resize((side, side))
    x = np.asarray(img, np.float32) / 127.5 - 1.0
    return np.stack([x, x[:, ::-1], x[::-1], -x][:batch])


def _sd21_model_dir(out: Path) -> str:
    """SD 2.1-base's configs (manifest) with random float32 weights, saved as a MODEL_DIR."""
    import jax
    import numpy as np
    from ddcm_jax.convert.diffusers import read_pipeline_configs

    from ddcm_jax import latent_model as LM

    cfgs = read_pipeline_configs(SHARED / "reference" / "sd_manifests" / "sd21_base")
    tiny = LM.read_latent_model_json(_tiny_dir(out))[0]
    config = LM.LatentModelConfig(cfgs.unet, cfgs.vae, cfgs.text_encoder, cfgs.scheduler, tiny.tokenizer_files)
    shapes = LM.abstract_params(config)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(np.float32),
                                    shapes)  # fmt: skip
    tokenizer = {p.name: p.read_bytes() for p in (Path(_tiny_dir(out)) / "tokenizer").iterdir()}
    dst = out / "sd21_random"
    LM.save_latent_model(dst, config, params, tokenizer)
    return str(dst)


def _tiny_dir(out: Path) -> str:
    dst = out / "sd_tiny"
    if not dst.exists():
        from ddcm_jax.convert import main as convert

        assert convert([str(SHARED / "reference" / "sd_tiny"), "-o", str(dst), "--format", "diffusers", "-q"]) == 0
    return str(dst)


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_side(kind: str, model_dir: str, side: int, batch: int, steps: int, k: int, m: int, repeats: int) -> dict:
    import jax
    import numpy as np

    import ddcm_jax

    model = ddcm_jax.load_model(model_dir)
    images = _images(side, batch)
    kw = dict(steps=steps, codebook_size=k, num_atoms=m, rule="turbo", no_bits_steps=1)
    keys = jax.random.split(jax.random.key(0), batch) if batch > 1 else jax.random.key(0)
    x = images if batch > 1 else images[0]
    shape = (side, side, 3)
    out: dict = {}

    def enc():
        return jax.block_until_ready(ddcm_jax.compress(model, x, key=keys, **kw))

    res = enc()
    out["compress_s"] = _median(enc, repeats) / batch

    def dec():
        return jax.block_until_ready(ddcm_jax.decompress(model, res.indices, res.coeffs, image_shape=shape, key=keys,
                                                         **kw).image)  # fmt: skip

    dec()
    out["decompress_s"] = _median(dec, repeats) / batch
    if kind == "new":
        # The model is an argument (a pytree), not a closure: closed over, its parameters would be
        # captured as constants of the program (3.8 GB for SD 2.1's, compiled in).
        jc = jax.jit(lambda mdl, a, key: ddcm_jax.compress(mdl, a, key=key, **kw))
        jd = jax.jit(lambda mdl, i, c, key: ddcm_jax.decompress(mdl, i, c, image_shape=shape, key=key, **kw).image)
        t0 = time.perf_counter()
        jax.block_until_ready(jc(model, x, keys))
        out["jit_compress_first_call_s"] = time.perf_counter() - t0
        out["jit_compress_s"] = _median(lambda: jax.block_until_ready(jc(model, x, keys)), repeats) / batch
        jax.block_until_ready(jd(model, res.indices, res.coeffs, keys))
        out["jit_decompress_s"] = _median(lambda: jax.block_until_ready(jd(model, res.indices, res.coeffs, keys)),
                                          repeats) / batch  # fmt: skip
        np.testing.assert_array_equal(np.asarray(dec()), np.asarray(res.image))  # decoding is the encoder's image
    out["indices_head"] = np.asarray(res.indices).reshape(-1)[:8].tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sd21", action="store_true", help="also SD 2.1-base shapes with random weights (slow)")
    p.add_argument("--no-tiny", action="store_true", help="skip sd_tiny (with --sd21: only the SD 2.1 rows)")
    p.add_argument("--baseline", default=BASELINE, help="git revision of the previous engine")
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        kind, model_dir, side, batch, steps, k, m = json.loads(args.side)
        print(json.dumps(run_side(kind, model_dir, side, batch, steps, k, m, args.repeats)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(old), args.baseline],
                       check=True)  # fmt: skip
        try:
            configs = [] if args.no_tiny else [("sd_tiny", _tiny_dir(tmp), 128, 10, 256, 4)]
            if args.sd21:
                configs.append(("sd21_base_random", _sd21_model_dir(tmp), 128, 4, 256, 4))
            for name, model_dir, side, steps, k, m in configs:
                for batch in (1, 4):
                    row = {"model": name, "image": f"{side}x{side}", "T": steps, "K": k, "M": m, "batch": batch}
                    for kind, root in (("previous", old), ("new", REPO)):
                        env = {**os.environ, "PYTHONPATH": str(root)}
                        spec = json.dumps([kind, model_dir, side, batch, steps, k, m])
                        cmd = [sys.executable, str(root / "benchmarks" / "bench_engine.py") if kind == "new" else
                               str(REPO / "benchmarks" / "bench_engine.py"), "--side", spec, "--repeats",
                               str(args.repeats)]  # fmt: skip
                        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
                        if done.returncode:
                            raise SystemExit(f"{kind} side failed: {done.stderr[-2000:]}")
                        row[kind] = json.loads(done.stdout.strip().splitlines()[-1])
                    for op in ("compress_s", "decompress_s"):
                        row[f"ratio_{op[:-2]}_eager"] = row["new"][op] / row["previous"][op]
                    row["ratio_compress_jitted_vs_previous_eager"] = row["new"]["jit_compress_s"] / row["previous"][
                        "compress_s"]  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
    doc = {
        "benchmark": "bench_engine",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "units": "seconds per image (median of repeats); ratios new / previous from this run",
        "baseline": args.baseline,
        "rows": rows,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
