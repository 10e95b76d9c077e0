"""Sharding at the call site: a device mesh with a data axis (images) and a codebook axis (atoms).

The math never names a device axis. `encode_sharded` runs the sampler's own
batch function on each device of the "data" axis, each on its own images; with a "codebook" axis of size n > 1, every codebook is split into n
contiguous index ranges scored on different devices, and the best atoms are
combined exactly as one device would have ranked them (ties to the lower
index), so the indices do not depend on n.

Bit-identical files across device counts: each device runs the same program
on its own images, so for the same per-device batch the code (and the
reconstruction) of an image does not depend on how many devices share the
work. The command line uses one image per device.

    mesh = make_mesh()                                 # every local device on "data"
    res = encode_sharded(model, spec, images, mesh=mesh, key=0)
    res = compress_sharded(model, images, mesh=mesh, steps=20, codebook_size=256, key=0)  # keywords

A thin layer: each device runs the sampler's own batch function (`sampler.encode_split`
/ `decode`) on its rows; a one-device mesh runs it directly, without `shard_map`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddcm_jax.jit import jit
from ddcm_jax.sampler import (
    CompressResult,
    Progress,
    Window,
    _to_image,
    _to_target,
    as_key,
    decode_result,
    encode_split,
    run_steps,
    start_noise,
)
from ddcm_jax.selection import Random
from ddcm_jax.spec import CodeSpec

__all__ = [
    "compress_sharded",
    "decode_sharded",
    "decompress_sharded",
    "encode_sharded",
    "gather_json",
    "generate_sharded",
    "make_mesh",
    "restore_sharded",
]

DATA, CODEBOOK = "data", "codebook"


def make_mesh(data: int | None = None, codebook: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "codebook") mesh over `devices` (default: this process's local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if data is None:
        data = len(devices) // codebook
    if data < 1 or codebook < 1 or data * codebook > len(devices):
        raise ValueError(f"a {data} x {codebook} mesh needs {data * codebook} devices, {len(devices)} given")
    return Mesh(np.array(devices[: data * codebook]).reshape(data, codebook), (DATA, CODEBOOK))


def _device_fn(mode: str, image_shape: tuple[int, ...], chunk: int | None, kernel: str, axis: str | None,
               n: int) -> Any:  # fmt: skip
    """What one device runs on its rows: the sampler's batch path over steps [lo, lo + n), nothing else."""

    def run(model: Any, spec: CodeSpec, x: Any, keys: jax.Array, extra: Any, cond: Any, lo: Any) -> Any:
        x_T, weights, labels = extra
        window = Window(lo, n, spec.steps)
        batch_shape = (keys.shape[0], *image_shape)
        if mode == "decode":
            return decode_result(model, spec, x[0], x[1], key=keys, image_shape=batch_shape, x_T=x_T,
                                 class_label=labels, cond=cond, window=window).latent  # fmt: skip
        return encode_split(model, spec, x if mode == "compress" else None, key=keys,
                            measurement=x if mode == "restore" else None, image_shape=batch_shape, x_T=x_T,
                            weights=weights, class_label=labels, cond=cond, codebook_chunk=chunk,
                            codebook_kernel=kernel, codebook_axis=axis, window=window)  # fmt: skip

    return run


@functools.lru_cache(maxsize=64)
def _program(mesh: Mesh, mode: str, image_shape: tuple[int, ...], chunk: int | None, kernel: str,
             has: tuple[bool, ...], n: int) -> Any:  # fmt: skip
    """The jitted program for a mesh and a window of n steps (arguments: model, spec, x, keys (B,),
    (x_T, weights, labels), cond (shared), lo).

    One device: the batch function itself. Several: it under `shard_map`, rows
    over the data axis, each codebook split over the codebook axis.
    """
    axis = CODEBOOK if mesh.size > 1 and mesh.shape[CODEBOOK] > 1 else None
    fn = _device_fn(mode, image_shape, chunk, kernel, axis, n)
    if mesh.size == 1:
        return jit(fn)
    data = P(DATA)
    specs = (P(), P(), data if has[0] else None, data, tuple(data if h else None for h in has[1:]), P(), P())
    return jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=data, check_vma=False))


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
    key = as_key(key)
    if key.ndim == 0:
        return jnp.broadcast_to(key, (batch,))
    if key.shape != (batch,):
        raise ValueError(f"key must be one key or {batch} keys, got shape {key.shape}")
    return key


