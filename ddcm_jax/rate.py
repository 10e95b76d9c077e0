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
from typing import Any, NamedTuple

from ddcm_jax.selection import MAX_DDCM_BITS, MAX_TURBO_ATOMS, RateError
from ddcm_jax.spec import CodeSpec

__all__ = ["MAX_DDCM_BITS", "MAX_TURBO_ATOMS", "QualityTarget", "RateError", "describe_point", "for_bpp", "for_image",
           "ladder", "quality_target", "rate_note", "search"]  # fmt: skip

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


def for_image(spec: CodeSpec, bpp: float, height: int, width: int, *, crop: bool = False, latent: bool = False,
              schedule: str | None = None, max_steps: int | None = None) -> CodeSpec:  # fmt: skip
    """`for_bpp` over the pixels the user gets back of an H0 x W0 input (`crop`: its centre square).

    A latent code's rate point sets its no-bits steps, which belong to a named schedule:
    `schedule`, or the rule's own.
    """
    if latent:
        spec = spec.replace(schedule=schedule or spec.rule.own_schedule)
    pixels = min(height, width) ** 2 if crop else height * width
    return for_bpp(spec, bpp, pixels, latent=latent, max_steps=max_steps)


def describe_point(spec: CodeSpec) -> str:
    """The operating point in the flags' words: "T 30, K 1024, M 128" (turbo), "T 83, K 1024" (ddcm), and a
    latent code's no-bits steps when it has any."""
    parts = [f"T {spec.steps}", f"K {spec.codebook_size}"]
    if spec.rule.knob_label(spec).startswith("M "):
        parts.append(spec.rule.knob_label(spec))
    if getattr(spec, "no_bits_steps", None):
        parts.append(f"{spec.no_bits_steps} no-bits steps")
    return ", ".join(parts)


def rate_note(spec: CodeSpec, bpp: float, height: int, width: int, point: CodeSpec, *, crop: bool = False,
              latent: bool = False, schedule: str | None = None, max_steps: int | None = None) -> str:
    """What `--bpp` chose for an H0 x W0 input, in one line: the point, its payload rate, and whether the target
    was reached (the grid's nearest point below it) or is out of reach (the rule's most at these T and K: a
    budget four times larger gives no more bits)."""
    pixels = min(height, width) ** 2 if crop else height * width
    got = point.payload_bits() / pixels
    line = f"--bpp {bpp:g}: {describe_point(point)} gives {got:.4f} bpp (payload over the input's pixels)"
    more = for_image(spec, 4 * bpp, height, width, crop=crop, latent=latent, schedule=schedule, max_steps=max_steps)
    if more.payload_bits() == point.payload_bits() and got < 0.9 * bpp:
        knobs = "K and T" if point.rule.knob_label(point).startswith("K ") else "M"
        return (f"{line}: the target is out of reach, this is the most {knobs} can carry here"
                f" (give more steps -T or a larger -K)")  # fmt: skip
    return f"{line}: the largest point not above the target"


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


class QualityTarget(NamedTuple):
    """What `quality_target` found: the point, its result and PSNR, and how many encodes it took."""

    point: CodeSpec
    result: Any  # what `encode_and_measure` returned for `point`
    reached_db: float
    encodes: int
    target_db: float

    @property
    def reached(self) -> bool:
        return self.reached_db >= self.target_db

    def note(self, nbytes: int) -> str:
        """One line for the user: reached or not, at which knob (`Code.knob_label`), `nbytes` the file's size."""
        verdict = "reached" if self.reached else "did not reach; the highest point gives"
        return (f"--psnr {self.target_db:g}: {verdict} {self.reached_db:.2f} dB at "
                f"{self.point.rule.knob_label(self.point)} ({nbytes} bytes) after {self.encodes} encodes")  # fmt: skip


def quality_target(spec: CodeSpec, target_db: float, encode_and_measure: Callable[[CodeSpec, int, int], tuple[Any, float]],
                   start: CodeSpec | None = None) -> QualityTarget:  # fmt: skip
    """The lowest point of `ladder(spec)` whose encode reaches `target_db` (PSNR, dB), or the highest
    one if none does: `search` from `start` (the point the user would get anyway, when on the ladder).

    `encode_and_measure(point, index, count)` encodes at one point (`index` of the `count` points) and
    returns (result, its PSNR in dB); each point is encoded at most once.
    """
    points = ladder(spec)
    tried: dict[int, tuple[Any, float]] = {}

    def trial(i: int) -> tuple[Any, float]:
        if i not in tried:
            tried[i] = encode_and_measure(points[i], i, len(points))
        return tried[i]

    first = points.index(start) if start is not None and start in points else None
    hi = search(len(points), lambda i: trial(i)[1] >= target_db, first)
    result, reached = trial(hi)
    return QualityTarget(points[hi], result, reached, len(tried), target_db)
