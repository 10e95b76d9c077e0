"""What a model family is to the one sampler (`ddcm_jax.sampler`).

A family knows its network, its encoder/decoder (pixels: none; latents: the
VAE), its prediction type and its schedule. The sampler knows none of them by
name: every step of every family is

    out, aim       = family.denoise(x_t, s, cond)          the network (aim: a rule's
                                                            own target, e.g. compressed CFG)
    x0_hat, eps_hat = family.predict(x_t, out, s, spec)    the prediction type
    x_prev         = family.combine(x_t, x0_hat, eps_hat, s, z)

with z the rule's codebook noise on the steps that carry bits and 0 on the
others. ADM and Stable Diffusion combine by DDIM (eq. 12, `ddim`):
x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z;
FLUX (`ddcm_jax.flux`) by the DDPM posterior on its coded steps, as Turbo-DDCM does. `s` is one row of the family's `schedule_xs(spec, ...)`: a pytree of
(T,) arrays in run order that holds at least the fields of `StepFields`.

Abstract/final in the equinox style: `PixelFamily` (`ddcm_jax.pixel`) and
`LatentFamily` (`ddcm_jax.latent`) implement every method; the loaded model
classes (`DiffusionModel`, `LatentDiffusionModel`) are final. Nothing
dispatches on attributes: a model is a family by subclassing.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax

__all__ = ["Family", "StepFields", "ddim", "step"]


class StepFields(NamedTuple):
    """The fields every family's per-step schedule row has (documentation of the contract)."""

    row: jax.Array  # int32: the step's place in run order, 0 .. T-1 (its row in the code)
    i: jax.Array  # int32: the step number that addresses its codebook (the format's numbering)
    t: jax.Array  # int32: the timestep fed to the network
    sqrt_ab_prev: jax.Array  # sqrt(alpha_bar_prev)
    dir_coef: jax.Array  # sqrt(1 - alpha_bar_prev - sigma^2)
    sigma: jax.Array
    alpha_bar_prev: jax.Array
    noisy: jax.Array  # bool: the step adds codebook noise (it has a row in the code)
    coded: jax.Array  # bool: the rule chooses (noisy and inside t_range); else its idle code


def ddim(x0_hat: jax.Array, eps_hat: jax.Array, s: Any, noise: jax.Array) -> jax.Array:
    """DDIM, eq. 12: x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z."""
    return s.sqrt_ab_prev * x0_hat + s.dir_coef * eps_hat + s.sigma * noise


def step(family: Family, x_t: jax.Array, out: jax.Array, s: Any, noise: jax.Array, spec: Any) -> jax.Array:
    """x_prev of one state from the network's output and the step's noise.

    Codebook, random and zero noise take this one path, for every family.
    """
    x0_hat, eps_hat = family.predict(x_t, out, s, spec)
    return family.combine(x_t, x0_hat, eps_hat, s, noise)


class Family(abc.ABC):
    """A model family: the network, the process and the image <-> state maps (single examples)."""

    family: str  # the name model.json carries ("adm", "sd")
    named_schedules: bool  # codes name their timesteps ("ddcm", "turbo"): the header's latent block
    restores: bool  # restoration tasks (operators on images) run on this family

    # -- geometry -------------------------------------------------------------------------------

    @abc.abstractmethod
    def state_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(h, w, C) of x_t for one (H, W, 3) image (refuses sizes the family cannot code)."""

    @abc.abstractmethod
    def native_size(self) -> tuple[int, int]:
        """(H, W) of the images the network was made for (generation's default)."""

    @abc.abstractmethod
    def size_multiple(self) -> int:
        """Image sides must be multiples of this."""

    @abc.abstractmethod
    def coding_side(self, policy: str) -> int:
        """The side `images.coded_size` scales to by default under a size `policy`."""

    @abc.abstractmethod
    def generation_side(self) -> int:
        """The side of the squares `generate` makes by default."""

    @abc.abstractmethod
    def check_memory(self, height: int, width: int, budget: int) -> None:
        """Raise `MemoryBudgetError` (one line, what it needs) unless coding such an image fits `budget`."""

    @abc.abstractmethod
    def model_id(self) -> tuple[str, int, str]:
        """(noise schedule name, its number of timesteps, compute dtype): what a file header records."""

    @abc.abstractmethod
    def header_mismatch(self, header: Any) -> str | None:
        """Why this model cannot decode a file with `header` (its family's settings), or None."""

    @abc.abstractmethod
    def complete_spec(self, spec: Any, image_hw: tuple[int, int], *, no_bits_steps: int | None = None,
                      schedule: str | None = None) -> Any:  # fmt: skip
        """A spec as the command line builds it completed with this family's settings for `image_hw` images."""

    # -- the process ------------------------------------------------------------------------------

    @abc.abstractmethod
    def make_spec(self, *, image_hw: tuple[int, int], steps: int, codebook_size: int, rule: Any = "ddcm",
                  num_atoms: int = 1, coef_bits: int = 1, generator: str = "philox", eta: float = 1.0,
                  t_range: tuple[int, int] | None = None, clip: bool | None = None, schedule: str | None = None,
                  no_bits_steps: int | None = None, decoding: bool = False) -> Any:  # fmt: skip
        """The `CodeSpec` of the keyword forms (`compress`, `decompress`, ...), with this family's
        defaults; `decoding`: a rule name is the one a decoder replays."""

    @abc.abstractmethod
    def check_spec(self, spec: Any) -> None:
        """Refuse, in one line, a `CodeSpec` setting this family does not run."""

    @abc.abstractmethod
    def schedule_xs(self, spec: Any, schedule: Any = None) -> Any:
        """Per-step values in run order (the scan's xs): (T,) arrays with the `StepFields` and the
        family's own prediction coefficients. `schedule` overrides the family's default, where it has one."""

    @abc.abstractmethod
    def predict(self, x_t: jax.Array, out: jax.Array, s: Any, spec: Any) -> tuple[jax.Array, jax.Array]:
        """(x0_hat, eps_hat) of one state from the network's raw output (the prediction type)."""

    @abc.abstractmethod
    def combine(self, x_t: jax.Array, x0_hat: jax.Array, eps_hat: jax.Array, s: Any, noise: jax.Array) -> jax.Array:
        """x_prev from the prediction and the step's noise z (`ddim` for ADM and Stable Diffusion)."""

    # -- the network ------------------------------------------------------------------------------

    @abc.abstractmethod
    def conditioning(self, shared: Any, class_label: Any) -> Any:
        """One image's conditioning from the shared part (prompts: `make_conditioning`) and its label."""

    @abc.abstractmethod
    def make_conditioning(self, *, prompt: str | None = None, guidance: float = 0.0, ccfg: bool = False,
                          edit_prompt: str | None = None, tskip: int = 0) -> Any:  # fmt: skip
        """The conditioning a whole call shares (a pytree, or None); refuses what the family has not."""

    @abc.abstractmethod
    def denoise(self, x_t: jax.Array, s: Any, cond: Any) -> tuple[jax.Array, jax.Array | None]:
        """(out, aim): the output the step follows for one state (h, w, C), and a rule's own target
        (compressed CFG's eps_uncond - eps_cond) or None."""

    # -- images <-> states ------------------------------------------------------------------------

    @abc.abstractmethod
    def to_target(self, image: jax.Array) -> jax.Array:
        """The state the rules aim at for one image (H, W, 3) in [-1, 1]."""

    @abc.abstractmethod
    def to_image(self, x_0: jax.Array) -> jax.Array:
        """One image (H, W, 3) in [-1, 1] from the final state."""
