"""FLUX's denoiser, diffusers' `FluxTransformer2DModel` (FLUX.1-dev / -schnell), in Flax.

The network follows diffusers 0.42 class for class, so that a converted diffusers state dict
computes the same function:

* conditioning: timestep (and guidance) * 1000 in float32, 256-channel sinusoidal embedding
  (`flip_sin_to_cos`, no frequency shift), `timestep_embedder` (+ `guidance_embedder` when
  `guidance_embeds`) + `text_embedder(pooled_projections)`
  (`CombinedTimestepGuidanceTextProjEmbeddings` / `CombinedTimestepTextProjEmbeddings`);
* `x_embedder` / `context_embedder`: Linear maps of the packed latent tokens and the T5 states;
* `num_layers` double-stream `FluxTransformerBlock`s: one `AdaLayerNormZero` per stream, joint
  attention over cat(text, image) with per-head RMSNorm (eps 1e-6) on q and k, tanh-GELU
  feed-forwards;
* `num_single_layers` single-stream `FluxSingleTransformerBlock`s on cat(text, image):
  `AdaLayerNormZeroSingle`, attention and MLP in parallel, one `proj_out` over cat(attn, mlp);
* `norm_out` (`AdaLayerNormContinuous`, whose Linear gives (scale, shift) in THAT order, unlike
  the AdaLayerNormZero chunks, which start with shift) and `proj_out`, image tokens only.

Tokens, not images: inputs are (B, N, in_channels) packed latents (see the fixtures README for
the packing), so the NHWC rule of the UNet ports does not arise.

Rotary positions: ids = cat(txt_ids, img_ids) (S, n_axes); axis i owns `axes_dims_rope[i]`
channels of every head, with angles pos * 10000^(-2j / d_i) rotating the interleaved pairs
(x[2j], x[2j+1]). diffusers computes the angles in float64 and rounds cos/sin to float32. JAX
runs without float64 by default, so `rope_tables` computes them with NumPy float64 on the host
whenever the ids are concrete (the usual case: they depend only on the image size), exactly as
diffusers does. Under an outer `jit` that traces the ids it falls back to float32 with the
frequencies split into a 12-bit head and a float32 tail: pos * head is exact for integer
positions below 4096, and cos/sin of the sum come from the angle-addition formula. Measured on
FLUX.1-dev's axes with 512 text + up to 128 x 128 image positions, those tables are within 6e-8
(one float32 rounding) of the float64 ones, where a plain float32 product is 2.2e-6 off at a
64 x 64 grid and 6.5e-6 at 128 x 128 (`tests/test_flux_transformer.py` checks the 1e-7 bound).
With `jax_enable_x64` the traced path is float64.

Names: Flax modules are named after diffusers' attributes, a ModuleList index appended as `_<i>`
(`transformer_blocks_3/attn/to_out_0/kernel` is `transformer_blocks.3.attn.to_out.0.weight`),
the rule of `_layers.torch_key`. Layouts: Linear (out, in) -> kernel (in, out); RMSNorm weights
and biases as they are. This is diffusers' layout (the `transformer/` folder of the released
repositories), not BFL's single-file names (`double_blocks.N.img_attn.qkv`, ...).

Precision: parameters are float32. `compute_dtype` sets the dtype of the torso's Linear layers
and attention products; the residual streams stay float32 (cheaper than any of those products,
and closer to the float32 model than diffusers' own all-bfloat16 path), LayerNorm / RMSNorm,
rotary rotation and softmax are float32, and the conditioning path (time / guidance / pooled
text embedders), `norm_out` and `proj_out` run in float32. Float32 matmuls ask for
`Precision.HIGHEST`, so a GPU does not silently use TF32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.jit import jit
from ddcm_jax.models import _layers as L

__all__ = [
    "FluxConfigError",
    "FluxStateDictError",
    "FluxTransformer",
    "FluxTransformerConfig",
    "abstract_params",
    "flux_init",
    "flux_transformer_apply",
    "param_count",
    "params_from_state_dict",
    "plan_state_dict",
    "rope_tables",
    "to_flax",
    "torch_key",
]

CLASS_NAME = "FluxTransformer2DModel"
ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000), fixed in diffusers
TIME_CHANNELS = 256  # Timesteps(num_channels=256) of the conditioning embedders
MLP_RATIO = 4  # FeedForward mult and FluxSingleTransformerBlock mlp_ratio (int(dim * 4.0))
NORM_EPS = 1e-6  # every LayerNorm and the q/k RMSNorms of both block kinds

# Upper bounds for an untrusted config.json (far above any released FLUX).
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_INNER = 1 << 16
MAX_AXES = 8
# Integer positions below this make pos * (12-bit frequency head) exact in float32.
_HEAD_BITS = 12

# diffusers 0.42 `FluxTransformer2DModel.__init__` defaults: a config.json may omit any of them.
_DEFAULTS: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}


def _short(value: Any) -> str:
    """repr of an untrusted value, cut to keep an error message on one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class FluxConfigError(ValueError):
    """A config.json value that is malformed or names an option this port does not implement."""


