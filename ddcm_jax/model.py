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

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.models.adm import ADMConfig, abstract_params, adm_apply, param_count
from ddcm_jax.printable import printable

__all__ = [
    "DiffusionConfig",
    "DiffusionModel",
    "ModelConfig",
    "ModelDirError",
    "config_fingerprint",
    "find_model",
    "fingerprint",
    "known_model_dirs",
    "load_model",
    "resolve_model_dir",
    "save_model",
]

MODEL_FORMAT = "ddcm_jax.model"
MODEL_FORMAT_VERSION = 1
MAX_MODEL_JSON = 1 << 20


class ModelDirError(ValueError):
    """A MODEL_DIR that cannot be read or written; the message names the path and reason."""


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


# An eager `model(x, t)` ran op by op, 11x slower than the same call under jax.jit (adm_tiny).
_compiled_apply = jax.jit(adm_apply, static_argnums=0)


@jax.tree_util.register_pytree_node_class
class DiffusionModel:
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


def check_tree_matches(params: Any, expected: Any, where: str) -> None:
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
        detail = printable("; ".join(parts))[:600]
        raise ModelDirError(f"{where}: parameters do not match the architecture: {detail}")


# --- orbax, quietly ------------------------------------------------------------------------------
#
# orbax runs tensorstore I/O on short-lived asyncio loops (and, for saves, in
# background threads). When one operation fails, orbax closes its loop while
# sibling operations are still in flight; as those finish, tensorstore calls back
# into the closed loop and each callback reports `RuntimeError: Event loop is
# closed` through `sys.unraisablehook`, possibly at interpreter exit; the
# background threads also log the failure with full tracebacks through absl.
# The failure itself reaches us as an exception, which we turn into one line, so
# we drop exactly that unraisable message and silence orbax's logger while it works.

def _install_unraisable_filter() -> None:
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop", False):  # installed already (the hook is process-wide)
        return

    def hook(unraisable: Any, _previous: Any = previous) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and unraisable.object is None:
            return
        _previous(unraisable)

    hook.drops_closed_event_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Run orbax without its failure noise; on failure, settle what it left in flight.

    After a failed operation orbax drops tasks, futures and tensorstore handles
    that still have I/O pending; collected later (at exit at the latest) they
    log "Task exception was never retrieved" and finish writes, which can
    recreate a staging folder already removed. Collecting them here, while
    quiet, makes that happen now, before the caller cleans up.
    """
    _install_unraisable_filter()
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_QuietLoops(policy))
    try:
        yield
    except BaseException:
        gc.collect()
        raise
    finally:
        asyncio.set_event_loop_policy(policy)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _ignore_unretrieved(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if context.get("message") in ("Task exception was never retrieved", "Future exception was never retrieved"):
        return  # orbax already raised the failure to us; its dropped siblings say it again
    loop.default_exception_handler(context)


class _QuietLoops(asyncio.AbstractEventLoopPolicy):
    """The current event loop policy, except that the loops orbax creates while it works do not
    log the exceptions of the tasks it abandons when one fails (they are logged when collected,
    at exit at the latest)."""

    def __init__(self, inner: asyncio.AbstractEventLoopPolicy) -> None:
        self._inner = inner

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        return self._inner.get_event_loop()

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._inner.set_event_loop(loop)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._inner.new_event_loop()
        loop.set_exception_handler(_ignore_unretrieved)
        return loop

    def __getattr__(self, name: str) -> Any:  # child watchers and the like
        return getattr(self._inner, name)


def _remove_tree(path: Path) -> None:
    """rmtree until the folder stays gone (late writes of a failed orbax save can recreate it)."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        with quiet_orbax():
            gc.collect()
        time.sleep(0.02)
        if not os.path.lexists(path):
            return


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def error_reason(e: BaseException) -> str:
    """One short line for an OS / orbax / tensorstore error (their messages embed long specs)."""
    if isinstance(e, OSError) and e.strerror:
        return printable(e.strerror)
    text = str(e)
    code = _OS_ERROR_CODE.search(text)
    if code:
        return printable(os.strerror(int(code.group(1))))
    text = text.split(" [tensorstore_spec=")[0].splitlines()[0] if text.strip() else type(e).__name__
    return printable(text)[:300]


