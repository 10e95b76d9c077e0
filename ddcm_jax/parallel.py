"""Sharding at the call site: a device mesh with a data axis (images) and a codebook axis (atoms).

The math never names a device axis. `compress_sharded` wraps the single-image
`compress` in `shard_map`: each device of the "data" axis compresses its own
images; with a "codebook" axis of size n > 1, every codebook is split into n
contiguous index ranges scored on different devices, and the best atoms are
combined exactly as one device would have ranked them (ties to the lower
index), so the indices do not depend on n.

Bit-identical files across device counts: each device runs the same program
on its own images, so for the same per-device batch the code (and the
reconstruction) of an image does not depend on how many devices share the
work. The command line uses one image per device.

    mesh = make_mesh()                                 # every local device on "data"
    res = compress_sharded(model, images, mesh=mesh, steps=20, codebook_size=256, key=0)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ddcm_jax.sampler import (
    CompressResult,
    _as_key,
    compress,
    decompress,
    generate,
    resolve_rule,
    restore,
)
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import DDCM, Turbo

__all__ = ["compress_sharded", "decompress_sharded", "generate_sharded", "make_mesh", "restore_sharded"]

DATA, CODEBOOK = "data", "codebook"


def make_mesh(data: int | None = None, codebook: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "codebook") mesh over `devices` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if data is None:
        data = len(devices) // codebook
    if data < 1 or codebook < 1 or data * codebook > len(devices):
        raise ValueError(f"a {data} x {codebook} mesh needs {data * codebook} devices, {len(devices)} given")
    return Mesh(np.array(devices[: data * codebook]).reshape(data, codebook), (DATA, CODEBOOK))


@dataclasses.dataclass(frozen=True)
class _Static:
    """The hashable settings a compiled sharded program depends on."""

    mode: str  # compress | restore | generate | decode
    steps: int
    codebook_size: int
    num_atoms: int
    coef_bits: int
    schedule: tuple[str, int, str] | None
    eta: float
    clip: bool
    generator: str
    codebook_chunk: int | None
    t_range: tuple[int, int] | None
    image_shape: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def _program(mesh: Mesh, static: _Static, has: tuple[bool, ...]) -> Any:
    """The jitted shard_map program for these settings (compiled once per shape).

    Arguments: (model, rule, operator, x, keys, extra) with x the per-image
    input (images, measurements, codes (indices, coeffs), or None for
    generation), keys (B,) and extra = (x_T, weights, class labels), each None
    or per image. `has` says which of x and extra are present.
    """
    codebook_axis = CODEBOOK if mesh.shape[CODEBOOK] > 1 else None
    schedule = None if static.schedule is None else Schedule.create(*static.schedule)
    kw = dict(steps=static.steps, codebook_size=static.codebook_size, schedule=schedule,
              eta=static.eta, clip=static.clip, generator=static.generator, progress=True)  # fmt: skip
    shape = static.image_shape

    def one_device(model: Any, rule: Any, op: Any, x: Any, keys: jax.Array, extra: Any) -> Any:
        x_T, weights, labels = extra
        if static.mode == "decode":
            return decompress(model, x[0], x[1], image_shape=shape, rule=rule, key=keys, x_T=x_T,
                              class_label=labels, **kw)  # fmt: skip
        if static.mode == "restore":
            return restore(model, x, op, rule=rule, key=keys, image_shape=(keys.shape[0], *shape), x_T=x_T,
                           class_label=labels, codebook_chunk=static.codebook_chunk,
                           codebook_axis=codebook_axis, **kw)  # fmt: skip
        if static.mode == "generate":
            return generate(model, key=keys, class_label=labels, image_shape=shape, **kw)
        return compress(model, x, rule=rule, key=keys, x_T=x_T, weights=weights, class_label=labels,
                        t_range=static.t_range, codebook_chunk=static.codebook_chunk,
                        codebook_axis=codebook_axis, **kw)  # fmt: skip

    data = P(DATA)
    specs = (P(), P(), P(), data if has[0] else None, data, tuple(data if h else None for h in has[1:]))
    return jax.jit(jax.shard_map(one_device, mesh=mesh, in_specs=specs, out_specs=data, check_vma=False))


def _pad_rows(a: Any, n: int) -> Any:
    """Pad the leading axis to n rows by repeating the last row (the extra results are dropped)."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_pad_rows(v, n) for v in a)
    if a.shape[0] == n:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], n - a.shape[0], axis=0)])


def _keys(key: Any, batch: int) -> jax.Array:
    key = _as_key(key)
    if key.ndim == 0:
        return jnp.broadcast_to(key, (batch,))
    if key.shape != (batch,):
        raise ValueError(f"key must be one key or {batch} keys, got shape {key.shape}")
    return key