class FluxStateDictError(ValueError):
    """A state dict that does not map one-to-one, shape for shape, onto the parameters.

    `missing`, `unexpected`, `misshaped` and `mistyped` hold every offending key; the message
    gives the counts and the first few of each, on one line.
    """

    def __init__(self, missing: Sequence[str] | str = (), unexpected: Sequence[str] = (),
                 misshaped: Sequence[str] = (), mistyped: Sequence[str] = ()):  # fmt: skip
        if isinstance(missing, str):  # a plain message
            self.missing, self.unexpected, self.misshaped, self.mistyped = [], [], [], []
            super().__init__(missing)
            return
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.misshaped, self.mistyped = list(misshaped), list(mistyped)
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("mis-shaped", self.misshaped),
                            ("not floating point", self.mistyped)):  # fmt: skip
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__(f"{CLASS_NAME} state dict does not match the config: " + "; ".join(parts))


@contextlib.contextmanager
def _flux_errors() -> Iterator[None]:
    # The shared validators raise SDConfigError; callers of this module catch FluxConfigError.
    try:
        yield
    except L.SDConfigError as e:
        raise FluxConfigError(f"{CLASS_NAME} config: {e}") from None


@dataclasses.dataclass(frozen=True)
class FluxTransformerConfig:
    """Architecture of a diffusers `FluxTransformer2DModel` (defaults: diffusers', FLUX.1-schnell).

    `out_channels` None means `in_channels` (resolved on construction, so equal configs hash
    equal); `compute_dtype` is this port's own option. Hashable: it is a static jit argument.
    Construct from a diffusers `config.json` with `from_json`.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:  # normalised (plain int / bool / tuple) values
            object.__setattr__(self, name, value)

        with _flux_errors():
            # diffusers' x_embedder never patchifies: patch_size only widens proj_out to
            # patch_size^2 * out_channels, which the pipelines never use. Refused.
            L.refuse_unless("patch_size", self.patch_size, (1,))
            put("in_channels", L.check_int("in_channels", self.in_channels))
            if self.out_channels is None:  # diffusers: out_channels or in_channels
                put("out_channels", self.in_channels)
            else:
                put("out_channels", L.check_int("out_channels", self.out_channels))
            put("num_layers", L.check_int("num_layers", self.num_layers, 0, MAX_LAYERS))
            put("num_single_layers",
                L.check_int("num_single_layers", self.num_single_layers, 0, MAX_LAYERS))  # fmt: skip
            d = L.check_int("attention_head_dim", self.attention_head_dim, 2, MAX_HEAD_DIM)
            h = L.check_int("num_attention_heads", self.num_attention_heads, 1, MAX_HEADS)
            put("attention_head_dim", d)
            put("num_attention_heads", h)
            put("joint_attention_dim", L.check_int("joint_attention_dim", self.joint_attention_dim))
            put("pooled_projection_dim",
                L.check_int("pooled_projection_dim", self.pooled_projection_dim))  # fmt: skip
            put("guidance_embeds", L.check_bool("guidance_embeds", self.guidance_embeds))
            axes = L.check_list("axes_dims_rope", self.axes_dims_rope,
                                lambda k, v: L.check_int(k, v, 2, MAX_HEAD_DIM),
                                max_len=MAX_AXES)  # fmt: skip
            put("axes_dims_rope", axes)
            put("compute_dtype", L.check_dtype(self.compute_dtype))
        if h * d > MAX_INNER:
            raise FluxConfigError(
                f"{CLASS_NAME} config: num_attention_heads * attention_head_dim = {h * d} "
                f"exceeds {MAX_INNER}"
            )
        for i, a in enumerate(axes):
            if a % 2:  # get_1d_rotary_pos_embed asserts an even width
                raise FluxConfigError(
                    f"{CLASS_NAME} config: axes_dims_rope[{i}]={a} is odd (rotary pairs need "
                    f"even widths): axes_dims_rope={list(axes)}"
                )
        if sum(axes) != d:  # the rotary tables must cover every channel of a head
            raise FluxConfigError(
                f"{CLASS_NAME} config: axes_dims_rope={list(axes)} sums to {sum(axes)}, "
                f"not attention_head_dim={d}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the token streams: num_attention_heads * attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return MLP_RATIO * self.inner_dim

    @property
    def n_axes(self) -> int:
        """Columns of txt_ids / img_ids (3 for every released FLUX)."""
        return len(self.axes_dims_rope)

    @property
    def dtype(self) -> Any:
        return L.DTYPES[self.compute_dtype]

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *,
                  compute_dtype: str | None = None) -> FluxTransformerConfig:  # fmt: skip
        """Validate a diffusers `transformer/config.json` (a parsed, untrusted dict).

        Missing options take diffusers' defaults; keys starting with `_` are metadata
        (`_class_name`, if given, must be `FluxTransformer2DModel`); `compute_dtype` (this port's
        key, as `to_json` writes it) or the keyword picks the compute dtype. Unknown keys,
        malformed values and options this port does not implement raise `FluxConfigError`
        naming the option and its value in one line.
        """
        if not isinstance(data, Mapping):
            raise FluxConfigError(
                f"a {CLASS_NAME} config must be a JSON object, got {type(data).__name__}"
            )
        name = data.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise FluxConfigError(f"unsupported _class_name={_short(name)} (expected {CLASS_NAME})")
        for key in data:
            if not isinstance(key, str):
                raise FluxConfigError(f"{CLASS_NAME} config keys must be strings, got {_short(key)}")
            if not key.startswith("_") and key not in _DEFAULTS and key != "compute_dtype":
                raise FluxConfigError(f"unknown {CLASS_NAME} option {key}={_short(data[key])}")
        cfg = {**_DEFAULTS, **{k: v for k, v in data.items() if k in _DEFAULTS}}
        if not isinstance(cfg["axes_dims_rope"], list | tuple):
            raise FluxConfigError(
                f"{CLASS_NAME} config: axes_dims_rope must be a list, got "
                f"{_short(cfg['axes_dims_rope'])}"
            )
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
        dtype = compute_dtype if compute_dtype is not None else data.get("compute_dtype", "float32")
        return cls(**cfg, compute_dtype=dtype)

    def to_json(self) -> dict[str, Any]:
        """A diffusers-style config (plus `compute_dtype`) that `from_json` reads back."""
        return {
            "_class_name": CLASS_NAME,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": list(self.axes_dims_rope),
            "compute_dtype": self.compute_dtype,
        }


# --------------------------------------------------------------------------- layers


def _precision(dtype: Any) -> jax.lax.Precision:
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    """`nn.Linear(in, features)` (every FLUX Linear has a bias); kernel stored (in, out)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    precision=_precision(dtype), name=name)  # fmt: skip


