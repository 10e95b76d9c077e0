"""Fused codebook scoring: philox atoms generated, transformed and dotted with the residual in one
Pallas kernel, so that no atom is ever written to memory.

The XLA path (`AtomSource(kernel="xla")`, the default) scores a chunk of atoms
at a time; XLA:CPU fuses the generation into the reduction, but a GPU backend
may write each chunk's atoms out and read them back (the suite measured 2.8 ms
for a Turbo step at K = 16384, D = 16384 on an H100 against PyTorch's 1.2 ms).
`kernel="pallas"` computes every <z_k, r> in one kernel instead:

    program (p, s) owns atoms ks = first + p*BK .. first + (p+1)*BK - 1
    and split s of the element groups (a group is 4 elements);
    for each block of BG groups j of its split:
        (w0, w1, w2, w3) = Philox4x32-10((j, k, i, 0), key)    (BK, BG) tiles
        (z0, z1, z2, z3) = Box-Muller(w0, w1), Box-Muller(w2, w3)
        s[k] += sum_j sum_q z_q[k, j] r[4j + q]
    partial scores (splits, K) are the only output; their sum over splits
    gives the scores, and argmax / top-M run on them.

The atoms are the philox generator's own (`ddcm_jax.codebook`, elements 4j+q of
atom k are word q of counter (j, k, i, 0)): the words are computed here with
32-bit operations only (the 32x32 -> 64-bit products by 16-bit halves), which
equal the uint64 path's bit for bit (`tests/test_fused.py`), and the same
Box-Muller transform. Only the order of the float32 sum differs from the XLA
path, so scores agree to rounding and the chosen indices are the same unless
two scores tie to within it; a decoder regenerates the chosen atoms either way,
so a file decodes to the same picture whichever kernel encoded it.

On a GPU the kernel is compiled through Pallas' Triton backend; on any other
backend it runs in Pallas' interpreter (correct; on a 2-core CPU about 1.6x the
XLA stream's time: for tests and for checking a GPU's indices on a CPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from ddcm_jax.codebook import _M0, _M1, _W0, _W1, _philox_key, normals_from_words

__all__ = ["BLOCK_ATOMS", "BLOCK_GROUPS", "TARGET_PROGRAMS", "grid_for", "philox_scores", "philox_words_u32"]

BLOCK_ATOMS = 64  # atoms per program (BK)
BLOCK_GROUPS = 64  # element groups (4 elements each) per inner step (BG)
TARGET_PROGRAMS = 1024  # programs to aim for: several per streaming multiprocessor of a large GPU


def _mulhilo(a: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(high, low) 32-bit words of the 64-bit product a * m, a uint32, m a 32-bit constant.

    By 16-bit halves: every partial product is below 2^32 and the middle sum
    below 3 * 2^16, so no step overflows uint32 (backends without 64-bit
    integers in kernels take the same path).
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    m_lo, m_hi = jnp.uint32(m & 0xFFFF), jnp.uint32(m >> 16)
    ll, lh, hl, hh = a_lo * m_lo, a_lo * m_hi, a_hi * m_lo, a_hi * m_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return hh + (lh >> 16) + (hl >> 16) + (mid >> 16), a * jnp.uint32(m)


def philox_words_u32(counter: tuple[jax.Array, ...], key: tuple[jax.Array, jax.Array],
                     rounds: int = 10) -> tuple[jax.Array, ...]:  # fmt: skip
    """Philox4x32 in uint32 operations only: `codebook.philox4x32` bit for bit."""
    c0, c1, c2, c3 = (jnp.asarray(c, jnp.uint32) for c in counter)
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + jnp.uint32(_W0), k1 + jnp.uint32(_W1)
    return c0, c1, c2, c3


def _kernel(meta_ref: Any, rt_ref: Any, out_ref: Any, *, bk: int, bg: int, per: int) -> None:
    # meta: (key word 0, key word 1, step, first atom) as uint32; rt: (4, groups) the residual by
    # stream; program (p, s) sums atoms p*bk .. over the element groups of its split s.
    k0, k1, step, first = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    base = first + (pl.program_id(0) * bk).astype(jnp.uint32)
    ks = base + jax.lax.broadcasted_iota(jnp.int32, (bk, bg), 0).astype(jnp.uint32)
    lanes = jax.lax.broadcasted_iota(jnp.int32, (bk, bg), 1)
    steps, zeros = jnp.full((bk, bg), step, jnp.uint32), jnp.zeros((bk, bg), jnp.uint32)
    g0 = pl.program_id(1) * per

    def body(g: jax.Array, acc: jax.Array) -> jax.Array:
        j = ((g0 + g) * bg + lanes).astype(jnp.uint32)
        z = normals_from_words(philox_words_u32((j, ks, steps, zeros), (k0, k1)))
        cols = pl.ds((g0 + g) * bg, bg)  # each stream's residual row loaded on its own (no value slices in Triton)
        return acc + sum(jnp.sum(zq * rt_ref[q, cols][None, :], axis=1) for q, zq in enumerate(z))

    out_ref[...] = jax.lax.fori_loop(0, per, body, jnp.zeros((bk,), jnp.float32))[None, :]


def grid_for(count: int, d: int, block_atoms: int = BLOCK_ATOMS,
             block_groups: int = BLOCK_GROUPS) -> tuple[int, int, int]:  # fmt: skip
    """(atom blocks, splits of the element groups, group blocks per split) for K = count, D = d.

    Enough programs to fill a large GPU (about `TARGET_PROGRAMS`): a small K with a long D
    (ADM-256: K 4096, D 196,608) splits the sum over D, each split writing its partial
    scores; splits keep at least 8 group blocks each.
    """
    groups = -(-d // 4)
    n_p = max(1, -(-count // block_atoms))
    n_g = max(1, -(-groups // block_groups))
    splits = max(1, min(n_g // 8, -(-TARGET_PROGRAMS // n_p)))
    return n_p, splits, -(-n_g // splits)


@functools.partial(jax.jit, static_argnames=("count", "block_atoms", "block_groups", "interpret"))
def philox_scores(root: jax.Array, step: jax.Array, r: jax.Array, count: int, first: jax.Array | int = 0, *,
                  block_atoms: int = BLOCK_ATOMS, block_groups: int = BLOCK_GROUPS,
                  interpret: bool | None = None) -> jax.Array:  # fmt: skip
    """<z_k, r> for atoms k = first .. first + count - 1 of the philox codebook (root, step): (count,).

    r: the residual, any shape (D elements). One fused kernel (its partial sums over D
    splits added after it); see the module docstring. `interpret` None: compiled on a
    GPU, interpreted elsewhere (False forces the compiled kernel, e.g. to export a GPU
    program from a CPU machine).
    """
    flat = jnp.asarray(r, jnp.float32).reshape(-1)
    n_p, splits, per = grid_for(count, flat.shape[0], block_atoms, block_groups)
    width = splits * per * block_groups
    # Element 4j + q of the residual -> rt[q, j]; zero-padded, so padded groups add nothing.
    rt = jnp.pad(flat, (0, 4 * width - flat.shape[0])).reshape(width, 4).T
    k0, k1 = _philox_key(root)
    meta = jnp.stack([k0, k1, jnp.asarray(step).astype(jnp.uint32), jnp.asarray(first).astype(jnp.uint32)])
    partial = pl.pallas_call(
        functools.partial(_kernel, bk=block_atoms, bg=block_groups, per=per),
        out_shape=jax.ShapeDtypeStruct((splits, n_p * block_atoms), jnp.float32),
        grid=(n_p, splits),
        in_specs=[pl.BlockSpec((4,), lambda p, s: (0,)), pl.BlockSpec(rt.shape, lambda p, s: (0, 0))],
        out_specs=pl.BlockSpec((1, block_atoms), lambda p, s: (s, p)),
        interpret=jax.default_backend() != "gpu" if interpret is None else interpret,
        name="ddcm_philox_scores",
        compiler_params=plgpu_triton.CompilerParams(num_warps=4, num_stages=1),
    )(meta, rt)
    return jnp.sum(partial, axis=0)[:count]
