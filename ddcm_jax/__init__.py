"""ddcm_jax: Denoising Diffusion Codebook Models as pure JAX functions."""

from ddcm_jax.model import (
    DiffusionConfig,
    DiffusionModel,
    ModelConfig,
    ModelDirError,
    fingerprint,
    load_model,
    save_model,
)
from ddcm_jax.models.adm import ADMConfig

__version__ = "0.1.0"

__all__ = [
    "ADMConfig",
    "DiffusionConfig",
    "DiffusionModel",
    "ModelConfig",
    "ModelDirError",
    "__version__",
    "fingerprint",
    "load_model",
    "save_model",
]
