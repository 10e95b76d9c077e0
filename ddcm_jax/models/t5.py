"""The T5 encoder (transformers' `T5EncoderModel`) in Flax: FLUX's `text_encoder_2`.

The network follows transformers' T5 stack option for option, so that a
converted `T5EncoderModel` state dict computes the same function:

* token embedding `shared` (no position embedding: T5 encodes positions only
  through a learned relative-position bias);
* `num_layers` pre-norm blocks: RMS norm -> self-attention (+ residual), RMS
  norm -> feed-forward (+ residual); then `final_layer_norm`;
* self-attention WITHOUT the 1/sqrt(d_kv) scaling (T5 folds it into the
  initialisation), with the bias `relative_attention_bias[bucket(k - q)]`
  added to the scores. Only block 0 holds the bias table; the bias it
  computes is reused by every later block, as transformers passes
  `position_bias` down the stack. Buckets are the bidirectional (encoder) ones;
* the RMS norm is `T5LayerNorm`: mean of squares in float32, no mean
  subtraction, no bias;
* feed-forward `DenseReluDense`: gated (`wi_0`, `wi_1`, `wo`: act(x wi_0) *
  (x wi_1) wo) for `feed_forward_proj` "gated-<act>", plain (`wi`, `wo`)
  for "<act>"; act relu | gelu (erf) | gelu_new (tanh approximation, what
  "gated-gelu", T5 v1.1 and FLUX use) | silu. No linear layer has a bias.

`t5_encode` applies NO attention mask: every position, padding included,
attends to every other, as the FLUX pipeline calls the encoder (its
`last_hidden_state` for 512 padded tokens is the prompt embedding).

Module names are the PyTorch module paths with `.` -> `_`
(`encoder.block.0.layer.1.DenseReluDense.wi_0` ->
`encoder / block_0 / layer_1 / DenseReluDense / wi_0`); `torch_key` maps them
back (`wi_0` / `wi_1` are names, not list indices). Leaves `kernel` /
`scale` / `embedding` -> `weight`.

Tied embedding: `T5EncoderModel` ties `encoder.embed_tokens.weight` to
`shared.weight`, and the released files (FLUX.1-dev's included) store only
`shared.weight`. `plan_state_dict` accepts a file with `shared.weight`, with
only `encoder.embed_tokens.weight` (transformers loads that too), or with
both; then the duplicate must have the same shape (and, in
`params_from_state_dict`, the same values: transformers would untie two that
differ and compute with `encoder.embed_tokens`, so such a file is refused as
ambiguous) and is otherwise ignored. A full `T5ForConditionalGeneration`
state dict is accepted too: its `decoder.*` keys and `lm_head.weight` are
ignored, as `T5EncoderModel.from_pretrained` ignores them.

Mixed precision (`compute_dtype` bfloat16 | float16): the q/k/v/o and wi
projections and the attention products run in that dtype; the residual
stream, every RMS norm, the scores plus bias and the softmax stay float32,
and `wo` runs in float32 (transformers keeps `wo` in float32,
`_keep_in_fp32_modules`, because T5's feed-forward output overflows
float16). The float32 path asks for `Precision.HIGHEST` so that a GPU does
not silently use TF32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache, partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.jit import jit
from ddcm_jax.models._layers import (
    DTYPES,
    SDConfigError,
    check_dtype,
    check_float,
    check_int,
)

__all__ = [
    "ACTIVATIONS",
    "T5Config",
    "T5ConfigError",
    "T5Encoder",
    "T5StateDictError",
    "abstract_params",
    "param_count",
    "params_from_state_dict",
    "plan_state_dict",
    "relative_position_buckets",
    "t5_encode",
    "t5_encode_blockwise",
    "t5_init",
    "to_flax",
    "torch_key",
]

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
SHARED = "shared.weight"
EMBED_TOKENS = "encoder.embed_tokens.weight"  # tied to shared.weight; a duplicate when stored
# Input lengths accepted (T5 has no position table; this only bounds the (H, L, L) bias).
MAX_LENGTH = 1 << 14

# Upper bounds for an untrusted config.json (far above T5 v1.1 XXL: 32128 / 4096 / 64 /
# 10240 / 24 / 64).
_LIMITS = {
    "vocab_size": (1, 1 << 22),
    "d_model": (1, 1 << 16),
    "d_kv": (1, 1 << 14),
    "d_ff": (1, 1 << 18),
    "num_layers": (1, 1024),
    "num_heads": (1, 1024),
    # >= 4: the bidirectional split halves the buckets and log-spaces half of each half,
    # so fewer leave no exact bucket (a division by zero in transformers).
    "relative_attention_num_buckets": (4, 1 << 12),
    "relative_attention_max_distance": (2, 1 << 20),
}

# config.json entries that do not change the encoder's function (informational here):
# metadata; training-time dropout and init; what only the decoder, the LM head or
# generation read (num_decoder_layers, decoder_start_token_id, tie_word_embeddings /
# scale_decoder_outputs, use_cache, output_past); token ids the network never reads
# (pad / eos / bos: the tokenizer's business); n_positions (old T5 configs: the model has
# no position limit); the storage dtype (dtype / torch_dtype: the compute dtype is chosen
# by the caller); and generic `PretrainedConfig` / generation defaults older transformers
# wrote.
_IGNORED_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "dtype", "torch_dtype",
    "_attn_implementation_autoset", "dropout_rate", "classifier_dropout", "initializer_factor",
    "gradient_checkpointing", "num_decoder_layers", "decoder_start_token_id",
    "is_encoder_decoder", "use_cache", "output_past", "tie_word_embeddings",
    "scale_decoder_outputs", "pad_token_id", "eos_token_id", "bos_token_id", "n_positions",
    "task_specific_params", "output_hidden_states", "output_attentions", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "chunk_size_feed_forward",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "id2label",
    "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "tf_legacy_loss", "sep_token_id", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})  # fmt: skip
# Ignored only at these values: anything else would change the function
# (is_decoder true makes transformers' T5 stack causal with one-sided buckets).
_NEUTRAL_FIELDS = {"model_type": ("t5",), "is_decoder": (False,), "pruned_heads": ({},)}
# Architectures whose encoder is this network (T5WithLMHeadModel: the oldest configs).
_ARCHITECTURES = frozenset(
    {"T5EncoderModel", "T5ForConditionalGeneration", "T5Model", "T5WithLMHeadModel"}
)


def _short(value: Any) -> str:
    """repr of an untrusted value, cut to keep an error message short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class T5ConfigError(ValueError):
    """A config.json the port cannot honour (one line, naming the option)."""


