"""diffusers Stable Diffusion pipeline folder -> a ddcm_jax latent MODEL_DIR (see `ddcm_jax.latent_model`).

    ddcm convert PIPELINE_DIR -o MODEL_DIR --format diffusers

PIPELINE_DIR is what `StableDiffusionPipeline.save_pretrained` writes (or a
Hugging Face cache snapshot of it, whose files are symbolic links to blobs):
`model_index.json`, `unet/`, `vae/`, `text_encoder/` (each `config.json` plus
weights), `tokenizer/`, `scheduler/scheduler_config.json`. Weights are read,
per component, from the first of: `<name>.safetensors`,
`<name>.safetensors.index.json` (shards), `<name>.bin`, `<name>.bin.index.json`,
then the same with the `fp16` variant, where <name> is
`diffusion_pytorch_model` (UNet, VAE) or `model` / `pytorch_model` (text encoder).

Strictness, as for guided-diffusion checkpoints: every config is validated
before any weight is touched; every key of every file must name exactly one
parameter with its exact shape and a floating dtype, and every parameter must
be given (`plan_component`), for all three networks, before any array is read;
the only keys knowingly skipped are the text encoder's `position_ids` buffer,
and the VAE's pre-0.15 attention names are renamed first
(`sd_vae.rename_legacy_keys`). Any refusal is one line naming the file, and
nothing is written.

Memory: `.safetensors` files are read one tensor at a time (seek + read into a
fresh array, converted to its float32 Flax layout, the source released), so
conversion holds one float32 copy of the parameters plus one tensor. A `.bin`
file is read whole by the allow-listed unpickler of `checkpoint.py` (its
storages and the tensors rebuilt from them, about twice the file, at the peak
of reading), then converted tensor by tensor, each source tensor released as
its parameter is made.

`check_manifest(DIR)` runs the same planning on a folder of
`state_dict_shapes.json` manifests (no weights), abstractly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from ddcm_jax.convert.checkpoint import (
    CheckpointError,
    header_refusal,
    json_cost,
    read_state_dict,
    strict_json,
)

from ddcm_jax.models import _layers as L
from ddcm_jax.models import clip, sd_unet, sd_vae
from ddcm_jax.printable import printable

__all__ = [
    "COMPONENT_CLASSES",
    "ComponentPlan",
    "PipelineError",
    "check_manifest",
    "convert_pipeline",
    "plan_component",
    "read_pipeline_configs",
    "run",
]

CONVERTER_VERSION = "1"

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
COMPONENT_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", ()),  # any of latent_model.SCHEDULER_CLASSES
}
# model_index.json entries a pipeline may carry that the compressor does not use.
IGNORED_ENTRIES = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")
NETWORKS = ("text_encoder", "unet", "vae")
_CLASS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
# (safetensors base name, .bin base name) of each network's weights.
_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "transformer": ("diffusion_pytorch_model", "diffusion_pytorch_model"),  # FLUX (`convert.flux`)
    "text_encoder_2": ("model", "pytorch_model"),
}

# Limits on untrusted files.
_MAX_CONFIG_BYTES = 1 << 20
_MAX_INDEX_BYTES = 32 << 20
_MAX_SHARDS = 256  # each shard stays open while its network is filled
_MAX_MANIFEST_BYTES = 32 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20
_MAX_JSON_COST = 64 << 20  # what parsing one JSON file may allocate (`json_cost`); an index ~3 MB
_MAX_NDIM = 8
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class PipelineError(ValueError):
    """A refused pipeline folder; str() is one line naming the file and the reason."""


def _p(path: Any) -> str:
    return printable(path)


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str | int | float | bool | type(None)) else f"a {type(value).__name__}"
    return printable(text[:80])


# --- files ----------------------------------------------------------------------------------------


def _open_regular(path: Path) -> Any:
    """Open a regular file for reading (symbolic links followed); never blocks on a FIFO."""
    where = _p(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.lexists(path):
            raise PipelineError(f"{where}: cannot read ({printable(e.strerror or e)}; a broken link?)") from None
        raise PipelineError(f"{where}: missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise PipelineError(f"{where}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        f = os.fdopen(fd, "rb")
    except OSError as e:
        raise PipelineError(f"{where}: cannot read ({printable(e.strerror or e)})") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise PipelineError(f"{where}: not a regular file")
    return f


def _read_json(path: Path, limit: int = _MAX_CONFIG_BYTES) -> Any:
    """A JSON file (size-capped, strict: no duplicate keys, no NaN); PipelineError names it."""
    raw = _read_bytes(path, limit)
    values, cost = json_cost(raw)
    if cost > _MAX_JSON_COST:
        raise PipelineError(
            f"{_p(path)}: up to {values:,} JSON values in {len(raw):,} bytes, more than any pipeline file "
            f"holds (parsing would take {cost:,} bytes, limit {_MAX_JSON_COST:,})"
        )
    try:
        return strict_json(raw)
    except RecursionError:
        raise PipelineError(f"{_p(path)}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
        raise PipelineError(f"{_p(path)}: not valid JSON ({printable(e)[:200]})") from None


def _read_bytes(path: Path, limit: int) -> bytes:
    where = _p(path)
    chunks: list[bytes] = []
    got = 0
    with _open_regular(path) as f:
        try:
            # In pieces: read(limit + 1) would allocate the whole limit for a small file.
            while got <= limit and (chunk := f.read(min(1 << 20, limit + 1 - got))):
                chunks.append(chunk)
                got += len(chunk)
        except OSError as e:
            raise PipelineError(f"{where}: cannot read ({printable(e.strerror or e)})") from None
    if got > limit:
        raise PipelineError(f"{where}: larger than {limit:,} bytes")
    return b"".join(chunks)


# --- model_index.json and configs -----------------------------------------------------------------


def _pipeline_class(root: Path) -> Any:
    """model_index.json's `_class_name` (None when unreadable: the full check then says why)."""
    try:
        data = _read_json(root / "model_index.json")
    except PipelineError:
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def _check_model_index(path: Path) -> dict[str, Any]:
    """Validate model_index.json; returns {"pipeline": class, "scheduler": class, "tokenizer": class}."""
    from ddcm_jax.latent_model import SCHEDULER_CLASSES

    where = _p(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise PipelineError(f"{where}: must hold a JSON object")
    cls = data.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise PipelineError(
            f"{where}: unsupported pipeline _class_name={_short(cls)} (supported: "
            f"{', '.join(PIPELINE_CLASSES)}, FluxPipeline)"
        )
    found = {"pipeline": cls}
    for name, (library, classes) in COMPONENT_CLASSES.items():
        if name not in data:
            raise PipelineError(f"{where}: missing component {name}")
        entry = data[name]
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
            raise PipelineError(f"{where}: {name} must be [library, class name], got {_short(entry)}")
        allowed = tuple(sorted(SCHEDULER_CLASSES)) if name == "scheduler" else classes
        if entry[0] != library or entry[1] not in allowed:
            want = "a DDIM-compatible scheduler" if name == "scheduler" else " or ".join(classes)
            raise PipelineError(
                f"{where}: unsupported {name} class {printable(entry[0])[:40]}.{printable(entry[1])[:60]} "
                f"(supported: {library} {want})"
            )
        found[name] = entry[1]
    for key in data:
        if key.startswith("_") or key in COMPONENT_CLASSES or key in IGNORED_ENTRIES:
            continue
        raise PipelineError(f"{where}: unknown pipeline component {printable(key)[:60]}")
    return found


@dataclasses.dataclass(frozen=True)
class PipelineConfigs:
    """The validated configs of a pipeline folder (or of a manifest folder)."""

    root: Path
    classes: Mapping[str, str]
    unet: sd_unet.SDUNetConfig
    vae: sd_vae.SDVAEConfig
    text_encoder: clip.CLIPTextConfig
    scheduler: Any  # latent_model.SchedulerConfig

    def config(self, component: str) -> Any:
        return getattr(self, component)


def read_pipeline_configs(root: str | os.PathLike, *, compute_dtype: str | None = None) -> PipelineConfigs:
    """model_index.json, the three network configs and the scheduler config, validated
    (each refusal a one-line `PipelineError` naming the file)."""
    from ddcm_jax.latent_model import LatentModelError, SchedulerConfig, check_components

    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{_p(root)}: not a directory (a diffusers pipeline folder is expected)")
    classes = _check_model_index(root / "model_index.json")

    def parse(path: Path, fn: Callable[[Any], Any]) -> Any:
        data = _read_json(path)
        try:
            return fn(data)
        except (ValueError, TypeError) as e:
            raise PipelineError(f"{_p(path)}: {printable(e)[:300]}") from None

    unet = parse(root / "unet" / "config.json",
                 lambda d: sd_unet.SDUNetConfig.from_json(d, compute_dtype=compute_dtype))  # fmt: skip
    vae = parse(root / "vae" / "config.json", sd_vae.SDVAEConfig.from_json)

    def text_config(d: Any) -> clip.CLIPTextConfig:
        if isinstance(d, Mapping) and d.get("architectures", ["CLIPTextModel"]) != ["CLIPTextModel"]:
            raise ValueError(f"unsupported architectures={_short(d['architectures'])} (only ['CLIPTextModel'])")
        return clip.CLIPTextConfig.from_json(d)

    text = parse(root / "text_encoder" / "config.json", text_config)
    scheduler = parse(root / "scheduler" / "scheduler_config.json", SchedulerConfig.from_diffusers)
    try:
        check_components(unet, vae, text)
    except LatentModelError as e:
        raise PipelineError(f"{_p(root)}: {printable(e)}") from None
    return PipelineConfigs(root, classes, unet, vae, text, scheduler)


# --- weights: lazy tensor sources -----------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


class _SafetensorsFile:
    """A `.safetensors` file, header parsed strictly; tensors read one at a time on demand."""

    def __init__(self, path: Path) -> None:
        self.path, self.where = path, _p(path)
        self._f = _open_regular(path)
        try:
            self.entries = self._parse()
        except BaseException:
            self._f.close()
            raise

    def _parse(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
        where, f = self.where, self._f
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise PipelineError(f"{where}: truncated safetensors file")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
                raise PipelineError(f"{where}: safetensors header length {n} exceeds the file")
            raw = f.read(n)
        except OSError as e:
            raise PipelineError(f"{where}: cannot read ({printable(e.strerror or e)})") from None
        if len(raw) != n:
            raise PipelineError(f"{where}: truncated safetensors header")
        refusal = header_refusal(raw, size)
        if refusal:
            raise PipelineError(f"{where}: {refusal}")
        try:
            header = strict_json(raw)
        except (ValueError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else printable(e)[:200]
            raise PipelineError(f"{where}: corrupt safetensors header ({reason})") from None
        if not isinstance(header, dict):
            raise PipelineError(f"{where}: corrupt safetensors header (not a JSON object)")
        meta = header.get("__metadata__", {})
        if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
            raise PipelineError(f"{where}: safetensors __metadata__ must map names to strings")
        body, body_len = 8 + n, size - 8 - n
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            key = printable(name)[:200]
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise PipelineError(f"{where}: malformed safetensors entry {key}")
            dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
                raise PipelineError(f"{where}: entry {key} has an unsupported dtype {_short(dtype_name)}")
            if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                    and all(_is_int(d) and 0 <= d < 1 << 40 for d in shape)):  # fmt: skip
                raise PipelineError(f"{where}: entry {key} has a malformed shape")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) for v in offsets)):
                raise PipelineError(f"{where}: entry {key} has malformed data_offsets")
            begin, end = offsets
            if not 0 <= begin <= end <= body_len:
                raise PipelineError(f"{where}: entry {key} lies outside the file")
            dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise PipelineError(f"{where}: entry {key} has the wrong byte length")
            entries[name] = (dtype, tuple(shape), body + begin, body + end)
        last_end, last = 0, ""
        for begin, end, name in sorted((e[2], e[3], k) for k, e in entries.items() if e[3] > e[2]):
            if begin < last_end:
                raise PipelineError(f"{where}: entries {printable(last)[:100]} and {printable(name)[:100]} overlap")
            last_end, last = end, name
        return entries

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        array = np.empty(math.prod(shape), dtype.newbyteorder("<"))
        view = memoryview(array.view(np.uint8))
        try:
            self._f.seek(begin)
            done = 0
            while done < end - begin:
                got = self._f.readinto(view[done:])
                if not got:
                    raise PipelineError(f"{self.where}: entry {printable(name)[:100]} is truncated")
                done += got
        except OSError as e:
            raise PipelineError(f"{self.where}: cannot read ({printable(e.strerror or e)})") from None
        return array.astype(dtype, copy=False).reshape(shape)

    def close(self) -> None:
        self._f.close()


