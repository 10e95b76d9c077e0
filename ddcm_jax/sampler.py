"""The DDCM reverse diffusion: one `lax.scan` over steps, a pure DDIM step, rules plugged in.

Per step (DDIM, Song et al. 2021, eq. 12, with guided-diffusion's clipping):
  (1) x0_hat = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps_hat, clipped to [-1, 1]
  (2) eps_hat <- (sqrt(1/alpha_bar) x_t - x0_hat) / sqrt(1/alpha_bar - 1)
  (3) x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z
DDCM replaces z by codebook atoms picked by a selection rule; the last step
(sigma = 0) adds none and returns x0_hat. Schedule values enter the scan as xs
(float64 on the host, float32 in the scan); chosen indices leave it as ys.

Keys: `key` -> fold_in(key, 0) start noise x_T, fold_in(key, 1) codebook root
(step i's codebook: atoms addressed by the integers (i, k) under that root, see
`ddcm_jax.codebook`), fold_in(key, 2) the rule's own keys.

One path: `encode(model, spec, image, key=)` (compression; with a measurement,
restoration; with neither, generation, the rule being `Random`) and
`decode(model, spec, indices, coeffs, key=)` take a `CodeSpec`; the keyword
functions `compress` / `restore` / `generate` / `decompress` build the spec
and call them. Batching is decided once (`_per_image`): an image (or code, or
measurement) with one more axis than a single one is a batch, and so is each
per-image argument with one more axis than its single form; the others are
shared.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import latent
from ddcm_jax.codebook import AtomSource
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import Random, StepContext, replay_rule
from ddcm_jax.shapes import Codebook, Coeffs, Image, Indices, Key, Label, Measurement, Weights
from ddcm_jax.spec import CodeSpec
from ddcm_jax.stepping import PRNG_IMPL, Progress, Window, as_key, run_steps

__all__ = [
    "PRNG_IMPL",
    "CompressResult",
    "Progress",
    "SchedT",
    "Window",
    "as_key",
    "bits_per_image",
    "compress",
    "decode",
    "decompress",
    "encode",
    "encode_split",
    "generate",
    "predict_x0",
    "restore",
    "run_steps",
    "sample",
    "schedule_xs",
    "start_noise",
    "step",
]


class SchedT(NamedTuple):
    """One step's schedule values (scalars): the scan's xs."""

    i: jax.Array  # respaced step index (int32)
    t: jax.Array  # original timestep fed to the network (int32)
    sqrt_recip_ab: jax.Array  # sqrt(1 / alpha_bar)
    sqrt_recipm1_ab: jax.Array  # sqrt(1 / alpha_bar - 1)
    sqrt_ab_prev: jax.Array  # sqrt(alpha_bar_prev)
    dir_coef: jax.Array  # sqrt(1 - alpha_bar_prev - sigma^2)
    sigma: jax.Array
    alpha_bar_prev: jax.Array


def schedule_xs(schedule: Schedule, eta: float = 1.0) -> SchedT:
    """Per-step values in the order the sampler runs them (i = steps-1 .. 0).

    NumPy schedules (from `Schedule.create`) are evaluated in float64 on the
    host and rounded once to float32; a schedule holding JAX arrays (e.g. one
    being differentiated) is evaluated with jnp in its own precision.
    """
    xp = np if isinstance(schedule.alpha_bar, np.ndarray) else jnp
    ab = xp.asarray(schedule.alpha_bar)[::-1]
    abp = xp.asarray(schedule.alpha_bar_prev)[::-1]

    def sqrt0(v):  # sqrt clamped at 0, with a zero (not NaN) derivative there
        pos = v > 0
        return xp.where(pos, xp.sqrt(xp.where(pos, v, 1.0)), 0.0)

    sigma = eta * sqrt0((1 - abp) / (1 - ab)) * sqrt0(1 - ab / abp)
    f32 = functools.partial(xp.asarray, dtype=np.float32)
    steps = schedule.steps
    return SchedT(
        i=np.arange(steps, dtype=np.int32)[::-1].copy(),
        t=np.asarray(schedule.timesteps, np.int32)[::-1].copy(),
        sqrt_recip_ab=f32(xp.sqrt(1.0 / ab)),
        sqrt_recipm1_ab=f32(xp.sqrt(1.0 / ab - 1.0)),
        sqrt_ab_prev=f32(xp.sqrt(abp)),
        dir_coef=f32(sqrt0(1.0 - abp - sigma**2)),
        sigma=f32(sigma),
        alpha_bar_prev=f32(abp),
    )


def predict_x0(x_t: jax.Array, eps_hat: jax.Array, s: SchedT, clip: bool = True):
    """Eq. (1)-(2): x0_hat and the epsilon consistent with it."""
    x0_hat = s.sqrt_recip_ab * x_t - s.sqrt_recipm1_ab * eps_hat  # (1)
    if clip:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        eps_hat = (s.sqrt_recip_ab * x_t - x0_hat) / s.sqrt_recipm1_ab  # (2)
    return x0_hat, eps_hat


def step(x_t: jax.Array, eps_hat: jax.Array, s: SchedT, noise: jax.Array,
         clip: bool = True) -> jax.Array:  # fmt: skip
    """Eq. (3): x_prev. Codebook, random and zero noise all take this path."""
    x0_hat, eps_hat = predict_x0(x_t, eps_hat, s, clip)
    return s.sqrt_ab_prev * x0_hat + s.dir_coef * eps_hat + s.sigma * noise  # (3)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressResult:
    """A pytree, so it can leave `jit` / `vmap`."""

    indices: Indices
    coeffs: Coeffs  # (steps-1, M-1) matching pursuit, (steps-1, M) turbo signs, else (steps-1, 0)
    image: Image  # the reconstruction; `decompress(indices, coeffs)` returns the same


def bits_per_image(steps: int, codebook_size: int, num_atoms: int = 1, coef_bits: int = 1,
                   rule: str = "ddcm") -> int:  # fmt: skip
    """Payload bits of one image, exactly: (steps-1) x the rule's `bits_per_step(K)`.

    DDCM / matching pursuit: (steps-1) * (M * ceil(log2 K) + (M-1) * C);
    turbo: (steps-1) * (ceil(log2 binom(K, M)) + M).
    """
    return CodeSpec.create(steps=steps, codebook_size=codebook_size, rule=rule, num_atoms=num_atoms,
                           coef_bits=coef_bits).payload_bits()  # fmt: skip


def _denoise(model: Any, x_t: jax.Array, s: SchedT, y: jax.Array | None) -> jax.Array:
    out = model.apply(model.params, x_t[None], s.t[None], None if y is None else y[None])[0]
    return out[..., : x_t.shape[-1]]  # learned-sigma channels are not used by DDIM


def _split_last(xs: SchedT) -> tuple[SchedT, SchedT]:
    """(the noise-adding steps, the final sigma = 0 step)."""
    return jax.tree_util.tree_map(lambda a: a[:-1], xs), jax.tree_util.tree_map(lambda a: a[-1], xs)


@dataclasses.dataclass(frozen=True)
class _Books:
    """How one run builds each step's codebook (static): from the spec, or the explicit rows.

    `chunk` and `axis_name` decide how atoms are scored (memory, devices), never which are chosen.
    """

    size: int
    generator: str
    chunk: int | None = None
    axis_name: str | None = None

    def at(self, shape: tuple[int, ...], root: jax.Array, s: SchedT, rows: Any) -> AtomSource:
        if rows is not None:
            return AtomSource.from_array(rows, chunk=self.chunk, axis_name=self.axis_name)
        return AtomSource(self.size, shape, self.generator, self.chunk, self.axis_name, root=root,
                          step=s.i).with_base()  # fmt: skip


def _run(model, x_T, xs, codebook, y, chosen, noise_fn, clip, final):
    """The scan over the noise-adding steps of `xs`; with `final`, the last row
    of `xs` is the sigma = 0 step, run after them with zero noise.

    Returns (x, ys); ys is None when no noise-adding step ran.
    """
    noisy, last = _split_last(xs) if final else (xs, None)

    def body(x_t, inp):
        s, rows, extra = inp
        eps_hat = _denoise(model, x_t, s, y)
        noise, ys = noise_fn(x_t, eps_hat, s, rows, extra)
        # Step index 0 is the final, noiseless step; a step-by-step run sends it through this body
        # (`Window`), where it must be exactly the `final` branch below: zero noise, whatever sigma is.
        noise = jnp.where(s.i > 0, noise, jnp.zeros_like(noise))
        return step(x_t, eps_hat, s, noise, clip), ys

    x, ys = x_T, None
    if noisy.i.shape[0]:
        x, ys = jax.lax.scan(body, x_T, (noisy, codebook, chosen))
    if final:
        x = step(x, _denoise(model, x, last, y), last, jnp.zeros_like(x), clip)
    return x, ys


@functools.partial(jax.jit, static_argnames=("clip", "n", "total", "final"))
def _sample_one(model, x_T, xs, y, key, lo, *, clip, n, total, final):
    noise_key = jax.random.fold_in(key, 3)

    def noise_fn(x_t, eps_hat, s, rows, extra):
        return jax.random.normal(jax.random.fold_in(noise_key, s.i), x_t.shape, jnp.float32), None

    return _run(model, x_T, Window(lo, n, total, final).schedule(xs), None, y, None, noise_fn, clip, final)[0]


@functools.partial(jax.jit, static_argnames=("books", "n", "final"))
def _encode_one(model, spec, image, measurement, x_T, xs, codebook, weights, y, key, lo, *, books, n, final):
    shape, rule, t_range = tuple(x_T.shape), spec.rule, spec.t_range
    cb_root, rule_root = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    window = Window(lo, n, spec.steps, final)

    def noise_fn(x_t, eps_hat, s, rows, _):
        x0_hat, _ = predict_x0(x_t, eps_hat, s, spec.clip)
        ctx = StepContext(x_t, x0_hat, s.sigma, s.alpha_bar_prev, image, measurement, weights,
                          jax.random.fold_in(rule_root, s.i))  # fmt: skip
        book = books.at(shape, cb_root, s, rows)
        if t_range is None:
            sel = rule.select(ctx, book)
            return sel.noise, (sel.indices, sel.coeffs)
        active = (s.t >= t_range[0]) & (s.t <= t_range[1])
        idx, co = jax.lax.cond(active, lambda: tuple(rule.select(ctx, book)[1:]), rule.idle_code)
        return rule.noise(book, idx, co), (idx, co)

    x, ys = _run(model, x_T, window.schedule(xs), window.code_rows(codebook), y, None, noise_fn, spec.clip, final)
    if ys is None:  # the window holds only the last step, which carries no bits
        (_, mi), (_, mc) = spec.code_shape
        ys = (jnp.zeros((0, mi), jnp.int32), jnp.zeros((0, mc), jnp.int32))
    return x, ys


@functools.partial(jax.jit, static_argnames=("books", "n", "final"))
def _decode_one(model, spec, indices, coeffs, x_T, xs, codebook, y, key, lo, *, books, n, final):
    shape, rule = tuple(x_T.shape), spec.rule
    cb_root = jax.random.fold_in(key, 1)
    window = Window(lo, n, spec.steps, final)

    def noise_fn(x_t, eps_hat, s, rows, chosen):
        idx, co = chosen
        return rule.noise(books.at(shape, cb_root, s, rows), idx, co), None

    chosen = window.code_rows((indices, coeffs)) if window.noisy else None
    return _run(model, x_T, window.schedule(xs), window.code_rows(codebook), y, chosen, noise_fn, spec.clip,
                final)[0]  # fmt: skip


def start_noise(key: Key, shape: tuple[int, ...]) -> jax.Array:
    """x_T of one image: normal(fold_in(key, 0)) in `shape`."""
    return jax.random.normal(jax.random.fold_in(as_key(key), 0), tuple(shape), jnp.float32)


def _schedule(model: Any, steps: int, respacing: str, schedule: Schedule | None) -> Schedule:
    if schedule is None:
        d = model.config.diffusion
        return Schedule.create(d.noise_schedule, d.num_timesteps, respacing or str(steps))
    if schedule.steps != steps:
        raise ValueError(f"schedule has {schedule.steps} steps, steps={steps}")
    return schedule


def _prepare(model: Any, spec: CodeSpec, image_shape: tuple[int, ...], key: Any, x_T: Any,
             schedule: Schedule | None) -> tuple[jax.Array, jax.Array, SchedT]:  # fmt: skip
    key = as_key(key)
    if x_T is None:
        x_T = start_noise(key, image_shape)
    xs = schedule_xs(_schedule(model, spec.steps, spec.respacing, schedule), spec.eta)
    return key, jnp.asarray(x_T, jnp.float32), xs


def _check_codebook(codebook: Any, spec: CodeSpec, shape: tuple[int, ...]) -> Any:
    if codebook is None:
        return None
    codebook = jnp.asarray(codebook, jnp.float32)
    want = (spec.steps - 1, spec.codebook_size, *shape)
    if codebook.shape != want:
        raise ValueError(f"codebook must have shape {want} (one per noise-adding step), got {codebook.shape}")
    return codebook


def _label(model: Any, class_label: Any) -> jax.Array | None:
    if (class_label is None) != (model.config.architecture.num_classes is None):
        raise ValueError("give class_label if and only if the model is class-conditional")
    return None if class_label is None else jnp.asarray(class_label, jnp.int32)


# The rank of each per-image argument for one image; one more axis makes it a batch.
_SINGLE_RANK = {"image": 3, "x_T": 3, "weights": 3, "class_label": 0, "key": 0, "indices": 2, "coeffs": 2}


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


def encode(model: Any, spec: CodeSpec, image: Image | None = None, *, key: Key,
           measurement: Measurement | None = None, image_shape: tuple[int, ...] | None = None,
           x_T: Image | None = None, codebook: Codebook | None = None, weights: Weights | None = None,
           class_label: Label | None = None, schedule: Schedule | None = None,
           codebook_chunk: int | None = None, progress: Progress | None = None) -> CompressResult:  # fmt: skip
    """Choose the code of `image` (H, W, 3) or a batch (B, H, W, 3) under `spec`.

    With `image`: compression (rules `DDCM`, `MatchingPursuit`, `Turbo`, ...);
    with `measurement` y = A(x) and `image_shape` ((B,) H, W, 3): restoration
    (rule `MSE(A)`); with neither: generation (rule `Random`). See `compress`
    for the other arguments; batching as in the module docstring.
    """
    return encode_split(model, spec, image, key=key, measurement=measurement, image_shape=image_shape, x_T=x_T,
                   codebook=codebook, weights=weights, class_label=class_label, schedule=schedule,
                   codebook_chunk=codebook_chunk, progress=progress)  # fmt: skip


def encode_split(model: Any, spec: CodeSpec, image: Any, *, key: Any, measurement: Any = None,
            image_shape: Any = None, x_T: Any = None, codebook: Any = None, weights: Any = None,
            class_label: Any = None, schedule: Schedule | None = None, codebook_chunk: int | None = None,
            codebook_axis: str | None = None, progress: Progress | None = None,
            window: Window | None = None) -> CompressResult:  # fmt: skip
    """`encode` with each codebook split over the mesh axis `codebook_axis` (inside `shard_map`).

    For `ddcm_jax.parallel` only: the public calls never name a device axis.
    With `window` it runs only those steps from `x_T` (the state before them)
    and returns their codes; the caller drives the steps.
    """
    if image is not None:
        image = jnp.asarray(image, jnp.float32)
        if image.ndim not in (3, 4):
            raise ValueError(f"image must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
        image_shape = image.shape
    elif image_shape is None:
        if x_T is None and measurement is not None:
            raise ValueError("give image_shape or x_T")
        if x_T is not None:
            image_shape = tuple(np.shape(x_T))
        else:
            arch = model.config.architecture
            image_shape = (arch.image_size, arch.image_size, arch.in_channels)
    image_shape = tuple(int(v) for v in image_shape)
    if measurement is not None:
        measurement = jnp.asarray(measurement, jnp.float32)
    books = _Books(spec.codebook_size, spec.generator, codebook_chunk, codebook_axis)

    shape = image_shape[-3:]
    rows = _check_codebook(codebook, spec, shape)

    def one(w: Window, image: Any = None, measurement: Any = None, x_T: Any = None, weights: Any = None,
            class_label: Any = None, key: Any = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:  # fmt: skip
        k, x_T, xs = _prepare(model, spec, shape, key, x_T, schedule)
        wt = None if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), shape)
        return _encode_one(model, spec, image, measurement, x_T, xs, rows, wt, _label(model, class_label), k, w.lo,
                           books=books, n=w.n, final=w.final)  # fmt: skip

    args = dict(image=image, measurement=measurement, weights=weights, class_label=class_label, key=key)
    if image is None and measurement is None:  # generation: B keys and/or labels make a batch
        batch = as_key(key).ndim == 1 or np.ndim(class_label) == 1
    else:
        batch = len(image_shape) == 4

    def call(x: Any, w: Window) -> tuple[jax.Array, Any]:
        return _per_image(functools.partial(one, w), {**args, "x_T": x}, batch)

    if window is not None:
        x, (indices, coeffs) = call(x_T, window)
    else:
        x0 = x_T if progress is None or x_T is not None else _start(key, shape)
        x, (indices, coeffs) = run_steps(call, x0, spec.steps, progress)
    return CompressResult(indices, coeffs, x)


def decode(model: Any, spec: CodeSpec, indices: Indices, coeffs: Coeffs | None = None, *, key: Key,
           image_shape: tuple[int, ...], x_T: Image | None = None, codebook: Codebook | None = None,
           class_label: Label | None = None, schedule: Schedule | None = None,
           progress: Progress | None = None, window: Window | None = None) -> Image:  # fmt: skip
    """Rebuild the image from its code, regenerating only the chosen atoms.

    `indices` (steps-1, M) or a `CompressResult`; (B, steps-1, M) decodes a
    batch. The spec's rule is replaced by the one its decoder replays
    (`CodeSpec.for_decoding`): single-atom rules all replay atom[index].
    """
    if isinstance(indices, CompressResult):
        indices, coeffs = indices.indices, indices.coeffs
    spec = spec.for_decoding()
    indices = jnp.asarray(indices, jnp.int32)
    if coeffs is None:
        coeffs = jnp.zeros((*indices.shape[:-1], spec.coeff_width), jnp.int32)
    coeffs = jnp.asarray(coeffs, jnp.int32)
    books = _Books(spec.codebook_size, spec.generator)
    shape = tuple(int(v) for v in image_shape)[-3:]

    rows = _check_codebook(codebook, spec, shape)

    def one(w: Window, indices: Any, coeffs: Any, x_T: Any = None, class_label: Any = None,
            key: Any = None) -> tuple[jax.Array, None]:  # fmt: skip
        want_i, want_c = spec.code_shape
        if indices.shape != want_i or coeffs.shape != want_c:
            raise ValueError(f"indices must be {want_i} and coeffs {want_c} for this rule, got {indices.shape} "
                             f"and {coeffs.shape}")  # fmt: skip
        k, x_T, xs = _prepare(model, spec, shape, key, x_T, schedule)
        return _decode_one(model, spec, indices, coeffs, x_T, xs, rows, _label(model, class_label), k, w.lo,
                           books=books, n=w.n, final=w.final), None  # fmt: skip

    args = dict(indices=indices, coeffs=coeffs, class_label=class_label, key=key)

    def call(x: Any, w: Window) -> tuple[jax.Array, None]:
        return _per_image(functools.partial(one, w), {**args, "x_T": x}, indices.ndim == 3)

    if window is not None:
        return call(x_T, window)[0]
    x0 = x_T if progress is None or x_T is not None else _start(key, shape)
    return run_steps(call, x0, spec.steps, progress)[0]


def _start(key: Any, shape: tuple[int, ...]) -> jax.Array:
    """x_T for one key or each of (B,) keys (a step-by-step run draws it before the first step)."""
    key = as_key(key)
    return start_noise(key, shape) if key.ndim == 0 else jax.vmap(lambda k: start_noise(k, shape))(key)


def compress(model: Any, image: Image, *, steps: int, codebook_size: int, num_atoms: int = 1,
             coef_bits: int = 1, rule: Any = "ddcm", key: Key, x_T: Image | None = None,
             codebook: Codebook | None = None, weights: Weights | None = None,
             t_range: tuple[int, int] | None = None, class_label: Label | None = None,
             schedule: Schedule | None = None, eta: float = 1.0, clip: bool = True,
             generator: str = "philox", codebook_chunk: int | None = None,
             progress: Progress | None = None, no_bits_steps: int | None = None, prompt: str | None = None,
             guidance: float = 0.0) -> CompressResult:  # fmt: skip
    """Encode `image` (H, W, 3) in [-1, 1], or a batch (B, H, W, 3), as codebook indices.

    A latent (Stable Diffusion) model runs `ddcm_jax.latent.compress` (its
    `schedule` is "ddcm" or "turbo", with `no_bits_steps`, `prompt`, `guidance`;
    it returns a `LatentResult`).

    The keyword form of `encode(model, CodeSpec.create(steps=, codebook_size=, rule=, ...), image, key=)`.
    `rule`: "ddcm" (M = 1; with num_atoms > 1, matching pursuit with coef_bits C),
    "mp", "turbo" (M atoms, sign bits), "random", or a rule object from
    `ddcm_jax.selection`. `key` (required): a typed key or an int seed; it fixes
    x_T and every codebook. `codebook` (steps-1, K, H, W, 3) overrides the
    key-derived codebooks and `x_T` the start noise; `weights` (H, W, 1 or 3)
    weight the residual (priority-aware coding); `t_range=(t_min, t_max)`
    (original timesteps, inclusive) restricts selection to those steps, the
    others recording the rule's `idle_code()` (atom 0; turbo: atoms 0..M-1,
    positive). `schedule` overrides the model's respaced schedule (e.g. to
    differentiate through it).

    Codebooks: `generator` "philox" (default), "threefry" or "shift" (see
    `ddcm_jax.codebook`); `codebook_chunk` atoms are generated and scored at a
    time (default: from a 64 MB budget). `progress(done, total)`, if
    given, runs the steps one call each and reports after each (same result).

    `model`: what `load_model` returns, or any object with `.params`,
    `.apply(params, x (B,H,W,C), t (B,), y) -> (B,H,W,C or 2C)` and
    `.config.diffusion` / `.config.architecture` like `DiffusionModel`.

    Batches: a (B, H, W, 3) image is vmapped; `x_T`, `weights` (with a leading
    B axis), `class_label` (B,) and `key` (a (B,) array of keys) may be given
    per image, otherwise one is shared by all. With a shared key the indices
    equal B single calls.
    """
    if latent.is_latent_model(model):
        _pixel_only(class_label=class_label, eta=eta != 1.0, clip=not clip, schedule=not _named(schedule))
        return latent.compress(model, image, steps=steps, codebook_size=codebook_size, num_atoms=num_atoms,
                               coef_bits=coef_bits, rule=rule, key=key, x_T=x_T, codebook=codebook,
                               schedule=schedule, no_bits_steps=no_bits_steps, t_range=t_range, weights=weights,
                               prompt=prompt, guidance=guidance, generator=generator,
                               codebook_chunk=codebook_chunk, progress=progress)  # fmt: skip
    _latent_only(no_bits_steps=no_bits_steps, prompt=prompt, guidance=guidance, schedule=schedule)
    spec = CodeSpec.create(steps=steps, codebook_size=codebook_size, rule=rule, num_atoms=num_atoms,
                           coef_bits=coef_bits, generator=generator, eta=eta, t_range=t_range, clip=clip)  # fmt: skip
    return encode(model, spec, image, key=key, x_T=x_T, codebook=codebook, weights=weights,
                  class_label=class_label, schedule=schedule, codebook_chunk=codebook_chunk, progress=progress)  # fmt: skip


def restore(model: Any, measurement: Measurement, operator: Any, *, steps: int, codebook_size: int,
            rule: Any = "mse", key: Key, image_shape: tuple[int, ...] | None = None,
            x_T: Image | None = None, codebook: Codebook | None = None,
            class_label: Label | None = None, schedule: Schedule | None = None, eta: float = 1.0,
            clip: bool = True, generator: str = "philox", codebook_chunk: int | None = None,
            progress: Progress | None = None) -> CompressResult:  # fmt: skip
    """Compressed posterior sampling for y = operator(x): indices + restored image.

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
                  progress=progress)  # fmt: skip


