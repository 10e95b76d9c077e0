"""The public network calls made eagerly, as a researcher makes them, against the same calls
under the caller's own `jax.jit`, side by side in one run (issue 26: within 1.2x).

    python benchmarks/bench_eager_calls.py --json benchmarks/results/eager_calls_cpu.json

Models: the packaged default ADM MODEL_DIR (`model(x, t)`), `sd_tiny` converted from
`../shared/reference/sd_tiny` into a temporary folder (`model(x, t, context)`, `encode`,
`decode`, `encode_prompt`) and `flux_tiny` likewise (`transformer(...)`, `encode`, `decode`,
`encode_prompt`). Each call is warmed up (compiled) once on both sides, then timed
`--repeats` times, the two sides interleaved so that both see the same load; medians reported.
The caller's jit is given `ddcm_jax.compiler_options()` (on a CPU), as the Python API guide
says to, so that both sides run the same program and the ratio is the eager call's own cost.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("DDCM_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _median_pair(eager, jitted, repeats: int) -> tuple[float, float]:
    import jax

    jax.block_until_ready(eager())  # compile both first
    jax.block_until_ready(jitted())
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(eager())
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(jitted())
        b.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from ddcm_jax.convert import main as convert

    import ddcm_jax

    rows = []
    # The caller's own jit, with the package's XLA:CPU options as docs/python-api.md says to
    # pass them: the two sides then run the same program, and the ratio is the eager call's cost.
    options = ddcm_jax.compiler_options() if jax.default_backend() == "cpu" else {}
    yours = functools.partial(jax.jit, compiler_options=options)

    def record(family: str, call: str, shape: str, eager, jitted) -> None:
        e, j = _median_pair(eager, jitted, args.repeats)
        rows.append({"family": family, "call": call, "input": shape, "eager_ms": round(1e3 * e, 3),
                     "jitted_ms": round(1e3 * j, 3), "eager_over_jitted": round(e / j, 3)})  # fmt: skip
        print(f"{family:4s} {call:24s} {shape:18s} eager {1e3 * e:8.2f} ms  jitted {1e3 * j:8.2f} ms  {e / j:.2f}x")

    adm = ddcm_jax.load_model("default")
    n = adm.config.architecture.image_size
    x = jax.random.normal(jax.random.key(0), (1, n, n, 3), jnp.float32)
    t = jnp.array([500], jnp.int32)
    adm_jit = yours(lambda m, xx, tt: m.apply(m.params, xx, tt))
    record("adm", "model(x, t)", f"1x{n}x{n}x3", lambda: adm(x, t), lambda: adm_jit(adm, x, t))
    # What `model(x, t)` did before it was compiled: the network op by op.
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(adm.apply(adm.params, x, t))
    rows[-1]["op_by_op_ms_before"] = round(1e3 * (time.perf_counter() - t0) / 3, 3)

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "sd_tiny"
        assert convert([str(SHARED / "reference" / "sd_tiny"), "-o", str(where), "--format", "diffusers", "-q"]) == 0
        sd = ddcm_jax.load_model(where)
    side = sd.config.unet.sample_size
    f = sd.config.downsampling_factor
    c = sd.config.latent_channels
    z = jax.random.normal(jax.random.key(1), (1, side, side, c), jnp.float32)
    img = jax.random.uniform(jax.random.key(2), (1, side * f, side * f, 3), jnp.float32, -1, 1)
    ctx = sd.null_prompt
    unet_jit = yours(lambda m, zz, tt, cc: m(zz, tt, cc))
    enc_jit = yours(lambda m, ii: m.encode(ii))
    dec_jit = yours(lambda m, zz: m.decode(zz))
    record("sd", "model(x, t, context)", f"1x{side}x{side}x{c}", lambda: sd(z, t, ctx), lambda: unet_jit(sd, z, t, ctx))
    record("sd", "encode(images)", f"1x{side * f}x{side * f}x3", lambda: sd.encode(img), lambda: enc_jit(sd, img))
    record("sd", "decode(latents)", f"1x{side}x{side}x{c}", lambda: sd.decode(z), lambda: dec_jit(sd, z))
    from ddcm_jax.models import clip

    text_jit = yours(lambda p, i: clip.clip_text_apply(sd.config.text_encoder, p, i)[0])
    # Strings cannot enter a jit: the caller tokenizes on the host, then calls its jitted encoder.
    record("sd", "encode_prompt(prompt)", "1 prompt", lambda: sd.encode_prompt(["a photograph of a cat"]),
           lambda: text_jit(sd.params["text_encoder"], sd.tokenize(["a photograph of a cat"])))  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "flux_tiny"
        assert convert([str(SHARED / "reference" / "flux_tiny"), "-o", str(where), "--format", "diffusers", "-q"]) == 0
        flux = ddcm_jax.load_model(where)
    from ddcm_jax.flux import img_ids, pack
    from ddcm_jax.models import t5

    side, c = 16, flux.config.latent_channels
    f = flux.config.downsampling_factor
    zf = jax.random.normal(jax.random.key(3), (1, side, side, c), jnp.float32)
    hs = pack(zf)
    tc = flux.config.transformer
    ehs = jax.random.normal(jax.random.key(4), (1, 16, tc.joint_attention_dim), jnp.float32)
    pooled = jax.random.normal(jax.random.key(5), (1, tc.pooled_projection_dim), jnp.float32)
    tt = jnp.array([0.5], jnp.float32)
    g = jnp.array([3.5], jnp.float32) if flux.guidance_embeds else None
    txt_ids, ids = np.zeros((16, 3), np.float32), img_ids(side, side)
    imgf = jax.random.uniform(jax.random.key(6), (1, side * f, side * f, 3), jnp.float32, -1, 1)
    tr_jit = yours(lambda m, *a: m.transformer(*a))
    inputs = (hs, tt, g, ehs, pooled, txt_ids, ids)
    record("flux", "transformer(...)", f"1x{hs.shape[1]}x{hs.shape[2]}", lambda: flux.transformer(*inputs),
           lambda: tr_jit(flux, *inputs))  # fmt: skip
    encf_jit = yours(lambda m, ii: m.encode(ii))
    decf_jit = yours(lambda m, zz: m.decode(zz))
    record("flux", "encode(images)", f"1x{side * f}x{side * f}x3", lambda: flux.encode(imgf), lambda: encf_jit(flux, imgf))
    record("flux", "decode(latents)", f"1x{side}x{side}x{c}", lambda: flux.decode(zf), lambda: decf_jit(flux, zf))
    cfg = flux.config

    def prompt_jitted(p_t5, p_clip, ids_t5, ids_clip):
        return (t5.t5_encode(cfg.text_encoder_2, p_t5, ids_t5),
                clip.clip_text_apply(cfg.text_encoder, p_clip, ids_clip)[1])  # fmt: skip

    prompt_jit = yours(prompt_jitted)
    words = ["a photograph of a cat"]
    record("flux", "encode_prompt(prompt)", "1 prompt", lambda: flux.encode_prompt(words),
           lambda: prompt_jit(flux.params["text_encoder_2"], flux.params["text_encoder"],
                              flux.tokenize_t5(words), flux.tokenize(words)))  # fmt: skip

    result = {"benchmark": "eager_calls", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
              "repeats": args.repeats, "jitted_with_compiler_options": options, "rows": rows,
              "worst_eager_over_jitted": max(r["eager_over_jitted"] for r in rows)}  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
