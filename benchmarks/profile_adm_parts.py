"""Where the ADM forward's CPU time goes: its layer kinds timed alone, Flax/XLA vs PyTorch, one run.

    python benchmarks/profile_adm_parts.py --json benchmarks/results/adm_parts_cpu.json

At the shapes of `adm_small_64px` (benchmarks/configs.py) at batch 1: a 3x3
convolution at each level's resolution and width, GroupNorm(32) + SiLU, and one
attention block's core (softmax(q k^T) v) at each attention resolution. The
JAX side is the package's own layers (`GroupNorm32`, flax `nn.Conv`, the
`AttentionBlock` math, head-major with 256-query blocks; "token-major (before)": the
same math contracted in (b, t, h, c), as the package did until the format contract
allowed other rounding), jitted; the torch side the modules the original uses.
Interleaved repeats, medians.
"""

# ruff: noqa: B023  (every closure is called at once, inside its loop iteration)
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn

from ddcm_jax.models._layers import by_query_blocks
from ddcm_jax.models.adm import GroupNorm32

LEVELS = [(64, 32), (32, 64), (16, 96), (8, 128)]  # (resolution, channels) of adm_small_64px
ATTN = [(32, 64, 2), (16, 96, 3), (8, 128, 4)]  # (resolution, channels, heads)


def _median_pair(jfn, tfn, repeats):
    jfn(), tfn()
    tj, tt = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jfn()
        tj.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tfn()
        tt.append(time.perf_counter() - t0)
    return statistics.median(tj), statistics.median(tt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []

    def add(kind, shape, j, t):
        rows.append({"part": kind, "shape": shape, "jax_ms": j * 1e3, "torch_ms": t * 1e3, "jax_over_torch": j / t})
        print(f"{kind:22s} {shape!s:16s} jax {j * 1e3:7.2f} ms  torch {t * 1e3:7.2f} ms  x{j / t:5.2f}", flush=True)

    torch.set_grad_enabled(False)
    for res, c in LEVELS:
        x = rng.standard_normal((1, res, res, c)).astype(np.float32)
        conv = nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)))
        p = conv.init(jax.random.key(0), x)
        jf = jax.jit(conv.apply)
        tc = torch.nn.Conv2d(c, c, 3, padding=1)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        add("conv3x3", (res, res, c), *_median_pair(lambda: jf(p, x).block_until_ready(), lambda: tc(xt), args.repeats))
        gn = GroupNorm32()
        pg = gn.init(jax.random.key(0), x)
        jg = jax.jit(lambda p, x: nn.silu(gn.apply(p, x)))
        tg = torch.nn.GroupNorm(32, c)
        add("groupnorm+silu", (res, res, c),
            *_median_pair(lambda: jg(pg, x).block_until_ready(), lambda: torch.nn.functional.silu(tg(xt)), args.repeats))
    for res, c, heads in ATTN:
        ch, t = c // heads, res * res
        q, k, v = (rng.standard_normal((1, t, heads, ch)).astype(np.float32) for _ in range(3))
        scale = 1.0 / np.sqrt(np.sqrt(ch))

        def token_major(q, k, v):  # the package's formulation before: contracted in (b, t, h, c)
            w = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
            return jnp.einsum("bhts,bshc->bthc", jax.nn.softmax(w, axis=-1), v)

        def head_major(q, k, v):  # the package's now (`AttentionBlock`): (b, h, t, c), 256 queries at a time
            q, k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (q, k * scale, v))

            def blk(qb):
                w = jax.nn.softmax(jnp.einsum("bhtc,bhsc->bhts", qb * scale, k), axis=-1)
                return jnp.einsum("bhts,bhsc->bhtc", w, v)

            return jnp.transpose(by_query_blocks(blk, q, axis=2), (0, 2, 1, 3))

        attn = jax.jit(head_major)
        attn_alt = jax.jit(token_major)

        qt, kt, vt = (torch.from_numpy(a.transpose(0, 2, 3, 1).reshape(heads, ch, t).copy()) for a in (q, k, v))

        def tattn():  # the original's QKVAttentionLegacy core
            w = torch.einsum("bct,bcs->bts", qt * scale, kt * scale)
            w = torch.softmax(w.float(), dim=-1)
            return torch.einsum("bts,bcs->bct", w, vt)

        add("attention core", (res, res, c), *_median_pair(lambda: attn(q, k, v).block_until_ready(), tattn,
                                                            args.repeats))  # fmt: skip
        add("attention core, token-major (before)", (res, res, c),
            *_median_pair(lambda: attn_alt(q, k, v).block_until_ready(), tattn, args.repeats))
    if args.json:
        meta = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "config": "adm_small_64px", "batch": 1}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
