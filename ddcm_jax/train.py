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
(`pip install 'ddcm-jax[train]'`) and the photographs of Debian's wallpaper
packages (`ddcm train --fetch-data`, see `ddcm_jax.train_data`), never the
Kodak images, which are the evaluation set (`train_data.check_not_kodak`
refuses them, also re-encoded or resized). Photos are scaled so that their
longer side is at most `max_side`, then crops are drawn from a pyramid of
scales in [min_scale, 1]. The decoded, scaled photos are cached in one
`prepared-*.npz` beside the data, so that a machine without the packages
(an accelerator host) can train from that file alone. The MODEL_DIR records
each file used: its package, licence and SHA-256.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddcm_jax import train_data
from ddcm_jax.model import DiffusionConfig, ModelConfig, save_model
from ddcm_jax.models.adm import ADMConfig, adm_apply, adm_init
from ddcm_jax.pytree import pytree_dataclass
from ddcm_jax.schedule import beta_schedule

__all__ = ["DEFAULT_IMAGES", "PIP_IMAGES", "TrainConfig", "TrainState", "load_training_images", "main", "train"]

# Colour photographs shipped in the wheels of scikit-image and scikit-learn.
PIP_IMAGES = (
    "skimage:astronaut.png",
    "skimage:chelsea.png",
    "skimage:coffee.png",
    "skimage:motorcycle_left.png",
    "skimage:motorcycle_right.png",
    "skimage:rocket.jpg",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
)
# ... and the photographs of Debian's wallpaper packages.
DEFAULT_IMAGES = PIP_IMAGES + tuple(f"debian:{pkg}/{path}" for pkg, path in train_data.DEBIAN_PHOTOS)
_PACKAGE_DIRS = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets", "images")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in the MODEL_DIR)."""

    model: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(
        # Attention only at 1/8 and 1/16 of the input (image_size 128 -> 16 and 8): size-agnostic.
        image_size=128, num_channels=64, num_res_blocks=1, channel_mult="1,2,2,4", attention_resolutions="16,8",
        num_head_channels=32, learn_sigma=False, use_scale_shift_norm=True, resblock_updown=False, dropout=0.0,
    ))  # fmt: skip
    images: tuple[str, ...] = DEFAULT_IMAGES
    crop: int = 64
    min_scale: float = 0.33  # crops are taken from the photo resized by a factor in [min_scale, 1]
    max_side: int | None = 768  # photos are first scaled so that their longer side is at most this
    batch_size: int = 64
    steps: int = 20_000
    learning_rate: float = 2e-4
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 2000
    noise_schedule: str = "linear"
    num_timesteps: int = 1000

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images"] = list(self.images)
        return d


@pytree_dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any


# --- data ----------------------------------------------------------------------------------------


def _locate(spec: str, cache: Path) -> tuple[Path, dict[str, str]]:
    """The file behind an image spec and what is known of its origin (package, licence)."""
    pkg, _, name = spec.partition(":")
    if pkg == "debian":
        package, _, path = name.partition("/")
        if not package or not path:
            raise ValueError(f"{spec!r}: expected 'debian:PACKAGE/PATH'")
        return train_data.locate(cache, package, path), train_data.package_info(cache, package, path)
    if pkg not in _PACKAGE_DIRS or not name:
        raise ValueError(f"{spec!r}: expected 'skimage:NAME', 'sklearn:NAME' or 'debian:PACKAGE/PATH'")
    found = importlib.util.find_spec(_PACKAGE_DIRS[pkg][0])
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec}: package {pkg} is not installed (pip install 'ddcm-jax[train]')")
    path = Path(next(iter(found.submodule_search_locations))).joinpath(*_PACKAGE_DIRS[pkg][1:], name)
    if not path.is_file():
        raise ValueError(f"{spec}: {path} does not exist in the installed package")
    licence = {"skimage": "BSD-3-Clause / CC0 (scikit-image data, see its README)",
               "sklearn": "CC-BY / CC0 (scikit-learn images, see its README)"}[pkg]  # fmt: skip
    return path, {"package": f"pip:{_PACKAGE_DIRS[pkg][0]}", "licence": licence}


def _scaled(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return pixels
    s = max_side / max(h, w)
    return np.asarray(Image.fromarray(pixels).resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS))


def _prepared_path(specs: Sequence[str], cache: Path, max_side: int | None) -> Path:
    digest = hashlib.sha256(json.dumps([list(specs), max_side]).encode()).hexdigest()[:16]
    return cache / f"prepared-{digest}.npz"


