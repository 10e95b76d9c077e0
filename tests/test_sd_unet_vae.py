"""The Flax Stable Diffusion UNet and VAE: sd_tiny parity, diffusers parity on other
configurations, bfloat16 compute, config refusals, strict state dicts, released manifests."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ddcm_jax.models import sd_unet as U
from ddcm_jax.models import sd_vae as V
from ddcm_jax.models._layers import SDConfigError, SDStateDictError

TOL = 1e-4  # float32 parity with PyTorch (float32 rounding alone moves these by ~5e-6)


# XLA:CPU compiles these small programs 2-3x faster without its expensive
# optimisation passes; the arithmetic is the same to ~1e-7 here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(fn, *args):
    """fn(*args) through jit at `highest` matmul precision, compiled with FAST_COMPILE."""
    with jax.default_matmul_precision("highest"):
        out = jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)
    return jax.tree.map(np.asarray, out)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ sd_tiny fixtures


@pytest.fixture(scope="module")
def tiny(reference: Path) -> dict:
    d = reference / "sd_tiny"
    ucfg = U.SDUNetConfig.from_json(read_json(d / "unet" / "config.json"))
    vcfg = V.SDVAEConfig.from_json(read_json(d / "vae" / "config.json"))
    return {
        "io": dict(np.load(d / "io.npz")),
        "unet_cfg": ucfg,
        "unet_sd": load_file(d / "unet" / "diffusion_pytorch_model.safetensors"),
        "vae_cfg": vcfg,
        "vae_sd": load_file(d / "vae" / "diffusion_pytorch_model.safetensors"),
    }


@pytest.fixture(scope="module")
def tiny_outputs(tiny: dict) -> dict:
    """sd_tiny's UNet and VAE outputs, float32 and bfloat16 compute (compiled once)."""
    io, ucfg, vcfg = tiny["io"], tiny["unet_cfg"], tiny["vae_cfg"]
    up = U.params_from_state_dict(ucfg, tiny["unet_sd"])
    vp = V.params_from_state_dict(vcfg, tiny["vae_sd"])
    x, t, ctx = nhwc(io["unet_x"]), io["unet_t"], io["unet_encoder_hidden_states"]
    img, z = nhwc(io["vae_image"]), nhwc(io["vae_decode_in"])
    out = {}
    for dt in ("float32", "bfloat16"):
        out[dt, "unet"] = run(partial(U.sd_unet_apply, ucfg, dtype=dt), up, x, t, ctx)
        out[dt, "mean"], out[dt, "logvar"] = run(partial(V.vae_encode, vcfg, dtype=dt), vp, img)
        out[dt, "decode"] = run(partial(V.vae_decode, vcfg, dtype=dt), vp, z)
    return out


def test_sd_tiny_configs_resolve(tiny: dict) -> None:
    ucfg, vcfg = tiny["unet_cfg"], tiny["vae_cfg"]
    # attention_head_dim [2, 4] is the number of heads per level (head width 8).
    assert ucfg.num_attention_heads == (2, 4)
    assert ucfg.use_linear_projection and ucfg.upcast_attention
    assert ucfg.norm_num_groups == 8 and ucfg.layers_per_block == (1, 1)
    assert vcfg.scaling_factor == pytest.approx(0.18215)
    assert vcfg.downsampling_factor == 8
    assert U.SDUNetConfig.from_json(ucfg.to_json()) == ucfg
    assert V.SDVAEConfig.from_json(vcfg.to_json()) == vcfg


@pytest.mark.parametrize(
    ("key", "ref"),
    [
        ("unet", "unet_out"),
        ("mean", "vae_latent_mean"),
        ("logvar", "vae_latent_logvar"),
        ("decode", "vae_decode_out"),
    ],
)
def test_sd_tiny_matches_reference(tiny: dict, tiny_outputs: dict, key: str, ref: str) -> None:
    got, want = tiny_outputs["float32", key], nhwc(tiny["io"][ref])
    assert got.shape == want.shape and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    assert err < TOL, f"{key}: max abs error {err:.3g}"


# Measured on CPU (max abs deviation of bfloat16 compute from float32 compute on
# sd_tiny): unet 0.038 (|out| <= 2.5), mean 0.057, logvar 0.056, decode 0.10
# (|out| <= 6.3). Bounds leave ~3x headroom for other backends.
BF16_BOUNDS = {"unet": 0.15, "mean": 0.2, "logvar": 0.2, "decode": 0.4}