SafetensorsFile = _SafetensorsFile  # the run-time reader of MODEL_DIR tensor files (`ddcm_jax.tensorfile`)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass
class TensorSource:
    """One network's weights: {key: (shape, dtype)} known up front, arrays read on demand.

    `where` names the file (or the shard index) for messages; `read(key)`
    returns the array as stored and forgets it (a `.bin` state dict releases it).
    """

    where: str
    label: str  # "<component folder>/<file name>" of the weights file or shard index
    shapes: dict[str, tuple[tuple[int, ...], Any]]
    owner: dict[str, str]  # key -> the name of the file holding it
    _readers: dict[str, Callable[[], np.ndarray]]
    _closers: list[Callable[[], None]]
    _peekers: dict[str, Callable[[], np.ndarray]] = dataclasses.field(default_factory=dict)

    def read(self, key: str) -> np.ndarray:
        return self._readers.pop(key)()

    def peek(self, key: str) -> np.ndarray:
        """`read` without forgetting the key (a safetensors tensor is read again from its file)."""
        return self._peekers[key]()

    def order(self, keys: list[str]) -> list[str]:
        """`keys` in the order that reads each file front to back."""
        rank = {k: i for i, k in enumerate(self._readers)}
        return sorted(keys, key=lambda k: rank.get(k, -1))

    def close(self) -> None:
        for c in self._closers:
            c()
        self._closers.clear()
        self._readers.clear()


