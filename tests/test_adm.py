"""The Flax ADM network: reference parity, every create_model option, jit/vmap/scan."""

from __future__ import annotations

import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ddcm_jax.convert import convert_state_dict

import ddcm_jax
from ddcm_jax.jit import compiler_options
from ddcm_jax.models import ADMConfig, abstract_params, adm_apply, adm_init
from ddcm_jax.models.adm import param_count


def expected_param_count(cfg: ADMConfig) -> int:
    """The library's closed-form count; the tests hold it against the real parameter tree."""
    return param_count(cfg)


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


BASE = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", num_heads=2)  # fmt: skip

# One configuration per create_model option (on top of BASE), so a failure names the option.
OPTIONS = {
    "base": {},
    "learn_sigma": dict(learn_sigma=True),
    "class_cond": dict(class_cond=True),
    "num_res_blocks_int": dict(num_res_blocks=2),
    "num_res_blocks_per_level": dict(num_res_blocks=[1, 2]),
    "channel_mult_three_levels": dict(channel_mult="1,1,2", attention_resolutions="8"),
    "attention_multi_res": dict(attention_resolutions="32,16"),
    "num_head_channels": dict(num_head_channels=16),
    "num_heads_upsample": dict(num_heads=2, num_heads_upsample=4),
    "scale_shift_norm": dict(use_scale_shift_norm=True),
    "resblock_updown": dict(resblock_updown=True),
    "no_conv_resample": dict(conv_resample=False),
    "new_attention_order": dict(use_new_attention_order=True, num_heads=2),
    "dropout_inference": dict(dropout=0.1),
    "all_on": dict(learn_sigma=True, class_cond=True, num_head_channels=16, use_scale_shift_norm=True,
                   resblock_updown=True, use_new_attention_order=True, num_res_blocks=[2, 1]),
}  # fmt: skip


