"""Selection rules: which codebook atom(s) become a step's noise.

A rule is a frozen dataclass (its static settings) with two pure methods:

  select(ctx, book) -> Selection(noise, indices, coeffs)   the encoder's choice
  noise(book, indices, coeffs) -> noise                      the decoder's replay

`ctx` is a `StepContext` (x_t, x0_hat, sigma_t, alpha_bar_prev, target,
measurement, weights, key); `book` gives atoms by index (`AtomSource`), from a
key or from explicit arrays. Every rule computes the noise it returns with its
own `noise` method, so encoder and decoder run the same arithmetic on the same
indices. Scores are computed `chunk` atoms at a time (never K x D at once).

Adding a rule: write a dataclass with `select` and `noise`, and pass it as
`rule=` to `compress`; nothing else needs to know about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.codebook import atoms as key_atoms
from ddcm_jax.codebook import chunked_scores

__all__ = [
    "DDCM",
    "MSE",
    "AtomSource",
    "MatchingPursuit",
    "Random",
    "Selection",
    "StepContext",
    "Turbo",
    "colorization",
    "inpainting",
]

DEFAULT_CHUNK = 64


class StepContext(NamedTuple):
    """What a rule may look at in one step (single image, NHWC without batch)."""

    x_t: jax.Array
    x0_hat: jax.Array
    sigma: jax.Array
    alpha_bar_prev: jax.Array
    target: jax.Array | None = None  # compression target in [-1, 1]
    measurement: jax.Array | None = None  # restoration: y = A(x)
    weights: jax.Array | None = None  # priority map, broadcastable to x
    key: jax.Array | None = None  # the rule's own per-step key (random rule)


class Selection(NamedTuple):
    noise: jax.Array  # (H, W, C), unit-variance noise for sigma_t * z
    indices: jax.Array  # (M,) int32
    coeffs: jax.Array  # (M-1,) for matching pursuit, (M,) sign bits for turbo, (0,) otherwise


@dataclasses.dataclass(frozen=True)
class AtomSource:
    """Atoms of one step's codebook: from a step key, or from an explicit (K, *shape) array."""

    size: int
    shape: tuple[int, ...]
    key: jax.Array | None = None
    array: jax.Array | None = None

    def get(self, ks: jax.Array) -> jax.Array:
        if self.array is not None:
            return self.array[ks]
        return key_atoms(self.key, ks, self.shape)


def _dot(z: jax.Array, r: jax.Array) -> jax.Array:
    """<z_k, r> for z (n, *shape): per-atom inner products."""
    return jnp.einsum("n...,...->n", z, r)


def _unit_std(v: jax.Array) -> jax.Array:
    """v / std(v) with the unbiased (ddof = 1) estimator, as the reference."""
    return v / jnp.std(v, ddof=1)


def _single_atom(book: AtomSource, indices: jax.Array) -> jax.Array:
    return book.get(indices[:1])[0]


def _best_single(scores: jax.Array, book: AtomSource) -> Selection:
    """argmax (first index on ties, as the reference) and its atom as the noise."""
    idx = jnp.argmax(scores).astype(jnp.int32)[None]
    return Selection(_single_atom(book, idx), idx, jnp.zeros((0,), jnp.int32))


def _residual(ctx: StepContext) -> jax.Array:
    r = ctx.target - ctx.x0_hat
    return r if ctx.weights is None else r * ctx.weights


