"""Every model family, by the name its MODEL_DIR's model.json carries: one line each.

    FAMILIES = {"adm": ..., "sd": ..., "flux": ...}: (read model.json -> (config, fingerprint), load the folder,
                                          where model.json keeps the timesteps, named schedules or not)

`load_model` and `find_model` pick a folder's family here (`modeldir.peek_family`);
nothing else in the package names a family. Adding one is one line (and its module).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ddcm_jax import flux_model, latent_model, model
from ddcm_jax.modeldir import (
    DEFAULT_MODEL,
    ModelDirError,
    known_model_dirs,
    peek_family,
    resolve_model_dir,
)
from ddcm_jax.modeldir import peek_num_timesteps as _peek_num_timesteps

__all__ = ["FAMILIES", "cfg_prompts", "find_model", "label_of_file", "load_model", "named_schedules", "peek_num_timesteps"]


class FamilyDir(NamedTuple):
    read: Callable[[Path], tuple[Any, str]]  # model.json -> (config, fingerprint); ModelDirError otherwise
    load: Callable[..., Any]  # (folder, *, verify) -> the loaded model (a `ddcm_jax.family.Family`)
    timesteps_at: tuple[str, ...] | int = ("diffusion", "num_timesteps")  # model.json's keys of the timestep
    # count, or the count itself for a family that has one (FLUX: sigma = t / 1000)
    named_schedules: bool = False  # its codes name their timesteps (the loaded model's `named_schedules`)
    cfg_prompts: bool = False  # a prompt conditions through classifier-free guidance (needs a scale)
    label: str = "ADM (pixel)"  # for messages
    noise_schedules: tuple[str, ...] = ("linear", "cosine")  # what its files' headers record


FAMILIES: dict[str, FamilyDir] = {
    "adm": FamilyDir(model.read_model_json, model.load_pixel_model),
    "sd": FamilyDir(latent_model.read_latent_model_json, latent_model.load_latent_model,
                    ("scheduler", "num_train_timesteps"), named_schedules=True, cfg_prompts=True,
                    label="Stable Diffusion", noise_schedules=("scaled_linear",)),
    "flux": FamilyDir(flux_model.read_flux_model_json, flux_model.load_flux_model, 1000, named_schedules=True,
                      label="FLUX.1", noise_schedules=("flow",)),
}


def _named(family: str | None) -> FamilyDir:
    """A family by name (None or an unknown name: "adm", whose reader says what is wrong)."""
    return FAMILIES.get(family or "adm", FAMILIES["adm"])


def _family(root: Path) -> FamilyDir:
    """The family of a folder (an unreadable or unnamed model.json: "adm", whose reader says what is wrong)."""
    return _named(peek_family(root))


def named_schedules(family: str | None) -> bool:
    """Whether the family's codes name their timesteps (Stable Diffusion's "ddcm" / "turbo" schedules),
    known before loading (`modeldir.peek_family` gives a folder's family); False for None or an unknown name."""
    return family in FAMILIES and FAMILIES[family].named_schedules


def label_of_file(noise_schedule: str) -> str:
    """The family a file's header points to (its noise schedule), for messages ("FLUX.1", ...)."""
    return next((f.label for f in FAMILIES.values() if noise_schedule in f.noise_schedules), "unknown")


def cfg_prompts(family: str | None) -> bool:
    """Whether a prompt conditions the family's codes through classifier-free guidance (Stable
    Diffusion: a guidance scale is needed) rather than directly (FLUX, guidance-distilled)."""
    return family in FAMILIES and FAMILIES[family].cfg_prompts


def peek_num_timesteps(model_dir: str | os.PathLike, family: str | None) -> int | None:
    """The number of diffusion timesteps the model.json of a MODEL_DIR of `family` records, read from that
    file alone; None when unreadable (loading the model then says why)."""
    at = _named(family).timesteps_at
    return at if isinstance(at, int) else _peek_num_timesteps(model_dir, at)


def load_model(model_dir: str | os.PathLike = DEFAULT_MODEL, *, verify: bool = True) -> Any:
    """Load a MODEL_DIR written by `ddcm convert` or `ddcm train` ("default": the packaged model).

    The family its model.json names picks the loader: an ADM `DiffusionModel`
    (`ddcm_jax.model.load_pixel_model`) or a Stable Diffusion
    `LatentDiffusionModel` (`ddcm_jax.latent_model.load_latent_model`). Every
    loader checks model.json, then the checkpoint's files and size, then the
    parameters, and with `verify` the fingerprint; `ModelDirError` (one line:
    path and reason) otherwise.
    """
    root = resolve_model_dir(model_dir).absolute()
    return _family(root).load(root, verify=verify)


def find_model(fingerprint_prefix: str, loaded: dict[Path, Any] | None = None) -> Path | None:
    """The first known MODEL_DIR whose fingerprint starts with `fingerprint_prefix` ('sha256:…')
    and that loads and verifies; a folder that does not is skipped, so a damaged copy
    found through DDCM_MODELS cannot shadow an intact one later in the search order
    (such as the packaged default).

    `loaded`: the caller's models by folder. A folder in it counts as verified,
    and the model a search loads is put in it, so a run loads each model once.
    """
    loaded = {} if loaded is None else loaded
    for d in known_model_dirs():
        try:
            _, fp = _family(d).read(d)
        except ModelDirError:
            continue
        if not fp.startswith(fingerprint_prefix):
            continue
        if d in loaded:
            return d
        try:
            loaded[d] = load_model(d)
        except ModelDirError:
            continue
        return d
    return None
