"""Selection rules: which codebook atom(s) become a step's noise.

A rule is a frozen dataclass registered as a pytree (settings such as M and C
are static fields, arrays such as a soft rule's temperature are leaves, so
`jax.grad` reaches them) with two pure methods:

  select(ctx, book) -> Selection(noise, indices, coeffs)   the encoder's choice
  noise(book, indices, coeffs) -> noise                      the decoder's replay

`ctx` is a `StepContext` (x_t, x0_hat, sigma_t, alpha_bar_prev, target,
measurement, weights, key); `book` gives atoms by index (`AtomSource`), from a
key or from explicit arrays. Every rule computes the noise it returns with its
own `noise` method, so encoder and decoder run the same arithmetic on the same
indices. Scores are computed `chunk` atoms at a time (never K x D at once).

Adding a rule: write a registered dataclass with `select`, `noise` and a
`num_atoms` / `coeff_width` (see `DDCM`), and pass it as `rule=` to
`compress`; nothing else needs to know about it.
"""

from __future__ import annotations

import dataclasses
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
    "Soft",
    "StepContext",
    "Turbo",
    "select_atoms",
]

DEFAULT_CHUNK = 64


def _static(default: Any = dataclasses.MISSING) -> Any:
    return dataclasses.field(default=default, metadata=dict(static=True))


def _rule(cls: type) -> type:
    """Frozen dataclass + pytree registration (static fields marked with `_static`)."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AtomSource:
    """Atoms of one step's codebook: from a step key, or from an explicit (K, *shape) array.

    A pytree (size and shape static), so it can be passed into `jit`.
    """

    size: int = _static()
    shape: tuple[int, ...] = _static()
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


@_rule
class DDCM:
    """Compression: z* = argmax_k <z_k, w * (target - x0_hat)> (DDCM paper, Sec. 4)."""

    chunk: int = _static(DEFAULT_CHUNK)
    num_atoms = 1
    coeff_width = 0

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        return _best_single(chunked_scores(book.get, lambda z: _dot(z, r), book.size, self.chunk), book)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@_rule
class MatchingPursuit:
    """M atoms combined greedily with C-bit coefficients (DDCM paper, App. on MP).

    Starting from the best single atom, each of the M-1 rounds forms every
    candidate sqrt(c) * current + sqrt(1 - c) * z_k for c in
    linspace(0, 1, 2**C)[1:], rescales it to unit (ddof = 1) std, and keeps the
    best one only if it raises the score; a round that does not is recorded as
    atom 0 with coefficient index 0, and so are all later rounds (they see the
    same state), which is why the decoder stops at the first 0. Coefficient
    indices point into the full linspace(0, 1, 2**C) (kept rounds use
    1 .. 2**C - 1). Ties are broken like the reference: first atom, then first
    coefficient. Candidates that are the same vector in exact arithmetic (an
    atom mixed with itself, or c = 1 once `current` is normalised) tie exactly,
    so which of them wins is float rounding, in the reference as here; the
    resulting noise is the same either way.
    """

    num_atoms: int = _static()
    coef_bits: int = _static()
    chunk: int = _static(DEFAULT_CHUNK)

    @property
    def coeff_width(self) -> int:
        return self.num_atoms - 1

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
        # The original decoder stops at the first coefficient 0: later rounds are ignored.
        active = jnp.cumprod((coeffs > 0).astype(jnp.int32)) > 0
        current = z[0]
        for m in range(1, self.num_atoms):
            c = cs[coeffs[m - 1]]
            mixed = _unit_std(jnp.sqrt(c) * current + jnp.sqrt(1 - c) * z[m])
            current = jnp.where(active[m - 1], mixed, current)
        return current


@_rule
class Turbo:
    """Turbo-DDCM: the M atoms with the largest |<z_k, r>|, signed, summed, unit std."""

    num_atoms: int = _static()
    chunk: int = _static(DEFAULT_CHUNK)

    @property
    def coeff_width(self) -> int:
        return self.num_atoms

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


@_rule
class MSE:
    """Compressed posterior sampling for y = A(x).

    Default: maximise -mean((sigma_t / sqrt(alpha_bar_prev) * A(z) + A(x0_hat) - y)^2);
    `inner_product=True`: maximise <A(z), y - A(x0_hat)>.
    """

    operator: Any  # a pytree callable from `ddcm_jax.operators`: (H, W, C) -> observation
    inner_product: bool = _static(False)
    chunk: int = _static(DEFAULT_CHUNK)
    num_atoms = 1
    coeff_width = 0

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


@_rule
class Random:
    """Compressed generation: a uniform index from the rule's own per-step key."""

    num_atoms = 1
    coeff_width = 0

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        idx = jax.random.randint(ctx.key, (1,), 0, book.size, jnp.int32)
        return Selection(_single_atom(book, idx), idx, jnp.zeros((0,), jnp.int32))

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@_rule
class Soft:
    """Differentiable selection: softmax(scores / temperature) mixes the atoms.

    Scores are the `ddcm` inner products <z_k, w * (target - x0_hat)>. The
    mixture sum_k p_k z_k is divided by sqrt(sum_k p_k^2) so that it has unit
    variance whatever the temperature (as T -> 0 it becomes the argmax atom).
    With `straight_through`, the forward value is the hard argmax atom and the
    gradient is the soft mixture's. `indices` always report the argmax.
    Atoms are regenerated in both passes, chunk by chunk (under `jax.checkpoint`),
    so neither the forward nor the backward pass holds K x D.
    """

    temperature: jax.Array
    straight_through: bool = _static(False)
    chunk: int = _static(DEFAULT_CHUNK)
    num_atoms = 1
    coeff_width = 0

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        score = jax.checkpoint(lambda z: _dot(z, r))
        scores = chunked_scores(book.get, score, book.size, self.chunk)
        p = jax.nn.softmax(scores / self.temperature)
        soft = _weighted_sum(book, p, self.chunk) / jnp.sqrt(jnp.sum(jnp.square(p)))
        hard = _best_single(scores, book)
        # (soft - stop_gradient(soft)) is exactly 0 forward, so the value is the hard atom bit for bit.
        noise = hard.noise + (soft - jax.lax.stop_gradient(soft)) if self.straight_through else soft
        return Selection(noise, hard.indices, hard.coeffs)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


