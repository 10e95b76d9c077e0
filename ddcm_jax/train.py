"""DDPM training of an ADM network on photographs that ship inside pip packages.

    ddcm train -o MODEL_DIR [--config CONFIG.json] [--steps N] [--resume]
    python -m ddcm_jax.train -o MODEL_DIR ...

Epsilon prediction (Ho et al. 2020, eq. 14): for x0 a random crop, t uniform
in 0..T-1 and eps ~ N(0, I),

    loss = mean || eps - eps_hat(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

with AdamW, linear warm-up then cosine decay, global-norm clipping, and an
exponential moving average of the weights, which is what the MODEL_DIR gets.
Training state (params, EMA, optimiser, step) is checkpointed with orbax every
`checkpoint_every` steps beside the output; `--resume` continues from the
latest one with the same step count and, because batch n is a pure function
of (seed, n), the same data it would have seen.

Data: the colour photographs bundled with scikit-image and scikit-learn
(`pip install 'ddcm-jax[train]'`), never the Kodak images, which are the
evaluation set. The MODEL_DIR records each file used and its SHA-256.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddcm_jax.model import DiffusionConfig, ModelConfig, save_model
from ddcm_jax.models.adm import ADMConfig, adm_apply, adm_init
from ddcm_jax.schedule import beta_schedule

__all__ = ["DEFAULT_IMAGES", "TrainConfig", "TrainState", "load_training_images", "main", "train"]

# Colour photographs shipped in the wheels of scikit-image and scikit-learn.
DEFAULT_IMAGES = (
    "skimage:astronaut.png",
    "skimage:chelsea.png",
    "skimage:coffee.png",
    "skimage:motorcycle_left.png",
    "skimage:motorcycle_right.png",
    "skimage:rocket.jpg",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
)
_PACKAGE_DIRS = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets", "images")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in the MODEL_DIR)."""

    model: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
        image_size=128, num_channels=32, num_res_blocks=2, channel_mult="1,2,2,2", attention_resolutions="",
        learn_sigma=False, use_scale_shift_norm=True, resblock_updown=False, dropout=0.0,
    ))  # fmt: skip
    images: tuple[str, ...] = DEFAULT_IMAGES
    crop: int = 32
    min_scale: float = 0.5  # crops are taken from the photo resized by a factor in [min_scale, 1]
    batch_size: int = 32
    steps: int = 6_000
    learning_rate: float = 2e-4
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    noise_schedule: str = "linear"
    num_timesteps: int = 1000

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images"] = list(self.images)
        return d


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any


# --- data ----------------------------------------------------------------------------------------


def _locate(spec: str) -> Path:
    pkg, _, name = spec.partition(":")
    if pkg not in _PACKAGE_DIRS or not name:
        raise ValueError(f"{spec!r}: expected 'skimage:NAME' or 'sklearn:NAME'")
    found = importlib.util.find_spec(_PACKAGE_DIRS[pkg][0])
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec}: package {pkg} is not installed (pip install 'ddcm-jax[train]')")
    path = Path(next(iter(found.submodule_search_locations))).joinpath(*_PACKAGE_DIRS[pkg][1:], name)
    if not path.is_file():
        raise ValueError(f"{spec}: {path} does not exist in the installed package")
    return path


def load_training_images(specs: Sequence[str]) -> tuple[list[np.ndarray], list[dict[str, str]]]:
    """uint8 RGB arrays and a record (spec, file, sha256) of each image used."""
    from ddcm_jax.images import load_image

    arrays, record = [], []
    for spec in specs:
        path = _locate(spec)
        if "kodim" in path.name.lower():
            raise ValueError(f"{spec}: the Kodak images are the evaluation set and are never trained on")
        pixels, _ = load_image(path)
        arrays.append(pixels)
        record.append({"image": spec, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                       "size": f"{pixels.shape[1]}x{pixels.shape[0]}"})  # fmt: skip
    return arrays, record


def _pyramid(arrays: list[np.ndarray], cfg: TrainConfig) -> list[np.ndarray]:
    """Each photo at a few scales in [min_scale, 1], resized once up front (Pillow BICUBIC)."""
    from PIL import Image

    out = []
    for a in arrays:
        for s in np.linspace(cfg.min_scale, 1.0, 4):
            h, w = round(a.shape[0] * s), round(a.shape[1] * s)
            if min(h, w) >= cfg.crop:
                out.append(np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC)))
    if not out:
        raise ValueError(f"no training image is at least {cfg.crop} pixels on each side")
    return out


def batch_at(pyramid: list[np.ndarray], cfg: TrainConfig, step: int) -> np.ndarray:
    """Batch `step` (B, crop, crop, 3) in [-1, 1]: a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    # Sample photos in proportion to their area, so every pixel is equally likely.
    weights = np.array([p.shape[0] * p.shape[1] for p in pyramid], np.float64)
    which = rng.choice(len(pyramid), cfg.batch_size, p=weights / weights.sum())
    out = np.empty((cfg.batch_size, cfg.crop, cfg.crop, 3), np.float32)
    for b, i in enumerate(which):
        img = pyramid[i]
        y = rng.integers(0, img.shape[0] - cfg.crop + 1)
        x = rng.integers(0, img.shape[1] - cfg.crop + 1)
        crop = img[y : y + cfg.crop, x : x + cfg.crop]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[b] = crop / 127.5 - 1.0
    return out


# --- optimisation --------------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                            end_value=cfg.learning_rate * 0.05)  # fmt: skip
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(lr, weight_decay=cfg.weight_decay))


def diffusion_loss(arch: ADMConfig, params: Any, x0: jax.Array, key: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """Ho et al. eq. 14: mean squared error of the predicted noise at a uniform random t."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, alpha_bar.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    ab = alpha_bar[t][:, None, None, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    eps_hat = adm_apply(arch, params, x_t, t)[..., : x0.shape[-1]]
    return jnp.mean(jnp.square(eps_hat - eps))