@pytest.mark.parametrize("key", sorted(BF16_BOUNDS))
def test_bfloat16_compute_close_to_float32(tiny_outputs: dict, key: str) -> None:
    bf, f32 = tiny_outputs["bfloat16", key], tiny_outputs["float32", key]
    assert bf.dtype == np.float32 and bf.shape == f32.shape
    assert np.isfinite(bf).all()
    dev = float(np.abs(bf - f32).max())
    assert 0 < dev < BF16_BOUNDS[key], f"{key}: bfloat16 deviates by {dev:.3g}"


def test_input_sides_checked(tiny: dict) -> None:
    ucfg, vcfg = tiny["unet_cfg"], tiny["vae_cfg"]
    up = U.params_from_state_dict(ucfg, tiny["unet_sd"])
    with pytest.raises(ValueError, match="multiples of 2"):
        U.sd_unet_apply(ucfg, up, np.zeros((1, 5, 4, 4), np.float32), 1, np.zeros((1, 2, 32), np.float32))
    with pytest.raises(ValueError, match="context"):
        U.sd_unet_apply(ucfg, up, np.zeros((1, 4, 4, 4), np.float32), 1, np.zeros((1, 2, 8), np.float32))
    vp = V.params_from_state_dict(vcfg, tiny["vae_sd"])
    with pytest.raises(ValueError, match="multiples of 8"):
        V.vae_encode(vcfg, vp, np.zeros((1, 12, 16, 3), np.float32))


# -------------------------------------------------------- diffusers parity (random)