def _inputs(cfg: ADMConfig, batch: int = 2, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    y = None if cfg.num_classes is None else rng.integers(0, 1000, size=batch)
    return x, t, y


def test_reference_fixture_parity(tiny_model_dir, reference):
    io = np.load(reference / "adm_tiny" / "io.npz")
    model = ddcm_jax.load_model(tiny_model_dir)
    out = jax.jit(model.apply)(model.params, io["x"].transpose(0, 2, 3, 1), io["t"])
    np.testing.assert_allclose(np.asarray(out), io["out"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    assert out.shape == (2, 32, 32, 6) and model.config.learn_sigma


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_shapes_and_param_count(option):
    cfg = ADMConfig.from_create_model({**BASE, **OPTIONS[option]})
    tree = abstract_params(cfg)
    assert n_params(tree) == expected_param_count(cfg)
    x, t, y = _inputs(cfg)
    out = jax.eval_shape(lambda p: adm_apply(cfg, p, x, t, y), tree)
    assert out.shape == (2, 32, 32, cfg.out_channels) and out.dtype == jnp.float32


@pytest.mark.torch
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_matches_pytorch(option):
    """Random torch UNet -> state dict -> converter -> Flax: same outputs."""
    import torch
    from torch_adm import random_torch_adm

    cfg = ADMConfig.from_create_model({**BASE, **OPTIONS[option]})
    net = random_torch_adm(cfg, seed=zlib.crc32(option.encode()) % 1000)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    params = convert_state_dict(cfg, state)
    x, t, y = _inputs(cfg, size=16 if cfg.size_multiple <= 4 else 32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                  None if y is None else torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)  # fmt: skip
    out = np.asarray(jax.jit(lambda p: adm_apply(cfg, p, x, t, y))(params))
    np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def test_default_channel_mult_per_image_size():
    for size, mult in {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4),
                       512: (0.5, 1, 1, 2, 2, 4, 4)}.items():  # fmt: skip
        cfg = ADMConfig.from_create_model(dict(image_size=size, num_channels=64, num_res_blocks=1))
        assert cfg.channel_mult == mult
        assert n_params(abstract_params(cfg)) == expected_param_count(cfg)
    with pytest.raises(ValueError, match="unsupported image size"):
        ADMConfig.from_create_model(dict(image_size=48, num_channels=64, num_res_blocks=1))


def test_attention_resolutions_become_downsample_rates():
    cfg = ADMConfig.from_create_model({**BASE, "image_size": 256, "attention_resolutions": "32,16,8"})
    assert cfg.attention_ds == (8, 16, 32)


def test_unknown_create_model_argument_is_refused():
    with pytest.raises(ValueError, match="unknown create_model arguments: num_chanels"):
        ADMConfig.from_create_model({**BASE, "num_chanels": 3})


def test_class_label_required_iff_class_conditional():
    cfg = ADMConfig.from_create_model({**BASE, "class_cond": True})
    params = _random_params(cfg, 1)
    x, t, y = _inputs(cfg)
    with pytest.raises(ValueError, match="class label"):
        adm_apply(cfg, params, x, t, None)
    fwd = jax.jit(lambda p, yy: adm_apply(cfg, p, x, t, yy))
    a, b = fwd(params, y), fwd(params, (y + 1) % 1000)
    assert float(jnp.abs(a - b).max()) > 1e-6


def test_dropout_is_a_noop_at_inference():
    cfg0 = ADMConfig.from_create_model(BASE)
    cfg1 = ADMConfig.from_create_model({**BASE, "dropout": 0.3})
    params = jax.jit(adm_init, static_argnums=0)(cfg0, jax.random.key(2))
    x, t, _ = _inputs(cfg0)
    fwd = jax.jit(adm_apply, static_argnums=0)
    np.testing.assert_array_equal(fwd(cfg0, params, x, t), fwd(cfg1, params, x, t))


def _random_params(cfg: ADMConfig, seed: int):
    """Init then perturb every leaf, so zero-initialised layers do not hide bugs."""
    params = jax.jit(adm_init, static_argnums=0)(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_jit_vmap_and_scan_agree_with_batched_apply(tiny_model_dir):
    model = ddcm_jax.load_model(tiny_model_dir)
    x, t, _ = _inputs(model.config.architecture, batch=3)
    batched = np.asarray(model(x, t))
    single = jax.jit(jax.vmap(lambda xi, ti: model.apply(model.params, xi[None], ti[None])[0]))(x, t)
    np.testing.assert_allclose(np.asarray(single), batched, atol=1e-5)
    jitted = jax.jit(lambda m, xx, tt: m(xx, tt))(model, x, t)  # the model is a pytree
    np.testing.assert_allclose(np.asarray(jitted), batched, atol=1e-5)

    def body(carry, inp):
        xi, ti = inp
        return carry + 1, model.apply(model.params, xi[None], ti[None])[0]

    _, scanned = jax.jit(lambda xx, tt: jax.lax.scan(body, 0, (xx, tt)))(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(scanned), batched, atol=1e-5)


def test_fully_convolutional_on_other_sizes(tiny_model_dir):
    model = ddcm_jax.load_model(tiny_model_dir)
    x = np.zeros((1, 24, 40, 3), np.float32)
    assert model(x, np.array([10])).shape == (1, 24, 40, 6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_compute_stays_close(reference, dtype):
    """Low-precision torso vs the float32 reference output (tolerances measured, see README)."""
    from ddcm_jax.convert import read_state_dict

    kwargs = json.loads((reference / "adm_tiny" / "config.json").read_text())
    cfg = ADMConfig.from_create_model({**kwargs, "compute_dtype": dtype})
    params = convert_state_dict(cfg, read_state_dict(reference / "adm_tiny" / "model.pt"))
    io = np.load(reference / "adm_tiny" / "io.npz")
    out = jax.jit(lambda p: adm_apply(cfg, p, io["x"].transpose(0, 2, 3, 1), io["t"]))(params)
    assert out.dtype == jnp.float32  # the head runs in float32, as in the original
    ref = io["out"].transpose(0, 2, 3, 1)
    err = np.abs(np.asarray(out) - ref)
    rel = float(np.sqrt((err**2).mean() / (ref**2).mean()))
    tol = {"bfloat16": 0.05, "float16": 0.01}[dtype]
    assert rel < tol, f"{dtype} relative RMS error {rel:.4f} >= {tol}"
    assert rel > 1e-6  # the compute dtype is really in effect


def test_use_fp16_maps_to_float16_compute():
    assert ADMConfig.from_create_model({**BASE, "use_fp16": True}).compute_dtype == "float16"
    assert ADMConfig.from_create_model({**BASE, "use_fp16": True, "compute_dtype": "bfloat16"}).compute_dtype == "bfloat16"


def test_attention_heads_change_the_function():
    """num_heads / num_head_channels / order are not cosmetic: same params, different outputs."""
    outs = []
    for extra in (dict(num_heads=1), dict(num_heads=4), dict(num_head_channels=8),
                  dict(num_heads=4, use_new_attention_order=True)):  # fmt: skip
        cfg = ADMConfig.from_create_model({**BASE, **extra})
        params = _random_params(ADMConfig.from_create_model(BASE), 3)
        x, t, _ = _inputs(cfg)
        outs.append(np.asarray(adm_apply(cfg, params, x, t)))
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.abs(outs[i] - outs[j]).max() > 1e-5


def _memory_cases():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from configs import CONFIGS

    cases = [(f"option {k}", {**BASE, **v}, (32, 32)) for k, v in sorted(OPTIONS.items())]
    cases += [(f"option {k} 40x24", {**BASE, **OPTIONS[k]}, (40, 24)) for k in ("all_on", "attention_multi_res")]
    cases += [(name, kw, (72, 40)) for name, kw in CONFIGS.items()]
    return cases


def test_activation_bound_stays_above_xlas_estimate():
    """The arithmetic bound that lets `check_fits` skip compiling the network is never below what
    XLA itself says one forward call needs (every option, the benchmarks' configs, odd sizes)."""
    from ddcm_jax.memory import forward_bytes
    from ddcm_jax.models.adm import activation_bound

    for name, kw, (h, w) in _memory_cases():
        cfg = ADMConfig.from_create_model(kw)
        xla, bound = forward_bytes(cfg, h, w), activation_bound(cfg, h, w)
        assert xla <= bound <= 64 * xla + (64 << 20), (name, h, w, xla, bound)  # above, and not absurdly


def test_eager_call_is_compiled_once_per_shape(tiny_model_dir):
    """`model(x, t)` called eagerly runs the compiled network (issue 26): same values as the
    traced call, and a new input of the same shape reuses the compiled program."""
    from ddcm_jax import model as model_module

    model = ddcm_jax.load_model(tiny_model_dir)
    x, t, _ = _inputs(model.config.architecture, batch=2)
    first = np.asarray(model(x, t))
    compiled = model_module._compiled_apply._cache_size()
    again = np.asarray(model(np.flip(x, 0).copy(), t[::-1].copy()))
    assert model_module._compiled_apply._cache_size() == compiled  # no re-trace for the same shapes
    np.testing.assert_array_equal(again, first[::-1])  # batch rows are independent
    # The caller's own jit with the package's options (docs/python-api.md) compiles the same program.
    traced = jax.jit(lambda p, xx, tt: model.apply(p, xx, tt), compiler_options=compiler_options())(model.params, x, t)
    np.testing.assert_array_equal(first, np.asarray(traced))


def test_attention_by_query_blocks_is_the_whole_attention_bit_for_bit():
    """Softmax attention is row-wise in the queries: computing it 256 queries at a time (the
    cache-friendly layout of `_layers.by_query_blocks`) must give exactly the same numbers."""
    from ddcm_jax.models import _layers as L

    ks = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (2, 1024, 4 * 16)) for kk in ks)
    blocked = jax.jit(lambda a, b, c: L.attention(a, b, c, 4))(q, k, v)
    whole = jax.jit(lambda a, b, c: L.attention(a, b, c, 4, query_block=None))(q, k, v)
    np.testing.assert_array_equal(np.asarray(blocked), np.asarray(whole))
    odd = jax.random.normal(ks[0], (1, 300, 64))  # not a multiple of the block: runs whole
    np.testing.assert_array_equal(np.asarray(L.attention(odd, odd, odd, 4)),
                                  np.asarray(L.attention(odd, odd, odd, 4, query_block=None)))  # fmt: skip
