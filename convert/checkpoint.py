"""Read state dicts from untrusted files without PyTorch and without running their code.

Supported: PyTorch zip checkpoints (`torch.save` since 1.6: `.pt`, `.pth`,
`.bin`), `.safetensors`, and `.npz`. A PyTorch checkpoint is a pickle, and a
pickle is a program; it is therefore (1) scanned opcode by opcode before
anything runs, admitting only the opcodes and globals that a state dict needs
(the same set as `torch.load(weights_only=True)`: tensor/storage rebuilders,
OrderedDict, dtypes), and (2) unpickled with a `find_class` that maps those
globals to local NumPy implementations. Every storage is bounds-checked against
the bytes actually in the archive, so a file can make us allocate at most what
it holds.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "read_state_dict"]


class CheckpointError(ValueError):
    """An unreadable or refused checkpoint; str() is one line naming the file and the reason."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}  # fmt: skip

# Opcodes a state-dict pickle (protocol 2) uses, plus harmless container and
# constant opcodes. Absent on purpose: INST/OBJ/NEWOBJ/NEWOBJ_EX (build
# arbitrary objects), EXT1/2/4 (copyreg registry), PERSID (text persistent ids).
# STACK_GLOBAL (protocol >= 4) is admitted only right after two literal strings.
_ALLOWED_OPCODES = frozenset(
    """PROTO FRAME STOP MARK POP POP_MARK DUP GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID
    EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 LIST DICT
    APPEND APPENDS SETITEM SETITEMS BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET
    NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 BINFLOAT
    BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINSTRING SHORT_BINSTRING
    BINBYTES SHORT_BINBYTES BINBYTES8""".split()
)


class _StorageType:
    """Stand-in for `torch.FloatStorage` etc.: only carries the dtype."""

    def __init__(self, name: str, dtype: Any) -> None:
        self.name, self.dtype = name, np.dtype(dtype)


class _TorchDtype:
    def __init__(self, name: str, dtype: Any) -> None:
        self.name, self.dtype = name, np.dtype(dtype)


class _Storage:
    def __init__(self, data: np.ndarray) -> None:
        self.data = data


def _tensor_from_storage(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise pickle.UnpicklingError("malformed tensor metadata")
    if len(size) != len(stride) or not all(isinstance(v, int) for v in size + stride):
        raise pickle.UnpicklingError("malformed tensor size/stride")
    if any(v < 0 for v in size) or any(v < 0 for v in stride) or offset < 0:
        raise pickle.UnpicklingError("negative tensor size, stride or offset")
    data = storage.data
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size} reaches element {last} of a storage of {data.size}"
        )
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):  # type: ignore[no-untyped-def]
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_parameter(data, _requires_grad, _backward_hooks, *_rest):  # type: ignore[no-untyped-def]
    if not isinstance(data, np.ndarray):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


class _StateDict(collections.OrderedDict):
    """OrderedDict that accepts the `_metadata` attribute torch pickles, nothing else."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and set(state) <= {"_metadata"}:
            return
        raise pickle.UnpicklingError("unexpected state on an OrderedDict")


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
    **{("torch", n): _TorchDtype(n, d) for n, d in _TORCH_DTYPES.items()},
}


def _scan_pickle(data: bytes) -> None:
    """Refuse any pickle that uses an opcode or global outside the allow-list."""
    strings: list[Any] = []  # the values pushed by the latest opcodes, for STACK_GLOBAL
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(f"refused pickle opcode {op.name}")
            if op.name in ("GLOBAL", "STACK_GLOBAL"):
                if op.name == "GLOBAL":
                    module, _, name = str(arg).partition(" ")
                elif len(strings) == 2 and all(isinstance(s, str) for s in strings):
                    module, name = strings
                else:
                    raise pickle.UnpicklingError("refused STACK_GLOBAL with a computed name")
                if (module, name) not in _GLOBALS:
                    raise pickle.UnpicklingError(
                        f"refused global {module}.{name} (only state-dict types are allowed)"
                    )
            elif op.name in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"):
                # The C unpickler sizes its memo by the largest index: bound it.
                if not isinstance(arg, int) or arg > len(data):
                    raise pickle.UnpicklingError(f"memo index {arg} out of range")
            if op.name.endswith("UNICODE"):
                strings = [*strings[-1:], arg]
            elif op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "FRAME"):
                strings = []
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # genops raises ValueError on garbage
        raise pickle.UnpicklingError(f"malformed pickle: {e}") from None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if isinstance(kind, _TorchDtype):  # untyped storage tagged with a dtype
            dtype = kind.dtype
        elif isinstance(kind, _StorageType):
            dtype = kind.dtype
        else:
            raise pickle.UnpicklingError("storage of an unknown type")
        if not isinstance(key, str) or not key.isalnum() or not isinstance(numel, int):
            raise pickle.UnpicklingError("malformed storage record")
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {name} is missing from the archive") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise pickle.UnpicklingError(f"storage {name} is compressed; torch never writes that")
        if info.file_size < numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"storage {name} holds {info.file_size} bytes, needs {numel * dtype.itemsize}"
            )
        raw = self._archive.read(info)
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<" if self._byteorder == "little" else ">"), count=numel)
        storage = _Storage(array.astype(dtype, copy=False))
        self._storages[key] = storage
        return storage


def _read_torch_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip archive ({e})") from None
    with archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (no single data.pkl inside)")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode(errors="replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byte order {byteorder!r:.20}")
        try:
            data = archive.read(pkls[0])
            _scan_pickle(data)
            return _RestrictedUnpickler(data, archive, prefix, byteorder).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(f"{path}: refused: {e}") from None
        except Exception as e:  # anything else the unpickler trips on is still a bad file
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8 or n > 100 << 20:
        raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    body = memoryview(raw)[8 + n :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors entry {name!r}") from None
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(body):
            raise CheckpointError(f"{path}: entry {name!r} lies outside the file")
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f"{path}: entry {name!r} has the wrong byte length")
        out[name] = np.frombuffer(body[begin:end], dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable npz ({e})") from None


def _iter_state_dict(obj: Any, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    # Training checkpoints nest the weights; take the single nested state dict.
    if not all(isinstance(v, np.ndarray) for v in obj.values()):
        nested = [k for k in ("state_dict", "model", "ema") if isinstance(obj.get(k), dict)]
        if len(nested) != 1:
            raise CheckpointError(f"{path}: checkpoint is a dict but not a state dict")
        yield from _iter_state_dict(obj[nested[0]], path)
        return
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: non-string state-dict key {key!r:.40}")
        yield key, value


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load `{key: array}` from a .pt/.pth/.bin (zip), .safetensors or .npz file.

    A leading `module.` (DataParallel) is stripped from every key. Raises
    `CheckpointError` (one line: file and reason) for anything unreadable or
    refused; nothing in the file is executed.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"{path}: empty file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    elif suffix == ".npz":
        obj = _read_npz(path)
    elif head.startswith(b"PK"):
        obj = _read_torch_zip(path)
    elif head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) PyTorch format is not read; re-save it with "
            "PyTorch: torch.save(torch.load(f, weights_only=True), 'new.pt')"
        )
    else:
        raise CheckpointError(f"{path}: not a PyTorch zip, safetensors or npz checkpoint")
    state = {}
    for key, value in _iter_state_dict(obj, path):
        key = key.removeprefix("module.")
        if key in state:
            raise CheckpointError(f"{path}: duplicate key {key} after stripping 'module.'")
        state[key] = value
    return state