def _each(fn: Any, model: Any, a: jax.Array) -> jax.Array:
    """fn(model, row) for each row, one batch-1 call each: a row's result never depends on the batch."""
    return jnp.stack([fn(model, a[b]) for b in range(a.shape[0])])


def _run(mesh: Mesh, mode: str, model: Any, spec: CodeSpec, batch: int, x: Any, *, key: Any,
         image_shape: tuple[int, ...], x_T: Any = None, weights: Any = None, class_label: Any = None,
         codebook_chunk: int | None = None, codebook_kernel: str = "xla", progress: Progress | None = None,
         prompt: str | None = None, guidance: float = 0.0, edit_prompt: str | None = None,
         tskip: int = 0) -> Any:  # fmt: skip
    model.check_spec(spec)
    n = mesh.shape[DATA]
    padded = -(-batch // n) * n
    image_hw_c = tuple(int(v) for v in image_shape)[-3:]
    shape = model.state_shape(image_hw_c)
    if mode == "compress":
        x = _each(_to_target, model, x)  # the family's target (a latent model: the VAE's encoding)
    if mode == "decode":
        cond = model.make_conditioning(prompt=prompt, guidance=guidance, edit_prompt=edit_prompt, tskip=tskip)
    else:
        cond = model.make_conditioning(prompt=prompt, guidance=guidance, ccfg=spec.rule.aims_at_guidance)
    x = _pad_rows(x, padded)
    keys = _pad_rows(_keys(key, batch), padded)
    weights, labels = (None if v is None else _pad_rows(jnp.asarray(v), padded) for v in (weights, class_label))
    x_T = None if x_T is None else _pad_rows(jnp.asarray(x_T, jnp.float32), padded)
    if x_T is None:  # the run starts from x_T drawn here
        x_T = _start_noise(keys, shape)
    if mesh.size > 1:  # arrays made on one device (a loaded model's, the targets) placed as the program wants them
        shared = NamedSharding(mesh, P())
        rows = NamedSharding(mesh, P(DATA))
        model, cond = jax.device_put((model, cond), shared)
        x, keys, weights, labels = jax.device_put((x, keys, weights, labels), rows)

    def call(x_t: Any, w: Window) -> tuple[Any, Any]:
        if mesh.size > 1:
            x_t = jax.device_put(x_t, rows)
        extra = (x_t, weights, labels)
        has = (x is not None, *(v is not None for v in extra))
        program = _program(mesh, mode, image_hw_c, codebook_chunk, codebook_kernel, has, w.n)
        out = program(model, spec, x, keys, extra, cond, w.lo)
        return (out, None) if mode == "decode" else (out.latent, (out.indices, out.coeffs))

    x_0, code = run_steps(call, x_T, spec.steps, spec.code_rows, progress)
    x_0 = x_0[:batch]
    image = _each(_to_image, model, x_0)
    if mode == "decode":
        return image
    return CompressResult(code[0][:batch], code[1][:batch], image, x_0)


@functools.partial(jit, static_argnames="shape")
def _start_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: start_noise(k, shape))(keys)


def encode_sharded(model: Any, spec: CodeSpec, images: Any = None, *, mesh: Mesh, key: Any,
                   measurements: Any = None, image_shape: tuple[int, ...] | None = None,
                   **kw: Any) -> CompressResult:  # fmt: skip
    """`sampler.encode` of a batch over `mesh`: images (B, H, W, 3), measurements (B, ...), or keys (B,).

    Per-image `x_T`, `weights`, `class_label` have a leading B axis;
    `codebook_chunk` and `codebook_kernel` as in `encode`. B need not divide the data axis (the last
    row is repeated, then dropped).
    """
    if images is not None:
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, C), got {images.shape}")
        return _run(mesh, "compress", model, spec, images.shape[0], images, key=key, image_shape=images.shape, **kw)
    if image_shape is None:
        raise ValueError("give images, or image_shape (H, W, 3) with measurements or keys")
    if measurements is not None:
        y = jnp.asarray(measurements, jnp.float32)
        return _run(mesh, "restore", model, spec, y.shape[0], y, key=key, image_shape=image_shape, **kw)
    key = as_key(key)
    if key.ndim != 1:
        raise ValueError("generation takes a (B,) array of keys, one per image")
    return _run(mesh, "generate", model, spec, key.shape[0], None, key=key, image_shape=image_shape, **kw)


