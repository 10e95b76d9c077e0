"""The T5 encoder (FLUX text_encoder_2): reference parity, manifests, tied embedding, refusals."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ddcm_jax.models import t5
from ddcm_jax.models.t5 import (
    T5Config,
    T5ConfigError,
    T5StateDictError,
    abstract_params,
    param_count,
    params_from_state_dict,
    plan_state_dict,
    relative_position_buckets,
    t5_encode,
    t5_init,
    to_flax,
    torch_key,
)


@pytest.fixture(scope="module")
def tiny(reference) -> dict:
    folder = reference / "flux_tiny"
    data = json.loads((folder / "text_encoder_2/config.json").read_text())
    config = T5Config.from_json(data)
    state = load_file(str(folder / "text_encoder_2/model.safetensors"))
    return {
        "data": data,
        "config": config,
        "state": state,
        "params": params_from_state_dict(config, state),
        "io": dict(np.load(folder / "io.npz")),
    }


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def _traced_count(config: T5Config) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))


# -- the flux_tiny reference ------------------------------------------------------------------


def test_flux_tiny_matches_reference(tiny):
    cfg, io = tiny["config"], tiny["io"]
    assert (cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_layers) == (40, 32, 56, 2)
    assert cfg.is_gated and cfg.dense_act_fn == "gelu_new"
    ids = io["t5_input_ids"]
    assert ids.shape == (3, 512) and ids.dtype == np.int64
    out = t5_encode(cfg, tiny["params"], ids)
    assert out.shape == (3, 512, 40) and out.dtype == np.float32
    err = np.abs(np.asarray(out) - io["t5_last_hidden_state"]).max(axis=(1, 2))
    print(f"flux_tiny T5 float32 max abs diff per prompt: {err}")
    assert (err <= 1e-4).all()
    # the null-prompt embedding FLUX conditions on is the first row
    np.testing.assert_allclose(out[:1], io["null_prompt_embeds"], atol=1e-4)
    # eager calls reuse the compiled program
    before = t5._encode._cache_size()
    again = t5_encode(cfg, tiny["params"], ids)
    assert t5._encode._cache_size() == before
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 0.1), ("float16", 0.02)])
def test_reduced_precision_stays_close(tiny, dtype, bound):
    io = tiny["io"]
    low = T5Config.from_json(tiny["data"], compute_dtype=dtype)
    assert low.compute_dtype == dtype and hash(low) != hash(tiny["config"])
    out = t5_encode(low, tiny["params"], io["t5_input_ids"][1:2])
    assert out.dtype == np.float32
    dev = float(np.abs(np.asarray(out) - io["t5_last_hidden_state"][1:2]).max())
    print(f"flux_tiny T5 {dtype} vs reference: {dev:.3g}")
    assert np.isfinite(dev) and dev < bound


def test_param_counts(tiny, reference):
    cfg, state = tiny["config"], tiny["state"]
    recorded = json.loads((reference / "flux_tiny/io.json").read_text())["params"]
    assert param_count(cfg) == _traced_count(cfg) == recorded["text_encoder_2"] == 28_488
    assert sum(v.size for v in state.values()) == 28_488  # shared.weight only, stored once
    init = t5_init(cfg, jax.random.key(0))
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, tiny["params"])


def test_flux1_dev_manifest_maps_completely(reference):
    folder = reference / "flux_manifests/flux1_dev"
    cfg = T5Config.from_json(json.loads((folder / "text_encoder_2/config.json").read_text()))
    shapes = json.loads((folder / "text_encoder_2/state_dict_shapes.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())["components"]["text_encoder_2"]
    entries = plan_state_dict(cfg, shapes)
    assert sorted(key for _, key in entries) == sorted(shapes) and len(shapes) == summary["keys"]
    flat = {
        tuple(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    }
    assert len(entries) == len(flat)
    for path, key in entries:
        want = flat[path][::-1] if path[-1] == "kernel" else flat[path]
        assert tuple(shapes[key]) == want and key == torch_key(path)
    count = summary["params"]
    assert param_count(cfg) == _traced_count(cfg) == count
    assert sum(math.prod(s) for s in shapes.values()) == count
    # a file that also stores the tied copy, and a T5ForConditionalGeneration file, plan the same
    d = shapes["shared.weight"]
    same = plan_state_dict(cfg, {**shapes, "encoder.embed_tokens.weight": d, "lm_head.weight": d,
                                 "decoder.block.0.layer.0.SelfAttention.q.weight": [4096, 4096]})  # fmt: skip
    assert same == entries


def test_torch_key_rule():
    assert torch_key(("encoder", "block_11", "layer_1", "DenseReluDense", "wi_0", "kernel")) == (
        "encoder.block.11.layer.1.DenseReluDense.wi_0.weight"
    )
    assert torch_key(
        ("encoder", "block_0", "layer_0", "SelfAttention", "relative_attention_bias")
    ) == ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    assert torch_key(("encoder", "final_layer_norm", "scale")) == "encoder.final_layer_norm.weight"
    assert torch_key(("shared", "embedding")) == "shared.weight"
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    k = to_flax(("encoder", "block_0", "layer_0", "SelfAttention", "q", "kernel"), a)
    assert k.dtype == np.float32 and k.shape == (3, 2) and k.flags.c_contiguous
    assert to_flax(("shared", "embedding"), a).shape == (2, 3)


# -- the tied embedding ---------------------------------------------------------------------


def test_tied_embedding_forms(tiny):
    cfg, state = tiny["config"], tiny["state"]
    shared = state["shared.weight"]
    embed_only = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                  for k, v in state.items()}  # fmt: skip
    both = {**state, "encoder.embed_tokens.weight": shared.copy()}
    full = {**both, "lm_head.weight": shared, "decoder.final_layer_norm.weight": shared[0]}
    for form in (embed_only, both, full):
        params = params_from_state_dict(cfg, form)
        jax.tree.map(np.testing.assert_array_equal, params, tiny["params"])
    with pytest.raises(T5StateDictError) as excinfo:
        params_from_state_dict(cfg, {**state, "encoder.embed_tokens.weight": shared + 1})
    assert "encoder.embed_tokens.weight differs from shared.weight" in one_line(excinfo)
    with pytest.raises(T5StateDictError) as excinfo:
        params_from_state_dict(cfg, {**state, "encoder.embed_tokens.weight": shared[:-1]})
    assert "encoder.embed_tokens.weight (111, 40) (expected (112, 40))" in one_line(excinfo)


# -- refusals ---------------------------------------------------------------------------------


def test_missing_extra_misshaped_keys_are_named(tiny):
    cfg, state = tiny["config"], tiny["state"]
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    cases = {
        "missing": ({k: v for k, v in state.items() if k != key}, f"1 missing: {key}"),
        "missing embedding": (
            {k: v for k, v in state.items() if k != "shared.weight"},
            "missing: shared.weight",
        ),
        "unexpected": (
            {
                **state,
                "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": state[bias],
            },
            "1 unexpected: encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        "mis-shaped": ({**state, key: state[key].T}, f"{key} (40, 56) (expected (56, 40))"),
        "not floating": ({**state, key: state[key].astype(np.int32)}, f"{key} (int32)"),
    }
    for label, (broken, named) in cases.items():
        with pytest.raises(T5StateDictError) as excinfo:
            params_from_state_dict(cfg, broken)
        assert named in one_line(excinfo), label
    # everything at once, from shapes alone
    shapes = {k: v.shape for k, v in state.items() if ".block.1." not in k}
    with pytest.raises(T5StateDictError) as excinfo:
        plan_state_dict(cfg, {**shapes, "extra.a": (1,), bias: (4, 32)})
    err = excinfo.value
    assert len(err.missing) == 9 and err.unexpected == ["extra.a"] and len(err.misshaped) == 1
    assert "9 missing" in one_line(excinfo) and "(9 in all)" in str(err)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"feed_forward_proj": "gated-tanh"}, "feed_forward_proj"),
        ({"feed_forward_proj": "geglu-gelu"}, "feed_forward_proj"),
        ({"dense_act_fn": "gelu"}, "dense_act_fn"),
        ({"is_gated_act": False}, "is_gated_act"),
        ({"is_decoder": True}, "is_decoder"),
        ({"model_type": "umt5"}, "model_type"),
        ({"architectures": ["UMT5EncoderModel"]}, "architectures"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"num_layers": 0}, "num_layers"),
        ({"d_model": True}, "d_model"),
        ({"d_kv": 8.0}, "d_kv"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
        ({"relative_attention_max_distance": 8}, "relative_attention_max_distance"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
        ({"layer_norm_epsilon": "1e-6"}, "layer_norm_epsilon"),
        ({"vocab_size": 1 << 30}, "vocab_size"),
    ],
)
def test_unsupported_config_is_refused(tiny, change, named):
    with pytest.raises(T5ConfigError) as excinfo:
        T5Config.from_json({**tiny["data"], **change})
    assert named in one_line(excinfo)
    with pytest.raises(T5ConfigError, match="compute_dtype"):
        T5Config.from_json(tiny["data"], compute_dtype="float64")


def test_config_json_round_trip(tiny, reference):
    for cfg in (
        tiny["config"],
        T5Config.from_json(tiny["data"], compute_dtype="bfloat16"),
        T5Config(feed_forward_proj="gated-silu", num_layers=1),
        T5Config(),  # transformers' defaults: t5-small, relu
    ):
        back = T5Config.from_json(json.loads(json.dumps(cfg.to_json())))
        assert back == cfg and hash(back) == hash(cfg)
    # informational keys are ignored; relu / gated-relu / gelu are understood
    assert T5Config.from_json({"feed_forward_proj": "gated-relu"}).dense_act_fn == "relu"
    assert T5Config.from_json({"feed_forward_proj": "gelu", "n_positions": 512}).is_gated is False
    released = json.loads(
        (reference / "flux_manifests/flux1_dev/text_encoder_2/config.json").read_text()
    )
    assert T5Config.from_json(released).d_model == 4096  # is_encoder_decoder, output_past, ...


def test_bad_input_ids_are_refused(tiny):
    cfg, params = tiny["config"], tiny["params"]
    for ids, named in [
        (np.full((1, 5), 112), "outside"),
        (np.full((1, 5), -1), "outside"),
        (np.zeros((5,), np.int32), "batch"),
        (np.zeros((1, 5), np.float32), "integers"),
        (np.zeros((1, 0), np.int32), "length"),
    ]:
        with pytest.raises(ValueError, match=named):
            t5_encode(cfg, params, ids)


# -- against PyTorch --------------------------------------------------------------------------


@pytest.mark.torch
def test_buckets_match_transformers():
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.t5.modeling_t5")
    for buckets, distance, length in [(32, 128, 600), (8, 20, 64), (33, 100, 300), (4, 3, 40)]:
        ours = relative_position_buckets(length, length, buckets, distance)
        pos = torch.arange(length)
        theirs = modeling.T5Attention._relative_position_bucket(
            pos[None, :] - pos[:, None], True, buckets, distance
        ).numpy()
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.torch
@pytest.mark.parametrize("ff", ["relu", "gated-silu"])
def test_encoder_matches_transformers(ff):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=50, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=3,
        relative_attention_num_buckets=16, relative_attention_max_distance=20,
        feed_forward_proj=ff, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    model = transformers.T5EncoderModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    ids = np.random.default_rng(0).integers(0, 50, size=(2, 37))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    cfg = T5Config.from_json(model.config.to_dict())
    got = np.asarray(t5_encode(cfg, params_from_state_dict(cfg, state), ids))
    err = np.abs(got - want).max()
    print(f"{ff} T5 vs transformers: {err:.2e}")
    assert err < 1e-4 and np.abs(want).max() > 0.5
