"""FLUX.1 as data: configs + parameters + fingerprint, MODEL_DIR I/O (family "flux").

A FLUX MODEL_DIR (written by `ddcm convert PIPELINE_DIR --format diffusers` from a
`FluxPipeline` folder)::

    MODEL_DIR/model.json                   family "flux": the transformer, VAE, CLIP and T5
                                           configs, the tokenizers' SHA-256, the fingerprints
    MODEL_DIR/weights/<component>.safetensors
                                           one file per network ("transformer", "vae",
                                           "text_encoder", "text_encoder_2") and "null"
                                           (`encode_prompt("")`), keys the '/'-joined Flax
                                           paths, float32 (bfloat16 / float16 kept as released)
    MODEL_DIR/tokenizer/, tokenizer_2/     the CLIP and the T5 tokenizer files, copied

Safetensors rather than orbax because the released transformer (11.9 B parameters)
does not fit this machine's memory: conversion writes it tensor by tensor and never
holds it (`ddcm_jax.tensorfile`). The fingerprint rule is the other families': the
SHA-256 over the canonical settings JSON plus `arrays_fingerprint`
(`modeldir.fingerprint` of the whole tree {component: params}), computed while
streaming.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import modeldir as M
from ddcm_jax.flux import FluxFamily
from ddcm_jax.jit import jit
from ddcm_jax.models import clip, flux_transformer, sd_vae, t5
from ddcm_jax.printable import printable

__all__ = [
    "COMPONENTS",
    "FAMILY",
    "FluxModel",
    "FluxModelConfig",
    "FluxModelError",
    "abstract_params",
    "implied_param_counts",
    "load_flux_model",
    "read_flux_model_json",
    "save_flux_model",
]

FAMILY = "flux"
NETWORKS = ("text_encoder", "text_encoder_2", "transformer", "vae")
COMPONENTS = (*NETWORKS, "null")
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_MAX_TOKENIZER_FILE = 16 << 20


class FluxModelError(ValueError):
    """A FLUX model setting that is malformed or not supported (one line)."""


def _hashes(names: Any, allowed: Sequence[str], required: Sequence[str], what: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(names, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise FluxModelError(f"{what} must map file names to hashes")
    if not set(required) <= set(names) <= set(allowed):
        raise FluxModelError(f"{what} files must be {', '.join(required)} (optionally {', '.join(allowed)}), "
                             f"got {printable(sorted(names))[:200]}")  # fmt: skip
    for digest in names.values():
        if not M.is_sha256(digest):
            raise FluxModelError(f"malformed {what} file hash")
    return tuple(sorted(names.items()))


def check_components(tr: flux_transformer.FluxTransformerConfig, vae: sd_vae.SDVAEConfig,
                     text: clip.CLIPTextConfig, text_2: t5.T5Config) -> None:  # fmt: skip
    """Refuse (FluxModelError) component configs that cannot work together."""
    if 4 * vae.latent_channels != tr.in_channels or tr.in_channels != tr.out_channels:
        raise FluxModelError(f"the transformer's in_channels {tr.in_channels} / out_channels {tr.out_channels} "
                             f"must be 4 x the VAE's latent_channels {vae.latent_channels} (2x2 patches)")  # fmt: skip
    if vae.shift_factor is None:
        raise FluxModelError("the VAE has no shift_factor (FLUX latents are (mode - shift) x scale)")
    if vae.in_channels != 3 or vae.out_channels != 3:
        raise FluxModelError("the VAE must map RGB images (in_channels / out_channels 3)")
    if text.hidden_size != tr.pooled_projection_dim:
        raise FluxModelError(f"the CLIP text encoder's hidden_size {text.hidden_size} differs from the "
                             f"transformer's pooled_projection_dim {tr.pooled_projection_dim}")  # fmt: skip
    if text_2.d_model != tr.joint_attention_dim:
        raise FluxModelError(f"the T5 encoder's d_model {text_2.d_model} differs from the transformer's "
                             f"joint_attention_dim {tr.joint_attention_dim}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FluxModelConfig:
    """Everything in a FLUX model.json except the fingerprints."""

    transformer: flux_transformer.FluxTransformerConfig
    vae: sd_vae.SDVAEConfig
    text_encoder: clip.CLIPTextConfig
    text_encoder_2: t5.T5Config
    tokenizer_files: tuple[tuple[str, str], ...]  # CLIP: (file name, "sha256:<hex>"), sorted
    tokenizer_2_files: tuple[tuple[str, str], ...]  # T5
    prompt_length: int = 77  # CLIP's
    prompt_length_t5: int = 512  # T5's (the pipeline's max_sequence_length)
    native_side: int = 1024  # the VAE's sample_size: what `generate` makes by default
    family: str = FAMILY
    converter_version: str = ""
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        check_components(self.transformer, self.vae, self.text_encoder, self.text_encoder_2)
        if not 2 <= self.prompt_length <= self.text_encoder.max_position_embeddings:
            raise FluxModelError(f"prompt_length must be in [2, {self.text_encoder.max_position_embeddings}]")
        if not isinstance(self.prompt_length_t5, int) or not 2 <= self.prompt_length_t5 <= 4096:
            raise FluxModelError("prompt_length_t5 must be in [2, 4096]")
        m = 2 * self.vae.downsampling_factor
        if not isinstance(self.native_side, int) or self.native_side < m or self.native_side % m or \
                self.native_side > 16384:  # fmt: skip
            raise FluxModelError(f"native_side must be a positive multiple of {m} up to 16384")

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
            "transformer": self.transformer.to_json(),
            "vae": self.vae.to_json(),
            "text_encoder": self.text_encoder.to_json(),
            "text_encoder_2": self.text_encoder_2.to_json(),
            "tokenizer": dict(self.tokenizer_files),
            "tokenizer_2": dict(self.tokenizer_2_files),
            "prompt_length": self.prompt_length,
            "prompt_length_t5": self.prompt_length_t5,
            "native_side": self.native_side,
        }

    def to_json(self, arrays_fingerprint: str, param_counts: Mapping[str, int]) -> dict[str, Any]:
        return {
            "format": M.MODEL_FORMAT,
            "format_version": M.MODEL_FORMAT_VERSION,
            **self.settings(),
            "converter_version": self.converter_version,
            "source": dict(self.source),
            "param_counts": dict(param_counts),
            "arrays_fingerprint": arrays_fingerprint,
            "fingerprint": M.settings_fingerprint(self.settings(), arrays_fingerprint),
        }

    @classmethod
    def from_json(cls, data: Any) -> tuple[FluxModelConfig, str, str]:
        """Parse and check a FLUX model.json object -> (config, fingerprint, arrays_fingerprint)."""
        if not isinstance(data, Mapping):
            raise FluxModelError("model.json must hold a JSON object")
        if data.get("format") != M.MODEL_FORMAT:
            raise FluxModelError(f"not a {M.MODEL_FORMAT} file")
        if data.get("format_version") != M.MODEL_FORMAT_VERSION or isinstance(data.get("format_version"), bool):
            raise FluxModelError("unsupported format_version")
        if data.get("family") != FAMILY:
            raise FluxModelError("not a FLUX model")
        fields = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                  "prompt_length", "prompt_length_t5", "native_side", "fingerprint", "arrays_fingerprint")  # fmt: skip
        known = {"format", "format_version", "family", "converter_version", "source", "param_counts", *fields}
        unknown = sorted(printable(k)[:40] for k in set(data) - known)
        if unknown:
            raise FluxModelError(f"unknown fields: {', '.join(unknown[:8])}")
        missing = [f for f in fields if f not in data]
        if missing:
            raise FluxModelError(f"missing field {missing[0]}")
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            if not isinstance(data[name], Mapping):
                raise FluxModelError(f"{name} must be a JSON object")
        converter_version, source = data.get("converter_version", ""), data.get("source", {})
        if not isinstance(converter_version, str) or not isinstance(source, Mapping):
            raise FluxModelError("converter_version must be a string and source an object")
        parsed = {
            "transformer": flux_transformer.FluxTransformerConfig.from_json(data["transformer"]),
            "vae": sd_vae.SDVAEConfig.from_json(data["vae"]),
            "text_encoder": clip.CLIPTextConfig.from_json(data["text_encoder"]),
            "text_encoder_2": t5.T5Config.from_json(data["text_encoder_2"]),
        }
        for name, cfg in parsed.items():
            if cfg.to_json() != data[name]:
                raise FluxModelError(f"{name} config is not in the form this version writes")
        ints = {k: data[k] for k in ("prompt_length", "prompt_length_t5", "native_side")}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
            raise FluxModelError("prompt_length, prompt_length_t5 and native_side must be integers")
        config = cls(
            **parsed,
            tokenizer_files=_hashes(data["tokenizer"], CLIP_TOKENIZER_FILES, CLIP_TOKENIZER_FILES[:3], "tokenizer"),
            tokenizer_2_files=_hashes(data["tokenizer_2"], T5_TOKENIZER_FILES, ("tokenizer.json",), "tokenizer_2"),
            **ints,
            converter_version=converter_version,
            source=dict(source),
        )
        fp, arrays = data["fingerprint"], data["arrays_fingerprint"]
        if not (M.is_sha256(fp) and M.is_sha256(arrays)):
            raise FluxModelError("missing or malformed fingerprint")
        if M.settings_fingerprint(config.settings(), arrays) != fp:
            raise FluxModelError("settings changed since the model was saved (fingerprint mismatch)")
        return config, fp, arrays


# --- parameters -------------------------------------------------------------------------------------


def abstract_params(config: FluxModelConfig) -> dict[str, Any]:
    """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
    t5_cfg, clip_cfg = config.text_encoder_2, config.text_encoder
    return {
        "text_encoder": clip.abstract_params(clip_cfg),
        "text_encoder_2": t5.abstract_params(t5_cfg),
        "transformer": flux_transformer.abstract_params(config.transformer),
        "vae": sd_vae.abstract_params(config.vae),
        "null": {
            "context": jax.ShapeDtypeStruct((1, config.prompt_length_t5, t5_cfg.d_model), jnp.float32),
            "pooled": jax.ShapeDtypeStruct((1, clip_cfg.hidden_size), jnp.float32),
        },
    }


