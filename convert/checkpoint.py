"""Read state dicts from untrusted files without PyTorch and without running their code.

Supported: PyTorch zip checkpoints (`torch.save` since 1.6: `.pt`, `.pth`,
`.bin`), `.safetensors`, and `.npz`. A PyTorch checkpoint is a pickle, and a
pickle is a program; it is therefore (1) scanned opcode by opcode before
anything runs, admitting only the opcodes and globals that a state dict needs
(the same set as `torch.load(weights_only=True)`: tensor/storage rebuilders,
OrderedDict, dtypes), and (2) unpickled with a `find_class` that maps those
globals to local NumPy implementations.

A file can make us allocate only a small multiple of its own size:

* every zip member is read with a limit: the size its header claims is checked
  before reading and the bytes are counted while reading (a header can lie);
  `data.pkl` may unpack to at most the archive's size (at least 1 MiB, at most
  `_MAX_PICKLE_BYTES`), the tensor storages together to at most the archive's
  size (storages are never compressed, and overlapping members are caught);
* a tensor's full extent (offset, sizes, strides) must lie inside its storage,
  and a tensor may not have more elements than its storage: views that repeat
  storage elements (zero or overlapping strides) are refused rather than
  materialised;
* the arrays returned, in every format, total at most `_MAX_EXPANSION` times the
  file's size (plus 1 MiB): room for storages shared by several tensors and for
  compressed `.npz` members, but not for decompression bombs;
* `.safetensors` headers are parsed strictly (integer shapes and offsets, byte
  ranges inside the file, no overlaps, shape product times item size equal to
  the byte range); `.npz` members are parsed header first (numeric dtypes only,
  never pickles) and must hold exactly the bytes their header implies.

Every refusal is a `CheckpointError` whose message is one line naming the file
and the reason; names and keys from the file are escaped with `printable`.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import pickletools
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from ddcm_jax.printable import printable

__all__ = ["CheckpointError", "read_state_dict"]


class CheckpointError(ValueError):
    """An unreadable or refused checkpoint; str() is one line naming the file and the reason."""


# Limits (see the module docstring). Tests may lower them with monkeypatch.
_MAX_EXPANSION = 4  # arrays returned <= this x file size + _SLACK
_SLACK = 1 << 20
_MAX_PICKLE_BYTES = 32 << 20  # a state-dict pickle is ~100 bytes per tensor
_MAX_SAFETENSORS_HEADER = 100 << 20
_MAX_ZIP_ENTRIES = 1 << 20
_MAX_NESTING = 4  # {"state_dict": ...} / {"model": ...} / {"ema": ...} wrappers
_MAX_NDIM = 32
_MAX_EXTENT = 1 << 48  # product of the non-zero sizes (NumPy refuses even empty arrays beyond ~2^63 bytes)

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid_shape(shape: Any) -> bool:
    """A tuple/list of at most _MAX_NDIM non-negative ints that NumPy can make (even if empty)."""
    return (
        isinstance(shape, tuple | list)
        and len(shape) <= _MAX_NDIM
        and all(_is_int(d) and d >= 0 for d in shape)
        and math.prod(max(d, 1) for d in shape) <= _MAX_EXTENT
    )


class _Budget:
    """Bytes a file may still make us allocate; `take` refuses what goes over."""

    def __init__(self, where: str, file_size: int, limit: int) -> None:
        self.where, self.file_size, self.limit, self.used = where, file_size, limit, 0

    @property
    def left(self) -> int:
        return self.limit - self.used

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise CheckpointError(
                f"{self.where}: {what} would need {self.used + nbytes:,} bytes in all, more than a "
                f"{self.file_size:,}-byte file can hold (limit {self.limit:,})"
            )
        self.used += nbytes


class _Refuses:
    """Objects the unpickler hands out must not be altered by BUILD."""

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"unexpected state on {type(self).__name__}")


class _StorageType(_Refuses):
    """Stand-in for `torch.FloatStorage` etc.: only carries the dtype."""

    def __init__(self, name: str, dtype: Any) -> None:
        self.name, self.dtype = name, np.dtype(dtype)


class _TorchDtype(_Refuses):
    def __init__(self, name: str, dtype: Any) -> None:
        self.name, self.dtype = name, np.dtype(dtype)


class _Storage(_Refuses):
    def __init__(self, data: np.ndarray) -> None:
        self.data = data


class _Global(_Refuses):
    """An allowed callable global (the tensor rebuilders)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


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
                        f"refused global {printable(module)[:80]}.{printable(name)[:80]} "
                        "(only state-dict types are allowed)"
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


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    """A zip member's bytes, refused if its header or its actual content exceeds `limit`."""
    name = printable(info.filename)[:200]
    if info.file_size > limit:
        raise CheckpointError(
            f"{where}: {name} would unpack to {info.file_size:,} bytes, more than the {max(limit, 0):,} allowed"
        )
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError,
            ValueError) as e:  # fmt: skip
        raise CheckpointError(f"{where}: cannot read {name} ({printable(e)[:200]})") from None
    if len(data) > limit:  # only if the header lied about the size
        raise CheckpointError(f"{where}: {name} unpacks to more than the {limit:,} bytes allowed")
    if len(data) != info.file_size:
        raise CheckpointError(f"{where}: {name} is truncated")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo],
                 prefix: str, byteorder: str, where: str, budget: _Budget, archive_size: int):  # fmt: skip
        super().__init__(io.BytesIO(data))
        self._archive, self._members, self._prefix = archive, members, prefix
        self._byteorder, self._where, self._budget = byteorder, where, budget
        self._storage_left = archive_size  # storages are stored, so together fit in the archive
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"refused global {printable(module)[:80]}.{printable(name)[:80]}"
            ) from None
        if found is _REBUILD_TENSOR:  # bound to this file's storages and budget
            return _Global(self.rebuild_tensor)
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id (a {type(pid).__name__})")
        _, kind, key, _location, numel = pid
        if isinstance(kind, _TorchDtype | _StorageType):  # untyped storage tagged with a dtype, or typed
            dtype = kind.dtype
        else:
            raise pickle.UnpicklingError("storage of an unknown type")
        if not (isinstance(key, str) and key.isascii() and key.isalnum() and len(key) <= 64):
            raise pickle.UnpicklingError("malformed storage record")
        if not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError("malformed storage record")
        if key in self._storages:
            return self._storages[key]
        name = f"{self._prefix}data/{key}"
        info = self._members.get(name)
        if info is None:
            raise pickle.UnpicklingError(f"storage {printable(name)} is missing from the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise pickle.UnpicklingError(f"storage {printable(name)} is compressed; torch never writes that")
        need = numel * dtype.itemsize
        if info.file_size < need:
            raise pickle.UnpicklingError(f"storage {printable(name)} holds {info.file_size} bytes, needs {need}")
        if info.file_size > self._storage_left:
            raise CheckpointError(
                f"{self._where}: storage {printable(name)} and the ones before it claim more bytes "
                "than the archive holds (overlapping zip members?)"
            )
        raw = _read_member(self._archive, info, self._storage_left, self._where)
        self._storage_left -= len(raw)
        order = "<" if self._byteorder == "little" else ">"
        array = np.frombuffer(raw, dtype=dtype.newbyteorder(order), count=numel)
        storage = _Storage(array.astype(dtype, copy=False))
        self._storages[key] = storage
        return storage

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> np.ndarray:
        """`torch._utils._rebuild_tensor(_v2)`: the checked, materialised view of a storage."""
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        if not (_is_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple)):
            raise pickle.UnpicklingError("malformed tensor metadata")
        if len(size) != len(stride) or len(size) > _MAX_NDIM or not all(_is_int(v) for v in size + stride):
            raise pickle.UnpicklingError("malformed tensor size/stride")
        if any(v < 0 for v in size) or any(v < 0 for v in stride) or offset < 0:
            raise pickle.UnpicklingError("negative tensor size, stride or offset")
        if not _valid_shape(size):
            raise pickle.UnpicklingError(f"tensor size out of range ({len(size)} dimensions)")
        data = storage.data
        numel = math.prod(size)
        if numel == 0:
            return np.zeros(size, data.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= data.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size} reaches element {last} of a storage of {data.size}"
            )
        if numel > data.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size} repeats the {data.size} elements of its storage "
                "(zero or overlapping strides); refused"
            )
        self._budget.take(numel * data.dtype.itemsize, f"tensor of size {size}")
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
        )
        return np.array(view, copy=True)


