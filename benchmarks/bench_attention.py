"""The attention core alone: `_layers.attention` (head-major, 256 queries at a time), the same
with all queries at once, the token-major formulation it replaced (contracting (B, T, H, d)
directly; kept here as the reference), and PyTorch's scaled_dot_product_attention, side by
side in one run. All three of ours must agree bit for bit.

    python benchmarks/bench_attention.py --json benchmarks/results/attention_cpu.json

Shapes (B = 1): ADM at 32 x 32 (1,024 tokens, 4 heads of 64), SD's 64 x 64 latent
(4,096 tokens, 1 head of 128, its VAE's mid-block attention), and a short 256-token case.
Median of `--repeats` calls after one warm-up (compilation) per side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

SHAPES = [(1024, 4, 64), (4096, 1, 128), (256, 4, 64)]


def _median(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _token_major(L, q, k, v, heads: int):
    """The formulation `_layers.attention` had before: products contracted in (B, T, H, d)."""
    import math

    import jax
    import jax.numpy as jnp

    b, t, c = q.shape
    s, d = k.shape[1], c // heads
    q = q.reshape(b, t, heads, d) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    k, v = k.reshape(b, s, heads, d), v.reshape(b, s, heads, d)

    def core(qb):
        w = jnp.einsum("bthd,bshd->bhts", qb, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("bhts,bshd->bthd", w, v)

    return L.by_query_blocks(core, q).reshape(b, t, heads * d)


def _row(L, t: int, heads: int, d: int, repeats: int, torch) -> dict:
    import jax
    import numpy as np

    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, t, heads * d)) for kk in ks)
    whole = jax.jit(lambda a, b, c: L.attention(a, b, c, heads, query_block=None))
    blocked = jax.jit(lambda a, b, c: L.attention(a, b, c, heads))
    token_major = jax.jit(lambda a, b, c: _token_major(L, a, b, c, heads))
    ref = np.asarray(blocked(q, k, v))
    same = all(np.array_equal(np.asarray(f(q, k, v)), ref) for f in (whole, token_major))
    row = {"tokens": t, "heads": heads, "head_dim": d, "bit_identical": same,
           "whole_ms": round(1e3 * _median(lambda: whole(q, k, v).block_until_ready(), repeats), 3),
           "blocked_ms": round(1e3 * _median(lambda: blocked(q, k, v).block_until_ready(), repeats), 3),
           "token_major_ms": round(1e3 * _median(lambda: token_major(q, k, v).block_until_ready(), repeats), 3)}  # fmt: skip
    row["speedup"] = round(row["whole_ms"] / row["blocked_ms"], 3)
    row["speedup_vs_token_major"] = round(row["token_major_ms"] / row["blocked_ms"], 3)
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(np.asarray(a)).reshape(1, t, heads, d).transpose(1, 2) for a in (q, k, v))
        with torch.no_grad():
            row["torch_sdpa_ms"] = round(1e3 * _median(
                lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), repeats), 3)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import jax

    from ddcm_jax.models import _layers as L

    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    rows = []
    for t, heads, d in SHAPES:
        rows.append(_row(L, t, heads, d, args.repeats, torch))
        print(rows[-1])
    result = {"benchmark": "attention_core", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
              "torch": None if torch is None else torch.__version__, "repeats": args.repeats, "rows": rows}  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
