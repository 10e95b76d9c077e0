"""DDCM and Turbo-DDCM on latent diffusion (Stable Diffusion), as the originals compute them.

The reverse process runs on the VAE's latents x_t (h, w, 4), NHWC, no clipping
(latents are unbounded). Per step, with a_t = alphas_cumprod[t]:

  (1) x0_hat  = sqrt(a_t) x_t - sqrt(1 - a_t) v             v-prediction
              = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)         epsilon-prediction
  (2) eps_hat = sqrt(a_t) v + sqrt(1 - a_t) x_t               (v; the network's eps otherwise)
  (3) sigma^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)             DDIM, eq. 16
  (4) x_prev  = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z

The first `coded_steps` steps add codebook noise z chosen by the rule (eta 1);
the others ("no-bits" steps, and the last) add none (eta 0). The target of the
rules is the VAE encoding of the image, mode x scaling_factor, and the
residual they score is target - x0_hat, exactly as on pixels, so `DDCM`,
`MatchingPursuit` and `Turbo` of `ddcm_jax.selection` serve both.

Two timestep schedules (the `schedule` argument):
  "ddcm"   the original DDCM's: t = linspace(0, N - 1, T).round()[::-1], and a_prev
           at t - N // T, or `final_alpha_cumprod` where that is negative. That is
           the original's quirk, kept: a_prev is not taken at the next entry
           (T = 20: step 53 looks back to 3, not 0).
  "turbo"  Turbo-DDCM's: `TURBO_TIMESTEPS` (162 entries) sampled evenly to T with
           Python's round (half to even), a_prev at the next entry, and
           alphas_cumprod[0] after the last.

Steps run one at a time through three compiled programs (the network, the
rule's choice, the step with the replay rule's noise), the same ones for the
encoder and the decoder, so `decode(encode(x))` is bit for bit the encoder's
image whatever the shapes (a whole-run scan would let XLA fuse the two sides
differently).

Keys, as in the pixel sampler: fold_in(key, 0) x_T, fold_in(key, 1) the codebook
root (step i's atoms addressed by (i, k)), fold_in(key, 2) the rule's own keys.

Conditioning: the model's stored null-prompt embedding, or a prompt with
classifier-free guidance g: out = out(null) + g (out(prompt) - out(null)), on
the raw network output as the originals do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Generator, Sequence
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.codebook import AtomSource
from ddcm_jax.respacing import (
    LATENT_SCHEDULES,
    TURBO_TIMESTEPS,
    ddcm_timesteps,
    latent_timesteps,
    turbo_timesteps,
)
from ddcm_jax.selection import GuidedSubset, Random, StepContext, Turbo, replay_rule
from ddcm_jax.spec import CodeSpec, SpecError
from ddcm_jax.stepping import Progress, as_key

__all__ = [
    "SCHEDULES",
    "TURBO_TIMESTEPS",
    "LatentResult",
    "LatentSchedT",
    "compress",
    "ddcm_timesteps",
    "decode",
    "decompress",
    "encode",
    "forward_bytes",
    "generate",
    "is_latent_model",
    "latent_schedule",
    "latent_shape",
    "make_spec",
    "native_size",
    "no_bits_steps_heuristic",
    "payload_bits",
    "predict",
    "size_multiple",
    "step",
    "turbo_timesteps",
]

Latent = Annotated[jax.Array, "*B h w 4 float32"]
LatentImage = Annotated[jax.Array, "*B H W 3 float32 in [-1, 1]"]

SCHEDULES = LATENT_SCHEDULES

def is_latent_model(model: Any) -> bool:
    """A Stable Diffusion model (`LatentDiffusionModel`), as opposed to a pixel-space ADM."""
    return getattr(model, "family", None) == "sd"


# --- schedules (the timesteps live in `ddcm_jax.respacing`, JAX-free for the bitstream) -------------


class LatentSchedT(NamedTuple):
    """One step's values (scalars in the scan; (T,) arrays for a schedule), float32."""

    i: jax.Array  # step index in run order, 0 .. T-1 (addresses the step's codebook)
    t: jax.Array  # timestep fed to the network
    sqrt_a: jax.Array  # sqrt(a_t)
    sqrt_1ma: jax.Array  # sqrt(1 - a_t)
    sqrt_a_prev: jax.Array  # sqrt(a_prev)
    dir_coef: jax.Array  # sqrt(1 - a_prev - sigma^2)
    sigma: jax.Array
    alpha_prev: jax.Array
    coded: jax.Array  # bool: a selecting step inside t_range (outside: the rule's idle code)


