"""Selection throughput and peak memory: the streaming codebook engine vs the original's way.

    python benchmarks/bench_selection.py --json benchmarks/results/selection_cpu.json

One DDCM selection step = score K atoms of dimension D against a residual and
take the argmax. The original draws `torch.randn(K, D)` and multiplies it by
the residual (K x D x 4 bytes at once). Ours streams chunks of key-derived
atoms through a fused generate-score-argmax loop (`AtomSource.best`). Each
case runs in a fresh subprocess: after compiling and warming up, the kernel's
peak-RSS counter is reset (/proc/self/clear_refs), so "peak extra MB" is what
the selection itself adds. Throughput = K x D / seconds (median of repeats).
Also times the parts of one philox chunk (bits, bits -> normal, full score) to
show where the time goes. `api:select_atoms` is the public
`ddcm_jax.select_atoms(key, r, K)` called eagerly, as a researcher would.
An implementation name ending in `@256` runs with XLA's own default vector width
(XLA_FLAGS=--xla_cpu_prefer_vector_width=256) instead of the package's 512-bit
option (`ddcm_jax.jit`), to show what that option brings in the same run.
Needs the `bench` extra for the torch baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

D_DEFAULT = 3 * 256 * 256
W256 = "@256"  # suffix: run the case with XLA's default 256-bit vectors


def _child_env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    if impl.endswith(W256):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_prefer_vector_width=256".strip()
    return env


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(run, repeats: int) -> dict:
    run()  # warm-up (and compilation)
    _reset_peak()
    base = _rss_mb("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_extra_mb": _rss_mb("VmHWM") - base}


def case(impl: str, k: int, d: int, repeats: int) -> dict:
    import numpy as np

    name, impl = impl, impl.removesuffix(W256)

    r_np = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    if impl == "torch":
        import torch

        torch.manual_seed(0)
        r = torch.from_numpy(r_np)

        def run():
            noise = torch.randn(k, d)
            return int(torch.argmax(noise @ r))

        out = _measure(run, repeats)
        out["threads"] = torch.get_num_threads()
    elif impl == "api:select_atoms":  # the research API as a researcher calls it: eagerly, no jax.jit around it
        import jax

        import ddcm_jax

        key = jax.random.key(0)
        r = np.asarray(r_np)

        def run():
            indices, _ = ddcm_jax.select_atoms(key, r, k)
            return int(indices[0])

        out = _measure(run, repeats)
        out["chunk"] = None
    else:
        import jax
        import jax.numpy as jnp

        from ddcm_jax.codebook import AtomSource, chunk_for
        from ddcm_jax.jit import jit

        generator = impl.split(":")[1]
        root = jax.random.key(0)
        r = jnp.asarray(r_np)

        @jit
        def select(r):
            book = AtomSource(k, (d,), generator, root=root, step=jnp.int32(0)).with_base()
            return book.best(r)[0]

        def run():
            return int(select(r))

        out = _measure(run, repeats)
        out["chunk"] = None if generator == "shift" else chunk_for((d,), k)
    out.update(impl=name, K=k, D=d, throughput_M=k * d / out["seconds"] / 1e6)
    return out


def parts(d: int, chunk: int, repeats: int) -> dict:
    """Time the stages of scoring one philox chunk of atoms, each fused with a reduction."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ddcm_jax.codebook import AtomSource, _philox_words, normals_from_words
    from ddcm_jax.jit import jit

    root = jax.random.key(0)
    r = jnp.asarray(np.random.default_rng(0).standard_normal(d).astype(np.float32))
    groups = -(-d // 4)

    def words(ks):  # the four word streams (n, D/4), never interleaved (that would stop fusion)
        return _philox_words(root, jnp.int32(0), ks, groups)

    def full(ks):
        return AtomSource(chunk, (d,), "philox", root=root, step=jnp.int32(0))._linear(ks, r)

    ks = jnp.arange(chunk)
    stages = {
        "philox bits": jit(lambda ks: sum(jnp.sum(w >> 16, dtype=jnp.uint32) for w in words(ks))),
        "bits -> normal": jit(lambda ks: sum(jnp.sum(z) for z in normals_from_words(words(ks)))),
        "full score (x r, sum)": jit(full),
    }
    out = {}
    for name, fn in stages.items():
        jax.block_until_ready(fn(ks))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(ks))
            times.append(time.perf_counter() - t0)
        out[name] = chunk * d / statistics.median(times) / 1e6
    return {"chunk": chunk, "D": d, "M_atom_dims_per_s": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--d", type=int, default=D_DEFAULT)
    ap.add_argument("--k", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--impls", nargs="+", default=["torch", "api:select_atoms", "jax:philox", "jax:threefry",
                                                     "jax:shift"])  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # a child process: one measurement, printed as JSON
        impl, k = args.case.rsplit("/", 1)
        print(json.dumps(parts(args.d, 32, args.repeats) if impl == "parts" else case(impl, int(k), args.d,
                                                                                      args.repeats)))  # fmt: skip
        return
    rows = []
    for k in args.k:
        for impl in args.impls:
            proc = subprocess.run([sys.executable, __file__, "--case", f"{impl}/{k}", "--d", str(args.d),
                                   "--repeats", str(args.repeats)], capture_output=True, text=True,
                                  env=_child_env(impl))  # fmt: skip
            if proc.returncode != 0:
                print(f"{impl} K={k}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"K={k:5d} {impl:18s} {row['seconds']:8.3f} s  {row['throughput_M']:8.0f} M atom-dims/s  "
                  f"peak extra {row['peak_extra_mb']:8.1f} MB", flush=True)
    proc = subprocess.run([sys.executable, __file__, "--case", "parts/0", "--d", str(args.d),
                           "--repeats", str(args.repeats)], capture_output=True, text=True)  # fmt: skip
    split = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    if split:
        print("one philox chunk, fused:", {k: round(v) for k, v in split["M_atom_dims_per_s"].items()}, "M/s")
    for k in args.k:
        base = next((r for r in rows if r["K"] == k and r["impl"] == "torch"), None)
        for r in rows:
            if base and r["K"] == k and r["impl"] != "torch":
                r["speedup_vs_torch"] = base["seconds"] / r["seconds"]
    if args.json:
        import jax

        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "jax": jax.__version__, "backend": jax.default_backend()}  # fmt: skip
        try:
            import torch

            meta["torch"] = torch.__version__
        except ImportError:
            pass
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "parts": split}, f, indent=2)


if __name__ == "__main__":
    main()
