"""A diffusion model as data: config + parameter pytree + fingerprint, and MODEL_DIR I/O.

MODEL_DIR layout (written by the converter and the trainer alike)::

    MODEL_DIR/model.json   what the network is, how it was trained, its fingerprints
    MODEL_DIR/params/      orbax checkpoint of the parameter tree (float32)

The fingerprint is SHA-256 over the parameter arrays in canonical order (see
`fingerprint`); bitstreams carry it so that decoding with another model is
caught. `load_model` recomputes it and refuses a directory whose arrays do not
match what its `model.json` claims.

The settings that change what the network computes (architecture, diffusion
process, family) are not covered by the array fingerprint, so `model.json`
also holds `config_fingerprint`: SHA-256 over a canonical JSON of those settings
and the array fingerprint (see `config_fingerprint`). `save_model` writes it and
`load_model` refuses a `model.json` whose settings were edited since. A
`model.json` without it (written before it existed) still loads; such folders
are checked by their arrays only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.jit import jit
from ddcm_jax.modeldir import (  # noqa: F401  (MODEL_DIR machinery, shared by every family)
    DEFAULT_MODEL,
    MAX_MODEL_JSON,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    ModelDirError,
    _remove_tree,
    check_checkpoint,
    check_checkpoint_files,
    check_save_target,
    check_tree_matches,
    checkpoint_values,
    default_model_dir,
    error_reason,
    fingerprint,
    fresh_name,
    make_parents,
    no_model_json,
    open_regular,
    quiet_orbax,
    read_json_object,
    remove_empty,
    remove_stale_staging,
    resolve_model_dir,
    restore_params,
    write_staged,
)
from ddcm_jax.models.adm import ADMConfig, abstract_params, adm_apply, param_count
from ddcm_jax.pixel import PixelFamily
from ddcm_jax.printable import printable

__all__ = [
    "DiffusionConfig",
    "DiffusionModel",
    "ModelConfig",
    "ModelDirError",
    "config_fingerprint",
    "fingerprint",
    "load_pixel_model",
    "resolve_model_dir",
    "save_model",
]

@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """How the network was trained: the forward process it inverts."""

    noise_schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "epsilon"

    def __post_init__(self) -> None:
        if not isinstance(self.noise_schedule, str) or self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown noise schedule {printable(repr(self.noise_schedule))[:40]}")
        steps = self.num_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ValueError(f"num_timesteps must be an integer, got a {type(steps).__name__}")
        if not 1 <= steps <= 100_000:
            raise ValueError(f"num_timesteps out of range: {steps}")
        if not isinstance(self.prediction, str) or self.prediction != "epsilon":
            raise ValueError(f"unsupported prediction type {printable(repr(self.prediction))[:40]}")

    @classmethod
    def from_json(cls, data: Any) -> DiffusionConfig:
        if not isinstance(data, Mapping):
            raise ValueError("diffusion must be a JSON object")
        unknown = sorted(printable(k)[:40] for k in set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown diffusion fields: {', '.join(unknown[:8])}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything in model.json except the fingerprint."""

    architecture: ADMConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    family: str = "adm"
    converter_version: str = ""
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def learn_sigma(self) -> bool:
        return self.architecture.learn_sigma

    @property
    def image_size(self) -> int:
        return self.architecture.image_size

    @property
    def compute_dtype(self) -> str:
        return self.architecture.compute_dtype

    @property
    def generation_size(self) -> int:
        """The square side `generate` makes by default: the largest window the network saw whole.

        A network from `ddcm train` learned from random crops of `crop` pixels, so it composes a scene
        at that side and paints texture without composition beyond it (the packaged model: 64-px
        samples read as photographs, 128-px ones as texture). Others: the native `image_size`. The
        recorded crop is only read, never trusted: anything but a multiple of the network's size
        multiple up to `image_size` falls back to `image_size`.
        """
        training = self.source.get("training") if self.source.get("format") == "ddcm_jax.train" else None
        config = training.get("config") if isinstance(training, Mapping) else None
        crop = config.get("crop") if isinstance(config, Mapping) else None
        multiple = self.architecture.size_multiple
        if type(crop) is int and 0 < crop <= self.image_size and crop % multiple == 0:
            return crop
        return self.image_size

    def settings(self) -> dict[str, Any]:
        """The settings that change what the model computes (what `config_fingerprint` covers)."""
        return {
            "family": self.family,
            "architecture": self.architecture.to_json(),
            "diffusion": dataclasses.asdict(self.diffusion),
        }

    def to_json(self, fingerprint: str) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "family": self.family,
            "architecture": self.architecture.to_json(),
            "diffusion": dataclasses.asdict(self.diffusion),
            "learn_sigma": self.learn_sigma,
            "image_size": self.image_size,
            "compute_dtype": self.compute_dtype,
            "converter_version": self.converter_version,
            "source": dict(self.source),
            "fingerprint": fingerprint,
            "config_fingerprint": config_fingerprint(self, fingerprint),
        }

    @classmethod
    def from_json(cls, data: Any) -> tuple[ModelConfig, str]:
        """Parse and check a `model.json` object; raises ValueError (one line) for anything off.

        Checks the types and ranges of every setting (`ADMConfig` refuses an
        architecture before anything is built) and, when present,
        `config_fingerprint` against the settings.
        """
        if not isinstance(data, Mapping):
            raise ValueError("model.json must hold a JSON object")
        if data.get("format") != MODEL_FORMAT:
            raise ValueError(f"not a {MODEL_FORMAT} file (format={_short(data.get('format'))})")
        if data.get("format_version") != MODEL_FORMAT_VERSION or isinstance(data.get("format_version"), bool):
            raise ValueError(f"unsupported format_version {_short(data.get('format_version'))}")
        if data.get("family") != "adm":
            raise ValueError(f"unknown model family {_short(data.get('family'))}")
        for name in ("architecture", "diffusion"):
            if name not in data:
                raise ValueError(f"missing field {name}")
        converter_version, source = data.get("converter_version", ""), data.get("source", {})
        if not isinstance(converter_version, str):
            raise ValueError("converter_version must be a string")
        if not isinstance(source, Mapping):
            raise ValueError("source must be a JSON object")
        config = cls(
            architecture=ADMConfig.from_json(data["architecture"]),
            diffusion=DiffusionConfig.from_json(data["diffusion"]),
            converter_version=converter_version,
            source=dict(source),
        )
        fp = data.get("fingerprint")
        if not isinstance(fp, str) or not _FINGERPRINT.fullmatch(fp):
            raise ValueError("missing or malformed fingerprint")
        # Copies kept for readers of the JSON; they must say what the architecture says.
        for name in ("learn_sigma", "image_size", "compute_dtype"):
            if name in data and (data[name] != getattr(config, name) or type(data[name]) is not type(getattr(config, name))):
                raise ValueError(
                    f"{name} {_short(data[name])} disagrees with the architecture ({getattr(config, name)!r})"
                )
        if "config_fingerprint" in data:
            stored = data["config_fingerprint"]
            if not isinstance(stored, str) or not _FINGERPRINT.fullmatch(stored):
                raise ValueError("malformed config_fingerprint")
            if stored != config_fingerprint(config, fp):
                raise ValueError("settings changed since the model was saved (config_fingerprint mismatch)")
        return config, fp