def _layer_norm(x: jax.Array) -> jax.Array:
    """`nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)` in float32 (two-pass variance)."""
    h = x.astype(jnp.float32)
    mean = h.mean(axis=-1, keepdims=True)
    var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + NORM_EPS)


def _modulate(h: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """h (B, S, C) * (1 + scale) + shift, scale and shift (B, C) per sample."""
    return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
    """`torch.nn.RMSNorm(d, eps=1e-6)` over the last axis (a head), computed in float32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(axis=-1, keepdims=True) + NORM_EPS)
        return (h * scale.reshape((1,) * (h.ndim - 1) + (d,))).astype(x.dtype)


class Modulation(nn.Module):
    """The `linear(silu(temb))` of the AdaLN layers, cut into `chunks` (B, C) float32 pieces.

    `AdaLayerNormZero`: 6 (shift, scale, gate for attention, then for the MLP);
    `AdaLayerNormZeroSingle`: 3 (shift, scale, gate); `AdaLayerNormContinuous`: 2 (scale, shift).
    """

    chunks: int
    dtype: Any

    @nn.compact
    def __call__(self, temb: jax.Array) -> list[jax.Array]:
        c = temb.shape[-1]
        e = _dense(self.chunks * c, "linear", self.dtype)(nn.silu(temb).astype(self.dtype))
        return jnp.split(e.astype(jnp.float32), self.chunks, axis=-1)


def _time_freqs(dim: int) -> np.ndarray:
    """The float32 frequencies of diffusers `get_timestep_embedding(dim, shift 0)`.

    diffusers: exp(float32(-ln 10000) * arange(half) / half), all float32. The exponent is
    formed the same way; the exp is evaluated in float64 and rounded once, i.e. correctly
    rounded. PyTorch's float32 exp is within 1 ulp of that (it differs in 2 of the 128 entries);
    NumPy's float32 exp differs in 53, and at t * 1000 ~ 1000 one ulp of a frequency moves the
    angle by ~6e-5: with NumPy's exp the flux_tiny output was 8e-5 off the reference, with this
    one 1.7e-5 (PyTorch itself, rerun on another CPU, is 2e-5 off it).
    """
    half = dim // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)
    exponent = (exponent / np.float32(half)).astype(np.float32)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = TIME_CHANNELS) -> jax.Array:
    """diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: (B,) -> (B, dim).

    [cos(t f), sin(t f)] with the float32 product t * f, as PyTorch forms it.
    """
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(_time_freqs(dim))[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """`TimestepEmbedding` / `PixArtAlphaTextProjection(act_fn="silu")`: linear_1, silu, linear_2.

    Both compute the same function with the same attribute names; float32 throughout.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.features, "linear_1", jnp.float32)(x.astype(jnp.float32))
        return _dense(self.features, "linear_2", jnp.float32)(nn.silu(h))