def generate(model: Any, *, steps: int, codebook_size: int, key: Key, class_label: Label | None = None,
             image_shape: tuple[int, ...] | None = None, eta: float = 1.0, clip: bool = True,
             schedule: Schedule | None = None, generator: str = "philox",
             progress: Progress | None = None, prompt: str | None = None, guidance: float = 0.0,
             ccfg_subset: int | None = None) -> CompressResult:  # fmt: skip
    """Compressed generation: uniformly random atoms; the indices encode the sample.

    A latent model runs `ddcm_jax.latent.generate` (`schedule` "ddcm" or
    "turbo", `prompt` and `guidance` for classifier-free guidance, or `prompt`
    and `ccfg_subset` for compressed classifier-free guidance).

    `image_shape` defaults to the model's native (size, size, 3). For B samples
    pass B keys (e.g. `jax.random.split(key, B)`) and/or B class labels.
    """
    if latent.is_latent_model(model):
        _pixel_only(class_label=class_label, eta=eta != 1.0, clip=not clip, schedule=not _named(schedule))
        return latent.generate(model, steps=steps, codebook_size=codebook_size, key=key, image_shape=image_shape,
                               schedule=schedule or "ddcm", prompt=prompt, guidance=guidance,
                               ccfg_subset=ccfg_subset, generator=generator, progress=progress)  # fmt: skip
    _latent_only(prompt=prompt, guidance=guidance, schedule=schedule, ccfg_subset=ccfg_subset)
    spec = CodeSpec(steps, codebook_size, Random(), generator, eta, clip=clip)
    return encode(model, spec, None, key=key, class_label=class_label, image_shape=image_shape,
                  schedule=schedule, progress=progress)  # fmt: skip


