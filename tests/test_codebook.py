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
from ddcm_jax.codebook import (
    GENERATORS,
    AtomSource,
    atom,
    box_muller,
    philox4x32,
    step_key,
)

SHAPE = (8, 8, 3)


def _philox_numpy(ctr: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """Philox4x32 in NumPy uint64 arithmetic, written from the Random123 paper (an independent check)."""
    c = ctr.astype(np.uint64).copy()
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(rounds):
        p0, p1 = c[..., 0] * np.uint64(0xD2511F53), c[..., 2] * np.uint64(0xCD9E8D57)
        c = np.stack([((p1 >> np.uint64(32)) ^ c[..., 1] ^ k0) & mask, p1 & mask,
                      ((p0 >> np.uint64(32)) ^ c[..., 3] ^ k1) & mask, p0 & mask], -1)  # fmt: skip
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c.astype(np.uint32)


def test_philox_known_answers_and_an_independent_implementation():
    # Random123's kat_vectors for philox4x32_10.
    for ctr, key, want in [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
                           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
                           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]:  # fmt: skip
        got = philox4x32(tuple(jnp.asarray([v], jnp.uint32) for v in ctr), tuple(np.uint32(k) for k in key))
        assert tuple(int(g[0]) for g in got) == want
    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, (1000, 4), dtype=np.uint64).astype(np.uint32)
    key = (int(rng.integers(2**32)), int(rng.integers(2**32)))
    got = jax.jit(lambda c: jnp.stack(philox4x32(tuple(c[:, i] for i in range(4)), tuple(map(np.uint32, key))), -1))(ctr)
    np.testing.assert_array_equal(np.asarray(got), _philox_numpy(ctr, key))


def test_bits_to_normal_is_box_muller():
    """(w_a, w_b) -> sqrt(-2 log t) (cos, sin)(2 pi v) from the words' 24 high bits, against float64."""
    rng = np.random.default_rng(1)
    edge = np.array([0, 255, 256, 2**29 - 1, 2**29, 2**31, 2**32 - 257, 2**32 - 1], np.uint64)
    wa = np.concatenate([edge, edge[::-1], rng.integers(0, 2**32, 200_000, dtype=np.uint64)]).astype(np.uint32)
    wb = np.concatenate([edge, edge, rng.integers(0, 2**32, 200_000, dtype=np.uint64)]).astype(np.uint32)
    z1, z2 = (np.asarray(v, np.float64) for v in box_muller(jnp.asarray(wa), jnp.asarray(wb)))
    m = (wa >> 8).astype(np.int64)
    t = (2 * np.minimum(m, 2**24 - 1 - m) + 1) / 2**24  # uniform on (0, 1), folded at 1/2
    v = ((wb >> 8).astype(np.float64) + 0.5) / 2**24
    rad = np.sqrt(-2 * np.log(t))
    assert rad.min() > 0
    assert np.all(np.isfinite(z1)) and np.abs(rad).max() < 5.9
    np.testing.assert_allclose(z1, rad * np.cos(2 * np.pi * v), rtol=0, atol=4e-6)
    np.testing.assert_allclose(z2, rad * np.sin(2 * np.pi * v), rtol=0, atol=4e-6)


def test_every_generator_has_a_format_byte_and_a_class():
    """A generator a key derives is one the file can name, and the reverse (one class + one byte each)."""
    from ddcm_jax import bitstream
    from ddcm_jax.codebook import GENERATORS

    assert sorted(GENERATORS) == sorted(bitstream.CODEBOOK_GENERATORS)


def _book(generator: str, key: int = 7, step: int = 3, size: int = 256, shape=SHAPE, **kw) -> AtomSource:
    return AtomSource(size, shape, generator, root=jax.random.key(key), step=jnp.int32(step), **kw)


@pytest.mark.parametrize("generator", ["philox", "threefry"])
def test_atoms_are_standard_normal(generator):
    """Fixed key; 256 atoms x 192 dims: moments, Kolmogorov-Smirnov, and no correlation between atoms."""
    z = np.asarray(_book(generator).get(jnp.arange(256)), np.float64).reshape(256, -1)
    v = z.ravel()
    n = v.size
    assert abs(v.mean()) < 4 / math.sqrt(n)
    assert abs(v.var() - 1) < 4 * math.sqrt(2 / n)
    s = np.sort(v)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert ks < 1.63 / math.sqrt(n)  # 1 % critical value
    kurt = np.mean(v**4) / np.mean(v**2) ** 2
    assert abs(kurt - 3) < 6 * math.sqrt(24 / n)
    corr = np.corrcoef(z)[np.triu_indices(256, 1)]
    assert np.abs(corr).max() < 5 / math.sqrt(z.shape[1])


@pytest.mark.parametrize("generator", GENERATORS)
def test_each_atom_regenerates_alone_and_steps_differ(generator):
    book = _book(generator, key=1, step=5, size=16)
    full = book.get(jnp.arange(16))
    for k in (0, 7, 15):
        np.testing.assert_array_equal(book.get(jnp.asarray([k]))[0], full[k])
    assert not np.allclose(full, _book(generator, key=1, step=6, size=16).get(jnp.arange(16)))
    assert not np.allclose(full, _book(generator, key=2, step=5, size=16).get(jnp.arange(16)))