class TimeTextEmbed(nn.Module):
    """`CombinedTimestep(Guidance)TextProjEmbeddings`: (B,) t, (B,) g or None, (B, P) -> (B, C)."""

    config: FluxTransformerConfig

    @nn.compact
    def __call__(self, timestep: jax.Array, guidance: jax.Array | None,
                 pooled: jax.Array) -> jax.Array:  # fmt: skip
        c = self.config.inner_dim
        t = timestep_embedding(timestep)
        emb = MLPEmbedder(c, name="timestep_embedder")(t)
        if self.config.guidance_embeds:
            g = timestep_embedding(guidance)
            emb = emb + MLPEmbedder(c, name="guidance_embedder")(g)
        return emb + MLPEmbedder(c, name="text_embedder")(pooled)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """diffusers `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`, in float32.

    x (B, S, H, d); cos, sin (S, d) with each angle repeated for its pair. Pair j is
    (x[2j], x[2j+1]) -> (x[2j] cos - x[2j+1] sin, x[2j+1] cos + x[2j] sin).
    """
    h = x.astype(jnp.float32)
    pairs = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(h.shape)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (h * c + rotated * s).astype(x.dtype)


def _sdpa(q: jax.Array, k: jax.Array, v: jax.Array, dtype: Any) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for (B, S, H, d) inputs, scores and softmax in float32.

    Queries go through `_layers.by_query_blocks` (256 at a time for long, divisible sequences:
    the same numbers, a smaller live score matrix; FLUX at 1024 px has 512 + 4096 tokens).
    """
    precision = _precision(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])

    # Head-major (B, H, S, d): both products plain batched matmuls (`_layers.heads_first`).
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))

    def core(qb: jax.Array) -> jax.Array:
        s = jnp.einsum("bhqd,bhkd->bhqk", qb, k, precision=precision,
                       preferred_element_type=jnp.float32)  # fmt: skip
        w = jax.nn.softmax(s * scale, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", w, v, precision=precision)

    return L.by_query_blocks(core, q, axis=2).transpose(0, 2, 1, 3)


class FluxAttention(nn.Module):
    """diffusers `FluxAttention` with `FluxAttnProcessor`.

    Joint (double-stream, `context` given): image q/k/v by to_q/to_k/to_v, text q/k/v by
    add_{q,k,v}_proj, each q and k RMS-normalised per head, concatenated TEXT FIRST, rotated,
    attended; the image part leaves through `to_out.0`, the text part through `to_add_out`.
    Single-stream (`context` None, `pre_only`): to_q/to_k/to_v on the joint sequence, no output
    projection (the block's proj_out follows).
    """

    heads: int
    head_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 context: jax.Array | None = None) -> Any:  # fmt: skip
        dim, dtype = self.heads * self.head_dim, self.dtype

        def project(h: jax.Array, name: str) -> jax.Array:  # (B, S, C) -> (B, S, H, d)
            out = _dense(dim, name, dtype)(h)
            return out.reshape(*out.shape[:2], self.heads, self.head_dim)

        h = x.astype(dtype)
        q = RMSNorm(name="norm_q")(project(h, "to_q"))
        k = RMSNorm(name="norm_k")(project(h, "to_k"))
        v = project(h, "to_v")
        if context is not None:
            c = context.astype(dtype)
            q = jnp.concatenate([RMSNorm(name="norm_added_q")(project(c, "add_q_proj")), q], 1)
            k = jnp.concatenate([RMSNorm(name="norm_added_k")(project(c, "add_k_proj")), k], 1)
            v = jnp.concatenate([project(c, "add_v_proj"), v], 1)
        a = _sdpa(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, dtype)
        a = a.reshape(*a.shape[:2], dim)
        if context is None:
            return a
        n_txt = context.shape[1]
        img = _dense(x.shape[-1], "to_out_0", dtype)(a[:, n_txt:])
        txt = _dense(context.shape[-1], "to_add_out", dtype)(a[:, :n_txt])
        return img, txt


class GELUProj(nn.Module):
    """diffusers `GELU(approximate="tanh")`: a Linear named `proj`, then tanh-GELU."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.gelu(_dense(self.features, "proj", self.dtype)(x), approximate=True)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: net.0 GELU(tanh), net.2 Linear."""

    mult_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GELUProj(self.mult_dim, self.dtype, name="net_0")(x.astype(self.dtype))
        return _dense(x.shape[-1], "net_2", self.dtype)(h)


class FluxTransformerBlock(nn.Module):
    """Double-stream block: (img (B, N, C), txt (B, L, C), temb (B, C)) -> (txt, img), float32."""

    config: FluxTransformerConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, ctx: jax.Array, temb: jax.Array, cos: jax.Array,
                 sin: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        cfg, dtype = self.config, self.dtype
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = Modulation(6, dtype, name="norm1")(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
            6, dtype, name="norm1_context"
        )(temb)
        attn = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, dtype, name="attn")
        a_img, a_txt = attn(_modulate(_layer_norm(x), shift, scale), cos, sin,
                            context=_modulate(_layer_norm(ctx), c_shift, c_scale))  # fmt: skip
        x = x + gate[:, None, :] * a_img.astype(jnp.float32)
        h = _modulate(_layer_norm(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None, :] * FeedForward(cfg.mlp_dim, dtype, name="ff")(h).astype(
            jnp.float32
        )
        ctx = ctx + c_gate[:, None, :] * a_txt.astype(jnp.float32)
        h = _modulate(_layer_norm(ctx), c_shift_mlp, c_scale_mlp)
        ctx = ctx + c_gate_mlp[:, None, :] * FeedForward(cfg.mlp_dim, dtype, name="ff_context")(
            h
        ).astype(jnp.float32)
        return ctx, x


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint sequence (B, L + N, C) -> same, float32.

    diffusers concatenates text and image at the start of every single block and splits them at
    its end; nothing in between tells them apart, so this port concatenates once.
    """

    config: FluxTransformerConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        shift, scale, gate = Modulation(3, dtype, name="norm")(temb)
        h = _modulate(_layer_norm(x), shift, scale).astype(dtype)
        mlp = nn.gelu(_dense(cfg.mlp_dim, "proj_mlp", dtype)(h), approximate=True)
        a = FluxAttention(cfg.num_attention_heads, cfg.attention_head_dim, dtype, name="attn")(
            h, cos, sin
        )
        out = _dense(cfg.inner_dim, "proj_out", dtype)(jnp.concatenate([a, mlp], axis=-1))
        return x + gate[:, None, :] * out.astype(jnp.float32)


class FluxTransformer(nn.Module):
    """`FluxTransformer2DModel`: packed latents (B, N, in_channels) -> (B, N, out_channels).

    `timestep` (B,) and `guidance` (B,) or None are diffusers' inputs (t / 1000 and the guidance
    scale: both are multiplied by 1000 here); `cos` / `sin` (L + N, head_dim) are `rope_tables`.
    """

    config: FluxTransformerConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array,
                 guidance: jax.Array | None, encoder_hidden_states: jax.Array,
                 pooled_projections: jax.Array, cos: jax.Array,
                 sin: jax.Array) -> jax.Array:  # fmt: skip
        cfg = self.config
        dtype = cfg.dtype
        # diffusers: timestep.to(float32) * 1000 (and guidance alike), a float32 product.
        thousand = jnp.float32(1000.0)
        t = timestep.astype(jnp.float32) * thousand
        g = None if guidance is None else guidance.astype(jnp.float32) * thousand
        temb = TimeTextEmbed(cfg, name="time_text_embed")(t, g, pooled_projections)
        x = _dense(cfg.inner_dim, "x_embedder", dtype)(hidden_states.astype(dtype))
        ctx = _dense(cfg.inner_dim, "context_embedder", dtype)(encoder_hidden_states.astype(dtype))
        x, ctx = x.astype(jnp.float32), ctx.astype(jnp.float32)
        for i in range(cfg.num_layers):
            ctx, x = FluxTransformerBlock(cfg, dtype, name=f"transformer_blocks_{i}")(
                x, ctx, temb, cos, sin
            )
        n_txt = ctx.shape[1]
        h = jnp.concatenate([ctx, x], axis=1)  # text first, as everywhere in FLUX
        for i in range(cfg.num_single_layers):
            h = FluxSingleTransformerBlock(cfg, dtype, name=f"single_transformer_blocks_{i}")(
                h, temb, cos, sin
            )
        # AdaLayerNormContinuous: the Linear's first half is the SCALE, the second the shift.
        scale, shift = Modulation(2, jnp.float32, name="norm_out")(temb)
        x = _modulate(_layer_norm(h[:, n_txt:]), shift, scale)
        return _dense(cfg.out_channels, "proj_out", jnp.float32)(x)


# ------------------------------------------------------------------------ rotary tables


def _axis_freqs(d: int) -> np.ndarray:
    """float64 1 / theta^(2j / d), j < d / 2 (get_1d_rotary_pos_embed, freqs_dtype float64)."""
    return 1.0 / (ROPE_THETA ** (np.arange(0, d, 2, dtype=np.float64) / d))


def _rope_host(axes: Sequence[int], ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # diffusers: pos = ids.float() (float32), outer product with float64 freqs -> float64.
    pos = np.asarray(ids).astype(np.float32).astype(np.float64)
    cos, sin = [], []
    for i, d in enumerate(axes):
        angles = np.outer(pos[:, i], _axis_freqs(d))
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    return (np.concatenate(cos, axis=1).astype(np.float32),
            np.concatenate(sin, axis=1).astype(np.float32))  # fmt: skip


def _split_freqs(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The float64 frequencies as head (12 significant bits) + tail, both float32."""
    f = _axis_freqs(d)
    mant, expo = np.frexp(f)
    head = np.ldexp(np.round(mant * 2.0**_HEAD_BITS) / 2.0**_HEAD_BITS, expo)
    return head.astype(np.float32), (f - head).astype(np.float32)


