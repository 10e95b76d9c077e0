"""Turbo-DDCM compression on a latent model, CPU: ours vs the original's loop, both in this run.

    python benchmarks/bench_latent.py --json benchmarks/results/latent_cpu.json

The model is `sd_tiny` (../shared/reference, random weights: the timing does
not depend on them) at its native 128 x 128 (latents 16 x 16 x 4), Turbo-DDCM
with T = 20, K = 16384, M = 20 and 10 no-bits steps (9 coded steps).

- ours: `ddcm_jax.compress(model, image, steps=20, codebook_size=16384,
  num_atoms=20, rule="turbo", no_bits_steps=10, key=0)` called eagerly, after
  a warm-up call (compilation excluded). Its steps run one at a time (three
  compiled programs each, shared with the decoder), with or without `progress`.
- original: Turbo-DDCM's `compress` loop (AmitVaisman/Turbo-DDCM) in PyTorch
  with diffusers' UNet and VAE from the same folder: VAE encode, per coded step
  the UNet, x0_hat, the residual, `torch.manual_seed(seed + i + 1);
  codebook.normal_()` ((D, K) float32), `codebook.T @ r`, top-M of |.|, the
  signed sum over its unbiased std, the DDIM step; then plain DDIM steps; VAE
  decode.

Each side runs in its own subprocess; the sides alternate and each reports the
median of `--repeats` calls. Ratios are ours / original from the same run.
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
TINY = SHARED / "reference" / "sd_tiny"
T, K, M, NBS = 20, 16384, 20, 10


def _image():
    import numpy as np
    from PIL import Image

    img = Image.open(SHARED / "data" / "kodak" / "kodim23.png").convert("RGB").resize((128, 128))
    return np.asarray(img, np.float32) / 127.5 - 1.0


def run_ours(repeats: int, model_dir: str) -> dict:
    import jax
    import numpy as np

    import ddcm_jax

    model = ddcm_jax.load_model(model_dir)
    image = _image()
    kw = dict(steps=T, codebook_size=K, num_atoms=M, rule="turbo", no_bits_steps=NBS, key=0)
    out = {}
    for name, extra in (("one_call", {}),):
        res = ddcm_jax.compress(model, image, **kw, **extra)
        jax.block_until_ready(res.image)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = ddcm_jax.compress(model, image, **kw, **extra)
            jax.block_until_ready(res.image)
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s": statistics.median(times), "times_s": times}
    out["indices_head"] = np.asarray(res.indices)[0].tolist()
    return out


def run_original(repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from ddcm_jax.respacing import turbo_timesteps

    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(TINY / "unet").eval()
    vae = AutoencoderKL.from_pretrained(TINY / "vae").eval()
    sched = DDIMScheduler.from_pretrained(TINY / "scheduler")
    ac = sched.alphas_cumprod
    null = torch.zeros(1, 77, unet.config.cross_attention_dim)  # timing only: the embedding's values do not matter
    ts, prev = (torch.as_tensor(a) for a in turbo_timesteps(T))
    image = torch.from_numpy(_image()).permute(2, 0, 1)[None]

    def eps_of(x, t):
        out = unet(x, t, encoder_hidden_states=null).sample
        a = ac[t]
        return a**0.5 * out + (1 - a) ** 0.5 * x if sched.config.prediction_type == "v_prediction" else out

    def reverse(eps, i, x, eta, noise):
        a, a_prev = ac[ts[i]], ac[prev[i]]
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x = a_prev**0.5 * x0 + (1 - a_prev - eta * var) ** 0.5 * eps
        return x + eta * var**0.5 * noise if eta > 0 else x

    def compress():
        enc = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
        torch.manual_seed(42)
        x = torch.randn(1, 4, 16, 16)
        book = torch.empty(x.numel(), K)
        for i in range(T - 1 - NBS):
            eps = eps_of(x, ts[i])
            a = ac[ts[i]]
            r = (enc - (x - (1 - a) ** 0.5 * eps) / a**0.5).view(-1)
            torch.manual_seed(42 + i + 1)
            book.normal_()
            ip = book.T @ r
            top = torch.topk(ip.abs(), M).indices
            coef = torch.zeros(K)
            coef[top] = torch.sign(ip[top])
            noise = book @ coef
            x = reverse(eps, i, x, 1, (noise / noise.std()).view(x.shape))
        for i in range(T - 1 - NBS, T):
            x = reverse(eps_of(x, ts[i]), i, x, 0, None)
        return vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)

    compress()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compress()
        times.append(time.perf_counter() - t0)
    return {"one_call": {"median_s": statistics.median(times), "times_s": times}, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--side", choices=["ours", "original"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        res = run_ours(args.repeats, args.model_dir) if args.side == "ours" else run_original(args.repeats)
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "sd_tiny")
        from ddcm_jax.convert import main as convert

        assert convert([str(TINY), "-o", model_dir, "--format", "diffusers"]) == 0
        sides = {}
        for side in ("original", "ours"):
            cmd = [sys.executable, __file__, "--side", side, "--repeats", str(args.repeats), "--model-dir", model_dir]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    orig = sides["original"]["one_call"]["median_s"]
    doc = {
        "benchmark": "bench_latent",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "settings": {"model": "sd_tiny 128x128 (latent 16x16x4)", "T": T, "K": K, "M": M, "no_bits_steps": NBS},
        "original_s": orig,
        "ours_one_call_s": sides["ours"]["one_call"]["median_s"],
        "ratio_one_call": sides["ours"]["one_call"]["median_s"] / orig,
        "sides": sides,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
