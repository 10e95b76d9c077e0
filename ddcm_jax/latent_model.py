"""Stable Diffusion (SD 1.x / 2.x) as data: configs + parameter pytree + fingerprint, MODEL_DIR I/O.

A latent MODEL_DIR (written by `ddcm convert PIPELINE_DIR --format diffusers`)::

    MODEL_DIR/model.json     family "sd": the UNet, VAE, text-encoder and scheduler
                             configs, the tokenizer files' SHA-256, the fingerprints
    MODEL_DIR/params/        orbax checkpoint of {"text_encoder", "unet", "vae",
                             "null_prompt"} (float32; the same layout as an ADM MODEL_DIR)
    MODEL_DIR/tokenizer/     the CLIP tokenizer files, copied (vocab.json, merges.txt,
                             tokenizer_config.json, special_tokens_map.json if present)

`null_prompt` is the text encoder's last hidden state for the empty prompt,
(1, prompt_length, hidden), computed once at conversion: compression and
decompression without a prompt need no text encoder.

One fingerprint covers everything that changes what the folder computes:
`fingerprint` = SHA-256 over the canonical JSON of the settings (the four
configs, the tokenizer files' hashes, the prompt length, the family) plus
`arrays_fingerprint` (`ddcm_jax.model.fingerprint` over the whole parameter
tree, null prompt included). `load_model` recomputes both and refuses a folder
whose arrays, settings or tokenizer files were edited.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import modeldir as M
from ddcm_jax.jit import jit
from ddcm_jax.latent import LatentFamily
from ddcm_jax.models import clip, sd_unet, sd_vae
from ddcm_jax.printable import printable

__all__ = [
    "FAMILY",
    "SCHEDULER_CLASSES",
    "TOKENIZER_FILES",
    "LatentDiffusionModel",
    "LatentModelConfig",
    "LatentModelError",
    "SchedulerConfig",
    "abstract_params",
    "check_components",
    "implied_param_counts",
    "latent_fingerprint",
    "load_latent_model",
    "read_latent_model_json",
    "save_latent_model",
]

FAMILY = "sd"
COMPONENTS = ("text_encoder", "unet", "vae")
# Files of a CLIP tokenizer folder that `CLIPTokenizer.from_folder` reads (the first three required).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_MAX_TOKENIZER_FILE = 16 << 20
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")

# Schedulers whose config defines the DDPM forward process that DDIM inverts (betas ->
# alphas_cumprod); the sampler only reads those settings, as `DDIMScheduler.from_config` does.
SCHEDULER_CLASSES = frozenset({
    "DDIMScheduler", "PNDMScheduler", "DDPMScheduler", "LMSDiscreteScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
})  # fmt: skip
# Options of those schedulers that only steer their own samplers (not the forward process,
# not the network's output): accepted and ignored, at any value.
_SAMPLER_ONLY_OPTIONS = frozenset({
    "skip_prk_steps", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "interpolation_type", "timestep_type", "sigma_min", "sigma_max", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
    "final_sigmas_type", "lambda_min_clipped", "use_lu_lambdas", "predict_x0",
    "disable_corrector", "solver_p", "variance_type", "sample_max_value",
    "dynamic_thresholding_ratio", "use_dynamic_shifting", "time_shift_type",
})  # fmt: skip
# ... except these values, which mean the network predicts more than eps / v.
_REFUSED_VALUES = {"variance_type": ("learned", "learned_range")}


class LatentModelError(ValueError):
    """A latent model setting that is malformed or not supported (one line)."""


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str | int | float | bool | type(None)) else f"a {type(value).__name__}"
    return printable(text[:60])


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LatentModelError(f"{name} must be an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise LatentModelError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LatentModelError(f"{name} must be a number, got {_short(value)}")
    if not lo < value < hi:
        raise LatentModelError(f"{name} must be in ({lo}, {hi}), got {value!r}")
    return float(value)


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise LatentModelError(
            f"unsupported {name}={_short(value)} (supported: {', '.join(map(repr, allowed))})"
        )
    return value


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The forward process and the output parameterisation, as diffusers' `DDIMScheduler` reads them.

    Defaults are `DDIMScheduler`'s, so that `from_diffusers` of any scheduler
    config gives what `DDIMScheduler.from_config(config)` uses (the original DDCM
    builds its DDIM sampler that way from a pipeline's scheduler folder).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self) -> None:
        n = _int("num_train_timesteps", self.num_train_timesteps, 2, 100_000)
        _float("beta_start", self.beta_start, 0.0, 1.0)
        _float("beta_end", self.beta_end, 0.0, 1.0)
        if self.beta_end < self.beta_start:
            raise LatentModelError(f"beta_end={self.beta_end!r} is below beta_start={self.beta_start!r}")
        _choice("beta_schedule", self.beta_schedule, ("scaled_linear", "linear"))
        _choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        _int("steps_offset", self.steps_offset, 0, n - 1)
        _choice("timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))
        _choice("set_alpha_to_one", self.set_alpha_to_one, (True, False))
        _choice("clip_sample", self.clip_sample, (True, False))
        _float("clip_sample_range", self.clip_sample_range, 0.0, 1e6)

    @classmethod
    def from_diffusers(cls, data: Any) -> SchedulerConfig:
        """A diffusers `scheduler_config.json` (parsed, untrusted) -> the settings DDIM uses.

        `_class_name` must be a scheduler of `SCHEDULER_CLASSES`. Options that
        change the forward process in ways not implemented (`trained_betas`,
        `rescale_betas_zero_snr`, `thresholding`, other beta schedules, other
        prediction types) are refused; other schedulers' sampler-only options
        are ignored; anything unknown is refused. Raises `LatentModelError`.
        """
        if not isinstance(data, Mapping):
            raise LatentModelError("a scheduler config must be a JSON object")
        name = data.get("_class_name")
        if not isinstance(name, str) or name not in SCHEDULER_CLASSES:
            raise LatentModelError(
                f"unsupported scheduler _class_name={_short(name)} (supported: DDIM-compatible "
                f"schedulers: {', '.join(sorted(SCHEDULER_CLASSES))})"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if not isinstance(key, str):
                raise LatentModelError("scheduler config keys must be strings")
            if key.startswith("_") or key in fields:
                continue
            if key == "trained_betas":
                if value is not None:
                    raise LatentModelError("unsupported trained_betas (only null: betas from beta_schedule)")
            elif key in ("thresholding", "rescale_betas_zero_snr"):
                if value is not False:
                    raise LatentModelError(f"unsupported {key}={_short(value)} (only false)")
            elif key in _SAMPLER_ONLY_OPTIONS:
                if value in _REFUSED_VALUES.get(key, ()):
                    raise LatentModelError(f"unsupported {key}={_short(value)}")
            else:
                raise LatentModelError(f"unknown scheduler option {printable(key)[:60]}={_short(value)}")
        kwargs = {k: v for k, v in data.items() if k in fields}
        for key in ("beta_start", "beta_end", "clip_sample_range"):
            if isinstance(kwargs.get(key), int) and not isinstance(kwargs[key], bool):
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SchedulerConfig:
        """What `to_json` wrote (exactly these fields)."""
        if not isinstance(data, Mapping):
            raise LatentModelError("scheduler must be a JSON object")
        fields = [f.name for f in dataclasses.fields(cls)]
        if set(data) != set(fields):
            extra = sorted(printable(k)[:40] for k in set(data) - set(fields))
            missing = sorted(set(fields) - set(data))
            raise LatentModelError(f"scheduler fields: missing {missing}, unknown {extra}")
        return cls(**data)

    def betas(self) -> np.ndarray:
        """(num_train_timesteps,) float32, as diffusers computes them (torch float32 linspace)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return _torch_linspace_f32(self.beta_start, self.beta_end, n)
        root = _torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n)
        return root * root

    def alphas_cumprod(self) -> np.ndarray:
        """(num_train_timesteps,) float64 holding diffusers' float32 `alphas_cumprod` exactly.

        `torch.cumprod` of float32 accumulates in float64 and rounds each entry to
        float32; so does this. Equal, bit for bit, to the values diffusers gives on
        an x86-64 CPU (checked against `sd_tiny`'s trace and `DDIMScheduler`).
        """
        alphas = np.float32(1.0) - self.betas()
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32).astype(np.float64)

    def final_alpha_cumprod(self) -> float:
        """alpha_bar before step 0: 1 with `set_alpha_to_one`, else alphas_cumprod[0]."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod()[0])


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` on CPU, bit for bit.

    PyTorch rounds start and end to float32, takes step = (end - start) / (steps - 1)
    in float32, and computes start + step * i for the first half and
    end - step * (steps - 1 - i) for the second with a fused multiply-add
    (one rounding): float64 arithmetic on float32 inputs then one rounding
    gives the same result (the product of a float32 and an index < 2^24 is exact).
    """
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], np.float32)
    step = np.float32((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(np.arange(steps) < steps // 2, lo, hi).astype(np.float32)


def check_components(unet: sd_unet.SDUNetConfig, vae: sd_vae.SDVAEConfig,
                     text: clip.CLIPTextConfig) -> None:  # fmt: skip
    """Refuse (LatentModelError) component configs that cannot work together."""
    if vae.shift_factor is not None:
        raise LatentModelError(f"the VAE has shift_factor {vae.shift_factor} (a FLUX-style VAE); "
                               "Stable Diffusion models scale their latents only")
    if text.hidden_size != unet.cross_attention_dim:
        raise LatentModelError(
            f"the text encoder's hidden_size {text.hidden_size} differs from the UNet's "
            f"cross_attention_dim {unet.cross_attention_dim}"
        )
    if not vae.latent_channels == unet.in_channels == unet.out_channels:
        raise LatentModelError(
            f"the VAE's latent_channels {vae.latent_channels} must equal the UNet's in_channels "
            f"{unet.in_channels} and out_channels {unet.out_channels} (eps / v prediction of the latent)"
        )
    if vae.in_channels != 3 or vae.out_channels != 3:
        raise LatentModelError(
            f"the VAE must map RGB images (in_channels / out_channels 3, got {vae.in_channels} / "
            f"{vae.out_channels})"
        )


@dataclasses.dataclass(frozen=True)
class LatentModelConfig:
    """Everything in a latent model's model.json except the fingerprints."""

    unet: sd_unet.SDUNetConfig
    vae: sd_vae.SDVAEConfig
    text_encoder: clip.CLIPTextConfig
    scheduler: SchedulerConfig
    tokenizer_files: tuple[tuple[str, str], ...]  # (file name, "sha256:<hex>"), sorted
    prompt_length: int = 77
    family: str = FAMILY
    converter_version: str = ""
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_components(self.unet, self.vae, self.text_encoder)
        _int("prompt_length", self.prompt_length, 2, self.text_encoder.max_position_embeddings)
        names = [n for n, _ in self.tokenizer_files]
        if names != sorted(set(names)) or not {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(names) \
                or not set(names) <= set(TOKENIZER_FILES):  # fmt: skip
            raise LatentModelError(f"tokenizer files must be {', '.join(TOKENIZER_FILES[:3])} (and optionally "
                                   f"{TOKENIZER_FILES[3]}), got {printable(names)[:200]}")
        for _, digest in self.tokenizer_files:
            if not isinstance(digest, str) or not _FINGERPRINT.fullmatch(digest):
                raise LatentModelError("malformed tokenizer file hash")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.prediction_type

    @property
    def scaling_factor(self) -> float:
        return self.vae.scaling_factor

    @property
    def downsampling_factor(self) -> int:
        return self.vae.downsampling_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    def settings(self) -> dict[str, Any]:
        """The settings that change what the model computes (what the fingerprint covers)."""
        return {
            "family": self.family,
            "unet": self.unet.to_json(),
            "vae": self.vae.to_json(),
            "text_encoder": self.text_encoder.to_json(),
            "scheduler": self.scheduler.to_json(),
            "tokenizer": dict(self.tokenizer_files),
            "prompt_length": self.prompt_length,
        }

    def to_json(self, arrays_fingerprint: str, param_counts: Mapping[str, int] | None = None) -> dict[str, Any]:
        return {
            "format": M.MODEL_FORMAT,
            "format_version": M.MODEL_FORMAT_VERSION,
            **self.settings(),
            "converter_version": self.converter_version,
            "source": dict(self.source),
            "param_counts": dict(param_counts or {}),
            "arrays_fingerprint": arrays_fingerprint,
            "fingerprint": latent_fingerprint(self, arrays_fingerprint),
        }

    @classmethod
    def from_json(cls, data: Any) -> tuple[LatentModelConfig, str, str]:
        """Parse and check a latent model.json object -> (config, fingerprint, arrays_fingerprint).

        Every config is re-validated by its own `from_json`; the fingerprint must
        match the settings. Raises ValueError (one line).
        """
        if not isinstance(data, Mapping):
            raise LatentModelError("model.json must hold a JSON object")
        if data.get("format") != M.MODEL_FORMAT:
            raise LatentModelError(f"not a {M.MODEL_FORMAT} file (format={_short(data.get('format'))})")
        if data.get("format_version") != M.MODEL_FORMAT_VERSION or isinstance(data.get("format_version"), bool):
            raise LatentModelError(f"unsupported format_version {_short(data.get('format_version'))}")
        if data.get("family") != FAMILY:
            raise LatentModelError(f"not a latent model (family {_short(data.get('family'))})")
        known = {"format", "format_version", "family", "unet", "vae", "text_encoder", "scheduler",
                 "tokenizer", "prompt_length", "converter_version", "source", "param_counts",
                 "arrays_fingerprint", "fingerprint"}  # fmt: skip
        unknown = sorted(printable(k)[:40] for k in set(data) - known)
        if unknown:
            raise LatentModelError(f"unknown fields: {', '.join(unknown[:8])}")
        for name in ("unet", "vae", "text_encoder", "scheduler", "tokenizer", "prompt_length",
                     "fingerprint", "arrays_fingerprint"):  # fmt: skip
            if name not in data:
                raise LatentModelError(f"missing field {name}")
        for name in ("unet", "vae", "text_encoder"):
            if not isinstance(data[name], Mapping):
                raise LatentModelError(f"{name} must be a JSON object")
        tok = data["tokenizer"]
        if not isinstance(tok, Mapping) or not all(isinstance(v, str) for v in tok.values()):
            raise LatentModelError("tokenizer must map file names to hashes")
        converter_version, source = data.get("converter_version", ""), data.get("source", {})
        if not isinstance(converter_version, str) or not isinstance(source, Mapping):
            raise LatentModelError("converter_version must be a string and source an object")
        unet = sd_unet.SDUNetConfig.from_json(data["unet"])
        if unet.to_json() != data["unet"]:
            raise LatentModelError("unet config is not in the form this version writes")
        vae = sd_vae.SDVAEConfig.from_json(data["vae"])
        if vae.to_json() != data["vae"]:
            raise LatentModelError("vae config is not in the form this version writes")
        text = clip.CLIPTextConfig.from_json(data["text_encoder"])
        config = cls(
            unet=unet,
            vae=vae,
            text_encoder=text,
            scheduler=SchedulerConfig.from_json(data["scheduler"]),
            tokenizer_files=tuple(sorted(tok.items())),
            prompt_length=data["prompt_length"],
            converter_version=converter_version,
            source=dict(source),
        )
        fp, arrays = data["fingerprint"], data["arrays_fingerprint"]
        for name, value in (("fingerprint", fp), ("arrays_fingerprint", arrays)):
            if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
                raise LatentModelError(f"missing or malformed {name}")
        if latent_fingerprint(config, arrays) != fp:
            raise LatentModelError("settings changed since the model was saved (fingerprint mismatch)")
        return config, fp, arrays


def latent_fingerprint(config: LatentModelConfig, arrays_fingerprint: str) -> str:
    """THE fingerprint of a latent model: `modeldir.settings_fingerprint` of its settings and arrays."""
    return M.settings_fingerprint(config.settings(), arrays_fingerprint)


def abstract_params(config: LatentModelConfig) -> dict[str, Any]:
    """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
    return {
        "text_encoder": clip.abstract_params(config.text_encoder),
        "unet": sd_unet.abstract_params(config.unet),
        "vae": sd_vae.abstract_params(config.vae),
        "null_prompt": jax.ShapeDtypeStruct(
            (1, config.prompt_length, config.text_encoder.hidden_size), jnp.float32
        ),
    }


def implied_param_counts(unet: sd_unet.SDUNetConfig, vae: sd_vae.SDVAEConfig,
                         text: clip.CLIPTextConfig) -> dict[str, int]:  # fmt: skip
    """{"text_encoder", "unet", "vae"}: the parameters each config implies, by arithmetic on the
    networks' structure (equal to the leaf sizes of their `abstract_params`, which tests check),
    so that a config can be refused in milliseconds, before its network is traced."""
    return {"text_encoder": _text_params(text), "unet": _unet_params(unet), "vae": vae_param_count(vae)}


def _conv(i: int, o: int, k: int = 3) -> int:
    return k * k * i * o + o


def _resnet_params(i: int, o: int, temb: int = 0) -> int:
    """`ResnetBlock2D`: norm1, conv1, (time_emb_proj), norm2, conv2, (conv_shortcut)."""
    time_proj = temb * o + o if temb else 0
    shortcut = _conv(i, o, 1) if i != o else 0
    return 2 * i + _conv(i, o) + time_proj + 2 * o + _conv(o, o) + shortcut


def _text_params(cfg: clip.CLIPTextConfig) -> int:
    h, f = cfg.hidden_size, cfg.intermediate_size
    layer = 2 * h + 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h)
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings) * h
    return embeddings + cfg.num_hidden_layers * layer + 2 * h


def _unet_params(cfg: sd_unet.SDUNetConfig) -> int:
    chans, n, d = cfg.block_out_channels, cfg.levels, cfg.cross_attention_dim
    temb = cfg.time_embed_dim

    def transformer(c: int, layers: int) -> int:
        # 3 norms, attn1 (q, k, v, out), attn2 (k, v from the context), GEGLU feed-forward
        block = 6 * c + (4 * c * c + c) + (2 * c * c + 2 * c * d + c) + (8 * c * c + 8 * c)
        block += 4 * c * c + c
        return 2 * c + 2 * (c * c + c) + layers * block  # norm, proj_in, proj_out

    total = chans[0] * temb + temb + temb * temb + temb + _conv(cfg.in_channels, chans[0])
    ch, skips = chans[0], [chans[0]]
    for i, out in enumerate(chans):
        for _ in range(cfg.layers_per_block[i]):
            total += _resnet_params(ch, out, temb)
            ch = out
            if cfg.down_block_types[i] == sd_unet.CROSS_DOWN:
                total += transformer(out, cfg.transformer_layers_per_block[i])
            skips.append(ch)
        if i != n - 1:
            total += _conv(out, out)
            skips.append(out)
    total += 2 * _resnet_params(ch, ch, temb)  # the mid block
    total += transformer(ch, cfg.transformer_layers_per_block[-1])
    for index in range(n):
        level = n - 1 - index
        out = chans[level]
        for _ in range(cfg.layers_per_block[level] + 1):
            total += _resnet_params(ch + skips.pop(), out, temb)
            ch = out
            if cfg.up_block_types[index] == sd_unet.CROSS_UP:
                total += transformer(out, cfg.transformer_layers_per_block[level])
        if level != 0:
            total += _conv(out, out)
    return total + 2 * ch + _conv(ch, cfg.out_channels)


def vae_param_count(cfg: sd_vae.SDVAEConfig) -> int:
    """Parameters of an `AutoencoderKL` from its config (arithmetic)."""
    chans, n, lat = cfg.block_out_channels, cfg.levels, cfg.latent_channels
    last = chans[-1]
    mid = 2 * _resnet_params(last, last)
    mid += 2 * last + 4 * (last * last + last) if cfg.mid_block_add_attention else 0
    total = _conv(cfg.in_channels, chans[0])  # the encoder
    ch = chans[0]
    for i, out in enumerate(chans):
        for _ in range(cfg.layers_per_block):
            total += _resnet_params(ch, out)
            ch = out
        total += _conv(out, out) if i != n - 1 else 0
    total += mid + 2 * ch + _conv(ch, 2 * lat)
    total += _conv(lat, last) + mid  # the decoder
    ch = last
    for index in range(n):
        out = chans[n - 1 - index]
        for _ in range(cfg.layers_per_block + 1):
            total += _resnet_params(ch, out)
            ch = out
        total += _conv(out, out) if index != n - 1 else 0
    total += 2 * ch + _conv(ch, cfg.out_channels)
    total += _conv(2 * lat, 2 * lat, 1) if cfg.use_quant_conv else 0
    return total + (_conv(lat, lat, 1) if cfg.use_post_quant_conv else 0)


def param_counts(params: Any) -> dict[str, int]:
    return {
        name: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params[name]))
        for name in COMPONENTS
    }


# Compiled once per config and shapes when called eagerly; inlined when the caller is traced.
@functools.partial(jit, static_argnums=0)
def _unet(config: sd_unet.SDUNetConfig, params: Any, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    return sd_unet.sd_unet_apply(config, params, x, t, context)


@functools.partial(jit, static_argnums=0)
def _encode(config: sd_vae.SDVAEConfig, params: Any, images: jax.Array) -> jax.Array:
    mean, _ = sd_vae.vae_encode(config, params, images)
    return mean * jnp.float32(config.scaling_factor)


@functools.partial(jit, static_argnums=0)
def _decode(config: sd_vae.SDVAEConfig, params: Any, latents: jax.Array) -> jax.Array:
    return sd_vae.vae_decode(config, params, latents / jnp.float32(config.scaling_factor))


@jax.tree_util.register_pytree_node_class
class LatentDiffusionModel(LatentFamily):
    """A loaded Stable Diffusion model: `.config`, `.params`, `.fingerprint`, pure methods.

    A pytree whose leaves are the parameters (`{"text_encoder", "unet", "vae",
    "null_prompt"}`), so it passes through `jax.jit` / `vmap` / `scan`; the
    configs and the tokenizer are static.

    * `model(x, t, context)`: the raw UNet output (B, h, w, 4), epsilon or v as
      `.prediction_type` says; x (B, h, w, 4) NHWC latents, t (B,) integer
      timesteps, context (B, L, C) text embeddings.
    * `encode(images)`: (B, H, W, 3) in [-1, 1] -> (B, H/8, W/8, 4), the mean
      (mode) of the latent distribution times `scaling_factor`.
    * `decode(latents)`: VAE decoder of latents / `scaling_factor`, not clamped.
    * `tokenize(prompts)`, `encode_prompt(prompts)` (host side: strings),
      `null_prompt` (1, L, C): the stored embedding of "".
    * `alphas_cumprod` (float64 NumPy), `final_alpha_cumprod`.
    """

    def __init__(self, config: LatentModelConfig, params: Any, fingerprint: str,
                 tokenizer: Any = None) -> None:  # fmt: skip
        self.config = config
        self.params = params
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer

    family = FAMILY

    @property
    def prediction_type(self) -> str:
        return self.config.scheduler.prediction_type

    @property
    def scaling_factor(self) -> float:
        return self.config.vae.scaling_factor

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.config.scheduler.alphas_cumprod()

    @property
    def final_alpha_cumprod(self) -> float:
        return self.config.scheduler.final_alpha_cumprod()

    @property
    def null_prompt(self) -> jax.Array:
        return self.params["null_prompt"]

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return _unet(self.config.unet, self.params["unet"], x, t, context)

    def encode(self, images: jax.Array) -> jax.Array:
        return _encode(self.config.vae, self.params["vae"], images)

    def decode(self, latents: jax.Array) -> jax.Array:
        return _decode(self.config.vae, self.params["vae"], latents)

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.tokenizer(prompts)

    def encode_prompt(self, prompts: str | Sequence[str]) -> jax.Array:
        """(B, prompt_length, C): the text encoder's last hidden state (after the final LayerNorm)."""
        ids = self.tokenize(prompts)
        return clip.clip_text_apply(self.config.text_encoder, self.params["text_encoder"], ids)[0]

    def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, ...]]:
        return (self.params,), (self.config, self.fingerprint, self.tokenizer)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any]) -> LatentDiffusionModel:
        return cls(aux[0], children[0], aux[1], aux[2])

    def __repr__(self) -> str:
        counts = param_counts(self.params)
        unet = self.config.unet
        return (
            f"LatentDiffusionModel(sd, unet {list(unet.block_out_channels)}, "
            f"{sum(counts.values()):,} params, {self.prediction_type}, {self.fingerprint[:19]}…)"
        )


