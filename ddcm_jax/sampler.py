"""The DDCM reverse diffusion: one `lax.scan` over steps, a pure DDIM step, rules plugged in.

Per step (DDIM, Song et al. 2021, eq. 12, with guided-diffusion's clipping):
  (1) x0_hat = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps_hat, clipped to [-1, 1]
  (2) eps_hat <- (sqrt(1/alpha_bar) x_t - x0_hat) / sqrt(1/alpha_bar - 1)
  (3) x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z
DDCM replaces z by codebook atoms picked by a selection rule; the last step
(sigma = 0) adds none and returns x0_hat. Schedule values enter the scan as xs
(float64 on the host, float32 in the scan); chosen indices leave it as ys.

Keys: `key` -> fold_in(key, 0) start noise x_T, fold_in(key, 1) codebook root
(step i's codebook = fold_in(root, i)), fold_in(key, 2) the rule's own keys.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.codebook import step_key
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import (
    DDCM,
    MSE,
    AtomSource,
    MatchingPursuit,
    Random,
    StepContext,
    Turbo,
    coeff_width,
)

__all__ = ["CompressResult", "SchedT", "compress", "decompress", "predict_x0", "schedule_xs", "step"]


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
    """Per-step values in the order the sampler runs them (i = steps-1 .. 0), float32."""
    ab = np.asarray(schedule.alpha_bar, np.float64)[::-1]
    abp = np.asarray(schedule.alpha_bar_prev, np.float64)[::-1]
    sigma = schedule.sigma(eta)[::-1]
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return SchedT(
        i=np.arange(schedule.steps, dtype=np.int32)[::-1].copy(),
        t=np.asarray(schedule.timesteps, np.int32)[::-1].copy(),
        sqrt_recip_ab=f32(np.sqrt(1.0 / ab)),
        sqrt_recipm1_ab=f32(np.sqrt(1.0 / ab - 1.0)),
        sqrt_ab_prev=f32(np.sqrt(abp)),
        dir_coef=f32(np.sqrt(np.maximum(1.0 - abp - sigma**2, 0.0))),
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


@dataclasses.dataclass(frozen=True)
class CompressResult:
    indices: jax.Array  # (steps-1, M) or (B, steps-1, M)
    coeffs: jax.Array  # (steps-1, M-1 | M | 0)
    image: jax.Array  # reconstruction, identical to what `decompress` returns


def resolve_rule(rule: Any, num_atoms: int, coef_bits: int, operator: Any = None) -> Any:
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
        return MSE(operator, inner_product=rule == "mse_inner")
    raise ValueError(f"unknown rule {rule!r} (ddcm, mp, turbo, mse, mse_inner, random)")


def _as_key(key: Any) -> jax.Array:
    if key is None:
        raise ValueError("a key (typed jax.random.key or an int seed) is required; there is no default")
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError("key must be a typed key (jax.random.key) or an int seed")
    return key


def _denoise(model: Any, x_t: jax.Array, s: SchedT, y: jax.Array | None) -> jax.Array:
    out = model.apply(model.params, x_t[None], s.t[None], None if y is None else y[None])[0]
    return out[..., : x_t.shape[-1]]  # learned-sigma channels are not used by DDIM


def _scan_body(model: Any, noise_fn: Any, clip: bool) -> Any:
    def body(x_t, inp):
        s, rows, extra = inp
        eps_hat = _denoise(model, x_t, s, None)
        noise, ys = noise_fn(x_t, eps_hat, s, rows, extra)
        return step(x_t, eps_hat, s, noise, clip), ys

    return body


def _split_last(xs: SchedT) -> tuple[SchedT, SchedT]:
    """(the noise-adding steps, the final sigma = 0 step)."""
    return jax.tree_util.tree_map(lambda a: a[:-1], xs), jax.tree_util.tree_map(lambda a: a[-1], xs)


def _final(model: Any, x_1: jax.Array, last: SchedT, clip: bool) -> jax.Array:
    return step(x_1, _denoise(model, x_1, last, None), last, jnp.zeros_like(x_1), clip)


def _book(size: int, shape: tuple[int, ...], root: jax.Array, s: SchedT, rows: Any) -> AtomSource:
    if rows is not None:
        return AtomSource(size, shape, array=rows)
    return AtomSource(size, shape, key=step_key(root, s.i))


@functools.partial(jax.jit, static_argnames=("rule", "codebook_size", "steps_schedule", "clip"))
def _compress_one(model, image, x_T, codebook, weights, measurement, key, *, rule,
                  codebook_size, steps_schedule, clip):  # fmt: skip
    noisy, last = _split_last(schedule_xs(Schedule.create(*steps_schedule[:3]), steps_schedule[3]))
    shape = tuple(x_T.shape)
    cb_root, rule_root = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

    def noise_fn(x_t, eps_hat, s, rows, _):
        x0_hat, _ = predict_x0(x_t, eps_hat, s, clip)
        ctx = StepContext(x_t, x0_hat, s.sigma, s.alpha_bar_prev, image, measurement, weights,
                          jax.random.fold_in(rule_root, s.i))  # fmt: skip
        sel = rule.select(ctx, _book(codebook_size, shape, cb_root, s, rows))
        return sel.noise, (sel.indices, sel.coeffs)

    body = _scan_body(model, noise_fn, clip)
    x_1, (indices, coeffs) = jax.lax.scan(body, x_T, (noisy, codebook, None))
    return indices, coeffs, _final(model, x_1, last, clip)


@functools.partial(jax.jit, static_argnames=("rule", "codebook_size", "steps_schedule", "clip"))
def _decompress_one(model, indices, coeffs, x_T, codebook, key, *, rule, codebook_size,
                    steps_schedule, clip):  # fmt: skip
    noisy, last = _split_last(schedule_xs(Schedule.create(*steps_schedule[:3]), steps_schedule[3]))
    shape = tuple(x_T.shape)
    cb_root = jax.random.fold_in(key, 1)

    def noise_fn(x_t, eps_hat, s, rows, chosen):
        idx, co = chosen
        return rule.noise(_book(codebook_size, shape, cb_root, s, rows), idx, co), None

    body = _scan_body(model, noise_fn, clip)
    x_1, _ = jax.lax.scan(body, x_T, (noisy, codebook, (indices, coeffs)))
    return _final(model, x_1, last, clip)


def _prepare(model: Any, image_shape: tuple[int, ...], steps: int, key: Any, x_T: Any,
             eta: float) -> tuple[jax.Array, jax.Array, tuple]:  # fmt: skip
    key = _as_key(key)
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    d = model.config.diffusion
    sched = (d.noise_schedule, d.num_timesteps, str(steps), float(eta))
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), image_shape, jnp.float32)
    return key, jnp.asarray(x_T, jnp.float32), sched


def _check_codebook(codebook: Any, steps: int, codebook_size: int, shape: tuple[int, ...]) -> Any:
    if codebook is None:
        return None
    codebook = jnp.asarray(codebook, jnp.float32)
    want = (steps - 1, codebook_size, *shape)
    if codebook.shape != want:
        raise ValueError(f"codebook must have shape {want} (one per noise-adding step), got {codebook.shape}")
    return codebook


def compress(model: Any, image: jax.Array, *, steps: int, codebook_size: int, num_atoms: int = 1,
             coef_bits: int = 1, rule: Any = "ddcm", key: Any, x_T: jax.Array | None = None,
             codebook: jax.Array | None = None, weights: jax.Array | None = None,
             eta: float = 1.0, clip: bool = True) -> CompressResult:  # fmt: skip
    """Encode `image` (H, W, 3) in [-1, 1] as codebook indices.

    Returns indices (steps-1, M), coeffs and the reconstruction that
    `decompress` reproduces. `codebook` (steps-1, K, H, W, 3) overrides the
    key-derived codebooks; `x_T` the start noise; `weights` (H, W, 1 or 3)
    makes the residual priority-aware.
    """
    image = jnp.asarray(image, jnp.float32)
    if image.ndim == 4:  # a batch: the same key (codebooks, x_T) for every image, vmapped
        x_T = None if x_T is None else jnp.broadcast_to(jnp.asarray(x_T, jnp.float32), image.shape)
        w = None if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), image.shape)
        one = functools.partial(compress, model, steps=steps, codebook_size=codebook_size,
                                num_atoms=num_atoms, coef_bits=coef_bits, rule=rule, key=key,
                                codebook=codebook, eta=eta, clip=clip)  # fmt: skip
        res = jax.vmap(lambda im, xt, ww: _fields(one(im, x_T=xt, weights=ww)),
                       in_axes=(0, None if x_T is None else 0, None if w is None else 0))(image, x_T, w)  # fmt: skip
        return CompressResult(*res)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
    rule_obj = resolve_rule(rule, num_atoms, coef_bits)
    key, x_T, sched = _prepare(model, image.shape, steps, key, x_T, eta)
    codebook = _check_codebook(codebook, steps, codebook_size, image.shape)
    w = None if weights is None else jnp.broadcast_to(jnp.asarray(weights, jnp.float32), image.shape)
    indices, coeffs, out = _compress_one(model, image, x_T, codebook, w, None, key, rule=rule_obj,
                                         codebook_size=codebook_size, steps_schedule=sched, clip=clip)  # fmt: skip
    return CompressResult(indices, coeffs, out)


def _fields(res: CompressResult) -> tuple[jax.Array, jax.Array, jax.Array]:
    return res.indices, res.coeffs, res.image


def restore(model: Any, measurement: jax.Array, operator: Any, *, steps: int, codebook_size: int,
            rule: Any = "mse", key: Any, image_shape: tuple[int, ...] | None = None,
            x_T: jax.Array | None = None, codebook: jax.Array | None = None,
            eta: float = 1.0, clip: bool = True) -> CompressResult:  # fmt: skip
    """Compressed posterior sampling for y = operator(x): indices + restored image."""
    if image_shape is None:
        if x_T is None:
            raise ValueError("give image_shape or x_T")
        image_shape = tuple(np.shape(x_T))
    rule_obj = resolve_rule(rule, 1, 1, operator)
    key, x_T, sched = _prepare(model, image_shape, steps, key, x_T, eta)
    codebook = _check_codebook(codebook, steps, codebook_size, image_shape)
    y = jnp.asarray(measurement, jnp.float32)
    indices, coeffs, out = _compress_one(model, None, x_T, codebook, None, y, key, rule=rule_obj,
                                         codebook_size=codebook_size, steps_schedule=sched, clip=clip)  # fmt: skip
    return CompressResult(indices, coeffs, out)


def decompress(model: Any, indices: Any, coeffs: Any = None, *, steps: int, codebook_size: int,
               image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1,
               rule: Any = "ddcm", key: Any, x_T: jax.Array | None = None,
               codebook: jax.Array | None = None, eta: float = 1.0,
               clip: bool = True) -> jax.Array:  # fmt: skip
    """Rebuild the image from indices, regenerating only the chosen atoms."""
    if isinstance(indices, CompressResult):
        indices, coeffs = indices.indices, indices.coeffs
    if rule in ("mse", "mse_inner", "random") or isinstance(rule, MSE | Random):
        rule_obj: Any = DDCM()  # single-atom rules replay the same way: z = atom[index]
    else:
        rule_obj = resolve_rule(rule, num_atoms, coef_bits)
    key, x_T, sched = _prepare(model, image_shape, steps, key, x_T, eta)
    codebook = _check_codebook(codebook, steps, codebook_size, image_shape)
    indices = jnp.asarray(indices, jnp.int32)
    if coeffs is None:
        coeffs = jnp.zeros((steps - 1, coeff_width(rule_obj)), jnp.int32)
    return _decompress_one(model, indices, jnp.asarray(coeffs, jnp.int32), x_T, codebook, key,
                           rule=rule_obj, codebook_size=codebook_size, steps_schedule=sched, clip=clip)  # fmt: skip
