"""The pixel-space family (guided-diffusion's ADM): DDIM on images, as the original DDCM computes it.

Per step (DDIM, Song et al. 2021, eq. 12, with guided-diffusion's clipping):
  (1) x0_hat = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps_hat, clipped to [-1, 1]
  (2) eps_hat <- (sqrt(1/alpha_bar) x_t - x0_hat) / sqrt(1/alpha_bar - 1)
  (3) x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z
The last step (sigma = 0) adds no noise and returns x0_hat. Schedule values are
float64 on the host, float32 in the scan. Codebook step numbers count down
(i = steps-1 .. 0: the respaced index), as the format has always addressed them.

`PixelFamily` is the family a pixel network plugs into the one sampler with:
it needs `.params`, `.apply(params, x (B,H,W,C), t (B,), y) -> (B,H,W,C or 2C)`
and `.config.diffusion` / `.config.architecture` (see `DiffusionModel`).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.family import Family, ddim
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import replay_rule
from ddcm_jax.spec import CodeSpec

__all__ = ["PixelFamily", "SchedT", "predict_x0", "schedule_xs", "step"]


class SchedT(NamedTuple):
    """One step's schedule values (scalars): the scan's xs."""

    row: jax.Array  # place in run order, 0 .. steps-1
    i: jax.Array  # respaced step index (int32), steps-1 .. 0: addresses the step's codebook
    t: jax.Array  # original timestep fed to the network (int32)
    sqrt_recip_ab: jax.Array  # sqrt(1 / alpha_bar)
    sqrt_recipm1_ab: jax.Array  # sqrt(1 / alpha_bar - 1)
    sqrt_ab_prev: jax.Array  # sqrt(alpha_bar_prev)
    dir_coef: jax.Array  # sqrt(1 - alpha_bar_prev - sigma^2)
    sigma: jax.Array
    alpha_bar_prev: jax.Array
    noisy: jax.Array  # bool: every step but the last adds codebook noise
    coded: jax.Array  # bool: noisy and inside t_range (outside: the rule's idle code)


def schedule_xs(schedule: Schedule, eta: float = 1.0, t_range: tuple[int, int] | None = None) -> SchedT:
    """Per-step values in the order the sampler runs them (i = steps-1 .. 0).

    NumPy schedules (from `Schedule.create`) are evaluated in float64 on the
    host and rounded once to float32; a schedule holding JAX arrays (e.g. one
    being differentiated) is evaluated with jnp in its own precision.
    """
    xp = np if isinstance(schedule.alpha_bar, np.ndarray) else jnp
    ab = xp.asarray(schedule.alpha_bar)[::-1]
    abp = xp.asarray(schedule.alpha_bar_prev)[::-1]

    def sqrt0(v):  # sqrt clamped at 0, with a zero (not NaN) derivative there
        pos = v > 0
        return xp.where(pos, xp.sqrt(xp.where(pos, v, 1.0)), 0.0)

    sigma = eta * sqrt0((1 - abp) / (1 - ab)) * sqrt0(1 - ab / abp)
    f32 = functools.partial(xp.asarray, dtype=np.float32)
    steps = schedule.steps
    t = np.asarray(schedule.timesteps, np.int32)[::-1].copy()
    noisy = np.arange(steps) < steps - 1
    lo, hi = (-1, np.iinfo(np.int32).max) if t_range is None else t_range
    return SchedT(
        row=np.arange(steps, dtype=np.int32),
        i=np.arange(steps, dtype=np.int32)[::-1].copy(),
        t=t,
        sqrt_recip_ab=f32(xp.sqrt(1.0 / ab)),
        sqrt_recipm1_ab=f32(xp.sqrt(1.0 / ab - 1.0)),
        sqrt_ab_prev=f32(xp.sqrt(abp)),
        dir_coef=f32(sqrt0(1.0 - abp - sigma**2)),
        sigma=f32(sigma),
        alpha_bar_prev=f32(abp),
        noisy=noisy,
        coded=noisy & (t >= lo) & (t <= hi),
    )


def predict_x0(x_t: jax.Array, eps_hat: jax.Array, s: SchedT, clip: bool = True):
    """Eq. (1)-(2): x0_hat and the epsilon consistent with it."""
    x0_hat = s.sqrt_recip_ab * x_t - s.sqrt_recipm1_ab * eps_hat  # (1)
    if clip:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        eps_hat = (s.sqrt_recip_ab * x_t - x0_hat) / s.sqrt_recipm1_ab  # (2)
    return x0_hat, eps_hat


def step(x_t: jax.Array, eps_hat: jax.Array, s: SchedT, noise: jax.Array,
         clip: bool = True) -> jax.Array:  # fmt: skip
    """Eq. (3): x_prev. Codebook, random and zero noise all take this path."""
    x0_hat, eps_hat = predict_x0(x_t, eps_hat, s, clip)
    return ddim(x0_hat, eps_hat, s, noise)  # (3)


def model_schedule(model: Any, steps: int, respacing: str = "", schedule: Schedule | None = None) -> Schedule:
    """The model's respaced schedule (or `schedule`, checked against `steps`)."""
    if schedule is None:
        d = model.config.diffusion
        return Schedule.create(d.noise_schedule, d.num_timesteps, respacing or str(steps))
    if schedule.steps != steps:
        raise ValueError(f"schedule has {schedule.steps} steps, steps={steps}")
    return schedule


