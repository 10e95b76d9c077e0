"""Forward time of the Flax Stable Diffusion UNet vs diffusers' PyTorch UNet2DConditionModel, one run.

    python benchmarks/bench_sd_unet.py --json benchmarks/results/sd_unet_cpu.json

A mid-size SD 2.x-style configuration (block_out_channels [64, 128, 256], two
cross-attention levels and a plain one, heads of width 64 as in SD 2, linear
projections, cross_attention_dim 256, latents 4x32x32, 77-token context). Both
sides run the same random weights: the diffusers model is built first, layers
it zero-initialises are filled with small random values, and its state dict is
converted with the strict converter (`sd_unet.params_from_state_dict`); the
outputs are compared before timing. Reports the median of `--repeats` timed
calls after one warm-up call (JAX: after compilation, reported separately),
the two sides' calls interleaved so that both see the same load. The JAX side is
the package's program (`ddcm_jax.jit`, with its XLA:CPU options);
`jax_plain_jit_s` is the same function under a plain `jax.jit`, in the same rounds.
Needs the `bench` extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

# jax, torch and the Flax model are imported in main(), after --cpus has pinned the process.

CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": [1, 2, 4],  # the NUMBER of heads per level: width 64, as in SD 2
    "cross_attention_dim": 256,
    "use_linear_projection": True,
    "upcast_attention": False,
    "norm_num_groups": 32,
}
LATENT, CONTEXT_LEN = 32, 77


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def build(seed: int = 0):
    """(torch model, Flax config, Flax params) with the same weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from ddcm_jax.models import sd_unet

    torch.manual_seed(seed)
    net = UNet2DConditionModel.from_config(CONFIG).eval()
    with torch.no_grad():
        for _, p in net.named_parameters():
            if p.ndim > 1 and not p.any():  # diffusers zero-initialises conv_out, proj_out
                p.normal_(0.0, 0.02)
    cfg = sd_unet.SDUNetConfig.from_json(CONFIG)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    params = sd_unet.params_from_state_dict(cfg, state)
    return net, cfg, params


def bench(net, cfg, params, batch: int, repeats: int, torch_device: str, jax_device) -> dict:
    import jax
    import torch

    from ddcm_jax.jit import jit
    from ddcm_jax.models import sd_unet

    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, LATENT, LATENT, 4)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    ctx = rng.standard_normal((batch, CONTEXT_LEN, cfg.cross_attention_dim)).astype(np.float32)
    row: dict = {"batch": batch, "latent": [4, LATENT, LATENT], "torch_device": torch_device}

    tnet = net.to(torch_device)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(torch_device)
    tt = torch.from_numpy(t).to(torch_device)
    ct = torch.from_numpy(ctx).to(torch_device)

    def torch_call():
        out = tnet(xt, tt, ct).sample
        if torch_device != "cpu":
            torch.cuda.synchronize()
        return out

    p = jax.device_put(params, jax_device)
    xs, ts, cs = (jax.device_put(a, jax_device) for a in (x, t, ctx))
    # The package's program (`ddcm_jax.jit`, as `model(x, t, context)` and the codec compile
    # it), and the plain `jax.jit` of the same function beside it.
    fwd = jit(lambda pp, a, b, c: sd_unet.sd_unet_apply(cfg, pp, a, b, c))
    plain = jax.jit(lambda pp, a, b, c: sd_unet.sd_unet_apply(cfg, pp, a, b, c))
    t0 = time.perf_counter()
    out = np.asarray(fwd(p, xs, ts, cs).block_until_ready())
    row["jax_compile_s"] = time.perf_counter() - t0
    plain(p, xs, ts, cs).block_until_ready()

    def jax_call():
        return fwd(p, xs, ts, cs).block_until_ready()

    def plain_call():
        return plain(p, xs, ts, cs).block_until_ready()

    with torch.inference_mode():
        ref = torch_call().cpu().numpy().transpose(0, 2, 3, 1)
        row["max_abs_diff_vs_torch"] = float(np.abs(out - ref).max())
        jax_call()  # warm-up after compilation
        # Interleaved, so that both sides see the same load on a shared machine.
        torch_times, jax_times, plain_times = [], [], []
        for _ in range(repeats):
            torch_times += _time(torch_call, 1)
            jax_times += _time(jax_call, 1)
            plain_times += _time(plain_call, 1)
    row["torch_s"] = statistics.median(torch_times)
    row["jax_s"] = statistics.median(jax_times)
    row["jax_plain_jit_s"] = statistics.median(plain_times)
    row["torch_all_s"], row["jax_all_s"] = torch_times, jax_times
    row["speedup_vs_torch"] = row["torch_s"] / row["jax_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                        help="JAX platform; torch uses CUDA for gpu when it has it, else the CPU")  # fmt: skip
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. the machine)")
    parser.add_argument("--cpus", type=int, help="pin the process to this many CPUs (both sides' thread pools)")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
        if args.cpus == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                       " intra_op_parallelism_threads=1").strip()  # fmt: skip

    import diffusers
    import jax
    import torch

    from ddcm_jax.jit import compiler_options

    if args.cpus:
        torch.set_num_threads(args.cpus)

    jax_device = jax.devices(args.device)[0]
    torch_device = "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"
    net, cfg, params = build()
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    load_before = os.getloadavg()
    rows = []
    for batch in args.batches:
        row = bench(net, cfg, params, batch, args.repeats, torch_device, jax_device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "sd_unet_forward",
        "note": args.note,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "cpus_used": len(os.sched_getaffinity(0)),
            "jax_backend": jax_device.platform,
            "jax_device": str(jax_device),
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "jax_version": jax.__version__,
        "jax_compiler_options": compiler_options() if jax_device.platform == "cpu" else {},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "diffusers_version": diffusers.__version__,
        "config": CONFIG,
        "params": n_params,
        "context": [CONTEXT_LEN, CONFIG["cross_attention_dim"]],
        "compute_dtype": "float32",
        "repeats": args.repeats,
        "timing": "median of repeats after one warm-up call (JAX: after compilation), calls interleaved",
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
