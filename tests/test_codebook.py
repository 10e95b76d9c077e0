"""Key-derived codebooks, chunked scoring, and compress/decompress properties on key codebooks."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddcm_jax
from ddcm_jax.codebook import atom, atoms, chunked_scores, step_key

SHAPE = (8, 8, 3)


def test_atoms_are_standard_normal():
    """Fixed key; 256 atoms x 192 dims: moments and a Kolmogorov-Smirnov statistic."""
    z = np.asarray(atoms(step_key(jax.random.key(7), 3), jnp.arange(256), SHAPE), np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 4 / math.sqrt(n)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    s = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.63 / math.sqrt(n)  # 1% critical value
    # Atoms are uncorrelated with each other.
    m = z.reshape(256, -1)
    corr = np.corrcoef(m)[np.triu_indices(256, 1)]
    assert np.abs(corr).max() < 5 / math.sqrt(m.shape[1])


def test_each_atom_regenerates_alone_and_steps_differ():
    key = step_key(jax.random.key(1), 5)
    book = atoms(key, jnp.arange(16), SHAPE)
    for k in (0, 7, 15):
        np.testing.assert_array_equal(atom(key, k, SHAPE), book[k])
    other = atoms(step_key(jax.random.key(1), 6), jnp.arange(16), SHAPE)
    assert not np.allclose(book, other)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_scores_equal_unchunked(chunk):
    key = step_key(jax.random.key(2), 0)
    r = jax.random.normal(jax.random.key(3), SHAPE)
    full = jnp.einsum("k...,...->k", atoms(key, jnp.arange(37), SHAPE), r)
    got = chunked_scores(lambda ks: atoms(key, ks, SHAPE), lambda z: jnp.einsum("n...,...->n", z, r), 37, chunk)
    np.testing.assert_allclose(got, full, rtol=1e-6, atol=1e-5)
    assert int(jnp.argmax(got)) == int(jnp.argmax(full))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ddcm_jax.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return np.clip(rng.standard_normal((2, 16, 16, 3)) * 0.5, -1, 1).astype(np.float32)


@pytest.mark.parametrize("rule,m", [("ddcm", 1), ("mp", 2), ("turbo", 3), ("random", 1)])
def test_decompress_equals_compress_image(model, images, rule, m):
    kw = dict(steps=5, codebook_size=32, num_atoms=m, coef_bits=2, rule=rule, key=11)
    res = ddcm_jax.compress(model, images[0], **kw)
    assert res.indices.shape == (4, m) and res.indices.dtype == jnp.int32
    assert ((0 <= res.indices) & (res.indices < 32)).all()
    out = ddcm_jax.decompress(model, res, image_shape=images[0].shape, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(res.image))
    if rule == "turbo":
        idx = np.asarray(res.indices)
        assert (np.diff(idx, axis=1) > 0).all()  # a sorted set of distinct atoms
        assert res.coeffs.shape == (4, 3) and set(np.unique(res.coeffs)) <= {0, 1}


def test_compression_beats_random_choice(model, images):
    """The ddcm rule must move the result toward the target compared with random atoms."""
    kw = dict(steps=8, codebook_size=64, key=3)
    coded = ddcm_jax.compress(model, images[0], **kw).image
    rand = ddcm_jax.compress(model, images[0], rule="random", **kw).image
    err = lambda a: float(jnp.mean((a - images[0]) ** 2))  # noqa: E731
    assert err(coded) < err(rand)


def test_batched_compress_equals_single_calls(model, images):
    kw = dict(steps=4, codebook_size=16, key=5)
    batch = ddcm_jax.compress(model, images, **kw)
    for b in range(len(images)):
        one = ddcm_jax.compress(model, images[b], **kw)
        np.testing.assert_array_equal(batch.indices[b], one.indices)
        # Same bits; pixels agree to float rounding (batched convolutions sum in another order).
        np.testing.assert_allclose(batch.image[b], one.image, atol=1e-4)


def test_batched_decompress_and_per_image_keys(model, images):
    kw = dict(steps=4, codebook_size=16)
    keys = jax.random.split(jax.random.key(5), len(images))
    batch = ddcm_jax.compress(model, images, key=keys, **kw)  # one key (codebooks, x_T) per image
    for b in range(len(images)):
        one = ddcm_jax.compress(model, images[b], key=keys[b], **kw)
        np.testing.assert_array_equal(batch.indices[b], one.indices)
    out = ddcm_jax.decompress(model, batch, key=keys, image_shape=images.shape[1:], **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(batch.image))
    with pytest.raises(ValueError, match="batch size"):
        ddcm_jax.compress(model, images, key=keys[:1], **kw)


def test_generate_a_batch_from_split_keys(model):
    keys = jax.random.split(jax.random.key(2), 3)
    kw = dict(steps=4, codebook_size=64, image_shape=(16, 16, 3))
    batch = ddcm_jax.generate(model, key=keys, **kw)
    assert batch.indices.shape == (3, 3, 1) and batch.image.shape == (3, 16, 16, 3)
    for b in range(3):
        np.testing.assert_array_equal(batch.indices[b], ddcm_jax.generate(model, key=keys[b], **kw).indices)
    assert len({tuple(np.asarray(i).ravel()) for i in batch.indices}) == 3


def test_key_is_required_and_typed(model, images):
    with pytest.raises(ValueError, match="no default"):
        ddcm_jax.compress(model, images[0], steps=3, codebook_size=4, key=None)
    with pytest.raises(TypeError, match="typed key"):
        ddcm_jax.compress(model, images[0], steps=3, codebook_size=4, key=jax.random.PRNGKey(0))


def test_same_key_same_indices_in_another_process(model, tiny_model_dir, images, tmp_path):
    np.save(tmp_path / "im.npy", images[1])
    script = (
        "import numpy as np, ddcm_jax\n"
        f"m = ddcm_jax.load_model({str(tiny_model_dir)!r})\n"
        f"r = ddcm_jax.compress(m, np.load({str(tmp_path / 'im.npy')!r}), steps=5, codebook_size=32, key=9)\n"
        "print(','.join(map(str, np.asarray(r.indices).ravel())))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    here = ddcm_jax.compress(model, images[1], steps=5, codebook_size=32, key=9)
    assert out.stdout.strip().splitlines()[-1] == ",".join(map(str, np.asarray(here.indices).ravel()))