def latent_schedule(alphas_cumprod: np.ndarray, final_alpha_cumprod: float, steps: int, schedule: str,
                    coded_steps: int, t_range: tuple[int, int] | None = None) -> LatentSchedT:  # fmt: skip
    """Per-step values in run order; steps < `coded_steps` have eta 1, the others eta 0.

    Computed in float32 from the float32 alphas_cumprod, in the originals' order
    of operations (they run in torch float32).
    """
    n = len(alphas_cumprod)
    t, t_prev = latent_timesteps(schedule, steps, n)
    ac = np.asarray(alphas_cumprod, np.float32)
    a = ac[t]
    a_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], np.float32(final_alpha_cumprod)).astype(np.float32)
    one = np.float32(1)
    variance = ((one - a_prev) / (one - a)) * (one - a / a_prev)  # (3), float32
    eta = (np.arange(steps) < coded_steps).astype(np.float32)
    sigma = eta * np.sqrt(variance)
    lo, hi = (0, n - 1) if t_range is None else t_range
    return LatentSchedT(
        i=np.arange(steps, dtype=np.int32),
        t=t.astype(np.int32),
        sqrt_a=np.sqrt(a),
        sqrt_1ma=np.sqrt(one - a),
        sqrt_a_prev=np.sqrt(a_prev),
        dir_coef=np.sqrt(np.maximum(one - a_prev - sigma * sigma, 0)).astype(np.float32),
        sigma=sigma.astype(np.float32),
        alpha_prev=a_prev,
        coded=(np.arange(steps) < coded_steps) & (t >= lo) & (t <= hi),
    )


# --- the step ---------------------------------------------------------------------------------------


def predict(x_t: Latent, out: Latent, s: LatentSchedT, prediction_type: str) -> tuple[Latent, Latent]:
    """(1)-(2): x0_hat and eps_hat from the network's raw output (v or eps)."""
    if prediction_type == "v_prediction":
        return s.sqrt_a * x_t - s.sqrt_1ma * out, s.sqrt_a * out + s.sqrt_1ma * x_t
    return (x_t - s.sqrt_1ma * out) / s.sqrt_a, out


def step(x_t: Latent, out: Latent, s: LatentSchedT, noise: Latent, prediction_type: str) -> Latent:
    """(4): x_prev. Codebook, random and zero noise all take this path."""
    x0_hat, eps_hat = predict(x_t, out, s, prediction_type)
    return s.sqrt_a_prev * x0_hat + s.dir_coef * eps_hat + s.sigma * noise


# --- rate ---------------------------------------------------------------------------------------------


def payload_bits(spec: CodeSpec) -> int:
    """Bits of one image's code (no t_range): code_rows x the rule's bits per step (exact)."""
    return spec.payload_bits()


def _torch_logspace_f32(start: np.float32, end: np.float32, steps: int) -> np.ndarray:
    """`torch.logspace(start, end, steps)` for float32 start/end on CPU: exponents in float32, pow in double."""
    step_ = np.float32((end - start) / np.float32(steps - 1))
    half = steps // 2
    out = np.empty(steps, np.float32)
    for i in range(steps):
        e = np.float32(start + step_ * np.float32(i)) if i < half else np.float32(end - step_ * np.float32(steps - i - 1))
        out[i] = np.float32(10.0 ** float(e))
    return out


def no_bits_steps_heuristic(steps: int, codebook_size: int, num_atoms: int, height: int, width: int) -> int:
    """Turbo-DDCM's `get_no_bits_steps`: the more bits per pixel all T-1 steps would carry, the
    fewer steps go without bits (0 <= NBS <= T - 2), by log-spaced bpp bins over 0.01..0.15."""
    bits = (steps - 1) * (math.ceil(math.log2(math.comb(codebook_size, num_atoms))) + num_atoms)
    return no_bits_steps_for_bpp(bits / (height * width), steps, height * width)


