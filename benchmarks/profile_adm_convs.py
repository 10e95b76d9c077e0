"""Where an ADM forward's CPU time goes, convolution by convolution: PyTorch vs XLA's two kernels.

    python benchmarks/profile_adm_convs.py --json benchmarks/results/adm_convs_cpu.json

For each configuration (benchmarks/configs.py) the PyTorch network (`tests/torch_adm.py`)
runs once with hooks on its `Conv2d` layers, which record every convolution's input
shape, kernel, stride and padding. Each distinct convolution is then timed alone at
batch 1, interleaved, medians of `--repeats`:

- `torch_ms`: `torch.nn.functional.conv2d` (oneDNN), as the original network runs it;
- `xla_ms`: `jax.lax.conv_general_dilated` (NHWC / HWIO, as the Flax port lays it out)
  compiled with the package's options (`ddcm_jax.jit`: XLA's own multithreaded kernels);
- `xla_ynn_ms`: the same under a plain `jax.jit`, where jaxlib 0.10 hands it to YNNPACK.

Each timed call runs the convolution 5 times (JAX: in one `fori_loop`, each input
depending on the last output, so that buffers are reused as between a forward's
layers, not freshly mapped as for a program's outputs); the time per convolution is
reported.

`*_total_ms` weighs each convolution by how often the forward runs it; the whole
forward of both networks is timed in the same run (`forward_ms`), so the share the
convolutions take, and the gap they leave, can be read side by side.
"""

# ruff: noqa: B023  (every closure is called at once, inside its loop iteration)
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from configs import CONFIGS
from ddcm_jax.convert import convert_state_dict
from torch_adm import random_torch_adm

from ddcm_jax.jit import compiler_options, jit
from ddcm_jax.models import ADMConfig, adm_apply

LOOPS = 5  # convolutions per timed call (see _conv_fn)


def _medians(calls: dict, repeats: int) -> dict[str, float]:
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _convolutions(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> Counter:
    seen: Counter = Counter()

    def hook(module, inputs, _output):
        (h,) = inputs
        seen[(tuple(h.shape), tuple(module.weight.shape), module.stride[0], module.padding[0])] += 1

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(x, t)
    for h in handles:
        h.remove()
    return seen


def _conv_fn(stride: int, pad: int, loops: int):
    """`loops` convolutions in one program, each input made to depend on the last output.

    Alone in a program, a convolution's time includes what the whole forward pays once:
    dispatch, and the output buffer's fresh pages (XLA:CPU maps a new buffer per call).
    Inside a loop the buffers are reused, as they are between a forward's layers.
    """

    def conv(x, w):
        def body(_, carry):
            y = jax.lax.conv_general_dilated(x + 0.0 * carry, w, (stride, stride), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
            return y[0, 0, 0, 0]

        return jax.lax.fori_loop(0, loops, body, jnp.float32(0))

    return conv


def profile(name: str, repeats: int) -> dict:
    cfg = ADMConfig.from_create_model(CONFIGS[name])
    net = random_torch_adm(cfg, seed=0)
    params = jax.device_put(convert_state_dict(cfg, {k: v.detach().numpy() for k, v in net.state_dict().items()}))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    t = np.array([500])
    xt, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)

    fwd = jit(lambda p, a, b: adm_apply(cfg, p, a, b))

    def torch_forward():
        with torch.inference_mode():
            net(xt, tt)

    forward = _medians({"torch": torch_forward, "xla": lambda: fwd(params, x, t).block_until_ready()}, repeats)

    rows = []
    for (shape, wshape, stride, pad), count in sorted(_convolutions(net, xt, tt).items()):
        _, cin, h, w = shape
        cout, _, k, _ = wshape
        a = rng.standard_normal((1, h, w, cin)).astype(np.float32)
        kern = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
        at, kt = torch.from_numpy(a.transpose(0, 3, 1, 2).copy()), torch.from_numpy(kern.transpose(3, 2, 0, 1).copy())
        bias = torch.zeros(cout)
        conv = _conv_fn(stride, pad, LOOPS)
        ours, ynn = jit(conv), jax.jit(conv)

        def torch_call():
            with torch.inference_mode():
                for _ in range(LOOPS):
                    torch.nn.functional.conv2d(at, kt, bias, stride=stride, padding=pad)

        m = _medians({"torch": torch_call, "xla": lambda: ours(a, kern).block_until_ready(),
                      "xla_ynn": lambda: ynn(a, kern).block_until_ready()}, repeats)  # fmt: skip
        m = {k: v / LOOPS for k, v in m.items()}
        rows.append({"input_hwc": [h, w, cin], "out_channels": cout, "kernel": k, "stride": stride, "count": count,
                     "torch_ms": round(m["torch"], 4), "xla_ms": round(m["xla"], 4),
                     "xla_ynn_ms": round(m["xla_ynn"], 4), "xla_over_torch": round(m["xla"] / m["torch"], 3)})  # fmt: skip
        print(f"{name} {h:4d}x{w:<4d} {cin:4d}->{cout:<4d} k{k} s{stride} x{count:2d}: torch {m['torch']:7.2f} "
              f"xla {m['xla']:7.2f} xla_ynn {m['xla_ynn']:7.2f} ms", flush=True)  # fmt: skip
    totals = {side: round(sum(r[f"{side}_ms"] * r["count"] for r in rows), 2) for side in ("torch", "xla", "xla_ynn")}
    return {
        "config": name,
        "forward_ms": {k: round(v, 2) for k, v in forward.items()},
        "conv_total_ms": totals,
        "conv_share_of_forward": {k: round(totals[k] / forward[k], 3) for k in ("torch", "xla")},
        "rest_of_forward_ms": {k: round(forward[k] - totals[k], 2) for k in ("torch", "xla")},
        "convolutions": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--configs", nargs="+", default=["default_model_128px", "adm_mid_64px"], choices=list(CONFIGS))
    args = ap.parse_args()
    results = [profile(name, args.repeats) for name in args.configs]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "convolutions"}), flush=True)
    out = {
        "benchmark": "adm_convs",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": jax.default_backend()},
        "jax_version": jax.__version__,
        "jax_compiler_options": compiler_options(),
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "repeats": args.repeats,
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