def _rope_traced(axes: Sequence[int], ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    if jax.config.jax_enable_x64:  # float64 is available: diffusers' computation as it is
        pos = ids.astype(jnp.float32).astype(jnp.float64)
        angles = [pos[:, i : i + 1] * jnp.asarray(_axis_freqs(d))[None, :]
                  for i, d in enumerate(axes)]  # fmt: skip
        cos = [jnp.cos(a) for a in angles]
        sin = [jnp.sin(a) for a in angles]
    else:
        # angle = pos * head + pos * tail: the first product is exact for integer positions
        # below 2^12, the second is ~2^-12 of the angle, so its float32 rounding is negligible;
        # cos / sin of the sum by the addition formula never round the full angle.
        pos = ids.astype(jnp.float32)
        cos, sin = [], []
        for i, d in enumerate(axes):
            head, tail = _split_freqs(d)
            a = pos[:, i : i + 1] * jnp.asarray(head)[None, :]
            b = pos[:, i : i + 1] * jnp.asarray(tail)[None, :]
            ca, sa, cb, sb = jnp.cos(a), jnp.sin(a), jnp.cos(b), jnp.sin(b)
            cos.append(ca * cb - sa * sb)
            sin.append(sa * cb + ca * sb)
    cos_t = jnp.repeat(jnp.concatenate(cos, axis=1), 2, axis=1).astype(jnp.float32)
    sin_t = jnp.repeat(jnp.concatenate(sin, axis=1), 2, axis=1).astype(jnp.float32)
    return cos_t, sin_t


def _ids(config: FluxTransformerConfig, name: str, ids: Any, length: int) -> Any:
    """(S, n_axes) ids; diffusers' deprecated (1, S, n_axes) form is accepted and squeezed."""
    if not hasattr(ids, "shape"):
        ids = np.asarray(ids)
    shape = tuple(ids.shape)
    if len(shape) == 3:
        if shape[0] != 1:
            # diffusers silently uses ids[0]; a batch of different grids is surely a mistake.
            raise ValueError(
                f"{name} must be ({length}, {config.n_axes}) (or the deprecated "
                f"(1, {length}, {config.n_axes})), got shape {shape}: one id grid serves the batch"
            )
        ids, shape = ids[0], shape[1:]
    if shape != (length, config.n_axes):
        raise ValueError(
            f"{name} must be ({length}, {config.n_axes}) (tokens, len(axes_dims_rope)), "
            f"got shape {tuple(ids.shape)}"
        )
    if not (jnp.issubdtype(ids.dtype, jnp.floating) or jnp.issubdtype(ids.dtype, jnp.integer)):
        raise ValueError(f"{name} must be numbers, got dtype {ids.dtype}")
    return ids


def rope_tables(config: FluxTransformerConfig, txt_ids: Any, img_ids: Any) -> tuple[Any, Any]:
    """`FluxPosEmbed(cat(txt_ids, img_ids))`: (cos, sin), each (L + N, head_dim) float32.

    txt_ids (L, n_axes), img_ids (N, n_axes). Concrete ids (NumPy or jax arrays): float64 on the
    host, as diffusers (NumPy results). Traced ids: the compensated float32 computation of the
    module docstring (float64 with jax_enable_x64).
    """
    if isinstance(txt_ids, jax.core.Tracer) or isinstance(img_ids, jax.core.Tracer):
        return _rope_traced(config.axes_dims_rope, jnp.concatenate([txt_ids, img_ids], axis=0))
    ids = np.concatenate([np.asarray(txt_ids), np.asarray(img_ids)], axis=0)
    return _rope_host(config.axes_dims_rope, ids)


# ------------------------------------------------------------------------ public apply


def _floats(name: str, x: Any, shape: tuple[int | None, ...], allow_int: bool = False) -> Any:
    """Check rank / known sizes / dtype of an input; return it as float32 (stable jit keys)."""
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    ok_dtype = jnp.issubdtype(x.dtype, jnp.floating) or (
        allow_int and jnp.issubdtype(x.dtype, jnp.integer)
    )
    if not ok_dtype:
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.ndim != len(shape) or any(
        w is not None and w != s for w, s in zip(shape, x.shape, strict=True)
    ):
        want = "(" + ", ".join("?" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return jnp.asarray(x, jnp.float32)


def _per_sample(name: str, x: Any, batch: int) -> jax.Array:
    """(B,) values; a scalar or a single value is broadcast to the batch (as torch would)."""
    if not hasattr(x, "shape"):
        x = np.asarray(x)
    if x.ndim > 1 or (x.ndim == 1 and x.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be ({batch},), () or (1,), got shape {tuple(x.shape)}")
    x = _floats(name, x.reshape(-1), (None,), allow_int=True)
    return jnp.broadcast_to(x, (batch,))


def flux_transformer_apply(
    config: FluxTransformerConfig,
    params: Mapping[str, Any],
    hidden_states: jax.Array,
    timestep: jax.Array,
    guidance: jax.Array | None,
    encoder_hidden_states: jax.Array,
    pooled_projections: jax.Array,
    txt_ids: jax.Array,
    img_ids: jax.Array,
) -> jax.Array:
    """`FluxTransformer2DModel(...).sample`: (B, N, out_channels) float32 (a velocity for FLUX).

    hidden_states (B, N, in_channels) packed latent tokens; timestep (B,) float = t / 1000 as
    diffusers takes it (the model multiplies by 1000); guidance (B,) guidance scale, given iff
    `config.guidance_embeds` (FLUX.1-dev: yes, FLUX.1-schnell: no); encoder_hidden_states
    (B, L, joint_attention_dim) T5 states; pooled_projections (B, pooled_projection_dim) CLIP
    pooled output; txt_ids (L, n_axes), img_ids (N, n_axes) rotary positions (a leading batch
    axis of 1, diffusers' deprecated form, is accepted). A scalar or (1,) timestep / guidance is
    broadcast to the batch. Compiled once per (config, shapes) and cached; inlined when the
    caller is itself traced (then traced ids use the float32 rotary fallback).
    """
    if not isinstance(config, FluxTransformerConfig):
        raise TypeError(f"config must be a FluxTransformerConfig, got {type(config).__name__}")
    hs = _floats("hidden_states", hidden_states, (None, None, config.in_channels))
    b, n = hs.shape[:2]
    ehs = _floats("encoder_hidden_states", encoder_hidden_states,
                  (b, None, config.joint_attention_dim))  # fmt: skip
    pooled = _floats("pooled_projections", pooled_projections, (b, config.pooled_projection_dim))
    t = _per_sample("timestep", timestep, b)
    if config.guidance_embeds:
        if guidance is None:
            raise ValueError(
                "this transformer has guidance_embeds=true (FLUX.1-dev style): pass guidance, "
                "the (B,) guidance scale (e.g. 3.5), not None"
            )
        g = _per_sample("guidance", guidance, b)
    else:
        if guidance is not None:
            raise ValueError(
                "this transformer has guidance_embeds=false (no guidance embedder, FLUX.1-schnell "
                "style): pass guidance=None"
            )
        g = None
    txt = _ids(config, "txt_ids", txt_ids, ehs.shape[1])
    img = _ids(config, "img_ids", img_ids, n)
    cos, sin = rope_tables(config, txt, img)
    return _apply(config, params, hs, t, g, ehs, pooled, cos, sin)


@functools.partial(jit, static_argnums=0)
def _apply(config: FluxTransformerConfig, params: Any, hidden_states: jax.Array,
           timestep: jax.Array, guidance: jax.Array | None, encoder_hidden_states: jax.Array,
           pooled_projections: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # fmt: skip
    # Compiled once per (config, shapes, guidance or not): the rotary tables are arguments, so
    # new ids of the same shape do not retrace.
    return FluxTransformer(config).apply(
        {"params": params}, hidden_states, timestep, guidance, encoder_hidden_states,
        pooled_projections, cos, sin,
    )  # fmt: skip


def _dummy_inputs(config: FluxTransformerConfig) -> tuple[Any, ...]:
    """One-token inputs that fix every parameter shape (the shapes do not depend on lengths)."""
    d = config.attention_head_dim
    guidance = jnp.zeros((1,), jnp.float32) if config.guidance_embeds else None
    return (jnp.zeros((1, 1, config.in_channels), jnp.float32), jnp.zeros((1,), jnp.float32),
            guidance, jnp.zeros((1, 1, config.joint_attention_dim), jnp.float32),
            jnp.zeros((1, config.pooled_projection_dim), jnp.float32),
            jnp.ones((2, d), jnp.float32), jnp.zeros((2, d), jnp.float32))  # fmt: skip


@functools.lru_cache(maxsize=16)
def _abstract(config: FluxTransformerConfig) -> dict[str, Any]:
    def init(key: jax.Array) -> Any:
        return FluxTransformer(config).init(key, *_dummy_inputs(config))["params"]

    return jax.eval_shape(init, jax.random.key(0))


def flux_init(config: FluxTransformerConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh random float32 parameters (jax arrays), for tests and shapes: not a trained model.

    The fixtures' fan-in rule: Linear kernels N(0, 1 / fan_in), biases 0.1 N, RMSNorm weights
    1 + 0.1 N, so every term (biases and q/k norms included) is exercised. Drawn with NumPy from
    a seed derived from `key` (Flax's own init compiles a dummy forward pass and a generator per
    shape: seconds even for the tiny model); not traceable, and deterministic in `key`.
    """
    data = key
    if jnp.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key):
        data = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(data).astype(np.uint64).ravel().tolist())
    flat, tree = jax.tree_util.tree_flatten_with_path(_abstract(config))
    leaves = []
    for path, leaf in flat:
        shape, name = tuple(leaf.shape), path[-1].key
        if name == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(shape[0])
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        leaves.append(value.astype(np.float32))
    return jax.device_put(jax.tree_util.tree_unflatten(tree, leaves))


def abstract_params(config: FluxTransformerConfig) -> dict[str, Any]:
    """Parameter tree of `config` as ShapeDtypeStructs (jax.eval_shape: nothing allocated)."""
    return jax.tree.map(lambda s: s, _abstract(config))


def param_count(config: FluxTransformerConfig) -> int:
    """Number of parameters, by arithmetic on the config (no tracing: instant for FLUX.1-dev)."""
    c, f, d = config.inner_dim, config.mlp_dim, config.attention_head_dim

    def linear(i: int, o: int) -> int:
        return i * o + o

    embedder = linear(TIME_CHANNELS, c) + linear(c, c)
    total = embedder * (2 if config.guidance_embeds else 1)
    total += linear(config.pooled_projection_dim, c) + linear(c, c)  # text_embedder
    total += linear(config.joint_attention_dim, c) + linear(config.in_channels, c)
    double = (2 * linear(c, 6 * c)  # norm1, norm1_context
              + 8 * linear(c, c)  # to_q/k/v, add_q/k/v_proj, to_out.0, to_add_out
              + 4 * d  # norm_q, norm_k, norm_added_q, norm_added_k
              + 2 * (linear(c, f) + linear(f, c)))  # ff, ff_context  # fmt: skip
    single = (linear(c, 3 * c) + 3 * linear(c, c) + 2 * d
              + linear(c, f) + linear(c + f, c))  # fmt: skip
    total += config.num_layers * double + config.num_single_layers * single
    total += linear(c, 2 * c) + linear(c, config.out_channels)  # norm_out, proj_out
    return total


# ------------------------------------------------------------------- state dict


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> diffusers state-dict key (the rule of `_layers.torch_key`).

    `("transformer_blocks_0", "attn", "to_out_0", "kernel")` ->
    `transformer_blocks.0.attn.to_out.0.weight`; `("single_transformer_blocks_1", "attn",
    "norm_q", "scale")` -> `single_transformer_blocks.1.attn.norm_q.weight`.
    """
    return L.torch_key(path)


def _torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
    # Every 2-D leaf is a Linear kernel (in, out) <-> weight (out, in); the rest as is.
    s = tuple(int(n) for n in shape)
    return s[::-1] if path[-1] == "kernel" else s


def _leaves(config: FluxTransformerConfig) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(_abstract(config))[0]
    return [(tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in flat]


def plan_state_dict(config: FluxTransformerConfig, shapes: Mapping[str, Sequence[int]]
                    ) -> tuple[tuple[tuple[str, ...], str], ...]:  # fmt: skip
    """Match `{diffusers key: shape}` to `config`: ((flax path, key), ...), one per parameter.

    Needs only shapes (a manifest will do). Every key must name exactly one parameter, with
    its PyTorch shape, and every parameter must be given; otherwise one `FluxStateDictError`
    lists the missing, unexpected and mis-shaped keys (counts and the first few of each).
    """
    if not isinstance(shapes, Mapping):
        raise FluxStateDictError(f"a state dict must be a mapping, got {type(shapes).__name__}")
    expected = {torch_key(path): (path, _torch_shape(path, shape)) for path, shape in _leaves(config)}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(str(k) for k in set(shapes) - set(expected))
    misshaped, plan = [], []
    for key in sorted(set(expected) & set(shapes)):
        path, want = expected[key]
        try:
            got: tuple[int, ...] | None = tuple(int(n) for n in shapes[key])
        except (TypeError, ValueError):
            got = None
        if got != want:
            shown = list(got) if got is not None else _short(shapes[key])
            misshaped.append(f"{key}: got {shown}, expected {list(want)}")
        plan.append((path, key))
    if missing or unexpected or misshaped:
        raise FluxStateDictError(missing, unexpected, misshaped)
    return tuple(sorted(plan))


def to_flax(path: Sequence[str], array: np.ndarray) -> np.ndarray:
    """One diffusers tensor -> the Flax leaf at `path`: float32, Linear (out, in) -> (in, out)."""
    a = np.asarray(array).astype(np.float32, copy=False)
    return np.ascontiguousarray(a.T if path[-1] == "kernel" else a)


def params_from_state_dict(config: FluxTransformerConfig,
                           state_dict: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Strict diffusers `FluxTransformer2DModel` state dict -> Flax params (float32 NumPy).

    Names, shapes and floating dtypes are all checked before any array is converted
    (`plan_state_dict`, then `FluxStateDictError` for integer tensors). FLUX.1-dev in float32 is
    48 GB: convert on a host with room for it, then `jax.device_put` once.
    """
    plan = plan_state_dict(config, {k: np.shape(v) for k, v in state_dict.items()})
    mistyped = []
    for _, key in plan:
        value = state_dict[key]
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            mistyped.append(f"{key} ({dtype})")
    if mistyped:
        raise FluxStateDictError(mistyped=mistyped)
    params: dict[str, Any] = {}
    for path, key in plan:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = to_flax(path, state_dict[key])
    return params
