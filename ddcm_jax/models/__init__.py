"""Denoising networks. Each is a pure `apply(params, x, t, y=None)` over a plain pytree."""

from ddcm_jax.models.adm import (
    ADMConfig,
    ADMUNet,
    abstract_params,
    adm_apply,
    adm_init,
    timestep_embedding,
    torch_key,
)

__all__ = [
    "ADMConfig",
    "ADMUNet",
    "abstract_params",
    "adm_apply",
    "adm_init",
    "timestep_embedding",
    "torch_key",
]
