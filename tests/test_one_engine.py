"""The one engine on a latent model (`sd_tiny`): jit, vmap, batches and grad through one scanned step.

What is checked against independent truth: the compiled program does not grow
with the number of steps (the steps are one scan body, not unrolled); vmap and
batches give each image's own code; decoding is the encoder's image bit for
bit; the gradient of the `Soft` rule's output matches central finite
differences.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddcm_jax
from ddcm_jax.selection import Soft

KW = dict(codebook_size=16, rule="turbo", num_atoms=2)


@pytest.fixture(scope="module")
def model(sd_tiny_model_dir: Path):
    return ddcm_jax.load_model(sd_tiny_model_dir)


@pytest.fixture(scope="module")
def images(kodak: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(kodak / "kodim23.png") as im:
        base = np.asarray(im.convert("RGB").resize((128, 128)), np.float32) / 127.5 - 1
    return np.stack([base, base[:, ::-1], base[::-1], -base])


def _program_size(model, steps: int) -> int:
    fn = jax.jit(lambda image, key: ddcm_jax.compress(model, image, steps=steps, no_bits_steps=1, key=key, **KW))
    hlo = fn.lower(jnp.zeros((128, 128, 3), jnp.float32), jax.random.key(0)).as_text()
    return len(hlo)


def test_jitted_compress_does_not_grow_with_the_steps(model):
    """T = 18 compiles to the program of T = 6 (the schedule is data): within 1.5x, as one scan body."""
    small, large = _program_size(model, 6), _program_size(model, 18)
    assert large <= 1.5 * small, (small, large)


def test_vmap_batch_and_single_calls_give_one_code_and_decoding_is_exact(model, images):
    keys = jax.random.split(jax.random.key(3), 4)
    run = jax.jit(lambda image, key: ddcm_jax.compress(model, image, steps=6, no_bits_steps=1, key=key, **KW))
    mapped = jax.vmap(run)(images, keys)
    batch = ddcm_jax.compress(model, images, steps=6, no_bits_steps=1, key=keys, **KW)
    for b in range(4):
        one = run(images[b], keys[b])
        for res in (mapped, batch):
            np.testing.assert_array_equal(res.indices[b], one.indices)
            np.testing.assert_array_equal(res.coeffs[b], one.coeffs)
    decode = jax.jit(lambda idx, co, key: ddcm_jax.decompress(model, idx, co, steps=6, no_bits_steps=1, key=key,
                                                              image_shape=(128, 128, 3), **KW))  # fmt: skip
    one = run(images[0], keys[0])
    back = decode(one.indices, one.coeffs, keys[0])
    np.testing.assert_array_equal(back.image, one.image)  # one machine, one batch size: the same bits
    np.testing.assert_array_equal(back.latent, one.latent)
    both = ddcm_jax.decompress(model, batch.indices, batch.coeffs, steps=6, no_bits_steps=1, key=keys,
                               image_shape=(128, 128, 3), **KW)  # fmt: skip
    np.testing.assert_array_equal(both.image, batch.image)


def test_grad_of_the_soft_rule_matches_finite_differences(model, images):
    """d/d(image) of <w, latent> through the VAE encoder, the Soft rule's mixtures and every step."""
    w = jax.random.normal(jax.random.key(1), (16, 16, 4))
    v = jax.random.normal(jax.random.key(2), (128, 128, 3))
    v = v / jnp.linalg.norm(v)
    rule = Soft(jnp.float32(20.0))

    def loss(image):
        res = ddcm_jax.compress(model, image, steps=4, codebook_size=16, rule=rule, key=5)
        return jnp.sum(w * res.latent)

    x = jnp.asarray(images[0])
    g = jax.jit(jax.grad(loss))(x)
    f = jax.jit(loss)
    eps = 3e-2
    fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    ad = jnp.vdot(g, v)
    assert abs(float(ad)) > 1e-4
    np.testing.assert_allclose(float(ad), float(fd), rtol=0.02)
