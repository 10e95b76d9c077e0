"""GPU benchmark suite: ADM-256 forward, DDCM compression and Turbo-DDCM round trips vs the originals, SD 2.1, selection.

    bash benchmarks/gpu_suite.sh                      # full mode, one GPU, about 7 minutes
    python benchmarks/gpu_suite.py --mode reduced --json /tmp/gpu_reduced.json   # tiny, CPU, < 1 min

Cases, in priority order (each side of a case runs in its own subprocess, so
peak device memory is per process and a crash or OOM is recorded as an error
without stopping the rest):

  adm_forward    guided-diffusion's class-conditional ImageNet-256 ADM with random
                 weights of the real shapes (554 M parameters): jitted forward at
                 float32 and bfloat16 compute, batch 1, 8, 32 (images/s, compile time,
                 memory); and the same network in PyTorch (`tests/torch_adm.py`),
                 float32, for reference.
  ddcm_compress  `ddcm_jax.compress` with that model, K = 4096, 100 respaced steps,
                 batch 1, 8, 32 at float32 and 32 at bfloat16 compute (one jitted call;
                 a 50-step run at batch 1 separates the fixed cost for the
                 extrapolation to 1000 steps); against the original's per-step loop on
                 the same GPU: PyTorch UNet forward, x0_hat, residual,
                 `torch.randn(K, D)` from a generator seeded per step, matmul, argmax,
                 DDIM step (batch 1).
  latent_turbo   Turbo-DDCM's round trip at Stable Diffusion 2.1-base 512 px (UNet,
                 VAE and text encoder of the real sizes, random weights): jitted
                 `ddcm_jax.compress` (VAE encoder included) then `ddcm_jax.decompress`
                 (VAE decoder included), T = 30, K = 16384, M = 50, batch 1 and 16 at
                 float32, 16 at bfloat16 (also with the fused Pallas scoring kernel);
                 seconds per image of the round trip, and
                 whether the decoder rebuilt the encoder's picture; against the
                 original Turbo-DDCM code's `compress` + `decompress` loop (its
                 `roundtrip.py`, batch 1, float16 as it runs by default) rewritten
                 around diffusers' UNet and VAE of the same configs.
  sd_components  Stable Diffusion 2.1-base's UNet (865.9 M parameters, random weights;
                 shapes checked against the released model's manifest when
                 ../shared/reference is there) at a 64x64x4 latent with a 77x1024
                 context, batch 1 and 8, float32 and bfloat16; and one Turbo-DDCM
                 selection step (top-64 of |<z_k, r>| over K = 16384 atoms of
                 D = 16384, `ddcm_jax.select_atoms(rule="turbo")`), with the
                 original's `randn(D, K)` + matmul + topk for reference.
  selection      one selection step with XLA's chunked stream and with the fused
                 Pallas kernel (`kernel="pallas"`, `ddcm_jax.fused`), and whether
                 both chose the same indices: Turbo top-64 at K = 16384, D = 16384,
                 DDCM argmax at K = 4096, D = 196,608 (ADM-256); the originals'
                 `randn` + matmul + topk / argmax for reference.

Budget: `--budget-s` (default 420) covers the whole run. Each side of a case
gets a share of what is left (unused time rolls over) and skips the items it
estimates will not fit, recording why; its hard timeout is the budget left.
The JSON file is rewritten after every item, so a run killed at a time limit
still leaves what finished. Times: median of repeats after a warm-up call (or
the first call alone where the plan says so: `warm_up_discarded`), jitted
functions compiled ahead of time (`compile_s` apart), `block_until_ready` /
`torch.cuda.synchronize`. Memory: `peak_bytes_in_use` is the JAX device
allocator's peak so far in that process (items run in increasing size, null
where the backend has no counter); `compiled_memory` is XLA's own account of
one call (arguments, outputs, temporaries); torch rows give
`torch.cuda.max_memory_allocated` after a reset. Weights are random: timing
does not depend on them.

`--mode reduced` runs the same code paths on tiny models (CPU is fine; torch on
CPU when CUDA is absent); the test suite runs it (`tests/test_gpu_suite.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEED = 0  # the compression key (an int seed) and the weights' seed
SHARED = Path(os.environ.get("DDCM_SHARED", REPO.parent / "shared"))

# guided-diffusion's ImageNet 256x256 class-conditional model (ADM-G's UNet), as `create_model` takes it.
ADM256 = dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
              class_cond=True, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
              num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True, use_fp16=False,
              use_new_attention_order=False, dropout=0.0)  # fmt: skip
ADM_TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                class_cond=True, attention_resolutions="16", num_head_channels=16,
                use_scale_shift_norm=True, resblock_updown=True)  # fmt: skip

# stabilityai/stable-diffusion-2-1-base unet/config.json (the options that change the network).
SD21_BASE_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
# shared/reference/sd_tiny/unet/config.json (the options that change the network).
SD_TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "attention_head_dim": [2, 4],
    "block_out_channels": [16, 32],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-2-1-base vae/config.json, text_encoder/config.json and
# scheduler/scheduler_config.json (the options that change the networks and the process).
SD21_BASE_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_BASE_TEXT = {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
                  "max_position_embeddings": 77, "num_attention_heads": 16, "num_hidden_layers": 23,
                  "projection_dim": 512, "vocab_size": 49408}  # fmt: skip
SD21_BASE_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                       "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
                       "steps_offset": 1, "trained_betas": None}  # fmt: skip
# shared/reference/sd_tiny's vae and text encoder (the options that change the networks).
SD_TINY_VAE = {**SD21_BASE_VAE, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
               "sample_size": 128}  # fmt: skip
SD_TINY_TEXT = {"hidden_act": "gelu", "hidden_size": 32, "intermediate_size": 37, "layer_norm_eps": 1e-05,
                "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 2,
                "projection_dim": 32, "vocab_size": 523}  # fmt: skip

MODES: dict[str, dict[str, Any]] = {
    "full": {
        "adm": ADM256,
        # (batch, compute dtype) in the order they run: bfloat16 first at each batch, so that the
        # allocator's peak so far grows item by item.
        "forward": {"items": ((1, "bfloat16"), (1, "float32"), (8, "bfloat16"), (8, "float32"),
                              (32, "bfloat16"), (32, "float32")), "repeats": 5},
        "torch_forward": {"batches": (1, 8, 32), "repeats": 5},
        "compress": {"steps": 100, "half_steps": 50, "K": 4096,
                     # (batch, steps, timed repeats after a discarded warm-up call (0 = the first call
                     # alone), compute dtype)
                     "plan": ((1, 100, 2, "float32"), (8, 100, 0, "float32"), (1, 50, 1, "float32"),
                              (32, 100, 0, "float32"), (32, 100, 0, "bfloat16"))},
        "torch_compress": {"batch": 1, "repeats": 1},
        "sd": {"unet": SD21_BASE_UNET, "manifest": "sd_manifests/sd21_base", "latent": 64, "context": 77,
               "items": ((1, "bfloat16"), (1, "float32"), (8, "bfloat16"), (8, "float32")), "repeats": 5},
        "turbo": {"K": 16384, "latent": 64, "M": 64, "repeats": 10},
        # Turbo-DDCM's round trip at SD 2.1-base 512 px: T 30 (its default), K 16384, M 50 (one of the
        # original's M with a packaged combination table); (batch, unet/vae compute dtype, repeats,
        # codebook kernel).
        "latent": {"unet": SD21_BASE_UNET, "vae": SD21_BASE_VAE, "text_encoder": SD21_BASE_TEXT,
                   "scheduler": SD21_BASE_SCHEDULER, "manifest": "sd_manifests/sd21_base", "image": 512,
                   "T": 30, "K": 16384, "M": 50,
                   "plan": ((1, "float32", 1, "xla"), (16, "float32", 0, "xla"), (16, "bfloat16", 0, "xla"),
                            (16, "bfloat16", 0, "pallas"))},
        # The original runs float16 unless --float32 is given.
        "torch_latent": {"dtype": "float16", "repeats": 1},
        # (name, rule, K, residual shape, M): a Turbo step at SD 2.1-base 512 px latents, a DDCM step at ADM-256.
        "selection": {"items": (("turbo_sd21_512px", "turbo", 16384, (64, 64, 4), 64),
                                ("ddcm_adm256", "ddcm", 4096, (256, 256, 3), 1)), "repeats": 10},
        "min_start_s": 15.0,
        "rank_promotion": "allow",
        "xla_flags": "",
    },
    "reduced": {
        "adm": ADM_TINY,
        "forward": {"items": ((1, "bfloat16"), (1, "float32"), (2, "float32")), "repeats": 2},
        "torch_forward": {"batches": (1, 2), "repeats": 2},
        "compress": {"steps": 3, "half_steps": 2, "K": 64,
                     "plan": ((1, 3, 1, "float32"), (2, 3, 0, "float32"), (1, 2, 1, "float32"), (2, 3, 0, "bfloat16"))},
        "torch_compress": {"batch": 1, "repeats": 1},
        "sd": {"unet": SD_TINY_UNET, "manifest": None, "latent": 8, "context": 77,
               "items": ((1, "bfloat16"), (1, "float32"), (2, "float32")), "repeats": 2},
        "turbo": {"K": 64, "latent": 8, "M": 4, "repeats": 3},
        "latent": {"unet": SD_TINY_UNET, "vae": SD_TINY_VAE, "text_encoder": SD_TINY_TEXT,
                   "scheduler": SD21_BASE_SCHEDULER, "manifest": None, "image": 64, "T": 4, "K": 64, "M": 3,
                   "plan": ((1, "float32", 1, "xla"), (2, "float32", 0, "xla"), (2, "float32", 0, "pallas"))},
        "torch_latent": {"dtype": "float32", "repeats": 1},
        "selection": {"items": (("turbo_small", "turbo", 96, (8, 8, 4), 4), ("ddcm_small", "ddcm", 80, (8, 8, 3), 1)),
                      "repeats": 2},
        "min_start_s": 0.0,
        "rank_promotion": "raise",
        # Compile faster (LLVM at -O0): reduced-mode timings only check the plumbing.
        "xla_flags": "--xla_backend_optimization_level=0",
    },
}

# (case, side) in priority order, with each one's weight in the share of the budget left.
PARTS: tuple[tuple[str, str, float], ...] = (
    ("adm_forward", "jax", 130.0),
    ("adm_forward", "torch", 25.0),
    ("ddcm_compress", "jax", 170.0),
    ("ddcm_compress", "torch", 30.0),
    ("latent_turbo", "jax", 150.0),
    ("latent_turbo", "torch", 40.0),
    ("sd_components", "jax", 90.0),
    ("sd_components", "torch", 15.0),
    ("selection", "jax", 30.0),
    ("selection", "torch", 10.0),
)
CASES = tuple(dict.fromkeys(case for case, _, _ in PARTS))


# ------------------------------------------------------------------------------------------------
# Shared by the cases (and by tests/test_gpu_suite.py, which rebuilds the reduced model).


class Skip(Exception):
    """A prerequisite is missing: the whole side of a case is skipped, with this reason."""


def random_params(abstract: Any, seed: int) -> Any:
    """NumPy float32 leaves for an abstract parameter tree, the same on every machine.

    With z uniform of mean 0 and variance 1 (uniform draws are 2.5x faster than
    normal ones, which counts at 554 M parameters): kernels z / sqrt(fan_in),
    norm scales 1 + 0.1 z, biases 0.02 z, embeddings z. Every layer computes
    something (no zero-initialised outputs) and activations stay O(1).
    """
    import jax

    rng = np.random.default_rng(seed)
    half, width = np.float32(0.5), np.float32(math.sqrt(12.0))

    def leaf(path: Any, s: Any) -> np.ndarray:
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(int(v) for v in s.shape)
        z = rng.random(shape, dtype=np.float32)
        z -= half
        z *= width
        if name == "scale":
            z = 1 + np.float32(0.1) * z
        elif name == "bias":
            z *= np.float32(0.02)
        elif name != "embedding" and len(shape) > 1:
            z *= np.float32(1 / math.sqrt(math.prod(shape[:-1])))
        return z.astype(np.float32, copy=False)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _sha(a: Any) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def params_sha256(params: Any) -> str:
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return "sha256:" + h.hexdigest()


def adm_config(mode_cfg: dict[str, Any], dtype: str = "float32") -> Any:
    from ddcm_jax.models.adm import ADMConfig

    return ADMConfig.from_create_model({**mode_cfg["adm"], "compute_dtype": dtype})


def adm_params(mode_cfg: dict[str, Any]) -> Any:
    """The benchmark's random ADM weights (NumPy), the same for every compute dtype."""
    from ddcm_jax.models.adm import abstract_params

    return random_params(abstract_params(adm_config(mode_cfg)), SEED)


