"""Stable Diffusion's autoencoder, diffusers' `AutoencoderKL`, in Flax, NHWC.

Encoder: conv_in, one `DownEncoderBlock2D` per level (`layers_per_block`
resnets without time embedding, then a stride-2 conv after diffusers'
asymmetric zero pad of one row and column at the bottom / right, except at the
last level), a mid block (resnet, single-head self-attention with its own
GroupNorm and a residual, resnet), conv_norm_out, silu, conv_out to
2 * latent_channels, then the 1x1 `quant_conv`; the diagonal Gaussian's mean
and log-variance (clamped to [-30, 20]) are its two channel halves.
Decoder: the 1x1 `post_quant_conv`, conv_in, mid block, one `UpDecoderBlock2D`
per level (`layers_per_block + 1` resnets, then nearest 2x + conv except at
the last), conv_norm_out, silu, conv_out. Every GroupNorm has eps 1e-6.

`vae_encode` and `vae_decode` are the raw network: neither applies
`scaling_factor` (read from the config, `SDVAEConfig.scaling_factor`; the
sampler multiplies encoder means by it and divides latents by it before
decoding) and the decoder does not clamp.

Names follow diffusers' module paths (`encoder.down_blocks.0.resnets.0.conv1.weight`
is `encoder/down_blocks_0/resnets_0/conv1/kernel`); `torch_key` inverts the
rule. Released VAE files written by diffusers < 0.15 name the mid-block
attention projections `query` / `key` / `value` / `proj_attn`:
`rename_legacy_keys` maps them to `to_q` / `to_k` / `to_v` / `to_out.0` before
`params_from_state_dict`.

`shift_factor` (FLUX's VAE: latent = (mode - shift) * scale) is read and kept
in the config; the family that loads the VAE applies it (a Stable Diffusion
model refuses one, `ddcm_jax.latent_model.check_components`).
`latents_mean` / `latents_std` (per-channel normalisation of other model
families) are refused rather than silently ignored.

Precision: as in `sd_unet`: convolutions and the attention projections run in
the compute dtype; GroupNorm and the attention scores and softmax are float32;
the encoder's conv_out + quant_conv and the decoder's conv_out run in float32
and the outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddcm_jax.models import _layers as L
from ddcm_jax.models._layers import SDConfigError, SDStateDictError

__all__ = [
    "AutoencoderKL",
    "SDConfigError",
    "SDStateDictError",
    "SDVAEConfig",
    "abstract_params",
    "params_from_state_dict",
    "rename_legacy_keys",
    "state_dict_shapes",
    "torch_key",
    "vae_decode",
    "vae_encode",
    "vae_init",
]

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
EPS = 1e-6  # every GroupNorm of the Encoder / Decoder
LOGVAR_RANGE = (-30.0, 20.0)

# diffusers 0.42 `AutoencoderKL.__init__` defaults.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": [DOWN_BLOCK],
    "up_block_types": [UP_BLOCK],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_ONLY: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "latents_mean": (None,),
    "latents_std": (None,),
}


@dataclasses.dataclass(frozen=True)
class SDVAEConfig:
    """Architecture of a diffusers `AutoencoderKL` (SD 1.x / 2.x family), resolved.

    `sample_size` and `force_upcast` are informational. Construct from a
    diffusers `vae/config.json` with `from_json`.
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int | tuple[int, int] | None = None
    force_upcast: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        chans = L.check_list("block_out_channels", list(self.block_out_channels), L.check_int)
        L.check_int("layers_per_block", self.layers_per_block, 1, L.MAX_LAYERS)
        L.check_int("in_channels", self.in_channels)
        L.check_int("out_channels", self.out_channels)
        L.check_int("latent_channels", self.latent_channels)
        groups = L.check_int("norm_num_groups", self.norm_num_groups, 1, 1024)
        L.check_float("scaling_factor", self.scaling_factor, 0.0, 1e6, open_lo=True)
        if self.shift_factor is not None:
            L.check_float("shift_factor", self.shift_factor, -1e6, 1e6)
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                     "force_upcast"):  # fmt: skip
            L.check_bool(name, getattr(self, name))
        L.check_dtype(self.compute_dtype)
        for i, c in enumerate(chans):
            if c % groups:
                raise SDConfigError(
                    f"block_out_channels[{i}]={c} is not divisible by norm_num_groups={groups}"
                )

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side: 2 ** (levels - 1) (8 for SD)."""
        return 2 ** (self.levels - 1)

    @property
    def dtype(self) -> Any:
        return L.DTYPES[self.compute_dtype]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, compute_dtype: str | None = None) -> SDVAEConfig:
        """Resolve a diffusers `AutoencoderKL` config.json (a parsed dict).

        Missing options take diffusers' defaults; `_`-prefixed keys are
        metadata (`_class_name`, if given, must be `AutoencoderKL`). Unknown
        keys, malformed values and unsupported options raise `SDConfigError`
        naming the option and its value.
        """
        if not isinstance(data, Mapping):
            raise SDConfigError(f"a VAE config must be a JSON object, got {type(data).__name__}")
        name = data.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise SDConfigError(f"unsupported _class_name={name!r} (expected AutoencoderKL)")
        for key in data:
            if not isinstance(key, str):
                raise SDConfigError(f"config keys must be strings, got {key!r}")
            if not key.startswith("_") and key not in _DEFAULTS and key != "compute_dtype":
                raise SDConfigError(f"unknown AutoencoderKL option {key}={data[key]!r}")
        cfg = {**_DEFAULTS, **{k: v for k, v in data.items() if not k.startswith("_")}}
        for key, allowed in _ONLY.items():
            L.refuse_unless(key, cfg[key], allowed)
        chans = L.check_list("block_out_channels", cfg["block_out_channels"], L.check_int)
        for key, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            def check(k: str, v: Any, kind: str = kind) -> str:
                L.refuse_unless(k, v, (kind,))
                return v
            L.check_list(key, cfg[key], check, length=len(chans))
        sample_size = cfg["sample_size"]
        if isinstance(sample_size, list | tuple):
            sample_size = L.check_list("sample_size", sample_size, L.check_int, length=2)
        elif sample_size is not None:
            sample_size = L.check_int("sample_size", sample_size, 1, 1 << 20)
        dtype = compute_dtype or data.get("compute_dtype", "float32")
        return cls(
            block_out_channels=chans,
            layers_per_block=cfg["layers_per_block"],
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            latent_channels=cfg["latent_channels"],
            norm_num_groups=cfg["norm_num_groups"],
            scaling_factor=L.check_float(
                "scaling_factor", cfg["scaling_factor"], 0.0, 1e6, open_lo=True
            ),
            shift_factor=None if cfg["shift_factor"] is None
            else L.check_float("shift_factor", cfg["shift_factor"], -1e6, 1e6),
            use_quant_conv=cfg["use_quant_conv"],
            use_post_quant_conv=cfg["use_post_quant_conv"],
            mid_block_add_attention=cfg["mid_block_add_attention"],
            sample_size=sample_size,
            force_upcast=cfg["force_upcast"],
            compute_dtype=L.check_dtype(dtype),
        )

    def to_json(self) -> dict[str, Any]:
        """A diffusers-style config (plus `compute_dtype`) that `from_json` reads back
        (`shift_factor` only when set: Stable Diffusion's MODEL_DIRs keep their form)."""
        shift = {} if self.shift_factor is None else {"shift_factor": self.shift_factor}
        return {
            **shift,
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": [DOWN_BLOCK] * self.levels,
            "force_upcast": self.force_upcast,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": self.mid_block_add_attention,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple)
            else self.sample_size,
            "scaling_factor": self.scaling_factor,
            "up_block_types": [UP_BLOCK] * self.levels,
            "use_post_quant_conv": self.use_post_quant_conv,
            "use_quant_conv": self.use_quant_conv,
            "compute_dtype": self.compute_dtype,
        }


class VAEAttention(nn.Module):
    """diffusers `Attention` of the VAE mid block: group_norm, one head as wide as
    the channels, biased to_q/to_k/to_v/to_out.0, residual."""

    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = L.GroupNorm(self.groups, EPS, name="group_norm")(x).reshape(b, hh * ww, c)
        q = L.dense(c, "to_q", self.dtype)(h)
        k = L.dense(c, "to_k", self.dtype)(h)
        v = L.dense(c, "to_v", self.dtype)(h)
        a = L.dense(c, "to_out_0", self.dtype)(L.attention(q, k, v, 1, upcast=True))
        return a.reshape(b, hh, ww, c) + x


class MidBlock(nn.Module):
    """`UNetMidBlock2D` as the VAE builds it: resnet, (attention), resnet."""

    config: SDVAEConfig
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        c, g = cfg.block_out_channels[-1], cfg.norm_num_groups
        h = L.ResnetBlock2D(c, g, EPS, self.dtype, name="resnets_0")(h)
        if cfg.mid_block_add_attention:
            h = VAEAttention(g, self.dtype, name="attentions_0")(h)
        return L.ResnetBlock2D(c, g, EPS, self.dtype, name="resnets_1")(h)


class DownEncoderBlock2D(nn.Module):
    config: SDVAEConfig
    level: int
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        out = cfg.block_out_channels[self.level]
        for j in range(cfg.layers_per_block):
            h = L.ResnetBlock2D(out, cfg.norm_num_groups, EPS, self.dtype, name=f"resnets_{j}")(h)
        if self.level != cfg.levels - 1:
            h = L.Downsample2D(out, 0, self.dtype, name="downsamplers_0")(h)
        return h


class UpDecoderBlock2D(nn.Module):
    config: SDVAEConfig
    index: int
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        out = cfg.block_out_channels[cfg.levels - 1 - self.index]
        for j in range(cfg.layers_per_block + 1):
            h = L.ResnetBlock2D(out, cfg.norm_num_groups, EPS, self.dtype, name=f"resnets_{j}")(h)
        if self.index != cfg.levels - 1:
            h = L.Upsample2D(out, self.dtype, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    config: SDVAEConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = L.conv(cfg.block_out_channels[0], "conv_in", self.dtype)(x.astype(self.dtype))
        for i in range(cfg.levels):
            h = DownEncoderBlock2D(cfg, i, self.dtype, name=f"down_blocks_{i}")(h)
        h = MidBlock(cfg, self.dtype, name="mid_block")(h)
        h = L.GroupNorm(cfg.norm_num_groups, EPS, name="conv_norm_out")(h.astype(jnp.float32))
        return L.conv(2 * cfg.latent_channels, "conv_out", jnp.float32)(nn.silu(h))


class Decoder(nn.Module):
    config: SDVAEConfig
    dtype: Any

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        h = L.conv(cfg.block_out_channels[-1], "conv_in", self.dtype)(z.astype(self.dtype))
        h = MidBlock(cfg, self.dtype, name="mid_block")(h)
        for i in range(cfg.levels):
            h = UpDecoderBlock2D(cfg, i, self.dtype, name=f"up_blocks_{i}")(h)
        h = L.GroupNorm(cfg.norm_num_groups, EPS, name="conv_norm_out")(h.astype(jnp.float32))
        return L.conv(cfg.out_channels, "conv_out", jnp.float32)(nn.silu(h))


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`: `encode` images -> (mean, logvar), `decode` latents -> images."""

    config: SDVAEConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            c = 2 * cfg.latent_channels
            self.quant_conv = L.conv(c, None, jnp.float32, kernel=1)
        if cfg.use_post_quant_conv:
            c = cfg.latent_channels
            self.post_quant_conv = L.conv(c, None, self.dtype, kernel=1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        m = cfg.downsampling_factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be (B, H, W, {cfg.in_channels}), got {x.shape}")
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"image sides must be multiples of {m}, got {x.shape[1:3]}")
        moments = self.encoder(x)
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"latents must be (B, h, w, {cfg.latent_channels}), got {z.shape}")
        z = z.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Decode of the encoder mean (used to create every parameter at init)."""
        return self.decode(self.encode(x)[0])


def _resolve_dtype(config: SDVAEConfig, dtype: Any) -> Any:
    if dtype is None:
        return config.dtype
    if isinstance(dtype, str):
        return L.DTYPES[L.check_dtype(dtype)]
    return dtype


def vae_init(config: SDVAEConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh float32 parameters (Flax default initialisers; for shapes and tests only)."""
    m = config.downsampling_factor
    x = jnp.zeros((1, m, m, config.in_channels), jnp.float32)
    return AutoencoderKL(config).init(key, x)["params"]


def vae_encode(config: SDVAEConfig, params: Mapping[str, Any], images: jax.Array, *,
               dtype: Any = None) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each
    (B, H / f, W / f, latent_channels) float32, f = `config.downsampling_factor`.

    NOT multiplied by `scaling_factor`; logvar clamped to [-30, 20] as
    diffusers' `DiagonalGaussianDistribution` does (mode = mean).
    """
    model = AutoencoderKL(config, _resolve_dtype(config, dtype))
    return model.apply({"params": params}, images, method=AutoencoderKL.encode)


def vae_decode(config: SDVAEConfig, params: Mapping[str, Any], latents: jax.Array, *,
               dtype: Any = None) -> jax.Array:  # fmt: skip
    """latents (B, h, w, latent_channels), unscaled (divide sampler latents by
    `scaling_factor` first) -> images (B, f h, f w, out_channels) float32, not clamped."""
    model = AutoencoderKL(config, _resolve_dtype(config, dtype))
    return model.apply({"params": params}, latents, method=AutoencoderKL.decode)


@functools.lru_cache(maxsize=16)
def _abstract(config: SDVAEConfig) -> dict[str, Any]:
    return jax.eval_shape(lambda k: vae_init(config, k), jax.random.key(0))


def abstract_params(config: SDVAEConfig) -> dict[str, Any]:
    """Parameter tree of `config` as ShapeDtypeStructs (traced by jax.eval_shape: nothing allocated)."""
    return jax.tree.map(lambda s: s, _abstract(config))


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> diffusers state-dict key (see `_layers.torch_key`)."""
    return L.torch_key(path)


def state_dict_shapes(config: SDVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers state-dict key of `config` with its PyTorch shape."""
    return L.expected_state_dict_shapes(_abstract(config))


_LEGACY = re.compile(
    r"((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)"
)
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the VAE mid-block attention keys of diffusers < 0.15 files to current names.

    `{encoder,decoder}.mid_block.attentions.N.{query,key,value,proj_attn}.{weight,bias}`
    -> `... .{to_q,to_k,to_v,to_out.0}.{weight,bias}` (same shapes); every other
    key is kept. Arrays are not copied. A file holding both spellings of one
    parameter raises `SDStateDictError`.
    """
    out: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for key, value in state_dict.items():
        m = _LEGACY.fullmatch(key)
        new = f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}" if m else key
        if m:
            renamed[new] = key
        out[new] = value
    clashes = sorted(k for k in renamed if k in state_dict)
    if clashes:
        raise SDStateDictError(
            f"VAE state dict holds both legacy and current names for {len(clashes)} keys "
            f"({', '.join(clashes[:4])})"
        )
    return out


def params_from_state_dict(config: SDVAEConfig, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strict diffusers `AutoencoderKL` state dict (current key names: see
    `rename_legacy_keys`) -> Flax params (float32 NumPy).

    Every key used exactly once, every parameter filled, every shape checked,
    before any array is read; otherwise one `SDStateDictError` lists the
    missing, unexpected and mis-shaped keys (counts and the first few).
    """
    return L.convert_state_dict(_abstract(config), state_dict, "AutoencoderKL")
