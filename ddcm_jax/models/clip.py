"""The CLIP text encoder (transformers' `CLIPTextModel`) in Flax.

The network follows the published CLIP text transformer option for option, so
that a converted `CLIPTextModel` state dict computes the same function:
token + learned position embedding, `num_hidden_layers` pre-LayerNorm encoder
layers (layer_norm1 -> causal multi-head self-attention -> residual;
layer_norm2 -> fc1 -> activation -> fc2 -> residual) and `final_layer_norm`.
`clip_text_apply` returns `last_hidden_state` (after the final LayerNorm: what
Stable Diffusion feeds its UNet) and `pooler_output` (the hidden state at the
end-of-text token, picked exactly as transformers 5 picks it).

Module names are the PyTorch module paths of transformers' `CLIPTextModel`
with `.` -> `_` (`encoder.layers.0.self_attn.q_proj` ->
`encoder / layers_0 / self_attn / q_proj`), leaves `kernel` / `scale` /
`embedding` -> `weight` (`torch_key`). Released Stable Diffusion files (and
transformers 4) prefix every key with `text_model.`; transformers 5 drops it.
`params_from_state_dict` accepts either.

Mixed precision: with `dtype=bfloat16 | float16` the linear layers, the
attention products and the residual stream run in that dtype; the embeddings
are summed in float32, every LayerNorm and the attention softmax are computed
in float32 (and cast back), and both outputs are float32. The float32 path
asks for `Precision.HIGHEST` so that a GPU does not silently use TF32.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.jit import jit

__all__ = [
    "CLIPConfigError",
    "CLIPStateDictError",
    "CLIPTextConfig",
    "CLIPTextTransformer",
    "abstract_params",
    "clip_text_apply",
    "clip_text_init",
    "param_count",
    "params_from_state_dict",
    "plan_state_dict",
    "torch_key",
]

ACTIVATIONS = ("gelu", "quick_gelu")
PREFIX = "text_model."
# A buffer (arange(max_positions)) older transformers saved with the weights;
# transformers 5 ignores it on load (non-persistent) and so do we.
POSITION_IDS = "embeddings.position_ids"

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Upper bounds for an untrusted config.json (far above any released CLIP).
_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "max_position_embeddings": 1 << 16,
}

# config.json entries that do not change the function computed at inference
# (training-time dropout and init, token ids the model never reads, metadata
# and generic `PretrainedConfig` / generation defaults older transformers wrote).
_IGNORED_FIELDS = frozenset({
    "_name_or_path", "architectures", "attention_dropout", "dropout", "bos_token_id",
    "pad_token_id", "projection_dim", "initializer_factor", "initializer_range", "dtype",
    "torch_dtype", "transformers_version", "_attn_implementation_autoset",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "use_cache",
    "torchscript", "use_bfloat16", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "id2label", "label2id", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "tf_legacy_loss",
    "sep_token_id", "decoder_start_token_id", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})  # fmt: skip
# Ignored only at these values: anything else would change the function.
_NEUTRAL_FIELDS = {"pruned_heads": ({},), "model_type": ("clip_text_model",)}


def _short(value: Any) -> str:
    """repr of an untrusted value, cut to keep an error message short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CLIPConfigError(ValueError):
    """A config.json the port cannot honour (one line, naming the option)."""