def adm_model(mode_cfg: dict[str, Any], params: Any = None, dtype: str = "float32") -> Any:
    """A `DiffusionModel` with the benchmark's random weights computing in `dtype` (default
    diffusion: linear, 1000)."""
    from ddcm_jax.model import DiffusionModel, ModelConfig

    params = adm_params(mode_cfg) if params is None else params
    return DiffusionModel(ModelConfig(adm_config(mode_cfg, dtype)), params, "sha256:benchmark")


def compress_inputs(mode_cfg: dict[str, Any], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (B, H, W, 3) float32 in [-1, 1], class labels (B,) int32) for a compression batch.

    Image i is the same in every batch (a smaller batch is a prefix of a larger one).
    """
    n = adm_config(mode_cfg).image_size
    images = np.stack([np.random.default_rng(1000 + i).uniform(-1, 1, (n, n, 3)) for i in range(batch)])
    labels = ((np.arange(batch) * 37 + 1) % 1000).astype(np.int32)
    return images.astype(np.float32), labels


def compress_call(model: Any, images: Any, labels: Any, *, steps: int, codebook_size: int) -> tuple[Any, Any]:
    """What the suite times: `ddcm_jax.compress` (DDCM rule, philox codebooks), key = SEED."""
    import ddcm_jax

    res = ddcm_jax.compress(model, images, steps=steps, codebook_size=codebook_size, rule="ddcm",
                            key=SEED, class_label=labels)  # fmt: skip
    return res.indices, res.image


def extrapolate(seconds: float, steps: int, target: int, half: tuple[float, int] | None = None) -> dict[str, Any]:
    """Time of a `target`-step run from a `steps`-step one: fixed + target x per step.

    With `half` = (seconds, steps) of a shorter run at the same batch, per step =
    the difference over the step difference and fixed = the rest; otherwise,
    or when timing noise makes that fixed part negative, the time is scaled
    (fixed = 0).
    """
    per_step, fixed, method = seconds / steps, 0.0, "linear scaling"
    if half is not None and half[1] != steps:
        two = (seconds - half[0]) / (steps - half[1])
        if seconds - steps * two >= 0:
            per_step, fixed, method = two, seconds - steps * two, f"two runs ({half[1]} and {steps} steps)"
        else:
            method = f"linear scaling (the two runs gave a negative fixed part: {seconds - steps * two:.3g} s)"
    return {"steps": target, "method": method, "per_step_s": per_step, "fixed_s": fixed,
            "seconds": fixed + target * per_step}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# One side of one case, in its own process.


class Part:
    """Results of one (case, side) subprocess, rewritten to `out` after every item."""

    def __init__(self, case: str, side: str, mode: str, out: Path, deadline: float) -> None:
        self.out, self.deadline, self.t0 = out, deadline, time.time()
        self.doc: dict[str, Any] = {"case": case, "side": side, "mode": mode, "status": "running",
                                    "env": {}, "config": {}, "rows": [], "skipped": [], "errors": []}  # fmt: skip

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, what: str, estimate_s: float) -> bool:
        """Whether an item estimated at `estimate_s` fits the deadline; records the skip if not."""
        left = self.left()
        if estimate_s > left:
            self.doc["skipped"].append({"what": what, "reason": f"budget: needs ~{estimate_s:.0f} s, "
                                                                f"{max(left, 0):.0f} s left"})  # fmt: skip
            self.write()
            return False
        return True

    def add_row(self, row: dict[str, Any]) -> dict[str, Any]:
        self.doc["rows"].append(row)
        self.write()
        _log(f"  {self.doc['case']}:{self.doc['side']} {_brief(row)}")
        return row

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        self.doc["errors"].append({"what": what, "error": msg[:4000]})
        self.write()
        _log(f"  {self.doc['case']}:{self.doc['side']} {what} FAILED: {msg[:300]}")

    def write(self) -> None:
        self.doc["elapsed_s"] = time.time() - self.t0
        _write_json(self.out, self.doc)


def _log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _brief(row: dict[str, Any]) -> str:
    keys = ("impl", "component", "dtype", "batch", "steps", "K", "seconds", "compile_s")
    return ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                     for k in keys if k in row)  # fmt: skip


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _jax_env() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
        "rank_promotion": jax.config.jax_numpy_rank_promotion,
        "memory_stats_available": _memory_stats() is not None,
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    }


def _memory_stats() -> dict[str, Any] | None:
    import jax

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None


def _peak_bytes() -> int | None:
    stats = _memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def _compiled_memory(compiled: Any) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}
    out["total_bytes"] = sum(out.get(f, 0) for f in fields[:3]) - out.get("alias_size_in_bytes", 0)
    return out


def _timed(call: Any, repeats: int, sync: Any) -> tuple[dict[str, Any], Any]:
    """Run `call` once (warm-up, kept only when repeats == 0), then `repeats` timed calls."""
    t0 = time.perf_counter()
    first = sync(call())
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - t0)
    if not times:
        times = [first_s]
    return {"seconds": statistics.median(times), "seconds_all": times, "first_call_s": first_s,
            "warm_up_discarded": repeats > 0}, first  # fmt: skip


def _estimate(prev: dict[str, Any] | None, batch: int, calls: int, scale: float = 1.0) -> float:
    """Seconds an item will take, from the previous one like it (compile + calls, scaled by batch)."""
    if prev is None:
        return 0.0
    run = prev["seconds"] * batch / prev["batch"] * scale
    return 1.2 * (prev.get("compile_s", 0.0) + calls * run) + 2.0


def _jax_item(part: Part, what: str, fn: Any, args: tuple[Any, ...], repeats: int,
              estimate_s: float, row: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:  # fmt: skip
    """Compile `fn` ahead of time for `args`, time it, add the row; errors recorded, never raised."""
    import jax

    if not part.fits(what, estimate_s):
        return None, None
    try:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        row["compile_s"] = time.perf_counter() - t0
        row["compiled_memory"] = _compiled_memory(compiled)
        timing, out = _timed(lambda: compiled(*args), repeats, jax.block_until_ready)
        row.update(timing)
        row["peak_bytes_in_use"] = _peak_bytes()
        return part.add_row(row), jax.device_get(out)
    except Exception as exc:  # OOM, compile failure: record, go on with the next item
        part.error(what, exc)
        return None, None


def _need_accelerator(mode: str) -> None:
    import jax

    if mode == "full" and jax.default_backend() == "cpu":
        raise Skip("JAX sees no accelerator (backend cpu): full mode needs a GPU; use --mode reduced on a CPU")


def _need_torch(mode: str) -> tuple[Any, str]:
    try:
        import torch
    except ImportError as exc:
        raise Skip(f"PyTorch not installed ({exc})") from exc
    if torch.cuda.is_available():
        return torch, "cuda"
    if mode == "full":
        raise Skip(f"torch {torch.__version__} has no CUDA device: the full mode compares on the GPU")
    # Reduced mode on a CPU checks the plumbing: one thread, since OpenMP's spinning threads
    # slow down a hundredfold on cores another process is using.
    torch.set_num_threads(1)
    return torch, "cpu"


def _torch_env(torch: Any, dev: str) -> dict[str, Any]:
    cuda = dev == "cuda"
    return {
        "torch": torch.__version__,
        "device": dev,
        "cuda_device_name": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "threads": torch.get_num_threads(),
    }


def _torch_sync(torch: Any, dev: str) -> Any:
    def sync(out: Any) -> Any:
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    return sync


def _torch_reset_peak(torch: Any, dev: str) -> None:
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _torch_peak(torch: Any, dev: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None


def _torch_adm(cfg_mode: dict[str, Any], torch: Any, dev: str) -> Any:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from torch_adm import random_torch_adm

    with torch.device(dev):  # built on the device (the 256 px model has 554 M parameters)
        return random_torch_adm(adm_config(cfg_mode), seed=SEED)


# -- case 1 --------------------------------------------------------------------------------------


def adm_forward_jax(part: Part, mode: str) -> None:
    import jax
    import jax.numpy as jnp

    from ddcm_jax.models.adm import adm_apply, param_count

    _need_accelerator(mode)
    cfg = MODES[mode]
    fw = cfg["forward"]
    base = adm_config(cfg)
    t0 = time.perf_counter()
    params = jax.block_until_ready(jax.device_put(adm_params(cfg)))
    part.doc["config"] = {"create_model": cfg["adm"], "architecture": base.to_json(), "params": param_count(base),
                          "params_build_s": time.perf_counter() - t0, **fw}  # fmt: skip
    part.write()
    n, prev = base.image_size, None
    for batch, dtype in fw["items"]:
        rng = np.random.default_rng(batch)
        x = jnp.asarray(rng.standard_normal((batch, n, n, 3)).astype(np.float32))
        t = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
        y = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
        fn = functools.partial(adm_apply, adm_config(cfg, dtype))
        row = {"impl": "jax", "dtype": dtype, "batch": batch}
        est = _estimate(prev, batch, fw["repeats"] + 1)
        got, _ = _jax_item(part, f"jax {dtype} batch {batch}", fn, (params, x, t, y), fw["repeats"], est, row)
        if got:
            got["images_per_s"] = batch / got["seconds"]
            part.write()
            prev = got


def adm_forward_torch(part: Part, mode: str) -> None:
    torch, dev = _need_torch(mode)
    part.doc["env"].update(_torch_env(torch, dev))
    cfg = MODES[mode]
    tf = cfg["torch_forward"]
    t0 = time.perf_counter()
    net = _torch_adm(cfg, torch, dev)
    n = adm_config(cfg).image_size
    part.doc["config"] = {"create_model": cfg["adm"], "params": sum(p.numel() for p in net.parameters()),
                          "build_s": time.perf_counter() - t0, **tf}  # fmt: skip
    sync, prev = _torch_sync(torch, dev), None
    with torch.inference_mode():
        for batch in tf["batches"]:
            what = f"torch float32 batch {batch}"
            if not part.fits(what, _estimate(prev, batch, tf["repeats"] + 1)):
                continue
            try:
                g = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, 3, n, n, generator=g).to(dev)
                t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
                y = torch.randint(0, 1000, (batch,), generator=g).to(dev)
                _torch_reset_peak(torch, dev)
                timing, _ = _timed(lambda x=x, t=t, y=y: net(x, t, y), tf["repeats"], sync)
                row = {"impl": "torch", "dtype": "float32", "batch": batch, **timing,
                       "images_per_s": batch / timing["seconds"], "peak_bytes": _torch_peak(torch, dev)}  # fmt: skip
                prev = part.add_row(row)
            except Exception as exc:
                part.error(what, exc)


# -- case 2 --------------------------------------------------------------------------------------


def ddcm_compress_jax(part: Part, mode: str) -> None:
    import jax
    import jax.numpy as jnp

    _need_accelerator(mode)
    cfg = MODES[mode]
    cc = cfg["compress"]
    t0 = time.perf_counter()
    host = adm_params(cfg)
    params = jax.block_until_ready(jax.device_put(host))
    model = adm_model(cfg, params)
    arch = model.config.architecture
    part.doc["config"] = {"create_model": cfg["adm"], "K": cc["K"], "rule": "ddcm", "generator": "philox",
                          "key": SEED, "D": arch.image_size**2 * 3, "compute_dtypes": sorted({d for *_, d in cc["plan"]}),
                          "params_build_s": time.perf_counter() - t0, "steps": cc["steps"],
                          "half_steps": cc["half_steps"], "plan": cc["plan"]}  # fmt: skip
    if mode == "reduced":
        part.doc["config"]["params_sha256"] = params_sha256(host)
    del host
    part.write()
    done: dict[tuple[int, int, str], dict[str, Any]] = {}
    for batch, steps, repeats, dtype in cc["plan"]:
        images, labels = compress_inputs(cfg, batch)
        like = [r for (b, _, _), r in done.items() if b <= batch]
        prev = max(like, key=lambda r: (r["batch"], r["steps"])) if like else None
        scale = 1.0 if prev is None else steps / prev["steps"]
        est = _estimate(prev, batch, repeats + 1, scale)
        fn = functools.partial(compress_call, steps=steps, codebook_size=cc["K"])
        row = {"impl": "jax", "batch": batch, "steps": steps, "dtype": dtype, "K": cc["K"], "D": part.doc["config"]["D"]}
        args = (adm_model(cfg, params, dtype), jnp.asarray(images), jnp.asarray(labels))
        got, out = _jax_item(part, f"jax {dtype} batch {batch} steps {steps}", fn, args, repeats, est, row)
        if not got:
            continue
        indices = np.asarray(out[0])
        got.update(seconds_per_image=got["seconds"] / batch, images_per_s=batch / got["seconds"],
                   seconds_per_step=got["seconds"] / steps, indices_shape=list(indices.shape),
                   indices_sha256=_sha(indices.astype(np.int32)),
                   image_finite=bool(np.isfinite(np.asarray(out[1])).all()))  # fmt: skip
        if mode == "reduced":
            got["indices"] = indices.tolist()
        done[batch, steps, dtype] = got
        _extrapolations(part, cc)


def _extrapolations(part: Part, cc: dict[str, Any]) -> None:
    rows = {(r["batch"], r["steps"], r["dtype"]): r for r in part.doc["rows"]}
    for (batch, steps, dtype), row in rows.items():
        if steps != cc["steps"]:
            continue
        half = rows.get((batch, cc["half_steps"], dtype))
        ex = extrapolate(row["seconds"], steps, 1000, None if half is None else (half["seconds"], half["steps"]))
        ex["seconds_per_image"] = ex["seconds"] / batch
        row["extrapolated"] = ex
    part.write()


def ddcm_compress_torch(part: Part, mode: str) -> None:
    """The original's per-step loop as a cost model, batch 1 (one image, as the original codes)."""
    torch, dev = _need_torch(mode)
    from ddcm_jax.pixel import schedule_xs
    from ddcm_jax.schedule import Schedule

    part.doc["env"].update(_torch_env(torch, dev))
    cfg = MODES[mode]
    cc, tc = cfg["compress"], cfg["torch_compress"]
    steps, K = cc["steps"], cc["K"]
    t0 = time.perf_counter()
    net = _torch_adm(cfg, torch, dev)
    n = adm_config(cfg).image_size
    D = 3 * n * n
    xs = schedule_xs(Schedule.create("linear", 1000, str(steps)))
    s = [[float(v) for v in np.asarray(a)] for a in (xs.sqrt_recip_ab, xs.sqrt_recipm1_ab, xs.sqrt_ab_prev,
                                                      xs.dir_coef, xs.sigma)]  # fmt: skip
    ts = [torch.full((1,), int(v), dtype=torch.long, device=dev) for v in np.asarray(xs.t)]
    idx_i = [int(v) for v in np.asarray(xs.i)]
    images, labels = compress_inputs(cfg, 1)
    target = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(dev)
    y = torch.from_numpy(labels.astype(np.int64)).to(dev)
    x_T = torch.randn(1, 3, n, n, generator=torch.Generator().manual_seed(SEED)).to(dev)
    gen = torch.Generator(device=dev)
    part.doc["config"] = {"batch": 1, "steps": steps, "K": K, "D": D, "dtype": "float32", "build_s":
                          time.perf_counter() - t0, "loop": "per step: UNet forward, x0_hat (clipped), residual, "
                          "generator.manual_seed(step); torch.randn(K, D) @ r, argmax, DDIM step (eta 1)",
                          **tc}  # fmt: skip

    def loop(n_steps: int) -> list[Any]:
        x, chosen = x_T.clone(), []
        for j in range(n_steps):
            eps = net(x, ts[j], y)[:, :3]
            x0 = (s[0][j] * x - s[1][j] * eps).clamp(-1, 1)
            eps = (s[0][j] * x - x0) / s[1][j]
            if j < steps - 1:
                gen.manual_seed(SEED + idx_i[j])
                book = torch.randn(K, D, generator=gen, device=dev)
                k = torch.argmax(book @ (target - x0).reshape(-1))
                noise = book[k].view_as(x)
                chosen.append(k)
            else:
                noise = torch.zeros_like(x)
            x = s[2][j] * x0 + s[3][j] * eps + s[4][j] * noise
        return chosen

    sync = _torch_sync(torch, dev)
    with torch.inference_mode():
        try:
            sync(loop(min(2, steps)))  # warm-up (cuDNN / cuBLAS handles, allocator)
            _torch_reset_peak(torch, dev)
            timing, chosen = _timed(lambda: loop(steps), tc["repeats"], sync)
            row = {"impl": "torch_original_loop", "batch": 1, "steps": steps, "K": K, "D": D, **timing,
                   "seconds_per_image": timing["seconds"], "images_per_s": 1 / timing["seconds"],
                   "seconds_per_step": timing["seconds"] / steps, "peak_bytes": _torch_peak(torch, dev),
                   "indices_count": len(chosen)}  # fmt: skip
            ex = extrapolate(timing["seconds"], steps, 1000)
            ex["seconds_per_image"] = ex["seconds"]
            row["extrapolated"] = ex
            part.add_row(row)
        except Exception as exc:
            part.error(f"torch loop batch 1 steps {steps}", exc)


