"""A diffusers `FluxPipeline` folder -> a FLUX MODEL_DIR (`ddcm_jax.flux_model`), streaming.

The released FLUX.1-dev transformer is 23.8 GB in bfloat16, in three safetensors shards;
this machine has 24 GB of memory. So the transformer and the VAE are never held:
after every file's keys and shapes are planned against its config (from headers
alone, as the Stable Diffusion converter does), `save_flux_model` writes each tensor
as it is read, converted to the Flax layout (a Linear's (out, in) transposed, a
convolution's OIHW to HWIO) in its released floating dtype (bfloat16 stays
bfloat16; float32 stays float32). The peak is one tensor and its converted copy.

The two text encoders are held in float32 once, to compute `encode_prompt("")`
(T5 at the pipeline's 512 tokens without an attention mask, CLIP's pooled output),
which the MODEL_DIR stores as the Stable Diffusion null prompt is stored; they are
written from those arrays and released before the transformer is read. For
FLUX.1-dev that is T5-XXL's 4.76 B parameters (19 GB as float32): it must fit the
memory budget, which is checked (one line) before anything is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from ddcm_jax.convert.diffusers import (
    CONVERTER_VERSION,
    PipelineError,
    TensorSource,
    _check_count,
    _p,
    _read_bytes,
    _read_json,
    _read_tokenizer,
    _short,
    open_weights,
    plan_component,
    read_manifest,
)

from ddcm_jax.flux_model import network_param_counts
from ddcm_jax.models import _layers as L
from ddcm_jax.models import clip, flux_transformer, sd_vae, t5
from ddcm_jax.printable import printable

__all__ = ["PIPELINE_CLASS", "check_flux_manifest", "convert_flux_pipeline", "read_flux_configs"]

PIPELINE_CLASS = "FluxPipeline"
COMPONENT_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformer": ("diffusers", ("FluxTransformer2DModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "text_encoder_2": ("transformers", ("T5EncoderModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "tokenizer_2": ("transformers", ("T5TokenizerFast", "T5Tokenizer")),
    "scheduler": ("diffusers", ("FlowMatchEulerDiscreteScheduler",)),  # recorded; Turbo-DDCM never uses it
}
IGNORED_ENTRIES = ("feature_extractor", "image_encoder")
NETWORKS = ("text_encoder", "text_encoder_2", "transformer", "vae")
_T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _check_model_index(path: Path) -> dict[str, str]:
    where = _p(path)
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("_class_name") != PIPELINE_CLASS:
        raise PipelineError(f"{where}: not a {PIPELINE_CLASS} model_index.json")
    found = {}
    for name, (library, classes) in COMPONENT_CLASSES.items():
        entry = data.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
            raise PipelineError(f"{where}: {name} must be [library, class name], got {_short(entry)}")
        if entry[0] != library or entry[1] not in classes:
            raise PipelineError(f"{where}: unsupported {name} class {printable(entry[0])[:40]}."
                                f"{printable(entry[1])[:60]} (supported: {library} {' or '.join(classes)})")  # fmt: skip
        found[name] = entry[1]
    for key, entry in data.items():
        if key.startswith("_") or key in COMPONENT_CLASSES:
            continue
        if key in IGNORED_ENTRIES and entry in (None, [None, None]):
            continue
        raise PipelineError(f"{where}: unknown or unsupported pipeline component {printable(key)[:60]}")
    return found


class FluxConfigs:
    """The validated configs of a FLUX pipeline (or manifest) folder."""

    def __init__(self, root: Path, classes: Mapping[str, str], **configs: Any) -> None:
        self.root, self.classes, self.configs = root, dict(classes), configs

    def __getitem__(self, component: str) -> Any:
        return self.configs[component]


def read_flux_configs(root: str | os.PathLike, *, compute_dtype: str | None = None) -> FluxConfigs:
    """model_index.json and the four network configs, validated and checked together
    (each refusal a one-line `PipelineError` naming the file)."""
    from ddcm_jax.flux_model import FluxModelError, check_components

    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{_p(root)}: not a directory (a diffusers pipeline folder is expected)")
    classes = _check_model_index(root / "model_index.json")

    def parse(component: str, fn: Any) -> Any:
        path = root / component / "config.json"
        data = _read_json(path)
        try:
            return fn(data)
        except (ValueError, TypeError) as e:
            raise PipelineError(f"{_p(path)}: {printable(e)[:300]}") from None

    def text(d: Any) -> clip.CLIPTextConfig:
        if isinstance(d, Mapping) and d.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
            raise ValueError(f"unsupported architectures={_short(d['architectures'])} (only ['CLIPTextModel'])")
        return clip.CLIPTextConfig.from_json(d)

    def transformer(d: Any) -> flux_transformer.FluxTransformerConfig:
        return flux_transformer.FluxTransformerConfig.from_json(d, compute_dtype=compute_dtype)

    configs = {
        "transformer": parse("transformer", transformer),
        "vae": parse("vae", sd_vae.SDVAEConfig.from_json),
        "text_encoder": parse("text_encoder", text),
        "text_encoder_2": parse("text_encoder_2", t5.T5Config.from_json),
    }
    try:
        check_components(*(configs[c] for c in ("transformer", "vae", "text_encoder", "text_encoder_2")))
    except FluxModelError as e:
        raise PipelineError(f"{_p(root)}: {printable(e)}") from None
    return FluxConfigs(root, classes, **configs)


def _plan(component: str, config: Any, shapes: Mapping[str, Any], where: str) -> tuple[tuple[tuple[str, ...], str], ...]:
    """((Flax path, file key), ...) covering every parameter once, from shapes alone."""
    just = {k: s for k, (s, _) in shapes.items()}
    try:
        if component == "vae":
            return plan_component("vae", config, shapes).entries
        if component == "text_encoder":
            return plan_component("text_encoder", config, shapes).entries
        if component == "text_encoder_2":
            return t5.plan_state_dict(config, just)
        return flux_transformer.plan_state_dict(config, just)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{where}: {printable(e)[:900]}") from None


def _to_flax(component: str, path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if component == "text_encoder":
        return np.ascontiguousarray(array.T if path[-1] == "kernel" else array)
    if component == "text_encoder_2":
        return t5.to_flax(path, array)
    if component == "transformer":
        return flux_transformer.to_flax(path, array)
    return L.to_flax(array)


def _stored_dtype(dtype: Any) -> np.dtype:
    """bfloat16 and float16 weights are stored as released (half the bytes, nothing lost); the rest float32."""
    d = np.dtype(dtype)
    return d if d in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)) else np.dtype(np.float32)


def check_flux_manifest(folder: str | os.PathLike) -> dict[str, int]:
    """`check_manifest` for a FLUX pipeline: every key of every network's `state_dict_shapes.json`
    mapped from shapes alone; returns the parameter counts (and "total")."""
    folder = Path(folder)
    configs = read_flux_configs(folder)
    implied = network_param_counts(configs.configs)
    counts = {}
    for component in NETWORKS:
        path = folder / component / "state_dict_shapes.json"
        shapes = read_manifest(path)
        _check_count(component, implied[component], shapes, _p(path))
        _plan(component, configs[component], shapes, _p(path))
        counts[component] = implied[component]
    counts["total"] = sum(counts.values())
    return counts


def _read_t5_tokenizer(folder: Path, config: t5.T5Config) -> tuple[Any, dict[str, bytes]]:
    from ddcm_jax.t5_tokenizer import T5Tokenizer, T5TokenizerError

    if not folder.is_dir():
        raise PipelineError(f"{_p(folder)}: missing (the tokenizer_2 component's folder)")
    files = {}
    for name in _T5_TOKENIZER_FILES:
        path = folder / name
        if name == "tokenizer.json" or os.path.lexists(path):
            files[name] = _read_bytes(path, 64 << 20)
    try:
        tok = T5Tokenizer.from_bytes(files["tokenizer.json"], files.get("tokenizer_config.json"),
                                     _p(folder / "tokenizer.json"))  # fmt: skip
    except T5TokenizerError as e:
        raise PipelineError(printable(e)[:400]) from None
    top = tok.max_id if hasattr(tok, "max_id") else None
    if top is not None and top >= config.vocab_size:
        raise PipelineError(f"{_p(folder / 'tokenizer.json')}: token ids reach {top}, the T5 encoder's "
                            f"vocab_size is {config.vocab_size}")  # fmt: skip
    return tok, files


def _reader(entries: Any, source: TensorSource) -> Any:
    """`read(prefix)`: the float32 subtree of a network's parameters under a path prefix, read
    from its files when asked (`t5.t5_encode_blockwise`); the tensors stay readable again."""
    from ddcm_jax.flux_model import nest

    def read(prefix: tuple[str, ...]) -> dict[str, Any]:
        n = len(prefix)
        flat = {"/".join(path[n:]): np.asarray(_to_flax("text_encoder_2", path, source.peek(key)), np.float32)
                for path, key in entries if path[:n] == prefix}  # fmt: skip
        return nest(flat)

    return read


def _fill(component: str, entries: Any, source: TensorSource) -> dict[str, np.ndarray]:
    """{'/'-joined Flax path: float32 array} of a (small) network, read whole."""
    by_key = {key: path for path, key in entries}
    return {"/".join(by_key[k]): np.asarray(_to_flax(component, by_key[k], source.read(k)), np.float32)
            for k in source.order(list(by_key))}  # fmt: skip


def convert_flux_pipeline(pipeline_dir: str | os.PathLike, model_dir: str | os.PathLike, *,
                          compute_dtype: str | None = None, overwrite: bool = False) -> str:  # fmt: skip
    """Convert a diffusers FLUX.1 folder into a FLUX MODEL_DIR; returns the fingerprint.

    Order: the target checked, every config validated and checked together, both
    tokenizers parsed, every weights file's keys and shapes planned (headers only);
    the memory the text encoders need checked against the budget; then the two text
    encoders read and `encode_prompt("")` computed; then everything written, the
    transformer and the VAE streamed tensor by tensor (`save_flux_model`).
    """
    from ddcm_jax.flux_model import FluxModelConfig, nest, save_flux_model, tokenizer_hashes
    from ddcm_jax.memory import budget_bytes, format_bytes
    from ddcm_jax.model import check_save_target, remove_stale_staging

    root = Path(pipeline_dir)
    check_save_target(model_dir, overwrite)
    remove_stale_staging(model_dir)
    configs = read_flux_configs(root, compute_dtype=compute_dtype)
    implied = network_param_counts(configs.configs)
    clip_tok, clip_files = _read_tokenizer(root / "tokenizer", configs["text_encoder"])
    t5_tok, t5_files = _read_t5_tokenizer(root / "tokenizer_2", configs["text_encoder_2"])
    sources: dict[str, TensorSource] = {}
    try:
        plans = {}
        for component in NETWORKS:
            source = open_weights(root / component, component)
            sources[component] = source
            _check_count(component, implied[component], source.shapes, source.where)
            plans[component] = _plan(component, configs[component], source.shapes, source.where)
        largest = max(4 * int(np.prod(s)) for src in sources.values() for s, _ in src.shapes.values())
        t5_cfg = configs["text_encoder_2"]
        block = (implied["text_encoder_2"] - t5_cfg.vocab_size * t5_cfg.d_model) // t5_cfg.num_layers
        need = 4 * (implied["text_encoder"] + 2 * block + t5_cfg.vocab_size * t5_cfg.d_model) + 3 * largest
        if need > budget_bytes():
            raise PipelineError(f"{_p(root)}: computing the empty prompt's embedding needs about "
                                f"{format_bytes(need)} (CLIP and one T5 block as float32), more than the memory "
                                f"budget {format_bytes(budget_bytes())} (set DDCM_MEMORY_LIMIT to change it)")  # fmt: skip
        clip_params = _fill("text_encoder", plans["text_encoder"], sources["text_encoder"])
        with jax.default_matmul_precision("highest"):
            context = t5.t5_encode_blockwise(configs["text_encoder_2"],
                                             _reader(plans["text_encoder_2"], sources["text_encoder_2"]),
                                             t5_tok([""]))  # fmt: skip
            _, pooled = clip.clip_text_apply(configs["text_encoder"], nest(clip_params), clip_tok([""]))
        null = {"context": np.asarray(context, np.float32), "pooled": np.asarray(pooled, np.float32)}
        sources.pop("text_encoder").close()
        tensors: dict[str, Any] = {
            "null": ({k: np.float32 for k in null}, null.pop),
            "text_encoder": ({k: np.float32 for k in clip_params}, clip_params.pop),
        }
        for component in ("text_encoder_2", "transformer", "vae"):
            source, by_name = sources[component], {"/".join(p): (p, k) for p, k in plans[component]}

            def produce(name: str, c: str = component, src: TensorSource = source,
                        names: dict[str, Any] = by_name) -> np.ndarray:  # fmt: skip
                path, key = names[name]
                array = src.read(key)
                return np.ascontiguousarray(_to_flax(c, path, array), _stored_dtype(array.dtype))

            dtypes = {n: _stored_dtype(source.shapes[k][1]) for n, (_, k) in by_name.items()}
            tensors[component] = (dtypes, produce)
        vae = configs["vae"]
        config = FluxModelConfig(
            transformer=configs["transformer"],
            vae=vae,
            text_encoder=configs["text_encoder"],
            text_encoder_2=configs["text_encoder_2"],
            tokenizer_files=tokenizer_hashes(clip_files),
            tokenizer_2_files=tokenizer_hashes(t5_files),
            prompt_length=clip_tok.model_max_length,
            prompt_length_t5=t5_tok.model_max_length,
            native_side=_native_side(vae),
            converter_version=CONVERTER_VERSION,
            source={
                "format": "diffusers",
                "pipeline": root.absolute().name,
                "classes": dict(configs.classes),
                "weights": {c: s.label for c, s in sources.items()},
            },
        )
        return save_flux_model(model_dir, config, tensors, clip_files, t5_files, overwrite=overwrite)
    finally:
        for source in sources.values():
            source.close()


def _native_side(vae: sd_vae.SDVAEConfig) -> int:
    """The VAE's sample_size (1024 for FLUX.1), rounded down to a multiple of 16; 1024 if unset."""
    size = vae.sample_size
    side = size[0] if isinstance(size, tuple) else size
    m = 2 * vae.downsampling_factor
    return max(m, (int(side) // m) * m) if side else 1024
