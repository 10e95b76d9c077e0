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
from ddcm_jax.operators import Colorization, GaussianBlur, Inpainting, SuperResolution
from ddcm_jax.sampler import (
    CompressResult,
    bits_per_image,
    compress,
    decompress,
    generate,
    restore,
    sample,
)
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import (
    DDCM,
    MSE,
    AtomSource,
    MatchingPursuit,
    Random,
    Selection,
    Soft,
    StepContext,
    Turbo,
    select_atoms,
)

__version__ = "0.1.0"

__all__ = [
    "DDCM",
    "MSE",
    "ADMConfig",
    "AtomSource",
    "Colorization",
    "CompressResult",
    "DiffusionConfig",
    "DiffusionModel",
    "GaussianBlur",
    "Inpainting",
    "MatchingPursuit",
    "ModelConfig",
    "ModelDirError",
    "Random",
    "Schedule",
    "Selection",
    "Soft",
    "StepContext",
    "SuperResolution",
    "Turbo",
    "__version__",
    "bits_per_image",
    "compress",
    "decompress",
    "fingerprint",
    "generate",
    "load_model",
    "restore",
    "sample",
    "save_model",
    "select_atoms",
]
