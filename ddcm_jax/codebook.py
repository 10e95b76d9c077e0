"""Codebooks: atoms addressed by integers, generated on the fly, scored as a stream.

A codebook is never stored. Atom k of step i is a pure function of the
codebook root key and the integers (i, k), so an encoder can score K atoms
chunk by chunk and a decoder regenerates only the atoms it was told about.

Generators (`AtomSource.generator`):

  philox    (default) Philox4x32-10 (Salmon et al. 2011, Random123) in plain
            integer ops, counter (element group j, atom k, step i, 0), key =
            64 bits drawn from the root key. Each 32-bit word w becomes one
            normal: x = (2 (w >> 8) + 1) / 2^24 - 1 (odd multiples of 2^-24,
            exactly symmetric, never +-1), z = sqrt(2) erfinv(x), erfinv by
            Giles' single-precision polynomials ("Approximating the erfinv
            function", GPU Computing Gems 2010), written out here so that the
            atoms do not depend on XLA's own erf_inv.
  threefry  jax.random.normal(fold_in(fold_in(root, i), k), shape): JAX's default
            threefry2x32 and transform (the first generator of this project).
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

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "GENERATORS",
    "AtomSource",
    "atom",
    "atoms",
    "chunk_for",
    "chunked_scores",
    "normal_from_bits",
    "philox4x32",
    "step_key",
]

GENERATORS = ("philox", "threefry")
DEFAULT_CHUNK_BYTES = 64 << 20  # float32 working set of one chunk of atoms

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


def _erfinv(x: jax.Array) -> jax.Array:
    """Giles' single-precision erfinv: two polynomial branches, selected by w = -log(1 - x^2)."""
    w = -jnp.log((1.0 - x) * (1.0 + x))
    w1 = w - 2.5
    p1 = jnp.float32(2.81022636e-08)
    for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
              -0.00417768164, 0.246640727, 1.50140941):  # fmt: skip
        p1 = np.float32(c) + p1 * w1
    w2 = jnp.sqrt(w) - 3.0
    p2 = jnp.float32(-0.000200214257)
    for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
              0.00943887047, 1.00167406, 2.83297682):  # fmt: skip
        p2 = np.float32(c) + p2 * w2
    return jnp.where(w < 5.0, p1, p2) * x


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 words -> standard normals, one per word (24 bits of each are used)."""
    odd = ((bits >> 8) * 2 + 1).astype(jnp.int32) - (1 << 24)  # odd integers in (-2^24, 2^24)
    x = odd.astype(jnp.float32) * np.float32(2.0**-24)  # exact
    return np.float32(math.sqrt(2.0)) * _erfinv(x)


def _philox_key(root: jax.Array) -> tuple[jax.Array, jax.Array]:
    """64 key bits for the philox generator, drawn once from the root (any key impl)."""
    words = jax.random.bits(root, (2,), jnp.uint32)
    return words[0], words[1]


def _philox_atoms(root: jax.Array, step: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    d = math.prod(shape)
    groups = -(-d // 4)
    j = jnp.arange(groups, dtype=jnp.uint32)[None, :]
    k = jnp.asarray(ks).astype(jnp.uint32)[:, None]
    i = jnp.asarray(step).astype(jnp.uint32)
    words = philox4x32((j, jnp.broadcast_to(k, (k.shape[0], groups)), jnp.broadcast_to(i, (k.shape[0], groups)),
                        jnp.zeros((k.shape[0], groups), jnp.uint32)), _philox_key(root))  # fmt: skip
    flat = jnp.stack(words, axis=-1).reshape(k.shape[0], 4 * groups)[:, :d]
    return normal_from_bits(flat).reshape(k.shape[0], *shape)


def _threefry_atoms(root: jax.Array, step: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    key = step_key(root, step)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32))(ks)


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


def chunked_scores(get_atoms: Callable[[jax.Array], jax.Array], score: Callable[[jax.Array], jax.Array],
                   codebook_size: int, chunk: int) -> jax.Array:  # fmt: skip
    """Scores (K, ...) of every atom, `chunk` atoms at a time (peak chunk x D, not K x D).

    `get_atoms(ks)` returns atoms (n, *shape) for indices ks (n,); `score(z)`
    maps (n, *shape) -> (n,) or (n, w). Indices past K in the last chunk are
    scored on clamped atoms and masked to -inf.
    """
    chunk = max(1, min(chunk, codebook_size))
    _, starts = _chunks(codebook_size, chunk)

    def one(start: jax.Array) -> jax.Array:
        ks = start + jnp.arange(chunk)
        s = score(get_atoms(jnp.minimum(ks, codebook_size - 1)))
        valid = (ks < codebook_size).reshape((chunk,) + (1,) * (s.ndim - 1))
        return jnp.where(valid, s, -jnp.inf)

    out = jax.lax.map(one, starts)
    return out.reshape(-1, *out.shape[2:])[:codebook_size]


# --- the engine ---------------------------------------------------------------------------------


def _static(default: Any = dataclasses.MISSING) -> Any:
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AtomSource:
    """One step's codebook: K atoms of `shape`, from a root key and step index, or an array.

    `generator` is "philox", "threefry" or "array" (then `array` is (K, *shape)).
    `chunk` atoms are generated and scored at a time (None: `chunk_for` the
    default memory budget). With `axis_name`, the codebook is split across the
    devices of that mesh axis (inside `shard_map`): each scores a contiguous
    slice of indices and the results are combined exactly as one device would
    have ranked them (ties to the lower index).
    """

    size: int = _static()
    shape: tuple[int, ...] = _static()
    generator: str = _static("philox")
    chunk: int | None = _static(None)
    axis_name: str | None = _static(None)
    root: jax.Array | None = None
    step: jax.Array | None = None
    array: jax.Array | None = None

    def __post_init__(self) -> None:
        if self.generator not in (*GENERATORS, "array"):
            raise ValueError(f"unknown codebook generator {self.generator!r} ({', '.join(GENERATORS)})")
        if (self.array is not None) != (self.generator == "array"):
            raise ValueError("explicit atoms go with generator='array' (use AtomSource.from_array)")

    @classmethod
    def from_array(cls, array: jax.Array, **kw: Any) -> AtomSource:
        return cls(int(array.shape[0]), tuple(array.shape[1:]), "array", array=array, **kw)

    # Atoms by index ------------------------------------------------------------------------------

    def get(self, ks: jax.Array) -> jax.Array:
        """Atoms ks (n,) -> (n, *shape); indices are taken as given (0 <= k < K)."""
        if self.generator == "array":
            return self.array[ks]
        make = _philox_atoms if self.generator == "philox" else _threefry_atoms
        return make(self.root, self.step, ks, self.shape)

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
        """score(z (n, *shape)) -> (n, *width) for every atom: (K, *width), -inf never returned."""
        local, first = self._slice()
        chunk = max(1, min(self.chunk or chunk_for(self.shape, local), local))
        n_chunks, starts = _chunks(local, chunk)

        def one(start: jax.Array) -> jax.Array:
            ks = jnp.minimum(first + start + jnp.arange(chunk, dtype=jnp.int32), self.size - 1)
            return score(self.get(ks))

        out = jax.lax.map(one, starts).reshape(n_chunks * chunk, *width)[:local]
        if self.axis_name is not None:
            out = jax.lax.all_gather(out, self.axis_name, tiled=True)
        return out[: self.size]

    def scores(self, r: jax.Array) -> jax.Array:
        """<z_k, r> for every atom: (K,)."""
        return self.map(lambda z: _dot(z, r))

    def best(self, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        """argmax_k <z_k, r> (the first index among equal scores) and its score, streaming."""
        return self.best_of(lambda z: _dot(z, r))

    def best_of(self, score: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
        """argmax_k score(z_k) for a per-atom score (n, *shape) -> (n,), streaming."""

        def fold(carry: tuple[jax.Array, jax.Array], ks: jax.Array, valid: jax.Array) -> Any:
            s = jnp.where(valid, score(self.get(ks)), -jnp.inf)
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
        def fold(carry: tuple[jax.Array, jax.Array], ks: jax.Array, valid: jax.Array) -> Any:
            s = _dot(self.get(ks), r)
            return _merge_top(carry, (ks, s), valid, m)

        init = (jnp.zeros((m,), jnp.int32), jnp.full((m,), jnp.nan, jnp.float32))
        idx, s = self._scan(fold, init)
        if self.axis_name is not None:
            idxs = jax.lax.all_gather(idx, self.axis_name, tiled=True)
            ss = jax.lax.all_gather(s, self.axis_name, tiled=True)
            idx, s = _merge_top(init, (idxs, ss), ~jnp.isnan(ss), m)
        return idx, s


def _dot(z: jax.Array, r: jax.Array) -> jax.Array:
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
