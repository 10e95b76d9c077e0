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
from ddcm_jax.convert.diffusers import PipelineError, check_manifest, convert_pipeline
from ddcm_jax.convert.guided_diffusion import (
    PRESETS,
    ConversionError,
    ConversionPlan,
    convert_state_dict,
    plan_conversion,
)

from ddcm_jax.models.adm import ConfigError
from ddcm_jax.printable import printable

__all__ = [
    "CONVERTER_VERSION",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "ConversionError",
    "ConversionPlan",
    "PipelineError",
    "check_manifest",
    "convert_checkpoint",
    "convert_pipeline",
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
    or `preset` (a key of `PRESETS`). The config is validated (`ConfigError`)
    and the target checked (`ModelDirError`) before the checkpoint is read
    (`CheckpointError`); nothing is written unless every key maps
    (`ConversionError`), and a failed write leaves nothing behind.
    """
    from ddcm_jax.model import DiffusionConfig, ModelConfig, check_save_target, save_model
    from ddcm_jax.models.adm import ADMConfig

    if (config is None) == (preset is None):
        raise ValueError("give exactly one of config or preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {printable(repr(preset))[:60]}; known: {', '.join(sorted(PRESETS))}")
        config = PRESETS[preset]
    if not isinstance(config, Mapping):
        raise ConfigError("a config must be a JSON object of create_model arguments")
    kwargs = dict(config)
    if compute_dtype is not None:
        kwargs["compute_dtype"] = compute_dtype
    arch = ADMConfig.from_create_model(kwargs)
    diffusion = DiffusionConfig(noise_schedule=noise_schedule, num_timesteps=diffusion_steps)
    check_save_target(model_dir, overwrite)  # before reading a multi-GB checkpoint
    state = read_state_dict(checkpoint)
    params = convert_state_dict(arch, state)
    del state
    model_config = ModelConfig(
        architecture=arch,
        diffusion=diffusion,
        converter_version=CONVERTER_VERSION,
        source={"format": "guided-diffusion", "file": Path(checkpoint).name, "preset": preset},
    )
    return save_model(model_dir, model_config, params, overwrite=overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help=".pt/.pth (zip), .safetensors or .npz; with --format diffusers a pipeline folder")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, type=Path, help="MODEL_DIR to create")
    parser.add_argument("--format", choices=["guided-diffusion", "diffusers"],
                        help="default: detected (a folder with model_index.json is diffusers: Stable Diffusion or "
                        "FLUX.1; a file is a guided-diffusion checkpoint)")  # fmt: skip
    which = parser.add_mutually_exclusive_group()  # one is required for guided-diffusion (checked in run)
    which.add_argument("--config", type=Path, help="JSON of create_model keyword arguments")
    which.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--noise-schedule", default="linear", choices=["linear", "cosine"])
    parser.add_argument("--diffusion-steps", type=int, default=1000)
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing MODEL_DIR (never any other folder)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success (errors still go to stderr)")


_MAX_CONFIG_BYTES = 1 << 20


def _read_config(path: Path) -> dict[str, Any]:
    """The --config JSON object; ConfigError (one line, naming the file) for anything unreadable."""
    import os
    import stat

    where = printable(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block
            raise ConfigError(f"{where}: is not a regular file")
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{where}: is not a regular file")
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read config ({printable(e.strerror or e)})") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: config larger than {_MAX_CONFIG_BYTES} bytes")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise ConfigError(f"{where}: cannot read config (nested too deeply)") from None
    except ValueError as e:
        raise ConfigError(f"{where}: cannot read config ({printable(e)[:200]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config must be a JSON object")
    return config


def register(args: argparse.Namespace) -> None:
    """List a converted MODEL_DIR where decoders look for models by fingerprint (`modeldir.registry_path`)."""
    from ddcm_jax.modeldir import register_model_dir

    where = register_model_dir(args.output)
    if getattr(args, "quiet", False):
        return
    if where is None:
        print("note: could not list it for decoders (pass --model, or set DDCM_MODELS)", file=sys.stderr)
    else:
        print(f"listed in {printable(where)}: files it makes decode without --model (delete the line to forget it)")


def detect_format(source: str | Path) -> str:
    """"diffusers" for a folder holding model_index.json (a diffusers pipeline), else "guided-diffusion"."""
    return "diffusers" if (Path(source) / "model_index.json").is_file() else "guided-diffusion"


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `ddcm convert`; every error is one line on stderr, exit 1, nothing written."""
    from ddcm_jax.model import ModelDirError

    fmt = getattr(args, "format", None) or detect_format(args.checkpoint)
    if fmt == "diffusers":
        from ddcm_jax.convert import diffusers

        return diffusers.run(args)
    if args.config is None and args.preset is None:
        hint = ""
        if Path(args.checkpoint).is_dir():
            hint = f" ({printable(args.checkpoint)} is a folder without model_index.json: not a diffusers pipeline)"
        print(f"ddcm convert: error: a guided-diffusion checkpoint needs --config JSON or --preset NAME{hint}",
              file=sys.stderr)  # fmt: skip
        return 2
    ckpt = printable(args.checkpoint)
    config_name = printable(args.config) if args.config is not None else f"preset {args.preset}"
    try:
        config = None
        if args.config is not None:
            config = _read_config(args.config)
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
    except KeyboardInterrupt:
        print("ddcm convert: interrupted", file=sys.stderr)
        return 130
    except ConversionError as e:
        msg = f"{ckpt}: {e}"
    except ConfigError as e:
        text = printable(e)
        msg = text if args.config is not None and text.startswith(config_name + ":") else f"{config_name}: {text}"
    except (CheckpointError, ModelDirError) as e:  # these name their file already
        msg = printable(e)
    except ValueError as e:  # e.g. --diffusion-steps out of range
        msg = f"{ckpt}: {printable(e)}"
    except OSError as e:
        msg = f"{printable(args.output)}: {printable(e.strerror or e)}"
    except MemoryError:
        msg = f"{ckpt}: out of memory"
    except Exception as e:  # a bug must still not end in a traceback
        msg = f"{ckpt}: internal error ({type(e).__name__}: {printable(e)[:200]})"
    else:
        if not getattr(args, "quiet", False):
            print(f"wrote {printable(args.output)} ({fp})")
        register(args)
        return 0
    lines = msg.splitlines() or [msg]
    print(f"ddcm convert: {printable(lines[0])}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddcm convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