class PixelFamily(Family):
    """A pixel-space epsilon network (ADM): the state is the image itself."""

    family = "adm"
    named_schedules = False
    restores = True
    params: Any
    config: Any

    @property
    @abc.abstractmethod
    def apply(self) -> Callable[..., jax.Array]:
        """apply(params, x (B, H, W, C), t (B,) int, y (B,) or None) -> (B, H, W, C or 2C)."""

    def state_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(v) for v in image_shape[-3:])

    def native_size(self) -> tuple[int, int]:
        side = self.config.architecture.image_size
        return side, side

    def size_multiple(self) -> int:
        return self.config.architecture.size_multiple

    def coding_side(self, policy: str) -> int:
        from ddcm_jax.images import DEFAULT_CODING_SIZE

        return DEFAULT_CODING_SIZE if policy == "fit" else self.config.architecture.image_size

    def generation_side(self) -> int:
        return self.config.generation_size

    def check_memory(self, height: int, width: int, budget: int) -> None:
        from ddcm_jax.memory import check_fits

        check_fits(self.config.architecture, height, width, budget=budget)

    def model_id(self) -> tuple[str, int, str]:
        d = self.config.diffusion
        return d.noise_schedule, d.num_timesteps, self.config.compute_dtype

    def header_mismatch(self, h: Any) -> str | None:
        arch, d = self.config.architecture, self.config.diffusion
        m, label = h.model, h.task.class_label
        if h.spec.latent_schedule is not None:
            return "a latent (Stable Diffusion) code; this model is not one"
        if (m.noise_schedule, m.num_timesteps) != (d.noise_schedule, d.num_timesteps):
            return (f"encoded with the {m.noise_schedule}/{m.num_timesteps} schedule, the model uses "
                    f"{d.noise_schedule}/{d.num_timesteps}")  # fmt: skip
        if m.compute_dtype != self.config.compute_dtype:
            return f"encoded with {m.compute_dtype} compute, this model directory computes in {self.config.compute_dtype}"
        if (label is None) != (arch.num_classes is None):
            return f"class label {label} does not fit this {'class-conditional' if arch.num_classes else 'unconditional'} model"
        if label is not None and label >= arch.num_classes:
            return f"class label {label} >= the model's {arch.num_classes} classes"
        return None

    def complete_spec(self, spec: Any, image_hw: tuple[int, int], *, no_bits_steps: int | None = None,
                      schedule: str | None = None) -> Any:  # fmt: skip
        if no_bits_steps or schedule is not None:
            raise ValueError("schedules, no-bits steps and prompts are settings of latent (Stable Diffusion) models")
        return spec

    def make_spec(self, *, image_hw: tuple[int, int], steps: int, codebook_size: int, rule: Any = "ddcm",
                  num_atoms: int = 1, coef_bits: int = 1, generator: str = "philox", eta: float = 1.0,
                  t_range: tuple[int, int] | None = None, clip: bool | None = None, schedule: str | None = None,
                  no_bits_steps: int | None = None, decoding: bool = False) -> Any:  # fmt: skip
        named = (("schedule", schedule), ("no_bits_steps", no_bits_steps or None),
                 ("t_range", t_range if decoding else None))
        if any(v is not None for _, v in named):
            given = ", ".join(n for n, v in named if v is not None)
            raise ValueError(f"{given}: options of latent (Stable Diffusion) models only")
        clip = True if clip is None else clip
        if decoding:  # a pixel code's idle steps are in its indices: t_range is not needed
            return CodeSpec(steps, codebook_size, replay_rule(rule, num_atoms, coef_bits), generator, eta, clip=clip)
        return CodeSpec.create(steps=steps, codebook_size=codebook_size, rule=rule, num_atoms=num_atoms,
                               coef_bits=coef_bits, generator=generator, eta=eta, t_range=t_range, clip=clip)  # fmt: skip

    def check_spec(self, spec: Any) -> None:
        if spec.schedule is not None or spec.no_bits_steps:
            raise ValueError("named schedules and no-bits steps are settings of latent (Stable Diffusion) models")

    def schedule_xs(self, spec: Any, schedule: Schedule | None = None) -> SchedT:
        return schedule_xs(model_schedule(self, spec.steps, spec.respacing, schedule), spec.eta, spec.t_range)

    def predict(self, x_t: jax.Array, out: jax.Array, s: SchedT, spec: Any) -> tuple[jax.Array, jax.Array]:
        return predict_x0(x_t, out, s, spec.clip)

    def combine(self, x_t: jax.Array, x0_hat: jax.Array, eps_hat: jax.Array, s: SchedT, noise: jax.Array) -> jax.Array:
        return ddim(x0_hat, eps_hat, s, noise)  # (3)

    def make_conditioning(self, *, prompt: str | None = None, guidance: float = 0.0, ccfg: bool = False,
                          edit_prompt: str | None = None, tskip: int = 0) -> None:  # fmt: skip
        given = [n for n, v in (("prompt", prompt), ("guidance", guidance), ("edit_prompt", edit_prompt)) if v]
        if given or ccfg:
            raise ValueError(f"{', '.join(given) or 'compressed CFG'}: options of latent (Stable Diffusion) models only")
        return None

    def conditioning(self, shared: Any, class_label: Any) -> jax.Array | None:
        if (class_label is None) != (self.config.architecture.num_classes is None):
            raise ValueError("give class_label if and only if the model is class-conditional")
        return None if class_label is None else jnp.asarray(class_label, jnp.int32)

    def denoise(self, x_t: jax.Array, s: SchedT, cond: Any) -> tuple[jax.Array, None]:
        out = self.apply(self.params, x_t[None], s.t[None], None if cond is None else cond[None])[0]
        return out[..., : x_t.shape[-1]], None  # learned-sigma channels are not used by DDIM

    def to_target(self, image: jax.Array) -> jax.Array:
        return image

    def to_image(self, x_0: jax.Array) -> jax.Array:
        return x_0
