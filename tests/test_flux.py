"""FLUX.1 as the third family: the converted flux_tiny against the original networks' outputs
(io.npz) and Turbo-DDCM's FLUX path (turbo_flux_trace), replayed through the public API."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddcm_jax
from ddcm_jax import bitstream, flux
from ddcm_jax.flux import pack, unpack

TOL = 1e-4  # the fixtures' README: a float32 port lands within ~1e-4 of every array
PROMPTS = ["", "a photo of a cat", "A  Photo of the cat, 2x!"]


def nhwc(a) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), -3, -1))


def unpacked(a, hw: tuple[int, int]) -> np.ndarray:
    """Packed tokens (..., N, 4C) -> latents (..., h, w, C)."""
    return np.asarray(unpack(jnp.asarray(a), *hw))


def latent_hw(z: dict) -> tuple[int, int]:
    return tuple(z["x_T_latent"].shape[-2:])  # (C, h, w) in the trace


@pytest.fixture(scope="module")
def model(flux_tiny_model_dir: Path):
    return ddcm_jax.load_model(flux_tiny_model_dir)


@pytest.fixture(scope="module")
def io(reference: Path) -> dict:
    with np.load(reference / "flux_tiny" / "io.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def trace(reference: Path) -> tuple[dict, dict]:
    meta = json.loads((reference / "turbo_flux_trace" / "trace.json").read_text())
    with np.load(reference / "turbo_flux_trace" / "trace.npz") as z:
        return meta, {k: z[k] for k in z.files}


# -- the networks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", ["transformer_img_ids", "transformer_img_ids_alt"])
def test_transformer_matches_diffusers(model, io, ids):
    out = "transformer_out" if ids == "transformer_img_ids" else "transformer_out_alt"
    with jax.default_matmul_precision("highest"):
        got = model.transformer(io["transformer_hidden_states"], io["transformer_timestep"],
                                io["transformer_guidance"], io["transformer_encoder_hidden_states"],
                                io["transformer_pooled_projections"], io["transformer_txt_ids"], io[ids])  # fmt: skip
    np.testing.assert_allclose(got, io[out], atol=TOL)


def test_vae_encode_decode_match_the_original(model, io):
    with jax.default_matmul_precision("highest"):
        z = model.encode(nhwc(io["vae_image"]))
        np.testing.assert_allclose(z, nhwc(io["flux_encode_image"]), atol=TOL)
        np.testing.assert_allclose(pack(z), io["flux_encode_packed"], atol=TOL)
        image = model.decode(unpacked(io["flux_encode_packed"], io["flux_encode_image"].shape[-2:]))
    np.testing.assert_allclose(image, nhwc(io["flux_decode_img"]), atol=TOL)  # unclamped, as the original


def test_tokenizers_and_prompt_encoders(model, io):
    np.testing.assert_array_equal(model.tokenize(PROMPTS), io["clip_input_ids"])
    np.testing.assert_array_equal(model.tokenize_t5(PROMPTS), io["t5_input_ids"])
    with jax.default_matmul_precision("highest"):
        context, pooled = model.encode_prompt(PROMPTS)
    np.testing.assert_allclose(context, io["t5_last_hidden_state"], atol=TOL)
    np.testing.assert_allclose(pooled, io["clip_pooler_output"], atol=TOL)
    null_context, null_pooled = model.null_conditioning  # computed once at conversion
    np.testing.assert_allclose(null_context, io["null_prompt_embeds"], atol=TOL)
    np.testing.assert_allclose(null_pooled, io["null_pooled_prompt_embeds"], atol=TOL)


def test_packing_is_diffusers_layout(trace):
    _, z = trace
    latent = nhwc(z["x_T_latent"])
    np.testing.assert_array_equal(pack(latent), z["x_T"])
    np.testing.assert_array_equal(unpacked(z["x_T"], latent_hw(z)), latent)
    np.testing.assert_array_equal(flux.img_ids(*latent_hw(z)), z["img_ids"])


# -- the process ----------------------------------------------------------------------------------------


def test_schedule_is_the_originals(trace):
    meta, z = trace
    coded = meta["T"] - 1 - meta["no_bits_steps"]
    s = flux.flux_schedule(meta["T"], coded)
    np.testing.assert_array_equal(s.t, z["timesteps"])
    np.testing.assert_array_equal(s.t_model, z["transformer_timestep"])
    f32 = lambda a: np.asarray(a, np.float64).astype(np.float32)  # noqa: E731  (float64 rounded once)
    np.testing.assert_array_equal(s.factor, f32(z["ot_flow_to_ddpm_factor"]))
    np.testing.assert_array_equal(s.flow_sigma, f32(z["flow_sigma"]))
    np.testing.assert_array_equal(s.sqrt_a, f32(np.sqrt(z["alpha_prod_t"])))
    np.testing.assert_array_equal(s.alpha_bar_prev, f32(z["alpha_prod_t_prev"]))
    np.testing.assert_array_equal(s.sigma[:coded], f32(z["posterior_std"]))
    assert not s.sigma[coded:].any() and s.noisy.sum() == coded


def test_each_traced_step_from_its_velocity(trace, model):
    """predict + combine on the trace's own velocities: every step's eps, x_0_hat and x_{t-1}."""
    meta, z = trace
    coded = meta["T"] - 1 - meta["no_bits_steps"]
    xs = flux.flux_schedule(meta["T"], coded)
    step = jax.jit(lambda x, v, s, n: flux.FluxFamily.combine(model, x, *model.predict(x, v, s, None), s, n))
    predict = jax.jit(lambda x, v, s: model.predict(x, v, s, None))
    for i in range(meta["T"]):
        s = jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(a[i]), xs)
        x, v = unpacked(z["x_t"][i], latent_hw(z)), unpacked(z["velocity"][i], latent_hw(z))
        x0_hat, eps_hat = predict(x, v, s)
        # (5) and (6) divide by sqrt(1 - a_t) and sqrt(a_t): a few float32 ulps of x_t (|x_t| < 8: 1e-6
        # each) grow by their inverses (700x at t = 1 and 1000x at t = 999, the schedule's ends).
        ulps = 4e-6
        np.testing.assert_allclose(eps_hat, unpacked(z["eps"][i], latent_hw(z)), atol=TOL + ulps / float(s.sqrt_1ma))
        noise = unpacked(z["best_noise"][i], latent_hw(z)) if i < coded else np.zeros_like(x)
        if i < coded:
            np.testing.assert_allclose(x0_hat, unpacked(z["x_0_hat"][i], latent_hw(z)), atol=TOL + ulps / float(s.sqrt_a))
        np.testing.assert_allclose(step(x, v, s, noise), unpacked(z["x_t"][i + 1], latent_hw(z)), atol=TOL)


def test_compress_replays_the_original(trace, model):
    """The trace replayed free-running through one jitted call of the public keyword API."""
    meta, z = trace
    kw = dict(steps=meta["T"], codebook_size=meta["K"], num_atoms=meta["M"], rule="turbo", schedule="turbo",
              no_bits_steps=meta["no_bits_steps"])  # fmt: skip
    x_T = unpacked(z["x_T"], latent_hw(z))
    codebook = unpacked(z["codebook"], latent_hw(z))  # (S, K, h, w, C)
    image = nhwc(z["image"])
    run = jax.jit(lambda im, key: ddcm_jax.compress(model, im, key=key, x_T=x_T, codebook=codebook, **kw))
    res = run(image, jax.random.key(0))
    np.testing.assert_array_equal(res.indices, z["sorted_indices"])
    np.testing.assert_array_equal(res.coeffs, 1 - z["sorted_coeff_bits"])  # the file's bit: 1 = negative
    for i, (idx, co) in enumerate(zip(np.asarray(res.indices), np.asarray(res.coeffs), strict=True)):
        rank = bitstream.rank_subset([int(v) for v in idx], meta["K"])
        assert rank == meta["ranks"][i]
        signs = "".join(str(1 - int(b)) for b in co)  # the original's bit: 1 = positive
        assert format(rank, f"0{meta['bits_for_rank']}b") + signs == meta["step_bitstrings"][i]
    np.testing.assert_allclose(res.latent, unpacked(z["final_latent"], latent_hw(z)), rtol=1e-3, atol=TOL)
    np.testing.assert_allclose(res.image, nhwc(z["decoded"]), atol=1e-3)
    eager = ddcm_jax.compress(model, image, key=0, x_T=x_T, codebook=codebook, **kw)
    np.testing.assert_array_equal(eager.indices, res.indices)
    back = ddcm_jax.decompress(model, eager.indices, eager.coeffs, image_shape=image.shape, key=0, x_T=x_T,
                               codebook=codebook, **kw)  # fmt: skip
    np.testing.assert_array_equal(back.latent, eager.latent)  # the decoder replays the encoder exactly
    np.testing.assert_array_equal(back.image, eager.image)
    decode = jax.jit(lambda idx, co, key: ddcm_jax.decompress(model, idx, co, image_shape=image.shape, key=key,
                                                              x_T=x_T, codebook=codebook, **kw))  # fmt: skip
    np.testing.assert_array_equal(decode(res.indices, res.coeffs, jax.random.key(0)).latent, res.latent)
