"""The MODEL_DIR machinery every model family shares: fingerprints, staged saves, orbax quietly, checked reads.

A MODEL_DIR is `model.json` (the family's settings and the fingerprint) plus
`params/` (an orbax checkpoint) and the family's own files. The families'
modules (`ddcm_jax.model` for ADM, `ddcm_jax.latent_model` for Stable
Diffusion) read and write their settings with these helpers;
`ddcm_jax.families` picks a folder's loader by the family its model.json
names (`peek_family`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import jax
import numpy as np

from ddcm_jax.printable import printable

MODEL_FORMAT = "ddcm_jax.model"
MODEL_FORMAT_VERSION = 1
MAX_MODEL_JSON = 1 << 20


class ModelDirError(ValueError):
    """A MODEL_DIR that cannot be read or written; the message names the path and reason."""


def _leaves_in_canonical_order(params: Any) -> list[tuple[str, np.ndarray]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    named = [("/".join(_key_name(k) for k in path), leaf) for path, leaf in flat]
    return sorted(named, key=lambda item: item[0])


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def hash_leaf(h: Any, name: str, leaf: Any) -> None:
    """Feed one array to a `fingerprint` hash (the per-array rule below), e.g. while streaming."""
    arr = np.asarray(leaf)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    h.update(name.encode())
    h.update(b"\0" + arr.dtype.str.encode() + b"\0")
    h.update(",".join(map(str, arr.shape)).encode() + b"\0")
    h.update(np.ascontiguousarray(arr).tobytes())


def fingerprint(params: Any) -> str:
    """'sha256:<hex>' over every array, sorted by '/'-joined key path.

    Per array the hash takes: the path (UTF-8), NUL, the little-endian dtype
    string (e.g. '<f4'), NUL, the comma-joined shape, NUL, the C-order
    little-endian bytes. Any change of name, dtype, shape or value changes it.
    """
    h = hashlib.sha256()
    for name, leaf in _leaves_in_canonical_order(params):
        hash_leaf(h, name, leaf)
    return "sha256:" + h.hexdigest()


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


def write_staged(target: Path, overwrite: bool, need: int, fill: Callable[[Path], None]) -> None:
    """Write a MODEL_DIR atomically: `fill(stage)` writes every file into a fresh staging folder
    beside `target` (after the free space was checked against `need` bytes), which then replaces
    `target` by renames. Refusals and failures raise `ModelDirError` (one line) and leave nothing
    behind: no staging folder, no parents this call created, the previous model where it was.
    """
    where = printable(target)
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
        fill(stage)
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


def no_model_json(root: Path) -> ModelDirError:
    """The refusal of a folder without model.json, with the command that would make one of it."""
    where = printable(root)
    hint = ""
    if (root / "model_index.json").is_file():
        hint = f"; a diffusers pipeline: convert it first with `ddcm convert {where} -o MODEL_DIR`"
    elif root.is_file():
        hint = f"; a checkpoint file: convert it first with `ddcm convert {where} -o MODEL_DIR --preset NAME`"
    return ModelDirError(f"{where}: not a model directory (no model.json){hint}")


_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def is_sha256(value: Any) -> bool:
    """Whether `value` is a 'sha256:<64 hex>' string."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def settings_fingerprint(settings: dict[str, Any], arrays_fingerprint: str) -> str:
    """'sha256:<hex>' over the canonical JSON (sorted keys, no whitespace, ASCII) of a family's
    settings plus `{"arrays": arrays_fingerprint}`: THE fingerprint of a latent or FLUX model."""
    payload = {**settings, "arrays": arrays_fingerprint}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_json_object(meta: Path) -> Any:
    """A model.json's object, read boundedly (`MAX_MODEL_JSON`); ModelDirError otherwise."""
    where = printable(meta)
    try:
        with open_regular(meta) as f:  # a FIFO would block
            raw = f.read(MAX_MODEL_JSON + 1)
    except OSError as e:
        raise ModelDirError(f"{where}: cannot read ({error_reason(e)})") from None
    if len(raw) > MAX_MODEL_JSON:
        raise ModelDirError(f"{where}: larger than {MAX_MODEL_JSON} bytes")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise ModelDirError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise ModelDirError(f"{where}: not valid JSON ({printable(e)[:200]})") from None



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