def _weight_candidates(component: str) -> list[tuple[str, str]]:
    st, pt = _WEIGHT_NAMES[component]
    out = []
    for v in ("", ".fp16"):
        out += [
            (f"{st}{v}.safetensors", "safetensors"),
            (f"{st}.safetensors.index{v}.json", "safetensors-index"),
            (f"{pt}{v}.bin", "bin"),
            (f"{pt}.bin.index{v}.json", "bin-index"),
        ]
    return out


def _find_weights(folder: Path, component: str) -> tuple[Path, str]:
    if not folder.is_dir():
        raise PipelineError(f"{_p(folder)}: missing (the {component} component's folder)")
    for name, kind in _weight_candidates(component):
        path = folder / name
        if os.path.lexists(path):
            return path, kind
    names = ", ".join(n for n, _ in _weight_candidates(component)[:4])
    raise PipelineError(f"{_p(folder)}: no weights ({names}, or their fp16 variants)")


def _source_from_files(where: str, files: list[tuple[Path, str]]) -> TensorSource:
    """Open every (path, "safetensors" | "bin") file; keys must be unique across them."""
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    readers: dict[str, Callable[[], np.ndarray]] = {}
    peekers: dict[str, Callable[[], np.ndarray]] = {}
    closers: list[Callable[[], None]] = []
    owner: dict[str, str] = {}
    try:
        for path, kind in files:
            if kind == "safetensors":
                st = _SafetensorsFile(path)
                closers.append(st.close)
                items = sorted(st.entries.items(), key=lambda kv: kv[1][2])
                found = {k: (e[1], e[0]) for k, e in items}
                read = {k: functools.partial(st.read, k) for k, _ in items}
                peek = read
            else:
                state = read_state_dict(path)
                found = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
                read = {k: functools.partial(state.pop, k) for k in state}
                peek = {k: functools.partial(state.__getitem__, k) for k in state}
            for key in found:
                if key in owner:
                    raise PipelineError(
                        f"{_p(path)}: key {printable(key)[:100]} is also in {printable(owner[key])}"
                    )
                owner[key] = path.name
            shapes.update(found)
            readers.update(read)
            peekers.update(peek)
    except BaseException:
        for c in closers:
            c()
        raise
    label = f"{files[0][0].parent.name}/{files[0][0].name}"
    return TensorSource(where, label, shapes, owner, readers, closers, peekers)


