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
from ddcm_jax.sampler import CompressResult, compress, decompress, restore
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import (
    DDCM,
    MSE,
    AtomSource,
    MatchingPursuit,
    Random,
    Selection,
    StepContext,
    Turbo,
    colorization,
    inpainting,
)

__version__ = "0.1.0"

__all__ = [
    "DDCM",
    "MSE",
    "ADMConfig",
    "AtomSource",
    "CompressResult",
    "DiffusionConfig",
    "DiffusionModel",
    "MatchingPursuit",
    "ModelConfig",
    "ModelDirError",
    "Random",
    "Schedule",
    "Selection",
    "StepContext",
    "Turbo",
    "__version__",
    "colorization",
    "compress",
    "decompress",
    "fingerprint",
    "inpainting",
    "load_model",
    "restore",
    "save_model",
]