# -- case 3 --------------------------------------------------------------------------------------


def latent_config(mode_cfg: dict[str, Any], dtype: str = "float32") -> Any:
    """The round trip's `LatentModelConfig`: UNet and VAE at `dtype` compute, no tokenizer files
    (the benchmark never tokenizes: the empty prompt's embedding is computed from its ids)."""
    from ddcm_jax.latent_model import LatentModelConfig, SchedulerConfig
    from ddcm_jax.models import clip, sd_unet, sd_vae

    lc = mode_cfg["latent"]
    none = "sha256:" + hashlib.sha256(b"").hexdigest()
    return LatentModelConfig(unet=sd_unet.SDUNetConfig.from_json(lc["unet"], compute_dtype=dtype),
                             vae=sd_vae.SDVAEConfig.from_json(lc["vae"], compute_dtype=dtype),
                             text_encoder=clip.CLIPTextConfig.from_json(lc["text_encoder"]),
                             scheduler=SchedulerConfig.from_diffusers(lc["scheduler"]),
                             tokenizer_files=tuple((n, none) for n in ("merges.txt", "tokenizer_config.json",
                                                                       "vocab.json")))  # fmt: skip


def latent_params(mode_cfg: dict[str, Any]) -> Any:
    """Random weights of the real shapes (NumPy), the text encoder's included (it is part of the
    loaded model, so of its memory). `null_prompt`, the empty prompt's embedding the original
    computes once at start-up, is N(0, 1) here: no network runs, so the weights are the same
    bits in every process whatever its XLA options."""
    from ddcm_jax.latent_model import abstract_params

    config = latent_config(mode_cfg)
    abstract = {k: v for k, v in abstract_params(config).items() if k != "null_prompt"}
    params = random_params(abstract, SEED + 2)
    shape = (1, config.prompt_length, config.text_encoder.hidden_size)
    params["null_prompt"] = np.random.default_rng(SEED + 3).standard_normal(shape).astype(np.float32)
    return params