def make_step(arch: ADMConfig, cfg: TrainConfig, opt: optax.GradientTransformation) -> Any:
    alpha_bar = jnp.asarray(np.cumprod(1.0 - beta_schedule(cfg.noise_schedule, cfg.num_timesteps)), jnp.float32)

    @jax.jit
    def step(state: TrainState, x0: jax.Array, key: jax.Array) -> tuple[TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(diffusion_loss, argnums=1)(arch, state.params, x0, key, alpha_bar)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with the usual warm-up of the decay, so early averages are not dominated by init.
        d = jnp.minimum(cfg.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
        return TrainState(state.step + 1, params, ema, opt_state), loss

    return step


def init_state(arch: ADMConfig, cfg: TrainConfig, opt: optax.GradientTransformation) -> TrainState:
    params = jax.jit(adm_init, static_argnums=0)(arch, jax.random.key(cfg.seed))
    return TrainState(jnp.zeros((), jnp.int32), params, params, opt.init(params))


# --- the run ------------------------------------------------------------------------------------


def _manager(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1)
    return ocp.CheckpointManager(directory.absolute(), options=opts)


def train(cfg: TrainConfig, output: str | Path, *, resume: bool = False, checkpoint_dir: str | Path | None = None,
          quiet: bool = False, overwrite: bool = False, stop_after: int | None = None,
          log: Any = None) -> dict[str, Any]:  # fmt: skip
    """Train to `cfg.steps` and write the EMA weights as a MODEL_DIR; returns the training record.

    Checkpoints go to `checkpoint_dir` (default: OUTPUT.ckpt beside the output).
    With `resume`, training continues from the newest checkpoint there.
    `stop_after` ends this invocation after that many steps (a checkpoint and
    the MODEL_DIR are still written), for training in time slices.
    """
    import orbax.checkpoint as ocp

    output = Path(output)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(output.name + ".ckpt")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output}: already exists (pass --overwrite to replace it)")
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not resume:
        raise ValueError(f"{ckpt_dir}: holds checkpoints of an earlier run (pass --resume, or remove it)")
    arch = ADMConfig.from_create_model(cfg.model)
    arrays, record = load_training_images(cfg.images)
    pyramid = _pyramid(arrays, cfg)
    opt = make_optimizer(cfg)
    step_fn = make_step(arch, cfg, opt)
    state = init_state(arch, cfg, opt)
    manager = _manager(ckpt_dir)
    start = 0
    if resume and manager.latest_step() is not None:
        saved = json.loads((ckpt_dir / "train_config.json").read_text())
        differ = sorted(k for k in set(saved) | set(cfg.to_json()) if saved.get(k) != cfg.to_json().get(k))
        if differ:
            raise ValueError(f"{ckpt_dir}: checkpoints were made with another training config ({', '.join(differ)})")
        start = int(manager.latest_step())
        state = manager.restore(start, args=ocp.args.StandardRestore(state))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))

    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    losses: list[float] = []
    t0 = time.perf_counter()
    root = jax.random.key(cfg.seed + 1)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for n in range(start, end):
        state, loss = step_fn(state, jnp.asarray(batch_at(pyramid, cfg, n)), jax.random.fold_in(root, n))
        if (n + 1) % 25 == 0 or n + 1 == end:
            losses.append(float(loss))
            if bar is not None:
                bar.set_postfix(loss=f"{np.mean(losses[-8:]):.4f}")
            if log is not None:
                log(n + 1, float(loss))
        if bar is not None:
            bar.update(1)
        if (n + 1) % cfg.checkpoint_every == 0 or n + 1 == end:
            manager.save(n + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    if bar is not None:
        bar.close()

    info = {
        "format": "ddcm_jax.train",
        "config": cfg.to_json(),
        "data": record,
        "steps": int(state.step),
        "final_loss": None if not losses else float(np.mean(losses[-8:])),
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "jax_version": jax.__version__,
    }
    model_config = ModelConfig(
        architecture=arch,
        diffusion=DiffusionConfig(noise_schedule=cfg.noise_schedule, num_timesteps=cfg.num_timesteps),
        converter_version="train-1",
        source={"format": "ddcm_jax.train", "training": info},
    )
    info["fingerprint"] = save_model(output, model_config, jax.device_get(state.ema), overwrite=overwrite)
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--config", type=Path, help="JSON with TrainConfig fields to override")
    p.add_argument("--steps", type=int, help="total optimisation steps (overrides the config)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-dir", type=Path, help="default: MODEL_DIR.ckpt")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--stop-after", type=int, metavar="N", help="run at most N steps in this invocation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")
    p.add_argument("-q", "--quiet", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields: dict[str, Any] = {}
    if args.config is not None:
        try:
            fields = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{args.config}: cannot read ({e})") from None
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        if not isinstance(fields, dict):
            raise ValueError(f"{args.config}: expected a JSON object of TrainConfig fields")
        if set(fields) - known:
            raise ValueError(f"{args.config}: unknown fields {sorted(set(fields) - known)}")
        if "images" in fields:
            fields["images"] = tuple(fields["images"])
    for name in ("steps", "batch_size", "seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return TrainConfig(**fields)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        info = train(cfg, args.output, resume=args.resume, checkpoint_dir=args.checkpoint_dir,
                     quiet=args.quiet, overwrite=args.overwrite, stop_after=args.stop_after)  # fmt: skip
    except (ValueError, TypeError, OSError) as e:  # bad config values, unreadable or unwritable paths
        print(f"ddcm train: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({info['fingerprint']}), {info['steps']} steps, loss {info['final_loss']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddcm train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