# --- writing ------------------------------------------------------------------------------------


def _all_dicts(tree: Any) -> bool:
    return isinstance(tree, dict) and all(_all_dicts(v) for v in tree.values() if isinstance(v, Mapping))


def _as_dicts(tree: Any) -> Any:
    """Nested Mappings as nested plain dicts (the leaves themselves are not copied)."""
    if isinstance(tree, Mapping):
        return {k: _as_dicts(v) for k, v in tree.items()}
    return tree


def _replace_leaves(tree: dict[str, Any], fn: Any) -> None:
    """tree[...] = fn(leaf), one leaf at a time, in place: the old leaf is released before the
    next is made, so converting a multi-GB tree never holds two copies of it."""
    for key in list(tree):
        value = tree[key]
        if isinstance(value, dict):
            _replace_leaves(value, fn)
        else:
            tree[key] = None
            tree[key] = fn(value)
            del value


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tokenizer_hashes(files: Mapping[str, bytes]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, _sha256(data)) for name, data in files.items()))


def save_latent_model(model_dir: str | os.PathLike, config: LatentModelConfig, params: Any,
                      tokenizer_files: Mapping[str, bytes], *, overwrite: bool = False) -> str:  # fmt: skip
    """Write a latent MODEL_DIR atomically (staged beside it, renamed at the end); returns the fingerprint.

    `params` must match `abstract_params(config)`; `tokenizer_files` (name ->
    bytes) must hash to `config.tokenizer_files`. Refusals and failures raise
    `ModelDirError` (one line) and leave nothing behind, as `save_model`.

    Memory: when `params` is nested dicts, its leaves are replaced IN PLACE
    (float32 NumPy, then CPU jax arrays holding the same values) as they are
    written, so that saving a multi-GB model holds about one copy of it. The
    orbax checkpoint is written without compression (float weights gain ~10%
    from it, and restoring takes about half the time).
    """
    import orbax.checkpoint as ocp

    target = M.check_save_target(model_dir, overwrite)
    where = printable(target)
    M.check_tree_matches(params, abstract_params(config), where)
    if tokenizer_hashes(tokenizer_files) != config.tokenizer_files:
        raise M.ModelDirError(f"{where}: tokenizer files do not match the config's hashes")
    if not _all_dicts(params):  # e.g. FrozenDicts: plain dicts over the same leaves
        params = _as_dicts(params)
    _replace_leaves(params, lambda a: np.asarray(a, np.float32))  # no copy for float32 NumPy
    arrays = M.fingerprint(params)
    meta = json.dumps(config.to_json(arrays, param_counts(params)), indent=2) + "\n"
    need = sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) + (1 << 20)
    need += sum(len(b) for b in tokenizer_files.values())

    def fill(stage: Path) -> None:
        # orbax copies NumPy leaves before writing (and compression buffers them again):
        # move each leaf to a CPU jax array first (the NumPy copy is released at once) and
        # write uncompressed, so that saving adds little to one copy of the parameters.
        cpu = jax.devices("cpu")[0]
        _replace_leaves(params, lambda a: jax.device_put(a, cpu))
        with M.quiet_orbax():
            checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
            try:
                checkpointer.save(stage / "params", args=ocp.args.PyTreeSave(params))
            finally:
                checkpointer.close()
        (stage / "tokenizer").mkdir()
        for name, data in tokenizer_files.items():
            (stage / "tokenizer" / name).write_bytes(data)
        (stage / "model.json").write_text(meta)

    M.write_staged(target, overwrite, need, fill)
    return latent_fingerprint(config, arrays)


