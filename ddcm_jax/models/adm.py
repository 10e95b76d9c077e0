"""OpenAI's guided-diffusion UNet ("ADM", Dhariwal & Nichol 2021) in Flax, NHWC.

The network follows `guided_diffusion/unet.py::UNetModel` option for option so
that converted PyTorch checkpoints compute the same function. Module names are
the PyTorch module paths with dots replaced by underscores
(`input_blocks.1.0.in_layers.2` -> `input_blocks_1_0` / `in_layers_2`); that
rule, inverted by `torch_key`, is what the converter relies on.

Mixed precision mirrors the original `use_fp16`: only the convolutions of the
torso (input, middle and output blocks, attention qkv/proj) run in the compute
dtype; linear layers, the time embedding and the output head stay float32,
GroupNorm and the attention softmax are computed in float32 and cast back.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddcm_jax.models._layers import by_query_blocks, group_norm, heads_last

__all__ = [
    "LIMITS",
    "ADMConfig",
    "ADMUNet",
    "ConfigError",
    "activation_bound",
    "adm_apply",
    "adm_init",
    "param_count",
    "timestep_embedding",
    "torch_key",
]

NUM_CLASSES = 1000
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# guided-diffusion's `create_model` defaults for `channel_mult=""`.
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# `create_model` keyword arguments that have no effect on the function computed
# at inference (gradient checkpointing) and are accepted for compatibility.
_IGNORED_KWARGS = ("use_checkpoint",)


class ConfigError(ValueError):
    """A malformed or out-of-range architecture config; str() is one line naming the setting."""


# Hard limits on a config, checked before anything is built or traced: far above every
# released guided-diffusion model (ImageNet 512: 7 levels, 256 channels x 4, 554 M
# parameters) and far below what would exhaust a machine while tracing.
LIMITS = {
    "image_size": 4096,
    "channels": 4096,  # model_channels and every level's channel count
    "levels": 8,
    "num_res_blocks": 16,
    "heads": 4096,
    "in_channels": 64,
    "out_channels": 128,
    "num_classes": 100_000,
    "attention_ds": 1 << 16,
    "attention_entries": 64,
    "params": 4_000_000_000,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _need_int(name: str, v: Any, lo: int, hi: int, *, also: tuple[int, ...] = ()) -> int:
    if not _is_int(v):
        raise ConfigError(f"{name} must be an integer, got {_show(v)}")
    v = int(v)
    if v not in also and not lo <= v <= hi:
        extra = "".join(f" or {a}" for a in also)
        raise ConfigError(f"{name} {_show(v)} outside {lo}..{hi}{extra}")
    return v


def _need_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    """A short, one-line description of a config value for error messages."""
    if v is None or isinstance(v, bool | int | float):
        text = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"an integer of {v.bit_length()} bits"
    elif isinstance(v, str):
        text = repr(v[:40]) + ("…" if len(v) > 40 else "")
    else:
        text = f"a {type(v).__name__}"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def _need_tuple(name: str, v: Any, max_len: int, *, min_len: int = 1) -> tuple[Any, ...]:
    if isinstance(v, str | bytes) or not isinstance(v, Sequence):
        raise ConfigError(f"{name} must be a list, got {_show(v)}")
    if not min_len <= len(v) <= max_len:
        raise ConfigError(f"{name} has {len(v)} entries, allowed {min_len}..{max_len}")
    return tuple(v)


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    """Architecture of a guided-diffusion `UNetModel` (all values resolved).

    `attention_ds` holds downsampling rates (1, 2, 4, ...), as `UNetModel`
    takes them; `from_create_model` converts `create_model`'s resolutions.
    Construction validates every field's type and range against `LIMITS`, and
    the parameter count the config implies (`param_count`, arithmetic, nothing
    traced), raising `ConfigError`.
    """

    image_size: int
    model_channels: int
    num_res_blocks: tuple[int, ...]
    attention_ds: tuple[int, ...]
    channel_mult: tuple[float, ...]
    in_channels: int = 3
    out_channels: int = 3
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        fix = object.__setattr__
        lim = LIMITS
        # Types and ranges first, so that nothing below computes with a hostile value.
        fix(self, "image_size", _need_int("image_size", self.image_size, 1, lim["image_size"]))
        fix(self, "model_channels", _need_int("model_channels", self.model_channels, 1, lim["channels"]))
        mult = _need_tuple("channel_mult", self.channel_mult, lim["levels"])
        for m in mult:
            if isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m) or not 0 < m <= lim["channels"]:
                raise ConfigError(f"channel_mult entries must be numbers in (0, {lim['channels']}], got {_show(m)}")
        fix(self, "channel_mult", tuple(int(m) if _is_int(m) else float(m) for m in mult))
        nrb = _need_tuple("num_res_blocks", self.num_res_blocks, lim["levels"])
        fix(self, "num_res_blocks", tuple(_need_int("num_res_blocks", n, 1, lim["num_res_blocks"]) for n in nrb))
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ConfigError(
                f"num_res_blocks has {len(self.num_res_blocks)} entries but "
                f"channel_mult has {len(self.channel_mult)} levels"
            )
        ds = _need_tuple("attention_ds", self.attention_ds, lim["attention_entries"], min_len=0)
        fix(self, "attention_ds", tuple(_need_int("attention_ds", d, 1, lim["attention_ds"]) for d in ds))
        fix(self, "in_channels", _need_int("in_channels", self.in_channels, 1, lim["in_channels"]))
        fix(self, "out_channels", _need_int("out_channels", self.out_channels, 1, lim["out_channels"]))
        if self.num_classes is not None:
            fix(self, "num_classes", _need_int("num_classes", self.num_classes, 1, lim["num_classes"]))
        fix(self, "num_heads", _need_int("num_heads", self.num_heads, 1, lim["heads"]))
        fix(self, "num_head_channels",
            _need_int("num_head_channels", self.num_head_channels, 1, lim["channels"], also=(-1,)))  # fmt: skip
        fix(self, "num_heads_upsample",
            _need_int("num_heads_upsample", self.num_heads_upsample, 1, lim["heads"], also=(-1,)))  # fmt: skip
        for name in ("use_scale_shift_norm", "resblock_updown", "conv_resample", "use_new_attention_order"):
            _need_bool(name, getattr(self, name))
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (math.isfinite(d) and 0 <= d <= 1):
            raise ConfigError(f"dropout must be a number in [0, 1], got {_show(d)}")
        fix(self, "dropout", float(d))
        if not isinstance(self.compute_dtype, str) or self.compute_dtype not in _DTYPES:
            raise ConfigError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {_show(self.compute_dtype)}")
        # Consistency: what the network needs to be built at all.
        if self.image_size % self.size_multiple:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of {self.size_multiple} "
                f"(2^(levels-1) for {len(self.channel_mult)} levels)"
            )
        for m in self.channel_mult:
            ch = int(m * self.model_channels)
            if not 32 <= ch <= lim["channels"] or ch % 32:
                raise ConfigError(
                    f"channel count {ch} (channel_mult {m} x model_channels {self.model_channels}) is not "
                    f"a multiple of the 32 GroupNorm groups in 32..{lim['channels']}"
                )
        for ch, heads in self._attention_widths():
            if self.num_head_channels != -1:
                if ch % self.num_head_channels:
                    raise ConfigError(f"{ch} attention channels not divisible by num_head_channels {self.num_head_channels}")
            elif ch % heads:
                raise ConfigError(f"{ch} attention channels not divisible into {heads} heads")
        n = param_count(self)
        if n > lim["params"]:
            raise ConfigError(f"the config implies {n:,} parameters, more than the limit {lim['params']:,}")

    def _attention_widths(self) -> list[tuple[int, int]]:
        """(channels, heads) of every attention block: input, middle, output."""
        out = []
        for level, mult in enumerate(self.channel_mult):
            if 2**level in self.attention_ds:
                ch = int(mult * self.model_channels)
                out += [(ch, self.num_heads), (ch, self.heads_upsample)]
        out.append((int(self.channel_mult[-1] * self.model_channels), self.num_heads))
        return out

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    @property
    def dtype(self) -> Any:
        return _DTYPES[self.compute_dtype]

    @property
    def size_multiple(self) -> int:
        """Input sides must be divisible by this (one halving per extra level)."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_create_model(cls, kwargs: Mapping[str, Any]) -> ADMConfig:
        """Resolve guided-diffusion `create_model(**kwargs)` into a config.

        Accepts exactly `create_model`'s keywords, plus `conv_resample` and
        `compute_dtype` (float32 | bfloat16 | float16; overrides `use_fp16`).
        Integers must be integers and booleans booleans (no strings, floats or
        NaN); `channel_mult` and `attention_resolutions` may be the
        comma-separated strings of its argparse front end or lists;
        `num_res_blocks` may be an int or one count per level. Raises
        `ConfigError` (one line) for anything else.
        """
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {_show(kwargs)}")
        known = {
            "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
            "class_cond", "use_checkpoint", "attention_resolutions", "num_heads",
            "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "dropout",
            "resblock_updown", "use_fp16", "use_new_attention_order", "conv_resample",
            "compute_dtype",
        }  # fmt: skip
        unknown = sorted(_show(k) if not isinstance(k, str) else k for k in set(kwargs) - known)
        if unknown:
            shown = ", ".join(_show(k)[1:-1] if _show(k).startswith("'") else _show(k) for k in unknown[:8])
            raise ConfigError(f"unknown create_model arguments: {shown}")
        for required in ("image_size", "num_channels", "num_res_blocks"):
            if required not in kwargs:
                raise ConfigError(f"missing create_model argument: {required}")
        image_size = _need_int("image_size", kwargs["image_size"], 1, LIMITS["image_size"])
        channel_mult = kwargs.get("channel_mult", "")
        if channel_mult in ("", None):
            if image_size not in _DEFAULT_CHANNEL_MULT:
                raise ConfigError(f"unsupported image size: {image_size} (give channel_mult)")
            mult: tuple[Any, ...] = _DEFAULT_CHANNEL_MULT[image_size]
        elif isinstance(channel_mult, str):
            mult = tuple(_parse_int_list("channel_mult", channel_mult, skip_blank=False))
        else:
            mult = _need_tuple("channel_mult", channel_mult, LIMITS["levels"])
        resolutions = kwargs.get("attention_resolutions", "16")
        if isinstance(resolutions, str):
            resolutions = _parse_int_list("attention_resolutions", resolutions, skip_blank=True)
        else:
            resolutions = _need_tuple("attention_resolutions", resolutions, LIMITS["attention_entries"], min_len=0)
        resolutions = [_need_int("attention_resolutions", r, 1, image_size) for r in resolutions]
        nrb = kwargs["num_res_blocks"]
        if _is_int(nrb):
            nrb = (_need_int("num_res_blocks", nrb, 1, LIMITS["num_res_blocks"]),) * len(mult)
        else:
            nrb = _need_tuple("num_res_blocks", nrb, LIMITS["levels"])
        flags = {
            name: _need_bool(name, kwargs.get(name, default))
            for name, default in (("learn_sigma", False), ("class_cond", False), ("use_checkpoint", False),
                                  ("use_scale_shift_norm", False), ("resblock_updown", False),
                                  ("use_fp16", False), ("use_new_attention_order", False),
                                  ("conv_resample", True))
        }  # fmt: skip
        dtype = kwargs.get("compute_dtype") or ("float16" if flags["use_fp16"] else "float32")
        return cls(
            image_size=image_size,
            model_channels=_need_int("num_channels", kwargs["num_channels"], 1, LIMITS["channels"]),
            num_res_blocks=nrb,
            attention_ds=tuple(image_size // r for r in resolutions),
            channel_mult=mult,
            out_channels=6 if flags["learn_sigma"] else 3,
            num_classes=NUM_CLASSES if flags["class_cond"] else None,
            num_heads=kwargs.get("num_heads", 1),
            num_head_channels=kwargs.get("num_head_channels", -1),
            num_heads_upsample=kwargs.get("num_heads_upsample", -1),
            use_scale_shift_norm=flags["use_scale_shift_norm"],
            resblock_updown=flags["resblock_updown"],
            conv_resample=flags["conv_resample"],
            use_new_attention_order=flags["use_new_attention_order"],
            dropout=kwargs.get("dropout", 0.0),
            compute_dtype=dtype,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ADMConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"architecture must be a JSON object, got {_show(data)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(_show(k) for k in set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown ADM config fields: {', '.join(unknown[:8])}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)  # fmt: skip
        if missing:
            raise ConfigError(f"missing ADM config fields: {', '.join(missing)}")
        return cls(**data)


_INT_ITEM = re.compile(r"[0-9]{1,9}")


def _parse_int_list(name: str, text: str, *, skip_blank: bool) -> list[int]:
    """'32,16,8' -> [32, 16, 8] (ASCII digits only, as create_model's argparse front end writes them)."""
    if len(text) > 1000:
        raise ConfigError(f"{name} string is too long")
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item and skip_blank:
            continue
        if not _INT_ITEM.fullmatch(item):
            raise ConfigError(f"{name} must be comma-separated integers, got {_show(text)}")
        out.append(int(item))
    return out


def param_count(config: ADMConfig) -> int:
    """Number of parameters `config` implies, by arithmetic on the network's structure.

    Equal to the leaf sizes of `abstract_params(config)` summed (tests check it),
    but computed without building or tracing anything, so that a config can be
    refused before its network exists.
    """
    cfg, mc = config, config.model_channels
    ted = 4 * mc

    def conv(i: int, o: int, k: int = 3) -> int:
        return k * k * i * o + o

    def res(i: int, o: int) -> int:
        width = 2 * o if cfg.use_scale_shift_norm else o
        return 2 * i + conv(i, o) + ted * width + width + 2 * o + conv(o, o) + (0 if i == o else conv(i, o, 1))

    def attn(c: int) -> int:
        return 2 * c + 3 * c * c + 3 * c + c * c + c

    def resample(c: int) -> int:
        if cfg.resblock_updown:
            return res(c, c)
        return conv(c, c) if cfg.conv_resample else 0

    total = mc * ted + ted + ted * ted + ted + (cfg.num_classes or 0) * ted
    ch = int(cfg.channel_mult[0] * mc)
    total += conv(cfg.in_channels, ch)
    chans, ds = [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            total += res(ch, int(mult * mc))
            ch = int(mult * mc)
            total += attn(ch) if ds in cfg.attention_ds else 0
            chans.append(ch)
        if level < len(cfg.channel_mult) - 1:
            total += resample(ch)
            chans.append(ch)
            ds *= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks[level] + 1):
            total += res(ch + chans.pop(), int(mc * mult))
            ch = int(mc * mult)
            total += attn(ch) if ds in cfg.attention_ds else 0
            if level and i == cfg.num_res_blocks[level]:
                total += resample(ch)
                ds //= 2
    return total + 2 * ch + conv(ch, cfg.out_channels)


def activation_bound(config: ADMConfig, height: int, width: int) -> int:
    """An upper bound, in bytes, of what one forward call at batch 1 holds: parameters, input,
    output, and every intermediate tensor counted as if all were alive at once, twice over.

    XLA reuses buffers, so its own estimate (`ddcm_jax.memory.forward_bytes`,
    which compiles the network) is far lower (tests check that this bound stays
    above it); this one is arithmetic, so that a run far inside the memory budget
    is let through without compiling anything.
    """
    cfg, mc = config, config.model_channels
    pixels = int(height) * int(width)
    floats = (cfg.in_channels + cfg.out_channels) * pixels + 4 * mc  # input, output, timestep embedding

    def res(i: int, o: int, n: int) -> int:  # norm, SiLU, conv, + emb, norm, SiLU, conv, skip, sum
        return (4 * i + 6 * o) * n

    def attn(c: int, n: int) -> int:  # norm, qkv, logits and weights per head, output, projection, sum
        heads = cfg.num_heads if cfg.num_head_channels == -1 else max(1, c // cfg.num_head_channels)
        return 8 * c * n + 3 * max(heads, cfg.heads_upsample) * n * n

    ns = [-(-int(height) // 2**lv) * -(-int(width) // 2**lv) for lv in range(len(cfg.channel_mult))]
    ch = int(cfg.channel_mult[0] * mc)
    chans, ds = [ch], 1
    floats += ch * pixels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            floats += res(ch, int(mult * mc), ns[level])
            ch = int(mult * mc)
            floats += attn(ch, ns[level]) if ds in cfg.attention_ds else 0
            chans.append(ch)
        if level < len(cfg.channel_mult) - 1:
            floats += 2 * ch * ns[level] + res(ch, ch, ns[level])  # a downsample (or resblock_updown)
            chans.append(ch)
            ds *= 2
    floats += 2 * res(ch, ch, ns[-1]) + attn(ch, ns[-1])
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks[level] + 1):
            skip = chans.pop()
            floats += (ch + skip) * ns[level] + res(ch + skip, int(mc * mult), ns[level])  # concat, block
            ch = int(mc * mult)
            floats += attn(ch, ns[level]) if ds in cfg.attention_ds else 0
            if level and i == cfg.num_res_blocks[level]:
                floats += 2 * ch * ns[level - 1] + res(ch, ch, ns[level - 1])  # an upsample to the level above
                ds //= 2
    floats += 3 * ch * pixels
    return 4 * (2 * floats + param_count(cfg))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = P^(-i/half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm32(nn.Module):
    """GroupNorm(32, C) evaluated in float32 (two-pass variance, `_layers.group_norm`), cast back."""

    groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, scale, bias, self.groups, self.epsilon)


def _conv(features: int, name: str, dtype: Any, *, kernel: int = 3, stride: int = 1,
          zero: bool = False) -> nn.Conv:  # fmt: skip
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
        name=name,
    )


def _upsample(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avgpool(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    channels: int
    use_conv: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return _conv(self.channels, "op", self.dtype, stride=2)(x)
        return _avgpool(x)


class Upsample(nn.Module):
    channels: int
    use_conv: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _upsample(x)
        if self.use_conv:
            x = _conv(self.channels, "conv", self.dtype)(x)
        return x


class ResBlock(nn.Module):
    out_channels: int
    use_scale_shift_norm: bool
    dtype: Any
    up: bool = False
    down: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        if self.up:
            h, x = _upsample(h), _upsample(x)
        elif self.down:
            h, x = _avgpool(h), _avgpool(x)
        h = _conv(self.out_channels, "in_layers_2", self.dtype)(h)
        # The embedding projection is a float32 Linear in the original.
        width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(width, dtype=jnp.float32, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        out_norm = GroupNorm32(name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        # Dropout sits here in the original; this network is inference-only.
        h = _conv(self.out_channels, "out_layers_3", self.dtype, zero=True)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "skip_connection", self.dtype, kernel=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    num_heads: int
    num_head_channels: int
    use_new_attention_order: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            if c % self.num_head_channels:
                raise ValueError(f"{c} channels not divisible by {self.num_head_channels}")
            heads = c // self.num_head_channels
        ch = c // heads
        seq = x.reshape(b, hh * ww, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(GroupNorm32(name="norm")(seq))
        if self.use_new_attention_order:
            # Channels laid out [q|k|v][head][ch]: split qkv before heads.
            qkv = qkv.reshape(b, hh * ww, 3, heads, ch)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            # Legacy layout [head][q|k|v][ch]: split heads before qkv.
            qkv = qkv.reshape(b, hh * ww, heads, 3, ch)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        # Scaling q and k by ch^-1/4 each (not the product by ch^-1/2) is the
        # original's choice for float16 stability; kept for identical rounding.
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        # Head-major (B, heads, T, ch): both products plain batched matmuls (`_layers.heads_first`).
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k * scale, v))

        def core(qb: jax.Array) -> jax.Array:
            w = jnp.einsum("bhtc,bhsc->bhts", qb * scale, k)
            w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
            return jnp.einsum("bhts,bhsc->bhtc", w, v)

        a = heads_last(by_query_blocks(core, q, axis=2))
        out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(a)
        return (seq + out).reshape(b, hh, ww, c)


class ADMUNet(nn.Module):
    """guided-diffusion `UNetModel`: (B, H, W, C_in), (B,), (B,)? -> (B, H, W, C_out)."""

    config: ADMConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        dtype = cfg.dtype
        mc = cfg.model_channels
        if (y is None) != (cfg.num_classes is None):
            raise ValueError("pass a class label y if and only if the model is class-conditional")
        emb = timestep_embedding(t, mc)
        emb = nn.Dense(cfg.time_embed_dim, name="time_embed_0")(emb)
        emb = nn.Dense(cfg.time_embed_dim, name="time_embed_2")(nn.silu(emb))
        if cfg.num_classes is not None:
            emb = emb + nn.Embed(cfg.num_classes, cfg.time_embed_dim, name="label_emb")(y)

        def attention(name: str, heads: int) -> AttentionBlock:
            return AttentionBlock(
                heads, cfg.num_head_channels, cfg.use_new_attention_order, dtype, name=name
            )

        def resblock(name: str, out: int, **updown: bool) -> ResBlock:
            return ResBlock(out, cfg.use_scale_shift_norm, dtype, name=name, **updown)

        h = x.astype(dtype)
        ch = int(cfg.channel_mult[0] * mc)
        h = _conv(ch, "input_blocks_0_0", dtype)(h)
        skips, skip_chans = [h], [ch]
        ds, block = 1, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                ch = int(mult * mc)
                h = resblock(f"input_blocks_{block}_0", ch)(h, emb)
                if ds in cfg.attention_ds:
                    h = attention(f"input_blocks_{block}_1", cfg.num_heads)(h)
                skips.append(h), skip_chans.append(ch)
                block += 1
            if level != len(cfg.channel_mult) - 1:
                name = f"input_blocks_{block}_0"
                if cfg.resblock_updown:
                    h = resblock(name, ch, down=True)(h, emb)
                else:
                    h = Downsample(ch, cfg.conv_resample, dtype, name=name)(h)
                skips.append(h), skip_chans.append(ch)
                ds, block = ds * 2, block + 1

        h = resblock("middle_block_0", ch)(h, emb)
        h = attention("middle_block_1", cfg.num_heads)(h)
        h = resblock("middle_block_2", ch)(h, emb)

        block = 0
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                skip_chans.pop()
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                ch = int(mc * mult)
                h = resblock(f"output_blocks_{block}_0", ch)(h, emb)
                sub = 1
                if ds in cfg.attention_ds:
                    h = attention(f"output_blocks_{block}_1", cfg.heads_upsample)(h)
                    sub = 2
                if level and i == cfg.num_res_blocks[level]:
                    name = f"output_blocks_{block}_{sub}"
                    if cfg.resblock_updown:
                        h = resblock(name, ch, up=True)(h, emb)
                    else:
                        h = Upsample(ch, cfg.conv_resample, dtype, name=name)(h)
                    ds //= 2
                block += 1

        h = h.astype(jnp.float32)
        h = nn.silu(GroupNorm32(name="out_0")(h))
        return _conv(cfg.out_channels, "out_2", jnp.float32, zero=True)(h)


def adm_init(config: ADMConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh parameters (zero-initialised where the original zero-initialises)."""
    size = config.size_multiple * 2
    x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if config.num_classes is None else jnp.zeros((1,), jnp.int32)
    return ADMUNet(config).init(key, x, t, y)["params"]


def adm_apply(
    config: ADMConfig,
    params: Mapping[str, Any],
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
) -> jax.Array:
    """Raw network output (B, H, W, out_channels) for x (B, H, W, 3), t (B,) int, y (B,)."""
    return ADMUNet(config).apply({"params": params}, x, t, y)


def abstract_params(config: ADMConfig) -> dict[str, Any]:
    """Parameter tree of `config` as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda k: adm_init(config, k), jax.random.key(0))


_SEGMENT = re.compile(r"(.*?)((?:_\d+)*)")
_PARAM_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> guided-diffusion state-dict key.

    `("input_blocks_1_0", "in_layers_2", "kernel")` -> `input_blocks.1.0.in_layers.2.weight`.
    """
    *modules, leaf = path
    parts = []
    for seg in modules:
        m = _SEGMENT.fullmatch(seg)
        assert m is not None
        parts.append(m.group(1))
        parts.extend(d for d in m.group(2).split("_") if d)
    parts.append(_PARAM_NAMES[leaf])
    return ".".join(parts)