def no_bits_steps_for_bpp(bpp: float, steps: int, pixels: int) -> int:
    """The NBS bin of `bpp` (bits per pixel if all T-1 steps carried bits) for an image of `pixels`."""
    param = 70 if pixels <= 768**2 else 20
    bins = _torch_logspace_f32(np.log10(np.float32(0.01)), np.log10(np.float32(0.15)), param)
    bucket = int(np.searchsorted(bins.astype(np.float64), round(bpp, 8), side="left"))  # torch.bucketize, right=False
    return max(0, min(steps - 2, param - bucket - 1))


# --- running -------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentResult:
    """What a latent run returns (a pytree): the code, the final latent and the decoded image."""

    indices: jax.Array  # (S, M) int32, S = the steps that carry bits; (B, S, M) for a batch
    coeffs: jax.Array  # matching pursuit: (S, M-1) coefficient indices; turbo: (S, M) signs +-1; else (S, 0)
    latent: jax.Array  # (h, w, 4) the final latent
    image: jax.Array  # (H, W, 3) clamp(decode(latent), -1, 1)


class _Cond(NamedTuple):
    context: jax.Array  # (1, L, C) one prompt, or (2, L, C) [null, prompt] with guidance
    guidance: jax.Array  # scalar float32 (unused with one context)


@jax.jit
def _combine(outs: jax.Array, guidance: jax.Array) -> jax.Array:
    """Classifier-free guidance on the raw outputs [null, prompt]: out_null + g (out_prompt - out_null)."""
    return outs[0] + guidance * (outs[1] - outs[0])


def _outputs(model: Any, x_t: jax.Array, t: Any, cond: _Cond, ccfg: bool) -> tuple[jax.Array, Any]:
    """(the output the step follows, compressed CFG's eps_uncond - eps_cond or None).

    The network runs as its own compiled program (`model(...)`), outside the
    selection and step programs, so that the encoder's outputs are bit for bit
    the decoder's: compressed CFG's unconditional output is one batch-1 call,
    exactly what a decoder without the prompt makes.
    """
    ts = jnp.full((1,), t, jnp.int32)
    if ccfg:
        out_u = model(x_t[None], ts, cond.context[:1])[0]
        return out_u, out_u - model(x_t[None], ts, cond.context[1:])[0]
    n = cond.context.shape[0]
    outs = model(jnp.broadcast_to(x_t, (n, *x_t.shape)), jnp.full((n,), t, jnp.int32), cond.context)
    return (outs[0] if n == 1 else _combine(outs, cond.guidance)), None


def _book(spec: CodeSpec, shape: tuple[int, ...], root: jax.Array, i: jax.Array, rows: Any,
          chunk: int | None) -> AtomSource:  # fmt: skip
    if rows is not None:
        return AtomSource.from_array(rows, chunk=chunk)
    return AtomSource(spec.codebook_size, shape, spec.generator, chunk, root=root, step=i).with_base()


@functools.partial(jax.jit, static_argnames=("ptype", "chunk"))
def _select(spec, x_t, out, aim, s, rows, target, weights, key, *, ptype, chunk):
    """One coded step's choice: (indices, coeffs) by the rule (the rule's idle code outside t_range)."""
    book = _book(spec, tuple(x_t.shape), jax.random.fold_in(key, 1), s.i, rows, chunk)
    x0_hat, _ = predict(x_t, out, s, ptype)
    ctx = StepContext(x_t, x0_hat, s.sigma, s.alpha_prev, target if aim is None else aim, None, weights,
                      jax.random.fold_in(jax.random.fold_in(key, 2), s.i))  # fmt: skip
    rule = spec.rule
    if spec.t_range is None:
        return tuple(rule.select(ctx, book)[1:])
    return jax.lax.cond(s.coded, lambda: tuple(rule.select(ctx, book)[1:]), rule.idle_code)


@functools.partial(jax.jit, static_argnames=("ptype",))
def _advance(spec, x_t, out, s, rows, code, key, *, ptype):
    """(4) with the code's noise (the decoder's replay rule), or with none (`code` None: eta 0 steps).

    Encoder and decoder both step through this one program, so they agree bit for bit.
    """
    if code is None:
        return step(x_t, out, s, jnp.zeros_like(x_t), ptype)
    book = _book(spec, tuple(x_t.shape), jax.random.fold_in(key, 1), s.i, rows, None)
    return step(x_t, out, s, spec.rule.noise(book, *code), ptype)


