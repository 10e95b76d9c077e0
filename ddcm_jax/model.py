"""A diffusion model as data: config + parameter pytree + fingerprint, and MODEL_DIR I/O.

MODEL_DIR layout (written by the converter and the trainer alike)::

    MODEL_DIR/model.json   what the network is, how it was trained, its fingerprint
    MODEL_DIR/params/      orbax checkpoint of the parameter tree (float32)

The fingerprint is SHA-256 over the parameter arrays in canonical order (see
`fingerprint`); bitstreams carry it so that decoding with another model is
caught. `load_model` recomputes it and refuses a directory whose arrays do not
match what its `model.json` claims.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.models.adm import ADMConfig, abstract_params, adm_apply

__all__ = [
    "DiffusionConfig",
    "DiffusionModel",
    "ModelConfig",
    "ModelDirError",
    "find_model",
    "fingerprint",
    "known_model_dirs",
    "load_model",
    "resolve_model_dir",
    "save_model",
]

MODEL_FORMAT = "ddcm_jax.model"
MODEL_FORMAT_VERSION = 1
_MAX_MODEL_JSON = 1 << 20


class ModelDirError(ValueError):
    """A MODEL_DIR that cannot be read or written; the message names the path and reason."""


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """How the network was trained: the forward process it inverts."""

    noise_schedule: str = "linear"
    num_timesteps: int = 1000
    prediction: str = "epsilon"

    def __post_init__(self) -> None:
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown noise schedule {self.noise_schedule!r}")
        if not 1 <= self.num_timesteps <= 100_000:
            raise ValueError(f"num_timesteps out of range: {self.num_timesteps}")
        if self.prediction != "epsilon":
            raise ValueError(f"unsupported prediction type {self.prediction!r}")


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
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> tuple[ModelConfig, str]:
        if data.get("format") != MODEL_FORMAT:
            raise ValueError(f"not a {MODEL_FORMAT} file (format={data.get('format')!r})")
        if data.get("format_version") != MODEL_FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {data.get('format_version')!r}")
        if data.get("family") != "adm":
            raise ValueError(f"unknown model family {data.get('family')!r}")
        config = cls(
            architecture=ADMConfig.from_json(data["architecture"]),
            diffusion=DiffusionConfig(**data["diffusion"]),
            converter_version=str(data.get("converter_version", "")),
            source=dict(data.get("source", {})),
        )
        fp = data.get("fingerprint")
        if not isinstance(fp, str) or not fp.startswith("sha256:"):
            raise ValueError("missing or malformed fingerprint")
        return config, fp


def _leaves_in_canonical_order(params: Any) -> list[tuple[str, np.ndarray]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    named = [("/".join(_key_name(k) for k in path), leaf) for path, leaf in flat]
    return sorted(named, key=lambda item: item[0])


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def fingerprint(params: Any) -> str:
    """'sha256:<hex>' over every array, sorted by '/'-joined key path.

    Per array the hash takes: the path (UTF-8), NUL, the little-endian dtype
    string (e.g. '<f4'), NUL, the comma-joined shape, NUL, the C-order
    little-endian bytes. Any change of name, dtype, shape or value changes it.
    """
    h = hashlib.sha256()
    for name, leaf in _leaves_in_canonical_order(params):
        arr = np.asarray(leaf)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(name.encode())
        h.update(b"\0" + arr.dtype.str.encode() + b"\0")
        h.update(",".join(map(str, arr.shape)).encode() + b"\0")
        h.update(np.ascontiguousarray(arr).tobytes())
    return "sha256:" + h.hexdigest()


@jax.tree_util.register_pytree_node_class
class DiffusionModel:
    """A loaded model: `.config`, `.params`, `.fingerprint`, pure `.apply`.

    A pytree whose only leaves are the parameters, so it passes through
    `jax.jit` / `vmap` / `scan` as an argument; the config is static.
    `model(x, t, y=None)` = `model.apply(model.params, x, t, y)`, with x
    (B, H, W, 3) float32 in [-1, 1] and t (B,) integer original timesteps.
    """

    def __init__(self, config: ModelConfig, params: Any, fingerprint: str) -> None:
        self.config = config
        self.params = params
        self.fingerprint = fingerprint

    @property
    def apply(self) -> Callable[..., jax.Array]:
        return functools.partial(adm_apply, self.config.architecture)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        return self.apply(self.params, x, t, y)

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


def _check_tree_matches(params: Any, expected: Any, where: str) -> None:
    got = dict(_leaves_in_canonical_order(params))
    want = dict(_leaves_in_canonical_order(expected))
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [
        f"{k} {tuple(got[k].shape)} != {tuple(want[k].shape)}"
        for k in sorted(set(got) & set(want))
        if tuple(got[k].shape) != tuple(want[k].shape)
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        if bad:
            parts.append(f"mis-shaped {', '.join(bad[:5])}")
        raise ModelDirError(f"{where}: parameters do not match the architecture: {'; '.join(parts)}")


def save_model(model_dir: str | os.PathLike, config: ModelConfig, params: Any,
               *, overwrite: bool = False) -> str:  # fmt: skip
    """Write MODEL_DIR atomically (staged beside it, renamed at the end); returns the fingerprint."""
    import orbax.checkpoint as ocp

    target = Path(model_dir).absolute()
    if target.exists() and not overwrite:
        if not target.is_dir() or any(target.iterdir()):
            raise ModelDirError(f"{target}: already exists (pass overwrite to replace it)")
    _check_tree_matches(params, abstract_params(config.architecture), str(target))
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    fp = fingerprint(params)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(stage / "params", params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        (stage / "model.json").write_text(json.dumps(config.to_json(fp), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return fp


DEFAULT_MODEL = "default"


def default_model_dir() -> Path:
    """The MODEL_DIR shipped inside the package (trained by `ddcm train`, see the README)."""
    d = Path(__file__).resolve().parent / "weights" / DEFAULT_MODEL
    if not (d / "model.json").is_file():
        raise ModelDirError(f"{d}: the default model is not installed with this copy of ddcm_jax")
    return d


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """None or "default" -> the packaged default model; anything else is a MODEL_DIR path."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return default_model_dir()
    return Path(spec)


