"""Codebooks: atoms addressed by integers, generated on the fly, scored as a stream.

A codebook is never stored. Atom k of step i is a pure function of the
codebook root key and the integers (i, k), so an encoder can score K atoms
chunk by chunk and a decoder regenerates only the atoms it was told about.

Generators (`AtomSource.generator`):

  philox    (default) Philox4x32-10 (Salmon et al. 2011, Random123) in plain
            integer ops, counter (element group j, atom k, step i, 0), key =
            64 bits drawn from the root key. The four words (w0, w1, w2, w3) of
            group j become elements 4j .. 4j+3 by Box-Muller on the pairs
            (w0, w1) and (w2, w3): radius sqrt(-2 log t) with t an exact odd
            multiple of 2^-24 in (0, 1) from the high bits of w0 (see
            `_radius_uniform`), angle 2 pi v with v from the 24 high bits of
            w1, its sine and cosine by an exact octant reduction (3 bits) and
            short polynomials on [0, pi/4] written out here, so the atoms do not
            depend on XLA's own sin/cos. Two exactly independent normals per
            pair, about 30 % cheaper than an inverse-CDF transform.
  threefry  jax.random.normal(fold_in(fold_in(root, i), k), shape): JAX's default
            threefry2x32 and transform (the first generator of this project).
  shift     a structured family, for research: one Gaussian vector g, a random
            sign pattern s and a random permutation p per step (all from the
            philox stream), and atom k is z_k[p[d]] = s[d] g[(d - k) mod D].
            Every atom is exactly N(0, I) and any two are uncorrelated, but they
            are not independent. All K <= D inner products come from one FFT
            cross-correlation, <z_k, r> = sum_d g[d - k] (s * r[p])[d], in
            O(D log D) instead of K x D.
  array     explicit atoms (K, *shape), e.g. the reference traces' codebooks.

What is guaranteed: the philox *integer* stream is bit-identical on every
backend and JAX version (integer ops are exact; tested against the Random123
known answers). The float transform uses log and sqrt, whose last-bit
rounding (and whether XLA contracts a*b+c into an FMA) may differ between
backends; atoms may then differ by a few ulps, so a file is decoded exactly on
the kind of backend that encoded it and to within float rounding elsewhere.
The bitstream header records the generator, the JAX version and a coarse
checksum of the atoms, which catches any change of generator or transform.

Scoring streams over chunks of atoms (a `lax.scan`): `best` keeps a running
argmax and `top_abs` a running top-M, so peak memory is chunk x D whatever K
is; `scores` returns all K inner products for rules that need them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.pytree import pytree_dataclass, static_field

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "GENERATORS",
    "KERNELS",
    "AtomSource",
    "Generator",
    "atom",
    "atoms",
    "box_muller",
    "chunk_for",
    "dot",
    "normals_from_words",
    "philox4x32",
    "static_field",
    "step_key",
]

DEFAULT_CHUNK_BYTES = 64 << 20  # float32 working set of one chunk of atoms
KERNELS = ("xla", "pallas")  # how a philox codebook is scored (`AtomSource.kernel`; "pallas": `ddcm_jax.fused`)

# Philox4x32 constants (Random123).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def step_key(root: jax.Array, i: jax.Array | int) -> jax.Array:
    """The key of respaced step i's codebook (threefry generator)."""
    return jax.random.fold_in(root, i)


# --- Philox4x32-10 ------------------------------------------------------------------------------


def philox4x32(counter: tuple[jax.Array, ...], key: tuple[Any, Any], rounds: int = 10) -> tuple[jax.Array, ...]:
    """Philox4x32 on uint32 counter words (c0, c1, c2, c3) and key (k0, k1), elementwise.

    The 32x32 -> 64-bit products run in uint64 inside a local x64 scope (XLA
    has 64-bit integers on every backend even when JAX's x64 mode is off);
    inputs and outputs are uint32.
    """
    with jax.enable_x64(True):
        mask = jnp.uint64(0xFFFFFFFF)
        c0, c1, c2, c3 = (jnp.asarray(c, jnp.uint32).astype(jnp.uint64) for c in counter)
        k0, k1 = (jnp.asarray(k, jnp.uint32).astype(jnp.uint64) for k in key)
        for _ in range(rounds):
            p0, p1 = c0 * jnp.uint64(_M0), c2 * jnp.uint64(_M1)
            c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c3 ^ k1) & mask, p0 & mask
            k0, k1 = (k0 + jnp.uint64(_W0)) & mask, (k1 + jnp.uint64(_W1)) & mask
        return tuple(c.astype(jnp.uint32) for c in (c0, c1, c2, c3))