def decode_sharded(model: Any, spec: CodeSpec, indices: Any, coeffs: Any, *, mesh: Mesh, key: Any,
                   image_shape: tuple[int, ...], **kw: Any) -> jax.Array:  # fmt: skip
    """`sampler.decode` of a batch of codes (B, steps-1, M) over the mesh's data axis."""
    indices, coeffs = jnp.asarray(indices, jnp.int32), jnp.asarray(coeffs, jnp.int32)
    return _run(mesh, "decode", model, spec.for_decoding(), indices.shape[0], (indices, coeffs), key=key,
                image_shape=image_shape, **kw)  # fmt: skip


# Keyword forms, as `compress` / `restore` / `generate` / `decompress` are of `encode` / `decode`.

_SPEC_KEYS = ("steps", "codebook_size", "generator", "eta", "t_range", "clip", "schedule", "no_bits_steps")


def _split(model: Any, image_hw: tuple[int, ...], kw: dict[str, Any], **rule: Any) -> tuple[CodeSpec, dict[str, Any]]:
    """The family's spec from the keyword forms' settings (`model.make_spec`), and the other keywords."""
    settings = {k: kw.pop(k) for k in _SPEC_KEYS if k in kw}
    return model.make_spec(image_hw=tuple(image_hw)[-3:-1], **settings, **rule), kw


def compress_sharded(model: Any, images: jax.Array, *, mesh: Mesh, num_atoms: int = 1, coef_bits: int = 1,
                     rule: Any = "ddcm", **kw: Any) -> CompressResult:  # fmt: skip
    """`compress` of a batch (B, H, W, 3) over `mesh`, with `compress`'s keywords (any family)."""
    spec, kw = _split(model, np.shape(images)[-3:], kw, rule=rule, num_atoms=num_atoms, coef_bits=coef_bits)
    return encode_sharded(model, spec, images, mesh=mesh, **kw)


def restore_sharded(model: Any, measurements: jax.Array, operator: Any, *, mesh: Mesh,
                    image_shape: tuple[int, ...], rule: Any = "mse", **kw: Any) -> CompressResult:  # fmt: skip
    """`restore` of a batch of measurements (B, ...) into images of `image_shape` (H, W, 3) (pixel models)."""
    spec = CodeSpec.create(**{k: kw.pop(k) for k in _SPEC_KEYS if k in kw}, rule=rule, operator=operator)
    return encode_sharded(model, spec, mesh=mesh, measurements=measurements, image_shape=image_shape, **kw)


def generate_sharded(model: Any, *, mesh: Mesh, key: jax.Array, image_shape: tuple[int, ...],
                     **kw: Any) -> CompressResult:  # fmt: skip
    """`generate` of one image per key in `key` (B,), over the mesh's data axis."""
    kw.setdefault("no_bits_steps", 0)
    spec, kw = _split(model, (*tuple(image_shape)[-3:-1], 3), kw, rule=Random())
    return encode_sharded(model, spec, mesh=mesh, key=key, image_shape=image_shape, **kw)


def decompress_sharded(model: Any, indices: jax.Array, coeffs: jax.Array, *, mesh: Mesh,
                       image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1,
                       rule: Any = "ddcm", **kw: Any) -> jax.Array:  # fmt: skip
    """`decompress` of a batch of codes (B, code_rows, M) over the mesh's data axis: the images."""
    spec, kw = _split(model, (*tuple(image_shape)[-3:-1], 3), kw, rule=rule, num_atoms=num_atoms,
                      coef_bits=coef_bits, decoding=True)  # fmt: skip
    return decode_sharded(model, spec, indices, coeffs, mesh=mesh, image_shape=image_shape, **kw)


def gather_json(value: Any, default: Callable[[Any], Any] | None = None) -> list[Any]:
    """Every process's `value` (JSON: `json.dumps(value, default=default)`), in process order, gathered
    over the network (no shared filesystem needed); every process must call it."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value, default=default).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).ravel()
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: data.size] = data
    parts = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(parts[i, : sizes[i]]).decode()) for i in range(len(sizes))]
