"""The FLUX transformer port: diffusers parity on flux_tiny, the FLUX.1-dev manifest, refusals,
rotary tables and compile caching."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ddcm_jax.models import flux_transformer as flux
from ddcm_jax.models.flux_transformer import (
    FluxConfigError,
    FluxStateDictError,
    FluxTransformerConfig,
    abstract_params,
    flux_init,
    flux_transformer_apply,
    param_count,
    params_from_state_dict,
    plan_state_dict,
    rope_tables,
    torch_key,
)

TOL = 1e-4  # the fixtures README: a correct float32 port is within ~1e-4 of every array


@pytest.fixture(autouse=True)
def _highest_precision():
    # float32 parity on GPU needs it (TF32 is ~1e-3 off); it is also part of jit's cache key,
    # so every test runs under it and the compiled transformer is shared between tests.
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def tiny(reference: Path) -> dict:
    folder = reference / "flux_tiny"
    config = FluxTransformerConfig.from_json(
        json.loads((folder / "transformer/config.json").read_text())
    )
    state = load_file(str(folder / "transformer/diffusion_pytorch_model.safetensors"))
    return {
        "config": config,
        "state": state,
        "params": jax.device_put(params_from_state_dict(config, state)),
        "io": dict(np.load(folder / "io.npz")),
        "io_json": json.loads((folder / "io.json").read_text()),
    }


def _inputs(io: dict, img_ids: str = "transformer_img_ids") -> tuple:
    """(hidden, timestep, guidance, encoder states, pooled, txt_ids, img_ids), diffusers' order."""
    return (io["transformer_hidden_states"], io["transformer_timestep"],
            io["transformer_guidance"], io["transformer_encoder_hidden_states"],
            io["transformer_pooled_projections"], io["transformer_txt_ids"], io[img_ids])  # fmt: skip


def _grid_ids(rows: int, cols: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([np.zeros(rows * cols), r.ravel(), c.ravel()], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    "ids, want",
    [("transformer_img_ids", "transformer_out"), ("transformer_img_ids_alt", "transformer_out_alt")],
)
def test_matches_diffusers(tiny: dict, ids: str, want: str) -> None:
    # Both guidance values (1.0, 3.5) and both timesteps (0.999, 0.25) are in the batch.
    io = tiny["io"]
    out = flux_transformer_apply(tiny["config"], tiny["params"], *_inputs(io, ids))
    assert out.shape == (2, 64, 64) and out.dtype == np.float32
    diff = float(np.abs(np.asarray(out) - io[want]).max())
    print(f"{want}: max abs diff {diff:.3g}")
    assert diff <= TOL
    # The two grids tell rows from columns: their outputs are far apart.
    assert np.abs(io["transformer_out"] - io["transformer_out_alt"]).max() > 100 * TOL


def test_traced_ids_use_the_float32_fallback(tiny: dict) -> None:
    """Under an outer jit that traces the ids, the compensated float32 tables still match."""
    io = tiny["io"]
    traced = jax.jit(flux_transformer_apply, static_argnums=0)
    out = traced(tiny["config"], tiny["params"], *_inputs(io, "transformer_img_ids_alt"))
    assert float(np.abs(np.asarray(out) - io["transformer_out_alt"]).max()) <= TOL
    # Tables alone, FLUX.1-dev's axes (16, 56, 56), 512 text tokens, a 128 x 128 grid (2048 px):
    # host float64 vs traced float32 within about one float32 rounding.
    dev = FluxTransformerConfig(guidance_embeds=True)
    txt, img = np.zeros((512, 3), np.float32), _grid_ids(128, 128)
    host = rope_tables(dev, txt, img)
    jit_tables = jax.jit(lambda a, b: rope_tables(dev, a, b))(txt, img)
    for h, t in zip(host, jit_tables, strict=True):
        assert h.shape == (512 + 128 * 128, 128)
        assert float(np.abs(np.asarray(t) - h).max()) <= 1e-7


def test_deprecated_batched_ids(tiny: dict) -> None:
    cfg, params, io = tiny["config"], tiny["params"], tiny["io"]
    args = list(_inputs(io))
    plain = flux_transformer_apply(cfg, params, *args)
    args[5], args[6] = args[5][None], args[6][None]  # diffusers' deprecated (1, S, 3) form
    np.testing.assert_array_equal(np.asarray(flux_transformer_apply(cfg, params, *args)),
                                  np.asarray(plain))  # fmt: skip
    args[6] = np.concatenate([args[6], args[6]])  # (2, N, 3): refused, not silently ids[0]
    with pytest.raises(ValueError, match="img_ids"):
        flux_transformer_apply(cfg, params, *args)


def test_param_counts(tiny: dict) -> None:
    cfg = tiny["config"]
    traced = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(cfg)))
    in_file = sum(v.size for v in tiny["state"].values())
    assert param_count(cfg) == traced == in_file == tiny["io_json"]["params"]["transformer"]
    assert in_file == 135_552
    for variant in (dataclasses.replace(cfg, guidance_embeds=False),
                    dataclasses.replace(cfg, out_channels=16, num_single_layers=0)):  # fmt: skip
        leaves = jax.tree.leaves(abstract_params(variant))
        assert param_count(variant) == sum(math.prod(leaf.shape) for leaf in leaves)


