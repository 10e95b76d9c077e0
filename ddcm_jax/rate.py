"""Rate targets: the operating point whose exact payload is the largest not above a bit budget.

The payload of a code is `spec.payload_bits()` = code_rows x the rule's bits per step
(`ddcm_jax.bitstream.bits_per_step`), so a target rate picks the settings directly:

* turbo: M atoms per step (and, for a latent model, the no-bits steps NBS, as
  Turbo-DDCM's heuristic places them: the lower the rate, the more steps go
  without bits), at the given T and K;
* ddcm (one atom per step): K = 2^b with b = floor(bits / (T - 1)) up to 2^16,
  then more steps (up to the model's) when even that leaves bits unused;
  fewer steps when one bit a step is too much.

`bpp` counts payload bits over the pixels of the input image (H0 x W0), the
image the user gets back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ddcm_jax import bitstream
from ddcm_jax.latent import no_bits_steps_for_bpp
from ddcm_jax.selection import DDCM, Turbo
from ddcm_jax.spec import CodeSpec, SpecError

__all__ = ["MAX_DDCM_BITS", "RateError", "for_bpp", "ladder", "search"]

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


def for_bpp(spec: CodeSpec, bpp: float, pixels: int, *, latent: bool = False,
            max_steps: int | None = None) -> CodeSpec:  # fmt: skip
    """`spec` with the operating point whose payload is the largest not above `bpp` x `pixels` bits.

    turbo: M (and, `latent`, the no-bits steps); ddcm: K and T (T at most
    `max_steps`, the model's timesteps). Raises RateError when nothing fits.
    """
    if not (math.isfinite(bpp) and bpp > 0):
        raise RateError(f"the target rate must be a positive number of bits per pixel, got {bpp}")
    budget = math.floor(bpp * pixels + 1e-9)  # bits; the epsilon forgives decimal rounding (0.1 x 10)
    if isinstance(spec.rule, Turbo):
        return _turbo(spec, budget, bpp, pixels, latent)
    if isinstance(spec.rule, DDCM):
        return _ddcm(spec, budget, max_steps or spec.steps)
    raise RateError(f"a target rate sets turbo's M or ddcm's K and T, not {type(spec.rule).__name__}'s settings")


def _turbo(spec: CodeSpec, budget: int, bpp: float, pixels: int, latent: bool) -> CodeSpec:
    k, steps = spec.codebook_size, spec.steps
    first = no_bits_steps_for_bpp(bpp, steps, pixels) if latent else 0
    for nbs in range(first, (steps - 2 if latent else 0) + 1):
        rows = steps - 1 - nbs
        m = _largest_m(budget / rows, k)
        if m:
            try:
                return spec.replace(rule=Turbo(m), no_bits_steps=nbs) if latent else spec.replace(rule=Turbo(m))
            except SpecError as e:  # pragma: no cover - M <= K and NBS <= T - 2 by construction
                raise RateError(str(e)) from None
    rows = 1 if latent else steps - 1
    least = rows * _turbo_bits(k, 1)
    raise RateError(f"{budget} bits is below the smallest turbo code at T={steps}, K={k}: {least} bits "
                    f"({least / pixels:.5f} bpp){'' if latent else '; lower -T'}")  # fmt: skip


def _ddcm(spec: CodeSpec, budget: int, max_steps: int) -> CodeSpec:
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


def ladder(spec: CodeSpec) -> list[CodeSpec]:
    """The operating points a quality target searches, in increasing rate: turbo M = 1, 2, 4, ...
    up to min(K / 2, 1024) (at the spec's T, K); ddcm K = 2, 4, ..., 2^16 (at its T)."""
    if isinstance(spec.rule, Turbo):
        top = min(max(1, spec.codebook_size // 2), MAX_TURBO_ATOMS)
        ms = sorted({min(2**i, top) for i in range(top.bit_length() + 1)})
        return [spec.replace(rule=Turbo(m)) for m in ms]
    if isinstance(spec.rule, DDCM):
        return [spec.replace(codebook_size=2**b) for b in range(1, MAX_DDCM_BITS + 1)]
    raise RateError(f"a quality target searches turbo's M or ddcm's K, not {type(spec.rule).__name__}'s settings")


def search(n: int, reaches: Callable[[int], bool], start: int | None = None) -> int:
    """The lowest index of 0..n-1 where `reaches` holds, for a predicate that holds from some index on
    (quality grows with the rate, nearly always); n - 1 when it holds nowhere.

    Bisection, so at most 2 + ceil(log2 n) calls (the caller caches them). From
    `start` (the point the user would get anyway) a target near it costs fewer:
    only the half on the side it falls is searched. Without it the top is tried first.
    """
    if n < 1:
        raise ValueError("search: no operating points")
    top = n - 1
    if start is not None and 0 <= start < top and reaches(start):
        lo, hi = 0, start
    else:
        lo = 0 if start is None or not 0 <= start < top else start + 1
        if not reaches(top):
            return top
        hi = top
    while lo < hi:  # invariant: reaches(hi); everything below lo fails
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