_REBUILD_TENSOR = object()  # placeholder in _GLOBALS; find_class binds it per file

_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_parameter"): _Global(_rebuild_parameter),
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
    **{("torch", n): _TorchDtype(n, d) for n, d in _TORCH_DTYPES.items()},
}


def _open_zip(f: BinaryIO, where: str, what: str) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, OverflowError) as e:
        raise CheckpointError(f"{where}: corrupt or truncated {what} ({printable(e)[:200]})") from None
    if len(archive.infolist()) > _MAX_ZIP_ENTRIES:
        raise CheckpointError(f"{where}: {len(archive.infolist())} zip entries is more than any {what} has")
    return archive


def _members(archive: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if info.filename in members:
            raise CheckpointError(f"{where}: the archive holds {printable(info.filename)[:200]} twice")
        members[info.filename] = info
    return members


def _read_torch_zip(f: BinaryIO, size: int, where: str, budget: _Budget) -> Any:
    with _open_zip(f, where, "zip archive") as archive:
        members = _members(archive, where)
        pkls = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError(f"{where}: not a PyTorch checkpoint (no single data.pkl inside)")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in members:
            raw = _read_member(archive, members[f"{prefix}byteorder"], 16, where)
            byteorder = raw.decode(errors="replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{where}: unknown byte order {printable(byteorder)[:20]}")
        limit = min(_MAX_PICKLE_BYTES, max(size, 1 << 20))
        data = _read_member(archive, members[pkls[0]], limit, where)
        try:
            _scan_pickle(data)
            return _RestrictedUnpickler(data, archive, members, prefix, byteorder, where, budget, size).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise CheckpointError(f"{where}: refused: {printable(e)[:300]}") from None
        except MemoryError:
            raise
        except Exception as e:  # anything else the pickle machine trips on is still a bad file
            raise CheckpointError(
                f"{where}: malformed pickle ({type(e).__name__}: {printable(e)[:200]})"
            ) from None


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


def strict_json(raw: bytes) -> Any:
    """UTF-8 JSON with duplicate keys and NaN/Infinity refused (ValueError); shared with the diffusers reader."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v) if isinstance(v, list) and _valid_shape(v) else None


def _readinto_exact(f: BinaryIO, array: np.ndarray, where: str, what: str) -> None:
    view = memoryview(array.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{where}: {what} is truncated")
        done += n


def _read_safetensors(f: BinaryIO, size: int, where: str, budget: _Budget) -> dict[str, np.ndarray]:
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{where}: truncated safetensors file")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"{where}: safetensors header length {n} exceeds the file")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{where}: truncated safetensors header")
    try:
        header = strict_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else printable(e)[:200]
        raise CheckpointError(f"{where}: corrupt safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    body_start, body_len = 8 + n, size - 8 - n
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        key = printable(name)[:200]
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{where}: malformed safetensors entry {key}")
        dtype_name, shape, offsets = entry["dtype"], _shape(entry["shape"]), entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: entry {key} has an unsupported dtype")
        if shape is None:
            raise CheckpointError(f"{where}: entry {key} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) for v in offsets)):
            raise CheckpointError(f"{where}: entry {key} has malformed data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= body_len:
            raise CheckpointError(f"{where}: entry {key} lies outside the file")
        dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{where}: entry {key} has the wrong byte length")
        entries.append((name, dtype, shape, begin, end))
    last_end, last_key = 0, ""
    for begin, end, name in sorted((e[3], e[4], e[0]) for e in entries if e[4] > e[3]):
        if begin < last_end:
            raise CheckpointError(
                f"{where}: entries {printable(last_key)[:100]} and {printable(name)[:100]} overlap"
            )
        last_end, last_key = end, name
    out = {}
    for name, dtype, shape, begin, end in entries:
        budget.take(end - begin, f"entry {printable(name)[:100]}")
        array = np.empty(math.prod(shape), dtype.newbyteorder("<"))
        f.seek(body_start + begin)
        _readinto_exact(f, array, where, f"entry {printable(name)[:100]}")
        out[name] = array.astype(dtype, copy=False).reshape(shape)
    return out


def _read_npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, budget: _Budget) -> np.ndarray:
    fmt = np.lib.format
    name = printable(info.filename)[:200]
    if info.file_size > budget.left + 65536:  # the array, plus room for the .npy header
        raise CheckpointError(
            f"{where}: {name} would unpack to {info.file_size:,} bytes, more than a "
            f"{budget.file_size:,}-byte file can hold (limit {budget.limit:,})"
        )
    try:
        with archive.open(info) as member:
            version = fmt.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(member, max_header_size=10_000)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(member, max_header_size=10_000)
            else:
                raise CheckpointError(f"{where}: {name}: unsupported .npy version {version}")
            if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
                raise CheckpointError(f"{where}: {name}: refused dtype (only numeric arrays are read)")
            if dtype.kind not in "biuf" or dtype.itemsize > 8:
                raise CheckpointError(f"{where}: {name}: refused dtype {printable(dtype.str)}")
            if not (isinstance(shape, tuple) and _valid_shape(shape)):
                raise CheckpointError(f"{where}: {name}: malformed shape")
            count = math.prod(shape)
            nbytes = count * dtype.itemsize
            if info.file_size != member.tell() + nbytes:
                raise CheckpointError(
                    f"{where}: {name} holds {info.file_size - member.tell()} bytes of data, "
                    f"its header says {nbytes}"
                )
            budget.take(nbytes, name)
            array = np.empty(count, dtype)
            _readinto_exact(member, array, where, name)  # zipfile checks the CRC at the end
            if member.read(1):
                raise CheckpointError(f"{where}: {name} is longer than its header says")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError,
            ValueError, SyntaxError, TypeError) as e:  # fmt: skip
        raise CheckpointError(f"{where}: unreadable npz member {name} ({printable(e)[:200]})") from None
    array = array.astype(dtype.newbyteorder("="), copy=False)
    return array.reshape(shape, order="F" if fortran else "C")


def _read_npz(f: BinaryIO, size: int, where: str, budget: _Budget) -> dict[str, np.ndarray]:
    out = {}
    with _open_zip(f, where, "npz archive") as archive:
        for info in _members(archive, where).values():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise CheckpointError(f"{where}: npz member {printable(info.filename)[:200]} is not an .npy array")
            out[info.filename[: -len(".npy")]] = _read_npy_member(archive, info, where, budget)
    return out


def _state_items(obj: Any, where: str) -> list[tuple[Any, np.ndarray]]:
    """The flat {key: array} inside `obj`, descending into at most a few training wrappers."""
    for _ in range(_MAX_NESTING + 1):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: checkpoint holds a {type(obj).__name__}, not a state dict")
        if all(isinstance(v, np.ndarray) for v in obj.values()):
            return list(obj.items())
        # Training checkpoints nest the weights; take the single nested state dict.
        nested = [k for k in ("state_dict", "model", "ema") if isinstance(obj.get(k), dict)]
        if len(nested) != 1:
            raise CheckpointError(f"{where}: checkpoint is a dict but not a state dict")
        obj = obj[nested[0]]
    raise CheckpointError(f"{where}: state dict nested more than {_MAX_NESTING} levels deep")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load `{key: array}` from a .pt/.pth/.bin (zip), .safetensors or .npz file.

    A leading `module.` (DataParallel) is stripped from every key. Raises
    `CheckpointError` (one line: file and reason) for anything unreadable or
    refused; nothing in the file is executed, and nothing much larger than the
    file is allocated (see the module docstring).
    """
    path = Path(path)
    where = printable(path)
    try:
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise CheckpointError(f"{where}: not a regular file")
        f = path.open("rb")
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({printable(e.strerror or e)})") from None
    with f:
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{where}: not a regular file")
            head = f.read(16)
            f.seek(0)
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read ({printable(e.strerror or e)})") from None
        if not head:
            raise CheckpointError(f"{where}: empty file")
        size = st.st_size
        budget = _Budget(where, size, _MAX_EXPANSION * size + _SLACK)
        suffix = path.suffix.lower()
        try:
            if suffix == ".safetensors":
                obj: Any = _read_safetensors(f, size, where, budget)
            elif suffix == ".npz":
                obj = _read_npz(f, size, where, budget)
            elif head.startswith(b"PK"):
                obj = _read_torch_zip(f, size, where, budget)
            elif head[:1] == b"\x80":
                raise CheckpointError(
                    f"{where}: legacy (pre-1.6, non-zip) PyTorch format is not read; re-save it with "
                    "PyTorch: torch.save(torch.load(f, weights_only=True), 'new.pt')"
                )
            else:
                raise CheckpointError(f"{where}: not a PyTorch zip, safetensors or npz checkpoint")
        except CheckpointError:
            raise
        except MemoryError:
            raise CheckpointError(f"{where}: out of memory while reading") from None
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read ({printable(e.strerror or e)})") from None
        except Exception as e:  # a reader bug must still be one line naming the file
            raise CheckpointError(
                f"{where}: unreadable checkpoint (internal error {type(e).__name__}: {printable(e)[:200]})"
            ) from None
    state: dict[str, np.ndarray] = {}
    for key, value in _state_items(obj, where):
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: non-string state-dict key (a {type(key).__name__})")
        key = key.removeprefix("module.")
        if key in state:
            raise CheckpointError(f"{where}: duplicate key {printable(key)[:200]} after stripping 'module.'")
        state[key] = value
    return state
