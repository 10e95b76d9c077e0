"""The one DDCM sampler for every model family: one `lax.scan` over a pure step, rules plugged in.

A family (`ddcm_jax.family.Family`: `ddcm_jax.pixel` for ADM, `ddcm_jax.latent`
for Stable Diffusion, `ddcm_jax.flux` for FLUX.1) gives the network, the prediction type, the per-step
schedule and the image <-> state maps; the sampler knows none of them by name.
Every step of every family, encoding and decoding alike:

  (1) out, aim        = family.denoise(x_t, s, cond)
  (2) x0_hat, eps_hat = family.predict(x_t, out, s)
  (3) indices, coeffs = rule.select(...) when encoding (the idle code outside t_range),
                        the code's own row when decoding
  (4) z               = replay.noise(book, indices, coeffs) on the steps with a code row, else 0
  (5) x_prev          = family.combine(x_t, x0_hat, eps_hat, s, z)
                        ADM, SD: sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z
                        FLUX: the DDPM posterior mean + sigma z on coded steps (Turbo-DDCM's)

Schedule rows enter the scan as xs, chosen indices leave it as ys. The first
`spec.code_rows` steps in run order carry a code row; the rest (the last step,
and a latent code's no-bits steps) add no noise.

Exactness by construction: encoder and decoder run the same body, and the
encoder's noise is the decoder's `replay.noise` of the code it chose (a rule
whose encoder noise is not its replay, `Soft`, says so with `replays_exactly`).
The network's output, the code and the noise pass `optimization_barrier`s, so
XLA cannot fuse the shared arithmetic differently on the two sides:
`decode(encode(x).code)` is `encode(x).image` bit for bit on one machine, for
one batch size. A run called with `progress` runs the same body one compiled
call per step (`Window`), reporting between calls.

Keys: `key` -> fold_in(key, 0) x_T, fold_in(key, 1) codebook root (step i's
atoms addressed by the integers (i, k) under it, see `ddcm_jax.codebook`),
fold_in(key, 2) the rule's own keys.

Batching is decided once (`_per_image`): an image (or code, or measurement)
with one more axis than a single one is a batch, `vmap`ped (one batched
network call per step), and so is each per-image argument with one more axis
than its single form; the others are shared.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.codebook import AtomSource
from ddcm_jax.family import Family
from ddcm_jax.jit import jit
from ddcm_jax.pytree import pytree_dataclass
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import Random, StepContext
from ddcm_jax.shapes import Codebook, Coeffs, Image, Indices, Key, Label, Measurement, Weights
from ddcm_jax.spec import CodeSpec
from ddcm_jax.stepping import PRNG_IMPL, Progress, Window, as_key, run_steps

__all__ = [
    "PRNG_IMPL",
    "CompressResult",
    "Progress",
    "Window",
    "as_key",
    "bits_per_image",
    "compress",
    "decode",
    "decode_result",
    "decompress",
    "encode",
    "encode_split",
    "generate",
    "restore",
    "run_steps",
    "sample",
    "start_noise",
]


@pytree_dataclass
class CompressResult:
    """What encoding and decoding return, for every family (a pytree: it can leave `jit` / `vmap`).

    `coeffs`: matching pursuit (rows, M-1) coefficient indices; turbo (rows, M)
    sign bits (1 = negative), as the file stores them; else (rows, 0).
    `latent`: the final state x_0 (a latent model's latent; a pixel model's image).
    """

    indices: Indices
    coeffs: Coeffs
    image: Image  # the reconstruction; decoding the code returns the same, bit for bit
    latent: jax.Array


def bits_per_image(steps: int, codebook_size: int, num_atoms: int = 1, coef_bits: int = 1,
                   rule: str = "ddcm") -> int:  # fmt: skip
    """Payload bits of one pixel image, exactly: (steps-1) x the rule's `bits_per_step(K)`.

    DDCM / matching pursuit: (steps-1) * (M * ceil(log2 K) + (M-1) * C);
    turbo: (steps-1) * (ceil(log2 binom(K, M)) + M).
    """
    return CodeSpec.create(steps=steps, codebook_size=codebook_size, rule=rule, num_atoms=num_atoms,
                           coef_bits=coef_bits).payload_bits()  # fmt: skip


def _row(a: jax.Array, s: Any) -> jax.Array:
    """Row s.row of a per-coded-step array (steps past its end read its last row; their noise is 0)."""
    return jax.lax.dynamic_index_in_dim(a, jnp.minimum(s.row, a.shape[0] - 1), keepdims=False)


@dataclasses.dataclass(frozen=True)
class _Books:
    """How one run builds each step's codebook (static): from the spec, or the explicit rows.

    `chunk`, `axis_name` and `kernel` decide how atoms are scored (memory, devices, fusion), never
    which are chosen.
    """

    size: int
    generator: str
    chunk: int | None = None
    axis_name: str | None = None
    kernel: str = "xla"

    def at(self, shape: tuple[int, ...], root: jax.Array, s: Any, rows: Any) -> AtomSource:
        if rows is not None:
            # One materialised row, as both sides see it (not fused into either side's gathers).
            row = jax.lax.optimization_barrier(_row(rows, s))
            return AtomSource.from_array(row, chunk=self.chunk, axis_name=self.axis_name)
        return AtomSource(self.size, shape, self.generator, self.chunk, self.axis_name, self.kernel, root=root,
                          step=s.i).with_base()  # fmt: skip


def _scan(model: Family, spec: CodeSpec, x: jax.Array, xs: Any, cond: Any, noise_fn: Any) -> tuple[Any, Any]:
    """Steps (1)-(5) over the rows of `xs`; `noise_fn(x_t, x0_hat, aim, s) -> (z, ys)`.

    Barriers between the stages keep each stage one piece of arithmetic, the
    same in an encoder and a decoder (without them XLA may contract or fuse the
    shared expressions differently around the encoder's selection).
    """
    barrier = jax.lax.optimization_barrier

    def body(x_t: jax.Array, s: Any) -> tuple[jax.Array, Any]:
        out, aim = model.denoise(x_t, s, cond)  # (1)
        x_t, out = barrier((x_t, out))
        x0_hat, eps_hat = barrier(model.predict(x_t, out, s, spec))  # (2)
        noise, ys = noise_fn(x_t, x0_hat, aim, s)  # (3)-(4)
        noise = barrier(jnp.where(s.noisy, noise, jnp.zeros_like(noise)))
        return model.combine(x_t, x0_hat, eps_hat, s, noise), ys  # (5)

    return jax.lax.scan(body, x, xs)


def _window(xs: Any, w: Window) -> Any:
    """Rows [lo, lo + n) of the schedule (`lo` may be traced); the whole schedule passes untouched."""
    if w.n == w.total:
        return xs
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(jnp.asarray(a), w.lo, w.n), xs)


@functools.partial(jit, static_argnames=("books", "n"))
def _encode_one(model, spec, target, measurement, x_T, xs, rows, weights, cond, key, lo, *, books, n):
    shape, rule = tuple(x_T.shape), spec.rule
    replay = rule.replay()
    cb_root, rule_root = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

    def noise_fn(x_t, x0_hat, aim, s):
        ctx = StepContext(x_t, x0_hat, s.sigma, s.alpha_bar_prev, target if aim is None else aim, measurement,
                          weights, jax.random.fold_in(rule_root, s.i))  # fmt: skip
        book = books.at(shape, cb_root, s, rows)

        def idle() -> tuple[jax.Array, jax.Array, jax.Array]:
            idx, co = rule.idle_code()
            return replay.noise(book, idx, co), idx, co

        if not rule.replays_exactly:  # its own noise (a soft mixture): the value gradients flow through
            noise, idx, co = jax.lax.cond(s.coded, lambda: tuple(rule.select(ctx, book)), idle)  # (3)
            return noise, (idx, co)
        code = jax.lax.cond(s.coded, lambda: tuple(rule.select(ctx, book)[1:]), rule.idle_code)  # (3)
        idx, co = jax.lax.optimization_barrier(code)
        noise = jax.lax.cond(s.noisy, lambda: replay.noise(book, idx, co), lambda: jnp.zeros(shape, jnp.float32))
        return noise, (idx, co)  # (4): the decoder's own program (a branch is compiled on its own, the same on both sides)

    return _scan(model, spec, x_T, _window(xs, Window(lo, n, spec.steps)), cond, noise_fn)


@functools.partial(jit, static_argnames=("books", "n"))
def _decode_one(model, spec, indices, coeffs, x_T, xs, rows, cond, key, lo, *, books, n):
    shape, rule = tuple(x_T.shape), spec.rule
    cb_root = jax.random.fold_in(key, 1)

    def noise_fn(x_t, x0_hat, aim, s):
        idx, co = jax.lax.optimization_barrier((_row(indices, s), _row(coeffs, s)))  # (3)
        book = books.at(shape, cb_root, s, rows)
        noise = jax.lax.cond(s.noisy, lambda: rule.noise(book, idx, co), lambda: jnp.zeros(shape, jnp.float32))
        return noise, None  # (4)

    return _scan(model, spec, x_T, _window(xs, Window(lo, n, spec.steps)), cond, noise_fn)[0]


@functools.partial(jit, static_argnames=("n",))
def _sample_one(model, spec, x_T, xs, cond, key, lo, *, n):
    noise_key = jax.random.fold_in(key, 3)

    def noise_fn(x_t, x0_hat, aim, s):
        return jax.random.normal(jax.random.fold_in(noise_key, s.i), x_t.shape, jnp.float32), None

    return _scan(model, spec, x_T, _window(xs, Window(lo, n, spec.steps)), cond, noise_fn)[0]


@jit
def _to_target(model: Family, image: jax.Array) -> jax.Array:
    return model.to_target(image)


@jit
def _to_image(model: Family, x_0: jax.Array) -> jax.Array:
    return model.to_image(jax.lax.optimization_barrier(x_0))


def _mapped(fn: Any, model: Family, a: jax.Array, single_ndim: int) -> jax.Array:
    return fn(model, a) if a.ndim == single_ndim else jax.vmap(lambda v: fn(model, v))(a)


def start_noise(key: Key, shape: tuple[int, ...]) -> jax.Array:
    """x_T of one image: normal(fold_in(key, 0)) in `shape` (the family's state shape)."""
    return jax.random.normal(jax.random.fold_in(as_key(key), 0), tuple(shape), jnp.float32)


def _check_codebook(codebook: Any, spec: CodeSpec, shape: tuple[int, ...]) -> Any:
    """Explicit codebooks (code_rows, K, *state shape), one per step that carries a code row."""
    if codebook is None:
        return None
    codebook = jnp.asarray(codebook, jnp.float32)
    want = (spec.code_rows, spec.codebook_size, *shape)
    if codebook.shape != want:
        raise ValueError(f"codebook must have shape {want} (one per step that carries bits), got {codebook.shape}")
    return codebook


# The rank of each per-image argument for one image; one more axis makes it a batch.
_SINGLE_RANK = {"image": 3, "target": 3, "x_T": 3, "weights": 3, "class_label": 0, "key": 0, "indices": 2,
                "coeffs": 2}  # fmt: skip


def _per_image(one: Any, args: dict[str, Any], batch: bool) -> Any:
    """`one(**args)` for one image, or vmapped over the leading axis of the batched arguments.

    With `batch`, an argument is per image when it has one more axis than its
    single form (`_SINGLE_RANK`; "measurement" always is); the others (None,
    or single) are shared by every image. The one place batching is decided.
    """
    if not batch:
        return one(**args)

    def batched(name: str, v: Any) -> bool:
        if v is None:
            return False
        if name == "measurement":
            return True
        rank, single = (as_key(v).ndim if name == "key" else np.ndim(v)), _SINGLE_RANK[name]
        if rank > single + 1:
            raise ValueError(f"{name} has shape {np.shape(v)}: at most {single} axes for one image, shared by the "
                             f"batch, or {single + 1} with the batch first")  # fmt: skip
        return rank == single + 1

    names = [n for n, v in args.items() if batched(n, v)]
    sizes = {n: np.shape(args[n])[0] for n in names}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"per-image arguments disagree on the batch size: {sizes}")
    shared = {n: v for n, v in args.items() if n not in sizes}
    return jax.vmap(lambda *vals: one(**shared, **dict(zip(names, vals, strict=True))))(*(args[n] for n in names))


def _start(key: Any, shape: tuple[int, ...]) -> jax.Array:
    """x_T for one key or each of (B,) keys (a step-by-step run draws it before the first step)."""
    key = as_key(key)
    return start_noise(key, shape) if key.ndim == 0 else jax.vmap(lambda k: start_noise(k, shape))(key)


def _image_shape(model: Family, image: Any, image_shape: Any, x_T: Any, measurement: Any) -> tuple[int, ...]:
    if image is not None:
        if image.ndim not in (3, 4):
            raise ValueError(f"image must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
        return tuple(image.shape)
    if image_shape is not None:
        return tuple(int(v) for v in image_shape)
    if measurement is not None and x_T is None:
        raise ValueError("give image_shape or x_T")
    if x_T is not None and model.state_shape(tuple(np.shape(x_T))[-3:]) == tuple(np.shape(x_T))[-3:]:
        return tuple(np.shape(x_T))  # a pixel state is the image itself
    return (*model.native_size(), 3)


def encode(model: Family, spec: CodeSpec, image: Image | None = None, *, key: Key,
           measurement: Measurement | None = None, image_shape: tuple[int, ...] | None = None,
           x_T: Any = None, codebook: Codebook | None = None, weights: Weights | None = None,
           class_label: Label | None = None, schedule: Schedule | None = None, prompt: str | None = None,
           guidance: float = 0.0, codebook_chunk: int | None = None, codebook_kernel: str = "xla",
           progress: Progress | None = None) -> CompressResult:  # fmt: skip
    """Choose the code of `image` (H, W, 3) or a batch (B, H, W, 3) under `spec`, for any family.

    With `image`: compression (rules `DDCM`, `MatchingPursuit`, `Turbo`, ...);
    with `measurement` y = A(x) and `image_shape` ((B,) H, W, 3): restoration
    (rule `MSE(A)`); with neither: generation (rule `Random`, or `GuidedSubset`
    with a `prompt`: compressed CFG). See `compress` for the other arguments;
    batching as in the module docstring.
    """
    return encode_split(model, spec, image, key=key, measurement=measurement, image_shape=image_shape, x_T=x_T,
                        codebook=codebook, weights=weights, class_label=class_label, schedule=schedule,
                        prompt=prompt, guidance=guidance, codebook_chunk=codebook_chunk,
                        codebook_kernel=codebook_kernel, progress=progress)  # fmt: skip


def encode_split(model: Family, spec: CodeSpec, image: Any, *, key: Any, measurement: Any = None,
                 image_shape: Any = None, x_T: Any = None, codebook: Any = None, weights: Any = None,
                 class_label: Any = None, schedule: Schedule | None = None, prompt: str | None = None,
                 guidance: float = 0.0, cond: Any = None, codebook_chunk: int | None = None,
                 codebook_kernel: str = "xla", codebook_axis: str | None = None, progress: Progress | None = None,
                 window: Window | None = None) -> CompressResult:  # fmt: skip
    """`encode` with each codebook split over the mesh axis `codebook_axis` (inside `shard_map`).

    For `ddcm_jax.parallel`: the public calls never name a device axis. With
    `window` it runs only those steps from `x_T` (the state before them), on
    the family's `target` given as `image`, with the shared conditioning
    `cond`, and returns their codes (all window rows) and the state; the caller
    drives the steps and maps the final state to the image.
    """
    model.check_spec(spec)
    if image is not None:
        image = jnp.asarray(image, jnp.float32)
    if window is None:
        image_shape = _image_shape(model, image, image_shape, x_T, measurement)
    image_shape = tuple(int(v) for v in image_shape)
    if window is None:
        cond = model.make_conditioning(prompt=prompt, guidance=guidance, ccfg=spec.rule.aims_at_guidance)
    if measurement is not None:
        measurement = jnp.asarray(measurement, jnp.float32)
    books = _Books(spec.codebook_size, spec.generator, codebook_chunk, codebook_axis, codebook_kernel)
    shape = model.state_shape(image_shape[-3:])
    rows = _check_codebook(codebook, spec, shape)
    xs = model.schedule_xs(spec, schedule)
    batch = len(image_shape) == 4 if image is not None or measurement is not None else (
        as_key(key).ndim == 1 or np.ndim(class_label) == 1)  # generation: B keys and/or labels make a batch  # fmt: skip
    target = image
    if image is not None and window is None:
        target = _mapped(_to_target, model, image, 3)

    def one(w: Window, target: Any = None, measurement: Any = None, x_T: Any = None, weights: Any = None,
            class_label: Any = None, key: Any = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # fmt: skip
        k = as_key(key)
        x_T = start_noise(k, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
        wt = None if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), shape)
        c = model.conditioning(cond, class_label)
        return _encode_one(model, spec, target, measurement, x_T, xs, rows, wt, c, k, w.lo, books=books, n=w.n)

    args = dict(target=target, measurement=measurement, weights=weights, class_label=class_label, key=key)

    def call(x: Any, w: Window) -> tuple[jax.Array, Any]:
        return _per_image(functools.partial(one, w), {**args, "x_T": x}, batch)

    if window is not None:
        x, code = call(x_T, window)
        return CompressResult(*code, x, x)
    x0 = x_T if progress is None or x_T is not None else _start(key, shape)
    x, (indices, coeffs) = run_steps(call, x0, spec.steps, spec.code_rows, progress)
    return CompressResult(indices, coeffs, _mapped(_to_image, model, x, 3), x)


def decode_result(model: Family, spec: CodeSpec, indices: Any, coeffs: Any = None, *, key: Key,
                  image_shape: tuple[int, ...], x_T: Any = None, codebook: Codebook | None = None,
                  class_label: Label | None = None, schedule: Schedule | None = None, prompt: str | None = None,
                  guidance: float = 0.0, edit_prompt: str | None = None, tskip: int = 0, cond: Any = None,
                  progress: Progress | None = None, window: Window | None = None) -> CompressResult:  # fmt: skip
    """Rebuild the image from its code, regenerating only the chosen atoms, for any family.

    `indices` (code_rows, M) or a `CompressResult`; (B, code_rows, M) decodes a
    batch. The spec's rule is replaced by the one its decoder replays
    (`CodeSpec.for_decoding`): single-atom rules all replay atom[index].
    `prompt` / `guidance`: the code's conditioning; `edit_prompt` from step
    `tskip` on: text-based editing (latent models).
    """
    if isinstance(indices, CompressResult):
        indices, coeffs = indices.indices, indices.coeffs
    model.check_spec(spec)
    spec = spec.for_decoding()
    indices = jnp.asarray(indices, jnp.int32)
    if coeffs is None:
        coeffs = jnp.zeros((*indices.shape[:-1], spec.coeff_width), jnp.int32)
    coeffs = jnp.asarray(coeffs, jnp.int32)
    want_i, want_c = spec.code_shape
    if indices.shape[-2:] != want_i or coeffs.shape[-2:] != want_c or indices.ndim not in (2, 3):
        raise ValueError(f"indices must be {want_i} and coeffs {want_c} per image for this code, got "
                         f"{indices.shape} and {coeffs.shape}")  # fmt: skip
    _check_values(indices, coeffs, spec)
    if window is None:
        if edit_prompt is not None and not 0 <= tskip <= spec.steps:
            raise ValueError(f"tskip must be a step in 0..{spec.steps}, got {tskip}")
        cond = model.make_conditioning(prompt=prompt, guidance=guidance, edit_prompt=edit_prompt, tskip=tskip)
    books = _Books(spec.codebook_size, spec.generator)
    shape = model.state_shape(tuple(int(v) for v in image_shape)[-3:])
    rows = _check_codebook(codebook, spec, shape)
    xs = model.schedule_xs(spec, schedule)

    def one(w: Window, indices: Any, coeffs: Any, x_T: Any = None, class_label: Any = None,
            key: Any = None) -> tuple[jax.Array, None]:  # fmt: skip
        k = as_key(key)
        x_T = start_noise(k, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
        c = model.conditioning(cond, class_label)
        return _decode_one(model, spec, indices, coeffs, x_T, xs, rows, c, k, w.lo, books=books, n=w.n), None

    args = dict(indices=indices, coeffs=coeffs, class_label=class_label, key=key)

    def call(x: Any, w: Window) -> tuple[jax.Array, None]:
        return _per_image(functools.partial(one, w), {**args, "x_T": x}, indices.ndim == 3)

    if window is not None:
        x = call(x_T, window)[0]
        return CompressResult(indices, coeffs, x, x)
    x0 = x_T if progress is None or x_T is not None else _start(key, shape)
    x = run_steps(call, x0, spec.steps, spec.code_rows, progress)[0]
    return CompressResult(indices, coeffs, _mapped(_to_image, model, x, 3), x)


def _check_values(indices: jax.Array, coeffs: jax.Array, spec: CodeSpec) -> None:
    """Atom indices in 0..K-1 and sign bits 0/1 (skipped for traced codes: a jitted decoder's caller checks)."""
    if isinstance(indices, jax.core.Tracer) or isinstance(coeffs, jax.core.Tracer) or not indices.size:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= spec.codebook_size:
        raise ValueError(f"atom indices must lie in 0..K-1 = {spec.codebook_size - 1}")
    levels = spec.rule.coeff_levels
    if coeffs.size and (int(coeffs.min()) < 0 or int(coeffs.max()) >= levels):
        raise ValueError(f"coeffs must lie in 0..{levels - 1} (turbo: sign bits, 1 = negative)")


def decode(model: Family, spec: CodeSpec, indices: Indices, coeffs: Coeffs | None = None, *, key: Key,
           image_shape: tuple[int, ...], **kw: Any) -> Image:  # fmt: skip
    """`decode_result(...).image`: the image (H, W, 3) or (B, H, W, 3) a code decodes to."""
    return decode_result(model, spec, indices, coeffs, key=key, image_shape=image_shape, **kw).image


# --- the keyword forms ----------------------------------------------------------------------------------


def _override(schedule: Any) -> Schedule | None:
    """A pixel model's explicit `Schedule` (a latent model's schedule is a name in its spec)."""
    return schedule if isinstance(schedule, Schedule) else None


def compress(model: Family, image: Image, *, steps: int, codebook_size: int, num_atoms: int = 1,
             coef_bits: int = 1, rule: Any = "ddcm", key: Key, x_T: Any = None,
             codebook: Codebook | None = None, weights: Weights | None = None,
             t_range: tuple[int, int] | None = None, class_label: Label | None = None,
             schedule: Schedule | str | None = None, eta: float = 1.0, clip: bool | None = None,
             generator: str = "philox", codebook_chunk: int | None = None, codebook_kernel: str = "xla",
             progress: Progress | None = None, no_bits_steps: int | None = None, prompt: str | None = None,
             guidance: float = 0.0) -> CompressResult:  # fmt: skip
    """Encode `image` (H, W, 3) in [-1, 1], or a batch (B, H, W, 3), as codebook indices, with any family.

    The keyword form of `encode(model, model.make_spec(...), image, key=)`.
    `rule`: "ddcm" (M = 1; with num_atoms > 1, matching pursuit with coef_bits C),
    "mp", "turbo" (M atoms, sign bits), "random", or a rule object from
    `ddcm_jax.selection`. `key` (required): a typed key or an int seed; it fixes
    x_T and every codebook. `codebook` (code_rows, K, *state) overrides the
    key-derived codebooks and `x_T` (the state shape) the start noise; `weights`
    ((h, w, 1 or C) of the state) weight the residual; `t_range=(t_min, t_max)`
    (original timesteps, inclusive) restricts selection to those steps, the
    others recording the rule's `idle_code()` (atom 0; turbo: atoms 0..M-1,
    positive).

    Pixel models: `schedule` overrides the respaced `Schedule` (e.g. to
    differentiate through it), `eta`, `clip`, `class_label`. Latent models:
    `schedule` "ddcm" or "turbo" (default: the rule's own), `no_bits_steps`
    (turbo: Turbo-DDCM's heuristic for this size), `prompt` with `guidance`
    (classifier-free guidance; the decoder needs the prompt).

    Codebooks: `generator` "philox" (default), "threefry" or "shift" (see
    `ddcm_jax.codebook`); `codebook_chunk` atoms are generated and scored at a
    time (default: from a 64 MB budget); `codebook_kernel` "pallas" scores a
    philox codebook in one fused kernel instead (`ddcm_jax.fused`; the same
    atoms, sums in another order). `progress(done, total)`, if given,
    runs the steps one call each and reports after each (same result).
    Returns a `CompressResult`. Batches: per-image `x_T`, `weights`,
    `class_label` (B,) and `key` ((B,) keys) with the batch axis first.
    """
    hw = tuple(np.shape(image)[-3:-1])
    spec = model.make_spec(image_hw=hw, steps=steps, codebook_size=codebook_size, rule=rule, num_atoms=num_atoms,
                           coef_bits=coef_bits, generator=generator, eta=eta, t_range=t_range, clip=clip,
                           schedule=schedule if isinstance(schedule, str) else None, no_bits_steps=no_bits_steps)  # fmt: skip
    return encode(model, spec, image, key=key, x_T=x_T, codebook=codebook, weights=weights, class_label=class_label,
                  schedule=_override(schedule), prompt=prompt, guidance=guidance, codebook_chunk=codebook_chunk,
                  codebook_kernel=codebook_kernel, progress=progress)  # fmt: skip


def restore(model: Family, measurement: Measurement, operator: Any, *, steps: int, codebook_size: int,
            rule: Any = "mse", key: Key, image_shape: tuple[int, ...] | None = None,
            x_T: Image | None = None, codebook: Codebook | None = None,
            class_label: Label | None = None, schedule: Schedule | None = None, eta: float = 1.0,
            clip: bool = True, generator: str = "philox", codebook_chunk: int | None = None,
            codebook_kernel: str = "xla", progress: Progress | None = None) -> CompressResult:  # fmt: skip
    """Compressed posterior sampling for y = operator(x) (pixel models): indices + restored image.

    `operator`: an operator from `ddcm_jax.operators` or its name
    ("colorization"); `rule`: "mse", "mse_inner" or an `MSE` object.
    `image_shape` (H, W, 3) of the image to restore; (B, H, W, 3) restores a
    batch, `measurement` then having a leading B axis (per-image `x_T`,
    `class_label` and keys as in `compress`).
    """
    spec = CodeSpec.create(steps=steps, codebook_size=codebook_size, rule=rule, operator=operator,
                           generator=generator, eta=eta, clip=clip)  # fmt: skip
    return encode(model, spec, None, key=key, measurement=measurement, image_shape=image_shape, x_T=x_T,
                  codebook=codebook, class_label=class_label, schedule=schedule, codebook_chunk=codebook_chunk,
                  codebook_kernel=codebook_kernel, progress=progress)  # fmt: skip


def generate(model: Family, *, steps: int, codebook_size: int, key: Key, class_label: Label | None = None,
             image_shape: tuple[int, ...] | None = None, eta: float = 1.0, clip: bool | None = None,
             schedule: Schedule | str | None = None, generator: str = "philox",
             progress: Progress | None = None, prompt: str | None = None, guidance: float = 0.0,
             ccfg_subset: int | None = None) -> CompressResult:  # fmt: skip
    """Compressed generation: uniformly random atoms; the indices encode the sample.

    Latent models: `schedule` "ddcm" (default) or "turbo", `prompt` and
    `guidance` for classifier-free guidance, or `prompt` and `ccfg_subset` N
    for compressed classifier-free guidance (DDCM's `generate_ccfg`: each step
    follows eps_uncond and picks, among N atoms drawn from the key, the one
    with the largest inner product with eps_uncond - eps_cond; the file then
    decodes without the prompt).

    `image_shape` defaults to the model's native (size, size, 3). For B samples
    pass B keys (e.g. `jax.random.split(key, B)`) and/or B class labels.
    `decompress` with rule "ddcm" and the same settings rebuilds it.
    """
    if ccfg_subset is not None and not (isinstance(ccfg_subset, int) and ccfg_subset >= 1):
        raise ValueError(f"ccfg_subset must be a positive number of atoms, got {ccfg_subset!r}")
    if ccfg_subset is not None and ccfg_subset > codebook_size:
        raise ValueError(f"ccfg_subset {ccfg_subset} is more atoms than the codebook's K = {codebook_size}")
    if image_shape is None:
        image_shape = (*model.native_size(), 3)
    from ddcm_jax.selection import GuidedSubset

    rule = Random() if ccfg_subset is None else GuidedSubset(int(ccfg_subset))
    spec = model.make_spec(image_hw=tuple(image_shape[-3:-1]), steps=steps, codebook_size=codebook_size, rule=rule,
                           generator=generator, eta=eta, clip=clip, no_bits_steps=0,
                           schedule=schedule_name(schedule))  # fmt: skip
    return encode(model, spec, None, key=key, class_label=class_label, image_shape=image_shape,
                  schedule=_override(schedule), prompt=prompt, guidance=guidance, progress=progress)  # fmt: skip


def schedule_name(schedule: Any) -> str | None:
    """A `schedule` keyword's name, if it is one (a pixel model refuses names in `make_spec`)."""
    return schedule if isinstance(schedule, str) else None


def sample(model: Family, *, steps: int, key: Key, image_shape: tuple[int, ...] | None = None,
           class_label: Label | None = None, x_T: Any = None, schedule: Schedule | str | None = None,
           eta: float = 1.0, clip: bool | None = None, prompt: str | None = None, guidance: float = 0.0,
           progress: Progress | None = None) -> Image:  # fmt: skip
    """Plain (non-DDCM) sampling with any family: fresh Gaussian noise each step, the same scan and step.

    The noise of step i is normal(fold_in(fold_in(key, 3), i)); x_T as in
    `compress`. The baseline that DDCM decoding is measured against.
    Returns the image (H, W, 3).
    """
    if image_shape is None:
        image_shape = (*model.native_size(), 3)
    key = as_key(key)
    if isinstance(schedule, Schedule):
        steps = schedule.steps
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    spec = model.make_spec(image_hw=tuple(image_shape[-3:-1]), steps=steps, codebook_size=1, rule=Random(), eta=eta,
                           clip=clip, schedule=schedule_name(schedule), no_bits_steps=0)  # fmt: skip
    shape = model.state_shape(tuple(image_shape[-3:]))
    x_T = start_noise(key, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    xs = model.schedule_xs(spec, _override(schedule))
    cond = model.conditioning(model.make_conditioning(prompt=prompt, guidance=guidance), class_label)

    def call(x: Any, w: Window) -> tuple[jax.Array, None]:
        return _sample_one(model, spec, x, xs, cond, key, w.lo, n=w.n), None

    return _to_image(model, run_steps(call, x_T, spec.steps, 0, progress)[0])


def decompress(model: Family, indices: Indices, coeffs: Coeffs | None = None, *, steps: int, codebook_size: int,
               image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1,
               rule: Any = "ddcm", key: Key, x_T: Any = None,
               codebook: Codebook | None = None, class_label: Label | None = None,
               schedule: Schedule | str | None = None, eta: float = 1.0, clip: bool | None = None,
               generator: str = "philox", progress: Progress | None = None, no_bits_steps: int | None = None,
               t_range: tuple[int, int] | None = None, prompt: str | None = None,
               guidance: float = 0.0, edit_prompt: str | None = None, tskip: int = 0) -> Any:  # fmt: skip
    """The keyword form of decoding: rebuild the image from indices (code_rows, M) or (B, code_rows, M).

    Mirrors `compress`'s keywords. A pixel model returns the image (its code
    carries t_range in its indices, so `t_range` is not needed); a latent
    model returns the `CompressResult` (`.latent`, `.image`), with
    `edit_prompt` / `tskip` for text-based editing.

    `rule` only decides how indices become noise: single-atom rules (ddcm,
    mse, random, soft) replay atom[index]; "mp" and "turbo" need M (and C).
    """
    if isinstance(indices, CompressResult):
        indices, coeffs = indices.indices, indices.coeffs
    spec = model.make_spec(image_hw=tuple(image_shape[-3:-1]), steps=steps, codebook_size=codebook_size, rule=rule,
                           num_atoms=num_atoms, coef_bits=coef_bits, generator=generator, eta=eta, clip=clip,
                           t_range=t_range, schedule=schedule_name(schedule), no_bits_steps=no_bits_steps,
                           decoding=True)  # fmt: skip
    res = decode_result(model, spec, indices, coeffs, key=key, image_shape=image_shape, x_T=x_T, codebook=codebook,
                        class_label=class_label, schedule=_override(schedule), prompt=prompt, guidance=guidance,
                        edit_prompt=edit_prompt, tskip=tskip, progress=progress)  # fmt: skip
    return res if model.named_schedules else res.image
