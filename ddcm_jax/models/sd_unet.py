"""Stable Diffusion's denoiser, diffusers' `UNet2DConditionModel` (SD 1.x / 2.x), in Flax, NHWC.

The network follows diffusers' classes option for option (`CrossAttnDownBlock2D`,
`DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`,
`ResnetBlock2D`, `Transformer2DModel` with `BasicTransformerBlock`s, `Downsample2D`,
`Upsample2D`, `Timesteps` + `TimestepEmbedding`), so that converted diffusers
weights compute the same function. `SDUNetConfig.from_json` reads a diffusers
`unet/config.json` and refuses, in one line, every option it does not implement.

Names: every Flax module is named after its PyTorch attribute, a ModuleList
index appended as `_<i>` (`down_blocks_0/attentions_0/transformer_blocks_0/attn1/
to_out_0/kernel` is `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight`);
`torch_key` inverts that. Layouts: conv OIHW -> HWIO, Linear (out, in) -> (in, out);
`proj_in` / `proj_out` are 1x1 convs unless `use_linear_projection`.

Heads: diffusers' `attention_head_dim` is, for this class, the NUMBER of heads
per level (a historical misnomer: `num_attention_heads = num_attention_heads or
attention_head_dim`, and `num_attention_heads` itself must be None). SD 1.x's
`attention_head_dim: 8` means 8 heads (widths 40, 80, 160, 160); SD 2.x's
`[5, 10, 20, 20]` means heads of width 64. `SDUNetConfig.num_attention_heads`
holds the resolved head counts.

Precision: `compute_dtype` (or `dtype=` at the call) sets the dtype of the
convolutions and linear layers of the torso; GroupNorm / LayerNorm and the
attention scores and softmax are float32, the timestep embedding MLP and the
resnets' time projections are float32, `conv_norm_out` / `conv_out` run in
float32. Parameters are always float32. For float32 parity with PyTorch on
GPU, run under `jax.default_matmul_precision("highest")` (TF32 is ~1e-3 off).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.models import _layers as L
from ddcm_jax.models._layers import SDConfigError, SDStateDictError

__all__ = [
    "SDConfigError",
    "SDStateDictError",
    "SDUNet",
    "SDUNetConfig",
    "abstract_params",
    "params_from_state_dict",
    "sd_unet_apply",
    "sd_unet_init",
    "state_dict_shapes",
    "timestep_embedding",
    "torch_key",
]

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_BLOCK = "UNetMidBlock2DCrossAttn"
MAX_HEADS = 1024

# diffusers 0.42 `UNet2DConditionModel.__init__` defaults: a config.json omits
# any of these and means the default (the released SD configs omit many).
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN],
    "mid_block_type": MID_BLOCK,
    "up_block_types": [PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Options that select parts this port does not implement: the values allowed.
_ONLY: dict[str, tuple[Any, ...]] = {
    "mid_block_type": (MID_BLOCK,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu", "swish"),
}


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
    """Architecture of a diffusers `UNet2DConditionModel` (SD 1.x / 2.x family), resolved.

    Per-level values are tuples (one entry per `block_out_channels` level);
    `num_attention_heads[i]` is the number of heads at level i (what diffusers
    reads from `attention_head_dim`). `sample_size` is informational.
    Construct from a diffusers `config.json` with `from_json`.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 1280
    in_channels: int = 4
    out_channels: int = 4
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    sample_size: int | tuple[int, int] | None = None
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        chans = L.check_list("block_out_channels", list(self.block_out_channels), L.check_int)
        n = len(chans)

        def levels(name: str, value: Any, check: Any) -> None:
            L.check_list(name, list(value), check, length=n)

        def kind(allowed: tuple[str, ...]) -> Any:
            def check(name: str, v: Any) -> str:
                L.refuse_unless(name, v, allowed)
                return v
            return check

        levels("down_block_types", self.down_block_types, kind((CROSS_DOWN, PLAIN_DOWN)))
        levels("up_block_types", self.up_block_types, kind((PLAIN_UP, CROSS_UP)))
        levels("layers_per_block", self.layers_per_block,
               lambda k, v: L.check_int(k, v, 1, L.MAX_LAYERS))  # fmt: skip
        levels("transformer_layers_per_block", self.transformer_layers_per_block,
               lambda k, v: L.check_int(k, v, 1, L.MAX_LAYERS))  # fmt: skip
        levels("num_attention_heads", self.num_attention_heads,
               lambda k, v: L.check_int(k, v, 1, MAX_HEADS))  # fmt: skip
        L.check_int("cross_attention_dim", self.cross_attention_dim)
        L.check_int("in_channels", self.in_channels)
        L.check_int("out_channels", self.out_channels)
        L.check_bool("use_linear_projection", self.use_linear_projection)
        L.check_bool("upcast_attention", self.upcast_attention)
        groups = L.check_int("norm_num_groups", self.norm_num_groups, 1, 1024)
        L.check_float("norm_eps", self.norm_eps, 0.0, 1.0, open_lo=True)
        L.check_bool("flip_sin_to_cos", self.flip_sin_to_cos)
        L.check_float("freq_shift", self.freq_shift, -1e6, 1e6)
        if chans[0] // 2 == self.freq_shift:
            raise SDConfigError(
                f"freq_shift={self.freq_shift!r} equals half of block_out_channels[0]: "
                "the timestep frequencies divide by zero"
            )
        L.refuse_unless("downsample_padding", self.downsample_padding, (0, 1))
        L.check_float("mid_block_scale_factor", self.mid_block_scale_factor, 0.0, 1e6,
                      open_lo=True)  # fmt: skip
        L.check_bool("center_input_sample", self.center_input_sample)
        if self.time_embedding_dim is not None:
            L.check_int("time_embedding_dim", self.time_embedding_dim, 1, 4 * L.MAX_CHANNELS)
        L.check_dtype(self.compute_dtype)
        for i, c in enumerate(chans):
            if c % groups:
                raise SDConfigError(
                    f"block_out_channels[{i}]={c} is not divisible by norm_num_groups={groups}"
                )
        for i, c in enumerate(chans):
            heads = self.num_attention_heads[i]
            used = (self.down_block_types[i] == CROSS_DOWN or i == n - 1
                    or self.up_block_types[n - 1 - i] == CROSS_UP)  # fmt: skip
            if used and c % heads:
                raise SDConfigError(
                    f"block_out_channels[{i}]={c} is not divisible by its {heads} attention "
                    "heads (attention_head_dim)"
                )

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def size_multiple(self) -> int:
        """Latent sides must be divisible by this (one halving per extra level)."""
        return 2 ** (self.levels - 1)

    @property
    def dtype(self) -> Any:
        return L.DTYPES[self.compute_dtype]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, compute_dtype: str | None = None) -> SDUNetConfig:
        """Resolve a diffusers `UNet2DConditionModel` config.json (a parsed dict).

        Missing options take diffusers' defaults; keys starting with `_` are
        metadata (`_class_name`, if given, must be `UNet2DConditionModel`);
        `compute_dtype` (this port's own key, as `to_json` writes it) or the
        keyword picks the compute dtype. Unknown keys, malformed values and
        options this port does not implement raise `SDConfigError` (a
        ValueError) naming the option and its value. `dropout`,
        `resnet_skip_time_act`, `resnet_out_scale_factor` and
        `addition_embed_type_num_heads` are validated and ignored: they do
        not change what these block types compute at inference.
        """
        if not isinstance(data, Mapping):
            raise SDConfigError(f"a UNet config must be a JSON object, got {type(data).__name__}")
        name = data.get("_class_name", "UNet2DConditionModel")
        if name != "UNet2DConditionModel":
            raise SDConfigError(f"unsupported _class_name={name!r} (expected UNet2DConditionModel)")
        for key in data:
            if not isinstance(key, str):
                raise SDConfigError(f"config keys must be strings, got {key!r}")
            if not key.startswith("_") and key not in _DEFAULTS and key != "compute_dtype":
                raise SDConfigError(f"unknown UNet2DConditionModel option {key}={data[key]!r}")
        cfg = {**_DEFAULTS, **{k: v for k, v in data.items() if not k.startswith("_")}}
        for key, allowed in _ONLY.items():
            L.refuse_unless(key, cfg[key], allowed)
        oca = cfg["only_cross_attention"]
        if isinstance(oca, list | tuple):
            for i, v in enumerate(oca):
                L.refuse_unless(f"only_cross_attention[{i}]", v, (False,))
        else:
            L.refuse_unless("only_cross_attention", oca, (False,))
        L.check_float("dropout", cfg["dropout"], 0.0, 1.0)
        L.check_bool("resnet_skip_time_act", cfg["resnet_skip_time_act"])
        L.check_float("resnet_out_scale_factor", cfg["resnet_out_scale_factor"], 0.0, 1e6,
                      open_lo=True)  # fmt: skip
        L.check_int("addition_embed_type_num_heads", cfg["addition_embed_type_num_heads"], 1,
                    MAX_HEADS)  # fmt: skip

        chans = L.check_list("block_out_channels", cfg["block_out_channels"], L.check_int)
        n = len(chans)
        for key in ("down_block_types", "up_block_types"):
            L.check_list(key, cfg[key], lambda k, v: v, length=n)
        layers = L.per_level("layers_per_block", cfg["layers_per_block"], n,
                             lambda k, v: L.check_int(k, v, 1, L.MAX_LAYERS))  # fmt: skip
        tlayers = cfg["transformer_layers_per_block"]
        if isinstance(tlayers, list | tuple) and any(isinstance(v, list | tuple) for v in tlayers):
            raise SDConfigError(
                f"unsupported transformer_layers_per_block={tlayers!r} (nested lists: an "
                "asymmetric UNet)"
            )
        tlayers = L.per_level("transformer_layers_per_block", tlayers, n,
                              lambda k, v: L.check_int(k, v, 1, L.MAX_LAYERS))  # fmt: skip
        # diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        heads = L.per_level("attention_head_dim", cfg["attention_head_dim"], n,
                            lambda k, v: L.check_int(k, v, 1, MAX_HEADS))  # fmt: skip
        cross = L.per_level("cross_attention_dim", cfg["cross_attention_dim"], n, L.check_int)
        if len(set(cross)) != 1:
            raise SDConfigError(
                f"unsupported cross_attention_dim={cfg['cross_attention_dim']!r} (one width "
                "for every level only)"
            )
        sample_size = cfg["sample_size"]
        if isinstance(sample_size, list | tuple):
            sample_size = L.check_list("sample_size", sample_size, L.check_int, length=2)
        elif sample_size is not None:
            sample_size = L.check_int("sample_size", sample_size, 1, 1 << 20)
        dtype = compute_dtype or data.get("compute_dtype", "float32")
        return cls(
            block_out_channels=chans,
            down_block_types=tuple(cfg["down_block_types"]),
            up_block_types=tuple(cfg["up_block_types"]),
            layers_per_block=layers,
            transformer_layers_per_block=tlayers,
            num_attention_heads=heads,
            cross_attention_dim=cross[0],
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            use_linear_projection=cfg["use_linear_projection"],
            upcast_attention=cfg["upcast_attention"],
            norm_num_groups=cfg["norm_num_groups"],
            norm_eps=cfg["norm_eps"],
            flip_sin_to_cos=cfg["flip_sin_to_cos"],
            freq_shift=L.check_float("freq_shift", cfg["freq_shift"], -1e6, 1e6),
            downsample_padding=cfg["downsample_padding"],
            mid_block_scale_factor=L.check_float(
                "mid_block_scale_factor", cfg["mid_block_scale_factor"], 0.0, 1e6, open_lo=True
            ),
            center_input_sample=cfg["center_input_sample"],
            time_embedding_dim=cfg["time_embedding_dim"],
            sample_size=sample_size,
            compute_dtype=L.check_dtype(dtype),
        )

    def to_json(self) -> dict[str, Any]:
        """A diffusers-style config (plus `compute_dtype`) that `from_json` reads back."""
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": list(self.num_attention_heads),
            "block_out_channels": list(self.block_out_channels),
            "center_input_sample": self.center_input_sample,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": list(self.down_block_types),
            "downsample_padding": self.downsample_padding,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "in_channels": self.in_channels,
            "layers_per_block": list(self.layers_per_block),
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "mid_block_type": MID_BLOCK,
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple)
            else self.sample_size,
            "time_embedding_dim": self.time_embedding_dim,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "up_block_types": list(self.up_block_types),
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection,
            "compute_dtype": self.compute_dtype,
        }


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:  # fmt: skip
    """diffusers `get_timestep_embedding`: (N,) -> (N, dim) float32.

    f_i = exp(-ln(P) i / (dim // 2 - freq_shift)); [sin(t f), cos(t f)], or
    [cos, sin] with `flip_sin_to_cos`; a zero column pads an odd `dim`. The
    frequencies are float32 constants computed the way PyTorch computes them.
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> silu -> linear_2, in float32."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = L.dense(self.features, "linear_1", jnp.float32)(x)
        return L.dense(self.features, "linear_2", jnp.float32)(nn.silu(x))


class Attention(nn.Module):
    """diffusers `Attention` as `BasicTransformerBlock` builds it: to_q/to_k/to_v
    without bias, `to_out.0` with bias; keys and values from `context`."""

    heads: int
    upcast: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        c = x.shape[-1]
        q = L.dense(c, "to_q", self.dtype, use_bias=False)(x)
        k = L.dense(c, "to_k", self.dtype, use_bias=False)(context)
        v = L.dense(c, "to_v", self.dtype, use_bias=False)(context)
        a = L.attention(q, k, v, self.heads, upcast=self.upcast)
        return L.dense(c, "to_out_0", self.dtype)(a)


class GEGLU(nn.Module):
    """diffusers `GEGLU`: proj to 2 * inner, first half times exact gelu of the second."""

    inner: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(L.dense(2 * self.inner, "proj", self.dtype)(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu", mult=4)`: net.0 GEGLU, net.2 Linear."""

    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = GEGLU(4 * c, self.dtype, name="net_0")(x)
        return L.dense(c, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """norm1 + self-attention, norm2 + cross-attention, norm3 + GEGLU feed-forward, each residual."""

    heads: int
    upcast: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        h = L.LayerNorm(1e-5, name="norm1")(x)
        x = x + Attention(self.heads, self.upcast, self.dtype, name="attn1")(h, h)
        h = L.LayerNorm(1e-5, name="norm2")(x)
        x = x + Attention(self.heads, self.upcast, self.dtype, name="attn2")(h, context)
        h = L.LayerNorm(1e-5, name="norm3")(x)
        return x + FeedForward(self.dtype, name="ff")(h)


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous input: GroupNorm (eps 1e-6),
    proj_in, `layers` transformer blocks, proj_out, plus the input."""

    heads: int
    layers: int
    config: SDUNetConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        b, hh, ww, c = x.shape
        h = L.GroupNorm(cfg.norm_num_groups, 1e-6, name="norm")(x)
        if cfg.use_linear_projection:
            h = L.dense(c, "proj_in", self.dtype)(h.reshape(b, hh * ww, c))
        else:
            h = L.conv(c, "proj_in", self.dtype, kernel=1)(h).reshape(b, hh * ww, c)
        for i in range(self.layers):
            h = BasicTransformerBlock(self.heads, cfg.upcast_attention, self.dtype,
                                      name=f"transformer_blocks_{i}")(h, context)  # fmt: skip
        if cfg.use_linear_projection:
            h = L.dense(c, "proj_out", self.dtype)(h).reshape(b, hh, ww, c)
        else:
            h = L.conv(c, "proj_out", self.dtype, kernel=1)(h.reshape(b, hh, ww, c))
        return h + x


def _resnet(cfg: SDUNetConfig, out: int, dtype: Any, name: str, scale: float = 1.0) -> Any:
    return L.ResnetBlock2D(out, cfg.norm_num_groups, cfg.norm_eps, dtype, scale, name=name)


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (`cross`) or `DownBlock2D` at one level; returns (h, skips)."""

    config: SDUNetConfig
    level: int
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array,
                 context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:  # fmt: skip
        cfg, i = self.config, self.level
        out = cfg.block_out_channels[i]
        cross = cfg.down_block_types[i] == CROSS_DOWN
        skips = []
        for j in range(cfg.layers_per_block[i]):
            h = _resnet(cfg, out, self.dtype, f"resnets_{j}")(h, emb)
            if cross:
                h = Transformer2DModel(cfg.num_attention_heads[i],
                                       cfg.transformer_layers_per_block[i], cfg, self.dtype,
                                       name=f"attentions_{j}")(h, context)  # fmt: skip
            skips.append(h)
        if i != cfg.levels - 1:
            h = L.Downsample2D(out, cfg.downsample_padding, self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, transformer, resnet (output scale from the config)."""

    config: SDUNetConfig
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        c, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
        h = _resnet(cfg, c, self.dtype, "resnets_0", scale)(h, emb)
        h = Transformer2DModel(cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                               cfg, self.dtype, name="attentions_0")(h, context)  # fmt: skip
        return _resnet(cfg, c, self.dtype, "resnets_1", scale)(h, emb)


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D`: up block `index` (level `levels - 1 - index`)."""

    config: SDUNetConfig
    index: int
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, skips: Sequence[jax.Array], emb: jax.Array,
                 context: jax.Array) -> jax.Array:  # fmt: skip
        """`skips`: this block's skip connections, consumed from the last."""
        cfg = self.config
        level = cfg.levels - 1 - self.index
        out = cfg.block_out_channels[level]
        cross = cfg.up_block_types[self.index] == CROSS_UP
        for j in range(cfg.layers_per_block[level] + 1):
            h = jnp.concatenate([h, skips[-1 - j]], axis=-1)
            h = _resnet(cfg, out, self.dtype, f"resnets_{j}")(h, emb)
            if cross:
                h = Transformer2DModel(cfg.num_attention_heads[level],
                                       cfg.transformer_layers_per_block[level], cfg, self.dtype,
                                       name=f"attentions_{j}")(h, context)  # fmt: skip
        if level != 0:
            h = L.Upsample2D(out, self.dtype, name="upsamplers_0")(h)
        return h


class SDUNet(nn.Module):
    """`UNet2DConditionModel`: x (B, h, w, C_in), t (B,), context (B, L, D) -> (B, h, w, C_out)."""

    config: SDUNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be (B, h, w, {cfg.in_channels}), got {x.shape}")
        m = cfg.size_multiple
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"latent sides must be multiples of {m}, got {x.shape[1:3]}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] \
                or context.shape[-1] != cfg.cross_attention_dim:  # fmt: skip
            raise ValueError(
                f"context must be ({x.shape[0]}, L, {cfg.cross_attention_dim}), got {context.shape}"
            )
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        c0 = cfg.block_out_channels[0]
        emb = timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding")(emb)
        context = context.astype(dtype)

        h = L.conv(c0, "conv_in", dtype)(x.astype(dtype))
        skips = [h]
        for i in range(cfg.levels):
            h, res = DownBlock(cfg, i, dtype, name=f"down_blocks_{i}")(h, emb, context)
            skips.extend(res)
        h = MidBlock(cfg, dtype, name="mid_block")(h, emb, context)
        for i in range(cfg.levels):
            n = cfg.layers_per_block[cfg.levels - 1 - i] + 1
            skips, res = skips[:-n], tuple(skips[-n:])
            h = UpBlock(cfg, i, dtype, name=f"up_blocks_{i}")(h, res, emb, context)
        h = L.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(
            h.astype(jnp.float32)
        )
        return L.conv(cfg.out_channels, "conv_out", jnp.float32)(nn.silu(h))


def _resolve_dtype(config: SDUNetConfig, dtype: Any) -> Any:
    if dtype is None:
        return config.dtype
    if isinstance(dtype, str):
        return L.DTYPES[L.check_dtype(dtype)]
    return dtype


def sd_unet_init(config: SDUNetConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh float32 parameters (Flax default initialisers; for shapes and tests only)."""
    m = config.size_multiple
    x = jnp.zeros((1, m, m, config.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    ctx = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    return SDUNet(config).init(key, x, t, ctx)["params"]


def sd_unet_apply(
    config: SDUNetConfig,
    params: Mapping[str, Any],
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    *,
    dtype: Any = None,
) -> jax.Array:
    """Raw UNet output (B, h, w, out_channels) float32 (epsilon or v, as trained).

    x (B, h, w, in_channels) NHWC latents, sides multiples of
    `config.size_multiple`; t (B,) or () integer or float timesteps;
    context (B, L, cross_attention_dim) text embeddings. `dtype` (a name or
    jnp dtype) overrides `config.compute_dtype`.
    """
    model = SDUNet(config, _resolve_dtype(config, dtype))
    return model.apply({"params": params}, x, t, context)


@functools.lru_cache(maxsize=16)
def _abstract(config: SDUNetConfig) -> dict[str, Any]:
    return jax.eval_shape(lambda k: sd_unet_init(config, k), jax.random.key(0))


def abstract_params(config: SDUNetConfig) -> dict[str, Any]:
    """Parameter tree of `config` as ShapeDtypeStructs (traced by jax.eval_shape: nothing allocated)."""
    return jax.tree.map(lambda s: s, _abstract(config))


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> diffusers state-dict key (see `_layers.torch_key`)."""
    return L.torch_key(path)


def state_dict_shapes(config: SDUNetConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers state-dict key of `config` with its PyTorch shape."""
    return L.expected_state_dict_shapes(_abstract(config))


def params_from_state_dict(config: SDUNetConfig, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strict diffusers `UNet2DConditionModel` state dict -> Flax params (float32 NumPy).

    Every key used exactly once, every parameter filled, every shape checked,
    before any array is read; otherwise one `SDStateDictError` lists the
    missing, unexpected and mis-shaped keys (counts and the first few).
    """
    return L.convert_state_dict(_abstract(config), state_dict, "UNet2DConditionModel")