def network_param_counts(configs: Mapping[str, Any]) -> dict[str, int]:
    """Parameters per network from its config alone, {network name: config} (arithmetic: milliseconds even
    for FLUX.1-dev); the converter asks this before a model config exists."""
    from ddcm_jax.latent_model import vae_param_count

    return {
        "text_encoder": clip.param_count(configs["text_encoder"]),
        "text_encoder_2": t5.param_count(configs["text_encoder_2"]),
        "transformer": flux_transformer.param_count(configs["transformer"]),
        "vae": vae_param_count(configs["vae"]),
    }


def implied_param_counts(config: FluxModelConfig) -> dict[str, int]:
    """`network_param_counts` of a model's configs."""
    return network_param_counts({"text_encoder": config.text_encoder, "text_encoder_2": config.text_encoder_2,
                                 "transformer": config.transformer, "vae": config.vae})  # fmt: skip


def leaf_entries(abstract: Any) -> list[tuple[str, tuple[int, ...]]]:
    """('/'-joined path, shape) of every leaf, sorted: the order files hold and hashes see them."""
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return sorted(("/".join(str(k.key) for k in path), tuple(leaf.shape)) for path, leaf in flat)


# --- the loaded model -----------------------------------------------------------------------------


@functools.partial(jit, static_argnums=0)
def _encode(config: sd_vae.SDVAEConfig, params: Any, images: jax.Array) -> jax.Array:
    mean, _ = sd_vae.vae_encode(config, params, images)
    return (mean - jnp.float32(config.shift_factor)) * jnp.float32(config.scaling_factor)


