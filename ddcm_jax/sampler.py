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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.codebook import GENERATORS, AtomSource
from ddcm_jax.operators import operator_by_name
from ddcm_jax.progress import report_step
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import (
    DDCM,
    MSE,
    MatchingPursuit,
    Random,
    StepContext,
    Turbo,
)

__all__ = [
    "CodebookSpec",
    "CompressResult",
    "SchedT",
    "bits_per_image",
    "compress",
    "decompress",
    "generate",
    "predict_x0",
    "restore",
    "sample",
    "schedule_xs",
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

    indices: jax.Array  # (steps-1, M) int32, or (B, steps-1, M)
    coeffs: jax.Array  # (steps-1, M-1) matching pursuit, (steps-1, M) turbo signs, else (steps-1, 0)
    image: jax.Array  # the reconstruction; `decompress(indices, coeffs)` returns the same


def resolve_rule(rule: Any, num_atoms: int = 1, coef_bits: int = 1, operator: Any = None) -> Any:
    """A rule name (with M, C) -> a rule object; rule objects pass through."""
    if not isinstance(rule, str):
        return rule
    if rule == "ddcm":
        return DDCM() if num_atoms == 1 else MatchingPursuit(num_atoms, coef_bits)
    if rule in ("mp", "matching_pursuit"):
        return MatchingPursuit(num_atoms, coef_bits)
    if rule == "turbo":
        return Turbo(num_atoms)
    if rule == "random":
        return Random()
    if rule in ("mse", "mse_inner"):
        if operator is None:
            raise ValueError(f"rule {rule!r} needs an operator")
        if isinstance(operator, str):
            operator = operator_by_name(operator)
        return MSE(operator, inner_product=rule == "mse_inner")
    raise ValueError(f"unknown rule {rule!r} (ddcm, mp, turbo, mse, mse_inner, random)")


def bits_per_image(steps: int, codebook_size: int, num_atoms: int = 1, coef_bits: int = 1,
                   rule: str = "ddcm") -> int:  # fmt: skip
    """Payload bits of one image, exactly (big-integer arithmetic).

    DDCM / matching pursuit: (steps-1) * (M * ceil(log2 K) + (M-1) * C);
    turbo: (steps-1) * (ceil(log2 binom(K, M)) + M).
    """
    import math

    def ceil_log2(n: int) -> int:
        return (n - 1).bit_length()

    if rule == "turbo":
        per_step = ceil_log2(math.comb(codebook_size, num_atoms)) + num_atoms
    else:
        per_step = num_atoms * ceil_log2(codebook_size) + (num_atoms - 1) * coef_bits
    return (steps - 1) * per_step


PRNG_IMPL = "threefry2x32"


def _as_key(key: Any) -> jax.Array:
    """A typed key (or a (B,) array of them) from a key or an int seed; never a default."""
    if key is None:
        raise ValueError("a key (typed jax.random.key or an int seed) is required; there is no default")
    if isinstance(key, int | np.integer):
        # Named explicitly: a global jax_default_prng_impl must not change the codebooks.
        return jax.random.key(int(key), impl=PRNG_IMPL)
    if not (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key must be a typed key (jax.random.key) or an int seed, not a raw uint32 PRNGKey")
    if key.ndim > 1:
        raise ValueError(f"key must be one typed key or a (B,) array of them, got shape {key.shape}")
    return key


def _denoise(model: Any, x_t: jax.Array, s: SchedT, y: jax.Array | None) -> jax.Array:
    out = model.apply(model.params, x_t[None], s.t[None], None if y is None else y[None])[0]
    return out[..., : x_t.shape[-1]]  # learned-sigma channels are not used by DDIM


def _split_last(xs: SchedT) -> tuple[SchedT, SchedT]:
    """(the noise-adding steps, the final sigma = 0 step)."""
    return jax.tree_util.tree_map(lambda a: a[:-1], xs), jax.tree_util.tree_map(lambda a: a[-1], xs)


@dataclasses.dataclass(frozen=True)
class CodebookSpec:
    """How the sampler builds each step's codebook (a static, hashable jit argument)."""

    size: int
    generator: str = "philox"
    chunk: int | None = None  # atoms per chunk; None: from the memory budget
    axis_name: str | None = None  # a mesh axis the codebook is split over (inside shard_map)

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown codebook generator {self.generator!r} ({', '.join(GENERATORS)})")
        if self.size < 1 or (self.chunk is not None and self.chunk < 1):
            raise ValueError(f"codebook size and chunk must be positive, got {self.size}, {self.chunk}")


def _book(spec: CodebookSpec, shape: tuple[int, ...], root: jax.Array, s: SchedT, rows: Any) -> AtomSource:
    if rows is not None:
        return AtomSource.from_array(rows, chunk=spec.chunk, axis_name=spec.axis_name)
    return AtomSource(spec.size, shape, spec.generator, spec.chunk, spec.axis_name, root=root, step=s.i).with_base()


def _run(model, x_T, xs, codebook, y, chosen, noise_fn, clip, progress):
    """The scan over the noise-adding steps, then the final sigma = 0 step (zero noise)."""
    noisy, last = _split_last(xs)

    def body(x_t, inp):
        s, rows, extra = inp
        eps_hat = _denoise(model, x_t, s, y)
        noise, ys = noise_fn(x_t, eps_hat, s, rows, extra)
        x_prev = step(x_t, eps_hat, s, noise, clip)
        if progress:
            # Unordered: ordered effects cannot span several devices, and the program must
            # be the same whatever the device count. Every device reports every step.
            jax.debug.callback(report_step, s.i)
        return x_prev, ys

    x_1, ys = jax.lax.scan(body, x_T, (noisy, codebook, chosen))
    x_0 = step(x_1, _denoise(model, x_1, last, y), last, jnp.zeros_like(x_1), clip)
    if progress:
        jax.debug.callback(report_step, last.i)
    return x_0, ys


@functools.partial(jax.jit, static_argnames=("clip", "progress"))
def _sample_one(model, x_T, xs, y, key, *, clip, progress=False):
    noise_key = jax.random.fold_in(key, 3)

    def noise_fn(x_t, eps_hat, s, rows, extra):
        return jax.random.normal(jax.random.fold_in(noise_key, s.i), x_t.shape, jnp.float32), None

    x_0, _ = _run(model, x_T, xs, None, y, None, noise_fn, clip, progress)
    return x_0


def _default_indices(rule: Any) -> tuple[jax.Array, jax.Array]:
    """What a step outside `t_range` records: atoms 0..M-1 (turbo needs distinct ones), no coefficients."""
    m = rule.num_atoms
    idx = jnp.arange(m, dtype=jnp.int32) if isinstance(rule, Turbo) else jnp.zeros((m,), jnp.int32)
    return idx, jnp.zeros((rule.coeff_width,), jnp.int32)


@functools.partial(jax.jit, static_argnames=("spec", "clip", "t_range", "progress"))
def _compress_one(model, rule, image, x_T, xs, codebook, weights, measurement, y, key, *,
                  spec, clip, t_range, progress=False):  # fmt: skip
    shape = tuple(x_T.shape)
    cb_root, rule_root = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

    def noise_fn(x_t, eps_hat, s, rows, _):
        x0_hat, _ = predict_x0(x_t, eps_hat, s, clip)
        ctx = StepContext(x_t, x0_hat, s.sigma, s.alpha_bar_prev, image, measurement, weights,
                          jax.random.fold_in(rule_root, s.i))  # fmt: skip
        book = _book(spec, shape, cb_root, s, rows)
        if t_range is None:
            sel = rule.select(ctx, book)
            return sel.noise, (sel.indices, sel.coeffs)
        active = (s.t >= t_range[0]) & (s.t <= t_range[1])
        idx, co = jax.lax.cond(active, lambda: tuple(rule.select(ctx, book)[1:]),
                               lambda: _default_indices(rule))  # fmt: skip
        return rule.noise(book, idx, co), (idx, co)

    return _run(model, x_T, xs, codebook, y, None, noise_fn, clip, progress)


@functools.partial(jax.jit, static_argnames=("spec", "clip", "progress"))
def _decompress_one(model, rule, indices, coeffs, x_T, xs, codebook, y, key, *, spec, clip,
                    progress=False):  # fmt: skip
    shape = tuple(x_T.shape)
    cb_root = jax.random.fold_in(key, 1)

    def noise_fn(x_t, eps_hat, s, rows, chosen):
        idx, co = chosen
        return rule.noise(_book(spec, shape, cb_root, s, rows), idx, co), None

    x_0, _ = _run(model, x_T, xs, codebook, y, (indices, coeffs), noise_fn, clip, progress)
    return x_0


def _prepare(model: Any, image_shape: tuple[int, ...], steps: int, key: Any, x_T: Any,
             eta: float, schedule: Schedule | None) -> tuple[jax.Array, jax.Array, SchedT]:  # fmt: skip
    key = _as_key(key)
    if schedule is None:
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        d = model.config.diffusion
        schedule = Schedule.create(d.noise_schedule, d.num_timesteps, str(steps))
    elif schedule.steps != steps:
        raise ValueError(f"schedule has {schedule.steps} steps, steps={steps}")
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), image_shape, jnp.float32)
    return key, jnp.asarray(x_T, jnp.float32), schedule_xs(schedule, eta)