@dataclasses.dataclass(frozen=True)
class DDCM:
    """Compression: z* = argmax_k <z_k, w * (target - x0_hat)> (DDCM paper, Sec. 4)."""

    chunk: int = DEFAULT_CHUNK
    num_atoms: int = dataclasses.field(default=1, init=False)

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        return _best_single(chunked_scores(book.get, lambda z: _dot(z, r), book.size, self.chunk), book)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@dataclasses.dataclass(frozen=True)
class MatchingPursuit:
    """M atoms combined greedily with C-bit coefficients (DDCM paper, App. on MP).

    Starting from the best single atom, each of the M-1 rounds forms every
    candidate sqrt(c) * current + sqrt(1 - c) * z_k for c in
    linspace(0, 1, 2**C)[1:], rescales it to unit (ddof = 1) std, and keeps the
    best one only if it raises the score; a round that does not is recorded as
    atom 0 with coefficient index 0. Coefficient indices point into the full
    linspace(0, 1, 2**C) (so kept rounds use 1 .. 2**C - 1).
    """

    num_atoms: int
    coef_bits: int
    chunk: int = DEFAULT_CHUNK

    @property
    def _cs(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, 2**self.coef_bits)

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        first = chunked_scores(book.get, lambda z: _dot(z, r), book.size, self.chunk)
        k0 = jnp.argmax(first).astype(jnp.int32)
        cs = jnp.asarray(self._cs[1:], jnp.float32)
        sqrt_c, sqrt_1mc = jnp.sqrt(cs), jnp.sqrt(1 - cs)

        def round_(carry, _):
            current, best = carry

            def cand_scores(z):  # (n, *shape) -> (n, n_c) -> flattened later
                col = (1, -1) + (1,) * current.ndim
                cand = sqrt_c.reshape(col) * current[None, None] + sqrt_1mc.reshape(col) * z[:, None]
                cand = cand / jnp.std(cand, axis=(2, 3, 4), ddof=1, keepdims=True)
                return jnp.einsum("ncxyz,xyz->nc", cand, r)

            scores = chunked_scores(book.get, cand_scores, book.size, self.chunk)  # (K, n_c)
            flat = scores.T.reshape(-1)  # c-major, as the reference flattens (c, k)
            j = jnp.argmax(flat)
            ci, k = j // book.size, j % book.size
            keep = flat[j] > best
            new = _unit_std(sqrt_c[ci] * current + sqrt_1mc[ci] * book.get(k[None])[0])
            k_out = jnp.where(keep, k, 0).astype(jnp.int32)
            c_out = jnp.where(keep, ci + 1, 0).astype(jnp.int32)
            return (jnp.where(keep, new, current), jnp.where(keep, flat[j], best)), (k_out, c_out)

        init = (book.get(k0[None])[0], first[k0])
        _, (ks, cis) = jax.lax.scan(round_, init, None, length=self.num_atoms - 1)
        idx = jnp.concatenate([k0[None], ks])
        return Selection(self.noise(book, idx, cis), idx, cis)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        cs = jnp.asarray(self._cs, jnp.float32)
        z = book.get(indices)
        current = z[0]
        for m in range(1, self.num_atoms):
            c = cs[coeffs[m - 1]]
            mixed = _unit_std(jnp.sqrt(c) * current + jnp.sqrt(1 - c) * z[m])
            current = jnp.where(coeffs[m - 1] > 0, mixed, current)
        return current


@dataclasses.dataclass(frozen=True)
class Turbo:
    """Turbo-DDCM: the M atoms with the largest |<z_k, r>|, signed, summed, unit std."""

    num_atoms: int
    chunk: int = DEFAULT_CHUNK

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        scores = chunked_scores(book.get, lambda z: _dot(z, r), book.size, self.chunk)
        _, top = jax.lax.top_k(jnp.abs(scores), self.num_atoms)
        idx = jnp.sort(top).astype(jnp.int32)  # the bitstream codes the set, in order
        signs = (scores[idx] < 0).astype(jnp.int32)  # sign bit: 1 = negative
        return Selection(self.noise(book, idx, signs), idx, signs)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        s = 1.0 - 2.0 * coeffs.astype(jnp.float32)
        return _unit_std(jnp.einsum("m,m...->...", s, book.get(indices)))


Operator = Callable[[jax.Array], jax.Array]


def colorization(x: jax.Array) -> jax.Array:
    """Grayscale observation: the channel mean, (H, W, 3) -> (H, W, 1)."""
    return jnp.mean(x, axis=-1, keepdims=True)


def inpainting(mask: jax.Array) -> Operator:
    """Observation of the pixels where `mask` (H, W, 1 or 3) is 1."""
    mask = jnp.asarray(mask, jnp.float32)
    return lambda x: x * mask


@dataclasses.dataclass(frozen=True)
class MSE:
    """Compressed posterior sampling for y = A(x).

    Default: maximise -mean((sigma_t / sqrt(alpha_bar_prev) * A(z) + A(x0_hat) - y)^2);
    `inner_product=True`: maximise <A(z), y - A(x0_hat)>.
    """

    operator: Operator
    inner_product: bool = False
    chunk: int = DEFAULT_CHUNK
    num_atoms: int = dataclasses.field(default=1, init=False)

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        a = jax.vmap(self.operator)
        y_res = ctx.measurement - self.operator(ctx.x0_hat)
        if self.inner_product:
            score = lambda z: _dot(a(z), y_res)  # noqa: E731
        else:
            coef = ctx.sigma / jnp.sqrt(ctx.alpha_bar_prev)
            score = lambda z: -jnp.mean(  # noqa: E731
                jnp.square(coef * a(z) - y_res[None]), axis=tuple(range(1, z.ndim))
            )
        return _best_single(chunked_scores(book.get, score, book.size, self.chunk), book)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@dataclasses.dataclass(frozen=True)
class Random:
    """Compressed generation: a uniform index from the rule's own per-step key."""

    num_atoms: int = dataclasses.field(default=1, init=False)

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        idx = jax.random.randint(ctx.key, (1,), 0, book.size, jnp.int32)
        return Selection(_single_atom(book, idx), idx, jnp.zeros((0,), jnp.int32))

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


def coeff_width(rule: Any) -> int:
    """Length of a rule's per-step coefficient vector."""
    if isinstance(rule, MatchingPursuit):
        return rule.num_atoms - 1
    if isinstance(rule, Turbo):
        return rule.num_atoms
    return 0