def _run(mesh: Mesh, mode: str, batch: int, x: Any, *, model: Any, rule: Any = None, op: Any = None, key: Any,
         x_T: Any = None, weights: Any = None, class_label: Any = None, schedule: Schedule | None = None,
         steps: int, codebook_size: int, num_atoms: int = 1, coef_bits: int = 1, t_range: Any = None,
         eta: float = 1.0, clip: bool = True, generator: str = "philox", codebook_chunk: int | None = None,
         image_shape: tuple[int, ...]) -> Any:  # fmt: skip
    n = mesh.shape[DATA]
    padded = -(-batch // n) * n
    if schedule is not None and not isinstance(schedule.alpha_bar, np.ndarray):
        raise ValueError("sharded sampling takes a schedule made by Schedule.create (host float64 values)")
    static = _Static(
        mode=mode, steps=steps, codebook_size=codebook_size, num_atoms=num_atoms, coef_bits=coef_bits,
        schedule=None if schedule is None else (schedule.name, schedule.num_timesteps, schedule.respacing),
        eta=float(eta), clip=clip, generator=generator, codebook_chunk=codebook_chunk,
        t_range=None if t_range is None else (int(min(t_range)), int(max(t_range))),
        image_shape=tuple(int(v) for v in image_shape)[-3:],
    )  # fmt: skip
    extra = tuple(None if v is None else _pad_rows(jnp.asarray(v), padded) for v in (x_T, weights, class_label))
    fn = _program(mesh, static, (x is not None, *(v is not None for v in extra)))
    out = fn(model, rule, op, _pad_rows(x, padded), _pad_rows(_keys(key, batch), padded), extra)
    return jax.tree_util.tree_map(lambda a: a[:batch], out)


def compress_sharded(model: Any, images: jax.Array, *, mesh: Mesh, num_atoms: int = 1, coef_bits: int = 1,
                     rule: Any = "ddcm", **kw: Any) -> CompressResult:  # fmt: skip
    """`compress` of a batch (B, H, W, 3) over `mesh` (see the module docstring).

    Takes `compress`'s keywords (steps, codebook_size, key, x_T, weights,
    class_label, t_range, schedule, eta, clip, generator, codebook_chunk).
    `key` is one key or (B,) keys; per-image arguments have a leading B axis.
    B need not divide the data axis (the last image is repeated, then dropped).
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got {images.shape}")
    return _run(mesh, "compress", images.shape[0], images, model=model, rule=resolve_rule(rule, num_atoms, coef_bits),
                num_atoms=num_atoms, coef_bits=coef_bits, image_shape=images.shape, **kw)  # fmt: skip


def restore_sharded(model: Any, measurements: jax.Array, operator: Any, *, mesh: Mesh,
                    image_shape: tuple[int, ...], rule: Any = "mse", **kw: Any) -> CompressResult:  # fmt: skip
    """`restore` of a batch of measurements (B, ...) into images of `image_shape` (H, W, 3)."""
    y = jnp.asarray(measurements, jnp.float32)
    return _run(mesh, "restore", y.shape[0], y, model=model, rule=resolve_rule(rule, 1, 1, operator), op=operator,
                image_shape=image_shape, **kw)  # fmt: skip


def generate_sharded(model: Any, *, mesh: Mesh, key: jax.Array, image_shape: tuple[int, ...],
                     **kw: Any) -> CompressResult:  # fmt: skip
    """`generate` of one image per key in `key` (B,), over the mesh's data axis."""
    key = _as_key(key)
    if key.ndim != 1:
        raise ValueError("generate_sharded takes a (B,) array of keys, one per image")
    return _run(mesh, "generate", key.shape[0], None, model=model, key=key, image_shape=image_shape, **kw)


def decompress_sharded(model: Any, indices: jax.Array, coeffs: jax.Array, *, mesh: Mesh,
                       image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1,
                       rule: Any = "ddcm", **kw: Any) -> jax.Array:  # fmt: skip
    """`decompress` of a batch of codes (B, steps-1, M) over the mesh's data axis."""
    indices, coeffs = jnp.asarray(indices, jnp.int32), jnp.asarray(coeffs, jnp.int32)
    if isinstance(rule, str) and rule in ("mse", "mse_inner", "random", "soft"):
        rule = "ddcm"
    rule_obj = resolve_rule(rule, num_atoms, coef_bits)
    if rule_obj.num_atoms == 1 and not isinstance(rule_obj, Turbo):
        rule_obj = DDCM()
    return _run(mesh, "decode", indices.shape[0], (indices, coeffs), model=model, rule=rule_obj,
                num_atoms=num_atoms, coef_bits=coef_bits, image_shape=image_shape, **kw)  # fmt: skip