class T5StateDictError(ValueError):
    """A state dict that does not match the architecture; lists the disagreements."""

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str],
                 misshaped: Sequence[str], mistyped: Sequence[str] = (),
                 conflicting: Sequence[str] = ()):  # fmt: skip
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.misshaped, self.mistyped = list(misshaped), list(mistyped)
        self.conflicting = list(conflicting)
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("mis-shaped", self.misshaped),
                            ("not floating point", self.mistyped),
                            ("conflicting", self.conflicting)):  # fmt: skip
            if keys:
                shown = ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__("T5 encoder state dict does not match the config: " + "; ".join(parts))


def _checked(check: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run one of `_layers`' validators, re-raised as a T5ConfigError."""
    try:
        return check(name, *args, **kwargs)
    except SDConfigError as e:
        raise T5ConfigError(f"T5 config: {e}") from None


def _parse_feed_forward(value: Any) -> tuple[bool, str]:
    """feed_forward_proj -> (gated, activation), as transformers' T5Config reads it."""
    if not isinstance(value, str):
        raise T5ConfigError(f"T5 config: feed_forward_proj must be a string, got {_short(value)}")
    parts = value.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    act = parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
        raise T5ConfigError(
            f"T5 config: feed_forward_proj {_short(value)} is not supported (supported: "
            f"{', '.join(ACTIVATIONS)}, each optionally as 'gated-<act>')"
        )
    # transformers' backward-compatibility rule: "gated-gelu" means the tanh approximation.
    return gated, "gelu_new" if value == "gated-gelu" else act


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a transformers T5 encoder (defaults: transformers 5's `T5Config`).

    `dense_act_fn` is derived from `feed_forward_proj` (None fills it in; a
    value that disagrees is refused). `compute_dtype` "float32" | "bfloat16" |
    "float16" is the dtype the projections run in (see the module docstring).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, (lo, hi) in _LIMITS.items():
            _checked(check_int, name, getattr(self, name), lo, hi)
        eps = _checked(check_float, "layer_norm_epsilon", self.layer_norm_epsilon, 0.0, 1.0,
                       open_lo=True)  # fmt: skip
        object.__setattr__(self, "layer_norm_epsilon", eps)
        _, act = _parse_feed_forward(self.feed_forward_proj)
        if self.dense_act_fn is None:
            object.__setattr__(self, "dense_act_fn", act)
        elif self.dense_act_fn != act:
            raise T5ConfigError(
                f"T5 config: dense_act_fn {_short(self.dense_act_fn)} disagrees with "
                f"feed_forward_proj {self.feed_forward_proj!r} (which means {act!r})"
            )
        exact = self.relative_attention_num_buckets // 4  # max_exact of the bidirectional split
        if self.relative_attention_max_distance <= exact:
            raise T5ConfigError(
                f"T5 config: relative_attention_max_distance {self.relative_attention_max_distance}"
                f" must exceed relative_attention_num_buckets // 4 = {exact}"
            )
        _checked(check_dtype, self.compute_dtype)

    @property
    def is_gated(self) -> bool:
        return _parse_feed_forward(self.feed_forward_proj)[0]

    @property
    def inner_dim(self) -> int:
        """num_heads * d_kv: the attention width (need not equal d_model)."""
        return self.num_heads * self.d_kv

    def to_json(self) -> dict[str, Any]:
        """A JSON object `from_json` reads back to an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, compute_dtype: str | None = None) -> T5Config:
        """Validate a transformers T5 config.json (untrusted) into a config.

        Fields that change the encoder are read (missing ones take
        transformers' defaults); `_IGNORED_FIELDS` are informational; a few
        (`_NEUTRAL_FIELDS`, `architectures`, `is_gated_act`, `dense_act_fn`)
        are accepted only at values that leave the function as implemented;
        anything else is refused in one line naming it. `compute_dtype`
        overrides one stored by `to_json` (default "float32").
        """
        if not isinstance(data, Mapping):
            raise T5ConfigError(f"T5 config must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, neutral in _NEUTRAL_FIELDS.items():
            if name in data and not any(
                data[name] == v and type(data[name]) is type(v) for v in neutral
            ):
                raise T5ConfigError(
                    f"T5 config: {name} = {_short(data[name])} is not supported "
                    f"(supported: {', '.join(map(repr, neutral))})"
                )
        archs = data.get("architectures")
        if archs is not None and (
            not isinstance(archs, list) or not archs
            or not all(isinstance(a, str) and a in _ARCHITECTURES for a in archs)
        ):  # fmt: skip
            raise T5ConfigError(
                f"T5 config: architectures {_short(archs)} is not supported "
                f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
            )
        known = fields | _IGNORED_FIELDS | set(_NEUTRAL_FIELDS) | {"architectures", "is_gated_act"}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise T5ConfigError(f"T5 config: unsupported option(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in fields}
        if compute_dtype is not None:
            kwargs["compute_dtype"] = compute_dtype
        config = cls(**kwargs)
        if "is_gated_act" in data and data["is_gated_act"] is not config.is_gated:
            # transformers recomputes it from feed_forward_proj; disagreeing means a hand edit.
            raise T5ConfigError(
                f"T5 config: is_gated_act {_short(data['is_gated_act'])} disagrees with "
                f"feed_forward_proj {config.feed_forward_proj!r}"
            )
        return config


def _precision(dtype: Any) -> jax.lax.Precision:
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query): (query_length, key_length) int32.

    transformers' `T5Attention._relative_position_bucket(bidirectional=True)`
    computed on the host in float32 exactly as torch does (float32 log,
    division by the float32 log(max_distance / max_exact), truncation): the
    same bucket for every relative position (checked against torch for
    |k - q| < 20,000 and several bucket settings). Shapes are static, so
    this is a constant of the compiled program.
    """
    rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    exact = half // 2
    scale = np.float32(math.log(max_distance / exact))
    # max(dist, 1) only keeps log(0) out; those positions take the exact branch.
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(exact)
    large = exact + (np.log(ratio) / scale * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < exact, dist, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """`T5LayerNorm`: x * rsqrt(mean(x^2) + eps) * weight, in float32; returns float32."""

    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        h = x.astype(jnp.float32)
        var = jnp.square(h).mean(axis=-1, keepdims=True)
        return (h * jax.lax.rsqrt(var + self.epsilon)) * scale.reshape((1,) * (h.ndim - 1) + (c,))


def _dense(features: int, name: str, dtype: Any, std: float) -> nn.Dense:
    # Bias-free, float32 parameters; `std` is transformers' `_init_weights` rule.
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        precision=_precision(dtype),
        kernel_init=nn.initializers.normal(std),
        name=name,
    )


class SelfAttention(nn.Module):
    """`T5Attention` (encoder): unscaled scores + relative position bias, float32 softmax.

    Returns (output (B, L, d_model), position_bias (1, H, L, L) float32): block 0
    computes the bias from its table, later blocks receive it.
    """

    config: T5Config
    has_relative_attention_bias: bool
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        b, length, d_model = x.shape
        h, d = cfg.num_heads, cfg.d_kv
        inner = cfg.inner_dim
        precision = _precision(self.dtype)
        q = _dense(inner, "q", self.dtype, (d_model * d) ** -0.5)(x).reshape(b, length, h, d)
        k = _dense(inner, "k", self.dtype, d_model**-0.5)(x).reshape(b, length, h, d)
        v = _dense(inner, "v", self.dtype, d_model**-0.5)(x).reshape(b, length, h, d)
        if position_bias is None:
            if not self.has_relative_attention_bias:  # not reached in the encoder stack
                raise AssertionError("T5 block without a bias table got no position bias")
            table = self.param(
                "relative_attention_bias",
                nn.initializers.normal(d_model**-0.5),
                (cfg.relative_attention_num_buckets, h),
                jnp.float32,
            )
            buckets = relative_position_buckets(length, length,
                                                cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)  # fmt: skip
            position_bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, H, L, L)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                       preferred_element_type=jnp.float32)  # fmt: skip
        w = jax.nn.softmax(s + position_bias, axis=-1).astype(self.dtype)
        a = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=precision).reshape(b, length, inner)
        return _dense(d_model, "o", self.dtype, inner**-0.5)(a), position_bias