@functools.partial(jit, static_argnums=0)
def _decode(config: sd_vae.SDVAEConfig, params: Any, latents: jax.Array) -> jax.Array:
    z = latents / jnp.float32(config.scaling_factor) + jnp.float32(config.shift_factor)
    return sd_vae.vae_decode(config, params, z)


@jax.tree_util.register_pytree_node_class
class FluxModel(FluxFamily):
    """A loaded FLUX.1 model: `.config`, `.params`, `.fingerprint`, pure methods (a pytree of its
    parameters; configs and tokenizers static).

    * `transformer(hidden_states, timestep, guidance, encoder_hidden_states, pooled_projections,
      txt_ids, img_ids)`: diffusers' meanings, packed (B, N, 64) tokens, timestep t / 1000,
      guidance (B,) or None for a model without a guidance embedding.
    * `encode(images)` (B, H, W, 3) -> (B, H/8, W/8, 16) = (mode - shift) x scale;
      `decode(latents)` = vae.decode(latents / scale + shift), unclamped; both NHWC.
    * `tokenize(prompts)` CLIP ids (B, 77); `tokenize_t5(prompts)` T5 ids (B, 512);
      `encode_prompt(prompts)` -> (T5 last hidden state (B, 512, d), CLIP pooled (B, d')).
    """

    def __init__(self, config: FluxModelConfig, params: Any, fingerprint: str,
                 tokenizer: Any = None, tokenizer_2: Any = None) -> None:  # fmt: skip
        self.config = config
        self.params = params
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2

    family = FAMILY

    @property
    def guidance_embeds(self) -> bool:
        return self.config.transformer.guidance_embeds

    @property
    def null_conditioning(self) -> tuple[jax.Array, jax.Array]:
        return self.params["null"]["context"], self.params["null"]["pooled"]

    def transformer(self, hidden_states: jax.Array, timestep: jax.Array, guidance: jax.Array | None,
                    encoder_hidden_states: jax.Array, pooled_projections: jax.Array, txt_ids: Any,
                    img_ids: Any) -> jax.Array:  # fmt: skip
        return flux_transformer.flux_transformer_apply(
            self.config.transformer, self.params["transformer"], hidden_states, timestep, guidance,
            encoder_hidden_states, pooled_projections, txt_ids, img_ids)  # fmt: skip

    def encode(self, images: jax.Array) -> jax.Array:
        return _encode(self.config.vae, self.params["vae"], images)

    def decode(self, latents: jax.Array) -> jax.Array:
        return _decode(self.config.vae, self.params["vae"], latents)

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("this model has no CLIP tokenizer")
        return self.tokenizer(prompts)

    def tokenize_t5(self, prompts: str | Sequence[str]) -> np.ndarray:
        if self.tokenizer_2 is None:
            raise ValueError("this model has no T5 tokenizer")
        return self.tokenizer_2(prompts)

    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """(T5 last hidden state (B, L, d) without an attention mask, CLIP pooled output (B, d'))."""
        context = t5.t5_encode(self.config.text_encoder_2, self.params["text_encoder_2"], self.tokenize_t5(prompts))
        _, pooled = clip.clip_text_apply(self.config.text_encoder, self.params["text_encoder"], self.tokenize(prompts))
        return context, pooled

    def tree_flatten(self) -> tuple[tuple[Any], tuple[Any, ...]]:
        return (self.params,), (self.config, self.fingerprint, self.tokenizer, self.tokenizer_2)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any]) -> FluxModel:
        return cls(aux[0], children[0], aux[1], aux[2], aux[3])

    def __repr__(self) -> str:
        n = sum(implied_param_counts(self.config).values())
        tr = self.config.transformer
        kind = "dev-style" if tr.guidance_embeds else "schnell-style"
        return (f"FluxModel(flux {kind}, {tr.num_layers}+{tr.num_single_layers} blocks, {n:,} params, "
                f"{self.fingerprint[:19]}…)")  # fmt: skip


