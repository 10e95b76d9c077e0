"""guided-diffusion's beta schedules and timestep respacing, in pure Python / NumPy.

Kept apart from `ddcm_jax.schedule` (a JAX pytree) so that the bitstream,
which must replay a header's timesteps to know which steps carry bits, imports
no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["beta_schedule", "space_timesteps"]


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