def _weighted_sum(book: AtomSource, p: jax.Array, chunk: int) -> jax.Array:
    """sum_k p_k z_k over the codebook, chunk by chunk."""
    chunk = max(1, min(chunk, book.size))
    n_chunks = -(-book.size // chunk)
    pad = jnp.concatenate([p, jnp.zeros((n_chunks * chunk - book.size,), p.dtype)])

    @jax.checkpoint
    def add(acc, start):
        ks = start + jnp.arange(chunk)
        z = book.get(jnp.minimum(ks, book.size - 1))
        return acc + jnp.einsum("n,n...->...", jax.lax.dynamic_slice(pad, (start,), (chunk,)), z), None

    total, _ = jax.lax.scan(add, jnp.zeros(book.shape, jnp.float32), jnp.arange(n_chunks) * chunk)
    return total


def select_atoms(key: jax.Array, residual: jax.Array, codebook_size: int, *, num_atoms: int = 1,
                 coef_bits: int = 1, rule: Any = "ddcm") -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """One step's selection over the codebook derived from `key` (a step key).

    Scores atoms against `residual` (the `target - x0_hat` of a step) and
    returns (indices (M,), noise). For research: the codebook of step i of a
    `compress` call with key `root` is `step_key(fold_in(root, 1), i)`.
    """
    if isinstance(rule, str):
        rule = {"ddcm": DDCM() if num_atoms == 1 else MatchingPursuit(num_atoms, coef_bits),
                "mp": MatchingPursuit(num_atoms, coef_bits), "turbo": Turbo(num_atoms)}[rule]  # fmt: skip
    residual = jnp.asarray(residual, jnp.float32)
    zero = jnp.zeros_like(residual)
    ctx = StepContext(zero, zero, jnp.float32(0), jnp.float32(1), target=residual)
    sel = rule.select(ctx, AtomSource(codebook_size, tuple(residual.shape), key=key))
    return sel.indices, sel.noise