class CLIPStateDictError(ValueError):
    """A state dict that does not match the architecture; lists the disagreements."""

    def __init__(self, missing: list[str], unexpected: list[str], misshaped: list[str],
                 mistyped: Sequence[str] = ()):  # fmt: skip
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        self.mistyped = list(mistyped)
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", misshaped), ("not floating point", self.mistyped)):  # fmt: skip
            if keys:
                shown = ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__(
            "CLIP text encoder state dict does not match the config: " + "; ".join(parts)
        )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CLIPConfigError(f"CLIP text config: {name} must be an integer, got {_short(value)}")
    if not 1 <= value <= _LIMITS[name]:
        raise CLIPConfigError(f"CLIP text config: {name} = {value} is outside 1..{_LIMITS[name]}")
    return value


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a transformers `CLIPTextModel` (defaults: transformers 5's)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        for name in _LIMITS:
            _positive_int(name, getattr(self, name))
        if self.hidden_act not in ACTIVATIONS:
            raise CLIPConfigError(
                f"CLIP text config: hidden_act {_short(self.hidden_act)} is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise CLIPConfigError(
                f"CLIP text config: layer_norm_eps must be in (0, 1), got {_short(eps)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise CLIPConfigError(
                f"CLIP text config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        eos = self.eos_token_id
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < 1 << 31:
            raise CLIPConfigError(
                f"CLIP text config: eos_token_id must be one non-negative integer, got {_short(eos)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def legacy_pooling(self) -> bool:
        """eos_token_id == 2 (configs older than transformers PR #24773): pool at argmax(ids)."""
        return self.eos_token_id == 2

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CLIPTextConfig:
        """Validate a transformers text-encoder config.json (untrusted) into a config.

        Fields that change the function are read (missing ones take
        transformers' defaults); fields without effect at inference are
        ignored; anything else is refused in one line naming it.
        """
        if not isinstance(data, Mapping):
            raise CLIPConfigError(
                f"CLIP text config must be a JSON object, got {type(data).__name__}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, neutral in _NEUTRAL_FIELDS.items():
            if name in data and data[name] not in neutral:
                raise CLIPConfigError(
                    f"CLIP text config: {name} = {_short(data[name])} is not supported "
                    f"(supported: {', '.join(map(repr, neutral))})"
                )
        unknown = sorted(set(data) - fields - _IGNORED_FIELDS - set(_NEUTRAL_FIELDS))
        if unknown:
            raise CLIPConfigError(f"CLIP text config: unsupported option(s): {', '.join(unknown)}")
        if "layer_norm_eps" in data and isinstance(data["layer_norm_eps"], int):
            data = {**data, "layer_norm_eps": float(data["layer_norm_eps"])}
        return cls(**{k: v for k, v in data.items() if k in fields})


def _dtype(dtype: Any) -> Any:
    if dtype is None:
        return jnp.float32
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(_DTYPES)}, got {_short(dtype)}")
    return _DTYPES[name]


def _precision(dtype: Any) -> jax.lax.Precision:
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, computed in float32; returns float32."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        h = x.astype(jnp.float32)
        mean = h.mean(axis=-1, keepdims=True)
        var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
        y = (h - mean) * jax.lax.rsqrt(var + self.epsilon)
        bshape = (1,) * (h.ndim - 1) + (c,)
        return y * scale.reshape(bshape) + bias.reshape(bshape)


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=_precision(dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class Attention(nn.Module):
    """CLIPAttention with the causal mask: q scaled by head_dim^-1/2, softmax in float32."""

    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, c = x.shape
        d = c // self.num_heads
        precision = _precision(self.dtype)
        q = _dense(c, "q_proj", self.dtype)(x) * jnp.asarray(d**-0.5, self.dtype)
        k = _dense(c, "k_proj", self.dtype)(x)
        v = _dense(c, "v_proj", self.dtype)(x)
        q, k, v = (a.reshape(b, length, self.num_heads, d) for a in (q, k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision).astype(jnp.float32)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        s = jnp.where(causal, s, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(s, axis=-1).astype(self.dtype)
        a = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=precision).reshape(b, length, c)
        return _dense(c, "out_proj", self.dtype)(a)


class MLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.intermediate_size, "fc1", self.dtype)(x)
        if self.hidden_act == "quick_gelu":
            h = h * jax.nn.sigmoid(jnp.asarray(1.702, h.dtype) * h)
        else:  # "gelu": the exact erf form, as torch.nn.functional.gelu
            h = jax.nn.gelu(h, approximate=False)
        return _dense(x.shape[-1], "fc2", self.dtype)(h)


class EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x).astype(self.dtype)
        x = x + Attention(cfg.num_attention_heads, self.dtype, name="self_attn")(h)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x).astype(self.dtype)
        return x + MLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)


class Encoder(nn.Module):
    config: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class Embeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32,
                       embedding_init=init, name="token_embedding")  # fmt: skip
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, param_dtype=jnp.float32,
                       embedding_init=init, name="position_embedding")  # fmt: skip
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
        return tok(input_ids) + pos(positions)


class CLIPTextTransformer(nn.Module):
    """`CLIPTextModel`: ids (B, L) int -> (last_hidden_state (B, L, H), pooler_output (B, H))."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = Embeddings(cfg, name="embeddings")(input_ids).astype(self.dtype)
        x = Encoder(cfg, self.dtype, name="encoder")(x)
        last = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(x)
        ids = input_ids.astype(jnp.int32)
        if cfg.legacy_pooling:
            # transformers keeps the pre-#24773 rule for eos_token_id == 2: the
            # end-of-text token is the largest id (first one on ties).
            index = jnp.argmax(ids, axis=-1)
        else:  # the first position holding eos_token_id (0 if there is none)
            index = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(ids.shape[0]), index]
        return last, pooled


def _check_ids(config: CLIPTextConfig, input_ids: Any) -> Any:
    if not hasattr(input_ids, "shape"):
        input_ids = np.asarray(input_ids)
    shape, dtype = tuple(input_ids.shape), input_ids.dtype
    if len(shape) != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {dtype}")
    if not 1 <= shape[1] <= config.max_position_embeddings:
        raise ValueError(
            f"input_ids length {shape[1]} is outside 1..{config.max_position_embeddings} "
            "(max_position_embeddings)"
        )
    if not isinstance(input_ids, jax.core.Tracer) and shape[0]:
        ids = np.asarray(input_ids)
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ValueError(
                f"input_ids hold ids outside 0..{config.vocab_size - 1} "
                f"(min {ids.min()}, max {ids.max()})"
            )
    return input_ids


def clip_text_init(config: CLIPTextConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh random parameters (normal(0.02) weights, unit LayerNorms)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return CLIPTextTransformer(config).init(key, ids)["params"]


def clip_text_apply(
    config: CLIPTextConfig,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    *,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """(last_hidden_state (B, L, H), pooler_output (B, H)), both float32.

    `input_ids` (B, L) integer with L <= max_position_embeddings (77 for
    Stable Diffusion: what `CLIPTokenizer` gives). `dtype` None | "float32" |
    "bfloat16" | "float16" (or the jnp dtype) is the compute dtype.
    """
    input_ids = _check_ids(config, input_ids)
    return _apply(config, _dtype(dtype), params, input_ids)


@partial(jit, static_argnums=(0, 1))
def _apply(config: CLIPTextConfig, dtype: Any, params: Any, input_ids: jax.Array) -> Any:
    # Compiled once per (config, dtype, shapes); inlined when the caller is traced.
    return CLIPTextTransformer(config, dtype).apply({"params": params}, input_ids)


def abstract_params(config: CLIPTextConfig) -> dict[str, Any]:
    """Parameter tree of `config` as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda k: clip_text_init(config, k), jax.random.key(0))