def open_weights(folder: str | os.PathLike, component: str) -> TensorSource:
    """The weights of one network folder (`unet/`, `vae/`, `text_encoder/`), headers only
    for safetensors; a shard index is checked against its shards key by key."""
    folder = Path(folder)
    path, kind = _find_weights(folder, component)
    if kind in ("safetensors", "bin"):
        return _source_from_files(_p(path), [(path, kind)])
    where = _p(path)
    index = _read_json(path, _MAX_INDEX_BYTES)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise PipelineError(f"{where}: not a shard index (no weight_map object)")
    unknown = sorted(set(index) - {"metadata", "weight_map"})
    if unknown:
        raise PipelineError(f"{where}: unknown entries {printable(unknown)[:100]}")
    weight_map = index["weight_map"]
    suffix = ".safetensors" if kind == "safetensors-index" else ".bin"
    shards: dict[str, None] = {}
    for key, shard in weight_map.items():
        if not (isinstance(shard, str) and _SHARD_NAME.fullmatch(shard) and shard.endswith(suffix)):
            raise PipelineError(
                f"{where}: shard {_short(shard)} of {printable(key)[:100]} must be a {suffix} file in the same folder"
            )
        shards[shard] = None
    if not shards:
        raise PipelineError(f"{where}: empty weight_map")
    if len(shards) > _MAX_SHARDS:
        raise PipelineError(f"{where}: {len(shards)} shards, more than {_MAX_SHARDS}")
    source = _source_from_files(where, [(folder / s, suffix[1:]) for s in shards])
    try:
        # Every key of every shard must be in the index, under that shard, and vice versa.
        missing = sorted(set(weight_map) - set(source.owner))
        extra = sorted(set(source.owner) - set(weight_map))
        moved = sorted(k for k, s in source.owner.items() if k in weight_map and weight_map[k] != s)
        parts = []
        if missing:
            parts.append(_listing("listed keys in no shard", missing, 3))
        if extra:
            parts.append(_listing("shard keys not listed", extra, 3))
        if moved:
            parts.append(_listing("keys in another shard than listed", moved, 3))
        if parts:
            raise PipelineError(f"{where}: index and shards disagree: {'; '.join(parts)}")
    except BaseException:
        source.close()
        raise
    source.label = f"{folder.name}/{path.name}"
    return source