def latent_model(mode_cfg: dict[str, Any], params: Any, dtype: str = "float32") -> Any:
    from ddcm_jax.latent_model import LatentDiffusionModel

    return LatentDiffusionModel(latent_config(mode_cfg, dtype), params, "sha256:benchmark")


def latent_inputs(mode_cfg: dict[str, Any], batch: int) -> np.ndarray:
    """Images (B, H, W, 3) float32 in [-1, 1]; image i is the same in every batch."""
    n = mode_cfg["latent"]["image"]
    return np.stack([np.random.default_rng(2000 + i).uniform(-1, 1, (n, n, 3)) for i in range(batch)]).astype(np.float32)


def latent_compress_call(model: Any, images: Any, *, steps: int, codebook_size: int, num_atoms: int,
                         kernel: str = "xla") -> Any:  # fmt: skip
    """What the suite times for encoding: `ddcm_jax.compress`, rule turbo, philox codebooks, key = SEED."""
    import ddcm_jax

    res = ddcm_jax.compress(model, images, steps=steps, codebook_size=codebook_size, num_atoms=num_atoms,
                            rule="turbo", key=SEED, codebook_kernel=kernel)  # fmt: skip
    return res.indices, res.coeffs, res.image


def latent_decompress_call(model: Any, indices: Any, coeffs: Any, *, steps: int, codebook_size: int, num_atoms: int,
                           image_shape: tuple[int, ...]) -> Any:  # fmt: skip
    """Decoding: `ddcm_jax.decompress` of those indices and signs (its own UNet passes, VAE decoder)."""
    import ddcm_jax

    res = ddcm_jax.decompress(model, indices, coeffs, steps=steps, codebook_size=codebook_size, num_atoms=num_atoms,
                              rule="turbo", key=SEED, image_shape=image_shape)  # fmt: skip
    return res.image