def test_flux1_dev_manifest(reference: Path) -> None:
    folder = reference / "flux_manifests/flux1_dev"
    cfg = FluxTransformerConfig.from_json(
        json.loads((folder / "transformer/config.json").read_text())
    )
    shapes = json.loads((folder / "transformer/state_dict_shapes.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())["components"]["transformer"]
    plan = plan_state_dict(cfg, shapes)
    assert sorted(key for _, key in plan) == sorted(shapes)  # every key used exactly once
    assert all(torch_key(path) == key for path, key in plan)
    assert len(plan) == summary["keys"]
    published = summary["params"]
    assert param_count(cfg) == published == sum(math.prod(s) for s in shapes.values())
    assert cfg.inner_dim == 3072 and cfg.guidance_embeds


def test_guidance_embeds_false(tiny: dict) -> None:
    cfg = dataclasses.replace(tiny["config"], guidance_embeds=False)
    params = flux_init(cfg, jax.random.key(0))
    assert "guidance_embedder" not in params["time_text_embed"]
    args = list(_inputs(tiny["io"]))
    args[2] = None
    out = np.asarray(flux_transformer_apply(cfg, params, *args))
    assert out.shape == (2, 64, 64) and np.isfinite(out).all()
    args[2] = tiny["io"]["transformer_guidance"]
    with pytest.raises(ValueError, match="guidance=None"):
        flux_transformer_apply(cfg, params, *args)
    args[2] = None
    with pytest.raises(ValueError, match="pass guidance"):
        flux_transformer_apply(tiny["config"], tiny["params"], *args)
    # The guided file has a guidance embedder this config lacks.
    with pytest.raises(FluxStateDictError, match=r"unexpected: time_text_embed\.guidance_embedder"):
        plan_state_dict(cfg, {k: v.shape for k, v in tiny["state"].items()})


def test_config_round_trip(tiny: dict) -> None:
    cfg = tiny["config"]
    assert cfg.out_channels == cfg.in_channels == 64  # null in the file: in_channels
    again = FluxTransformerConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    assert FluxTransformerConfig.from_json({}) == FluxTransformerConfig()  # diffusers' defaults
    bf16 = FluxTransformerConfig.from_json(cfg.to_json(), compute_dtype="bfloat16")
    assert bf16.compute_dtype == "bfloat16" and bf16 != cfg


@pytest.mark.parametrize(
    "change, words",
    [
        ({"mlp_ratio": 4.0}, ["mlp_ratio", "4.0"]),
        ({"axes_dims_rope": [4, 6, 8]}, ["axes_dims_rope", "[4, 6, 8]", "18", "16"]),
        ({"axes_dims_rope": [4, 5, 7]}, ["axes_dims_rope[1]", "5"]),
        ({"axes_dims_rope": 16}, ["axes_dims_rope", "16"]),
        ({"patch_size": 2}, ["patch_size", "2"]),
        ({"num_attention_heads": 0}, ["num_attention_heads", "0"]),
        ({"guidance_embeds": "yes"}, ["guidance_embeds", "'yes'"]),
        ({"out_channels": 0}, ["out_channels", "0"]),
        ({"_class_name": "SD3Transformer2DModel"}, ["_class_name", "SD3Transformer2DModel"]),
        ({"compute_dtype": "float64"}, ["compute_dtype", "float64"]),
    ],
)
def test_config_refusals(tiny: dict, change: dict, words: list[str]) -> None:
    data = {**tiny["config"].to_json(), **change}
    with pytest.raises(FluxConfigError) as info:
        FluxTransformerConfig.from_json(data)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_state_dict_refusals(tiny: dict) -> None:
    cfg, state = tiny["config"], dict(tiny["state"])
    gone, bent = "transformer_blocks.1.attn.norm_added_k.weight", "proj_out.weight"
    del state[gone]
    state[bent] = state[bent][:, :-1]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(FluxStateDictError) as info:
        params_from_state_dict(cfg, state)
    err = info.value
    assert err.missing == [gone] and err.unexpected == ["extra.weight"]
    assert len(err.misshaped) == 1 and err.misshaped[0].startswith(bent)
    message = str(err)
    assert "\n" not in message
    for word in (gone, bent, "[64, 31]", "[64, 32]", "extra.weight", "1 missing"):
        assert word in message
    ints = {k: v.astype(np.int32) if k == bent else v for k, v in tiny["state"].items()}
    with pytest.raises(FluxStateDictError, match="not floating point"):
        params_from_state_dict(cfg, ints)


def test_eager_calls_compile_once(tiny: dict) -> None:
    """New values of the same shapes (ids included) reuse the compiled function."""
    cfg, params, io = tiny["config"], tiny["params"], tiny["io"]
    rng = np.random.default_rng(0)
    args = list(_inputs(io))
    flux_transformer_apply(cfg, params, *args)
    compiled = flux._apply._cache_size()
    for _ in range(2):
        args[0] = rng.standard_normal(args[0].shape).astype(np.float32)
        args[1] = rng.uniform(0, 1, 2).astype(np.float32)
        args[2] = rng.uniform(1, 5, 2).astype(np.float32)
        args[6] = rng.permutation(io["transformer_img_ids"])
        out = flux_transformer_apply(cfg, params, *args)
        assert np.isfinite(np.asarray(out)).all()
    assert flux._apply._cache_size() == compiled


def test_bfloat16_compute(tiny: dict) -> None:
    """bfloat16 matmuls, float32 norms / residual streams: float32 out, near the reference."""
    cfg = dataclasses.replace(tiny["config"], compute_dtype="bfloat16")
    out = flux_transformer_apply(cfg, tiny["params"], *_inputs(tiny["io"]))
    assert out.dtype == np.float32
    diff = float(np.abs(np.asarray(out) - tiny["io"]["transformer_out"]).max())
    assert diff < 0.1  # measured 0.03 (outputs reach 4.5)
