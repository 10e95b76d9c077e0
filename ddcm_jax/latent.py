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

`LatentFamily` plugs this into the one sampler (`ddcm_jax.sampler`): one
`lax.scan` over the steps, batches `vmap`ped, shards through
`ddcm_jax.parallel`; the state is the latent, the rules' target the VAE
encoding, the image clamp(decode(x_0), -1, 1). Codebook step numbers count up
(i = 0 .. T-1, in run order), as the format addresses them.

Keys, as in the pixel sampler: fold_in(key, 0) x_T, fold_in(key, 1) the codebook
root (step i's atoms addressed by (i, k)), fold_in(key, 2) the rule's own keys.

Conditioning: the model's stored null-prompt embedding, or a prompt with
classifier-free guidance g: out = out(null) + g (out(prompt) - out(null)), on
the raw network output as the originals do.
"""

from __future__ import annotations

import abc
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import sampler
from ddcm_jax.family import Family, ddim
from ddcm_jax.pytree import pytree_dataclass, static_field
from ddcm_jax.respacing import (
    LATENT_SCHEDULES,
    TURBO_TIMESTEPS,
    ddcm_timesteps,
    latent_timesteps,
    no_bits_steps_heuristic,
    turbo_timesteps,
)
from ddcm_jax.sampler import CompressResult
from ddcm_jax.spec import CodeSpec, SpecError

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

# --- schedules (the timesteps live in `ddcm_jax.respacing`, JAX-free for the bitstream) -------------


class LatentSchedT(NamedTuple):
    """One step's values (scalars in the scan; (T,) arrays for a schedule), float32."""

    row: jax.Array  # place in run order, 0 .. T-1
    i: jax.Array  # step number addressing the step's codebook: the run order too, 0 .. T-1
    t: jax.Array  # timestep fed to the network
    sqrt_a: jax.Array  # sqrt(a_t)
    sqrt_1ma: jax.Array  # sqrt(1 - a_t)
    sqrt_ab_prev: jax.Array  # sqrt(a_prev)
    dir_coef: jax.Array  # sqrt(1 - a_prev - sigma^2)
    sigma: jax.Array
    alpha_bar_prev: jax.Array  # a_prev
    noisy: jax.Array  # bool: one of the first `coded_steps`, which add codebook noise
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
    noisy = np.arange(steps) < coded_steps
    return LatentSchedT(
        row=np.arange(steps, dtype=np.int32),
        i=np.arange(steps, dtype=np.int32),
        t=t.astype(np.int32),
        sqrt_a=np.sqrt(a),
        sqrt_1ma=np.sqrt(one - a),
        sqrt_ab_prev=np.sqrt(a_prev),
        dir_coef=np.sqrt(np.maximum(one - a_prev - sigma * sigma, 0)).astype(np.float32),
        sigma=sigma.astype(np.float32),
        alpha_bar_prev=a_prev,
        noisy=noisy,
        coded=noisy & (t >= lo) & (t <= hi),
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
    return ddim(x0_hat, eps_hat, s, noise)


# --- rate ---------------------------------------------------------------------------------------------


def payload_bits(spec: CodeSpec) -> int:
    """Bits of one image's code (no t_range): code_rows x the rule's bits per step (exact)."""
    return spec.payload_bits()


# --- the family -------------------------------------------------------------------------------------


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
    rule = probe.rule
    if no_bits_steps is None:
        no_bits_steps = rule.default_no_bits_steps(steps, codebook_size, *image_hw)
    if rule.codes_first_steps and t_range is not None:
        raise SpecError("t_range", f"{rule.code_name} codes its first steps; give no_bits_steps instead of t_range")
    return probe.replace(schedule=schedule or rule.own_schedule, no_bits_steps=no_bits_steps, t_range=t_range)


def _check_spec(spec: CodeSpec) -> None:
    if spec.schedule is None or spec.clip or spec.eta != 1.0 or spec.respacing:
        raise ValueError("a latent code needs a named schedule ('ddcm' or 'turbo'), clip=False, eta 1, no respacing")


@pytree_dataclass
class Cond:
    """What a latent run's steps are conditioned on (shared by a batch; a pytree).

    `context` (1, L, C): one prompt (the null prompt); (2, L, C): [null, prompt]
    with classifier-free guidance `guidance`. `edit`: text-based editing's
    context, followed from step `tskip` on. `ccfg`: compressed CFG, whose
    steps follow eps_uncond and whose rule aims at eps_uncond - eps_cond.
    """

    context: jax.Array
    guidance: jax.Array  # scalar float32 (unused with one context)
    edit: jax.Array | None = None
    tskip: jax.Array | None = None  # scalar int32
    ccfg: bool = static_field(False)


def _context(model: Any, prompt: str | None, guidance: float, ccfg: bool = False) -> jax.Array:
    null = jnp.asarray(model.null_prompt, jnp.float32)
    if not prompt:
        if guidance:
            raise ValueError("guidance needs a prompt")
        return null
    if not guidance and not ccfg:
        raise ValueError("a prompt conditions through classifier-free guidance: give guidance > 0 "
                         "(or generate with compressed CFG, `ccfg_subset`)")  # fmt: skip
    if ccfg and guidance:
        raise ValueError("compressed CFG generates (no image) from a prompt, without a guidance scale")
    return jnp.concatenate([null, jnp.asarray(model.encode_prompt([prompt]), jnp.float32)])


def latent_shape(model: Any, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(h, w, C) of the latent of an (H, W) image; H and W must be multiples of the VAE's factor."""
    f = model.config.downsampling_factor
    h, w = image_hw
    if h % f or w % f:
        raise ValueError(f"image sides must be multiples of {f} for this model, got {h}x{w}")
    return h // f, w // f, model.config.latent_channels


class LatentFamily(Family):
    """Latent diffusion (Stable Diffusion): the state is the VAE's latent, the network a text-conditioned
    UNet with epsilon or v prediction (`LatentDiffusionModel`)."""

    family = "sd"
    named_schedules = True
    restores = False
    config: Any

    @abc.abstractmethod
    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        """The UNet: x (B, h, w, C), t (B,) int, context (B, L, C') -> (B, h, w, C)."""

    @abc.abstractmethod
    def encode(self, images: jax.Array) -> jax.Array:
        """The VAE: images (B, H, W, 3) in [-1, 1] -> latents (B, h, w, C), mode x scaling factor."""

    @abc.abstractmethod
    def decode(self, latents: jax.Array) -> jax.Array:
        """The VAE decoder: latents (B, h, w, C) -> images (B, H, W, 3), unclamped."""

    def state_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(self, tuple(image_shape[-3:-1]))

    def native_size(self) -> tuple[int, int]:
        return native_size(self)

    def size_multiple(self) -> int:
        return size_multiple(self)

    def coding_side(self, policy: str) -> int:
        return native_size(self)[0]  # SD 2.1-base: 512

    def generation_side(self) -> int:
        return native_size(self)[0]

    def check_memory(self, height: int, width: int, budget: int) -> None:
        from ddcm_jax.memory import MemoryBudgetError, format_bytes

        need = forward_bytes(self, height, width)
        if need > budget:
            raise MemoryBudgetError(f"a {height}x{width} image needs about {format_bytes(need)} with this model "
                                    f"(budget {format_bytes(budget)}; set DDCM_MEMORY_LIMIT to change it)")  # fmt: skip

    def model_id(self) -> tuple[str, int, str]:
        sc = self.config.scheduler
        return sc.beta_schedule, sc.num_train_timesteps, "float32"

    def header_mismatch(self, h: Any) -> str | None:
        if h.spec.latent_schedule is None:
            return "a pixel-space code; this model is not one"
        sc, m = self.config.scheduler, h.model
        if (m.noise_schedule, m.num_timesteps) != (sc.beta_schedule, sc.num_train_timesteps):
            return (f"encoded with the {m.noise_schedule}/{m.num_timesteps} schedule, the model uses "
                    f"{sc.beta_schedule}/{sc.num_train_timesteps}")  # fmt: skip
        if h.task.class_label is not None:
            return "class labels belong to class-conditional pixel models"
        return None

    def complete_spec(self, spec: CodeSpec, image_hw: tuple[int, int], *, no_bits_steps: int | None = None,
                      schedule: str | None = None) -> CodeSpec:  # fmt: skip
        if spec.schedule is not None:
            if no_bits_steps not in (None, spec.no_bits_steps) or schedule not in (None, spec.schedule):
                raise ValueError("the spec already names its schedule and no-bits steps")
            return spec
        return make_spec(steps=spec.steps, codebook_size=spec.codebook_size, image_hw=tuple(image_hw),
                         rule=spec.rule, schedule=schedule, no_bits_steps=no_bits_steps, generator=spec.generator,
                         t_range=spec.t_range)  # fmt: skip

    def make_spec(self, *, image_hw: tuple[int, int], steps: int, codebook_size: int, rule: Any = "ddcm",
                  num_atoms: int = 1, coef_bits: int = 1, generator: str = "philox", eta: float = 1.0,
                  t_range: tuple[int, int] | None = None, clip: bool | None = None, schedule: str | None = None,
                  no_bits_steps: int | None = None, decoding: bool = False) -> CodeSpec:  # fmt: skip
        pixel_only = [n for n, bad in (("eta", eta != 1.0), ("clip", bool(clip))) if bad]
        if pixel_only:
            raise ValueError(f"{', '.join(pixel_only)}: not an option of latent (Stable Diffusion) models")
        return make_spec(steps=steps, codebook_size=codebook_size, image_hw=image_hw, num_atoms=num_atoms,
                         coef_bits=coef_bits, rule=rule, schedule=schedule, no_bits_steps=no_bits_steps,
                         generator=generator, t_range=t_range)  # fmt: skip

    def check_spec(self, spec: CodeSpec) -> None:
        _check_spec(spec)

    def schedule_xs(self, spec: CodeSpec, schedule: Any = None) -> LatentSchedT:
        if schedule is not None:
            raise ValueError("a latent code's timesteps are named by its spec ('ddcm' or 'turbo')")
        return latent_schedule(self.alphas_cumprod, self.final_alpha_cumprod, spec.steps, spec.schedule,
                               spec.code_rows, spec.t_range)  # fmt: skip

    def predict(self, x_t: Latent, out: Latent, s: LatentSchedT, spec: Any) -> tuple[Latent, Latent]:
        return predict(x_t, out, s, self.prediction_type)

    def combine(self, x_t: Latent, x0_hat: Latent, eps_hat: Latent, s: LatentSchedT, noise: Latent) -> Latent:
        return ddim(x0_hat, eps_hat, s, noise)  # (4)

    def make_conditioning(self, *, prompt: str | None = None, guidance: float = 0.0, ccfg: bool = False,
                          edit_prompt: str | None = None, tskip: int = 0) -> Cond:  # fmt: skip
        if ccfg and not prompt:
            raise ValueError("compressed CFG generates (no image) from a prompt, without a guidance scale")
        context = _context(self, prompt, guidance, ccfg)
        edit = None if edit_prompt is None else _context(self, edit_prompt, guidance)
        if edit is not None and edit.shape != context.shape:
            raise ValueError("text-based editing needs a code conditioned on a prompt with guidance")
        return Cond(context, jnp.float32(guidance), edit, None if edit is None else jnp.int32(tskip), ccfg)

    def conditioning(self, shared: Cond, class_label: Any) -> Cond:
        if class_label is not None:
            raise ValueError("class_label: class labels belong to class-conditional pixel models; give a prompt")
        return shared

    def denoise(self, x_t: Latent, s: LatentSchedT, cond: Cond) -> tuple[Latent, Latent | None]:
        """The UNet on one latent: one batch-1 call per context, as a decoder without the prompt makes it
        (compressed CFG's unconditional output), or [null, prompt] in one call, guided on the raw output."""
        context = cond.context
        if cond.edit is not None:  # text-based editing: the destination prompt from step tskip on
            context = jnp.where(s.row >= cond.tskip, cond.edit, context)
        t1 = jnp.full((1,), s.t, jnp.int32)
        if cond.ccfg:
            out_u = self(x_t[None], t1, context[:1])[0]
            return out_u, out_u - self(x_t[None], t1, context[1:])[0]
        n = context.shape[0]
        outs = self(jnp.broadcast_to(x_t, (n, *x_t.shape)), jnp.full((n,), s.t, jnp.int32), context)
        return (outs[0] if n == 1 else outs[0] + cond.guidance * (outs[1] - outs[0])), None

    def to_target(self, image: LatentImage) -> Latent:
        return self.encode(image[None])[0]

    def to_image(self, x_0: Latent) -> LatentImage:
        return jnp.clip(self.decode(x_0[None])[0], -1.0, 1.0)


LatentResult = CompressResult  # one result type for every family


def encode(model: LatentFamily, spec: CodeSpec, image: LatentImage | None, **kw: Any) -> CompressResult:
    """`ddcm_jax.sampler.encode` (kept for callers of the latent module)."""
    return sampler.encode(model, spec, image, **kw)


def decode(model: LatentFamily, spec: CodeSpec, indices: Any, coeffs: Any = None, **kw: Any) -> CompressResult:
    """`ddcm_jax.sampler.decode_result`: the latent and the image of a code."""
    return sampler.decode_result(model, spec, indices, coeffs, **kw)


compress = sampler.compress
decompress = sampler.decompress
generate = sampler.generate


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
