"""Turbo-DDCM on FLUX.1 (rectified flow), as the original computes it (AmitVaisman/Turbo-DDCM, 77353e4).

FLUX predicts a velocity in the flow x_flow = (1 - sigma) x0 + sigma eps. Turbo-DDCM
runs the DDCM loop in the variance-preserving (DDPM) space instead, converting at
every step. With sigma = t / 1000 (no resolution shift) and a_t = alpha_bar_t:

  (1) snr     = (1 - sigma) / sigma                         amplitude signal-to-noise
  (2) a_t     = snr^2 / (1 + snr^2),  factor = sqrt(1 - a_t) / (1 / (snr + 1))
  (3) v       = transformer(x_t / factor, t / 1000, guidance 1)
  (4) x0_flow = x_t / factor - (1 / (snr + 1)) v
  (5) eps_hat = (x_t - sqrt(a_t) x0_flow) / sqrt(1 - a_t)
  (6) x0_hat  = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)   (recomputed from eps: not x0_flow's bits)
  (7) coded steps, the DDPM posterior (Ho et al., eq. 7), with a = a_t / a_prev, b = 1 - a:
        x_prev = sqrt(a_prev) b / (1 - a_t) x0_hat + sqrt(a) (1 - a_prev) / (1 - a_t) x_t
                 + sqrt((1 - a_prev) / (1 - a_t) b) z
      no-bits steps, DDIM with eta 0:  x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat

Every scalar is computed in float64 and rounded to float32 where it meets an array,
in the original's order of operations; (7) is `FluxFamily.combine`, the one place
where FLUX departs from the DDIM combination of the other families.

The state is the VAE latent (h, w, C) NHWC, h = H / 8 (C = 16 for FLUX.1); the
transformer sees it as packed 2x2 patches (`pack`), tokens row-major over the
(h/2, w/2) grid, feature c*4 + dy*2 + dx, with `img_ids` (0, row, column). The
rules' target is (mode - shift) x scale of the image, the image the VAE decoding
of latent / scale + shift, NOT clamped (the PNG writer clamps).

Timesteps: Turbo-DDCM's list (`respacing.TURBO_TIMESTEPS`) sampled to T, t_prev the
next entry, 0 after the last (a_prev = 1 there: the last step returns x0_hat).
"""

from __future__ import annotations

import abc
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax.family import Family
from ddcm_jax.pytree import pytree_dataclass
from ddcm_jax.respacing import turbo_timesteps
from ddcm_jax.spec import CodeSpec

__all__ = ["FluxCond", "FluxFamily", "FluxSchedT", "flux_schedule", "img_ids", "pack", "unpack"]

Latent = Annotated[jax.Array, "h w C float32"]
Tokens = Annotated[jax.Array, "*B N 4C float32"]

NOISE_SCHEDULE = "flow"  # what a file header records for this family's process
SCHEDULE = "turbo"  # the only timestep list the original runs FLUX with


# --- packing: the transformer's token layout -----------------------------------------------------


