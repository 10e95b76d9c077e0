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
* the objects the pickle itself makes (dicts, strings, tuples, the unpickler's
  stack and memo, `OrderedDict(mapping)` copies) are estimated opcode by opcode
  before anything runs, and must stay within `_PARSE_EXPANSION` times the file's
  size (plus 4 MiB): a few bytes of pickle can make a large object, and a copy
  of a memoised dict repeated would grow with the square of the file; memo
  indices must be the 0, 1, 2, ... that a pickler writes;
* a tensor's full extent (offset, sizes, strides) must lie inside its storage,
  and a tensor may not have more elements than its storage: views that repeat
  storage elements (zero or overlapping strides) are refused rather than
  materialised;
* the arrays returned, in every format, total at most `_MAX_EXPANSION` times the
  file's size (plus 1 MiB): room for storages shared by several tensors and for
  compressed `.npz` members, but not for decompression bombs;
* `.safetensors` headers are parsed strictly (integer shapes and offsets, byte
  ranges inside the file, no overlaps, shape product times item size equal to
  the byte range, `__metadata__` a map of strings), once `json_cost` shows that
  parsing stays within the same bound as a pickle's objects; `.npz` members are
  parsed header first (numeric dtypes only, never pickles) and must hold exactly
  the bytes their header implies.

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
_PARSE_EXPANSION = 8  # what parsing a pickle or a safetensors header allocates (estimated)
_PARSE_SLACK = 4 << 20  # <= this x file size + _PARSE_SLACK
_MAX_SAFETENSORS_HEADER = 100 << 20
_MAX_ZIP_ENTRIES = 1 << 20
_MAX_NESTING = 4  # {"state_dict": ...} / {"model": ...} / {"ema": ...} wrappers
_MAX_NDIM = 32
_MAX_EXTENT = 1 << 48  # product of the non-zero sizes (NumPy refuses even empty arrays beyond ~2^63 bytes)

# What unpickling may allocate (`_scan_pickle`; CPython, 64 bits, generous): a slot of
# the stack, mark or memo array (each doubles as it grows), the object an opcode makes,
# and per stack item a container takes in (a dict entry, with the table's growth, takes two).
_SLOT = 24
_OBJECT_COST = {
    "EMPTY_DICT": 64, "DICT": 64, "EMPTY_LIST": 56, "LIST": 56,
    "TUPLE": 40, "TUPLE1": 48, "TUPLE2": 56, "TUPLE3": 64,
    "BININT": 32, "BININT1": 32, "BININT2": 32, "BINFLOAT": 32,
    "GLOBAL": 128, "STACK_GLOBAL": 128, "REDUCE": 256, "BINPERSID": 256,
}  # fmt: skip
# Bytes an entry of an (ordered) dict takes, also charged per entry of OrderedDict(mapping) copies.
_DICT_ENTRY = 160
_ITEM_COST = {"DICT": _DICT_ENTRY // 2, "SETITEMS": _DICT_ENTRY // 2, "SETITEM": _DICT_ENTRY // 2,
              "LIST": 8, "APPENDS": 24, "APPEND": 12, "TUPLE": 8}  # fmt: skip