def sample(model: Any, *, steps: int, key: Key, image_shape: tuple[int, ...] | None = None,
           class_label: Label | None = None, x_T: Image | None = None, schedule: Schedule | None = None,
           eta: float = 1.0, clip: bool = True, progress: Progress | None = None) -> Image:  # fmt: skip
    """Plain (non-DDCM) DDIM sampling: fresh Gaussian noise each step, the same scan and step.

    The noise of step i is normal(fold_in(fold_in(key, 3), i)); x_T as in
    `compress`. The baseline that DDCM decoding is measured against.
    """
    if image_shape is None:
        arch = model.config.architecture
        image_shape = (arch.image_size, arch.image_size, arch.in_channels)
    key = as_key(key)
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), tuple(image_shape), jnp.float32)
    if schedule is None and steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    xs = schedule_xs(_schedule(model, steps, "", schedule), eta)
    y = _label(model, class_label)

    def call(x: Any, w: Window) -> tuple[jax.Array, None]:
        return _sample_one(model, x, xs, y, key, w.lo, clip=clip, n=w.n, total=steps, final=w.final), None

    return run_steps(call, jnp.asarray(x_T, jnp.float32), xs.i.shape[0], progress)[0]


def decompress(model: Any, indices: Indices, coeffs: Coeffs | None = None, *, steps: int, codebook_size: int,
               image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1,
               rule: Any = "ddcm", key: Key, x_T: Image | None = None,
               codebook: Codebook | None = None, class_label: Label | None = None,
               schedule: Schedule | None = None, eta: float = 1.0, clip: bool = True,
               generator: str = "philox", progress: Progress | None = None, no_bits_steps: int | None = None,
               t_range: tuple[int, int] | None = None, prompt: str | None = None,
               guidance: float = 0.0, edit_prompt: str | None = None, tskip: int = 0) -> Image:  # fmt: skip
    """The keyword form of `decode`: rebuild the image from indices (steps-1, M) or (B, steps-1, M).

    A latent model runs `ddcm_jax.latent.decompress` (the keywords of its
    `compress`; it returns a `LatentResult`). Pixel codes carry t_range in
    their indices (idle steps hold the idle code), so it is not needed here.

    `rule` only decides how indices become noise: single-atom rules (ddcm,
    mse, random, soft) replay atom[index]; "mp" and "turbo" need M (and C).
    """
    if latent.is_latent_model(model):
        _pixel_only(class_label=class_label, eta=eta != 1.0, clip=not clip, schedule=not _named(schedule))
        return latent.decompress(model, indices, coeffs, steps=steps, codebook_size=codebook_size,
                                 image_shape=image_shape, num_atoms=num_atoms, coef_bits=coef_bits, rule=rule,
                                 key=key, x_T=x_T, codebook=codebook, schedule=schedule,
                                 no_bits_steps=no_bits_steps, t_range=t_range, prompt=prompt, guidance=guidance,
                                 edit_prompt=edit_prompt, tskip=tskip, generator=generator,
                                 progress=progress)  # fmt: skip
    _latent_only(no_bits_steps=no_bits_steps, prompt=prompt, guidance=guidance, schedule=schedule,
                 t_range=t_range, edit_prompt=edit_prompt)  # a pixel code's idle steps are in its indices
    spec = CodeSpec(steps, codebook_size, replay_rule(rule, num_atoms, coef_bits), generator, eta, clip=clip)
    return decode(model, spec, indices, coeffs, key=key, image_shape=image_shape, x_T=x_T, codebook=codebook,
                  class_label=class_label, schedule=schedule, progress=progress)  # fmt: skip


def _named(schedule: Any) -> bool:
    return schedule is None or isinstance(schedule, str)


def _pixel_only(**given: Any) -> None:
    """Refuse, in one line, a pixel-model option given for a latent model."""
    bad = [name for name, v in given.items() if v is not None and v is not False]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not an option of latent (Stable Diffusion) models")


def _latent_only(no_bits_steps: Any = None, prompt: Any = None, guidance: float = 0.0, schedule: Any = None,
                 t_range: Any = None, ccfg_subset: Any = None, edit_prompt: Any = None) -> None:  # fmt: skip
    """Refuse a latent-model option given for a pixel model (a named schedule, a prompt, ...)."""
    named = ("schedule", schedule if isinstance(schedule, str) else None)
    given = (("no_bits_steps", no_bits_steps), ("prompt", prompt), ("t_range", t_range), named,
             ("ccfg_subset", ccfg_subset), ("edit_prompt", edit_prompt))
    bad = [n for n, v in given if v is not None]
    bad += ["guidance"] if guidance else []
    if bad:
        raise ValueError(f"{', '.join(bad)}: options of latent (Stable Diffusion) models only")