_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str | int | float | bool | type(None)) else f"a {type(value).__name__}"
    return printable(text[:60])


def config_fingerprint(config: ModelConfig, array_fingerprint: str) -> str:
    """'sha256:<hex>' over the canonical JSON (sorted keys, no whitespace, ASCII) of
    `config.settings()` plus `{"fingerprint": array_fingerprint}`.

    Covers every setting that changes the function a MODEL_DIR computes: the
    architecture, the diffusion process, the family, and (through the array
    fingerprint) the weights. Not part of the `.ddcm` format, which names the
    array fingerprint only.
    """
    payload = {**config.settings(), "fingerprint": array_fingerprint}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# An eager `model(x, t)` ran op by op, 11x slower than the same call under jax.jit (adm_tiny).
_compiled_apply = jit(adm_apply, static_argnums=0)


@jax.tree_util.register_pytree_node_class
class DiffusionModel(PixelFamily):
    """A loaded model: `.config`, `.params`, `.fingerprint`, pure `.apply`.

    A pytree whose only leaves are the parameters, so it passes through
    `jax.jit` / `vmap` / `scan` as an argument; the config is static.
    `model(x, t, y=None)` = `model.apply(model.params, x, t, y)`, with x
    (B, H, W, 3) float32 in [-1, 1] and t (B,) integer original timesteps:
    called eagerly it runs compiled (once per config and shapes, then cached,
    as the SD model's calls do); under a caller's trace it is inlined.
    """

    def __init__(self, config: ModelConfig, params: Any, fingerprint: str) -> None:
        self.config = config
        self.params = params
        self.fingerprint = fingerprint

    @property
    def apply(self) -> Callable[..., jax.Array]:
        return functools.partial(adm_apply, self.config.architecture)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        return _compiled_apply(self.config.architecture, self.params, x, t, y)

    def tree_flatten(self) -> tuple[tuple[Any], tuple[ModelConfig, str]]:
        return (self.params,), (self.config, self.fingerprint)

    @classmethod
    def tree_unflatten(cls, aux: tuple[ModelConfig, str], children: tuple[Any]) -> DiffusionModel:
        return cls(aux[0], children[0], aux[1])

    def __repr__(self) -> str:
        arch = self.config.architecture
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        return (
            f"DiffusionModel(adm {arch.image_size}px, {arch.model_channels} ch, "
            f"{n:,} params, {self.fingerprint[:19]}…)"
        )