def _check_codebook(codebook: Any, steps: int, codebook_size: int, shape: tuple[int, ...]) -> Any:
    if codebook is None:
        return None
    codebook = jnp.asarray(codebook, jnp.float32)
    want = (steps - 1, codebook_size, *shape)
    if codebook.shape != want:
        raise ValueError(f"codebook must have shape {want} (one per noise-adding step), got {codebook.shape}")
    return codebook


def _label(model: Any, class_label: Any) -> jax.Array | None:
    if (class_label is None) != (model.config.architecture.num_classes is None):
        raise ValueError("give class_label if and only if the model is class-conditional")
    return None if class_label is None else jnp.asarray(class_label, jnp.int32)


def _check_t_range(t_range: Any) -> tuple[int, int] | None:
    if t_range is None:
        return None
    lo, hi = (int(v) for v in t_range)
    if lo > hi:
        raise ValueError(f"t_range must be (t_min, t_max) with t_min <= t_max, got {t_range}")
    return lo, hi


def _per_image(fn: Any, args: dict[str, Any], rows: set[str]) -> Any:
    """vmap `fn(**args)` over the leading (batch) axis of the arguments named in `rows`.

    The other arguments (None, or without a batch axis) are shared by every image.
    """
    names = [n for n in args if n in rows]
    batch = {np.shape(args[n])[0] for n in names}
    if len(batch) != 1:
        sizes = ", ".join(f"{n} {np.shape(args[n])[0]}" for n in names)
        raise ValueError(f"per-image arguments disagree on the batch size: {sizes}")
    shared = {n: v for n, v in args.items() if n not in rows}

    def one(*vals: Any) -> Any:
        return fn(**shared, **dict(zip(names, vals, strict=True)))

    return jax.vmap(one)(*(args[n] for n in names))