def restore_params(params_dir: Path, target: Any) -> Any:
    import orbax.checkpoint as ocp

    check_checkpoint_files(params_dir)  # a FIFO would hang orbax
    with quiet_orbax():
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            return checkpointer.restore(params_dir, args=ocp.args.StandardRestore(target))
        finally:
            checkpointer.close()


_MAX_REGISTRY_BYTES = 1 << 20


def registry_path() -> Path:
    """The file `ddcm convert` lists its MODEL_DIRs in, one absolute path per line:
    $DDCM_REGISTRY, else $XDG_DATA_HOME/ddcm_jax/models.txt (~/.local/share/ddcm_jax/models.txt).
    Delete a line (or the file) to forget a model; the MODEL_DIR itself is not touched."""
    if os.environ.get("DDCM_REGISTRY"):
        return Path(os.environ["DDCM_REGISTRY"])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "ddcm_jax" / "models.txt"


def registered_model_dirs() -> list[Path]:
    """The MODEL_DIRs listed in `registry_path()` (an unreadable or oversized file lists none)."""
    path = registry_path()
    try:
        with open_regular(path) as f:
            raw = f.read(_MAX_REGISTRY_BYTES + 1)
    except (OSError, ModelDirError):
        return []
    if len(raw) > _MAX_REGISTRY_BYTES:
        return []
    lines = raw.decode("utf-8", "replace").splitlines()
    return [Path(line) for line in lines if line.strip() and Path(line).is_absolute()]


def register_model_dir(model_dir: str | os.PathLike) -> Path | None:
    """Add a MODEL_DIR to the registry (once; written atomically), so that decoders find it by its
    fingerprint without DDCM_MODELS; returns the registry file, or None when it cannot be written
    (the conversion itself stands: the folder can still be given with --model)."""
    target = Path(model_dir).absolute()
    path = registry_path()
    listed = registered_model_dirs()
    if target in listed:
        return path
    text = "".join(f"{p}\n" for p in [*listed, target] if "\n" not in str(p))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return path


def known_model_dirs() -> list[Path]:
    """MODEL_DIRs a decoder may pick by fingerprint, in search order.

    Each entry of the DDCM_MODELS environment variable (os.pathsep-separated)
    is a MODEL_DIR or a folder of MODEL_DIRs; then the MODEL_DIRs `ddcm convert`
    registered (`registry_path`); then the models installed inside the package
    (`ddcm_jax/weights/`). Unreadable entries are skipped.
    """
    roots = [Path(p) for p in os.environ.get("DDCM_MODELS", "").split(os.pathsep) if p]
    roots.extend(registered_model_dirs())
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


def _peek(model_dir: str | os.PathLike) -> Any:
    """A MODEL_DIR's parsed model.json (<= 1 MiB), or None when there is none or it cannot be read."""
    try:
        path = resolve_model_dir(model_dir) / "model.json"
        if not path.is_file() or path.stat().st_size > MAX_MODEL_JSON:
            return None
        with open_regular(path) as f:
            return json.loads(f.read(MAX_MODEL_JSON + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError, ModelDirError):
        return None


def peek_family(model_dir: str | os.PathLike) -> str | None:
    """The family a MODEL_DIR's model.json names ("adm", "sd"), from that file alone (<= 1 MiB); None when
    there is none or it cannot be read (the family's loader then says why, naming the file)."""
    data = _peek(model_dir)
    family = data.get("family") if isinstance(data, dict) else None
    return family if isinstance(family, str) else None


def peek_num_timesteps(model_dir: str | os.PathLike, at: tuple[str, ...]) -> int | None:
    """The model's number of diffusion timesteps, the positive integer at the keys `at` of its model.json
    (the family's place for it: `families.FamilyDir.timesteps_at`), from that file alone; None when it
    cannot be read or holds none (loading the model then says why)."""
    value = _peek(model_dir)
    for key in at:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
