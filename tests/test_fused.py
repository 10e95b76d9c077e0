"""The fused philox scoring kernel (`ddcm_jax.fused`, `kernel="pallas"`): its 32-bit Philox words
against Random123's known answers and the uint64 path, its scores against the streamed XLA
scores, the same choices in selection and in whole encodings, and that it lowers to a Triton GPU
kernel (the primitives it uses all have Triton lowerings) from this CPU machine."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddcm_jax
from ddcm_jax import fused
from ddcm_jax.codebook import AtomSource, _philox_scores, philox4x32

KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]  # fmt: skip


def test_u32_philox_words_are_the_uint64_paths():
    for ctr, key, want in KAT:  # Random123's kat_vectors for philox4x32_10
        got = fused.philox_words_u32(tuple(jnp.asarray([v], jnp.uint32) for v in ctr), tuple(map(np.uint32, key)))
        assert tuple(int(g[0]) for g in got) == want
    rng = np.random.default_rng(0)
    edge = np.array([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF], np.uint64)
    ctr = np.concatenate([np.stack([edge] * 4, -1), rng.integers(0, 2**32, (20_000, 4), dtype=np.uint64)])
    ctr = ctr.astype(np.uint32)
    for key in [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), tuple(int(v) for v in rng.integers(0, 2**32, 2))]:
        words = tuple(jnp.asarray(ctr[:, i]) for i in range(4))
        k = tuple(map(np.uint32, key))
        np.testing.assert_array_equal(np.stack(fused.philox_words_u32(words, k), -1), np.stack(philox4x32(words, k), -1))


@pytest.mark.parametrize(("shape", "count", "first"), [((8, 8, 3), 100, 0), ((7, 5, 3), 33, 0),  # D % 4 = 1
                                                       ((32, 32, 3), 130, 0), ((6, 6, 4), 70, 1000),
                                                       ((64, 64, 3), 40, 5)])  # fmt: skip
def test_fused_scores_are_the_streamed_scores(shape, count, first):
    """Every <z_k, r> of the kernel equals XLA's streamed score to float32 rounding of the sum
    (the same atoms: a wrong word, element or atom would be off by O(|r|)); the last case
    splits the sum over D (6 splits)."""
    rng = np.random.default_rng(count)
    r = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    root, step = jax.random.key(count), jnp.int32(7)
    got = np.asarray(fused.philox_scores(root, step, r, count, first))
    assert fused.grid_for(count, int(np.prod(shape)))[1] == (6 if shape == (64, 64, 3) else 1)
    want = np.asarray(_philox_scores(root, step, jnp.arange(first, first + count), r))
    assert got.shape == (count,)
    scale = np.sqrt(np.prod(shape))  # the scores' spread
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale * 8)


def test_fused_selection_chooses_what_the_stream_chooses():
    rng = np.random.default_rng(1)
    for case in range(12):
        shape = [(16, 16, 3), (9, 11, 3), (8, 8, 4)][case % 3]
        r = rng.standard_normal(shape).astype(np.float32)
        for rule, m in (("ddcm", 1), ("turbo", 7)):
            kw = dict(step=case, num_atoms=m, rule=rule)
            a_idx, a_noise = ddcm_jax.select_atoms(jax.random.key(case), r, 1000, **kw)
            b_idx, b_noise = ddcm_jax.select_atoms(jax.random.key(case), r, 1000, kernel="pallas", **kw)
            np.testing.assert_array_equal(b_idx, a_idx, err_msg=f"{rule} case {case}")
            np.testing.assert_array_equal(b_noise, a_noise)  # the noise is built from the same atoms


def test_a_whole_encoding_with_the_fused_kernel(tiny_model_dir):
    """compress(codebook_kernel="pallas") writes the code the XLA path writes, so its file decodes
    to the same picture (DDCM argmax and Turbo top-M, a batch of two)."""
    model = ddcm_jax.load_model(tiny_model_dir)
    n = model.config.architecture.image_size
    images = np.random.default_rng(2).uniform(-1, 1, (2, n, n, 3)).astype(np.float32)
    for rule, m in (("ddcm", 1), ("turbo", 4)):
        kw = dict(steps=6, codebook_size=96, num_atoms=m, rule=rule, key=3)
        a = ddcm_jax.compress(model, images, **kw)
        b = ddcm_jax.compress(model, images, codebook_kernel="pallas", **kw)
        np.testing.assert_array_equal(b.indices, a.indices, err_msg=rule)
        np.testing.assert_array_equal(b.image, a.image)


def test_bad_kernel_settings_are_refused():
    with pytest.raises(ValueError, match="unknown codebook kernel 'cuda'"):
        AtomSource(8, (4,), kernel="cuda")
    with pytest.raises(ValueError, match="scores philox codebooks, not 'threefry'"):
        AtomSource(8, (4,), "threefry", kernel="pallas")


@pytest.mark.parametrize(("count", "shape"), [(16384, (64, 64, 4)), (4096, (256, 256, 3)), (1000, (9, 11, 3))])
def test_the_kernel_lowers_to_a_triton_gpu_kernel(count, shape):
    """Exported for CUDA from this CPU machine with the compiled (not interpreted) kernel: every
    primitive it uses has a Pallas Triton lowering, on the grid `grid_for` plans (SD 2.1 latents,
    ADM-256 images with the sum over D split, an odd small shape)."""
    from jax import export

    def scores(root: jax.Array, r: jax.Array) -> jax.Array:
        return fused.philox_scores(root, jnp.int32(3), r, count, interpret=False)

    triton = "__gpu$xla.gpu.triton"
    exp = export.export(jax.jit(scores), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
        jax.random.key(0), jnp.zeros(shape, jnp.float32))  # fmt: skip
    text = exp.mlir_module()
    assert text.count(f"@{triton}") == 1 and 'name = "ddcm_philox_scores"' in text
    n_p, splits, _ = fused.grid_for(count, int(np.prod(shape)))
    assert (int(re.search(r"grid_x = (\d+)", text).group(1)), int(re.search(r"grid_y = (\d+)", text).group(1))) == (
        n_p, splits)  # fmt: skip
    assert exp.out_avals[0].shape == (count,)


def test_a_batch_lowers_to_one_kernel_with_a_batch_grid_axis():
    """`compress` of a batch vmaps the sampler, so the kernel: one Triton call, the batch a grid axis."""
    from jax import export

    triton = "__gpu$xla.gpu.triton"
    fn = jax.vmap(lambda root, r: fused.philox_scores(root, jnp.int32(3), r, 16384, interpret=False),
                  in_axes=(None, 0))  # fmt: skip
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(
        triton)])(jax.random.key(0), jnp.zeros((3, 64, 64, 4), jnp.float32))  # fmt: skip
    text = exp.mlir_module()
    assert text.count(f"@{triton}") == 1 and "grid_z = 3" in text
    assert exp.out_avals[0].shape == (3, 16384)


def test_the_grid_fills_a_large_gpu():
    # A Turbo step at SD 2.1-base latents and a DDCM step at ADM-256: about TARGET_PROGRAMS programs,
    # the sum over D split where K alone gives too few; a tiny problem is one split.
    assert fused.grid_for(16384, 16384) == (256, 4, 16)
    assert fused.grid_for(4096, 196608) == (64, 16, 48)
    assert fused.grid_for(100, 192) == (2, 1, 1)
    for k, d in [(16384, 16384), (4096, 196608), (4096, 3 * 64 * 64), (1024, 4 * 24 * 16)]:
        n_p, splits, per = fused.grid_for(k, d)
        assert n_p * fused.BLOCK_ATOMS >= k and splits * per * fused.BLOCK_GROUPS * 4 >= d
        assert per >= 8 or splits == 1


SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from ddcm_jax.codebook import AtomSource
assert jax.device_count() == 4
mesh = jax.make_mesh((4,), ("codebook",))
r = jnp.asarray(np.random.default_rng(0).standard_normal((10, 10, 3)).astype(np.float32))
root = jax.random.key(5)
for k in (203, 256):  # a slice per device; the last one short for 203
    def run(kernel, axis):
        book = AtomSource(k, r.shape, kernel=kernel, axis_name=axis, root=root, step=jnp.int32(4))
        return book.best(r), book.top_abs(r, 9), book.scores(r)
    want = jax.jit(lambda: run("xla", None))()
    got = jax.jit(jax.shard_map(lambda: run("pallas", "codebook"), mesh=mesh, in_specs=(), out_specs=P(),
                                check_vma=False))()
    assert int(got[0][0]) == int(want[0][0]), k
    assert np.array_equal(np.asarray(got[1][0]), np.asarray(want[1][0])), k
    assert got[2].shape == (k,) and np.allclose(np.asarray(got[2]), np.asarray(want[2]), atol=1e-4), k
import sys, ddcm_jax
from ddcm_jax.parallel import compress_sharded, make_mesh
m = ddcm_jax.load_model(sys.argv[1])
ims = np.random.default_rng(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
kw = dict(steps=4, codebook_size=90, key=2, rule="turbo", num_atoms=3)
one = ddcm_jax.compress(m, ims, **kw)
r = compress_sharded(m, ims, mesh=make_mesh(2, 2), codebook_kernel="pallas", **kw)
assert np.array_equal(np.asarray(r.indices), np.asarray(one.indices))
assert np.array_equal(np.asarray(r.coeffs), np.asarray(one.coeffs))
print("OK")
"""


def test_fused_scoring_split_across_devices(tiny_model_dir):
    """A codebook split over 4 devices (`axis_name`), each scoring its slice with the kernel, ranks
    the atoms as one device streaming them does; so does `compress_sharded(codebook_kernel=
    "pallas")` on a 2 x 2 mesh against one device's `compress`."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