def param_count(config: CLIPTextConfig) -> int:
    """Number of parameters (the position_ids buffer is not one)."""
    return sum(math.prod(shape) for _, shape in _leaf_shapes(config))


# The rule of `ddcm_jax.models.adm.torch_key`: trailing `_<digits>` groups of a module
# name are PyTorch list indices; Flax leaf names map to PyTorch's.
_SEGMENT = re.compile(r"(.*?)((?:_\d+)*)")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> transformers `CLIPTextModel` state-dict key (no prefix).

    `("encoder", "layers_0", "self_attn", "q_proj", "kernel")` ->
    `encoder.layers.0.self_attn.q_proj.weight`. Files may add `text_model.`.
    """
    *modules, leaf = path
    parts = []
    for name in modules:  # "layers_11" -> "layers", "11"; "layer_norm1", "self_attn" stay whole
        m = _SEGMENT.fullmatch(name)
        assert m is not None
        parts.append(m.group(1))
        parts.extend(d for d in m.group(2).split("_") if d)
    return ".".join([*parts, _LEAF_NAMES[leaf]])


@lru_cache(maxsize=8)
def _leaf_shapes(config: CLIPTextConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    return tuple(sorted((tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in flat))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    # nn.Linear weight (out, in) <-> Flax Dense kernel (in, out); the rest as is.
    return shape[::-1] if path[-1] == "kernel" else shape


def plan_state_dict(
    config: CLIPTextConfig, shapes: Mapping[str, Sequence[int]]
) -> tuple[tuple[tuple[str, ...], str], ...]:
    """Match `{state-dict key: shape}` to `config`: ((flax path, file key), ...).

    Needs only shapes (a manifest will do). Every key must be used exactly
    once, with or without the `text_model.` prefix (all keys alike); the
    `embeddings.position_ids` buffer is the one key allowed to go unused.
    Raises `CLIPStateDictError` listing every disagreement.
    """
    keys = list(shapes)
    prefixed = [k for k in keys if k.startswith(PREFIX)]
    prefix = PREFIX if prefixed else ""
    unexpected = sorted(k for k in keys if not k.startswith(prefix) or k == prefix)
    by_name = {k[len(prefix) :]: k for k in keys if k.startswith(prefix) and k != prefix}
    missing, misshaped, entries = [], [], []
    used = set()
    for path, flax_shape in _leaf_shapes(config):
        name = torch_key(path)
        if name not in by_name:
            missing.append(prefix + name)
            continue
        key = by_name[name]
        used.add(key)
        want = _torch_shape(path, flax_shape)
        try:
            got = tuple(int(d) for d in shapes[key])
        except (TypeError, ValueError):
            got = None
        if got != want:
            misshaped.append(f"{key} {got} (expected {want})")
            continue
        entries.append((path, key))
    ignored = {prefix + POSITION_IDS}
    unexpected += sorted(set(by_name.values()) - used - ignored)
    if missing or unexpected or misshaped:
        raise CLIPStateDictError(sorted(missing), sorted(unexpected), misshaped)
    return tuple(entries)


def params_from_state_dict(
    config: CLIPTextConfig, state_dict: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """transformers `CLIPTextModel` state dict -> Flax params (float32 NumPy), strictly.

    The whole plan (names, shapes, floating dtypes) is checked before any
    array is converted; Linear weights (out, in) become kernels (in, out),
    embeddings, LayerNorm weights and biases are taken as they are.
    """
    entries = plan_state_dict(config, {k: np.shape(v) for k, v in state_dict.items()})
    mistyped = []
    for _, key in entries:
        value = state_dict[key]
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            mistyped.append(f"{key} ({dtype})")
    if mistyped:
        raise CLIPStateDictError([], [], [], mistyped)
    params: dict[str, Any] = {}
    for path, key in entries:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        value = np.asarray(state_dict[key]).astype(np.float32)
        node[path[-1]] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    return params