_STRING_OPS = frozenset(
    {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINSTRING", "SHORT_BINSTRING"}
)
_BYTES_OPS = frozenset({"BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})
_COST_CHECK = 1 << 16  # the scan charges the budget in steps of this many bytes

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


def _stack_effect(op: pickletools.OpcodeInfo) -> tuple[int, int, int]:
    """(objects popped below a MARK or -1 if the opcode takes no MARK, objects popped, objects pushed);
    pushed -1: the opcode opens a MARK."""
    before, after = op.stack_before, op.stack_after
    if pickletools.markobject in before:
        return before.index(pickletools.markobject), 0, len(after)
    return -1, len(before), -1 if pickletools.markobject in after else len(after)


_STACK_EFFECT = {
    op.name: _stack_effect(op) for op in pickletools.opcodes if op.name in _ALLOWED_OPCODES
}


def _scan_pickle(data: bytes, budget: _Budget | None = None) -> None:
    """Refuse any pickle that uses an opcode or global outside the allow-list.

    With `budget`, also charge what unpickling it would allocate (the `_OBJECT_COST`
    of each opcode and the `_ITEM_COST` of each stack item it takes, strings and bytes
    by length, a `_SLOT` per stack, mark and memo entry) and refuse it, while
    scanning, once that goes over: a few bytes of pickle can make many objects.
    """
    strings: list[Any] = []  # the values pushed by the latest opcodes, for STACK_GLOBAL
    depth, top, puts = 0, 0, 0  # stack depth (above the marks), its maximum, memo entries
    marks: list[int] = []  # the stack depth at each open MARK
    cost = 0
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(f"refused pickle opcode {name}")
            # Follow the stack as the unpickler does, refusing the same underflows.
            below, items, pushed = _STACK_EFFECT[name]
            if below >= 0:  # takes the objects above the last MARK, and `below` under it
                if not marks:
                    raise pickle.UnpicklingError(f"{name} without a MARK")
                fence = marks.pop()
                items, depth = depth - fence + below, fence - below
            elif name == "POP" and marks and depth == marks[-1]:
                items = 0
                marks.pop()  # POP right after a MARK drops the mark
            else:
                depth -= items
            if depth < (marks[-1] if marks else 0):
                raise pickle.UnpicklingError(f"stack underflow at {name}")
            if pushed < 0:
                marks.append(depth)
                cost += _SLOT
            else:
                depth += pushed
                if depth > top:
                    cost += _SLOT * (depth - top)
                    top = depth
            if name in _STRING_OPS:
                cost += 80 + 4 * len(arg)  # a str takes up to 4 bytes a character
            elif name in _BYTES_OPS:
                cost += 40 + len(arg)
            elif name == "LONG1":
                cost += 32 + arg.bit_length() // 8
            else:
                cost += _OBJECT_COST.get(name, 0) + _ITEM_COST.get(name, 0) * items
            if budget is not None and cost > _COST_CHECK:
                budget.take(cost, "the pickle's objects")
                cost = 0
            if name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                elif len(strings) == 2 and all(isinstance(s, str) for s in strings):
                    module, attr = strings
                else:
                    raise pickle.UnpicklingError("refused STACK_GLOBAL with a computed name")
                if (module, attr) not in _GLOBALS:
                    raise pickle.UnpicklingError(
                        f"refused global {printable(module)[:80]}.{printable(attr)[:80]} "
                        "(only state-dict types are allowed)"
                    )
                strings = []
                continue
            if name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                puts += 1
                cost += _SLOT
            if name in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"):
                # The C unpickler sizes its memo by the largest index; a pickler numbers
                # its entries 0, 1, 2, ..., so an index beyond the entries made is refused.
                if not isinstance(arg, int) or arg >= puts:  # `puts` counts this one
                    raise pickle.UnpicklingError(f"memo index {arg} out of range")
            if name.endswith("UNICODE"):
                strings = [*strings[-1:], arg]
            elif name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "FRAME"):
                strings = []
        if budget is not None:
            budget.take(cost, "the pickle's objects")
    except (pickle.UnpicklingError, CheckpointError):
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
                 prefix: str, byteorder: str, where: str, budget: _Budget, archive_size: int,
                 objects: _Budget | None = None):  # fmt: skip
        super().__init__(io.BytesIO(data))
        self._archive, self._members, self._prefix = archive, members, prefix
        self._byteorder, self._where, self._budget = byteorder, where, budget
        self._objects = objects  # what the pickle's own objects may still take (see _scan_pickle)
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
        if found is _StateDict and self._objects is not None:  # copies are charged
            return _Global(self.ordered_dict)
        return found

    def ordered_dict(self, *args: Any) -> _StateDict:
        """`collections.OrderedDict(...)`; copying a mapping or a list costs per entry,
        and one memoised dict copied again and again would grow with the square of the file."""
        if len(args) > 1:
            raise pickle.UnpicklingError("OrderedDict called with more than one argument")
        if args and hasattr(args[0], "__len__") and self._objects is not None:
            self._objects.take(_DICT_ENTRY * len(args[0]), "OrderedDict copies")
        return _StateDict(*args)

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
        # The pickle's own objects have a budget apart from the tensors'.
        objects = _Budget(where, size, _PARSE_EXPANSION * size + _PARSE_SLACK)
        try:
            _scan_pickle(data, objects)
            unpickler = _RestrictedUnpickler(
                data, archive, members, prefix, byteorder, where, budget, size, objects
            )
            return unpickler.load()
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


def json_cost(raw: bytes) -> tuple[int, int]:
    """(an upper bound on the values and keys in the JSON text `raw`, on the bytes
    `strict_json(raw)` allocates). Each value but the first and each key follows one
    of `,:[{`; CPython 3.11 takes at most ~110 bytes a value or key (a short distinct
    key of a flooded object), and 8 a byte of text (astral characters, decoded twice)."""
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{") + 1
    return values, 8 * len(raw) + 128 * values


def header_refusal(raw: bytes, size: int) -> str | None:
    """Why the safetensors header `raw` of a `size`-byte file is not parsed (None: it is):
    parsing it would allocate more than a pickle of that file may (shared with the diffusers reader)."""
    values, cost = json_cost(raw)
    limit = _PARSE_EXPANSION * size + _PARSE_SLACK
    if cost <= limit:
        return None
    return (
        f"safetensors header of {len(raw):,} bytes holds up to {values:,} JSON values, more than a "
        f"{size:,}-byte file can hold (parsing would take {cost:,} bytes, limit {limit:,})"
    )


def _small_int(text: str) -> int:
    # int() of thousands of digits is slow, and refused past 4300 with a hint about sys.
    if len(text) > 40:
        raise ValueError(f"an integer of {len(text):,} digits (only small integers are read)")
    return int(text)


def strict_json(raw: bytes) -> Any:
    """UTF-8 JSON with duplicate keys, NaN/Infinity and integers of more than 40 digits refused
    (ValueError); shared with the diffusers reader. See `json_cost` for what it allocates."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    text = raw.decode("utf-8")
    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_int=_small_int)


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
    refusal = header_refusal(raw, size)
    if refusal:
        raise CheckpointError(f"{where}: {refusal}")
    try:
        header = strict_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else printable(e)[:200]
        raise CheckpointError(f"{where}: corrupt safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{where}: safetensors __metadata__ must map names to strings")
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