# --- writing ------------------------------------------------------------------------------------


def check_save_target(model_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute MODEL_DIR path, or ModelDirError if `save_model` would refuse to write it.

    A missing path or an empty directory may be written; an existing MODEL_DIR
    only with `overwrite`; anything else (a file, a directory that is not a
    MODEL_DIR) never, so that `overwrite` cannot delete unrelated files.
    """
    target = Path(model_dir).absolute()
    where = printable(target)
    try:
        if not os.path.lexists(target):
            for parent in target.parents:  # refuse now, not after reading a checkpoint
                if os.path.lexists(parent):
                    if not parent.is_dir():
                        raise ModelDirError(f"{where}: cannot create the folder ({printable(parent)} is not a directory)")
                    break
            return target
        if target.is_symlink() or not target.is_dir():
            raise ModelDirError(f"{where}: already exists and is not a directory")
        if not any(target.iterdir()):
            return target
        if not overwrite:
            raise ModelDirError(f"{where}: already exists (pass overwrite to replace it)")
        if not (target / "model.json").is_file():
            raise ModelDirError(f"{where}: is not a model directory (no model.json); refusing to replace it")
    except OSError as e:
        raise ModelDirError(f"{where}: cannot inspect ({error_reason(e)})") from None
    return target


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, deepest last."""
    missing = []
    for p in [folder, *folder.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    created = []
    try:
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
    except OSError:
        remove_empty(created)
        raise
    return created


def remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


def fresh_name(parent: Path, base: str, tag: str) -> Path:
    """`.BASE.TAG-HOST~PID.RANDOM` beside the target: who made it, as the `.part` files of
    `ddcm_jax.images` say, so that `remove_stale_staging` can tell a dead writer's folder."""
    from ddcm_jax.images import _host_tag

    return parent / f".{base[:100]}.{tag}-{_host_tag()}~{os.getpid()}.{secrets.token_hex(6)}"


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of `target` that writers on this host left when they died
    (SIGKILL, power loss: `.NAME.staging-HOST~PID.RANDOM` whose PID no longer runs); returns them.

    A live process's folder and another host's are kept, and so are `.NAME.replaced-…`
    backups (killed between its two renames, a save leaves the previous model only there).
    """
    from ddcm_jax.images import _host_tag, _pid_alive

    target = Path(target).absolute()
    head, host = f".{target.name[:100]}.staging-", _host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(head) or not entry.is_dir(follow_symlinks=False):
            continue
        tag, _, rand = entry.name[len(head) :].rpartition(".")
        writer, _, pid = tag.rpartition("~")
        if writer != host or not pid.isdigit() or not re.fullmatch(r"[0-9a-f]{12}", rand):
            continue
        if _pid_alive(int(pid)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.lexists(entry.path):
            removed.append(Path(entry.path))
    return removed


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
    try:
        created = make_parents(target.parent)
    except OSError as e:
        raise ModelDirError(f"{where}: cannot create the folder ({error_reason(e)})") from None
    remove_stale_staging(target)  # a killed save's folder, before the free space is measured
    stage = backup = None
    try:
        free = shutil.disk_usage(target.parent).free
        if free < need:
            raise ModelDirError(
                f"{where}: not enough free space ({os.strerror(errno.ENOSPC)}: "
                f"about {need:,} bytes needed, {free:,} free)"
            )
        # os.mkdir, not mkdtemp: the folder gets the umask's permissions like any other.
        stage = fresh_name(target.parent, target.name, "staging")
        stage.mkdir()
        with quiet_orbax():
            checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
            try:
                checkpointer.save(stage / "params", args=ocp.args.StandardSave(params))
            finally:
                checkpointer.close()
        (stage / "model.json").write_text(meta)
        check_save_target(target, overwrite)  # again: something may have appeared meanwhile
        if os.path.lexists(target):
            backup = fresh_name(target.parent, target.name, "replaced")
            os.rename(target, backup)
        try:
            os.rename(stage, target)
        except BaseException:
            if backup is not None:
                os.rename(backup, target)
                backup = None
            raise
        stage = None
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException as e:
        if stage is not None:
            _remove_tree(stage)
        remove_empty(created)
        if isinstance(e, ModelDirError) or not isinstance(e, Exception):
            raise
        raise ModelDirError(f"{where}: cannot write ({error_reason(e)})") from None
    return fp


DEFAULT_MODEL = "default"


def default_model_dir() -> Path:
    """The MODEL_DIR shipped inside the package (trained by `ddcm train`, see the README)."""
    d = Path(__file__).resolve().parent / "weights" / DEFAULT_MODEL
    if not (d / "model.json").is_file():
        raise ModelDirError(f"{d}: the default model is not installed with this copy of ddcm_jax")
    return d


def resolve_model_dir(spec: str | os.PathLike | None) -> Path:
    """None or "default" -> the packaged default model; the name of another packaged model
    (`small-v1`, the default before 2026-11) -> that one; anything else is a MODEL_DIR path."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return default_model_dir()
    packaged = Path(__file__).resolve().parent / "weights" / str(spec)
    if not Path(spec).exists() and "/" not in str(spec) and (packaged / "model.json").is_file():
        return packaged
    return Path(spec)


# --- reading ------------------------------------------------------------------------------------


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading if it is a regular file (or a symbolic link to one); never blocks.

    A FIFO, device or socket in place of a file is refused (`ModelDirError`: "PATH: is not a
    regular file") before it is opened: opening a FIFO waits for a writer, forever. The file
    is opened non-blocking and checked again, so one swapped in meanwhile is refused as well.
    OSError (a missing file, no permission) reaches the caller.
    """
    where = printable(path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ModelDirError(f"{where}: is not a regular file")
    f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ModelDirError(f"{where}: is not a regular file")
    return f


def check_checkpoint_files(params_dir: str | os.PathLike) -> int:
    """Refuse (`ModelDirError`, naming the entry) a checkpoint folder that holds anything but
    folders and regular files, before orbax opens it; returns the size of its files in bytes.

    orbax (tensorstore) opens its files blocking: a FIFO in place of `manifest.ocdbt` hangs a
    restore forever. Symbolic links are followed, as a reader would, each folder walked once.
    What cannot be inspected (a missing folder, a broken link) is left for the restore to report.
    """
    root = os.fspath(params_dir)
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise ModelDirError(f"{printable(root)}: cannot restore parameters (not a directory)")
    except OSError:
        return 0
    size = 0
    seen: set[tuple[int, int]] = set()
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                st = os.stat(entry.path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                folders.append(entry.path)
            elif not stat.S_ISREG(st.st_mode):
                raise ModelDirError(f"{printable(entry.path)}: is not a regular file")
            else:
                size += st.st_size
    return size


def checkpoint_values(params_dir: str | os.PathLike) -> int | None:
    """How many array elements the checkpoint in `params_dir` holds, from orbax's metadata (the
    shapes; no array is read), or None when its metadata cannot be read (restoring says why)."""
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        with quiet_orbax():
            handler = ocp.PyTreeCheckpointHandler()
            try:
                meta = handler.metadata(epath.Path(os.path.abspath(params_dir)))
            finally:
                handler.close()
        leaves = jax.tree_util.tree_leaves(getattr(meta, "tree", meta))
        return sum(int(np.prod(leaf.shape, dtype=object)) for leaf in leaves)
    except Exception:  # orbax raises many types; all mean "cannot say"
        return None


def check_checkpoint(params_dir: Path, implied: int, meta: str = "model.json") -> None:
    """Refuse a checkpoint folder that orbax must not open (`check_checkpoint_files`) or whose
    arrays cannot be the `implied` parameters of the network model.json describes.

    Both are decided in milliseconds, before the network's parameter tree is traced (for a
    model.json describing a huge network that alone takes tens of seconds). The arrays' shapes
    are asked of orbax only when the files hold fewer bytes than the parameters are values: a
    float32 checkpoint compressed 4-fold or more (zeros), or one of another, smaller network.
    """
    if check_checkpoint_files(params_dir) >= implied:
        return
    held = checkpoint_values(params_dir)
    if held is not None and held != implied:
        raise ModelDirError(
            f"{printable(params_dir)}: holds {held:,} parameter values, {meta} implies {implied:,}"
        )


def read_model_json(model_dir: str | os.PathLike) -> tuple[ModelConfig, str]:
    """Parse and check MODEL_DIR/model.json (nothing built); ModelDirError names the file and reason."""
    root = Path(model_dir).absolute()
    meta = root / "model.json"
    where = printable(meta)
    try:
        with open_regular(meta) as f:  # a folder or a FIFO (which would block) is refused
            raw = f.read(MAX_MODEL_JSON + 1)
    except FileNotFoundError:
        raise ModelDirError(f"{printable(root)}: not a model directory (no model.json)") from None
    except OSError as e:
        raise ModelDirError(f"{where}: cannot read ({error_reason(e)})") from None
    if len(raw) > MAX_MODEL_JSON:
        raise ModelDirError(f"{where}: larger than {MAX_MODEL_JSON} bytes")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise ModelDirError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integer digit limit
        raise ModelDirError(f"{where}: not valid JSON ({printable(e)[:200]})") from None
    try:
        return ModelConfig.from_json(data)
    except (ValueError, TypeError, RecursionError) as e:
        raise ModelDirError(f"{where}: {printable(e)[:300]}") from None


def restore_params(params_dir: Path, target: Any) -> Any:
    import orbax.checkpoint as ocp

    check_checkpoint_files(params_dir)  # a FIFO would hang orbax
    with quiet_orbax():
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            return checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
        finally:
            checkpointer.close()


def load_model(model_dir: str | os.PathLike = DEFAULT_MODEL, *, verify: bool = True) -> DiffusionModel:
    """Load a MODEL_DIR written by `ddcm convert` or `ddcm train` ("default": the packaged model).

    model.json is checked first (types, ranges, the size of the network it
    implies, `config_fingerprint`), then the checkpoint folder (regular files
    only, as many values as the architecture implies: `check_checkpoint`, before
    anything is traced), then the parameter tree is restored against
    the shapes the architecture implies; with `verify` the fingerprint is
    recomputed and must match. Raises `ModelDirError` (one line: path and reason).
    A folder whose model.json says family "sd" (from `ddcm convert --format
    diffusers`) loads as a `ddcm_jax.latent_model.LatentDiffusionModel`.
    """
    root = resolve_model_dir(model_dir).absolute()
    from ddcm_jax.latent_model import is_latent_model_dir, load_latent_model

    if is_latent_model_dir(root):  # family "sd": a LatentDiffusionModel (see latent_model.py)
        return load_latent_model(root, verify=verify)  # type: ignore[return-value]
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


def known_model_dirs() -> list[Path]:
    """MODEL_DIRs a decoder may pick by fingerprint, in search order.

    Each entry of the DDCM_MODELS environment variable (os.pathsep-separated)
    is a MODEL_DIR or a folder of MODEL_DIRs; then the models installed inside
    the package (`ddcm_jax/weights/`). Unreadable entries are skipped.
    """
    roots = [Path(p) for p in os.environ.get("DDCM_MODELS", "").split(os.pathsep) if p]
    roots.append(Path(__file__).resolve().parent / "weights")
    found: list[Path] = []
    for root in roots:
        try:
            if (root / "model.json").is_file():
                found.append(root)
            elif root.is_dir():
                found.extend(sorted(p for p in root.iterdir() if (p / "model.json").is_file()))
        except OSError:
            continue
    return found


def find_model(fingerprint_prefix: str, loaded: dict[Path, Any] | None = None) -> Path | None:
    """The first known MODEL_DIR whose fingerprint starts with `fingerprint_prefix` ('sha256:…')
    and that loads and verifies; a folder that does not is skipped, so a damaged copy
    found through DDCM_MODELS cannot shadow an intact one later in the search order
    (such as the packaged default).

    `loaded`: the caller's models by folder. A folder in it counts as verified,
    and the model a search loads is put in it, so a run loads each model once.
    """
    loaded = {} if loaded is None else loaded
    from ddcm_jax.latent_model import is_latent_model_dir, read_latent_model_json

    for d in known_model_dirs():
        try:
            _, fp = read_latent_model_json(d) if is_latent_model_dir(d) else read_model_json(d)
        except ModelDirError:
            continue
        if not fp.startswith(fingerprint_prefix):
            continue
        if d in loaded:
            return d
        try:
            loaded[d] = load_model(d)
        except ModelDirError:
            continue
        return d
    return None