def _rows(args: dict[str, Any], image_ndim: int) -> set[str]:
    """Which of x_T / weights / measurement, class_label, key carry a per-image axis."""
    out = set()
    for name, v in args.items():
        if v is None:
            continue
        if name == "key":
            if _as_key(v).ndim == 1:
                out.add(name)
        elif name in ("class_label", "indices", "coeffs"):
            if np.ndim(v) == {"class_label": 1}.get(name, 3):
                out.add(name)
        elif np.ndim(v) == image_ndim + 1:
            out.add(name)
    return out


def compress(model: Any, image: jax.Array, *, steps: int, codebook_size: int, num_atoms: int = 1,
             coef_bits: int = 1, rule: Any = "ddcm", key: Any, x_T: jax.Array | None = None,
             codebook: jax.Array | None = None, weights: jax.Array | None = None,
             t_range: tuple[int, int] | None = None, class_label: Any = None,
             schedule: Schedule | None = None, eta: float = 1.0, clip: bool = True,
             generator: str = "philox", codebook_chunk: int | None = None,
             codebook_axis: str | None = None, progress: bool = False) -> CompressResult:  # fmt: skip
    """Encode `image` (H, W, 3) in [-1, 1], or a batch (B, H, W, 3), as codebook indices.

    `rule`: "ddcm" (M = 1; with num_atoms > 1, matching pursuit with coef_bits C),
    "mp", "turbo" (M atoms, sign bits), "random", or a rule object from
    `ddcm_jax.selection`. `key` (required): a typed key or an int seed; it fixes
    x_T and every codebook. `codebook` (steps-1, K, H, W, 3) overrides the
    key-derived codebooks and `x_T` the start noise; `weights` (H, W, 1 or 3)
    weight the residual (priority-aware coding); `t_range=(t_min, t_max)`
    (original timesteps, inclusive) restricts selection to those steps, the
    others recording atom 0 (turbo: atoms 0..M-1, positive). `schedule`
    overrides the model's respaced schedule (e.g. to differentiate through it).

    Codebooks: `generator` "philox" (default) or "threefry" (see
    `ddcm_jax.codebook`); `codebook_chunk` atoms are generated and scored at a
    time (default: from a 64 MB budget); `codebook_axis` names a mesh axis to
    split each codebook over when called inside `shard_map`. `progress=True`
    reports each step to `ddcm_jax.progress.on_step` listeners.

    `model`: what `load_model` returns, or any object with `.params`,
    `.apply(params, x (B,H,W,C), t (B,), y) -> (B,H,W,C or 2C)` and
    `.config.diffusion` / `.config.architecture` like `DiffusionModel`.

    Batches: a (B, H, W, 3) image is vmapped; `x_T`, `weights` (with a leading
    B axis), `class_label` (B,) and `key` (a (B,) array of keys) may be given
    per image, otherwise one is shared by all. With a shared key the indices
    equal B single calls.
    """
    image = jnp.asarray(image, jnp.float32)
    rule_obj = resolve_rule(rule, num_atoms, coef_bits)
    if image.ndim == 4:
        args = dict(x_T=x_T, weights=weights, class_label=class_label, key=key)
        kw = dict(steps=steps, codebook_size=codebook_size, rule=rule_obj, codebook=codebook,
                  t_range=t_range, schedule=schedule, eta=eta, clip=clip, generator=generator,
                  codebook_chunk=codebook_chunk, codebook_axis=codebook_axis, progress=progress)  # fmt: skip
        return _per_image(functools.partial(compress, model, **kw), {"image": image, **args},
                          {"image"} | _rows(args, 3))  # fmt: skip
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
    key, x_T, xs = _prepare(model, image.shape, steps, key, x_T, eta, schedule)
    codebook = _check_codebook(codebook, steps, codebook_size, image.shape)
    spec = CodebookSpec(codebook_size, generator, codebook_chunk, codebook_axis)
    w = None if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), image.shape)
    out, (indices, coeffs) = _compress_one(
        model, rule_obj, image, x_T, xs, codebook, w, None, _label(model, class_label), key,
        spec=spec, clip=clip, t_range=_check_t_range(t_range), progress=progress,
    )
    return CompressResult(indices, coeffs, out)