def load_training_images(specs: Sequence[str], *, cache: str | Path | None = None,
                         max_side: int | None = None) -> tuple[list[np.ndarray], list[dict[str, str]]]:  # fmt: skip
    """uint8 RGB arrays (longer side <= max_side) and a record of each file used.

    Every file is checked against the Kodak images (`train_data.check_not_kodak`). The
    result is cached as `prepared-*.npz` in `cache` (when given) and read from there
    next time, also on a machine that has the file but not the photos' packages.
    """
    from ddcm_jax.images import load_image

    cache = Path(cache) if cache is not None else train_data.default_cache()
    prepared = _prepared_path(specs, cache, max_side)
    if prepared.is_file():
        with np.load(prepared, allow_pickle=False) as z:
            record = json.loads(str(z["record"]))
            arrays = [z[f"image{i}"] for i in range(len(record))]
        if [r["image"] for r in record] != list(specs):
            raise ValueError(f"{prepared}: holds another image list; remove it")
        for r, a in zip(record, arrays, strict=True):
            if train_data.kodak_similarity(a) > train_data.KODAK_CORRELATION:
                raise train_data.KodakError(f"{prepared}: {r['image']} matches a Kodak image")
        return arrays, record
    arrays, record = [], []
    for spec in specs:
        path, origin = _locate(spec, cache)
        data = path.read_bytes()
        pixels, _ = load_image(path)
        train_data.check_not_kodak(spec, data, pixels)
        pixels = _scaled(pixels, max_side)
        arrays.append(pixels)
        record.append({"image": spec, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                       "size": f"{pixels.shape[1]}x{pixels.shape[0]}", **origin})  # fmt: skip
    if any(spec.startswith("debian:") for spec in specs):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = prepared.with_suffix(".part.npz")
        np.savez_compressed(tmp, record=json.dumps(record), **{f"image{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, prepared)
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


def learning_rate(cfg: TrainConfig, step: int, total: int | None = None) -> float:
    """Linear warm-up then cosine decay to 5% over `total` (default cfg.steps) steps."""
    total = max(cfg.steps if total is None else total, cfg.warmup + 1)
    if step < cfg.warmup:
        return cfg.learning_rate * step / max(cfg.warmup, 1)
    frac = min(1.0, (step - cfg.warmup) / (total - cfg.warmup))
    return cfg.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * frac)))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    # The rate is a hyperparameter in the state, set from the host each step, so that a
    # time-budgeted run can fix its length after measuring its speed, without recompiling.
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def _with_rate(opt_state: Any, rate: float) -> Any:
    clip, adamw = opt_state
    hyper = dict(adamw.hyperparams, learning_rate=jnp.asarray(rate, jnp.float32))
    return (clip, adamw._replace(hyperparams=hyper))


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
    def step(state: TrainState, x0: jax.Array, key: jax.Array, rate: jax.Array) -> tuple[TrainState, jax.Array]:
        state = dataclasses.replace(state, opt_state=_with_rate(state.opt_state, rate))
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
          data_cache: str | Path | None = None, time_budget: float | None = None,
          log: Any = None) -> dict[str, Any]:  # fmt: skip
    """Train to `cfg.steps` and write the EMA weights as a MODEL_DIR; returns the training record.

    Checkpoints go to `checkpoint_dir` (default: OUTPUT.ckpt beside the output).
    With `resume`, training continues from the newest checkpoint there.
    `stop_after` ends this invocation after that many steps (a checkpoint and
    the MODEL_DIR are still written), for training in time slices.
    `time_budget` (seconds, a fresh run only) measures the speed over the first
    steps and then fixes `steps` so that the run ends within the budget; the
    learning-rate schedule follows that length and the record says what it was.
    """
    import orbax.checkpoint as ocp

    t_start = time.perf_counter()
    output = Path(output)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(output.name + ".ckpt")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output}: already exists (pass --overwrite to replace it)")
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not resume:
        raise ValueError(f"{ckpt_dir}: holds checkpoints of an earlier run (pass --resume, or remove it)")
    if time_budget is not None and resume:
        raise ValueError("a time budget fixes the length of a fresh run; resume with --steps instead")
    arch = ADMConfig.from_create_model(cfg.model)
    arrays, record = load_training_images(cfg.images, cache=data_cache, max_side=cfg.max_side)
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
    probe = (20, 120)  # steps between which a time-budgeted run measures its speed (after compilation)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # the next batch is cut while the device runs this one
        ahead = pool.submit(batch_at, pyramid, cfg, start)
        n = start
        while n < end:
            batch = ahead.result()
            ahead = pool.submit(batch_at, pyramid, cfg, n + 1)
            state, loss = step_fn(state, jnp.asarray(batch), jax.random.fold_in(root, n),
                                  np.float32(learning_rate(cfg, n)))  # fmt: skip
            if time_budget is not None and n + 1 in probe:
                jax.block_until_ready(loss)
                if n + 1 == probe[0]:
                    t_probe = time.perf_counter()
                else:
                    rate = (probe[1] - probe[0]) / (time.perf_counter() - t_probe)
                    left = time_budget - (time.perf_counter() - t_start) - 30.0  # the MODEL_DIR write
                    total = max(probe[1] + 1, probe[1] + int(rate * left))
                    cfg = dataclasses.replace(cfg, steps=total)
                    end = total if stop_after is None else min(total, start + stop_after)
                    (ckpt_dir / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2))
                    if bar is not None:
                        bar.total = total
                        bar.refresh()
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
            n += 1
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
        "device": jax.devices()[0].device_kind,
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