def read_manifest(path: Path) -> dict[str, tuple[tuple[int, ...], None]]:
    """A `state_dict_shapes.json` (key -> shape list) as a shapes mapping without dtypes."""
    where = _p(path)
    data = _read_json(path, _MAX_MANIFEST_BYTES)
    if not isinstance(data, dict):
        raise PipelineError(f"{where}: must map keys to shapes")
    out = {}
    for key, shape in data.items():
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_int(d) and d >= 0 for d in shape)):
            raise PipelineError(f"{where}: the shape of {printable(key)[:100]} is malformed")
        out[key] = (tuple(shape), None)
    return out


# --- planning -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ComponentPlan:
    """How one network's file keys fill its Flax parameters (from shapes alone).

    `entries`: (Flax path, file key), one per parameter; `ignored`: file keys
    knowingly skipped (the text encoder's position_ids buffer); `renamed`:
    (file key, current name) for legacy VAE names; `params`: the parameter count.
    """

    component: str
    entries: tuple[tuple[tuple[str, ...], str], ...]
    ignored: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]
    params: int


def _listing(kind: str, items: list[str], limit: int = 4) -> str:
    shown = ", ".join(printable(i)[:160] for i in items[:limit])
    more = f", ... +{len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {kind} ({shown}{more})"


def _floating(dtype: Any) -> bool:
    if dtype is None:  # a manifest: shapes only
        return True
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16)


def _abstract(component: str, config: Any) -> Any:
    module = {"unet": sd_unet, "vae": sd_vae, "text_encoder": clip}[component]
    return module.abstract_params(config)