def _row(tree: Any, i: int) -> Any:
    return None if tree is None else jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), tree)


def _drive(model: Any, spec: CodeSpec, x_T: jax.Array, xs: LatentSchedT, coded: int, *, mode: str,
           rows: Any = None, code: Any = None, target: Any = None, cond: _Cond, key: jax.Array,
           chunk: int | None = None, progress: Progress | None = None, ccfg: bool = False,
           switch: tuple[int, _Cond] | None = None) -> Generator[None, None, tuple[jax.Array, Any]]:  # fmt: skip
    """All T steps of one image, one step at a time: the `coded` noise-adding steps (mode "encode":
    choose, then step; "decode": step with `code`), then the quiet ones; `switch` = (step, cond)
    changes the conditioning from that step on; `progress(done, total)` after each step.

    A generator that yields once each step is dispatched and returns (latent,
    code): `_batched` interleaves a batch's images step by step, so that images
    placed on different devices run at the same time.

    Three compiled programs a step (the network, the choice, the step), the same
    for every step and shared by encoder and decoder: decoding replays the
    encoder's arithmetic exactly, whatever the shapes and the backend's fusion.
    """
    total = int(xs.i.shape[0])
    replay = spec.replace(rule=replay_rule(spec.rule))
    ptype = model.prediction_type
    target, weights = (None, None) if target is None else target
    if progress is not None:
        progress(0, total)
    x, chosen = jnp.asarray(x_T, jnp.float32), []
    for i in range(total):
        s = _row(xs, i)
        c = switch[1] if switch is not None and i >= switch[0] else cond
        noisy = i < coded
        if not noisy and ccfg:  # compressed CFG's quiet steps follow eps_uncond: the null prompt, as decoding
            c = _Cond(c.context[:1], c.guidance)
        out, aim = _outputs(model, x, s.t, c, ccfg and noisy)
        book_rows = _row(rows, i) if noisy else None
        step_code = None
        if noisy:
            if mode == "encode":
                step_code = _select(spec, x, out, aim, s, book_rows, target, weights, key, ptype=ptype, chunk=chunk)
                chosen.append(step_code)
            else:
                step_code = _row(code, i)
        x = _advance(replay, x, out, s, book_rows, step_code, key, ptype=ptype)
        if progress is not None:
            x = jax.block_until_ready(x)
            progress(i + 1, total)
        yield
    if not chosen:
        return x, None
    return x, tuple(jnp.stack(parts) for parts in zip(*chosen, strict=True))


# --- the public functions --------------------------------------------------------------------------------


def make_spec(*, steps: int, codebook_size: int, image_hw: tuple[int, int], num_atoms: int = 1,
              coef_bits: int = 1, rule: Any = "ddcm", schedule: str | None = None,
              no_bits_steps: int | None = None, generator: str = "philox",
              t_range: tuple[int, int] | None = None) -> CodeSpec:  # fmt: skip
    """The `CodeSpec` of a latent code from the keywords; every setting validated once.

    `schedule` defaults to the rule's own ("turbo" for turbo, else "ddcm");
    `no_bits_steps` to Turbo-DDCM's heuristic for an (H, W) = `image_hw` image
    (turbo) or 0.
    """
    probe = CodeSpec.create(steps=steps, codebook_size=codebook_size, rule=rule, num_atoms=num_atoms,
                            coef_bits=coef_bits, generator=generator, clip=False)  # fmt: skip
    turbo = isinstance(probe.rule, Turbo)
    if no_bits_steps is None:
        no_bits_steps = no_bits_steps_heuristic(steps, codebook_size, probe.num_atoms, *image_hw) if turbo else 0
    if turbo and t_range is not None:
        raise SpecError("t_range", "turbo codes its first steps; give no_bits_steps instead of t_range")
    return probe.replace(schedule=schedule or ("turbo" if turbo else "ddcm"), no_bits_steps=no_bits_steps,
                         t_range=t_range)  # fmt: skip


def _check_spec(spec: CodeSpec) -> None:
    if spec.schedule is None or spec.clip or spec.eta != 1.0 or spec.respacing:
        raise ValueError("a latent code needs a named schedule ('ddcm' or 'turbo'), clip=False, eta 1, no respacing")


