"""Selection rules: which codebook atom(s) become a step's noise.

A rule is a frozen dataclass registered as a pytree (settings such as M and C
are static fields, arrays such as a soft rule's temperature are leaves, so
`jax.grad` reaches them) with two pure methods:

  select(ctx, book) -> Selection(noise, indices, coeffs)   the encoder's choice
  noise(book, indices, coeffs) -> noise                      the decoder's replay

`ctx` is a `StepContext` (x_t, x0_hat, sigma_t, alpha_bar_prev, target,
measurement, weights, key); `book` is the step's codebook (`AtomSource`, from
`ddcm_jax.codebook`), which generates atoms by index and streams scores over
them (`best`, `top_abs`, `scores`, `map`, `best_of`) without ever holding
K x D. Every rule computes the noise it returns with its own `noise` method,
so encoder and decoder run the same arithmetic on the same indices.

Adding a rule: write a class decorated with `ddcm_jax.pytree.pytree_dataclass`
(not `jax.tree_util.register_dataclass`, whose tree structures of two rules
with the same fields compare equal, so `jit` can run one's program for the
other; see `ddcm_jax.pytree`) with `select`, `noise`, a
`num_atoms` / `coeff_width` and, if files may store it, a `code_name` that
`ddcm_jax.bitstream.RULES` knows (see `DDCM`); pass it in a `CodeSpec` (or as
`rule=` to `compress`). Rule names become rule objects only in `make_rule`.
The bit cost of a step and the code of a step that carries no bits are the
format's (`bitstream.bits_per_step` / `bitstream.idle_step`); the `Code`
methods read them so that sampler and bitstream cannot disagree.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import bitstream
from ddcm_jax.codebook import AtomSource, dot
from ddcm_jax.codes import FORMATS
from ddcm_jax.jit import jit
from ddcm_jax.pytree import pytree_dataclass, static_field
from ddcm_jax.respacing import no_bits_steps_for_bpp, no_bits_steps_heuristic
from ddcm_jax.shapes import Atoms, Key, StepIndices

__all__ = [
    "DDCM",
    "MSE",
    "AtomSource",
    "Code",
    "GuidedSubset",
    "MatchingPursuit",
    "Random",
    "Selection",
    "Soft",
    "StepContext",
    "Turbo",
    "TurboMSE",
    "make_rule",
    "replay_rule",
    "select_atoms",
]

RULE_NAMES = ("ddcm", "mp", "matching_pursuit", "turbo", "random", "mse", "mse_inner")

def _rule(cls: type) -> type:
    """Frozen dataclass + pytree registration (static fields marked with `static_field`); see `ddcm_jax.pytree`."""
    return pytree_dataclass(cls)


class Code:
    """What every rule knows about the code it writes (mixed into each rule class).

    `code_name` is the rule's name in the file format (None: a rule files cannot
    store, e.g. `Soft`); `coef_bits` is C of matching pursuit, 0 for the others.
    `replays_exactly`: the noise `select` returns is `replay().noise` of its
    code (the sampler then adds the decoder's own arithmetic; `Soft` returns a
    soft mixture instead). `aims_at_guidance`: the rule's target is the
    guidance direction eps_uncond - eps_cond (compressed CFG), which the
    family's network computes when asked.
    """

    code_name: str | None = None
    num_atoms: int = 1
    coeff_width: int = 0
    coef_bits: int = 0
    replays_exactly = True
    aims_at_guidance = False

    own_schedule = "ddcm"  # a latent code's named timesteps by default
    # The setting rate and quality targets turn (`for_budget`, `ladder`), as the command line names
    # it: "atoms" (Turbo: M, with its operating-point levels), "codebook_size" (DDCM: K), or None.
    rate_knob: str | None = None

    @property
    def coeff_levels(self) -> int:
        """Each coefficient of the code lies in 0 .. coeff_levels - 1 (the format's)."""
        return FORMATS[self.code_name or "ddcm"].coeff_levels(self.coef_bits)

    @property
    def codes_first_steps(self) -> bool:
        """A latent code of this rule codes its first steps (no t_range; no-bits steps instead)."""
        return FORMATS[self.code_name or "ddcm"].codes_first_steps

    def check_settings(self, codebook_size: int) -> tuple[str, str] | None:
        """(field, why) when a code cannot hold these settings (the format's limits), or None."""
        if self.code_name is None:
            return None
        why = FORMATS[self.code_name].check(codebook_size, self.num_atoms, self.coef_bits)
        return None if why is None else ("coef_bits" if "coef" in why else "num_atoms", why)

    def default_no_bits_steps(self, steps: int, codebook_size: int, height: int, width: int) -> int:
        """A latent code's no-bits steps when none are given (Turbo-DDCM's heuristic for turbo; else 0)."""
        return 0

    def restoring(self, operator: Any) -> Code:
        """The rule that restores y = operator(x) with this rule's kind of code (DDCM's single-atom MSE)."""
        return MSE(operator)

    def for_budget(self, spec: Any, budget: int, bpp: float, pixels: int, latent: bool, max_steps: int) -> Any:
        """`spec` at the operating point whose payload is the largest within `budget` bits (the knobs
        this rule turns); see `ddcm_jax.rate.for_bpp`."""
        raise RateError(f"a target rate sets turbo's M or ddcm's K and T, not {type(self).__name__}'s settings")

    def ladder(self, spec: Any) -> list[Any]:
        """The operating points a quality target searches, in increasing rate."""
        raise RateError(f"a quality target searches turbo's M or ddcm's K, not {type(self).__name__}'s settings")

    def knob_label(self, spec: Any) -> str:
        """The setting its quality target turns, at `spec` ("K 256"; turbo's: "M 4")."""
        return f"K {spec.codebook_size}"

    def bits_per_step(self, codebook_size: int) -> int:
        """Payload bits of one coded step (exact)."""
        if self.code_name is None:
            raise ValueError(f"{type(self).__name__} has no file format")
        return bitstream.bits_per_step(self.code_name, codebook_size, self.num_atoms, self.coef_bits)

    def idle_code(self) -> tuple[jax.Array, jax.Array]:
        """(indices (M,), coeffs (coeff_width,)) of a step outside `t_range`: one that carries no bits."""
        idx, co = bitstream.idle_step(self.code_name or "ddcm", self.num_atoms, self.coeff_width)
        return jnp.asarray(idx, jnp.int32), jnp.asarray(co, jnp.int32)

    def replay(self) -> Code:
        """The rule a decoder runs: single-atom rules all replay z = atom[index]."""
        return self


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


def _unit_std(v: jax.Array) -> jax.Array:
    """v / std(v) with the unbiased (ddof = 1) estimator, as the reference."""
    return v / jnp.std(v, ddof=1)


def _single_atom(book: AtomSource, indices: jax.Array) -> jax.Array:
    return book.get(indices[:1])[0]


def _chosen(book: AtomSource, idx: jax.Array) -> Selection:
    """A single-atom selection: the atom itself is the noise."""
    idx = jnp.asarray(idx, jnp.int32).reshape(1)
    return Selection(_single_atom(book, idx), idx, jnp.zeros((0,), jnp.int32))


def _best_single(scores: jax.Array, book: AtomSource) -> Selection:
    """argmax (first index on ties, as the reference) and its atom as the noise."""
    return _chosen(book, jnp.argmax(scores))


def _residual(ctx: StepContext) -> jax.Array:
    r = ctx.target - ctx.x0_hat
    return r if ctx.weights is None else r * ctx.weights


@_rule
class DDCM(Code):
    """Compression: z* = argmax_k <z_k, w * (target - x0_hat)> (DDCM paper, Sec. 4)."""

    code_name = "ddcm"
    rate_knob = "codebook_size"

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        idx, _ = book.best(_residual(ctx))  # a running argmax over the streamed codebook
        return _chosen(book, idx)

    def for_budget(self, spec: Any, budget: int, bpp: float, pixels: int, latent: bool, max_steps: int) -> Any:
        return ddcm_point(spec, budget, max_steps)

    def ladder(self, spec: Any) -> list[Any]:
        return [spec.replace(codebook_size=2**b) for b in range(1, MAX_DDCM_BITS + 1)]

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@_rule
class MatchingPursuit(Code):
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

    num_atoms: int = static_field()
    coef_bits: int = static_field()
    code_name = "mp"

    @property
    def coeff_width(self) -> int:
        return self.num_atoms - 1

    def replay(self) -> Code:
        return DDCM() if self.num_atoms == 1 else self

    def check_settings(self, codebook_size: int) -> tuple[str, str] | None:
        return None if self.num_atoms == 1 else super().check_settings(codebook_size)  # M = 1 replays as DDCM

    @property
    def _cs(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, 2**self.coef_bits)

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        first = book.scores(r)
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

            scores = book.map(cand_scores, width=(cs.shape[0],))  # (K, n_c)
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
        z = jax.lax.optimization_barrier(book.get(indices))
        # The original decoder stops at the first coefficient 0: later rounds are ignored.
        active = jnp.cumprod((coeffs > 0).astype(jnp.int32)) > 0
        current = z[0]
        for m in range(1, self.num_atoms):
            c = cs[coeffs[m - 1]]
            mixed = _unit_std(jnp.sqrt(c) * current + jnp.sqrt(1 - c) * z[m])
            current = jnp.where(active[m - 1], mixed, current)
        return current


@_rule
class Turbo(Code):
    """Turbo-DDCM: the M atoms with the largest |<z_k, r>|, signed, summed, unit std."""

    num_atoms: int = static_field()
    code_name = "turbo"

    @property
    def coeff_width(self) -> int:
        return self.num_atoms

    own_schedule = "turbo"
    rate_knob = "atoms"

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        return _turbo_select(book, _residual(ctx), self.num_atoms)

    def knob_label(self, spec: Any) -> str:
        return f"M {self.num_atoms}"

    def default_no_bits_steps(self, steps: int, codebook_size: int, height: int, width: int) -> int:
        return no_bits_steps_heuristic(steps, codebook_size, self.num_atoms, height, width)

    def restoring(self, operator: Any) -> Code:
        return TurboMSE(operator, self.num_atoms)

    def for_budget(self, spec: Any, budget: int, bpp: float, pixels: int, latent: bool, max_steps: int) -> Any:
        return turbo_point(spec, budget, bpp, pixels, latent)

    def ladder(self, spec: Any) -> list[Any]:
        top = min(max(1, spec.codebook_size // 2), MAX_TURBO_ATOMS)
        return [spec.replace(rule=Turbo(m)) for m in sorted({min(2**i, top) for i in range(top.bit_length() + 1)})]

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        s = 1.0 - 2.0 * coeffs.astype(jnp.float32)
        return _unit_std(jnp.einsum("m,m...->...", s, book.get(indices)))


def _turbo_select(book: AtomSource, r: jax.Array, num_atoms: int) -> Selection:
    top, scores = book.top_abs(r, num_atoms)  # a running top-M of |<z_k, r>|
    order = jnp.argsort(top)  # the bitstream codes the set, in index order
    idx = top[order].astype(jnp.int32)
    signs = (scores[order] < 0).astype(jnp.int32)  # sign bit: 1 = negative
    return Selection(Turbo(num_atoms).noise(book, idx, signs), idx, signs)


@_rule
class TurboMSE(Code):
    """Turbo-DDCM's code for restoration, y = A(x): the M atoms with the largest
    |<A(z_k), y - A(x0_hat)>| = |<z_k, A^T(y - A(x0_hat))>|, signed, summed, unit std.

    The measurement residual is pulled back through the operator's adjoint (its
    VJP; the operators are linear), so the atoms are scored as Turbo scores
    them, streaming. Files store it as `turbo` (the decoder replays `Turbo(M)`).
    """

    operator: Any  # a linear pytree callable from `ddcm_jax.operators`
    num_atoms: int = static_field()
    code_name = "turbo"

    @property
    def coeff_width(self) -> int:
        return self.num_atoms

    def replay(self) -> Code:
        return Turbo(self.num_atoms)

    def knob_label(self, spec: Any) -> str:
        return f"M {self.num_atoms}"

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        y_res, adjoint = jax.vjp(self.operator, ctx.x0_hat)
        (r,) = adjoint(ctx.measurement - y_res)
        return _turbo_select(book, r, self.num_atoms)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return Turbo(self.num_atoms).noise(book, indices, coeffs)


@_rule
class MSE(Code):
    """Compressed posterior sampling for y = A(x).

    Default: maximise -mean((sigma_t / sqrt(alpha_bar_prev) * A(z) + A(x0_hat) - y)^2);
    `inner_product=True`: maximise <A(z), y - A(x0_hat)>.
    """

    operator: Any  # a pytree callable from `ddcm_jax.operators`: (H, W, C) -> observation
    inner_product: bool = static_field(False)

    @property
    def code_name(self) -> str:
        return "mse_inner" if self.inner_product else "mse"

    def replay(self) -> Code:
        return DDCM()

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        a = jax.vmap(self.operator)
        y_res = ctx.measurement - self.operator(ctx.x0_hat)
        if self.inner_product:
            score = lambda z: dot(a(z), y_res)  # noqa: E731
        else:
            coef = ctx.sigma / jnp.sqrt(ctx.alpha_bar_prev)
            score = lambda z: -jnp.mean(  # noqa: E731
                jnp.square(coef * a(z) - y_res[None]), axis=tuple(range(1, z.ndim))
            )
        idx, _ = book.best_of(score)
        return _chosen(book, idx)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@_rule
class Random(Code):
    """Compressed generation: a uniform index from the rule's own per-step key."""

    code_name = "random"

    def replay(self) -> Code:
        return DDCM()

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        idx = jax.random.randint(ctx.key, (1,), 0, book.size, jnp.int32)
        return Selection(_single_atom(book, idx), idx, jnp.zeros((0,), jnp.int32))

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@_rule
class GuidedSubset(Code):
    """Compressed classifier-free guidance (DDCM's `generate_ccfg`): among `subset` atoms drawn
    uniformly (with replacement) from the rule's own per-step key, the one with the largest
    <z_k, target>, the target being eps_uncond - eps_cond (see `ddcm_jax.latent.generate`).

    The original draws its subset from the wall clock; from the key, the choice is
    reproducible. Files store the index as a `ddcm` code: decoding needs no prompt.
    """

    subset: int = static_field()
    code_name = "ddcm"

    aims_at_guidance = True

    def replay(self) -> Code:
        return DDCM()

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        ks = jax.random.randint(ctx.key, (self.subset,), 0, book.size, jnp.int32)
        j = jnp.argmax(dot(book.get(ks), ctx.target))  # the first of equal scores, as torch.argmax
        return _chosen(book, ks[j])

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


@_rule
class Soft(Code):
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
    straight_through: bool = static_field(False)
    replays_exactly = False  # its noise is the soft mixture (or its straight-through gradient)

    def replay(self) -> Code:
        return DDCM()

    def select(self, ctx: StepContext, book: AtomSource) -> Selection:
        r = _residual(ctx)
        scores = book.map(jax.checkpoint(lambda z: dot(z, r)))
        p = jax.nn.softmax(scores / self.temperature)
        soft = _weighted_sum(book, p) / jnp.sqrt(jnp.sum(jnp.square(p)))
        hard = _best_single(scores, book)
        # (soft - stop_gradient(soft)) is exactly 0 forward, so the value is the hard atom bit for bit.
        noise = hard.noise + (soft - jax.lax.stop_gradient(soft)) if self.straight_through else soft
        return Selection(noise, hard.indices, hard.coeffs)

    def noise(self, book: AtomSource, indices: jax.Array, coeffs: jax.Array) -> jax.Array:
        return _single_atom(book, indices)


def _weighted_sum(book: AtomSource, p: jax.Array) -> jax.Array:
    """sum_k p_k z_k over the codebook, chunk by chunk (atoms regenerated in the backward pass)."""
    from ddcm_jax.codebook import chunk_for

    chunk = max(1, min(book.chunk or chunk_for(book.shape, book.size), book.size))
    n_chunks = -(-book.size // chunk)
    pad = jnp.concatenate([p, jnp.zeros((n_chunks * chunk - book.size,), p.dtype)])

    @jax.checkpoint
    def add(acc, start):
        ks = start + jnp.arange(chunk)
        z = book.get(jnp.minimum(ks, book.size - 1))
        return acc + jnp.einsum("n,n...->...", jax.lax.dynamic_slice(pad, (start,), (chunk,)), z), None

    total, _ = jax.lax.scan(add, jnp.zeros(book.shape, jnp.float32), jnp.arange(n_chunks) * chunk)
    return total


def select_atoms(key: Key, residual: Atoms, codebook_size: int, *, step: int = 0,
                 num_atoms: int = 1, coef_bits: int = 1, rule: Any = "ddcm",
                 generator: str = "philox", kernel: str = "xla") -> tuple[StepIndices, Atoms]:  # fmt: skip
    """One step's selection over a key-derived codebook, for research on rules.

    Scores the atoms of step `step` of the codebook with root `key` against
    `residual` (a step's `target - x0_hat`) and returns (indices (M,), noise).
    The codebooks of a `compress(..., key=k)` call have the root
    `fold_in(k, 1)` and steps numbered by the respaced index.

    `kernel` "pallas" scores a philox codebook in one fused kernel
    (`ddcm_jax.fused`) instead of XLA's chunked stream.

    Compiled once per (residual shape, K, rule settings, generator, kernel): an
    eager call with a new key, step or residual reuses the program.
    """
    rule = make_rule(rule, num_atoms, coef_bits)
    return _select_atoms(key, jnp.asarray(residual, jnp.float32), jnp.asarray(step, jnp.int32), rule,
                         codebook_size=int(codebook_size), generator=generator, kernel=kernel)  # fmt: skip


@functools.partial(jit, static_argnames=("codebook_size", "generator", "kernel"))
def _select_atoms(key: jax.Array, residual: jax.Array, step: jax.Array, rule: Any, *, codebook_size: int,
                  generator: str, kernel: str) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    zero = jnp.zeros_like(residual)
    ctx = StepContext(zero, zero, jnp.float32(0), jnp.float32(1), target=residual)
    book = AtomSource(codebook_size, tuple(residual.shape), generator, kernel=kernel, root=key, step=step)
    sel = rule.select(ctx, book)
    return sel.indices, sel.noise


# --- the knobs rate targets turn (`ddcm_jax.rate`) ------------------------------------------------------

MAX_DDCM_BITS = 16  # K up to 65536 atoms a step for the single-atom rule: beyond it, add steps
MAX_TURBO_ATOMS = bitstream.LIMITS["num_atoms"]


class RateError(ValueError):
    """No operating point of this kind fits the budget (the message says the smallest there is)."""


def _turbo_bits(k: int, m: int) -> int:
    return bitstream.bits_per_step("turbo", k, m)


def _largest_m(budget_per_row: float, k: int) -> int:
    """The largest M (1..min(K, 1024)) whose turbo step costs at most `budget_per_row` bits, or 0."""
    lo, hi = 0, min(max(1, k // 2), MAX_TURBO_ATOMS)
    while lo < hi:  # bits per step grow with M up to K / 2 (beyond it, the complement set is cheaper)
        mid = (lo + hi + 1) // 2
        if _turbo_bits(k, mid) <= budget_per_row:
            lo = mid
        else:
            hi = mid - 1
    return lo


def turbo_point(spec: Any, budget: int, bpp: float, pixels: int, latent: bool) -> Any:
    k, steps = spec.codebook_size, spec.steps
    first = no_bits_steps_for_bpp(bpp, steps, pixels) if latent else 0
    for nbs in range(first, (steps - 2 if latent else 0) + 1):
        rows = steps - 1 - nbs
        m = _largest_m(budget / rows, k)
        if m:
            try:
                return spec.replace(rule=Turbo(m), no_bits_steps=nbs) if latent else spec.replace(rule=Turbo(m))
            except ValueError as e:  # pragma: no cover - M <= K and NBS <= T - 2 by construction (SpecError)
                raise RateError(str(e)) from None
    rows = 1 if latent else steps - 1
    least = rows * _turbo_bits(k, 1)
    raise RateError(f"{budget} bits is below the smallest turbo code at T={steps}, K={k}: {least} bits "
                    f"({least / pixels:.5f} bpp){'' if latent else '; lower -T'}")  # fmt: skip


def ddcm_point(spec: Any, budget: int, max_steps: int) -> Any:
    steps = spec.steps
    b = budget // (steps - 1)
    if b > MAX_DDCM_BITS:  # K = 2^16 leaves bits unused: more steps
        steps = min(max_steps, budget // MAX_DDCM_BITS + 1)
        b = min(MAX_DDCM_BITS, budget // (steps - 1))
    if b < 1:  # one bit a step is too much: fewer steps, K = 2
        steps, b = budget + 1, 1
        if steps < 2:
            raise RateError(f"{budget} bits is below the smallest ddcm code (1 bit: T=2, K=2)")
    return spec.replace(steps=steps, codebook_size=2**b, rule=DDCM())


def make_rule(rule: Any, num_atoms: int = 1, coef_bits: int = 1, operator: Any = None) -> Any:
    """A rule name (with M, C and, for restoration, the operator) -> a rule object; objects pass through.

    "ddcm" is matching pursuit when M > 1; "mp" / "matching_pursuit", "turbo",
    "random", "mse", "mse_inner" (an operator or its name). The one place
    names become rules.
    """
    if not isinstance(rule, str):
        return rule
    if rule == "ddcm":
        return DDCM() if num_atoms == 1 else MatchingPursuit(num_atoms, coef_bits)
    if rule in ("mp", "matching_pursuit"):
        return MatchingPursuit(num_atoms, coef_bits)
    if rule == "turbo":
        return Turbo(num_atoms)
    if rule == "random":
        return Random()
    if rule in ("mse", "mse_inner"):
        if operator is None:
            raise ValueError(f"rule {rule!r} needs an operator")
        if isinstance(operator, str):
            from ddcm_jax.operators import operator_by_name

            operator = operator_by_name(operator)
        return MSE(operator, inner_product=rule == "mse_inner")
    raise ValueError(f"unknown rule {rule!r} ({', '.join(RULE_NAMES)})")


def replay_rule(rule: Any, num_atoms: int = 1, coef_bits: int = 1) -> Any:
    """The rule a decoder runs for a rule (object or name, e.g. a header's): see `Code.replay`."""
    if isinstance(rule, str) and rule in ("mse", "mse_inner", "random", "soft"):
        return DDCM()
    return make_rule(rule, num_atoms, coef_bits).replay()