def plan_component(component: str, config: Any,
                   shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> ComponentPlan:  # fmt: skip
    """Match a network's file keys {key: (shape, dtype or None)} to its config's parameters.

    "unet" / "vae": diffusers names (`torch_key` of each Flax path), PyTorch
    shapes; the VAE's legacy attention names are renamed first. "text_encoder":
    `clip.plan_state_dict` (keys with or without `text_model.`, the
    `position_ids` buffer ignored). Every key used once, every parameter
    filled, every shape exact, every dtype floating; otherwise one ValueError
    lists the missing, unexpected, mis-shaped and non-floating keys. Reads no
    arrays (the parameter tree is traced with `jax.eval_shape`).
    """
    abstract = _abstract(component, config)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    leaves = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
    renamed: list[tuple[str, str]] = []
    ignored: list[str] = []
    if component == "text_encoder":
        entries = clip.plan_state_dict(config, {k: s for k, (s, _) in shapes.items()})
        used = {key for _, key in entries}
        ignored = sorted(set(shapes) - used)
        mistyped = [f"{key}: {shapes[key][1]}" for _, key in entries if not _floating(shapes[key][1])]
        if mistyped:
            raise clip.CLIPStateDictError([], [], [], mistyped)
    else:
        module = sd_unet if component == "unet" else sd_vae
        names = {k: k for k in shapes}
        if component == "vae":
            names = sd_vae.rename_legacy_keys(names)  # current name -> file key
            renamed = sorted((f, n) for n, f in names.items() if f != n)
        expected = {module.torch_key(path): (path, L.torch_shape(shape)) for path, shape in leaves.items()}
        missing = sorted(set(expected) - set(names))
        unexpected = sorted(names[k] for k in set(names) - set(expected))
        misshaped, mistyped, found = [], [], []
        for name in sorted(set(expected) & set(names)):
            key = names[name]
            path, want = expected[name]
            shape, dtype = shapes[key]
            if tuple(shape) != want:
                misshaped.append(f"{key}: got {list(shape)}, expected {list(want)}")
            if not _floating(dtype):
                mistyped.append(f"{key}: {dtype}")
            found.append((path, key))
        problems = [
            _listing(kind, items)
            for kind, items in (("missing", missing), ("unexpected", unexpected),
                                ("mis-shaped", misshaped), ("not floating point", mistyped))
            if items
        ]
        if problems:
            raise sd_unet.SDStateDictError(
                f"{_CLASS[component]} weights do not match {component}/config.json: " + "; ".join(problems)
            )
        entries = tuple(found)
    # Every Flax leaf exactly once (the planners guarantee it; a failure here is a bug).
    paths = [tuple(p) for p, _ in entries]
    if sorted(paths) != sorted(leaves) or len(set(paths)) != len(paths):
        raise AssertionError(f"{component}: the plan does not cover every parameter exactly once")
    count = sum(math.prod(s) for s in leaves.values())
    return ComponentPlan(component, tuple(entries), tuple(ignored), tuple(renamed), count)


def _to_flax(component: str, path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if component == "text_encoder":  # Linear (out, in) -> kernel (in, out); the rest as stored
        a = array.T if path[-1] == "kernel" else array
        return np.ascontiguousarray(a, dtype=np.float32)
    return L.to_flax(array)  # conv OIHW -> HWIO, Linear (out, in) -> (in, out)


def fill(plan: ComponentPlan, source: TensorSource) -> dict[str, Any]:
    """The float32 Flax parameter tree of a checked plan, one tensor read (and released) at a time."""
    params: dict[str, Any] = {}
    by_key = {key: path for path, key in plan.entries}
    for key in source.order(list(by_key)):
        path = by_key[key]
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _to_flax(plan.component, path, source.read(key))
    return params


def _implied_counts(configs: PipelineConfigs, *, budget: bool = True) -> dict[str, int]:
    """The parameters each network's config implies (arithmetic, milliseconds). With `budget`:
    PipelineError when, as float32, they exceed the memory budget (conversion holds one float32
    copy of them; a manifest check allocates nothing)."""
    from ddcm_jax.latent_model import implied_param_counts
    from ddcm_jax.memory import budget_bytes, format_bytes

    counts = implied_param_counts(configs.unet, configs.vae, configs.text_encoder)
    if not budget:
        return counts
    need, limit = 4 * sum(counts.values()), budget_bytes()
    if need > limit:
        big = max(counts, key=lambda c: counts[c])
        raise PipelineError(
            f"{_p(configs.root / big / 'config.json')}: implies {counts[big]:,} parameters; the pipeline "
            f"needs about {format_bytes(need)} as float32, more than the memory budget {format_bytes(limit)} "
            "(set DDCM_MEMORY_LIMIT to change it)"
        )
    return counts


def _check_count(component: str, implied: int, shapes: Mapping[str, Any], where: str) -> None:
    """Refuse weights that hold far fewer values than the config implies parameters, before the
    network is traced to plan them (thousands of layers take minutes). Within a factor two the
    plan runs and lists the keys that differ, which says more about a near miss."""
    held = sum(math.prod(shape) for shape, _ in shapes.values())
    if implied > 2 * held:
        raise PipelineError(
            f"{where}: holds {held:,} values, {component}/config.json implies {implied:,} parameters "
            "(more than twice as many: not the weights of this network)"
        )


def _plan_or_refuse(component: str, config: Any, shapes: Mapping[str, Any], where: str) -> ComponentPlan:
    try:
        return plan_component(component, config, shapes)
    except (sd_unet.SDStateDictError, clip.CLIPStateDictError) as e:
        raise PipelineError(f"{where}: {printable(e)[:900]}") from None


# --- the two entry points -------------------------------------------------------------------------


def check_manifest(folder: str | os.PathLike) -> dict[str, int]:
    """Prove, from shapes alone, that a pipeline converts completely.

    `folder` holds `model_index.json`, `scheduler/scheduler_config.json` and, per
    network, `config.json` + `state_dict_shapes.json` (key -> shape). Runs the
    planning of the real conversion (`read_pipeline_configs`, `plan_component`)
    with parameter shapes from `jax.eval_shape` (nothing allocated). Returns the
    parameter counts {"text_encoder", "unet", "vae", "total"}; raises
    `PipelineError` (one line: the file and every key that does not map).
    """
    folder = Path(folder)
    if _pipeline_class(folder) == "FluxPipeline":
        from ddcm_jax.convert.flux import check_flux_manifest

        return check_flux_manifest(folder)
    configs = read_pipeline_configs(folder)
    implied = _implied_counts(configs, budget=False)
    counts = {}
    for component in NETWORKS:
        path = folder / component / "state_dict_shapes.json"
        shapes = read_manifest(path)
        _check_count(component, implied[component], shapes, _p(path))
        plan = _plan_or_refuse(component, configs.config(component), shapes, _p(path))
        counts[component] = plan.params
    counts["total"] = sum(counts.values())
    return counts


_TOKENIZER_REQUIRED = ("vocab.json", "merges.txt", "tokenizer_config.json")


def _read_tokenizer(folder: Path, text: clip.CLIPTextConfig) -> tuple[Any, dict[str, bytes]]:
    from ddcm_jax.latent_model import TOKENIZER_FILES
    from ddcm_jax.tokenizer import MAX_FILE_BYTES, CLIPTokenizer, TokenizerError

    if not folder.is_dir():
        raise PipelineError(f"{_p(folder)}: missing (the tokenizer component's folder)")
    files = {}
    for name in TOKENIZER_FILES:
        path = folder / name
        if name in _TOKENIZER_REQUIRED or os.path.lexists(path):
            files[name] = _read_bytes(path, MAX_FILE_BYTES)
    try:
        tok = CLIPTokenizer.from_folder(folder)
    except TokenizerError as e:
        raise PipelineError(printable(e)[:400]) from None
    top = max(tok.vocab.values())
    if top >= text.vocab_size:
        raise PipelineError(
            f"{_p(folder / 'vocab.json')}: token ids reach {top}, the text encoder's vocab_size is {text.vocab_size}"
        )
    if tok.model_max_length > text.max_position_embeddings:
        raise PipelineError(
            f"{_p(folder / 'tokenizer_config.json')}: model_max_length {tok.model_max_length} exceeds the text "
            f"encoder's max_position_embeddings {text.max_position_embeddings}"
        )
    return tok, files


def null_prompt_embedding(config: clip.CLIPTextConfig, params: Any, tokenizer: Any) -> np.ndarray:
    """(1, L, C) float32: the text encoder's last hidden state for the empty prompt."""
    ids = tokenizer([""])
    with jax.default_matmul_precision("highest"):
        hidden, _ = clip.clip_text_apply(config, params, ids)
    return np.asarray(hidden, np.float32)


def convert_pipeline(pipeline_dir: str | os.PathLike, model_dir: str | os.PathLike, *,
                     compute_dtype: str | None = None, overwrite: bool = False) -> str:  # fmt: skip
    """Convert a diffusers Stable Diffusion folder into a latent MODEL_DIR; returns the fingerprint.

    Order: the target is checked (`ModelDirError`), every config validated, the
    tokenizer parsed, every weight file's keys and shapes planned against its
    config (`PipelineError` / `CheckpointError`, one line naming the file);
    then the text encoder is filled and the null-prompt embedding computed, then
    the UNet and the VAE are filled tensor by tensor, and the folder is written
    atomically (`save_latent_model`). `compute_dtype` sets the UNet's.
    """
    from ddcm_jax.latent_model import LatentModelConfig, save_latent_model, tokenizer_hashes
    from ddcm_jax.model import check_save_target, remove_stale_staging

    root = Path(pipeline_dir)
    if _pipeline_class(root) == "FluxPipeline":
        from ddcm_jax.convert.flux import convert_flux_pipeline

        return convert_flux_pipeline(root, model_dir, compute_dtype=compute_dtype, overwrite=overwrite)
    check_save_target(model_dir, overwrite)  # before reading gigabytes
    remove_stale_staging(model_dir)  # what a killed conversion to this target left
    configs = read_pipeline_configs(root, compute_dtype=compute_dtype)
    implied = _implied_counts(configs)  # the memory budget, before any weight is read
    tokenizer, tok_files = _read_tokenizer(root / "tokenizer", configs.text_encoder)
    sources: dict[str, TensorSource] = {}
    try:
        plans, labels = {}, {}
        for component in NETWORKS:
            source = open_weights(root / component, component)
            sources[component] = source
            labels[component] = source.label
            _check_count(component, implied[component], source.shapes, source.where)
            plans[component] = _plan_or_refuse(component, configs.config(component), source.shapes, source.where)
        params: dict[str, Any] = {}
        for component in NETWORKS:
            params[component] = fill(plans[component], sources[component])
            sources.pop(component).close()
            if component == "text_encoder":
                params["null_prompt"] = null_prompt_embedding(configs.text_encoder, params[component], tokenizer)
    finally:
        for source in sources.values():
            source.close()
    config = LatentModelConfig(
        unet=configs.unet,
        vae=configs.vae,
        text_encoder=configs.text_encoder,
        scheduler=configs.scheduler,
        tokenizer_files=tokenizer_hashes(tok_files),
        prompt_length=tokenizer.model_max_length,
        converter_version=CONVERTER_VERSION,
        source={
            "format": "diffusers",
            "pipeline": root.absolute().name,
            "classes": dict(configs.classes),
            "weights": labels,
            "ignored_keys": {c: list(plans[c].ignored) for c in NETWORKS if plans[c].ignored},
            "renamed_keys": {c: len(plans[c].renamed) for c in NETWORKS if plans[c].renamed},
        },
    )
    return save_latent_model(model_dir, config, params, tok_files, overwrite=overwrite)


# --- command line ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`ddcm convert PIPELINE_DIR -o MODEL_DIR --format diffusers`: exit 0, 1 (one line), 2 (usage)."""
    from ddcm_jax.model import ModelDirError

    usage = None
    if getattr(args, "config", None) is not None or getattr(args, "preset", None) is not None:
        usage = "--config and --preset are for --format guided-diffusion (a pipeline folder has its own configs)"
    elif getattr(args, "noise_schedule", "linear") != "linear" or getattr(args, "diffusion_steps", 1000) != 1000:
        usage = "--noise-schedule and --diffusion-steps are for --format guided-diffusion (the scheduler folder sets them)"
    if usage is not None:
        print(f"ddcm convert: error: {usage}", file=sys.stderr)
        return 2
    src = _p(args.checkpoint)
    try:
        fp = convert_pipeline(args.checkpoint, args.output, compute_dtype=args.compute_dtype,
                              overwrite=args.overwrite)  # fmt: skip
    except KeyboardInterrupt:
        print("ddcm convert: interrupted", file=sys.stderr)
        return 130
    except (PipelineError, CheckpointError, ModelDirError) as e:  # these name their file already
        msg = printable(e)
    except ValueError as e:
        msg = f"{src}: {printable(e)}"
    except OSError as e:
        msg = f"{_p(args.output)}: {printable(e.strerror or e)}"
    except MemoryError:
        msg = f"{src}: out of memory"
    except Exception as e:  # a bug must still not end in a traceback
        msg = f"{src}: internal error ({type(e).__name__}: {printable(e)[:200]})"
    else:
        if not getattr(args, "quiet", False):
            print(f"wrote {_p(args.output)} ({fp})")
        from ddcm_jax.convert import register

        register(args)
        return 0
    lines = msg.splitlines() or [msg]
    print(f"ddcm convert: {lines[0]}", file=sys.stderr)
    return 1
