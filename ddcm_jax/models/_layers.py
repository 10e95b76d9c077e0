"""Building blocks shared by the Stable Diffusion UNet and VAE ports (Flax linen, NHWC).

Everything here follows diffusers' modules of the same name closely enough that
converted weights compute the same function:

* `GroupNorm` / `LayerNorm` always normalise in float32 (two-pass variance) and
  cast back to the input dtype, whatever the compute dtype.
* `ResnetBlock2D` is diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`
  (the time projection, when there is one, is a float32 Linear).
* `attention` is multi-head scaled dot-product attention whose scores and
  softmax are float32.

The second half holds the name and layout rule shared by both networks
(`torch_key`, `torch_shape`) and the strict state-dict -> params conversion
(`expected_state_dict_shapes`, `convert_state_dict`), plus small validators for
configuration values read from untrusted `config.json` files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class SDConfigError(ValueError):
    """A configuration value that is malformed or names an unsupported option."""


class SDStateDictError(ValueError):
    """A state dict that does not map one-to-one, shape for shape, onto a network's parameters."""


# --------------------------------------------------------------------------- layers


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float) -> jax.Array:
    """`torch.nn.GroupNorm` over the last axis of x (B, ..., C), in float32, cast back.

    Two passes (mean, then the mean of squared deviations), each reduced in two stages:
    per channel over the positions (B, N, C), a reduction XLA:CPU vectorises along the
    contiguous channels, then per group over its C / G channel sums. Reducing the
    (B, N, G, C/G) view at once instead strides across the channels: the same values to
    float32 rounding (2e-6 measured), 2.6x slower with the SiLU after it on CPU.
    """
    h = x.astype(jnp.float32)
    b, c = h.shape[0], h.shape[-1]
    flat = h.reshape(b, -1, c)
    count = flat.shape[1] * (c // groups)

    def per_group(v: jax.Array) -> jax.Array:  # (B, C) channel sums -> (B, 1, C) group means
        g = v.reshape(b, groups, c // groups).sum(-1) / count
        return jnp.repeat(g, c // groups, axis=-1)[:, None, :]

    d = flat - per_group(flat.sum(axis=1))
    inv = jax.lax.rsqrt(per_group(jnp.square(d).sum(axis=1)) + epsilon)
    out = d * (inv * scale.reshape(1, 1, c)) + bias.reshape(1, 1, c)
    return out.reshape(h.shape).astype(x.dtype)


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm(groups, C, eps)` over the last axis, computed in float32 (`group_norm`)."""

    groups: int
    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, scale, bias, self.groups, self.epsilon)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm(C, eps)` (affine) over the last axis, computed in float32."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        h = x.astype(jnp.float32)
        mean = h.mean(axis=-1, keepdims=True)
        var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.epsilon)
        bshape = (1,) * (h.ndim - 1) + (c,)
        return (h * scale.reshape(bshape) + bias.reshape(bshape)).astype(x.dtype)


def conv(features: int, name: str | None, dtype: Any, *, kernel: int = 3, stride: int = 1,
         padding: int | None = None) -> nn.Conv:  # fmt: skip
    """`nn.Conv2d(..., kernel, stride, padding)` (default padding kernel // 2), NHWC / HWIO.

    `name` None: named by the attribute it is assigned to in a `setup`.
    """
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def dense(features: int, name: str, dtype: Any, *, use_bias: bool = True) -> nn.Dense:
    """`nn.Linear(in, features, bias)`; the kernel is stored (in, out)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """`F.interpolate(x, scale_factor=2, mode="nearest")` on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True)`: a stride-2 3x3 conv named `conv`.

    `padding` 0 reproduces diffusers' asymmetric case: pad one zero row and
    column at the bottom and right, then convolve without padding.
    """

    channels: int
    padding: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, "conv", self.dtype, stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest 2x, then a 3x3 conv named `conv`."""

    channels: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.channels, "conv", self.dtype)(upsample_nearest(x))


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (pre-norm, `time_embedding_norm="default"`, dropout off).

    norm1 -> silu -> conv1 (+ time_emb_proj(silu(temb))) -> norm2 -> silu -> conv2,
    plus the input (through a 1x1 `conv_shortcut` when the width changes),
    divided by `output_scale_factor`.
    """

    out_channels: int
    groups: int
    epsilon: float
    dtype: Any
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(GroupNorm(self.groups, self.epsilon, name="norm1")(x))
        h = conv(self.out_channels, "conv1", self.dtype)(h)
        if temb is not None:
            # A float32 Linear, as the time embedding itself is float32.
            t = dense(self.out_channels, "time_emb_proj", jnp.float32)(nn.silu(temb))
            h = h + t.astype(h.dtype)[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.epsilon, name="norm2")(h))
        h = conv(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", self.dtype, kernel=1)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / jnp.asarray(self.output_scale_factor, out.dtype)
        return out


QUERY_BLOCK = 256


def by_query_blocks(core: Callable[[jax.Array], jax.Array], q: jax.Array,
                    block: int | None = QUERY_BLOCK, axis: int = 1) -> jax.Array:  # fmt: skip
    """core(q) for queries along `axis` of q (1: (B, T, ...); 2: head-major (B, H, T, d)),
    computed `block` queries at a time (`lax.map`).

    Softmax attention is row-wise in the queries, so the blocks compute exactly the same
    numbers (tested bit for bit); only the score matrix that is live at once shrinks to
    (B, H, block, S), and it stays in cache (`benchmarks/results/attention_cpu.json`).
    Sequences of at most one block, or not a multiple of it (or `block` None), run whole.
    """
    t = q.shape[axis]
    if block is None or t <= block or t % block:
        return core(q)
    lead, rest = q.shape[:axis], q.shape[axis + 1 :]
    blocks = jnp.moveaxis(q.reshape(*lead, t // block, block, *rest), axis, 0)
    out = jax.lax.map(core, blocks)  # (n, *lead, block, *rest_out)
    return jnp.moveaxis(out, 0, axis).reshape(*lead, t, *out.shape[axis + 2 :])


def heads_first(a: jax.Array, heads: int) -> jax.Array:
    """(B, T, H d) -> (B, H, T, d): each head's rows contiguous, so both products are plain
    batched matrix products. On 2 CPU cores this layout made the attention core 1.1-1.9x
    faster than contracting in the (B, T, H, d) layout (256 to 4,096 tokens), with the same
    numbers bit for bit (`benchmarks/results/attention_cpu.json`)."""
    b, t, c = a.shape
    return a.reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3)


def heads_last(a: jax.Array) -> jax.Array:
    """(B, H, T, d) -> (B, T, H d), the inverse of `heads_first`."""
    b, h, t, d = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
              upcast: bool = False, query_block: int | None = QUERY_BLOCK) -> jax.Array:  # fmt: skip
    """softmax(q k^T / sqrt(d)) v per head: q (B, T, H d), k and v (B, S, H d) -> (B, T, H d).

    The scores are accumulated and soft-maxed in float32 whatever the inputs'
    dtype; `upcast` also casts q and k to float32 before the product
    (diffusers' `upcast_attention`). The weights are cast back to v's dtype. `query_block`:
    see `by_query_blocks` (None: all queries at once; the same numbers). Computed
    head-major (`heads_first`).
    """
    d = q.shape[-1] // heads
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    q = heads_first(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), heads)
    k, v = heads_first(k, heads), heads_first(v, heads)

    def core(qb: jax.Array) -> jax.Array:
        w = jnp.einsum("bhtd,bhsd->bhts", qb, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bhts,bhsd->bhtd", w, v)

    return heads_last(by_query_blocks(core, q, query_block, axis=2))


# ------------------------------------------------------------------- name/layout rule

# Flax module names that end in `_<digits>` without being ModuleList entries.
_LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
_INDEXED = re.compile(r"(.+?)_(\d+)")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> diffusers state-dict key.

    Each Flax module name is a PyTorch attribute name, with a ModuleList index
    appended as `_<i>`: `("down_blocks_0", "attentions_0", "proj_in", "kernel")`
    -> `down_blocks.0.attentions.0.proj_in.weight`. `linear_1` / `linear_2`
    (`TimestepEmbedding`'s attributes) are names, not indices. Leaves
    `kernel` / `scale` / `embedding` become `weight`.
    """
    *modules, leaf = path
    parts = []
    for seg in modules:
        m = _INDEXED.fullmatch(seg)
        if m is not None and seg not in _LITERAL_NAMES:
            parts.extend((m.group(1), m.group(2)))
        else:
            parts.append(seg)
    if leaf not in _LEAF_NAMES:
        raise KeyError(f"no PyTorch name for the Flax leaf {leaf!r} in {'/'.join(path)}")
    parts.append(_LEAF_NAMES[leaf])
    return ".".join(parts)


def torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf: HWIO -> OIHW, (in, out) -> (out, in), else unchanged."""
    s = tuple(int(n) for n in flax_shape)
    if len(s) == 4:
        return (s[3], s[2], s[0], s[1])
    if len(s) == 2:
        return (s[1], s[0])
    return s


def to_flax(array: np.ndarray) -> np.ndarray:
    """Inverse layout of `torch_shape` on an array (float32, contiguous)."""
    a = np.asarray(array).astype(np.float32, copy=False)
    if a.ndim == 4:
        a = a.transpose(2, 3, 1, 0)
    elif a.ndim == 2:
        a = a.T
    return np.ascontiguousarray(a)


def _flat_paths(abstract: Mapping[str, Any]) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return [(tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in flat]


def expected_state_dict_shapes(abstract: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """diffusers key -> PyTorch shape for every leaf of an abstract parameter tree."""
    out: dict[str, tuple[int, ...]] = {}
    for path, shape in _flat_paths(abstract):
        key = torch_key(path)
        if key in out:  # a naming bug, not a user error
            raise AssertionError(f"two Flax leaves map to {key}")
        out[key] = torch_shape(shape)
    return out


def _listing(kind: str, items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... +{len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {kind} ({shown}{more})"


def convert_state_dict(
    abstract: Mapping[str, Any], state_dict: Mapping[str, Any], what: str
) -> dict[str, Any]:
    """Strict diffusers state dict -> Flax params (nested dict of float32 NumPy arrays).

    Every key must name exactly one parameter, every parameter must be given,
    every shape must be the PyTorch shape, every dtype floating point. Only
    shapes and dtypes are read until all of that holds; then one
    `SDStateDictError` lists what is wrong (counts and the first few keys).
    """
    paths = {torch_key(p): (p, torch_shape(s)) for p, s in _flat_paths(abstract)}
    missing = sorted(set(paths) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(paths))
    misshaped, bad_dtype = [], []
    for key in sorted(set(paths) & set(state_dict)):
        value = state_dict[key]
        shape = tuple(np.shape(value))
        if shape != paths[key][1]:
            misshaped.append(f"{key}: got {list(shape)}, expected {list(paths[key][1])}")
        dtype = getattr(value, "dtype", None)
        if dtype is None or not (np.dtype(dtype).kind == "f" or str(dtype) == "bfloat16"):
            bad_dtype.append(f"{key}: {dtype}")
    problems = []
    for kind, items in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped), ("not floating point", bad_dtype)):  # fmt: skip
        if items:
            problems.append(_listing(kind, items))
    if problems:
        raise SDStateDictError(f"{what} state dict does not match its config: " + "; ".join(problems))
    params: dict[str, Any] = {}
    for key, (path, _) in paths.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = to_flax(state_dict[key])
    return params


# ---------------------------------------------------------------------- validators

MAX_CHANNELS = 16384
MAX_LEVELS = 8
MAX_LAYERS = 32


def check_int(name: str, value: Any, lo: int = 1, hi: int = MAX_CHANNELS) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SDConfigError(f"{name} must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise SDConfigError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise SDConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo):
        side = "(" if open_lo else "["
        raise SDConfigError(f"{name} must be in {side}{lo}, {hi}], got {value!r}")
    return v


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise SDConfigError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def check_list(name: str, value: Any, check: Callable[[str, Any], Any], *,
               length: int | None = None, max_len: int = MAX_LEVELS) -> tuple[Any, ...]:  # fmt: skip
    if not isinstance(value, list | tuple):
        raise SDConfigError(f"{name} must be a list, got {value!r}")
    if length is not None and len(value) != length:
        raise SDConfigError(f"{name} must have {length} entries, got {value!r}")
    if not 1 <= len(value) <= max_len:
        raise SDConfigError(f"{name} must have 1 to {max_len} entries, got {value!r}")
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))


def per_level(name: str, value: Any, levels: int, check: Callable[[str, Any], Any]) -> tuple[Any, ...]:
    """An int (the same at every level) or a list of one value per level."""
    if isinstance(value, list | tuple):
        return check_list(name, value, check, length=levels)
    return (check(name, value),) * levels


def refuse_unless(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """One-line refusal of an option value this port does not implement."""
    def same(a: Any) -> bool:
        if a is None or isinstance(a, bool):
            return value is a
        return type(value) is type(a) and value == a

    if not any(same(a) for a in allowed):
        want = " or ".join(repr(a) for a in allowed)
        raise SDConfigError(f"unsupported {name}={value!r} (this port implements {want} only)")


def check_dtype(name: Any) -> str:
    if not isinstance(name, str) or name not in DTYPES:
        raise SDConfigError(f"compute_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return name