def pack(z: Annotated[jax.Array, "*B h w C"]) -> Tokens:
    """(..., h, w, C) -> (..., h/2 * w/2, 4C): 2x2 patches, row-major, feature c*4 + dy*2 + dx
    (diffusers' `FluxPipeline._pack_latents` on the NCHW latent)."""
    *b, h, w, c = z.shape
    z = z.reshape(*b, h // 2, 2, w // 2, 2, c)
    n = len(b)
    z = jnp.transpose(z, (*range(n), n, n + 2, n + 4, n + 1, n + 3))  # (.., h/2, w/2, C, dy, dx)
    return z.reshape(*b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: Tokens, h: int, w: int) -> Annotated[jax.Array, "*B h w C"]:
    """The inverse of `pack` for an (h, w) latent."""
    *b, _, f = tokens.shape
    c = f // 4
    z = tokens.reshape(*b, h // 2, w // 2, c, 2, 2)
    n = len(b)
    z = jnp.transpose(z, (*range(n), n, n + 3, n + 1, n + 4, n + 2))  # (.., h/2, dy, w/2, dx, C)
    return z.reshape(*b, h, w, c)


def img_ids(h: int, w: int) -> np.ndarray:
    """(h/2 * w/2, 3) float32 (0, patch row, patch column): the image tokens' rotary positions."""
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    return np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(np.float32)


def _div(x: jax.Array, d: jax.Array) -> jax.Array:
    """x / d, a true float32 division as the original's. XLA rewrites a division by a broadcast
    scalar into a multiplication by its reciprocal (measured: 629 of 4096 flow latents 1 ulp off);
    a materialised divisor behind a barrier keeps the division."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(d, x.shape))


# --- the schedule --------------------------------------------------------------------------------


class FluxSchedT(NamedTuple):
    """One step's values (scalars in the scan; (T,) arrays for a schedule); float32 unless noted."""

    row: jax.Array  # int32 place in run order, 0 .. T-1
    i: jax.Array  # int32 step number addressing the codebook (run order)
    t: jax.Array  # int32 timestep
    t_model: jax.Array  # t / 1000 as the transformer takes it (float32 division of the integer)
    factor: jax.Array  # (2): DDPM latent / flow latent
    flow_sigma: jax.Array  # 1 / (snr + 1): the flow's sigma
    sqrt_a: jax.Array  # sqrt(a_t)
    sqrt_1ma: jax.Array  # sqrt(1 - a_t)
    c_x0: jax.Array  # (7) posterior coefficient of x0_hat (coded steps)
    c_xt: jax.Array  # (7) posterior coefficient of x_t (coded steps)
    sigma: jax.Array  # (7) posterior std on coded steps, 0 on the others
    sqrt_ab_prev: jax.Array  # sqrt(a_prev) (DDIM steps)
    dir_coef: jax.Array  # sqrt(1 - a_prev) (DDIM steps)
    alpha_bar_prev: jax.Array  # a_prev
    noisy: jax.Array  # bool: one of the first `coded_steps` (codebook noise, the posterior)
    coded: jax.Array  # bool: a selecting step inside t_range


def _alpha(t: int) -> tuple[float, float]:
    """(snr, alpha_prod) in float64 for an integer timestep (t = 0: snr inf, alpha 1)."""
    if t == 0:
        return float("inf"), 1.0
    sigma = np.arange(1000, dtype=np.float64)[t] / 1000  # the original indexes np.arange(1000) / 1000
    snr = (1 - sigma) / sigma  # (1)
    return float(snr), float(snr**2 / (1 + snr**2))  # (2)


def flux_schedule(steps: int, coded_steps: int, t_range: tuple[int, int] | None = None) -> FluxSchedT:
    """Per-step values in run order (float64 arithmetic rounded once to float32, as the original)."""
    t, t_prev = turbo_timesteps(steps)
    cols: dict[str, list[float]] = {k: [] for k in FluxSchedT._fields[3:-2]}
    f32 = np.float32
    for j, (tj, tp) in enumerate(zip(t.tolist(), t_prev.tolist(), strict=True)):
        snr, a = _alpha(tj)
        _, a_prev = _alpha(tp)
        b_t, b_prev = 1 - a, 1 - a_prev
        alpha_cumprod = snr**2 / (snr**2 + 1)  # `get_ot_flow_to_ddpm_factor` spells it this way
        cur_a = a / a_prev
        cur_b = 1 - cur_a
        coded = j < coded_steps
        cols["t_model"].append(f32(tj) / f32(1000))
        cols["factor"].append(np.sqrt(1 - alpha_cumprod) / (1 / (snr + 1)))
        cols["flow_sigma"].append(1 / (snr + 1))
        cols["sqrt_a"].append(np.sqrt(a))
        cols["sqrt_1ma"].append(np.sqrt(b_t))
        cols["c_x0"].append(np.sqrt(a_prev) * cur_b / b_t)
        cols["c_xt"].append(np.sqrt(cur_a) * b_prev / b_t)
        cols["sigma"].append(np.sqrt((1 - a_prev) / (1 - a) * cur_b) if coded else 0.0)
        cols["sqrt_ab_prev"].append(np.sqrt(a_prev))
        cols["dir_coef"].append(np.sqrt(b_prev))
        cols["alpha_bar_prev"].append(a_prev)
    lo, hi = (0, 999) if t_range is None else t_range
    noisy = np.arange(steps) < coded_steps
    return FluxSchedT(
        row=np.arange(steps, dtype=np.int32),
        i=np.arange(steps, dtype=np.int32),
        t=t.astype(np.int32),
        **{k: np.asarray(v, np.float64).astype(np.float32) for k, v in cols.items()},
        noisy=noisy,
        coded=noisy & (t >= lo) & (t <= hi),
    )


# --- conditioning --------------------------------------------------------------------------------


@pytree_dataclass
class FluxCond:
    """What every step is conditioned on: T5's states (1, L, d), CLIP's pooled output (1, d'),
    and the distilled guidance value (None for a model without a guidance embedding)."""

    context: jax.Array
    pooled: jax.Array
    guidance: jax.Array | None


# --- the family ----------------------------------------------------------------------------------


class FluxFamily(Family):
    """FLUX.1 (dev- or schnell-style): a rectified-flow transformer on packed VAE latents
    (`FluxModel` of `ddcm_jax.flux_model`), coded with Turbo-DDCM's conversion to DDPM space."""

    family = "flux"
    named_schedules = True
    restores = False
    config: Any

    @abc.abstractmethod
    def transformer(self, hidden_states: Tokens, timestep: jax.Array, guidance: jax.Array | None,
                    encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                    txt_ids: jax.Array, img_ids: Any) -> Tokens:  # fmt: skip
        """The velocity (B, N, 4C) of packed tokens (B, N, 4C), diffusers' argument meanings."""

    @abc.abstractmethod
    def encode(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] -> (B, h, w, C): (mode - shift) x scale."""

    @abc.abstractmethod
    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, C) -> (B, H, W, 3): the VAE decoding of latents / scale + shift, unclamped."""

    @abc.abstractmethod
    def encode_prompt(self, prompts: Any) -> tuple[jax.Array, jax.Array]:
        """(T5 last hidden state (B, L, d), CLIP pooled output (B, d')) of prompts."""

    @property
    @abc.abstractmethod
    def null_conditioning(self) -> tuple[jax.Array, jax.Array]:
        """`encode_prompt("")` as stored at conversion: ((1, L, d), (1, d'))."""

    @property
    @abc.abstractmethod
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes a guidance value (FLUX.1-dev) or not (schnell)."""

    # -- geometry ----------------------------------------------------------------------------------

    def _factor(self) -> int:
        return self.config.vae.downsampling_factor

    def state_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        h, w = tuple(image_shape[-3:-1])
        m = self.size_multiple()
        if h % m or w % m:
            raise ValueError(f"image sides must be multiples of {m} for this model, got {h}x{w}")
        f = self._factor()
        return h // f, w // f, self.config.vae.latent_channels

    def native_size(self) -> tuple[int, int]:
        side = self.config.native_side
        return side, side

    def size_multiple(self) -> int:
        return 2 * self._factor()  # 2x2 patches of the latent

    def coding_side(self, policy: str) -> int:
        return self.config.native_side

    def generation_side(self) -> int:
        return self.config.native_side

    def check_memory(self, height: int, width: int, budget: int) -> None:
        from ddcm_jax.memory import MemoryBudgetError, format_bytes

        need = self.forward_bytes(height, width)
        if need > budget:
            raise MemoryBudgetError(f"a {height}x{width} image needs about {format_bytes(need)} with this model "
                                    f"(budget {format_bytes(budget)}; set DDCM_MEMORY_LIMIT to change it)")  # fmt: skip

    def forward_bytes(self, height: int, width: int) -> int:
        """A conservative estimate of the activations one image takes: the VAE's widest
        full-resolution maps, or the transformer's tokens and one head's attention scores."""
        vae = 16 * max(self.config.vae.block_out_channels) * int(height) * int(width)
        tr = self.config.transformer
        f = self._factor()
        tokens = (height // (2 * f)) * (width // (2 * f)) + self.config.prompt_length_t5
        net = 4 * tokens * (tokens + 16 * tr.inner_dim)
        return max(vae, net) + (256 << 20)

    def model_id(self) -> tuple[str, int, str]:
        return NOISE_SCHEDULE, 1000, self.config.transformer.compute_dtype

    def header_mismatch(self, h: Any) -> str | None:
        m = h.model
        if m.noise_schedule != NOISE_SCHEDULE or h.spec.latent_schedule is None:
            return f"encoded for a {m.noise_schedule}/{m.num_timesteps} model; this is a FLUX (rectified flow) model"
        if h.spec.latent_schedule != SCHEDULE:
            return f"schedule {h.spec.latent_schedule!r}; FLUX codes use Turbo-DDCM's {SCHEDULE!r}"
        if h.task.class_label is not None:
            return "class labels belong to class-conditional pixel models"
        return None

    # -- the process -------------------------------------------------------------------------------

    def complete_spec(self, spec: CodeSpec, image_hw: tuple[int, int], *, no_bits_steps: int | None = None,
                      schedule: str | None = None) -> CodeSpec:  # fmt: skip
        if spec.schedule is not None:
            if no_bits_steps not in (None, spec.no_bits_steps) or schedule not in (None, spec.schedule):
                raise ValueError("the spec already names its schedule and no-bits steps")
            return spec
        return self.make_spec(image_hw=tuple(image_hw), steps=spec.steps, codebook_size=spec.codebook_size,
                              rule=spec.rule, generator=spec.generator, t_range=spec.t_range, schedule=schedule,
                              no_bits_steps=no_bits_steps)  # fmt: skip

    def make_spec(self, *, image_hw: tuple[int, int], steps: int, codebook_size: int, rule: Any = "turbo",
                  num_atoms: int = 1, coef_bits: int = 1, generator: str = "philox", eta: float = 1.0,
                  t_range: tuple[int, int] | None = None, clip: bool | None = None, schedule: str | None = None,
                  no_bits_steps: int | None = None, decoding: bool = False) -> CodeSpec:  # fmt: skip
        from ddcm_jax import latent

        pixel_only = [n for n, bad in (("eta", eta != 1.0), ("clip", bool(clip))) if bad]
        if pixel_only:
            raise ValueError(f"{', '.join(pixel_only)}: not an option of FLUX models")
        if schedule not in (None, SCHEDULE):
            raise ValueError(f"schedule {schedule!r}: FLUX models run Turbo-DDCM's {SCHEDULE!r} timesteps")
        return latent.make_spec(steps=steps, codebook_size=codebook_size, image_hw=image_hw, num_atoms=num_atoms,
                                coef_bits=coef_bits, rule=rule, schedule=SCHEDULE, no_bits_steps=no_bits_steps,
                                generator=generator, t_range=t_range)  # fmt: skip

    def check_spec(self, spec: CodeSpec) -> None:
        if spec.schedule != SCHEDULE or spec.clip or spec.eta != 1.0 or spec.respacing:
            raise ValueError(f"a FLUX code needs the {SCHEDULE!r} schedule, clip=False, eta 1, no respacing")

    def schedule_xs(self, spec: CodeSpec, schedule: Any = None) -> FluxSchedT:
        if schedule is not None:
            raise ValueError("a FLUX code's timesteps are named by its spec ('turbo')")
        return flux_schedule(spec.steps, spec.code_rows, spec.t_range)

    def predict(self, x_t: Latent, out: Latent, s: FluxSchedT, spec: Any) -> tuple[Latent, Latent]:
        x0_flow = _div(x_t, s.factor) - s.flow_sigma * out  # (4)
        eps_hat = _div(x_t - s.sqrt_a * x0_flow, s.sqrt_1ma)  # (5)
        return _div(x_t - s.sqrt_1ma * eps_hat, s.sqrt_a), eps_hat  # (6)

    def combine(self, x_t: Latent, x0_hat: Latent, eps_hat: Latent, s: FluxSchedT, noise: Latent) -> Latent:
        # Two branches of a cond, each compiled on its own: the same arithmetic in an encoder
        # and a decoder (a `where` over both lets XLA fuse, and round, differently in each).
        return jax.lax.cond(
            s.noisy,
            lambda: (s.c_x0 * x0_hat + s.c_xt * x_t) + s.sigma * noise,  # (7), coded
            lambda: s.sqrt_ab_prev * x0_hat + s.dir_coef * eps_hat,  # (7), no bits
        )

    # -- the network -------------------------------------------------------------------------------

    def make_conditioning(self, *, prompt: str | None = None, guidance: float = 0.0, ccfg: bool = False,
                          edit_prompt: str | None = None, tskip: int = 0) -> FluxCond:  # fmt: skip
        if ccfg or edit_prompt is not None:
            raise ValueError("compressed CFG and text-based editing are options of Stable Diffusion models")
        if guidance and not self.guidance_embeds:
            raise ValueError("guidance: this FLUX model has no guidance embedding (schnell-style)")
        if guidance and not prompt:
            raise ValueError("guidance needs a prompt (the empty prompt runs at the original's guidance 1)")
        context, pooled = self.null_conditioning if not prompt else self.encode_prompt([prompt])
        g = jnp.float32(guidance or 1.0) if self.guidance_embeds else None  # the original passes 1
        return FluxCond(jnp.asarray(context, jnp.float32), jnp.asarray(pooled, jnp.float32), g)

    def conditioning(self, shared: FluxCond, class_label: Any) -> FluxCond:
        if class_label is not None:
            raise ValueError("class_label: class labels belong to class-conditional pixel models; give a prompt")
        return shared

    def denoise(self, x_t: Latent, s: FluxSchedT, cond: FluxCond) -> tuple[Latent, None]:
        h, w, _ = x_t.shape
        tokens = pack(_div(x_t, s.factor))[None]  # (3): the flow latent
        txt_ids = np.zeros((cond.context.shape[1], 3), np.float32)
        g = None if cond.guidance is None else cond.guidance[None]
        v = self.transformer(tokens, s.t_model[None], g, cond.context, cond.pooled, txt_ids, img_ids(h, w))
        return unpack(v[0], h, w), None

    def to_target(self, image: jax.Array) -> Latent:
        return self.encode(image[None])[0]

    def to_image(self, x_0: Latent) -> jax.Array:
        return self.decode(x_0[None])[0]  # unclamped, as the original's decode_img
