"""Forward time of the Flax ADM vs the same network in PyTorch, side by side in one run.

    python benchmarks/bench_adm_forward.py --json out/adm_forward.json

The PyTorch network is `tests/torch_adm.py` (the test suite checks it computes
what the converted Flax model computes); both run the same random weights.
With `--guided-diffusion DIR` (a checkout of openai/guided-diffusion: the folder
holding its `guided_diffusion` package) the original UNet itself is timed too,
built by its `create_model` with the same options and loaded with the same
state dict (strict); its output's largest difference from `tests/torch_adm.py`'s
is recorded. Reports the median of `--repeats` timed calls after warm-up (and,
for JAX, after compilation, reported separately), the sides interleaved. The
JAX side is the package's program (`ddcm_jax.jit`, with its XLA:CPU options, as
`model(x, t)` and the codec compile it); `jax_plain_jit_s` is the same function
under a plain `jax.jit`, timed in the same rounds. Needs
the `bench` extra for torch; without it only the JAX side is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from configs import CONFIGS
from ddcm_jax.convert import convert_state_dict

from ddcm_jax.jit import compiler_options, jit
from ddcm_jax.models import ADMConfig, adm_apply


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _original(kwargs: dict, net: object) -> object:
    """guided-diffusion's own UNet (`create_model`) with `net`'s weights, strictly loaded."""
    import inspect

    from guided_diffusion import script_util

    params = inspect.signature(script_util.create_model).parameters
    defaults = {k: v for k, v in script_util.model_and_diffusion_defaults().items() if k in params}
    model = script_util.create_model(**{**defaults, **kwargs})
    model.load_state_dict(net.state_dict(), strict=True)
    return model.eval()


def bench(name: str, kwargs: dict, batch: int, repeats: int, dtype: str, original: bool = False) -> dict:
    cfg = ADMConfig.from_create_model({**kwargs, "compute_dtype": dtype})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    row: dict = {"config": name, "batch": batch, "compute_dtype": dtype}
    try:
        import torch
        from torch_adm import random_torch_adm
    except ImportError:
        torch = None
    torch_call = None
    if torch is not None:
        net = random_torch_adm(ADMConfig.from_create_model(kwargs), seed=0)
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        params = convert_state_dict(cfg, state)
        xt, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)

        def torch_call():
            with torch.inference_mode():
                net(xt, tt)

        torch_call()
        if original:
            gd = _original(kwargs, net)
            with torch.inference_mode():
                diff = (gd(xt, tt) - net(xt, tt)).abs().max().item()
            row["original_max_abs_diff_vs_torch_adm"] = diff

            def original_call():
                with torch.inference_mode():
                    gd(xt, tt)

            original_call()
    else:
        from ddcm_jax.models import adm_init

        params = adm_init(cfg, jax.random.key(0))
    params = jax.device_put(params)
    # The package's own program (`ddcm_jax.jit`: what `model(x, t)` and the codec run),
    # and the plain `jax.jit` of the same function beside it.
    fwd = jit(lambda p, xx, tt: adm_apply(cfg, p, xx, tt))
    plain = jax.jit(lambda p, xx, tt: adm_apply(cfg, p, xx, tt))
    t0 = time.perf_counter()
    fwd(params, x, t).block_until_ready()
    row["jax_compile_s"] = time.perf_counter() - t0
    jax_call = lambda: fwd(params, x, t).block_until_ready()  # noqa: E731
    plain_call = lambda: plain(params, x, t).block_until_ready()  # noqa: E731
    jax_call(), plain_call()
    # Interleaved, so that a slow spell of a shared machine hits both sides alike.
    times: dict[str, list[float]] = {"jax": [], "jax_plain_jit": [], "torch": [], "original": []}
    for _ in range(repeats):
        times["jax"] += _time(jax_call, 1)
        times["jax_plain_jit"] += _time(plain_call, 1)
        if torch_call is not None:
            times["torch"] += _time(torch_call, 1)
        if "original_max_abs_diff_vs_torch_adm" in row:
            times["original"] += _time(original_call, 1)
    row["jax_s"] = statistics.median(times["jax"])
    row["jax_plain_jit_s"] = statistics.median(times["jax_plain_jit"])
    if torch_call is not None:
        row["torch_s"] = statistics.median(times["torch"])
    if "torch_s" in row:
        row["speedup_vs_torch"] = row["torch_s"] / row["jax_s"]
    if times["original"]:
        row["original_s"] = statistics.median(times["original"])
        row["speedup_vs_original"] = row["original_s"] / row["jax_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--guided-diffusion", type=Path, default=None,
                        help="a checkout of openai/guided-diffusion: time its UNet too")  # fmt: skip
    args = parser.parse_args()
    if args.guided_diffusion is not None:
        if not (args.guided_diffusion / "guided_diffusion" / "unet.py").is_file():
            parser.error(f"{args.guided_diffusion}: no guided_diffusion/unet.py there")
        sys.path.insert(0, str(args.guided_diffusion.resolve()))
    rows = []
    for name in args.configs:
        kwargs = CONFIGS[name]
        for batch in args.batches:
            for dtype in args.dtypes:
                row = bench(name, kwargs, batch, args.repeats, dtype, args.guided_diffusion is not None)
                rows.append(row)
                print(json.dumps(row), flush=True)
    try:
        import torch

        torch_info = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        torch_info = None
    result = {
        "benchmark": "adm_forward",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
        },
        "jax_version": jax.__version__,
        "jax_compiler_options": compiler_options() if jax.default_backend() == "cpu" else {},
        "torch": torch_info,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
