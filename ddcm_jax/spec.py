"""`CodeSpec`: every setting that decides a code, validated once, in one frozen value.

    spec = CodeSpec.create(steps=20, codebook_size=256, rule="turbo", num_atoms=4)
    res = encode(model, spec, image, key=0)          # ddcm_jax.sampler
    x = decode(model, spec, res.indices, res.coeffs, key=0, image_shape=image.shape)

The command line builds one, the codec turns it into a file header and back
(`ddcm_jax.codec.header_for` / `spec_of`), and the sampler, the sharding layer
and the bit counting take it. A spec is a pytree whose only leaves are the
rule's arrays (a soft rule's temperature, an inpainting mask); everything else
is static, so a jitted function taking a spec recompiles exactly when the
code changes. It is hashable whenever its rule is (every rule a file can
store is).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from ddcm_jax import bitstream
from ddcm_jax.codebook import GENERATORS
from ddcm_jax.pytree import pytree_dataclass, static_field
from ddcm_jax.selection import DDCM, make_rule, replay_rule

__all__ = ["MAX_CODEBOOK_SIZE", "CodeSpec", "SpecError"]

MAX_CODEBOOK_SIZE = 2**24  # indices are int32 and the file's K field is bounded


class SpecError(ValueError):
    """A setting no code can have; `field` names the setting (for the command line's flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@pytree_dataclass
class CodeSpec:
    """The code of an image: steps T, codebook size K, rule (with its M, C), generator, eta, schedule, t_range.

    `respacing`: guided-diffusion's timestep respacing ("" = `str(steps)`: T
    evenly spaced timesteps; "ddim20", "10,5,5"); the noise schedule itself is
    the model's. A latent (Stable Diffusion) code names its timesteps instead
    (`schedule` "ddcm" or "turbo", `ddcm_jax.respacing.latent_timesteps`) and
    may leave its last `no_bits_steps` steps before the final one without
    noise (Turbo-DDCM's NBS); its code has `code_rows` = steps - 1 - NBS rows. `t_range=(t_min, t_max)` (original timesteps, inclusive)
    restricts selection; other steps carry no bits (`rule.idle_code()`).
    """

    steps: int = static_field()
    codebook_size: int = static_field()
    rule: Any = dataclasses.field(default_factory=DDCM)  # the one leaf: a rule's arrays are traced
    generator: str = static_field("philox")
    eta: float = static_field(1.0)
    respacing: str = static_field("")
    t_range: tuple[int, int] | None = static_field(None)
    clip: bool = static_field(True)
    schedule: str | None = static_field(None)  # a latent model's named timesteps ("ddcm", "turbo")
    no_bits_steps: int = static_field(0)  # latent: the last NBS steps before the final one add no noise

    def __post_init__(self) -> None:
        if not hasattr(self.rule, "select") and not isinstance(self.rule, jax.core.Tracer):
            raise SpecError("rule", f"rule must be a rule object (see CodeSpec.create for names), got {self.rule!r}")
        _check("steps", isinstance(self.steps, int) and self.steps >= 2, f"steps must be an integer >= 2, got {self.steps!r}")
        k = self.codebook_size
        _check("codebook_size", isinstance(k, int) and 1 <= k <= MAX_CODEBOOK_SIZE,
               f"codebook size K must be an integer in 1..2^24, got {k!r}")  # fmt: skip
        _check("generator", self.generator in GENERATORS,
               f"unknown codebook generator {self.generator!r} ({', '.join(GENERATORS)})")  # fmt: skip
        _check("eta", isinstance(self.eta, int | float) and math.isfinite(self.eta) and 0 <= self.eta <= 1,
               f"eta must be a number in 0..1, got {self.eta!r}")  # fmt: skip
        m = getattr(self.rule, "num_atoms", 1)
        limit = bitstream.LIMITS["num_atoms"]
        _check("num_atoms", 1 <= m <= limit, f"number of atoms M must be in 1..{limit}, got {m}")
        bad = self.rule.check_settings(k) if isinstance(k, int) and k >= 1 else None
        if bad is not None:
            raise SpecError(bad[0], f"{bad[1]}, got M={m}, K={k}, C={getattr(self.rule, 'coef_bits', 0)}")
        if self.schedule is not None:
            from ddcm_jax.respacing import LATENT_SCHEDULES, TURBO_TIMESTEPS

            _check("schedule", self.schedule in LATENT_SCHEDULES,
                   f"unknown latent schedule {self.schedule!r} ({', '.join(LATENT_SCHEDULES)})")  # fmt: skip
            n = len(TURBO_TIMESTEPS)
            _check("steps", self.schedule != "turbo" or self.steps <= n, f"the turbo schedule has 2..{n} steps")
        nbs = self.no_bits_steps
        _check("no_bits_steps", isinstance(nbs, int) and 0 <= nbs <= self.steps - 2,
               f"no_bits_steps must be an integer in 0..steps-2 = {self.steps - 2}, got {nbs!r}")  # fmt: skip
        _check("no_bits_steps", nbs == 0 or self.schedule is not None, "no-bits steps belong to latent schedules")
        if self.t_range is not None:
            lo, hi = (int(v) for v in self.t_range)
            _check("t_range", lo <= hi, f"t_range must be (t_min, t_max) with t_min <= t_max, got {self.t_range}")
            object.__setattr__(self, "t_range", (lo, hi))

    @classmethod
    def create(cls, *, steps: int, codebook_size: int, rule: Any = "ddcm", num_atoms: int = 1,
               coef_bits: int = 1, operator: Any = None, generator: str = "philox", eta: float = 1.0,
               respacing: str = "", t_range: tuple[int, int] | None = None, clip: bool = True,
               schedule: str | None = None, no_bits_steps: int = 0) -> CodeSpec:  # fmt: skip
        """A spec from a rule name (or object) and M, C (and the operator of "mse")."""
        return cls(steps, codebook_size, make_rule(rule, num_atoms, coef_bits, operator), generator, eta,
                   respacing, t_range, clip, schedule, no_bits_steps)  # fmt: skip

    def replace(self, **changes: Any) -> CodeSpec:
        return dataclasses.replace(self, **changes)

    @property
    def num_atoms(self) -> int:
        return self.rule.num_atoms

    @property
    def coeff_width(self) -> int:
        return self.rule.coeff_width

    @property
    def code_rows(self) -> int:
        """Steps that add codebook noise: steps - 1 - no_bits_steps (the last step adds none)."""
        return self.steps - 1 - self.no_bits_steps

    @property
    def code_shape(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of one image's (indices, coeffs): (code_rows, M), (code_rows, coeff_width)."""
        return (self.code_rows, self.num_atoms), (self.code_rows, self.coeff_width)

    def for_decoding(self) -> CodeSpec:
        """The same code with the rule the decoder replays (see `Code.replay`)."""
        return self.replace(rule=replay_rule(self.rule))

    def payload_bits(self) -> int:
        """Payload bits of one image when every noise-adding step is coded (exact)."""
        return self.code_rows * self.rule.bits_per_step(self.codebook_size)


def _check(field: str, ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(field, message)