def test_shift_family_atoms_and_fft_scores():
    """z_k[p[d]] = s[d] g[d - k]: signed permutations of one N(0, I) vector, scored by one FFT."""
    shape = (64, 64, 3)
    d = math.prod(shape)
    book = _book("shift", size=300, shape=shape).with_base()
    g, signs, perm = (np.asarray(a) for a in book.base)
    assert sorted(perm.tolist()) == list(range(d)) and set(np.unique(signs)) == {-1.0, 1.0}
    s = np.sort(g.astype(np.float64))
    cdf = 0.5 * (1 + np.vectorize(math.erf)(s / math.sqrt(2)))
    assert max(np.max(np.arange(1, d + 1) / d - cdf), np.max(cdf - np.arange(d) / d)) < 1.63 / math.sqrt(d)
    z = np.asarray(book.get(jnp.arange(300)), np.float64).reshape(300, -1)
    for k in (0, 1, 299):
        want = np.empty(d)
        want[perm] = signs * np.roll(g, k)
        np.testing.assert_array_equal(z[k], want)
    corr = np.corrcoef(z[:100])[np.triu_indices(100, 1)]
    assert np.abs(corr).max() < 5 / math.sqrt(d)  # pairwise uncorrelated, like iid atoms
    r = jax.random.normal(jax.random.key(3), shape)
    exact = z @ np.asarray(r, np.float64).ravel()
    np.testing.assert_allclose(book.scores(r), exact, rtol=1e-4, atol=1e-3 * np.abs(exact).max())
    assert int(book.best(r)[0]) == int(np.argmax(exact))
    np.testing.assert_array_equal(book.top_abs(r, 4)[0], np.argsort(-np.abs(exact))[:4])
    with pytest.raises(ValueError, match="at most D"):
        _book("shift", size=d + 1, shape=shape).with_base()


def test_threefry_generator_is_jax_random_normal_over_integer_folds():
    root = jax.random.key(4)
    z = _book("threefry", key=4, step=9, size=3).get(jnp.arange(3))
    for k in range(3):
        np.testing.assert_array_equal(z[k], atom(step_key(root, 9), k, SHAPE))


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_streaming_equals_the_whole_codebook_at_once(generator, chunk):
    book = _book(generator, size=37, chunk=chunk)
    r = jax.random.normal(jax.random.key(3), SHAPE)
    full = np.asarray(jnp.einsum("k...,...->k", book.get(jnp.arange(37)), r))
    np.testing.assert_allclose(book.scores(r), full, rtol=1e-5, atol=1e-4)
    idx, score = book.best(r)
    assert int(idx) == int(np.argmax(full)) and float(score) == pytest.approx(full.max(), rel=1e-5)
    top, s = book.top_abs(r, 5)
    np.testing.assert_array_equal(top, np.argsort(-np.abs(full), kind="stable")[:5])
    np.testing.assert_allclose(s, full[np.asarray(top)], rtol=1e-5, atol=1e-4)
    every = book.get(jnp.arange(37))
    mapped = book.map(lambda z: jnp.stack([_sum(z), _sum(z**2)], -1), width=(2,))
    np.testing.assert_allclose(mapped, np.stack([_sum(every), _sum(every**2)], -1), rtol=1e-5, atol=1e-4)


def _sum(z):
    return jnp.sum(z.reshape(z.shape[0], -1), axis=1)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_ties_go_to_the_lower_index_in_every_chunking(chunk):
    base = jax.random.normal(jax.random.key(0), (4, *SHAPE))
    # atoms: 0.5 b0, b0, b1, b1, b0, b1, b2, b3 -> against r = b0, atoms 1 and 4 tie for the maximum
    rows = jnp.concatenate([base[:1] * 0.5, base[:2], base[1:2], base[:2], base[2:]])
    book = AtomSource.from_array(rows, chunk=chunk)
    r = base[0]
    scores = np.asarray(jnp.einsum("k...,...->k", rows, r))
    assert int(book.best(r)[0]) == int(np.argmax(scores))  # the first of the equal maxima
    top, _ = book.top_abs(r, 3)
    np.testing.assert_array_equal(top, np.argsort(-np.abs(scores), kind="stable")[:3])


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


@pytest.mark.parametrize("generator,rule,m", [("threefry", "ddcm", 1), ("shift", "ddcm", 1), ("shift", "turbo", 3)])
def test_other_generators_decode_exactly(model, images, generator, rule, m):
    kw = dict(steps=4, codebook_size=48, key=2, generator=generator, rule=rule, num_atoms=m)
    res = ddcm_jax.compress(model, images[0], **kw)
    out = ddcm_jax.decompress(model, res, image_shape=images[0].shape, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(res.image))
    other = ddcm_jax.compress(model, images[0], **{**kw, "generator": "philox"})
    assert not np.array_equal(other.indices, res.indices)  # the generator really changes the codebooks