# --- writing ------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tokenizer_hashes(files: Mapping[str, bytes]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, _sha256(data)) for name, data in files.items()))


Producer = Callable[[str], np.ndarray]  # '/'-joined Flax path -> the array, in its stored dtype


def save_flux_model(model_dir: str | os.PathLike, config: FluxModelConfig,
                    tensors: Mapping[str, tuple[Mapping[str, Any], Producer]],
                    tokenizer_files: Mapping[str, bytes], tokenizer_2_files: Mapping[str, bytes], *,
                    overwrite: bool = False) -> str:  # fmt: skip
    """Write a FLUX MODEL_DIR atomically, streaming every tensor; returns the fingerprint.

    `tensors[component] = (dtypes, produce)`: the stored dtype of every leaf ('/'-joined
    path -> float32 / bfloat16 / float16) and the function that makes it, called once
    per leaf in file order; nothing else is held. Every component of
    `abstract_params(config)` must be given, leaf for leaf. Raises `ModelDirError`.
    """
    from ddcm_jax import tensorfile

    target = M.check_save_target(model_dir, overwrite)
    where = printable(target)
    abstract = abstract_params(config)
    if sorted(tensors) != sorted(COMPONENTS):
        raise M.ModelDirError(f"{where}: tensors for {sorted(tensors)}, expected {list(COMPONENTS)}")
    entries = {}
    for component in COMPONENTS:
        dtypes, _ = tensors[component]
        leaves = leaf_entries(abstract[component])
        if sorted(dtypes) != [n for n, _ in leaves]:
            raise M.ModelDirError(f"{where}: the {component} tensors do not match its config")
        entries[component] = [(name, shape, np.dtype(dtypes[name])) for name, shape in leaves]
    for files, listed, what in ((tokenizer_files, config.tokenizer_files, "tokenizer"),
                                (tokenizer_2_files, config.tokenizer_2_files, "tokenizer_2")):  # fmt: skip
        if tokenizer_hashes(files) != listed:
            raise M.ModelDirError(f"{where}: {what} files do not match the config's hashes")
    need = sum(math.prod(s) * d.itemsize for e in entries.values() for _, s, d in e) + (4 << 20)
    counts = implied_param_counts(config)
    result: dict[str, str] = {}

    def fill(stage: Path) -> None:
        h = hashlib.sha256()
        (stage / "weights").mkdir()
        for component in COMPONENTS:  # sorted: the canonical order of `modeldir.fingerprint`
            _, produce = tensors[component]
            tensorfile.write_streaming(stage / "weights" / f"{component}.safetensors", entries[component], produce,
                            lambda name, a, c=component: M.hash_leaf(h, f"{c}/{name}", a))  # fmt: skip
        arrays = "sha256:" + h.hexdigest()
        for folder, files in (("tokenizer", tokenizer_files), ("tokenizer_2", tokenizer_2_files)):
            (stage / folder).mkdir()
            for name, data in files.items():
                (stage / folder / name).write_bytes(data)
        meta = config.to_json(arrays, counts)
        (stage / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        result["fp"] = meta["fingerprint"]

    M.write_staged(target, overwrite, need, fill)
    return result["fp"]


# --- reading ------------------------------------------------------------------------------------


def read_flux_model_json(model_dir: str | os.PathLike) -> tuple[FluxModelConfig, str]:
    """Parse and check a FLUX MODEL_DIR's model.json -> (config, fingerprint); ModelDirError otherwise."""
    config, fp, _ = _read_config(Path(model_dir).absolute())
    return config, fp


def _read_config(root: Path) -> tuple[FluxModelConfig, str, str]:
    meta = root / "model.json"
    if not meta.is_file():
        raise M.no_model_json(root)
    data = M.read_json_object(meta)
    try:
        return FluxModelConfig.from_json(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise M.ModelDirError(f"{printable(meta)}: {printable(e)[:300]}") from None


def _read_files(folder: Path, listed: tuple[tuple[str, str], ...]) -> None:
    try:
        present = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise M.ModelDirError(f"{printable(folder)}: cannot read ({M.error_reason(e)})") from None
    if present != [n for n, _ in listed]:
        raise M.ModelDirError(f"{printable(folder)}: holds {printable(present)[:200]}, model.json lists "
                              f"{[n for n, _ in listed]}")  # fmt: skip
    for name, digest in listed:
        path = folder / name
        try:
            with M.open_regular(path) as f:  # a FIFO would block
                data = f.read(_MAX_TOKENIZER_FILE + 1)
        except OSError as e:
            raise M.ModelDirError(f"{printable(path)}: cannot read ({M.error_reason(e)})") from None
        if _sha256(data) != digest:
            raise M.ModelDirError(f"{printable(path)}: edited since the model was saved (hash mismatch)")


def _load_tokenizers(root: Path, config: FluxModelConfig) -> tuple[Any, Any]:
    from ddcm_jax.t5_tokenizer import T5Tokenizer, T5TokenizerError
    from ddcm_jax.tokenizer import CLIPTokenizer, TokenizerError

    _read_files(root / "tokenizer", config.tokenizer_files)
    _read_files(root / "tokenizer_2", config.tokenizer_2_files)
    try:
        tok, tok_2 = CLIPTokenizer.from_folder(root / "tokenizer"), T5Tokenizer.from_folder(root / "tokenizer_2")
    except (TokenizerError, T5TokenizerError) as e:
        raise M.ModelDirError(printable(e)[:400]) from None
    for t, want, folder in ((tok, config.prompt_length, "tokenizer"), (tok_2, config.prompt_length_t5, "tokenizer_2")):
        if t.model_max_length != want:
            raise M.ModelDirError(f"{printable(root / folder)}: model_max_length {t.model_max_length} differs "
                                  f"from model.json's {want}")  # fmt: skip
    return tok, tok_2


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> {'a': {'b': {'c': leaf}}} (the files' keys back into a parameter tree)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_flux_model(model_dir: str | os.PathLike, *, verify: bool = True) -> FluxModel:
    """Load a FLUX MODEL_DIR (`ddcm_jax.load_model` calls this for family "flux").

    model.json first (every config, the settings fingerprint), then the tokenizer files'
    hashes, then the memory the parameters need as float32 against the budget (refused
    before anything is read, in one line), then every weights file: exactly the leaves
    and shapes the configs imply, read tensor by tensor and (with `verify`) hashed
    against `arrays_fingerprint`. Raises `ModelDirError` (one line: path and reason).
    """
    from ddcm_jax.memory import budget_bytes, format_bytes
    from ddcm_jax.tensorfile import TensorFile

    root = Path(model_dir).absolute()
    config, fp, arrays = _read_config(root)
    tokenizer, tokenizer_2 = _load_tokenizers(root, config)
    counts = implied_param_counts(config)
    need, limit = 4 * sum(counts.values()), budget_bytes()
    if need > limit:
        raise M.ModelDirError(f"{printable(root)}: holds {sum(counts.values()):,} parameters, which need about "
                              f"{format_bytes(need)} as float32, more than the memory budget {format_bytes(limit)} "
                              "(set DDCM_MEMORY_LIMIT to change it)")  # fmt: skip
    abstract = abstract_params(config)
    h = hashlib.sha256()
    params: dict[str, Any] = {}
    for component in COMPONENTS:
        path = root / "weights" / f"{component}.safetensors"
        where = printable(path)
        want = dict(leaf_entries(abstract[component]))
        try:
            with TensorFile(path) as f:
                got = {n: f.shape(n) for n in f.names}
                if got != want:
                    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                    bad = sorted(n for n in set(want) & set(got) if want[n] != got[n])
                    raise M.ModelDirError(f"{where}: does not match model.json ({len(missing)} missing, "
                                          f"{len(extra)} unexpected, {len(bad)} mis-shaped tensors)")  # fmt: skip
                flat = {}
                for name in sorted(want):
                    a = f.read(name)
                    if verify:
                        M.hash_leaf(h, f"{component}/{name}", a)
                    flat[name] = jnp.asarray(a, jnp.float32)
                    del a
        except M.ModelDirError:
            raise
        except ValueError as e:
            raise M.ModelDirError(printable(e)[:400]) from None
        except MemoryError:
            raise M.ModelDirError(f"{where}: cannot read the parameters (out of memory)") from None
        except OSError as e:
            raise M.ModelDirError(f"{where}: cannot read ({M.error_reason(e)})") from None
        params[component] = nest(flat)
    if verify and "sha256:" + h.hexdigest() != arrays:
        raise M.ModelDirError(f"{printable(root)}: parameters do not match the fingerprint in model.json")
    return FluxModel(config, params, fp, tokenizer, tokenizer_2)
