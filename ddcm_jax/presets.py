"""Operating points and the settings checks of the `ddcm` commands, as plain functions (no argparse).

    steps, k, m, size = resolve("compress", quality="high", policy="fit")  # the level's T, K, M, coding size
    spec = code_spec(latent=False, steps=steps, codebook_size=k, rule="turbo", num_atoms=m)

The presets were measured on the Kodak images with the packaged model (README
"Quality levels"). Every check raises `PresetError` (a ValueError) with the
message the command line prints as its usage error, the flag named first.
Importing this module imports no JAX (the command line reads the presets for
its --help); the functions that build a spec import it when called.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = [
    "DDCM_RESTORE",
    "DEFAULT_K",
    "DEFAULT_QUALITY",
    "DEFAULT_STEPS",
    "LATENT_DEFAULTS",
    "QUALITY",
    "QUALITY_COMMANDS",
    "RESTORE_DEFAULTS",
    "SPEC_FLAGS",
    "PresetError",
    "Resolved",
    "check_family_options",
    "check_targets",
    "check_task",
    "code_spec",
    "psnr_start_atoms",
    "resolve",
]

DEFAULT_STEPS, DEFAULT_K = 50, 1024  # generate's (and an explicit --rule ddcm's) steps; every command's K

# `compress` / `roundtrip` operating points (turbo, K = 1024), measured on the Kodak images with the
# packaged model (README "Quality levels"): the coding size (fit policy), steps and atoms per step.
QUALITY = {
    "low": {"size": 160, "steps": 20, "atoms": 128},
    "medium": {"size": 192, "steps": 30, "atoms": 128},
    "high": {"size": 256, "steps": 40, "atoms": 64},
}
DEFAULT_QUALITY = "medium"
QUALITY_COMMANDS = ("compress", "roundtrip", "edit")  # the commands with quality levels (--quality)
# `restore`: per task (coding size, steps, K), chosen so that the result agrees with the measurement.
RESTORE_DEFAULTS = {
    "colorization": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
    "super-resolution": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
    "inpainting": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
    "blur": {"size": 192, "steps": 30, "codebook_size": 1024, "atoms": 128},
}
# `restore --rule ddcm`: one atom per step (the DDCM paper's rule) needs many steps.
DDCM_RESTORE = {"steps": 100, "codebook_size": 256, "atoms": 1}
# Latent (Stable Diffusion) models: Turbo-DDCM's K, at T = 20 with M = 20 (its no-bits steps from its
# heuristic at the coded size); --rule ddcm keeps the original latent DDCM's T and K as given.
LATENT_DEFAULTS = {"steps": 20, "codebook_size": 16384, "atoms": 20}

# The flag that sets each CodeSpec field, for its messages.
SPEC_FLAGS = {"steps": "--steps", "codebook_size": "--codebook-size", "num_atoms": "--atoms",
              "coef_bits": "--coef-bits", "eta": "--eta", "t_range": "--t-range", "generator": "--generator",
              "rule": "--rule", "schedule": "--schedule", "no_bits_steps": "--no-bits-steps"}  # fmt: skip


class PresetError(ValueError):
    """Settings that do not go together; the message names the flag (the command line's usage error)."""


class Resolved(NamedTuple):
    """The settings after `resolve`: the given ones, the others from the preset."""

    steps: int | None
    codebook_size: int | None
    atoms: int
    size: int | None


def rate_knob(rule: str | None) -> str | None:
    """What a --rule flag's targets turn (`Code.rate_knob` of the rule `make_rule` makes of it)."""
    from ddcm_jax.selection import make_rule

    return make_rule(rule or "turbo").rate_knob


def resolve(command: str, *, latent: bool = False, rule: str = "turbo", quality: str | None = None,
            task: str | None = None, steps: int | None = None, codebook_size: int | None = None,
            atoms: int | None = None, size: int | None = None, policy: str | None = None) -> Resolved:  # fmt: skip
    """Fill the settings left None from the quality level (`QUALITY_COMMANDS`), the task (restore) or,
    for a latent model (`latent`: its family names its schedules), `LATENT_DEFAULTS`; other
    commands (generate) get `DEFAULT_STEPS` and `DEFAULT_K`. The coding size comes from the
    preset under the fit policy only."""
    knob = rate_knob(rule)
    if latent:
        if task is not None:
            raise PresetError("restore runs on pixel-space models; latent models compress and generate")
        if quality is not None:
            raise PresetError("--quality levels are the pixel model's; with a latent model give -T, -K, -M")
        preset = dict(LATENT_DEFAULTS)
        if knob != "atoms" or command == "generate":  # one atom per step
            preset["atoms"] = 1
    elif task is not None:
        if task not in RESTORE_DEFAULTS:
            raise PresetError(f"unknown task {task!r} ({', '.join(RESTORE_DEFAULTS)})")
        preset = dict(RESTORE_DEFAULTS[task])
        if knob == "codebook_size":  # DDCM's single-atom rule: its own (slower, weaker) operating point
            if atoms not in (None, 1):
                raise PresetError("restore --rule ddcm codes one atom per step; -M is turbo's")
            preset.update(DDCM_RESTORE)
    elif command in QUALITY_COMMANDS:
        if (quality or DEFAULT_QUALITY) not in QUALITY:
            raise PresetError(f"unknown quality level {quality!r} ({', '.join(QUALITY)})")
        preset = dict(QUALITY[quality or DEFAULT_QUALITY])
        preset["codebook_size"] = DEFAULT_K
        if knob != "atoms":  # the levels are turbo's; DDCM / matching pursuit keep the classic defaults
            if quality is not None:
                raise PresetError("--quality sets turbo's operating points; with --rule ddcm give -T, -K, -M")
            preset = {"steps": DEFAULT_STEPS, "codebook_size": DEFAULT_K, "atoms": 1}
    else:
        preset = {"steps": DEFAULT_STEPS, "codebook_size": DEFAULT_K}
    if policy is not None and size is None and policy == "fit":
        size = preset.get("size")
    if size is not None and size < 1:
        raise PresetError("--size must be a positive number of pixels")
    return Resolved(preset.get("steps") if steps is None else steps,
                    preset.get("codebook_size") if codebook_size is None else codebook_size,
                    preset.get("atoms", 1) if atoms is None else atoms, size)  # fmt: skip


def check_targets(*, rule: str = "turbo", psnr: float | None = None, bpp: float | None = None,
                  atoms: int | None = None, codebook_size: int | None = None,
                  no_bits_steps: int | None = None) -> None:  # fmt: skip
    """A quality target (`psnr`, dB) or a rate target (`bpp`) and the knobs it turns, given too: refused."""
    knob = rate_knob(rule)
    if psnr is not None:
        if bpp is not None:
            raise PresetError("--psnr and --bpp: give one target")
        if not (math.isfinite(psnr) and psnr > 0):
            raise PresetError("--psnr must be a positive number of dB")
        if knob == "atoms" and atoms is not None:
            raise PresetError("--psnr searches turbo's -M; give one or the other")
        if knob == "codebook_size" and (codebook_size is not None or atoms not in (None, 1)):
            raise PresetError("--psnr searches ddcm's -K; give one or the other (matching pursuit: no --psnr)")
    if bpp is not None:
        if not (math.isfinite(bpp) and bpp > 0):
            raise PresetError("--bpp must be a positive number of bits per pixel")
        if knob == "atoms" and (atoms is not None or no_bits_steps is not None):
            raise PresetError("--bpp picks turbo's -M (and no-bits steps); give one or the other")
        if knob == "codebook_size" and (codebook_size is not None or atoms not in (None, 1)):
            raise PresetError("--bpp picks ddcm's -K and -T; give one or the other (matching pursuit: no --bpp)")


def psnr_start_atoms(atoms: int, codebook_size: int) -> int:
    """Where turbo's quality target starts (`rate.search`): the level's M, down to a point of the ladder
    (powers of two up to K / 2, `rate.ladder`)."""
    from ddcm_jax.selection import MAX_TURBO_ATOMS

    top = min(max(1, codebook_size // 2), MAX_TURBO_ATOMS)
    return min(1 << (max(1, atoms).bit_length() - 1), top)


def check_family_options(*, latent: bool, command: str, eta: float = 1.0, class_label: int | None = None,
                         prompt: str | None = None, guidance: float | None = None, ccfg_subset: int | None = None,
                         no_bits_steps: int | None = None, schedule: str | None = None,
                         cfg_prompts: bool = True) -> None:  # fmt: skip
    """Latent-only options with a pixel model, and pixel-only ones with a latent model: refused.
    `cfg_prompts`: the family conditions on a prompt through classifier-free guidance (Stable
    Diffusion: --prompt needs --guidance), not directly (FLUX)."""
    given = [f for f, v in (("--no-bits-steps", no_bits_steps), ("--schedule", schedule), ("--prompt", prompt),
                            ("--guidance", guidance), ("--ccfg-subset", ccfg_subset)) if v is not None]  # fmt: skip
    if not latent and given:
        raise PresetError(f"{', '.join(given)}: options of latent (Stable Diffusion) models")
    if not latent:
        return
    if eta != 1.0:
        raise PresetError("--eta: latent codes use eta 1 (their no-bits steps 0)")
    if class_label is not None:
        raise PresetError("--class-label: latent models are conditioned by --prompt")
    if guidance is not None and not prompt:
        raise PresetError("--guidance needs --prompt")
    if command == "generate":
        if ccfg_subset is not None and (guidance is not None or not prompt):
            raise PresetError("--ccfg-subset: compressed guidance comes with --prompt and without --guidance")
        if ccfg_subset is not None and ccfg_subset < 1:
            raise PresetError("--ccfg-subset must be at least 1")
    elif prompt and not guidance and cfg_prompts:
        raise PresetError("--prompt conditions the code through classifier-free guidance: give --guidance G > 0")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= 100):
        raise PresetError("--guidance must be in 0..100")


def code_spec(*, latent: bool, steps: int, codebook_size: int, rule: str | None = "ddcm", num_atoms: int = 1,
              coef_bits: int = 1, generator: str = "philox", eta: float = 1.0,
              t_range: tuple[int, int] | None = None, no_bits_steps: int | None = None, schedule: str | None = None,
              ccfg_subset: int | None = None, seed: int = 0, num_timesteps: int | None = None,
              origins: dict[str, str] | None = None) -> Any:  # fmt: skip
    """The `CodeSpec` of these settings (validated there, once), and the settings that go with it checked:
    a latent model's no-bits steps and named schedule (`schedule`, default the rule's), the compressed
    CFG subset, the seed, and the model's `num_timesteps` (None: unknown) against T and `t_range`.

    `rule` None: a command without a choice of rule (generate): its spec's rule is "ddcm", and a
    latent model's steps are checked against the turbo schedule, as the command line does.
    `origins`: where the settings the user did not give came from ({"num_atoms": "the quality level
    'medium'"}), said in a refusal that blames one of them.
    """
    from ddcm_jax.selection import make_rule
    from ddcm_jax.spec import CodeSpec, SpecError

    named = make_rule(rule or "turbo")  # generate's steps are checked as turbo's (see above)
    try:
        spec = CodeSpec.create(
            steps=steps, codebook_size=codebook_size, rule=rule or "ddcm", num_atoms=num_atoms, coef_bits=coef_bits,
            generator=generator, eta=eta, t_range=None if t_range is None else (min(t_range), max(t_range)),
            clip=not latent,
        )  # fmt: skip
        if latent and no_bits_steps is not None:
            n = no_bits_steps
            if not 0 <= n <= steps - 2:
                raise SpecError("no_bits_steps", f"no-bits steps must be in 0..steps-2 = {steps - 2}, got {n}")
            if named.codes_first_steps and t_range is not None:
                raise SpecError("t_range", "turbo codes its first steps; give --no-bits-steps instead")
    except SpecError as e:
        flag = SPEC_FLAGS.get(e.field, e.field)
        given = {"steps": steps, "codebook_size": codebook_size, "num_atoms": num_atoms}
        why = (f" ({flag} was not given: {given[e.field]} came from {origins[e.field]})"
               if origins and e.field in origins and e.field in given else "")  # fmt: skip
        raise PresetError(f"{flag}: {e}{why}") from None
    if latent:
        from ddcm_jax.respacing import TURBO_TIMESTEPS

        schedule = schedule or named.own_schedule
        if schedule == "turbo" and not 2 <= steps <= len(TURBO_TIMESTEPS):
            raise PresetError(f"--steps: the turbo schedule has 2..{len(TURBO_TIMESTEPS)} steps, not {steps}")
        if ccfg_subset is not None and ccfg_subset > codebook_size:
            raise PresetError(f"--ccfg-subset {ccfg_subset}: more atoms than the codebook's K = {codebook_size}")
    if not 0 <= seed < 2**32:
        raise PresetError("--seed must be in 0..2^32-1")
    if num_timesteps is not None and steps > num_timesteps:
        raise PresetError(f"--steps must be at most the model's {num_timesteps} diffusion timesteps")
    if t_range is not None and num_timesteps is not None and not all(0 <= t < num_timesteps for t in t_range):
        raise PresetError(f"--t-range must lie in 0..{num_timesteps - 1}, the model's timesteps")
    return spec


def check_task(*, factor: int, blur_kernel: int, blur_sigma: float) -> None:
    """A restoration task's settings within what a file can hold."""
    from ddcm_jax.bitstream import LIMITS

    if not 1 <= factor <= LIMITS["factor"]:
        raise PresetError(f"--factor must be in 1..{LIMITS['factor']}")
    if not (1 <= blur_kernel <= LIMITS["kernel"] and blur_kernel % 2 == 1):
        raise PresetError(f"--blur-kernel must be odd, in 1..{LIMITS['kernel']}")
    if not (math.isfinite(blur_sigma) and blur_sigma > 0):
        raise PresetError("--blur-sigma must be a positive number")