# --- reading ------------------------------------------------------------------------------------


def read_latent_model_json(model_dir: str | os.PathLike) -> tuple[LatentModelConfig, str]:
    """Parse and check a latent MODEL_DIR's model.json -> (config, fingerprint); ModelDirError otherwise."""
    root = Path(model_dir).absolute()
    meta = root / "model.json"
    if not meta.is_file():
        raise M.no_model_json(root)
    data = M.read_json_object(meta)
    try:
        config, fp, _ = LatentModelConfig.from_json(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise M.ModelDirError(f"{printable(meta)}: {printable(e)[:300]}") from None
    return config, fp


def _load_tokenizer(root: Path, config: LatentModelConfig) -> Any:
    from ddcm_jax.tokenizer import CLIPTokenizer, TokenizerError

    folder = root / "tokenizer"
    try:
        present = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise M.ModelDirError(f"{printable(folder)}: cannot read ({M.error_reason(e)})") from None
    listed = [name for name, _ in config.tokenizer_files]
    if present != listed:
        raise M.ModelDirError(
            f"{printable(folder)}: holds {printable(present)[:200]}, model.json lists {listed}"
        )
    for name, digest in config.tokenizer_files:
        path = folder / name
        try:
            with M.open_regular(path) as f:  # a FIFO would block
                data = f.read(_MAX_TOKENIZER_FILE + 1)
        except OSError as e:
            raise M.ModelDirError(f"{printable(path)}: cannot read ({M.error_reason(e)})") from None
        if _sha256(data) != digest:
            raise M.ModelDirError(f"{printable(path)}: edited since the model was saved (hash mismatch)")
    try:
        tok = CLIPTokenizer.from_folder(folder)
    except TokenizerError as e:
        raise M.ModelDirError(printable(e)[:400]) from None
    if tok.model_max_length != config.prompt_length:
        raise M.ModelDirError(
            f"{printable(folder)}: model_max_length {tok.model_max_length} differs from "
            f"prompt_length {config.prompt_length}"
        )
    return tok


def load_latent_model(model_dir: str | os.PathLike, *, verify: bool = True) -> LatentDiffusionModel:
    """Load a latent MODEL_DIR (see the module docstring); `ddcm_jax.load_model` calls this
    for folders whose model.json says family "sd".

    model.json is checked first (every config, the settings fingerprint), then
    the tokenizer files (hashes), then the checkpoint folder (regular files only,
    as many values as the configs imply: `model.check_checkpoint`), then the
    parameters are restored against the shapes the configs imply; with `verify`
    the arrays fingerprint is
    recomputed and must match. Raises `ModelDirError` (one line: path and reason).
    """
    root = Path(model_dir).absolute()
    meta = root / "model.json"
    if not meta.is_file():
        raise M.no_model_json(root)
    try:
        config, fp, arrays = LatentModelConfig.from_json(M.read_json_object(meta))
    except M.ModelDirError:
        raise
    except (ValueError, TypeError, RecursionError) as e:
        raise M.ModelDirError(f"{printable(meta)}: {printable(e)[:300]}") from None
    tokenizer = _load_tokenizer(root, config)
    implied = implied_param_counts(config.unet, config.vae, config.text_encoder)
    null_prompt = config.prompt_length * config.text_encoder.hidden_size
    M.check_checkpoint(root / "params", sum(implied.values()) + null_prompt)  # before any tracing
    expected = abstract_params(config)
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), expected)
    try:
        params = M.restore_params(root / "params", target)
    except M.ModelDirError:
        raise
    except MemoryError:
        raise M.ModelDirError(f"{printable(root / 'params')}: cannot restore parameters (out of memory)") from None
    except Exception as e:  # orbax raises many types; all mean "unreadable"
        raise M.ModelDirError(f"{printable(root / 'params')}: cannot restore parameters ({M.error_reason(e)})") from None
    M.check_tree_matches(params, expected, printable(root))
    if verify:
        actual = M.fingerprint(params)
        if actual != arrays:
            raise M.ModelDirError(
                f"{printable(root)}: parameters do not match the fingerprint in model.json "
                f"({actual[:23]}… != {arrays[:23]}…)"
            )
    params = _as_dicts(params)
    _replace_leaves(params, jnp.asarray)  # leaf by leaf: one copy of the parameters at a time
    return LatentDiffusionModel(config, params, fp, tokenizer)