def restore(model: Any, measurement: jax.Array, operator: Any, *, steps: int, codebook_size: int,
            rule: Any = "mse", key: Any, image_shape: tuple[int, ...] | None = None,
            x_T: jax.Array | None = None, codebook: jax.Array | None = None,
            class_label: Any = None, schedule: Schedule | None = None, eta: float = 1.0,
            clip: bool = True, generator: str = "philox", codebook_chunk: int | None = None,
            codebook_axis: str | None = None, progress: bool = False) -> CompressResult:  # fmt: skip
    """Compressed posterior sampling for y = operator(x): indices + restored image.

    `operator`: an operator from `ddcm_jax.operators` or its name
    ("colorization"); `rule`: "mse", "mse_inner" or an `MSE` object.
    `image_shape` (H, W, 3) of the image to restore; (B, H, W, 3) restores a
    batch, `measurement` then having a leading B axis (per-image `x_T`,
    `class_label` and keys as in `compress`).
    """
    if image_shape is None:
        if x_T is None:
            raise ValueError("give image_shape or x_T")
        image_shape = tuple(np.shape(x_T))
    image_shape = tuple(int(v) for v in image_shape)
    rule_obj = resolve_rule(rule, 1, 1, operator)
    y = jnp.asarray(measurement, jnp.float32)
    if len(image_shape) == 4:
        args = dict(x_T=x_T, class_label=class_label, key=key)
        kw = dict(steps=steps, codebook_size=codebook_size, rule=rule_obj, image_shape=image_shape[1:],
                  codebook=codebook, schedule=schedule, eta=eta, clip=clip, generator=generator,
                  codebook_chunk=codebook_chunk, codebook_axis=codebook_axis, progress=progress)  # fmt: skip
        return _per_image(lambda measurement, **a: restore(model, measurement, None, **kw, **a),
                          {"measurement": y, **args}, {"measurement"} | _rows(args, 3))  # fmt: skip
    key, x_T, xs = _prepare(model, image_shape, steps, key, x_T, eta, schedule)
    codebook = _check_codebook(codebook, steps, codebook_size, image_shape)
    spec = CodebookSpec(codebook_size, generator, codebook_chunk, codebook_axis)
    out, (indices, coeffs) = _compress_one(
        model, rule_obj, None, x_T, xs, codebook, None, y, _label(model, class_label), key,
        spec=spec, clip=clip, t_range=None, progress=progress,
    )
    return CompressResult(indices, coeffs, out)


