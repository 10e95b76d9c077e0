"""Checkpoint converter: PyTorch guided-diffusion weights -> a ddcm_jax MODEL_DIR.

Installed as `ddcm_jax.convert` (the source lives in the top-level `convert/`
folder of the repository) and driven by `ddcm convert`. Never imports torch.

    from ddcm_jax.convert import convert_checkpoint
    convert_checkpoint("256x256_diffusion_uncond.pt", "models/imagenet256",
                       preset="imagenet256-uncond")
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ddcm_jax.convert.checkpoint import CheckpointError, read_state_dict
from ddcm_jax.convert.guided_diffusion import (
    PRESETS,
    ConversionError,
    ConversionPlan,
    convert_state_dict,
    plan_conversion,
)

__all__ = [
    "CONVERTER_VERSION",
    "PRESETS",
    "CheckpointError",
    "ConversionError",
    "ConversionPlan",
    "convert_checkpoint",
    "convert_state_dict",
    "main",
    "plan_conversion",
    "read_state_dict",
]

CONVERTER_VERSION = "1"


def convert_checkpoint(
    checkpoint: str | Path,
    model_dir: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    preset: str | None = None,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    compute_dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Convert a guided-diffusion checkpoint into MODEL_DIR; returns the fingerprint.

    Exactly one of `config` (guided-diffusion `create_model` keyword arguments)
    or `preset` (a key of `PRESETS`). Nothing is written unless every key maps.
    """
    from ddcm_jax.model import DiffusionConfig, ModelConfig, save_model
    from ddcm_jax.models.adm import ADMConfig

    if (config is None) == (preset is None):
        raise ValueError("give exactly one of config or preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        config = PRESETS[preset]
    kwargs = dict(config)  # type: ignore[arg-type]
    if compute_dtype is not None:
        kwargs["compute_dtype"] = compute_dtype
    arch = ADMConfig.from_create_model(kwargs)
    diffusion = DiffusionConfig(noise_schedule=noise_schedule, num_timesteps=diffusion_steps)
    state = read_state_dict(checkpoint)
    params = convert_state_dict(arch, state)
    model_config = ModelConfig(
        architecture=arch,
        diffusion=diffusion,
        converter_version=CONVERTER_VERSION,
        source={"format": "guided-diffusion", "file": Path(checkpoint).name, "preset": preset},
    )
    return save_model(model_dir, model_config, params, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help=".pt/.pth (zip), .safetensors or .npz")
    parser.add_argument("-o", "--output", required=True, type=Path, help="MODEL_DIR to create")
    parser.add_argument("--format", default="guided-diffusion", choices=["guided-diffusion"])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", type=Path, help="JSON of create_model keyword arguments")
    which.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--noise-schedule", default="linear", choices=["linear", "cosine"])
    parser.add_argument("--diffusion-steps", type=int, default=1000)
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `ddcm convert`; errors are one line on stderr, exit 1."""
    config = None
    try:
        if args.config is not None:
            try:
                config = json.loads(args.config.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{args.config}: cannot read config ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{args.config}: config must be a JSON object")
        fp = convert_checkpoint(
            args.checkpoint,
            args.output,
            config=config,
            preset=args.preset,
            noise_schedule=args.noise_schedule,
            diffusion_steps=args.diffusion_steps,
            compute_dtype=args.compute_dtype,
            overwrite=args.overwrite,
        )
    except ConversionError as e:
        print(f"ddcm convert: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as e:
        msg = str(e)
        if str(args.checkpoint) not in msg and (args.config is None or str(args.config) not in msg):
            msg = f"{args.checkpoint}: {msg}"
        print(f"ddcm convert: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({fp})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddcm convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
