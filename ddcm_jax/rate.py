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

from ddcm_jax.selection import MAX_DDCM_BITS, RateError
from ddcm_jax.spec import CodeSpec

__all__ = ["MAX_DDCM_BITS", "RateError", "for_bpp", "ladder", "search"]

def for_bpp(spec: CodeSpec, bpp: float, pixels: int, *, latent: bool = False,
            max_steps: int | None = None) -> CodeSpec:  # fmt: skip
    """`spec` with the operating point whose payload is the largest not above `bpp` x `pixels` bits.

    turbo: M (and, `latent`, the no-bits steps); ddcm: K and T (T at most
    `max_steps`, the model's timesteps). Raises RateError when nothing fits.
    """
    if not (math.isfinite(bpp) and bpp > 0):
        raise RateError(f"the target rate must be a positive number of bits per pixel, got {bpp}")
    budget = math.floor(bpp * pixels + 1e-9)  # bits; the epsilon forgives decimal rounding (0.1 x 10)
    return spec.rule.for_budget(spec, budget, bpp, pixels, latent, max_steps or spec.steps)


def ladder(spec: CodeSpec) -> list[CodeSpec]:
    """The operating points a quality target searches, in increasing rate: turbo M = 1, 2, 4, ...
    up to min(K / 2, 1024) (at the spec's T, K); ddcm K = 2, 4, ..., 2^16 (at its T)."""
    return spec.rule.ladder(spec)


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