def load_model(model_dir: str | os.PathLike = DEFAULT_MODEL, *, verify: bool = True) -> DiffusionModel:
    """Load a MODEL_DIR written by `ddcm convert` or `ddcm train` ("default": the packaged model).

    The parameter tree is restored against the shapes the architecture
    implies; with `verify` the fingerprint is recomputed and must match.
    Raises `ModelDirError` with the path and the reason.
    """
    import orbax.checkpoint as ocp

    root = resolve_model_dir(model_dir).absolute()
    meta = root / "model.json"
    try:
        if meta.stat().st_size > _MAX_MODEL_JSON:
            raise ModelDirError(f"{meta}: larger than {_MAX_MODEL_JSON} bytes")
        config, fp = ModelConfig.from_json(json.loads(meta.read_text()))
    except FileNotFoundError:
        raise ModelDirError(f"{root}: not a model directory (no model.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, ModelDirError):
            raise
        raise ModelDirError(f"{meta}: {e}") from None
    expected = abstract_params(config.architecture)
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), expected)
    try:
        checkpointer = ocp.StandardCheckpointer()
        params = checkpointer.restore(root / "params", target)
        checkpointer.close()
    except Exception as e:  # orbax raises many types; all mean "unreadable"
        raise ModelDirError(f"{root / 'params'}: cannot restore parameters: {e}") from None
    _check_tree_matches(params, expected, str(root))
    if verify:
        actual = fingerprint(params)
        if actual != fp:
            raise ModelDirError(
                f"{root}: parameters do not match the fingerprint in model.json "
                f"({actual[:23]}… != {fp[:23]}…)"
            )
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return DiffusionModel(config, params, fp)


def known_model_dirs() -> list[Path]:
    """MODEL_DIRs a decoder may pick by fingerprint, in search order.

    Each entry of the DDCM_MODELS environment variable (os.pathsep-separated)
    is a MODEL_DIR or a folder of MODEL_DIRs; then the models installed inside
    the package (`ddcm_jax/weights/`).
    """
    roots = [Path(p) for p in os.environ.get("DDCM_MODELS", "").split(os.pathsep) if p]
    roots.append(Path(__file__).resolve().parent / "weights")
    found: list[Path] = []
    for root in roots:
        if (root / "model.json").is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(p for p in root.iterdir() if (p / "model.json").is_file()))
    return found


def find_model(fingerprint_prefix: str) -> Path | None:
    """The first known MODEL_DIR whose fingerprint starts with `fingerprint_prefix` ('sha256:…')."""
    for d in known_model_dirs():
        try:
            meta = d / "model.json"
            if meta.stat().st_size > _MAX_MODEL_JSON:
                continue
            fp = json.loads(meta.read_text()).get("fingerprint", "")
        except (OSError, ValueError):
            continue
        if isinstance(fp, str) and fp.startswith(fingerprint_prefix):
            return d
    return None