def _randomize(model, seed: int) -> dict[str, np.ndarray]:
    """Overwrite every parameter (zero-initialised ones included) from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


UNET_VARIANTS = {
    # SD 1.x style: one int attention_head_dim (diffusers: 2 HEADS per level), 1x1-conv
    # projections, no upcast, three levels, two resnets per level, two transformer
    # layers at the middle level, sin-first embedding with shift 1.
    "conv_proj_int_heads": {
        "block_out_channels": [8, 16, 32], "layers_per_block": 2, "norm_num_groups": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2, "cross_attention_dim": 24, "use_linear_projection": False,
        "upcast_attention": False, "transformer_layers_per_block": [1, 2, 1],
        "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 4, "out_channels": 4,
        "sample_size": 16,
    },
    # Unusual block order, asymmetric downsample padding, centred input, a wider time
    # embedding, a mid-block output scale, linear projections with upcast attention.
    "mixed_options": {
        "block_out_channels": [16, 16], "layers_per_block": [1, 2], "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [4, 2], "cross_attention_dim": 12, "use_linear_projection": True,
        "upcast_attention": True, "downsample_padding": 0, "center_input_sample": True,
        "time_embedding_dim": 40, "mid_block_scale_factor": 1.5, "in_channels": 3,
        "out_channels": 5, "norm_eps": 1e-4,
    },
}  # fmt: skip


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(UNET_VARIANTS))
def test_unet_matches_diffusers(name: str) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = UNET_VARIANTS[name]
    model = diffusers.UNet2DConditionModel(**config).eval()
    state = _randomize(model, seed=11)
    cfg = U.SDUNetConfig.from_json(dict(model.config))
    # diffusers reads attention_head_dim as the number of heads (an int: at every level).
    heads = {n.split(".")[0] + n.split(".")[1]: m.heads for n, m in model.named_modules()
             if n.endswith("attn1") and not n.startswith("mid")}  # fmt: skip
    for block, h in heads.items():
        level = int(block[-1]) if block.startswith("down") else cfg.levels - 1 - int(block[-1])
        assert h == cfg.num_attention_heads[level]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, config["in_channels"], 16, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    # Per-sample int timesteps, or one float timestep broadcast over the batch.
    t = np.array([981, 33]) if name == "conv_proj_int_heads" else np.array(500.25, np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    params = U.params_from_state_dict(cfg, state)
    got = run(partial(U.sd_unet_apply, cfg), params, nhwc(x), t, ctx)
    err = float(np.abs(got - nhwc(want.numpy())).max())
    assert err < TOL, f"{name}: max abs error {err:.3g}"


VAE_VARIANTS = {
    "three_levels": {
        "block_out_channels": [8, 16, 32], "layers_per_block": 2, "norm_num_groups": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "latent_channels": 3, "scaling_factor": 0.5,
    },
    "no_quant_no_attention": {
        "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "latent_channels": 2, "scaling_factor": 1.25, "use_quant_conv": False,
        "use_post_quant_conv": False, "mid_block_add_attention": False, "out_channels": 1,
    },
}  # fmt: skip


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(VAE_VARIANTS))
def test_vae_matches_diffusers(name: str) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = VAE_VARIANTS[name]
    model = diffusers.AutoencoderKL(**config).eval()
    state = _randomize(model, seed=3)
    cfg = V.SDVAEConfig.from_json(dict(model.config))
    assert cfg.scaling_factor == config["scaling_factor"]
    f = cfg.downsampling_factor
    assert f == 2 ** (len(config["block_out_channels"]) - 1)
    rng = np.random.default_rng(2)
    img = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    lat = rng.standard_normal((2, config["latent_channels"], 16 // f, 16 // f)).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(img)).latent_dist
        want = {"mean": dist.mean, "logvar": dist.logvar,
                "decode": model.decode(torch.from_numpy(lat)).sample}  # fmt: skip
    params = V.params_from_state_dict(cfg, state)

    def both(p, x, z):
        mean, logvar = V.vae_encode(cfg, p, x)
        return {"mean": mean, "logvar": logvar, "decode": V.vae_decode(cfg, p, z)}

    got = run(both, params, nhwc(img), nhwc(lat))
    for key in want:
        err = float(np.abs(got[key] - nhwc(want[key].numpy())).max())
        assert err < TOL, f"{name} {key}: max abs error {err:.3g}"


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("addition_embed_type", "text_time"),
        ("time_cond_proj_dim", 256),
        ("attention_type", "gated"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("cross_attention_norm", "group_norm"),
        ("encoder_hid_dim", 768),
        ("conv_in_kernel", 5),
        ("dual_cross_attention", True),
        ("only_cross_attention", True),
        ("num_attention_heads", 8),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
        ("transformer_layers_per_block", [[1, 2], 1]),
        ("cross_attention_dim", [16, 32]),
        ("layers_per_block", "2"),
        ("layers_per_block", 0),
        ("block_out_channels", [16, True]),
        ("block_out_channels", [16, 33]),
        ("norm_num_groups", None),
        ("norm_eps", -1.0),
        ("attention_head_dim", [3, 4]),
        ("downsample_padding", 2),
        ("upcast_attention", "yes"),
        ("some_new_option", 1),
    ],
)
def test_unet_config_refusals(reference: Path, option: str, value: object) -> None:
    data = read_json(reference / "sd_tiny" / "unet" / "config.json")
    data[option] = value
    with pytest.raises(SDConfigError) as info:
        U.SDUNetConfig.from_json(data)
    msg = str(info.value)
    assert "\n" not in msg
    assert option in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
        ("shift_factor", "0.1159"),  # a number is read (FLUX's VAE); a string is not
        ("down_block_types", ["AttnDownEncoderBlock2D"] * 4),
        ("up_block_types", ["UpDecoderBlock2D"] * 3),
        ("_class_name", "AutoencoderTiny"),
        ("layers_per_block", 0),
        ("scaling_factor", 0),
        ("scaling_factor", float("nan")),
        ("norm_num_groups", 3),
        ("use_quant_conv", 1),
        ("act_fn", "relu"),
        ("latent_dim", 4),
    ],
)
def test_vae_config_refusals(reference: Path, option: str, value: object) -> None:
    data = read_json(reference / "sd_tiny" / "vae" / "config.json")
    data[option] = value
    with pytest.raises(SDConfigError) as info:
        V.SDVAEConfig.from_json(data)
    msg = str(info.value)
    assert "\n" not in msg
    assert option.lstrip("_") in msg or "block_out_channels" in msg


def test_refusal_names_option_and_value(reference: Path) -> None:
    data = read_json(reference / "sd_tiny" / "unet" / "config.json")
    data["class_embed_type"] = "timestep"
    with pytest.raises(SDConfigError, match=r"^unsupported class_embed_type='timestep' \("):
        U.SDUNetConfig.from_json(data)


# ------------------------------------------------------------- strict state dicts


def test_state_dict_errors_listed_together(tiny: dict) -> None:
    cfg, sd = tiny["unet_cfg"], dict(tiny["unet_sd"])
    sd.pop("conv_in.bias")
    sd["conv_in.extra"] = np.zeros(3, np.float32)
    sd["conv_out.weight"] = np.zeros((4, 16, 1, 1), np.float32)
    with pytest.raises(SDStateDictError) as info:
        U.params_from_state_dict(cfg, sd)
    msg = str(info.value)
    assert "1 missing (conv_in.bias)" in msg
    assert "1 unexpected (conv_in.extra)" in msg
    assert "1 mis-shaped (conv_out.weight: got [4, 16, 1, 1], expected [4, 16, 3, 3])" in msg


def test_state_dict_not_read_before_validated(tiny: dict) -> None:
    class Poison:
        shape, dtype = (16,), np.dtype(np.float32)

        def __array__(self, *args, **kwargs):
            raise AssertionError("an array was read before the plan was validated")

    cfg, sd = tiny["vae_cfg"], dict(tiny["vae_sd"])
    sd["encoder.conv_in.bias"] = Poison()
    sd.pop("decoder.conv_out.bias")
    with pytest.raises(SDStateDictError, match="1 missing"):
        V.params_from_state_dict(cfg, sd)
    sd = dict(tiny["unet_sd"])
    sd["conv_in.bias"] = sd["conv_in.bias"].astype(np.int32)
    with pytest.raises(SDStateDictError, match="not floating point"):
        U.params_from_state_dict(tiny["unet_cfg"], sd)


def test_state_dict_layouts(tiny: dict) -> None:
    cfg, sd = tiny["unet_cfg"], tiny["unet_sd"]
    params = U.params_from_state_dict(cfg, sd)
    np.testing.assert_array_equal(params["conv_in"]["kernel"], sd["conv_in.weight"].transpose(2, 3, 1, 0))
    p = params["down_blocks_0"]["attentions_0"]
    np.testing.assert_array_equal(p["proj_in"]["kernel"], sd["down_blocks.0.attentions.0.proj_in.weight"].T)
    tb = p["transformer_blocks_0"]
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
    np.testing.assert_array_equal(tb["attn1"]["to_out_0"]["kernel"], sd[key].T)
    assert "bias" not in tb["attn1"]["to_q"]
    np.testing.assert_array_equal(params["time_embedding"]["linear_1"]["bias"],
                                  sd["time_embedding.linear_1.bias"])  # fmt: skip
    assert U.torch_key(("time_embedding", "linear_2", "kernel")) == "time_embedding.linear_2.weight"
    assert U.torch_key(("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj",
                        "kernel")) == "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    assert V.torch_key(("encoder", "mid_block", "attentions_0", "group_norm", "scale")) == (
        "encoder.mid_block.attentions.0.group_norm.weight"
    )


def test_legacy_vae_attention_names(tiny: dict) -> None:
    cfg, sd = tiny["vae_cfg"], tiny["vae_sd"]
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in sd.items():
        for new, name in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    with pytest.raises(SDStateDictError, match="16 unexpected"):
        V.params_from_state_dict(cfg, legacy)
    got = V.params_from_state_dict(cfg, V.rename_legacy_keys(legacy))
    want = V.params_from_state_dict(cfg, sd)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    both = {**legacy, "decoder.mid_block.attentions.0.to_q.bias": sd["decoder.mid_block.attentions.0.to_q.bias"]}
    with pytest.raises(SDStateDictError, match="both legacy and current"):
        V.rename_legacy_keys(both)


# ------------------------------------------------------------- released manifests


@pytest.mark.parametrize(
    ("model", "part", "count"),
    [
        ("sd21_base", "unet", 865_910_724),
        ("sd21_base", "vae", 83_653_863),
        ("sd14", "unet", 859_520_964),
        ("sd14", "vae", 83_653_863),
    ],
)
def test_released_manifests(reference: Path, model: str, part: str, count: int) -> None:
    d = reference / "sd_manifests" / model / part
    module = U if part == "unet" else V
    cls = U.SDUNetConfig if part == "unet" else V.SDVAEConfig
    cfg = cls.from_json(read_json(d / "config.json"))
    abstract = module.abstract_params(cfg)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    manifest = {k: tuple(v) for k, v in read_json(d / "state_dict_shapes.json").items()}
    got = module.state_dict_shapes(cfg)
    assert sorted(set(manifest) - set(got)) == []
    assert sorted(set(got) - set(manifest)) == []
    assert {k: v for k, v in got.items() if manifest[k] != v} == {}
    assert len(leaves) == len(manifest)
    assert sum(math.prod(x.shape) for x in leaves) == count
    if part == "unet":
        heads = {"sd21_base": (5, 10, 20, 20), "sd14": (8, 8, 8, 8)}[model]
        assert cfg.num_attention_heads == heads
        assert cfg.use_linear_projection == (model == "sd21_base")