class DenseReluDense(nn.Module):
    """`T5DenseGatedActDense` (wi_0, wi_1, wo) or `T5DenseActDense` (wi, wo); wo in float32."""

    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d_model, d_ff = x.shape[-1], cfg.d_ff
        act = {
            "relu": jax.nn.relu,
            "gelu": partial(jax.nn.gelu, approximate=False),
            # transformers' NewGELUActivation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            "gelu_new": partial(jax.nn.gelu, approximate=True),
            "silu": jax.nn.silu,
        }[cfg.dense_act_fn]
        if cfg.is_gated:
            hidden = act(_dense(d_ff, "wi_0", self.dtype, d_model**-0.5)(x))
            hidden = hidden * _dense(d_ff, "wi_1", self.dtype, d_model**-0.5)(x)
        else:
            hidden = act(_dense(d_ff, "wi", self.dtype, d_model**-0.5)(x))
        return _dense(d_model, "wo", jnp.float32, d_ff**-0.5)(hidden.astype(jnp.float32))


class LayerSelfAttention(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        h = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(x).astype(self.dtype)
        out, position_bias = SelfAttention(
            self.config, self.has_relative_attention_bias, self.dtype, name="SelfAttention"
        )(h, position_bias)
        return x + out.astype(jnp.float32), position_bias


class LayerFF(nn.Module):
    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = RMSNorm(self.config.layer_norm_epsilon, name="layer_norm")(x).astype(self.dtype)
        return x + DenseReluDense(self.config, self.dtype, name="DenseReluDense")(h)


class Block(nn.Module):
    config: T5Config
    has_relative_attention_bias: bool
    dtype: Any

    @nn.compact
    def __call__(
        self, x: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        x, position_bias = LayerSelfAttention(
            self.config, self.has_relative_attention_bias, self.dtype, name="layer_0"
        )(x, position_bias)
        return LayerFF(self.config, self.dtype, name="layer_1")(x), position_bias


class Stack(nn.Module):
    """`T5Stack` (encoder): the blocks and `final_layer_norm`, on a float32 residual stream."""

    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        position_bias = None
        for i in range(self.config.num_layers):
            x, position_bias = Block(self.config, i == 0, self.dtype, name=f"block_{i}")(
                x, position_bias
            )
        return RMSNorm(self.config.layer_norm_epsilon, name="final_layer_norm")(x)


class T5Encoder(nn.Module):
    """`T5EncoderModel`: ids (B, L) int -> last_hidden_state (B, L, d_model) float32."""

    config: T5Config

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        shared = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
                          embedding_init=nn.initializers.normal(1.0), name="shared")  # fmt: skip
        x = shared(input_ids.astype(jnp.int32)).astype(jnp.float32)
        return Stack(cfg, DTYPES[cfg.compute_dtype], name="encoder")(x)


def _check_ids(config: T5Config, input_ids: Any) -> Any:
    if not hasattr(input_ids, "shape"):
        input_ids = np.asarray(input_ids)
    shape, dtype = tuple(input_ids.shape), input_ids.dtype
    if len(shape) != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {dtype}")
    if not 1 <= shape[1] <= MAX_LENGTH:
        raise ValueError(f"input_ids length {shape[1]} is outside 1..{MAX_LENGTH}")
    if not isinstance(input_ids, jax.core.Tracer) and shape[0]:
        ids = np.asarray(input_ids)
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ValueError(
                f"input_ids hold ids outside 0..{config.vocab_size - 1} "
                f"(min {ids.min()}, max {ids.max()})"
            )
    return input_ids


def t5_init(config: T5Config, key: jax.Array) -> dict[str, Any]:
    """Fresh random parameters (transformers' `_init_weights` std rule, unit RMS norms)."""
    return _init(config, key)


@partial(jit, static_argnums=0)
def _init(config: T5Config, key: jax.Array) -> dict[str, Any]:
    # Compiled: op-by-op initialisation takes seconds even for the tiny model.
    return T5Encoder(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def t5_encode(config: T5Config, params: Mapping[str, Any], input_ids: jax.Array) -> jax.Array:
    """last_hidden_state (B, L, d_model) float32 of `input_ids` (B, L) integer.

    The final RMS norm is applied; no attention mask (FLUX passes none:
    padding attends and is attended to). Compiled once per (config, shapes)
    (config is static), so repeated eager calls reuse the program; under an
    outer jit only static facts are checked.
    """
    input_ids = _check_ids(config, input_ids)
    return _encode(config, params, input_ids)


@partial(jit, static_argnums=0)
def _encode(config: T5Config, params: Any, input_ids: jax.Array) -> jax.Array:
    return T5Encoder(config).apply({"params": params}, input_ids)


def t5_encode_blockwise(config: T5Config, read: Any, input_ids: jax.Array) -> jax.Array:
    """`t5_encode` holding one block's parameters at a time (T5-XXL is 19 GB as float32).

    `read(prefix)` returns the parameter subtree under `prefix`: ("shared",), then
    ("encoder", "block_<i>") for each block in order, then ("encoder", "final_layer_norm");
    each is released before the next is read. The same modules as `t5_encode`, compiled
    per block, so the values agree to float32 rounding (not bit for bit).
    """
    input_ids = _check_ids(config, input_ids)
    x = jnp.take(jnp.asarray(read(("shared",))["embedding"], jnp.float32), jnp.asarray(input_ids, jnp.int32), axis=0)
    position_bias = None
    for i in range(config.num_layers):
        x, position_bias = _block(config, i == 0, read(("encoder", f"block_{i}")), x, position_bias)
    return _final_norm(config, read(("encoder", "final_layer_norm")), x)


@partial(jit, static_argnums=(0, 1))
def _block(config: T5Config, first: bool, params: Any, x: jax.Array, position_bias: Any) -> Any:
    return Block(config, first, DTYPES[config.compute_dtype]).apply({"params": params}, x, position_bias)


@partial(jit, static_argnums=0)
def _final_norm(config: T5Config, params: Any, x: jax.Array) -> jax.Array:
    return RMSNorm(config.layer_norm_epsilon).apply({"params": params}, x)


def abstract_params(config: T5Config) -> dict[str, Any]:
    """Parameter tree of `config` as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda k: t5_init(config, k), jax.random.key(0))


def param_count(config: T5Config) -> int:
    """Number of parameters, by arithmetic (the tied encoder.embed_tokens counted once)."""
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    attention = 4 * d * inner + d  # q, k, v (d -> inner), o (inner -> d), layer_norm
    feed_forward = (3 if config.is_gated else 2) * d * ff + d  # wi_0, wi_1 | wi, wo, layer_norm
    bias_table = config.relative_attention_num_buckets * config.num_heads  # block 0 only
    return (config.vocab_size * d + config.num_layers * (attention + feed_forward)
            + bias_table + d)  # fmt: skip


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Module names that end in `_<digits>` without being ModuleList entries.
_LITERAL_NAMES = frozenset({"wi_0", "wi_1"})


def torch_key(path: Sequence[str]) -> str:
    """Flax parameter path -> transformers `T5EncoderModel` state-dict key.

    `("encoder", "block_0", "layer_1", "DenseReluDense", "wi_0", "kernel")` ->
    `encoder.block.0.layer.1.DenseReluDense.wi_0.weight`; `block_<i>` /
    `layer_<i>` are list entries, `wi_0` / `wi_1` names; the bias table
    (`relative_attention_bias`, a bare parameter here) is an `nn.Embedding`
    there: `...SelfAttention.relative_attention_bias.weight`.
    """
    *modules, leaf = path
    parts = []
    for name in modules:
        head, _, index = name.rpartition("_")
        if name not in _LITERAL_NAMES and head and index.isdigit():
            parts.extend((head, index))
        else:
            parts.append(name)
    if leaf == "relative_attention_bias":
        return ".".join([*parts, leaf, "weight"])
    if leaf not in _LEAF_NAMES:
        raise KeyError(f"no PyTorch name for the Flax leaf {leaf!r} in {'/'.join(path)}")
    return ".".join([*parts, _LEAF_NAMES[leaf]])


@lru_cache(maxsize=8)
def _leaf_shapes(config: T5Config) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    return tuple(sorted((tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in flat))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    # nn.Linear weight (out, in) <-> Flax Dense kernel (in, out); the rest as is.
    return shape[::-1] if path[-1] == "kernel" else shape


def to_flax(path: Sequence[str], array: Any) -> np.ndarray:
    """A state-dict array -> the Flax leaf at `path` (float32, contiguous): kernels transposed."""
    a = np.asarray(array).astype(np.float32, copy=False)
    return np.ascontiguousarray(a.T if path[-1] == "kernel" else a)


def _ignored_key(key: str) -> bool:
    # What a T5ForConditionalGeneration file adds: T5EncoderModel ignores "decoder" keys,
    # and the LM head is not part of the encoder.
    return key.startswith("decoder.") or key == "lm_head.weight"


def _shape_of(value: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in value)
    except (TypeError, ValueError):
        return None


def plan_state_dict(
    config: T5Config, shapes: Mapping[str, Sequence[int]]
) -> tuple[tuple[tuple[str, ...], str], ...]:
    """Match `{state-dict key: shape}` to `config`: ((flax path, file key), ...).

    Needs only shapes (a manifest will do). Every key must be used exactly
    once, except: the embedding may come as `shared.weight`,
    `encoder.embed_tokens.weight` or both (then the second is a tied
    duplicate: same shape required, not in the plan); `decoder.*` and
    `lm_head.weight` are ignored. Raises `T5StateDictError` listing every
    disagreement.
    """
    keys = [k for k in shapes if not _ignored_key(k)]
    missing, misshaped, entries = [], [], []
    used = set()
    for path, flax_shape in _leaf_shapes(config):
        name = torch_key(path)
        want = _torch_shape(path, flax_shape)
        if name == SHARED:
            if EMBED_TOKENS in shapes:
                used.add(EMBED_TOKENS)
                if SHARED in shapes:  # the tied duplicate: checked, then left out of the plan
                    got = _shape_of(shapes[EMBED_TOKENS])
                    if got != want:
                        misshaped.append(f"{EMBED_TOKENS} {got} (expected {want})")
                else:
                    name = EMBED_TOKENS
        if name not in shapes:
            missing.append(name)
            continue
        used.add(name)
        got = _shape_of(shapes[name])
        if got != want:
            misshaped.append(f"{name} {got} (expected {want})")
            continue
        entries.append((path, name))
    unexpected = sorted(set(keys) - used)
    if missing or unexpected or misshaped:
        raise T5StateDictError(sorted(missing), unexpected, misshaped)
    return tuple(entries)


def params_from_state_dict(config: T5Config, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """transformers `T5EncoderModel` state dict -> Flax params (float32 NumPy), strictly.

    The whole plan (names, shapes, floating dtypes, and a stored
    `encoder.embed_tokens.weight` equal to `shared.weight`) is checked
    before any array is converted; Linear weights (out, in) become kernels
    (in, out), embeddings and norm weights are taken as they are.
    """
    entries = plan_state_dict(config, {k: np.shape(v) for k, v in state_dict.items()})
    mistyped = []
    for _, key in entries:
        value = state_dict[key]
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            mistyped.append(f"{key} ({dtype})")
    if mistyped:
        raise T5StateDictError([], [], [], mistyped)
    if SHARED in state_dict and EMBED_TOKENS in state_dict:
        if not np.array_equal(np.asarray(state_dict[SHARED]), np.asarray(state_dict[EMBED_TOKENS])):
            raise T5StateDictError([], [], [], conflicting=[
                f"{EMBED_TOKENS} differs from {SHARED} (tied in T5EncoderModel; transformers "
                "would untie them and embed with encoder.embed_tokens)"
            ])  # fmt: skip
    params: dict[str, Any] = {}
    for path, key in entries:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = to_flax(path, state_dict[key])
    return params
