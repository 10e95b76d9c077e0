"""ddcm_jax: Denoising Diffusion Codebook Models as pure JAX functions.

The public API, re-exported here from the modules that define it:
  spec      `CodeSpec` (every setting of a code, validated once), `SpecError`
  sampler   the one sampler for every model family: `encode` / `decode` (take a spec),
            and their keyword forms `compress` / `decompress` / `restore` / `generate`; `sample`
  codec     `encode_image` / `decode_bytes` (pixels <-> `.ddcm` bytes)
  selection the rules (`DDCM`, `MatchingPursuit`, `Turbo`, `MSE`, `TurboMSE`, `Random`,
            `Soft`), `make_rule`, `select_atoms`
  model     `load_model` (an ADM `DiffusionModel`, a Stable Diffusion `LatentDiffusionModel`
            or a FLUX.1 `FluxModel` for a folder from `ddcm convert --format diffusers`)
  latent    the Stable Diffusion family (its schedules and conditioning; `LatentResult`
            is `CompressResult`)
  rate      `for_bpp`: the operating point for a target rate
  bitstream `BitstreamError`; the format's own types (`Header`, `StoredSpec`, ...) stay in
            `ddcm_jax.bitstream`
  shapes    the shape annotations of the public signatures
  jit       `compiler_options`: the XLA:CPU options every program of the package compiles
            with (pass them to your own `jax.jit` around its calls to keep their speed)

Importing the package is cheap: each name is imported from its module on first use
(PEP 562), so that `ddcm` can install its Ctrl-C handler before JAX loads, and
`ddcm --help` answers at once. `from ddcm_jax import compress` works as always.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from ddcm_jax import shapes
    from ddcm_jax.bitstream import BitstreamError
    from ddcm_jax.codec import Encoded, decode_bytes, encode_image
    from ddcm_jax.families import load_model
    from ddcm_jax.flux_model import FluxModel
    from ddcm_jax.jit import compiler_options
    from ddcm_jax.latent import LatentResult
    from ddcm_jax.latent_model import LatentDiffusionModel
    from ddcm_jax.model import (
        DiffusionConfig,
        DiffusionModel,
        ModelConfig,
        ModelDirError,
        fingerprint,
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

# name -> the module that defines it: the public API, explicitly.
_EXPORTS = {
    "BitstreamError": "ddcm_jax.bitstream",
    "Encoded": "ddcm_jax.codec",
    "decode_bytes": "ddcm_jax.codec",
    "encode_image": "ddcm_jax.codec",
    "compiler_options": "ddcm_jax.jit",
    "FluxModel": "ddcm_jax.flux_model",
    "LatentResult": "ddcm_jax.latent",
    "LatentDiffusionModel": "ddcm_jax.latent_model",
    "DiffusionConfig": "ddcm_jax.model",
    "DiffusionModel": "ddcm_jax.model",
    "ModelConfig": "ddcm_jax.model",
    "ModelDirError": "ddcm_jax.model",
    "fingerprint": "ddcm_jax.model",
    "load_model": "ddcm_jax.families",
    "save_model": "ddcm_jax.model",
    "ADMConfig": "ddcm_jax.models.adm",
    "Colorization": "ddcm_jax.operators",
    "GaussianBlur": "ddcm_jax.operators",
    "Inpainting": "ddcm_jax.operators",
    "SuperResolution": "ddcm_jax.operators",
    "for_bpp": "ddcm_jax.rate",
    "CompressResult": "ddcm_jax.sampler",
    "bits_per_image": "ddcm_jax.sampler",
    "compress": "ddcm_jax.sampler",
    "decode": "ddcm_jax.sampler",
    "decompress": "ddcm_jax.sampler",
    "encode": "ddcm_jax.sampler",
    "generate": "ddcm_jax.sampler",
    "restore": "ddcm_jax.sampler",
    "sample": "ddcm_jax.sampler",
    "Schedule": "ddcm_jax.schedule",
    "AtomSource": "ddcm_jax.selection",
    "DDCM": "ddcm_jax.selection",
    "GuidedSubset": "ddcm_jax.selection",
    "MSE": "ddcm_jax.selection",
    "MatchingPursuit": "ddcm_jax.selection",
    "Random": "ddcm_jax.selection",
    "Selection": "ddcm_jax.selection",
    "Soft": "ddcm_jax.selection",
    "StepContext": "ddcm_jax.selection",
    "Turbo": "ddcm_jax.selection",
    "TurboMSE": "ddcm_jax.selection",
    "make_rule": "ddcm_jax.selection",
    "select_atoms": "ddcm_jax.selection",
    "CodeSpec": "ddcm_jax.spec",
    "SpecError": "ddcm_jax.spec",
}


def __getattr__(name: str) -> Any:
    if name == "shapes":
        return importlib.import_module("ddcm_jax.shapes")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddcm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "FluxModel",
    "GaussianBlur",
    "GuidedSubset",
    "Inpainting",
    "LatentDiffusionModel",
    "LatentResult",
    "MatchingPursuit",
    "ModelConfig",
    "ModelDirError",
    "Random",
    "Schedule",
    "Selection",
    "Soft",
    "SpecError",
    "StepContext",
    "SuperResolution",
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
