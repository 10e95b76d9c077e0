"""Noise schedules and timestep respacing, as frozen pytree data.

Everything is computed in float64 on the host with guided-diffusion's exact
definitions (its `get_named_beta_schedule`, `space_timesteps` and
`SpacedDiffusion`), then carried into the sampler as float32 arrays indexed by
the *respaced* step i = 0 .. steps-1 (i = 0 is the last step the sampler runs).

Notation (DDIM, Song et al. 2021, eq. 12; guided-diffusion `ddim_sample`):
  alpha_bar_t       cumulative product of (1 - beta) at the respaced step
  alpha_bar_prev    the same one step later in the reverse process (1 at i = 0)
  sigma_t(eta)      eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
                        * sqrt(1 - alpha_bar_t / alpha_bar_prev)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np

__all__ = ["Schedule", "beta_schedule", "space_timesteps"]


def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """guided-diffusion's named beta schedules (float64, shape (num_timesteps,))."""
    if name == "linear":
        # Ho et al.'s linear schedule, rescaled so other step counts keep its shape.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
             for i in range(num_timesteps)],
            dtype=np.float64,
        )  # fmt: skip
    raise ValueError(f"unknown beta schedule {name!r} (linear or cosine)")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The original timesteps kept when respacing, ascending (guided-diffusion semantics).

    `section_counts` is "ddimN" (the stride that gives exactly N steps), a
    comma-separated string of per-section counts ("10,15,20": the schedule cut
    into equal sections, each evenly subsampled), an int, or a list of ints.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))  # Python's round (half to even), as the original
            cur += stride
        start += size
    return sorted(steps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A respaced schedule. Arrays are indexed by respaced step i (0 = last to run).

    Array fields (pytree leaves; float64 NumPy from `create`):
      alpha_bar (S,), alpha_bar_prev (S,), timesteps (S,) original timestep fed to the net.
    Static fields: the identity of the schedule (name, num_timesteps, respacing).
    """

    alpha_bar: np.ndarray
    alpha_bar_prev: np.ndarray
    timesteps: np.ndarray
    name: str = dataclasses.field(metadata=dict(static=True), default="linear")
    num_timesteps: int = dataclasses.field(metadata=dict(static=True), default=1000)
    respacing: str = dataclasses.field(metadata=dict(static=True), default="")

    @classmethod
    def create(cls, name: str = "linear", num_timesteps: int = 1000,
               respacing: str | int | Sequence[int] = "") -> Schedule:  # fmt: skip
        """guided-diffusion's `SpacedDiffusion(space_timesteps(T, respacing), betas)`."""
        base_alpha_bar = np.cumprod(1.0 - beta_schedule(name, num_timesteps))
        if respacing in ("", None):
            respacing = str(num_timesteps)
        if not isinstance(respacing, str):
            respacing = ",".join(map(str, respacing)) if not isinstance(respacing, int) else str(respacing)
        keep = space_timesteps(num_timesteps, respacing)
        # The respaced betas telescope over the skipped steps.
        betas, last = [], 1.0
        for t in keep:
            betas.append(1.0 - base_alpha_bar[t] / last)
            last = base_alpha_bar[t]
        alpha_bar = np.cumprod(1.0 - np.asarray(betas, np.float64))
        alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
        return cls(alpha_bar, alpha_bar_prev, np.asarray(keep, np.int64), name, num_timesteps, respacing)

    @property
    def steps(self) -> int:
        return int(np.shape(self.alpha_bar)[0])

    @property
    def identity(self) -> str:
        """A string naming this schedule exactly, e.g. 'linear/1000/20'."""
        return f"{self.name}/{self.num_timesteps}/{self.respacing}"

    def sigma(self, eta: float = 1.0) -> np.ndarray:
        """DDIM sigma_t per respaced step (float64); 0 at i = 0."""
        ab, abp = np.asarray(self.alpha_bar), np.asarray(self.alpha_bar_prev)
        return eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
