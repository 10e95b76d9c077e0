"""Latent DDCM and Turbo-DDCM on a pipeline the traces do not cover: epsilon prediction and a
non-square image, against the original codes' loops rewritten in PyTorch around diffusers'
own UNet and VAE (the same weights), with the same start latent and codebooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ddcm_jax
from ddcm_jax.respacing import ddcm_timesteps, turbo_timesteps

pytestmark = pytest.mark.torch

H, W = 96, 128  # latents 12 x 16: non-square, and not the UNet's native 16 x 16


@pytest.fixture(scope="module")
def eps_pipeline(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sd_tiny with its scheduler switched to epsilon prediction (the network is random either way)."""
    src = tmp_path_factory.mktemp("eps") / "sd_tiny_eps"
    shutil.copytree(reference / "sd_tiny", src)
    cfg = src / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "epsilon"}))
    return src


@pytest.fixture(scope="module")
def both(eps_pipeline: Path, tmp_path_factory: pytest.TempPathFactory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from ddcm_jax.convert import main as convert

    out = tmp_path_factory.mktemp("eps_model") / "m"
    assert convert([str(eps_pipeline), "-o", str(out), "--format", "diffusers"]) == 0
    model = ddcm_jax.load_model(out)
    assert model.prediction_type == "epsilon"
    torch.set_grad_enabled(False)
    unet = diffusers.UNet2DConditionModel.from_pretrained(eps_pipeline / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(eps_pipeline / "vae").eval()
    sched = diffusers.DDIMScheduler.from_pretrained(eps_pipeline / "scheduler")
    return model, torch, unet, vae, sched


def _inputs(k: int, rows: int):
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal(0, 0.5, (H, W, 3)), -1, 1).astype(np.float32)
    x_T = rng.standard_normal((H // 8, W // 8, 4)).astype(np.float32)
    books = rng.standard_normal((rows, k, H // 8, W // 8, 4)).astype(np.float32)
    return image, x_T, books


def _torch_loop(torch, unet, vae, sched, model, image, x_T, books, *, t, t_prev, coded, pick):
    """The originals' loop: eps -> x0_hat, the rule's noise on coded steps, DDIM (eta 1 coded, else 0)."""
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))  # noqa: E731
    ac = sched.alphas_cumprod
    null = torch.from_numpy(np.array(model.null_prompt))
    enc = vae.encode(nchw(image)[None]).latent_dist.mode() * vae.config.scaling_factor
    x, chosen = nchw(x_T)[None], []
    for i in range(len(t)):
        a = ac[int(t[i])]
        a_prev = ac[int(t_prev[i])] if t_prev[i] >= 0 else sched.final_alpha_cumprod
        eps = unet(x, int(t[i]), encoder_hidden_states=null).sample
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        eta = 1.0 if i < coded else 0.0
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        noise = torch.zeros_like(x)
        if i < coded:
            book = nchw(books[i])  # (K, 4, h, w)
            idx, noise = pick(book, (enc - x0).reshape(-1))
            chosen.append(idx)
            noise = noise[None]
        x = a_prev**0.5 * x0 + (1 - a_prev - eta * var) ** 0.5 * eps + eta * var**0.5 * noise
    return x, chosen


def test_epsilon_ddcm_matches_the_original_loop(both):
    model, torch, unet, vae, sched = both
    steps, k = 8, 24
    image, x_T, books = _inputs(k, steps - 1)
    t, t_prev = ddcm_timesteps(steps)

    def pick(book, r):  # argmax_k <z_k, enc - x0_hat>, first on ties
        j = int(torch.argmax(book.reshape(book.shape[0], -1) @ r))
        return [j], book[j]

    ref, chosen = _torch_loop(torch, unet, vae, sched, model, image, x_T, books, t=t, t_prev=t_prev,
                              coded=steps - 1, pick=pick)  # fmt: skip
    res = ddcm_jax.compress(model, image, steps=steps, codebook_size=k, key=0, x_T=x_T, codebook=books)
    np.testing.assert_array_equal(res.indices, np.asarray(chosen))
    np.testing.assert_allclose(np.moveaxis(np.asarray(res.latent), -1, 0), ref[0].numpy(), atol=1e-4)


def test_epsilon_turbo_matches_the_original_loop(both):
    model, torch, unet, vae, sched = both
    steps, k, m, nbs = 9, 48, 5, 3
    image, x_T, books = _inputs(k, steps - 1 - nbs)
    t, t_prev = turbo_timesteps(steps)

    def pick(book, r):  # top-M |<z_k, r>| with signs, summed, over the unbiased std
        ip = book.reshape(book.shape[0], -1) @ r
        top = torch.topk(ip.abs(), m).indices
        noise = (torch.sign(ip[top])[:, None] * book.reshape(book.shape[0], -1)[top]).sum(0)
        signs = {int(j): int(torch.sign(ip[j])) for j in top}
        return [(j, signs[j]) for j in sorted(signs)], (noise / noise.std()).reshape(book.shape[1:])

    ref, chosen = _torch_loop(torch, unet, vae, sched, model, image, x_T, books, t=t, t_prev=t_prev,
                              coded=steps - 1 - nbs, pick=pick)  # fmt: skip
    res = ddcm_jax.compress(model, image, steps=steps, codebook_size=k, num_atoms=m, rule="turbo",
                            no_bits_steps=nbs, key=0, x_T=x_T, codebook=books)  # fmt: skip
    np.testing.assert_array_equal(res.indices, [[j for j, _ in row] for row in chosen])
    np.testing.assert_array_equal(res.coeffs, [[int(s < 0) for _, s in row] for row in chosen])  # sign bits
    np.testing.assert_allclose(np.moveaxis(np.asarray(res.latent), -1, 0), ref[0].numpy(), atol=1e-4)
    back = ddcm_jax.decompress(model, res.indices, res.coeffs, steps=steps, codebook_size=k, num_atoms=m,
                               rule="turbo", no_bits_steps=nbs, key=0, x_T=x_T, codebook=books,
                               image_shape=(H, W, 3))  # fmt: skip
    np.testing.assert_array_equal(back.image, res.image)