def _conditioning(model: Any, prompt: str | None, guidance: float, ccfg: bool = False) -> _Cond:
    null = jnp.asarray(model.null_prompt, jnp.float32)
    if not prompt:
        if guidance:
            raise ValueError("guidance needs a prompt")
        return _Cond(null, jnp.float32(0))
    if not guidance and not ccfg:
        raise ValueError("a prompt conditions through classifier-free guidance: give guidance > 0 "
                         "(or generate with compressed CFG, `ccfg_subset`)")  # fmt: skip
    text = jnp.asarray(model.encode_prompt([prompt]), jnp.float32)
    return _Cond(jnp.concatenate([null, text]), jnp.float32(guidance))


def latent_shape(model: Any, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(h, w, C) of the latent of an (H, W) image; H and W must be multiples of the VAE's factor."""
    f = model.config.downsampling_factor
    h, w = image_hw
    if h % f or w % f:
        raise ValueError(f"image sides must be multiples of {f} for this model, got {h}x{w}")
    return h // f, w // f, model.config.latent_channels


def _signs_out(spec: CodeSpec, coeffs: jax.Array) -> jax.Array:
    """Turbo's sign bits (1 = negative) -> signs +-1; other rules' coefficient indices unchanged."""
    return 1 - 2 * coeffs if isinstance(spec.rule, Turbo) else coeffs


def _signs_in(spec: CodeSpec, coeffs: Any) -> jax.Array:
    if not isinstance(spec.rule, Turbo):
        return jnp.asarray(coeffs, jnp.int32)
    c = np.asarray(coeffs)
    if c.size and not np.all(np.abs(c) == 1):
        raise ValueError("turbo coeffs are signs, +1 or -1")
    return jnp.asarray(c < 0, jnp.int32)


def _decoded(model: Any, latent: jax.Array) -> jax.Array:
    return jnp.clip(model.decode(latent[None])[0], -1.0, 1.0)


def _to_end(gen: Generator[None, None, Any]) -> Any:
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def _batched(fn: Callable[..., Generator[None, None, Any]], batch: bool, shared: Sequence[Any],
             args: Sequence[Any], per_image: Sequence[bool], progress: Progress | None) -> Any:  # fmt: skip
    """fn(*shared, *args, progress) for one image, or for each image of a batch (args marked per_image
    have a B axis), stacked.

    Every image runs through the same compiled programs, batch 1, so a batch's
    codes equal single calls'. With several local devices, image b runs on
    device b mod D (`shared`, e.g. the model, copied to each once), and the
    images advance step by step in turn: JAX dispatches asynchronously, so the
    devices work at the same time. `progress` follows the batch's last image.
    """
    if not batch:
        return _to_end(fn(*shared, *args, progress))
    n = next(len(a) for a, p in zip(args, per_image, strict=True) if p)
    devices = jax.local_devices()
    copies: dict[Any, Any] = {}
    gens = []
    for b in range(n):
        own = [a[b] if p else a for a, p in zip(args, per_image, strict=True)]
        here = shared
        if len(devices) > 1:
            dev = devices[b % len(devices)]
            if dev not in copies:
                copies[dev] = jax.device_put(tuple(shared), dev)
            here, own = copies[dev], jax.device_put(own, dev)
        gens.append(fn(*here, *own, progress if b == n - 1 else None))
    outs: list[Any] = [None] * n
    live = list(range(n))
    while live:  # one step of each unfinished image in turn
        for b in list(live):
            try:
                next(gens[b])
            except StopIteration as done:
                outs[b] = done.value
                live.remove(b)
    if len(devices) > 1:
        outs = jax.device_put(outs, devices[0])
    return jax.tree_util.tree_map(lambda *v: jnp.stack(v), *outs)


def _per_image(a: Any, single_ndim: int) -> bool:
    return a is not None and np.ndim(a) == single_ndim + 1


def encode(model: Any, spec: CodeSpec, image: LatentImage | None, *, key: Any, x_T: Latent | None = None,
           codebook: jax.Array | None = None, weights: jax.Array | None = None,
           image_shape: tuple[int, ...] | None = None, prompt: str | None = None, guidance: float = 0.0,
           codebook_chunk: int | None = None, progress: Progress | None = None) -> LatentResult:  # fmt: skip
    """The one latent encoding path: compression (an image), or generation (`spec.rule` `Random`, or
    `GuidedSubset` for compressed CFG with a `prompt`; no image, `image_shape` (H, W, 3)).
    Keywords as `compress`."""
    _check_spec(spec)
    ccfg = isinstance(spec.rule, GuidedSubset)
    if ccfg and (image is not None or not prompt or guidance):
        raise ValueError("compressed CFG generates (no image) from a prompt, without a guidance scale")
    key = as_key(key)
    if image is not None:
        image = jnp.asarray(image, jnp.float32)
        image_shape = tuple(image.shape[-3:])
    hw = tuple(image_shape[-3:-1])
    shape = latent_shape(model, hw)
    coded = spec.code_rows
    xs = latent_schedule(model.alphas_cumprod, model.final_alpha_cumprod, spec.steps, spec.schedule, coded,
                         spec.t_range)  # fmt: skip
    rows = _explicit_codebook(codebook, spec, shape)
    cond = _conditioning(model, prompt, guidance, ccfg)

    def one(model: Any, cond: _Cond, rows: Any, img: Any, k: jax.Array, x0: Any, w: Any,
            progress: Progress | None) -> Generator[None, None, LatentResult]:  # fmt: skip
        target = None if img is None else model.encode(img[None])[0]
        start = _start(k, shape) if x0 is None else jnp.asarray(x0, jnp.float32)
        w = None if w is None else jnp.asarray(w, jnp.float32)
        lat, ys = yield from _drive(model, spec, start, xs, coded, mode="encode", rows=rows, target=(target, w),
                                    cond=cond, key=k, chunk=codebook_chunk, progress=progress, ccfg=ccfg)  # fmt: skip
        (_, m), (_, cw) = spec.code_shape
        idx, co = ys if ys is not None else (jnp.zeros((0, m), jnp.int32), jnp.zeros((0, cw), jnp.int32))
        return LatentResult(idx, _signs_out(spec, co), lat, _decoded(model, lat))

    batch = (image is not None and image.ndim == 4) or key.ndim == 1
    return _batched(one, batch, [model, cond, rows], [image, key, x_T, weights],
                    [image is not None and image.ndim == 4, key.ndim == 1, _per_image(x_T, 3),
                     _per_image(weights, 3)], progress)  # fmt: skip


def decode(model: Any, spec: CodeSpec, indices: Any, coeffs: Any = None, *, key: Any,
           image_shape: tuple[int, ...], x_T: Latent | None = None, codebook: jax.Array | None = None,
           prompt: str | None = None, guidance: float = 0.0, edit_prompt: str | None = None, tskip: int = 0,
           progress: Progress | None = None) -> LatentResult:  # fmt: skip
    """The one latent decoding path: the code (indices, coeffs as `encode` returns them) -> latent, image.

    Text-based editing (DDCM's `compressed_textbased_editing`): with
    `edit_prompt`, the steps from `tskip` on (0: all of them) are conditioned on
    it instead of the code's own `prompt`, with the same `guidance`; the atoms
    stay those the encoder chose for the source prompt.
    """
    _check_spec(spec)
    spec = spec.replace(rule=replay_rule(spec.rule))
    key = as_key(key)
    shape = latent_shape(model, tuple(image_shape[-3:-1]))
    coded = spec.code_rows
    xs = latent_schedule(model.alphas_cumprod, model.final_alpha_cumprod, spec.steps, spec.schedule, coded,
                         spec.t_range)  # fmt: skip
    rows = _explicit_codebook(codebook, spec, shape)
    cond = _conditioning(model, prompt, guidance)
    edit = None
    if edit_prompt is not None:
        if not 0 <= tskip <= spec.steps:
            raise ValueError(f"tskip must be a step in 0..{spec.steps}, got {tskip}")
        edit = _conditioning(model, edit_prompt, guidance)
    indices = jnp.asarray(indices, jnp.int32)
    batch = indices.ndim == 3
    (_, m), (_, cw) = spec.code_shape
    if indices.shape[-2:] != (coded, m):
        raise ValueError(f"indices must be ({coded}, {m}) per image for this code, got {indices.shape}")
    coeffs = jnp.zeros((*indices.shape[:-1], cw), jnp.int32) if coeffs is None else _signs_in(spec, coeffs)
    if coeffs.shape[-2:] != (coded, cw):
        raise ValueError(f"coeffs must be ({coded}, {cw}) per image for this code, got {coeffs.shape}")
    if int(indices.size) and (int(indices.min()) < 0 or int(indices.max()) >= spec.codebook_size):
        raise ValueError(f"atom indices must lie in 0..K-1 = {spec.codebook_size - 1}")

    def one(model: Any, cond: _Cond, rows: Any, edit: _Cond | None, idx: jax.Array, co: jax.Array, k: jax.Array,
            x0: Any, progress: Progress | None) -> Generator[None, None, LatentResult]:  # fmt: skip
        start = _start(k, shape) if x0 is None else jnp.asarray(x0, jnp.float32)
        lat, _ = yield from _drive(model, spec, start, xs, coded, mode="decode", rows=rows, code=(idx, co),
                                   cond=cond, key=k, progress=progress,
                                   switch=None if edit is None else (int(tskip), edit))  # fmt: skip
        return LatentResult(idx, _signs_out(spec, co), lat, _decoded(model, lat))

    return _batched(one, batch or key.ndim == 1, [model, cond, rows, edit], [indices, coeffs, key, x_T],
                    [batch, batch, key.ndim == 1, _per_image(x_T, 3)], progress)  # fmt: skip


def compress(model: Any, image: LatentImage, *, steps: int, codebook_size: int, num_atoms: int = 1,
             coef_bits: int = 1, rule: Any = "ddcm", key: Any, x_T: Latent | None = None,
             codebook: jax.Array | None = None, schedule: str | None = None,
             no_bits_steps: int | None = None, t_range: tuple[int, int] | None = None,
             weights: jax.Array | None = None, prompt: str | None = None, guidance: float = 0.0,
             generator: str = "philox", codebook_chunk: int | None = None,
             progress: Progress | None = None) -> LatentResult:  # fmt: skip
    """Encode `image` (H, W, 3) in [-1, 1] (or (B, H, W, 3)) with a latent model.

    The keyword form of `encode(model, make_spec(...), image, key=)`.
    `rule` "ddcm" (M = 1; M > 1 is matching pursuit with C = `coef_bits`), "mp"
    or "turbo" (M atoms with signs); `schedule` "ddcm" or "turbo" (default: the
    rule's own); `no_bits_steps` the last steps before the final one that carry
    no bits (turbo: default from Turbo-DDCM's heuristic for this image size;
    ddcm: 0). `x_T` (h, w, 4) overrides the key's start latent and `codebook`
    (S, K, h, w, 4) the key's codebooks, S = steps - 1 - no_bits_steps being
    the steps that carry bits. `weights` (h, w, 1 or 4) weight the residual.
    `prompt` and `guidance`: classifier-free guidance on the network output
    (no prompt: the model's null prompt, no guidance). `key` (required) fixes
    x_T and every codebook; a (B,) array of keys gives one per image.

    Returns `.indices` (S, M), `.coeffs` (matching pursuit: coefficient indices
    (S, M-1); turbo: signs +-1 (S, M)), `.latent`, `.image` (decoded, clamped).
    """
    hw = tuple(np.shape(image)[-3:-1])
    spec = make_spec(steps=steps, codebook_size=codebook_size, image_hw=hw, num_atoms=num_atoms,
                     coef_bits=coef_bits, rule=rule, schedule=schedule, no_bits_steps=no_bits_steps,
                     generator=generator, t_range=t_range)  # fmt: skip
    return encode(model, spec, image, key=key, x_T=x_T, codebook=codebook, weights=weights, prompt=prompt,
                  guidance=guidance, codebook_chunk=codebook_chunk, progress=progress)  # fmt: skip


def decompress(model: Any, indices: Any, coeffs: Any = None, *, steps: int, codebook_size: int,
               image_shape: tuple[int, ...], num_atoms: int = 1, coef_bits: int = 1, rule: Any = "ddcm",
               key: Any, x_T: Latent | None = None, codebook: jax.Array | None = None,
               schedule: str | None = None, no_bits_steps: int | None = None,
               t_range: tuple[int, int] | None = None, prompt: str | None = None, guidance: float = 0.0,
               edit_prompt: str | None = None, tskip: int = 0, generator: str = "philox",
               progress: Progress | None = None) -> LatentResult:  # fmt: skip
    """Rebuild a latent model's image from `compress`'s `.indices` / `.coeffs` (mirrors its keywords).

    `image_shape` (H, W, 3) of the coded image (it fixes the latent's shape and
    turbo's default no-bits steps). Returns `.latent` and `.image`; `.indices`
    and `.coeffs` are the code given. `edit_prompt` / `tskip`: text-based
    editing (see `decode`).
    """
    spec = make_spec(steps=steps, codebook_size=codebook_size, image_hw=tuple(image_shape[-3:-1]),
                     num_atoms=num_atoms, coef_bits=coef_bits, rule=rule, schedule=schedule,
                     no_bits_steps=no_bits_steps, generator=generator, t_range=t_range)  # fmt: skip
    return decode(model, spec, indices, coeffs, key=key, image_shape=image_shape, x_T=x_T, codebook=codebook,
                  prompt=prompt, guidance=guidance, edit_prompt=edit_prompt, tskip=tskip, progress=progress)  # fmt: skip


def generate(model: Any, *, steps: int, codebook_size: int, key: Any, image_shape: tuple[int, ...] | None = None,
             schedule: str = "ddcm", prompt: str | None = None, guidance: float = 0.0,
             ccfg_subset: int | None = None, generator: str = "philox",
             progress: Progress | None = None) -> LatentResult:  # fmt: skip
    """Compressed generation; the indices are the image's code.

    Without `ccfg_subset`: a uniformly random atom per step (from the key), the
    network conditioned on `prompt` with classifier-free `guidance` if given
    (the decoder then needs the prompt). With `ccfg_subset` N and a `prompt`:
    compressed classifier-free guidance (DDCM's `generate_ccfg`): each step
    follows eps_uncond and picks, among N atoms drawn from the key, the one
    with the largest inner product with eps_uncond - eps_cond; the guidance is
    in the code, so `decompress` rebuilds the image without the prompt.

    `image_shape` (H, W, 3) defaults to the UNet's native size. `decompress` with
    rule "ddcm" and the same settings rebuilds it. For B samples pass B keys.
    """
    if image_shape is None:
        image_shape = (*native_size(model), 3)
    if ccfg_subset is not None and not (isinstance(ccfg_subset, int) and ccfg_subset >= 1):
        raise ValueError(f"ccfg_subset must be a positive number of atoms, got {ccfg_subset!r}")
    if ccfg_subset is not None and ccfg_subset > codebook_size:
        raise ValueError(f"ccfg_subset {ccfg_subset} is more atoms than the codebook's K = {codebook_size}")
    rule = Random() if ccfg_subset is None else GuidedSubset(int(ccfg_subset))
    spec = make_spec(steps=steps, codebook_size=codebook_size, image_hw=tuple(image_shape[:2]), rule=rule,
                     schedule=schedule, no_bits_steps=0, generator=generator)  # fmt: skip
    return encode(model, spec, None, key=key, image_shape=image_shape, prompt=prompt, guidance=guidance,
                  progress=progress)  # fmt: skip


def native_size(model: Any) -> tuple[int, int]:
    """(H, W) of the images the UNet was trained on (sample_size x the VAE's factor)."""
    side = model.config.unet.sample_size * model.config.downsampling_factor
    return side, side


def size_multiple(model: Any) -> int:
    """Image sides must be multiples of this: the VAE's factor x the UNet's downsampling."""
    return model.config.downsampling_factor * 2 ** (len(model.config.unet.block_out_channels) - 1)


def forward_bytes(model: Any, height: int, width: int) -> int:
    """A conservative estimate of the memory coding an (height, width) image takes: the VAE's widest
    full-resolution activations dominate (16 bytes per pixel and channel of its widest block)."""
    return 16 * max(model.config.vae.block_out_channels) * int(height) * int(width) + (256 << 20)


def _start(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T: normal(fold_in(key, 0)), as the pixel sampler draws it."""
    return jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)


def _explicit_codebook(codebook: Any, spec: CodeSpec, shape: tuple[int, ...]) -> Any:
    """Explicit codebooks (S, K, h, w, 4) for the S = code_rows noise-adding steps (None: from the key)."""
    if codebook is None:
        return None
    cb = jnp.asarray(codebook, jnp.float32)
    want = (spec.code_rows, spec.codebook_size, *shape)
    if cb.shape != want:
        raise ValueError(f"codebook must be (steps that carry bits, K, h, w, C) = {want}, got {cb.shape}")
    return cb