def save_model(model_dir: str | os.PathLike, config: ModelConfig, params: Any,
               *, overwrite: bool = False) -> str:  # fmt: skip
    """Write MODEL_DIR atomically (staged beside it, renamed at the end); returns the fingerprint.

    Raises ModelDirError (one line) when the target may not be written (see
    `check_save_target`) or writing fails (read-only, permission, full disk: the
    free space is checked first); nothing is left behind then, neither the
    staging folder nor parent folders it created. The folder gets the usual
    permissions of the umask.
    """
    import orbax.checkpoint as ocp

    target = check_save_target(model_dir, overwrite)
    where = printable(target)
    check_tree_matches(params, abstract_params(config.architecture), where)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    fp = fingerprint(params)
    meta = json.dumps(config.to_json(fp), indent=2) + "\n"
    need = sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) + len(meta) + (1 << 20)

    def fill(stage: Path) -> None:
        with quiet_orbax():
            checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
            try:
                checkpointer.save(stage / "params", args=ocp.args.StandardSave(params))
            finally:
                checkpointer.close()
        (stage / "model.json").write_text(meta)

    write_staged(target, overwrite, need, fill)
    return fp


def read_model_json(model_dir: str | os.PathLike) -> tuple[ModelConfig, str]:
    """Parse and check MODEL_DIR/model.json (nothing built); ModelDirError names the file and reason."""
    root = Path(model_dir).absolute()
    meta = root / "model.json"
    where = printable(meta)
    if not os.path.lexists(meta):
        raise no_model_json(root)
    data = read_json_object(meta)  # bounded; a folder or a FIFO (which would block) is refused
    try:
        return ModelConfig.from_json(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelDirError(f"{where}: {printable(e)[:300]}") from None


def load_pixel_model(model_dir: str | os.PathLike, *, verify: bool = True) -> DiffusionModel:
    """Load a MODEL_DIR written by `ddcm convert` or `ddcm train` ("default": the packaged model).

    model.json is checked first (types, ranges, the size of the network it
    implies, `config_fingerprint`), then the checkpoint folder (regular files
    only, as many values as the architecture implies: `check_checkpoint`, before
    anything is traced), then the parameter tree is restored against
    the shapes the architecture implies; with `verify` the fingerprint is
    recomputed and must match. Raises `ModelDirError` (one line: path and reason).
    `ddcm_jax.load_model` (`ddcm_jax.families`) picks the family's loader.
    """
    root = resolve_model_dir(model_dir).absolute()
    config, fp = read_model_json(root)
    check_checkpoint(root / "params", param_count(config.architecture))  # before any tracing
    expected = abstract_params(config.architecture)
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), expected)
    try:
        params = restore_params(root / "params", target)
    except ModelDirError:
        raise
    except MemoryError:
        raise ModelDirError(f"{printable(root / 'params')}: cannot restore parameters (out of memory)") from None
    except Exception as e:  # orbax raises many types; all mean "unreadable"
        raise ModelDirError(f"{printable(root / 'params')}: cannot restore parameters ({error_reason(e)})") from None
    check_tree_matches(params, expected, printable(root))
    if verify:
        actual = fingerprint(params)
        if actual != fp:
            raise ModelDirError(
                f"{printable(root)}: parameters do not match the fingerprint in model.json "
                f"({actual[:23]}… != {fp[:23]}…)"
            )
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return DiffusionModel(config, params, fp)