def _radius_uniform(w: jax.Array) -> jax.Array:
    """A uniform in (0, 1) from the 24 high bits m of w, folded at 1/2: t = (2 min(m, 2^24-1-m) + 1) / 2^24.

    Odd multiples of 2^-24 below 1 are exact in float32 (23 bits of resolution),
    so log(t) stays accurate near t = 1, where (m + 1/2) / 2^24 would round to 1.
    """
    m = (w >> 8).astype(jnp.int32)
    k = jnp.minimum(m, (1 << 24) - 1 - m)
    return (2 * k + 1).astype(jnp.float32) * np.float32(2.0**-24)


def _sincos_2pi(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of 2 pi v, v the 24 high bits of w: octant from the top 3 bits, exactly reduced."""
    octant = w >> 29
    t = (((w >> 8) & 0x1FFFFF).astype(jnp.int32).astype(jnp.float32) + 0.5) * np.float32(2.0**-21)  # (0, 1)
    odd = (octant & 1) == 1
    phi = jnp.where(odd, 1.0 - t, t) * np.float32(math.pi / 4)  # odd octants mirror: pi/4 - phi
    p2 = phi * phi
    # Taylor polynomials on [0, pi/4]: truncation error below 3e-8.
    sin = phi * (1 + p2 * (np.float32(-1 / 6) + p2 * (np.float32(1 / 120) + p2 * (np.float32(-1 / 5040)
                                                                                  + p2 * np.float32(1 / 362880)))))
    cos = 1 + p2 * (np.float32(-1 / 2) + p2 * (np.float32(1 / 24) + p2 * (np.float32(-1 / 720)
                                                                         + p2 * np.float32(1 / 40320))))  # fmt: skip
    s0, c0 = jnp.where(odd, cos, sin), jnp.where(odd, sin, cos)  # within the first quadrant
    q = octant >> 1  # rotate by q quarter turns
    s = jnp.where(q == 0, s0, jnp.where(q == 1, c0, jnp.where(q == 2, -s0, -c0)))
    c = jnp.where(q == 0, c0, jnp.where(q == 1, -s0, jnp.where(q == 2, -c0, s0)))
    return s, c


def box_muller(wa: jax.Array, wb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two independent standard normals per pair of uint32 words: (r cos theta, r sin theta)."""
    r = jnp.sqrt(-2.0 * jnp.log(_radius_uniform(wa)))
    s, c = _sincos_2pi(wb)
    return r * c, r * s


def normals_from_words(words: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Philox's four words per counter -> four normals (elements 4j .. 4j+3)."""
    z0, z1 = box_muller(words[0], words[1])
    z2, z3 = box_muller(words[2], words[3])
    return z0, z1, z2, z3


def _philox_key(root: jax.Array) -> tuple[jax.Array, jax.Array]:
    """64 key bits for the philox generator, drawn once from the root (any key impl)."""
    words = jax.random.bits(root, (2,), jnp.uint32)
    return words[0], words[1]


def _philox_words(root: jax.Array, step: jax.Array, ks: jax.Array, groups: int) -> tuple[jax.Array, ...]:
    """The 4 output words (n, groups) of counters (j, k, i, 0): element 4j + q of atom k is word q."""
    n = ks.shape[0]
    j = jnp.broadcast_to(jnp.arange(groups, dtype=jnp.uint32)[None, :], (n, groups))
    k = jnp.broadcast_to(jnp.asarray(ks).astype(jnp.uint32)[:, None], (n, groups))
    i = jnp.broadcast_to(jnp.asarray(step).astype(jnp.uint32), (n, groups))
    return philox4x32((j, k, i, jnp.zeros((n, groups), jnp.uint32)), _philox_key(root))


def _philox_atoms(root: jax.Array, step: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    d = math.prod(shape)
    z = normals_from_words(_philox_words(root, step, ks, -(-d // 4)))
    return jnp.stack(z, axis=-1).reshape(ks.shape[0], -1)[:, :d].reshape(ks.shape[0], *shape)


def _philox_scores(root: jax.Array, step: jax.Array, ks: jax.Array, r: jax.Array) -> jax.Array:
    """<z_k, r> without interleaving: sum_q sum_j z_q[j] r[4j + q] over the four normal streams.

    Interleaving the four streams into element order is a transpose that stops
    XLA from fusing generation into the reduction (3.5x slower here); instead
    the residual is transposed once (zero-padded to a multiple of 4) and each
    stream is reduced on its own.
    """
    flat = r.reshape(-1)
    groups = -(-flat.shape[0] // 4)
    rt = jnp.pad(flat, (0, 4 * groups - flat.shape[0])).reshape(groups, 4).T
    z = normals_from_words(_philox_words(root, step, ks, groups))
    return sum(jnp.sum(zq * rt[q][None], axis=1) for q, zq in enumerate(z))


def _shift_base(root: jax.Array, step: jax.Array, d: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(g (D,), signs (D,), perm (D,)) of a shift codebook: philox streams 1, 2, 3 of the step."""
    key = _philox_key(root)
    groups = -(-d // 4)
    j = jnp.arange(groups, dtype=jnp.uint32)
    i = jnp.broadcast_to(jnp.asarray(step).astype(jnp.uint32), (groups,))
    zero = jnp.zeros((groups,), jnp.uint32)

    def words(tag: int) -> tuple[jax.Array, ...]:
        return philox4x32((j, zero, i, jnp.full((groups,), tag, jnp.uint32)), key)

    def flat(parts: tuple[jax.Array, ...]) -> jax.Array:
        return jnp.stack(parts, -1).reshape(-1)[:d]

    g = flat(normals_from_words(words(1)))
    signs = jnp.where((flat(words(2)) >> 31) == 1, -1.0, 1.0).astype(jnp.float32)
    perm = jnp.argsort(flat(words(3)), stable=True).astype(jnp.int32)  # a uniformly random permutation
    return g, signs, perm


def _shift_atoms(base: tuple[jax.Array, ...], ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    g, signs, perm = base
    d = g.shape[0]
    idx = (jnp.arange(d, dtype=jnp.int32)[None, :] - jnp.asarray(ks, jnp.int32)[:, None]) % d
    u = signs[None, :] * g[idx]  # u_k[d] = s[d] g[d - k]
    z = jnp.zeros_like(u).at[:, perm].set(u)  # z_k[p[d]] = u_k[d]
    return z.reshape(-1, *shape)


def _shift_scores(base: tuple[jax.Array, ...], r: jax.Array, size: int) -> jax.Array:
    """<z_k, r> for k < size by one FFT cross-correlation."""
    g, signs, perm = base
    rp = signs * r.reshape(-1)[perm]
    corr = jnp.fft.irfft(jnp.conj(jnp.fft.rfft(g)) * jnp.fft.rfft(rp), n=g.shape[0])  # corr[k] = sum_d g[d-k] rp[d]
    return corr[:size].astype(jnp.float32)


def _threefry_atoms(root: jax.Array, step: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return atoms(step_key(root, step), ks, shape)


def atom(key: jax.Array, k: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
    """Atom k of a threefry codebook whose step key is `key`: N(0, I) of `shape`, float32."""
    return jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32)


def atoms(key: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Atoms ks (N,) of a threefry codebook whose step key is `key` -> (N, *shape)."""
    return jax.vmap(lambda k: atom(key, k, shape))(ks)


# --- chunking -----------------------------------------------------------------------------------


def chunk_for(shape: tuple[int, ...], codebook_size: int, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Atoms per chunk so that a chunk's float32 working set (about 3 copies) fits `budget`."""
    per_atom = 3 * 4 * max(1, math.prod(shape))
    return int(max(1, min(codebook_size, budget // per_atom)))


def _chunks(size: int, chunk: int) -> tuple[int, jax.Array]:
    n = -(-size // chunk)
    return n, jnp.arange(n, dtype=jnp.int32) * chunk


# --- generators ---------------------------------------------------------------------------------


class Generator:
    """How a codebook's atoms come to be: one small class per generator, one instance each.

    `atoms` is required; `linear` (<z_k, r> for atoms ks) defaults to
    generating them; `all_scores` (every <z_k, r> at once) is None for
    generators that stream, and `prepare` precomputes per-step state. Adding a
    generator: a subclass here, an entry in `_GENERATORS`, and its format byte
    in `ddcm_jax.bitstream.CODEBOOK_GENERATORS` (the format's byte).
    """

    def atoms(self, book: AtomSource, ks: jax.Array) -> jax.Array:
        raise NotImplementedError

    def linear(self, book: AtomSource, ks: jax.Array, r: jax.Array) -> jax.Array:
        return dot(self.atoms(book, ks), r)

    def all_scores(self, book: AtomSource, r: jax.Array) -> jax.Array | None:
        return None

    def prepare(self, book: AtomSource) -> AtomSource:
        return book


class _Philox(Generator):
    def atoms(self, book: AtomSource, ks: jax.Array) -> jax.Array:
        return _philox_atoms(book.root, book.step, ks, book.shape)

    def linear(self, book: AtomSource, ks: jax.Array, r: jax.Array) -> jax.Array:
        return _philox_scores(book.root, book.step, ks, r)

    def all_scores(self, book: AtomSource, r: jax.Array) -> jax.Array | None:
        if book.kernel != "pallas":
            return None  # streamed chunk by chunk
        from ddcm_jax import fused  # fused builds on this module

        local, first = book._slice()
        s = fused.philox_scores(book.root, book.step, r, local, first)
        if book.axis_name is not None:
            s = jax.lax.all_gather(s, book.axis_name, tiled=True)
        return s[: book.size]


class _Threefry(Generator):
    def atoms(self, book: AtomSource, ks: jax.Array) -> jax.Array:
        return _threefry_atoms(book.root, book.step, ks, book.shape)


class _Shift(Generator):
    def atoms(self, book: AtomSource, ks: jax.Array) -> jax.Array:
        return _shift_atoms(self.prepare(book).base, ks, book.shape)

    def all_scores(self, book: AtomSource, r: jax.Array) -> jax.Array:
        return _shift_scores(self.prepare(book).base, r, book.size)

    def prepare(self, book: AtomSource) -> AtomSource:
        if book.base is not None:
            return book
        d = math.prod(book.shape)
        if book.size > d:
            raise ValueError(f"the shift codebook has at most D = {d} atoms, K = {book.size} asked")
        return dataclasses.replace(book, base=_shift_base(book.root, book.step, d))


class _Explicit(Generator):
    def atoms(self, book: AtomSource, ks: jax.Array) -> jax.Array:
        return book.array[ks]


_GENERATORS: dict[str, Generator] = {"philox": _Philox(), "threefry": _Threefry(), "shift": _Shift(),
                                     "array": _Explicit()}  # fmt: skip
GENERATORS = tuple(name for name in _GENERATORS if name != "array")  # those a key derives (and files name)


# --- the engine ---------------------------------------------------------------------------------


@pytree_dataclass
class AtomSource:
    """One step's codebook: K atoms of `shape`, from a root key and step index, or an array.

    `generator` names one of `GENERATORS` ("philox", "threefry", "shift") or is
    "array" (then `array` is (K, *shape)).
    `chunk` atoms are generated and scored at a time (None: `chunk_for` the
    default memory budget). With `axis_name`, the codebook is split across the
    devices of that mesh axis (inside `shard_map`): each scores a contiguous
    slice of indices and the results are combined exactly as one device would
    have ranked them (ties to the lower index).
    `kernel` "xla" (default) streams chunks through XLA; "pallas" scores a philox
    codebook in one fused kernel (`ddcm_jax.fused`: the atoms never reach memory;
    the same atoms, sums in another order).
    """

    size: int = static_field()
    shape: tuple[int, ...] = static_field()
    generator: str = static_field("philox")
    chunk: int | None = static_field(None)
    axis_name: str | None = static_field(None)
    kernel: str = static_field("xla")
    root: jax.Array | None = None
    step: jax.Array | None = None
    array: jax.Array | None = None
    base: tuple[jax.Array, ...] | None = None  # the shift family's (g, signs, perm), see `with_base`

    def __post_init__(self) -> None:
        if self.generator not in _GENERATORS:
            raise ValueError(f"unknown codebook generator {self.generator!r} ({', '.join(GENERATORS)})")
        if (self.array is not None) != (self.generator == "array"):
            raise ValueError("explicit atoms go with generator='array' (use AtomSource.from_array)")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown codebook kernel {self.kernel!r} ({', '.join(KERNELS)})")
        if self.kernel == "pallas" and self.generator != "philox":
            raise ValueError(f"the pallas kernel scores philox codebooks, not {self.generator!r} ones")

    @classmethod
    def from_array(cls, array: jax.Array, **kw: Any) -> AtomSource:
        return cls(int(array.shape[0]), tuple(array.shape[1:]), "array", array=array, **kw)

    @property
    def _gen(self) -> Generator:
        return _GENERATORS[self.generator]

    def with_base(self) -> AtomSource:
        """The generator's per-step state (the shift family's vectors), computed once."""
        return self._gen.prepare(self)

    # Atoms by index ------------------------------------------------------------------------------

    def get(self, ks: jax.Array) -> jax.Array:
        """Atoms ks (n,) -> (n, *shape); indices are taken as given (0 <= k < K)."""
        return self._gen.atoms(self, ks)

    # Streams over the codebook -------------------------------------------------------------------

    def _slice(self) -> tuple[int, jax.Array]:
        """(atoms this device scores, index of its first atom)."""
        if self.axis_name is None:
            return self.size, jnp.int32(0)
        n = jax.lax.psum(1, self.axis_name)
        local = -(-self.size // n)
        return local, jax.lax.axis_index(self.axis_name).astype(jnp.int32) * local

    def _scan(self, fn: Callable[[jax.Array, jax.Array, jax.Array], Any], init: Any) -> Any:
        """Fold fn(carry, ks (chunk,), valid (chunk,)) over this device's chunks of atom indices."""
        local, first = self._slice()
        chunk = self.chunk or chunk_for(self.shape, local)
        chunk = max(1, min(chunk, local))
        _, starts = _chunks(local, chunk)

        def body(carry: Any, start: jax.Array) -> tuple[Any, None]:
            offs = start + jnp.arange(chunk, dtype=jnp.int32)
            ks = first + offs
            valid = (offs < local) & (ks < self.size)
            return fn(carry, jnp.where(valid, ks, 0), valid), None

        return jax.lax.scan(body, init, starts)[0]

    def map(self, score: Callable[[jax.Array], jax.Array], width: tuple[int, ...] = ()) -> jax.Array:
        """score(z (n, *shape)) -> (n, *width) for every atom: (K, *width)."""
        book = self.with_base()
        return book._map_ks(lambda ks: score(book.get(ks)), width)

    def _map_ks(self, score_ks: Callable[[jax.Array], jax.Array], width: tuple[int, ...]) -> jax.Array:
        local, first = self._slice()
        chunk = max(1, min(self.chunk or chunk_for(self.shape, local), local))
        n_chunks, starts = _chunks(local, chunk)

        def one(start: jax.Array) -> jax.Array:
            ks = jnp.minimum(first + start + jnp.arange(chunk, dtype=jnp.int32), self.size - 1)
            return score_ks(ks)

        out = jax.lax.map(one, starts).reshape(n_chunks * chunk, *width)[:local]
        if self.axis_name is not None:
            out = jax.lax.all_gather(out, self.axis_name, tiled=True)
        return out[: self.size]

    def _linear(self, ks: jax.Array, r: jax.Array) -> jax.Array:
        """<z_k, r> for atoms ks, by the generator's fastest exact route."""
        return self._gen.linear(self, ks, r)

    def scores(self, r: jax.Array) -> jax.Array:
        """<z_k, r> for every atom: (K,)."""
        s = self._gen.all_scores(self, r)
        return self._map_ks(lambda ks: self._linear(ks, r), ()) if s is None else s

    def best(self, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        """argmax_k <z_k, r> (the first index among equal scores) and its score, streaming."""
        s = self._gen.all_scores(self, r)
        if s is not None:
            j = jnp.argmax(s).astype(jnp.int32)
            return j, s[j]
        return self._best_ks(lambda ks: self._linear(ks, r))

    def best_of(self, score: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        """argmax_k score(z_k) for a per-atom score (n, *shape) -> (n,), streaming."""
        book = self.with_base()
        return book._best_ks(lambda ks: score(book.get(ks)))

    def _best_ks(self, score_ks: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        """argmax over atoms of score_ks(ks (n,)) -> (n,), streaming; ties to the lower index."""

        def fold(carry: tuple[jax.Array, jax.Array], ks: jax.Array, valid: jax.Array) -> Any:
            s = jnp.where(valid, score_ks(ks), -jnp.inf)
            j = jnp.argmax(s)
            better = s[j] > carry[0]  # strict: an earlier chunk keeps its tie
            return jnp.where(better, s[j], carry[0]), jnp.where(better, ks[j], carry[1])

        top, idx = self._scan(fold, (jnp.float32(-jnp.inf), jnp.int32(0)))
        if self.axis_name is not None:
            tops = jax.lax.all_gather(top, self.axis_name)
            idxs = jax.lax.all_gather(idx, self.axis_name)
            top = jnp.max(tops)
            idx = jnp.min(jnp.where(tops == top, idxs, jnp.iinfo(jnp.int32).max))
        return idx.astype(jnp.int32), top

    def top_abs(self, r: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
        """The m atoms with the largest |<z_k, r>| (lower index first among ties) and their scores.

        Returns (indices (m,), scores (m,)) ordered by decreasing |score|.
        """
        s = self._gen.all_scores(self, r)
        if s is not None:
            _, top = jax.lax.top_k(jnp.abs(s), m)  # ties: the lower index first
            return top.astype(jnp.int32), s[top]

        def fold(carry: tuple[jax.Array, jax.Array], ks: jax.Array, valid: jax.Array) -> Any:
            return _merge_top(carry, (ks, self._linear(ks, r)), valid, m)

        init = (jnp.zeros((m,), jnp.int32), jnp.full((m,), jnp.nan, jnp.float32))
        idx, s = self._scan(fold, init)
        if self.axis_name is not None:
            idxs = jax.lax.all_gather(idx, self.axis_name, tiled=True)
            ss = jax.lax.all_gather(s, self.axis_name, tiled=True)
            idx, s = _merge_top(init, (idxs, ss), ~jnp.isnan(ss), m)
        return idx, s


def dot(z: jax.Array, r: jax.Array) -> jax.Array:
    """<z_k, r> for z (n, *shape): per-atom inner products, summed elementwise so XLA can fuse
    the generation of z into the reduction."""
    return jnp.sum((z * r[None]).reshape(z.shape[0], -1), axis=1)


def _merge_top(carry: tuple[jax.Array, jax.Array], new: tuple[jax.Array, jax.Array], valid: jax.Array,
               m: int) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Top m by |score| over carry + new; ties to the lower atom index (NaN marks empty slots)."""
    idx = jnp.concatenate([carry[0], new[0]])
    s = jnp.concatenate([carry[1], jnp.where(valid, new[1], jnp.nan)])
    mag = jnp.where(jnp.isnan(s), -jnp.inf, jnp.abs(s))
    # Rank by (|s| desc, index asc): sort on index first, then stably by magnitude.
    order = jnp.argsort(idx, stable=True)
    order = order[jnp.argsort(-mag[order], stable=True)][:m]
    return idx[order], s[order]
