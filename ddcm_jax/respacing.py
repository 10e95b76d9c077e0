"""guided-diffusion's beta schedules and timestep respacing, in pure Python / NumPy.

Kept apart from `ddcm_jax.schedule` (a JAX pytree) so that the bitstream,
which must replay a header's timesteps to know which steps carry bits, imports
no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["LATENT_SCHEDULES", "TURBO_TIMESTEPS", "beta_schedule", "ddcm_timesteps", "latent_timesteps",
           "space_timesteps", "turbo_timesteps"]


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


# --- latent diffusion (Stable Diffusion) timesteps: see `ddcm_jax.latent` ---------------------------

LATENT_SCHEDULES = ("ddcm", "turbo")

# Turbo-DDCM's fixed timestep list (from Vonderfecht 2025, as the Turbo-DDCM code lists it).
TURBO_TIMESTEPS = (
    999, 972, 949, 929, 897, 869, 834, 805, 780, 751, 726, 704, 688, 670, 648, 627, 608, 591, 578, 561,
    546, 530, 520, 510, 498, 491, 480, 465, 455, 447, 438, 429, 419, 410, 402, 390, 380, 371, 361, 353,
    345, 336, 326, 319, 313, 305, 296, 289, 282, 276, 269, 261, 254, 247, 242, 237, 231, 224, 219, 213,
    209, 204, 200, 194, 189, 185, 181, 175, 170, 167, 163, 160, 156, 153, 149, 146, 143, 139, 135, 132,
    129, 125, 121, 118, 116, 113, 110, 107, 104, 101, 99, 96, 94, 92, 90, 87, 85, 82, 80, 78, 76, 74, 72,
    70, 68, 66, 64, 62, 60, 58, 56, 54, 52, 50, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 35,
    34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10,
    9, 8, 7, 6, 5, 4, 3, 2, 1,
)  # fmt: skip


def ddcm_timesteps(steps: int, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(t, t_prev) (T,) int64 of the original latent DDCM; t_prev < 0 means `final_alpha_cumprod`."""
    t = np.linspace(0, num_train_timesteps - 1, steps).round()[::-1].astype(np.int64)
    return t, t - num_train_timesteps // steps


def turbo_timesteps(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(t, t_prev) (T,) int64 of Turbo-DDCM: `TURBO_TIMESTEPS` evenly sampled; t_prev 0 after the last."""
    n = len(TURBO_TIMESTEPS)
    if not 2 <= steps <= n:
        raise ValueError(f"the turbo schedule has 2..{n} steps, got {steps}")
    stride = (n - 1) / (steps - 1)
    t = np.array([TURBO_TIMESTEPS[round(i * stride)] for i in range(steps)], np.int64)  # round: half to even
    return t, np.append(t[1:], 0)


def latent_timesteps(schedule: str, steps: int, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(t, t_prev) of a named latent schedule, in run order."""
    if schedule == "ddcm":
        return ddcm_timesteps(steps, num_train_timesteps)
    if schedule == "turbo":
        return turbo_timesteps(steps)
    raise ValueError(f"unknown latent schedule {schedule!r} ({', '.join(LATENT_SCHEDULES)})")


# --- Turbo-DDCM's no-bits steps ---------------------------------------------------------------------


def _torch_logspace_f32(start: np.float32, end: np.float32, steps: int) -> np.ndarray:
    """`torch.logspace(start, end, steps)` for float32 start/end on CPU: exponents in float32, pow in double."""
    step_ = np.float32((end - start) / np.float32(steps - 1))
    half = steps // 2
    out = np.empty(steps, np.float32)
    for i in range(steps):
        e = np.float32(start + step_ * np.float32(i)) if i < half else np.float32(end - step_ * np.float32(steps - i - 1))
        out[i] = np.float32(10.0 ** float(e))
    return out


def no_bits_steps_heuristic(steps: int, codebook_size: int, num_atoms: int, height: int, width: int) -> int:
    """Turbo-DDCM's `get_no_bits_steps`: the more bits per pixel all T-1 steps would carry, the
    fewer steps go without bits (0 <= NBS <= T - 2), by log-spaced bpp bins over 0.01..0.15."""
    bits = (steps - 1) * (math.ceil(math.log2(math.comb(codebook_size, num_atoms))) + num_atoms)
    return no_bits_steps_for_bpp(bits / (height * width), steps, height * width)


def no_bits_steps_for_bpp(bpp: float, steps: int, pixels: int) -> int:
    """The NBS bin of `bpp` (bits per pixel if all T-1 steps carried bits) for an image of `pixels`."""
    param = 70 if pixels <= 768**2 else 20
    bins = _torch_logspace_f32(np.log10(np.float32(0.01)), np.log10(np.float32(0.15)), param)
    bucket = int(np.searchsorted(bins.astype(np.float64), round(bpp, 8), side="left"))  # torch.bucketize, right=False
    return max(0, min(steps - 2, param - bucket - 1))