def latent_turbo_jax(part: Part, mode: str) -> None:
    import jax
    import jax.numpy as jnp

    from ddcm_jax.respacing import no_bits_steps_heuristic

    _need_accelerator(mode)
    cfg = MODES[mode]
    lc = cfg["latent"]
    t0 = time.perf_counter()
    host = latent_params(cfg)
    params = jax.block_until_ready(jax.device_put(host))
    config = latent_config(cfg)
    n = lc["image"]
    f = config.downsampling_factor
    part.doc["config"] = {"unet": lc["unet"], "vae": lc["vae"], "text_encoder": lc["text_encoder"],
                          "scheduler": lc["scheduler"], "image": [n, n, 3], "latent": [n // f, n // f, 4],
                          "T": lc["T"], "K": lc["K"], "M": lc["M"], "D": (n // f) ** 2 * 4, "rule": "turbo",
                          "generator": "philox", "key": SEED, "plan": lc["plan"],
                          "no_bits_steps": no_bits_steps_heuristic(lc["T"], lc["K"], lc["M"], n, n),
                          "params": {k: sum(math.prod(v.shape) for v in jax.tree.leaves(params[k]))
                                     for k in ("unet", "vae", "text_encoder")},
                          "params_build_s": time.perf_counter() - t0,
                          "manifest_check": _manifest_check(config.unet, lc["manifest"])}  # fmt: skip
    if mode == "reduced":
        part.doc["config"]["params_sha256"] = params_sha256(host)
    del host
    part.write()
    kw = {"steps": lc["T"], "codebook_size": lc["K"], "num_atoms": lc["M"]}
    prev: dict[str, Any] | None = None
    for batch, dtype, repeats, kernel in lc["plan"]:
        model = latent_model(cfg, params, dtype)
        images = jnp.asarray(latent_inputs(cfg, batch))
        base = {"impl": "jax", "batch": batch, "dtype": dtype, "kernel": kernel, "T": lc["T"], "K": lc["K"],
                "M": lc["M"]}  # fmt: skip
        est = _estimate(prev, batch, 2 * (repeats + 1))
        enc_fn = functools.partial(latent_compress_call, kernel=kernel, **kw)
        enc, out = _jax_item(part, f"jax compress {dtype} {kernel} batch {batch}", enc_fn, (model, images), repeats,
                             est, {**base, "phase": "compress"})  # fmt: skip
        if not enc:
            continue
        indices, coeffs, image = out
        enc.update(seconds_per_image=enc["seconds"] / batch, indices_shape=list(np.shape(indices)),
                   indices_sha256=_sha(np.asarray(indices, np.int32)), image_finite=bool(np.isfinite(image).all()))  # fmt: skip
        if mode == "reduced":
            enc["indices"] = np.asarray(indices).tolist()
            enc["coeffs"] = np.asarray(coeffs).tolist()
        part.write()
        dec_fn = functools.partial(latent_decompress_call, image_shape=tuple(images.shape), **kw)
        dec, decoded = _jax_item(part, f"jax decompress {dtype} {kernel} batch {batch}", dec_fn,
                                 (model, jnp.asarray(indices), jnp.asarray(coeffs)), repeats, 0.0,
                                 {**base, "phase": "decompress"})  # fmt: skip
        if not dec:
            continue
        same = bool(np.array_equal(np.asarray(decoded), np.asarray(image)))
        dec.update(seconds_per_image=dec["seconds"] / batch, decoded_equals_encoder_image=same,
                   roundtrip_seconds=enc["seconds"] + dec["seconds"],
                   roundtrip_seconds_per_image=(enc["seconds"] + dec["seconds"]) / batch,
                   roundtrip_images_per_s=batch / (enc["seconds"] + dec["seconds"]))  # fmt: skip
        part.write()
        prev = {"batch": batch, "seconds": dec["roundtrip_seconds"] / 2,
                "compile_s": enc["compile_s"] + dec["compile_s"]}  # fmt: skip


def latent_turbo_torch(part: Part, mode: str) -> None:
    """Turbo-DDCM's own round trip (`roundtrip.py`: `TurboDDCM.compress`, then `.decompress`), batch 1.

    Its loop rewritten around diffusers' UNet2DConditionModel and AutoencoderKL of the same
    configs (random weights): at start-up (untimed, as in the original) the empty prompt's
    embedding (random here: the text encoder is not timed) and the first UNet call on x_T;
    compress: VAE encode (mode x scaling), per coded step the UNet (except the first), x0_hat,
    residual, `manual_seed` + `codebook.normal_()` of the (D, K) buffer, `codebook.T @ r`,
    `topk(|.|, M)`, the signed sum `codebook @ x` over its std, the DDIM step (eta 1) and the
    indices to the host (`.item()`, as its bit-stream encoder takes them); then the no-bits
    steps (eta 0) and the VAE decode; decompress: the same steps from the indices.
    """
    torch, dev = _need_torch(mode)
    try:
        import diffusers
    except ImportError as exc:
        raise Skip(f"diffusers not installed ({exc})") from exc
    from ddcm_jax.respacing import no_bits_steps_heuristic, turbo_timesteps

    part.doc["env"].update(_torch_env(torch, dev), diffusers=diffusers.__version__)
    cfg = MODES[mode]
    lc, tl = cfg["latent"], cfg["torch_latent"]
    dtype = getattr(torch, tl["dtype"])
    T, K, M, n = lc["T"], lc["K"], lc["M"], lc["image"]
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    diffusers.utils.logging.set_verbosity_error()  # its note on casting a random model with `.to`
    with torch.device(dev):
        unet = diffusers.UNet2DConditionModel.from_config(lc["unet"]).to(dtype).eval()
        vae = diffusers.AutoencoderKL.from_config(lc["vae"]).to(dtype).eval()
    config = latent_config(cfg)
    ac = torch.tensor(config.scheduler.alphas_cumprod(), dtype=torch.float32, device=dev)
    final_ac = config.scheduler.final_alpha_cumprod()
    scale = float(config.vae.scaling_factor)
    ts, _ = turbo_timesteps(T)
    ts = [int(v) for v in ts]
    nbs = no_bits_steps_heuristic(T, K, M, n, n)
    f = config.downsampling_factor
    shape = (1, 4, n // f, n // f)
    D = math.prod(shape)
    context = torch.randn(1, config.prompt_length, config.text_encoder.hidden_size, device=dev, dtype=dtype)
    part.doc["config"] = {"batch": 1, "T": T, "K": K, "M": M, "D": D, "dtype": tl["dtype"], "no_bits_steps": nbs,
                          "timesteps": ts, "build_s": time.perf_counter() - t0, "params": {
                              "unet": sum(p.numel() for p in unet.parameters()),
                              "vae": sum(p.numel() for p in vae.parameters())}, **tl}  # fmt: skip
    part.write()

    def eps_of(x: Any, t: int) -> Any:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    def reverse(eps: Any, j: int, x: Any, eta: float, noise: Any) -> Any:
        a = ac[ts[j]]
        a_prev = ac[ts[j + 1]] if j + 1 < T else torch.tensor(final_ac, device=dev)
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        out = a_prev**0.5 * x0 + (1 - a_prev - eta * var) ** 0.5 * eps
        return out + eta * var**0.5 * noise if eta > 0 else out

    g = torch.Generator(device=dev)
    x_T = torch.randn(shape, generator=g.manual_seed(SEED), device=dev, dtype=dtype)
    codebook = torch.empty(D, K, device=dev, dtype=dtype)
    with torch.inference_mode():
        eps_T = eps_of(x_T, ts[0])  # start-up, untimed (the original's `x_T_denoised`)

    def tail(x: Any, j: int) -> Any:
        for jj in range(j, T):  # the no-bits steps (eta 0) and the last one
            x = reverse(eps_of(x.to(dtype), ts[jj]), jj, x, 0.0, None)
        return vae.decode(x.to(dtype) / scale).sample.clamp(-1, 1)

    def compress(image: Any) -> tuple[Any, list[list[int]], list[list[int]]]:
        target = vae.encode(image).latent_dist.mode() * scale
        x, chosen, signs = x_T, [], []
        for j in range(T - 1 - nbs):
            eps = eps_T if j == 0 else eps_of(x.to(dtype), ts[j])
            a = ac[ts[j]]
            r = (target - ((x - (1 - a) ** 0.5 * eps) / a**0.5).to(dtype)).to(dtype)
            g.manual_seed(SEED + j + 1)
            codebook.normal_(generator=g)
            ip = codebook.T @ r.reshape(-1)
            top = torch.topk(ip.abs(), M).indices
            w = torch.zeros(K, device=dev, dtype=dtype)
            w[top] = torch.sign(ip[top])
            noise = codebook @ w
            noise = (noise / noise.std()).view(shape)
            x = reverse(eps, j, x, 1.0, noise)
            chosen.append([int(v.item()) for v in top])
            signs.append([int((w[v] > 0).item()) for v in top])
        return tail(x, T - 1 - nbs), chosen, signs

    def decompress(chosen: list[list[int]], signs: list[list[int]]) -> Any:
        x = x_T
        for j in range(T - 1 - nbs):
            eps = eps_T if j == 0 else eps_of(x.to(dtype), ts[j])
            g.manual_seed(SEED + j + 1)
            codebook.normal_(generator=g)
            w = torch.zeros(K, device=dev, dtype=dtype)
            w[chosen[j]] = 2 * torch.tensor(signs[j], device=dev, dtype=dtype) - 1
            noise = codebook @ w
            x = reverse(eps, j, x, 1.0, (noise / noise.std()).view(shape))
        return tail(x, T - 1 - nbs)

    image = torch.from_numpy(latent_inputs(cfg, 1).transpose(0, 3, 1, 2).copy()).to(dev, dtype)
    sync = _torch_sync(torch, dev)
    with torch.inference_mode():
        try:
            sync(compress(image)[0])  # warm-up (cuDNN / cuBLAS handles, allocator)
            _torch_reset_peak(torch, dev)
            enc, (_, chosen, signs) = _timed(lambda: compress(image), tl["repeats"], lambda out: (sync(out[0]), out)[1])
            dec, _ = _timed(lambda: decompress(chosen, signs), tl["repeats"], sync)
            part.add_row({"impl": "torch_original_loop", "batch": 1, "dtype": tl["dtype"], "T": T, "K": K, "M": M,
                          "compress": enc, "decompress": dec, "seconds": enc["seconds"] + dec["seconds"],
                          "roundtrip_seconds_per_image": enc["seconds"] + dec["seconds"],
                          "roundtrip_images_per_s": 1 / (enc["seconds"] + dec["seconds"]),
                          "coded_steps": len(chosen), "peak_bytes": _torch_peak(torch, dev)})  # fmt: skip
        except Exception as exc:
            part.error("torch round trip batch 1", exc)


# -- case 4 --------------------------------------------------------------------------------------


def _sd_config(cfg: dict[str, Any]) -> Any:
    from ddcm_jax.models import sd_unet

    return sd_unet.SDUNetConfig.from_json(cfg["sd"]["unet"])


def _manifest_check(ucfg: Any, name: str | None) -> dict[str, Any]:
    """Our UNet's state-dict shapes against the released model's key/shape manifest, if present."""
    from ddcm_jax.models import sd_unet

    if name is None:
        return {"status": "not applicable (tiny config)"}
    path = SHARED / "reference" / name / "unet" / "state_dict_shapes.json"
    if not path.is_file():
        return {"status": f"manifest not found at {path}"}
    want = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    have = {k: tuple(v) for k, v in sd_unet.state_dict_shapes(ucfg).items()}
    bad = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    status = "match" if want == have else "MISMATCH"
    return {"status": status, "keys": len(want), "params": sum(math.prod(v) for v in want.values()),
            "missing": sorted(want.keys() - have.keys())[:8], "unexpected": sorted(have.keys() - want.keys())[:8],
            "mis_shaped": bad[:8]}  # fmt: skip


def sd_components_jax(part: Part, mode: str) -> None:
    import jax
    import jax.numpy as jnp

    import ddcm_jax
    from ddcm_jax.models import sd_unet

    _need_accelerator(mode)
    cfg = MODES[mode]
    sc, tb = cfg["sd"], cfg["turbo"]
    ucfg = _sd_config(cfg)
    part.doc["config"] = {"unet": sc["unet"], "latent": [sc["latent"], sc["latent"], 4],
                          "context": [sc["context"], ucfg.cross_attention_dim], "turbo": tb,
                          "manifest_check": _manifest_check(ucfg, sc["manifest"])}  # fmt: skip
    part.write()

    # Turbo-DDCM selection first (small): one step, top-M of |<z_k, r>| over K key-derived atoms.
    shape = (tb["latent"], tb["latent"], 4)
    r = jnp.asarray(np.random.default_rng(7).standard_normal(shape).astype(np.float32))
    key = jax.random.key(SEED)

    def turbo(key: Any, r: Any, step: Any) -> Any:
        return ddcm_jax.select_atoms(key, r, tb["K"], step=step, num_atoms=tb["M"], rule="turbo")

    row = {"component": "turbo_select", "K": tb["K"], "D": math.prod(shape), "M": tb["M"], "batch": 1}
    got, out = _jax_item(part, "turbo selection", turbo, (key, r, jnp.int32(5)), tb["repeats"], 0.0, row)
    if got:
        idx = np.asarray(out[0])
        got.update(steps_per_s=1 / got["seconds"], distinct_indices=len(set(idx.tolist())) == tb["M"],
                   noise_std=float(np.std(np.asarray(out[1]), ddof=1)))  # fmt: skip
        part.write()

    t0 = time.perf_counter()
    params = jax.block_until_ready(jax.device_put(random_params(sd_unet.abstract_params(ucfg), SEED + 1)))
    part.doc["config"]["params"] = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    part.doc["config"]["params_build_s"] = time.perf_counter() - t0
    part.write()
    n, prev = sc["latent"], None
    for batch, dtype in sc["items"]:
        rng = np.random.default_rng(batch)
        x = jnp.asarray(rng.standard_normal((batch, n, n, 4)).astype(np.float32))
        t = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
        ctx = jnp.asarray(rng.standard_normal((batch, sc["context"], ucfg.cross_attention_dim)).astype(np.float32))
        fn = functools.partial(sd_unet.sd_unet_apply, ucfg, dtype=dtype)
        row = {"component": "sd_unet", "dtype": dtype, "batch": batch}
        est = _estimate(prev, batch, sc["repeats"] + 1)
        got, _ = _jax_item(part, f"sd unet {dtype} batch {batch}", fn, (params, x, t, ctx), sc["repeats"], est, row)
        if got:
            got["latents_per_s"] = batch / got["seconds"]
            part.write()
            prev = got


def sd_components_torch(part: Part, mode: str) -> None:
    """Turbo-DDCM's own selection step (its code's way): randn(D, K), r @ book, topk(|.|), signed sum."""
    torch, dev = _need_torch(mode)
    part.doc["env"].update(_torch_env(torch, dev))
    tb = MODES[mode]["turbo"]
    K, M, D = tb["K"], tb["M"], tb["latent"] ** 2 * 4
    part.doc["config"] = {"K": K, "M": M, "D": D}
    r = torch.from_numpy(np.random.default_rng(7).standard_normal(D).astype(np.float32)).to(dev)
    gen = torch.Generator(device=dev)

    def select() -> Any:
        gen.manual_seed(SEED + 6)
        book = torch.randn(D, K, generator=gen, device=dev)
        ip = r @ book
        top = torch.topk(ip.abs(), M).indices
        noise = (book[:, top] * torch.sign(ip[top])).sum(1)
        return top, noise / noise.std()

    with torch.inference_mode():
        try:
            _torch_reset_peak(torch, dev)
            timing, _ = _timed(select, tb["repeats"], _torch_sync(torch, dev))
            part.add_row({"impl": "torch", "component": "turbo_select", "K": K, "D": D, "M": M, "batch": 1,
                          **timing, "steps_per_s": 1 / timing["seconds"], "peak_bytes": _torch_peak(torch, dev)})  # fmt: skip
        except Exception as exc:
            part.error("torch turbo selection", exc)


# -- case 5 --------------------------------------------------------------------------------------


def _select(key: Any, r: Any, step: Any, *, k: int, m: int, rule: str, kernel: str) -> Any:
    import ddcm_jax

    return ddcm_jax.select_atoms(key, r, k, step=step, num_atoms=m, rule=rule, kernel=kernel)


def _torch_select(torch: Any, gen: Any, dev: str, r: Any, rule: str, k: int, m: int) -> Any:
    gen.manual_seed(SEED + 6)
    if rule == "ddcm":
        return torch.argmax(torch.randn(k, r.numel(), generator=gen, device=dev) @ r)
    ip = r @ torch.randn(r.numel(), k, generator=gen, device=dev)
    return torch.topk(ip.abs(), m).indices


def selection_jax(part: Part, mode: str) -> None:
    """One step's selection, XLA's chunked stream against the fused Pallas kernel: same indices?"""
    import jax
    import jax.numpy as jnp

    _need_accelerator(mode)
    sc = MODES[mode]["selection"]
    part.doc["config"] = {"items": sc["items"], "kernels": ["xla", "pallas"], "repeats": sc["repeats"]}
    part.write()
    for name, rule, k, shape, m in sc["items"]:
        r = jnp.asarray(np.random.default_rng(7).standard_normal(shape).astype(np.float32))
        key = jax.random.key(SEED)
        got: dict[str, Any] = {}
        for kernel in ("xla", "pallas"):
            select = functools.partial(_select, k=k, m=m, rule=rule, kernel=kernel)
            row = {"case": name, "rule": rule, "kernel": kernel, "K": k, "D": math.prod(shape), "M": m, "batch": 1}
            done, out = _jax_item(part, f"{name} {kernel}", select, (key, r, jnp.int32(5)), sc["repeats"], 0.0, row)
            if done:
                done["steps_per_s"] = 1 / done["seconds"]
                got[kernel] = (done, np.asarray(out[0]))
        if len(got) == 2:
            (xla, a), (pallas, b) = got["xla"], got["pallas"]
            pallas.update(same_indices_as_xla=bool(np.array_equal(a, b)), xla_over_pallas_seconds=xla["seconds"] /
                          pallas["seconds"])  # fmt: skip
        part.write()


def selection_torch(part: Part, mode: str) -> None:
    """The originals' selection step: `randn(K, D)` (DDCM) or `randn(D, K)` (Turbo), matmul, argmax or topk."""
    torch, dev = _need_torch(mode)
    part.doc["env"].update(_torch_env(torch, dev))
    sc = MODES[mode]["selection"]
    part.doc["config"] = {"items": sc["items"], "repeats": sc["repeats"]}
    gen = torch.Generator(device=dev)
    for name, rule, k, shape, m in sc["items"]:
        d = math.prod(shape)
        r = torch.from_numpy(np.random.default_rng(7).standard_normal(d).astype(np.float32)).to(dev)
        select = functools.partial(_torch_select, torch, gen, dev, r, rule, k, m)

        with torch.inference_mode():
            try:
                _torch_reset_peak(torch, dev)
                timing, _ = _timed(select, sc["repeats"], _torch_sync(torch, dev))
                part.add_row({"impl": "torch", "case": name, "rule": rule, "K": k, "D": d, "M": m, "batch": 1,
                              **timing, "steps_per_s": 1 / timing["seconds"], "peak_bytes": _torch_peak(torch, dev)})  # fmt: skip
            except Exception as exc:
                part.error(f"torch {name}", exc)


FUNCS = {
    ("adm_forward", "jax"): adm_forward_jax,
    ("adm_forward", "torch"): adm_forward_torch,
    ("ddcm_compress", "jax"): ddcm_compress_jax,
    ("ddcm_compress", "torch"): ddcm_compress_torch,
    ("latent_turbo", "jax"): latent_turbo_jax,
    ("latent_turbo", "torch"): latent_turbo_torch,
    ("sd_components", "jax"): sd_components_jax,
    ("sd_components", "torch"): sd_components_torch,
    ("selection", "jax"): selection_jax,
    ("selection", "torch"): selection_torch,
}


def _watchdog(parent: int, hard_deadline: float) -> None:
    """End this process if the driver is gone (killed outright) or the hard deadline passed."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent or time.time() > hard_deadline:
                os._exit(4)

    threading.Thread(target=watch, daemon=True, name="gpu_suite_watchdog").start()


def child_main(args: argparse.Namespace) -> int:
    _watchdog(os.getppid(), args.hard_deadline or math.inf)
    part = Part(args.case, args.side, args.mode, Path(args.out), args.deadline)
    status = "error"
    try:
        if args.side == "jax":
            import jax

            jax.config.update("jax_numpy_rank_promotion", MODES[args.mode]["rank_promotion"])
            part.doc["env"].update(_jax_env())
        part.write()
        if os.environ.get("GPU_SUITE_CRASH") == f"{args.case}:{args.side}":  # the tests' hard crash
            os._exit(3)
        if os.environ.get("GPU_SUITE_HANG") == f"{args.case}:{args.side}":  # the tests' part that outlives the budget
            time.sleep(3600)
        FUNCS[args.case, args.side](part, args.mode)
        status = "partial" if part.doc["skipped"] or part.doc["errors"] else "ok"
    except Skip as exc:
        status, part.doc["reason"] = "skipped", str(exc)
    except BaseException as exc:  # recorded; the exit code says it
        part.doc["error"] = f"{type(exc).__name__}: {exc}"
        part.doc["traceback"] = traceback.format_exc()[-6000:]
    part.doc["status"] = status
    part.write()
    return 1 if status == "error" else 0


# ------------------------------------------------------------------------------------------------
# The driver: parts in priority order, one subprocess each, under one budget.


class _Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _kill(proc: subprocess.Popen) -> None:
    """End the child's process group (it runs in its own session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _echo(path: Path, pos: int) -> int:
    """Print what a child wrote to its log since `pos` (progress lines, warnings); the new position."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            new = f.read()
    except OSError:
        return pos
    if new:
        sys.stdout.write(new.decode(errors="replace"))
        sys.stdout.flush()
    return pos + len(new)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _case_status(parts: dict[str, dict[str, Any]]) -> str:
    statuses = [p.get("status", "error") for p in parts.values()]
    if all(s == "skipped" for s in statuses):
        return "skipped"
    for worst in ("error", "timeout", "running"):
        if worst in statuses:
            return "error" if worst == "running" else worst
    return "ok" if all(s == "ok" for s in statuses) else "partial"


def _rows(case: dict[str, Any], side: str) -> list[dict[str, Any]]:
    return case.get("parts", {}).get(side, {}).get("rows", [])


def summarize(name: str, case: dict[str, Any]) -> dict[str, Any]:
    """Numbers across the sides of a case (JAX vs PyTorch)."""
    jx, tr = _rows(case, "jax"), _rows(case, "torch")
    out: dict[str, Any] = {}
    if name == "adm_forward":
        for r in jx + tr:
            out[f"{r['impl']}_{r['dtype']}_b{r['batch']}_images_per_s"] = r["images_per_s"]
        for r in tr:
            j = next((x for x in jx if x["dtype"] == "float32" and x["batch"] == r["batch"]), None)
            if j:
                out[f"torch_over_jax_seconds_float32_b{r['batch']}"] = r["seconds"] / j["seconds"]
    elif name == "ddcm_compress":
        t = next((r for r in tr if r["batch"] == 1), None)
        steps = case.get("parts", {}).get("jax", {}).get("config", {}).get("steps")
        for r in jx:
            if r["steps"] != steps:
                continue
            at = f"b{r['batch']}" if r.get("dtype", "float32") == "float32" else f"b{r['batch']}_{r['dtype']}"
            out[f"jax_{at}_seconds_per_image"] = r["seconds_per_image"]
            out[f"jax_{at}_seconds_per_image_1000_steps"] = r["extrapolated"]["seconds_per_image"]
            if t and t["steps"] == r["steps"]:
                if at == "b1":
                    out["jax_over_torch_seconds_per_image_b1"] = r["seconds_per_image"] / t["seconds_per_image"]
                out[f"speedup_vs_torch_b1_per_image_jax_{at}"] = t["seconds_per_image"] / r["seconds_per_image"]
        if t:
            out["torch_b1_seconds_per_image"] = t["seconds_per_image"]
            out["torch_b1_seconds_per_image_1000_steps"] = t["extrapolated"]["seconds_per_image"]
    elif name == "latent_turbo":
        t = next((r for r in tr if r["batch"] == 1), None)
        if t:
            out["torch_b1_roundtrip_seconds_per_image"] = t["roundtrip_seconds_per_image"]
        for r in jx:
            if r["phase"] != "decompress":
                continue
            at = f"jax_{r['dtype']}_b{r['batch']}" + ("" if r.get("kernel", "xla") == "xla" else f"_{r['kernel']}")
            out[f"{at}_roundtrip_seconds_per_image"] = r["roundtrip_seconds_per_image"]
            if t:
                out[f"speedup_vs_torch_b1_per_image_{at}"] = t["roundtrip_seconds_per_image"] / r["roundtrip_seconds_per_image"]
    elif name == "selection":
        for r in jx:
            if r["kernel"] == "pallas" and "same_indices_as_xla" in r:
                out[f"{r['case']}_xla_over_pallas_seconds"] = r["xla_over_pallas_seconds"]
                out[f"{r['case']}_same_indices"] = r["same_indices_as_xla"]
            t = next((x for x in tr if x["case"] == r["case"]), None)
            if t:
                out[f"{r['case']}_torch_over_jax_{r['kernel']}_seconds"] = t["seconds"] / r["seconds"]
    elif name == "sd_components":
        j = next((r for r in jx if r["component"] == "turbo_select"), None)
        t = next((r for r in tr if r["component"] == "turbo_select"), None)
        if j and t:
            out["turbo_select_torch_over_jax_seconds"] = t["seconds"] / j["seconds"]
        for r in jx:
            if r["component"] == "sd_unet":
                out[f"sd_unet_{r['dtype']}_b{r['batch']}_latents_per_s"] = r["latents_per_s"]
    return out


def run_suite(mode: str, json_path: Path, budget_s: float, cases: list[str]) -> int:
    t_start, wall_start = time.monotonic(), time.time()
    end = t_start + budget_s
    doc: dict[str, Any] = {
        "suite": "gpu_suite", "mode": mode, "budget_s": budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall_start)),
        "finished": False, "interrupted": None, "elapsed_s": 0.0,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": _versions(), "device": {"jax_device_kind": None, "jax_backend": None, "torch_cuda_device": None},
        "cases": {name: {"status": "pending", "parts": {}} for name in cases},
    }  # fmt: skip

    def save() -> None:
        doc["elapsed_s"] = time.monotonic() - t_start
        _write_json(json_path, doc)

    def take(name: str, side: str, part: dict[str, Any]) -> None:
        case = doc["cases"][name]
        case["parts"][side] = part
        env = part.get("env", {})
        if side == "jax" and env.get("device_kind") and not doc["device"]["jax_device_kind"]:
            doc["device"].update(jax_device_kind=env["device_kind"], jax_backend=env.get("backend"))
        if side == "torch" and env.get("device") and doc["device"]["torch_cuda_device"] is None:
            doc["device"]["torch_cuda_device"] = env.get("cuda_device_name") or "none (torch on cpu)"

    save()
    todo = [(c, s, w) for c, s, w in PARTS if c in cases]
    min_start = MODES[mode]["min_start_s"]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    extra = MODES[mode]["xla_flags"]
    if extra and extra.split("=")[0] not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    proc = None
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
            for i, (name, side, weight) in enumerate(todo):
                left = end - time.monotonic()
                if left < max(min_start, 1.0):
                    take(name, side, {"status": "skipped", "reason": f"suite budget exhausted ({left:.0f} s left)"})
                    doc["cases"][name]["status"] = _case_status(doc["cases"][name]["parts"])
                    save()
                    continue
                share = left * weight / sum(w for _, _, w in todo[i:])
                out, log = Path(tmp) / f"{name}.{side}.json", Path(tmp) / f"{name}.{side}.log"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--case", name,
                       "--side", side, "--out", str(out), "--deadline", repr(time.time() + share),
                       "--hard-deadline", repr(time.time() + left + 10)]  # fmt: skip
                child_env = dict(env, JAX_PLATFORMS="cpu") if side == "torch" else env  # torch owns the GPU there
                _log(f"{name}:{side} start (share {share:.0f} s, hard limit {left:.0f} s)")
                doc["cases"][name]["status"] = "running"
                t0 = time.monotonic()
                with open(log, "wb") as logf:
                    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=child_env,
                                            start_new_session=True)  # fmt: skip
                    seen, timed_out, echoed = 0.0, False, 0
                    while True:
                        try:
                            proc.wait(timeout=min(2.0, max(end - time.monotonic(), 0.05)))
                            break
                        except subprocess.TimeoutExpired:
                            pass
                        finally:
                            echoed = _echo(log, echoed)
                        if out.is_file() and out.stat().st_mtime != seen:  # keep what finished so far
                            seen = out.stat().st_mtime
                            with contextlib.suppress(ValueError, OSError):
                                take(name, side, json.loads(out.read_text()))
                                save()
                        if time.monotonic() >= end:
                            timed_out = True
                            _kill(proc)
                            break
                rc, proc = proc.returncode, None
                try:
                    part = json.loads(out.read_text())
                except (OSError, ValueError):
                    part = {"status": "error", "rows": [], "skipped": [], "errors": []}
                part["seconds"] = time.monotonic() - t0
                part["returncode"] = rc
                if timed_out:
                    part["status"], part["error"] = "timeout", f"killed at the suite budget ({budget_s:.0f} s)"
                elif rc != 0 or part.get("status") not in ("ok", "partial", "skipped"):
                    part["status"] = "error"
                    part.setdefault("error", f"exit code {rc}")
                if part["status"] in ("error", "timeout"):
                    part["log_tail"] = _tail(log)
                take(name, side, part)
                case = doc["cases"][name]
                case["status"] = _case_status(case["parts"])
                try:
                    case["summary"] = summarize(name, case)
                except (KeyError, TypeError, ZeroDivisionError) as exc:  # rows cut short by a kill
                    case["summary"] = {"error": f"{type(exc).__name__}: {exc}"}
                save()
                _log(f"{name}:{side} {part['status']} in {part['seconds']:.1f} s"
                     + (f" ({part.get('reason') or part.get('error')})" if part["status"] not in ("ok", "partial") else ""))  # fmt: skip
        doc["finished"] = True
    except (_Interrupted, KeyboardInterrupt) as exc:
        doc["interrupted"] = str(exc) or type(exc).__name__
        if proc is not None:
            _kill(proc)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        save()
    _log(f"wrote {json_path} in {time.monotonic() - t_start:.1f} s: "
         + ", ".join(f"{n} {c['status']}" for n, c in doc["cases"].items()))  # fmt: skip
    bad = [c["status"] for c in doc["cases"].values() if c["status"] in ("error", "timeout", "pending", "running")]
    return 1 if bad or not doc["finished"] else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--json", type=Path, help="results file (default benchmarks/results/gpu_suite_<mode>.json)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget in seconds")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="a subset, in priority order")
    # One side of one case (the driver starts these).
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--hard-deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        if not (args.side and args.out and args.deadline):
            ap.error("--case needs --side, --out and --deadline")
        return child_main(args)
    json_path = args.json or REPO / "benchmarks" / "results" / f"gpu_suite_{args.mode}.json"
    return run_suite(args.mode, json_path, args.budget_s, [c for c in CASES if c in args.cases])


if __name__ == "__main__":
    sys.exit(main())
