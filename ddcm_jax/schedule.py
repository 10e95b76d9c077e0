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

from collections.abc import Sequence

import numpy as np

from ddcm_jax.pytree import pytree_dataclass, static_field
from ddcm_jax.respacing import beta_schedule, space_timesteps

__all__ = ["Schedule", "beta_schedule", "space_timesteps"]


@pytree_dataclass
class Schedule:
    """A respaced schedule. Arrays are indexed by respaced step i (0 = last to run).

    Array fields (pytree leaves; float64 NumPy from `create`):
      alpha_bar (S,), alpha_bar_prev (S,), timesteps (S,) original timestep fed to the net.
    Static fields: the identity of the schedule (name, num_timesteps, respacing).
    """

    alpha_bar: np.ndarray
    alpha_bar_prev: np.ndarray
    timesteps: np.ndarray
    name: str = static_field("linear")
    num_timesteps: int = static_field(1000)
    respacing: str = static_field("")

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
