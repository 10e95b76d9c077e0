"""Safetensors files written and read one tensor at a time (models larger than memory).

A FLUX.1 transformer is 23.8 GB in bfloat16 and 48 GB as float32: conversion must
never hold it. `write_streaming` writes the header first (every name, shape and
dtype is known from the conversion plan), then each tensor as `produce` makes it,
so the peak is one tensor. `TensorFile` reads them back one at a time through the
converter's strict header parser (offsets, lengths, dtypes all checked; nothing is
executed, nothing allocated beyond the entries' declared sizes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["DTYPE_NAMES", "TensorFile", "write_streaming"]

DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


def write_streaming(path: Path, entries: Iterable[tuple[str, tuple[int, ...], Any]],
                    produce: Callable[[str], np.ndarray],
                    on_array: Callable[[str, np.ndarray], None] | None = None) -> int:  # fmt: skip
    """Write `entries` (name, shape, dtype) in the given order, tensor k being `produce(name_k)`
    (which must have that shape and dtype); `on_array(name, array)` sees each (a streaming hash).
    Returns the bytes written. The file is a standard safetensors file."""
    entries = list(entries)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the body aligned to 8 bytes, as the reference writer does
    with open(path, "xb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape, dtype in entries:
            array = np.ascontiguousarray(produce(name))
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise AssertionError(f"{name}: produced {array.dtype}{list(array.shape)}, planned {dtype}{list(shape)}")
            if on_array is not None:
                on_array(name, array)
            f.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            del array
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


class TensorFile:
    """A safetensors file opened for reading tensor by tensor (`names`, `shape(name)`, `read(name)`).

    Raises `ValueError` (one line naming the file) on any malformed header or entry."""

    def __init__(self, path: Path) -> None:
        from ddcm_jax.convert.diffusers import PipelineError, SafetensorsFile

        try:
            self._file = SafetensorsFile(Path(path))
        except PipelineError as e:
            raise ValueError(str(e)) from None
        self.entries = self._file.entries

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        from ddcm_jax.convert.diffusers import PipelineError

        try:
            return self._file.read(name)
        except PipelineError as e:
            raise ValueError(str(e)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