def generate(model: Any, *, steps: int, codebook_size: int, key: Any, class_label: Any = None,
             image_shape: tuple[int, ...] | None = None, eta: float = 1.0, clip: bool = True,
             schedule: Schedule | None = None, generator: str = "philox",
             progress: bool = False) -> CompressResult:  # fmt: skip
    """Compressed generation: uniformly random atoms; the indices encode the sample.

    `image_shape` defaults to the model's native (size, size, 3). For B samples
    pass B keys (e.g. `jax.random.split(key, B)`) and/or B class labels.
    """
    if image_shape is None:
        arch = model.config.architecture
        image_shape = (arch.image_size, arch.image_size, arch.in_channels)
    args = dict(key=key, class_label=class_label)
    if rows := _rows(args, 3):
        kw = dict(steps=steps, codebook_size=codebook_size, image_shape=image_shape, eta=eta, clip=clip,
                  schedule=schedule, generator=generator, progress=progress)  # fmt: skip
        return _per_image(functools.partial(generate, model, **kw), args, rows)
    key, x_T, xs = _prepare(model, image_shape, steps, key, None, eta, schedule)
    spec = CodebookSpec(codebook_size, generator)
    out, (indices, coeffs) = _compress_one(
        model, Random(), None, x_T, xs, None, None, None, _label(model, class_label), key,
        spec=spec, clip=clip, t_range=None, progress=progress,
    )
    return CompressResult(indices, coeffs, out)


def sample(model: Any, *, steps: int, key: Any, image_shape: tuple[int, ...] | None = None,
           class_label: Any = None, x_T: jax.Array | None = None, schedule: Schedule | None = None,
           eta: float = 1.0, clip: bool = True, progress: bool = False) -> jax.Array:  # fmt: skip
    """Plain (non-DDCM) DDIM sampling: fresh Gaussian noise each step, the same scan and step.

    The noise of step i is normal(fold_in(fold_in(key, 3), i)); x_T as in
    `compress`. The baseline that DDCM decoding is measured against.
    """
    if image_shape is None:
        arch = model.config.architecture
        image_shape = (arch.image_size, arch.image_size, arch.in_channels)
    key, x_T, xs = _prepare(model, tuple(image_shape), steps, key, x_T, eta, schedule)
    return _sample_one(model, x_T, xs, _label(model, class_label), key, clip=clip, progress=progress)


def decompress(model: Any, indices: Any, coeffs: Any = None, *, steps: int, codebook_size: int,
               image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1,
               rule: Any = "ddcm", key: Any, x_T: jax.Array | None = None,
               codebook: jax.Array | None = None, class_label: Any = None,
               schedule: Schedule | None = None, eta: float = 1.0, clip: bool = True,
               generator: str = "philox", progress: bool = False) -> jax.Array:  # fmt: skip
    """Rebuild the image from indices, regenerating only the chosen atoms.

    `indices` (steps-1, M) or a `CompressResult`; (B, steps-1, M) decodes a
    batch (per-image `x_T`, `class_label` and keys as in `compress`).
    `rule` only decides how indices become noise: single-atom rules (ddcm,
    mse, random, soft) replay atom[index]; "mp" and "turbo" need M (and C).
    """
    if isinstance(indices, CompressResult):
        indices, coeffs = indices.indices, indices.coeffs
    if isinstance(rule, str) and rule in ("mse", "mse_inner", "random", "soft"):
        rule = "ddcm"
    rule_obj = resolve_rule(rule, num_atoms, coef_bits)
    if rule_obj.num_atoms == 1 and not isinstance(rule_obj, Turbo):
        rule_obj = DDCM()  # every single-atom rule replays z = atom[index]
    indices = jnp.asarray(indices, jnp.int32)
    if coeffs is None:
        coeffs = jnp.zeros((*indices.shape[:-1], rule_obj.coeff_width), jnp.int32)
    coeffs = jnp.asarray(coeffs, jnp.int32)
    if indices.ndim == 3:
        args = dict(indices=indices, coeffs=coeffs, x_T=x_T, class_label=class_label, key=key)
        kw = dict(steps=steps, codebook_size=codebook_size, image_shape=image_shape, rule=rule_obj,
                  codebook=codebook, schedule=schedule, eta=eta, clip=clip, generator=generator,
                  progress=progress)  # fmt: skip
        return _per_image(functools.partial(decompress, model, **kw), args, _rows(args, 3))
    image_shape = tuple(int(v) for v in image_shape)[-3:]
    want = (steps - 1, rule_obj.num_atoms)
    if indices.shape != want or coeffs.shape != (steps - 1, rule_obj.coeff_width):
        raise ValueError(f"indices must be {want} and coeffs {(steps - 1, rule_obj.coeff_width)} for this "
                         f"rule, got {indices.shape} and {coeffs.shape}")  # fmt: skip
    key, x_T, xs = _prepare(model, image_shape, steps, key, x_T, eta, schedule)
    codebook = _check_codebook(codebook, steps, codebook_size, image_shape)
    spec = CodebookSpec(codebook_size, generator)
    return _decompress_one(model, rule_obj, indices, coeffs, x_T, xs, codebook,
                           _label(model, class_label), key, spec=spec, clip=clip,
                           progress=progress)  # fmt: skip
