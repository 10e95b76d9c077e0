"""An exact denoiser for Gaussian data, usable wherever the sampler takes a model.

For x0 ~ N(0, s^2 I) and x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, the
posterior mean of eps is

    eps_hat(x_t, t) = sqrt(1 - alpha_bar_t) x_t / (alpha_bar_t s^2 + 1 - alpha_bar_t),

a smooth function of x_t, of s and of the schedule, with no network and no
clipping kinks: the right prior for finite-difference checks of gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.model import DiffusionConfig
from ddcm_jax.pixel import PixelFamily
from ddcm_jax.schedule import Schedule


@dataclasses.dataclass(frozen=True)
class _Arch:
    image_size: int = 8
    in_channels: int = 3
    num_classes: None = None


_DIFFUSION = DiffusionConfig()  # linear betas, 1000 steps, epsilon prediction
LOG_S = float(np.log(0.5))


@dataclasses.dataclass(frozen=True)
class _Config:
    architecture: _Arch = _Arch()
    diffusion: DiffusionConfig = _DIFFUSION


_ALPHA_BAR = np.asarray(Schedule.create("linear", 1000, "1000").alpha_bar, np.float32)  # by original t


@jax.tree_util.register_pytree_node_class
class GaussianDataModel(PixelFamily):
    """params = {"log_s": ()} (data std s); output (B, H, W, 3) = eps_hat."""

    def __init__(self, log_s: jax.Array | float = LOG_S) -> None:
        self.params = {"log_s": jnp.asarray(log_s, jnp.float32)}
        self.config = _Config()

    @staticmethod
    def apply(params: dict, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        ab = jnp.asarray(_ALPHA_BAR)[t].reshape(-1, 1, 1, 1)
        s2 = jnp.exp(2 * params["log_s"])
        return jnp.sqrt(1 - ab) * x / (ab * s2 + 1 - ab)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        return self.apply(self.params, x, t, y)

    def tree_flatten(self):
        return (self.params["log_s"],), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0])