def pack_weights(model_dir: str | Path, out_dir: str | Path, max_bytes: int = 15 << 20) -> list[Path]:
    """A MODEL_DIR as model.json + params-N.npz files of at most `max_bytes` each (to move it through
    a channel that takes few, small, flat files); `unpack_weights` rebuilds the MODEL_DIR."""
    from ddcm_jax.families import load_model

    model = load_model(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(model.params)}  # fmt: skip
    written, shard, size = [], {}, 0
    for name in sorted(flat):
        if shard and size + flat[name].nbytes > max_bytes:
            written.append(out_dir / f"params-{len(written)}.npz")
            np.savez(written[-1], **shard)
            shard, size = {}, 0
        shard[name] = flat[name]
        size += flat[name].nbytes
    written.append(out_dir / f"params-{len(written)}.npz")
    np.savez(written[-1], **shard)
    shutil.copy(Path(model_dir) / "model.json", out_dir / "model.json")
    return written


def unpack_weights(packed: str | Path, output: str | Path, *, overwrite: bool = False) -> str:
    """The MODEL_DIR back from `pack_weights`' files; returns its fingerprint (checked against model.json's)."""
    from ddcm_jax.model import ModelConfig as _MC

    packed = Path(packed)
    meta = json.loads((packed / "model.json").read_text())
    config, expected = _MC.from_json(meta)
    flat: dict[str, np.ndarray] = {}
    for f in sorted(packed.glob("params-*.npz")):
        with np.load(f, allow_pickle=False) as z:
            flat.update({k: z[k] for k in z.files})
    params: dict[str, Any] = {}
    for name, v in flat.items():
        node = params
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    fp = save_model(output, config, params, overwrite=overwrite)
    if fp != expected:
        shutil.rmtree(output, ignore_errors=True)
        raise ValueError(f"{packed}: the weights do not match model.json's fingerprint ({fp} != {expected})")
    return fp


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
    p.add_argument("--data-cache", type=Path, metavar="DIR",
                   help="where the Debian wallpaper packages and the prepared photos live "
                        "(default: $DDCM_TRAIN_DATA or ~/.cache/ddcm_jax/train_data)")  # fmt: skip
    p.add_argument("--fetch-data", action="store_true",
                   help="download (apt-get download) and unpack (dpkg -x) the wallpaper packages, prepare the photos, "
                        "and exit; needs no root and installs nothing")  # fmt: skip
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="a fresh run measures its speed and sets --steps to end within SECONDS")
    p.add_argument("--pack-into", type=Path, metavar="DIR",
                   help="also write the MODEL_DIR as model.json + <=15 MB params-N.npz files into DIR")
    p.add_argument("--unpack", type=Path, metavar="DIR", help="rebuild MODEL_DIR (-o) from --pack-into's files, and exit")
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
        if args.unpack is not None:
            fp = unpack_weights(args.unpack, args.output, overwrite=args.overwrite)
            print(f"wrote {args.output} ({fp})")
            return 0
        cfg = config_from_args(args)
        if args.fetch_data:
            cache = train_data.fetch(args.data_cache, log=(lambda m: None) if args.quiet else print)
            arrays, record = load_training_images(cfg.images, cache=cache, max_side=cfg.max_side)
            pixels = sum(a.shape[0] * a.shape[1] for a in arrays)
            print(f"{len(record)} photographs ready in {cache} ({pixels / 1e6:.1f} Mpixel at <= {cfg.max_side} px), "
                  f"prepared as {_prepared_path(cfg.images, cache, cfg.max_side).name}")  # fmt: skip
            return 0
        info = train(cfg, args.output, resume=args.resume, checkpoint_dir=args.checkpoint_dir,
                     quiet=args.quiet, overwrite=args.overwrite, stop_after=args.stop_after,
                     data_cache=args.data_cache, time_budget=args.time_budget)  # fmt: skip
        if args.pack_into is not None:
            pack_weights(args.output, args.pack_into)
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
