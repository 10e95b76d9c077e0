"""ddcm_jax: Denoising Diffusion Codebook Models as pure JAX functions.

The public API, re-exported here from the modules that define it:
  spec      `CodeSpec` (every setting of a code, validated once), `SpecError`
  sampler   `encode` / `decode` (take a spec), and their keyword forms
            `compress` / `decompress` / `restore` / `generate`; `sample`
  codec     `encode_image` / `decode_bytes` (pixels <-> `.ddcm` bytes)
  selection the rules (`DDCM`, `MatchingPursuit`, `Turbo`, `MSE`, `TurboMSE`, `Random`,
            `Soft`), `make_rule`, `select_atoms`
  model     `load_model` (an ADM `DiffusionModel`, or a Stable Diffusion
            `LatentDiffusionModel` for a folder from `ddcm convert --format diffusers`)
  latent    DDCM / Turbo-DDCM / compressed CFG / editing on a latent model
            (`compress` & co. dispatch to it; `LatentResult`)
  rate      `for_bpp`: the operating point for a target rate
  bitstream `Header` (spec + geometry + model + task + provenance) and its parts
  shapes    the shape annotations of the public signatures
  jit       `compiler_options`: the XLA options `select_atoms` compiles with (pass them to
            your own `jax.jit` around it to keep its speed)
"""

from ddcm_jax import shapes
from ddcm_jax.bitstream import (
    BitstreamError,
    Geometry,
    Header,
    ModelId,
    Provenance,
    StoredSpec,
    Task,
)
from ddcm_jax.codec import Encoded, decode_bytes, encode_image
from ddcm_jax.jit import compiler_options
from ddcm_jax.latent import LatentResult
from ddcm_jax.latent_model import LatentDiffusionModel
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
from ddcm_jax.rate import for_bpp
from ddcm_jax.sampler import (
    CompressResult,
    bits_per_image,
    compress,
    decode,
    decompress,
    encode,
    generate,
    restore,
    sample,
)
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import (
    DDCM,
    MSE,
    AtomSource,
    GuidedSubset,
    MatchingPursuit,
    Random,
    Selection,
    Soft,
    StepContext,
    Turbo,
    TurboMSE,
    make_rule,
    select_atoms,
)
from ddcm_jax.spec import CodeSpec, SpecError

__version__ = "0.1.0"

__all__ = [
    "DDCM",
    "MSE",
    "ADMConfig",
    "AtomSource",
    "BitstreamError",
    "CodeSpec",
    "Colorization",
    "CompressResult",
    "DiffusionConfig",
    "DiffusionModel",
    "Encoded",
    "GaussianBlur",
    "Geometry",
    "GuidedSubset",
    "Header",
    "Inpainting",
    "LatentDiffusionModel",
    "LatentResult",
    "MatchingPursuit",
    "ModelConfig",
    "ModelDirError",
    "ModelId",
    "Provenance",
    "Random",
    "Schedule",
    "Selection",
    "Soft",
    "SpecError",
    "StepContext",
    "StoredSpec",
    "SuperResolution",
    "Task",
    "Turbo",
    "TurboMSE",
    "__version__",
    "bits_per_image",
    "compiler_options",
    "compress",
    "decode",
    "decode_bytes",
    "decompress",
    "encode",
    "encode_image",
    "fingerprint",
    "for_bpp",
    "generate",
    "load_model",
    "make_rule",
    "restore",
    "sample",
    "save_model",
    "select_atoms",
    "shapes",
]
