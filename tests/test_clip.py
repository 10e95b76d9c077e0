"""The CLIP text encoder and tokenizer: reference parity, transformers parity, manifests, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ddcm_jax.models.clip import (
    CLIPConfigError,
    CLIPStateDictError,
    CLIPTextConfig,
    abstract_params,
    clip_text_apply,
    param_count,
    params_from_state_dict,
    plan_state_dict,
    torch_key,
)
from ddcm_jax.tokenizer import CLIPTokenizer, TokenizerError

# clip_text_apply compiles itself; under an outer jit (as here) it checks only static facts.
apply_jit = jax.jit(clip_text_apply, static_argnums=0, static_argnames="dtype")

TRICKY_PROMPTS = [
    "",
    "a photo of a cat",
    "A  Photo\tOF\n a CAT",
    "  leading and trailing spaces  ",
    "the cat's hat, isn't it? we're, they'll, I'm, it'd, you've; ''s '’s",
    "Hello!!! What?! (parentheses) [brackets] {braces} -- em—dash... #hash @at $5.99",
    "123 4567 3.14159 1,000,000 ½ Ⅻ ١٢٣",
    "café naïve Ünïcödé crème brûlée e\u0301te\u0301 İstanbul ΟΔΟΣ Σ straße",
    "🐱🐶 emoji 👩‍👩‍👧 cat 🇫🇷 flag",
    "中文 テスト 한국어 עברית العربية",
    "tabs\t\tand\r\nnewlines\u3000ideographic\u00a0nbsp \x1c separators",
    "a <|endoftext|> inside, <|startoftext|> too, <|ENDOFTEXT|> upper case",
    "photo of the cat " * 30,  # longer than 77 tokens
    "x" * 300,
]


@pytest.fixture(scope="module")
def sd_tiny(reference: Path) -> dict:
    folder = reference / "sd_tiny"
    config = CLIPTextConfig.from_json(json.loads((folder / "text_encoder/config.json").read_text()))
    state = load_file(str(folder / "text_encoder/model.safetensors"))
    return {
        "folder": folder,
        "config": config,
        "state": state,
        "params": params_from_state_dict(config, state),
        "io": dict(np.load(folder / "io.npz")),
    }


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# -- the sd_tiny reference pipeline ------------------------------------------------------------


def test_sd_tiny_token_ids(sd_tiny):
    tok = CLIPTokenizer.from_folder(sd_tiny["folder"] / "tokenizer")
    ids = tok(["", "a photo of a cat"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    np.testing.assert_array_equal(ids, sd_tiny["io"]["text_input_ids"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (521, 522, 0)


def test_sd_tiny_encoder_matches_reference(sd_tiny):
    io, cfg = sd_tiny["io"], sd_tiny["config"]
    assert cfg.hidden_act == "gelu" and cfg.eos_token_id == 522 and not cfg.legacy_pooling
    assert param_count(cfg) == 32842
    last, pooled = apply_jit(cfg, sd_tiny["params"], io["text_input_ids"])
    assert last.dtype == np.float32 and last.shape == (2, 77, 32) and pooled.shape == (2, 32)
    err_last = np.abs(np.asarray(last) - io["text_last_hidden_state"]).max()
    err_pool = np.abs(np.asarray(pooled) - io["text_pooler_output"]).max()
    print(f"sd_tiny float32: last_hidden_state {err_last:.2e}, pooler {err_pool:.2e}")
    assert err_last < 1e-4 and err_pool < 1e-4
    # The direct call (which checks the id values) computes the same function. Batch 1 against
    # batch 2: XLA:CPU vectorises the two shapes differently (on AMD EPYC 2 of 2,464 values move
    # by 1.2e-6), so float32 rounding, not a tighter bound, sets the tolerance.
    direct = clip_text_apply(cfg, sd_tiny["params"], io["text_input_ids"][1:])
    np.testing.assert_allclose(direct[0], last[1:], atol=1e-5)


def test_state_dict_without_prefix_gives_the_same_params(sd_tiny):
    stripped = {k.removeprefix("text_model."): v for k, v in sd_tiny["state"].items()}
    params = params_from_state_dict(sd_tiny["config"], stripped)
    jax.tree.map(np.testing.assert_array_equal, params, sd_tiny["params"])
    # the buffer older transformers saved is ignored, with or without prefix
    ids = np.arange(77, dtype=np.int64)[None]
    params_from_state_dict(sd_tiny["config"], {**stripped, "embeddings.position_ids": ids})
    params_from_state_dict(
        sd_tiny["config"], {**sd_tiny["state"], "text_model.embeddings.position_ids": ids}
    )


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 0.15), ("float16", 0.02)])
def test_reduced_precision_compute_stays_close(sd_tiny, dtype, bound):
    io, cfg = sd_tiny["io"], sd_tiny["config"]
    ref = clip_text_apply(cfg, sd_tiny["params"], io["text_input_ids"])
    low = clip_text_apply(cfg, sd_tiny["params"], io["text_input_ids"], dtype=dtype)
    assert low[0].dtype == np.float32 and low[1].dtype == np.float32
    dev = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(low, ref, strict=True)
    ]
    print(f"sd_tiny {dtype} vs float32: last_hidden_state {dev[0]:.3g}, pooler {dev[1]:.3g}")
    assert all(np.isfinite(d) and d < bound for d in dev)


# -- the released models' manifests -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "act"),
    [("sd21_base", 340_387_840, "gelu"), ("sd14", 123_060_480, "quick_gelu")],
)
def test_manifest_maps_one_to_one(reference, name, count, act):
    folder = reference / "sd_manifests" / name / "text_encoder"
    cfg = CLIPTextConfig.from_json(json.loads((folder / "config.json").read_text()))
    assert cfg.hidden_act == act and cfg.legacy_pooling  # released configs say eos_token_id 2
    shapes = json.loads((folder / "state_dict_shapes.json").read_text())
    entries = plan_state_dict(cfg, shapes)
    assert sorted(key for _, key in entries) == sorted(shapes)  # every key once, no extras
    flat = {
        tuple(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    }
    assert len(entries) == len(flat)
    for path, key in entries:
        want = flat[path][::-1] if path[-1] == "kernel" else flat[path]
        assert tuple(shapes[key]) == want and key == "text_model." + torch_key(path)
    # counts exclude the position_ids buffer (not a parameter; absent from the manifests)
    assert param_count(cfg) == count == sum(math.prod(s) for s in shapes.values())
    plan_state_dict(cfg, {**shapes, "text_model.embeddings.position_ids": [1, 77]})


def test_torch_key_rule():
    assert torch_key(("encoder", "layers_11", "self_attn", "q_proj", "kernel")) == (
        "encoder.layers.11.self_attn.q_proj.weight"
    )
    assert torch_key(("encoder", "layers_0", "layer_norm1", "scale")) == (
        "encoder.layers.0.layer_norm1.weight"
    )
    assert torch_key(("embeddings", "token_embedding", "embedding")) == (
        "embeddings.token_embedding.weight"
    )
    assert torch_key(("final_layer_norm", "bias")) == "final_layer_norm.bias"


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": 30}, "num_attention_heads"),
        ({"layer_norm_eps": "1e-5"}, "layer_norm_eps"),
        ({"vocab_size": True}, "vocab_size"),
        ({"model_type": "clip_vision_model"}, "model_type"),
        ({"pruned_heads": {"0": [1]}}, "pruned_heads"),
    ],
)
def test_unsupported_config_is_refused(sd_tiny, change, named):
    data = json.loads((sd_tiny["folder"] / "text_encoder/config.json").read_text())
    with pytest.raises(CLIPConfigError) as excinfo:
        CLIPTextConfig.from_json({**data, **change})
    assert named in one_line(excinfo)


def test_missing_extra_misshaped_keys_are_refused(sd_tiny):
    cfg, state = sd_tiny["config"], sd_tiny["state"]
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    cases = {
        "missing": ({k: v for k, v in state.items() if k != key}, key),
        "unexpected": (
            {**state, "text_model.text_projection.weight": state[key]},
            "text_projection",
        ),
        "mis-shaped": ({**state, key: state[key].T}, key),
        "not floating point": ({**state, key: state[key].astype(np.int32)}, key),
        "mixed prefixes": (
            {**state, "encoder.layers.0.mlp.fc2.bias": state["text_model.final_layer_norm.bias"]},
            "encoder.layers.0.mlp.fc2.bias",
        ),
    }
    for label, (broken, named) in cases.items():
        with pytest.raises(CLIPStateDictError) as excinfo:
            params_from_state_dict(cfg, broken)
        message = one_line(excinfo)
        assert named in message, (label, message)
    # one error lists every problem at once, with counts
    broken = {k: v for k, v in state.items() if ".layers.1." not in k}
    with pytest.raises(CLIPStateDictError) as excinfo:
        params_from_state_dict(cfg, {**broken, "extra.a": state[key], "extra.b": state[key]})
    assert len(excinfo.value.missing) == 16 and len(excinfo.value.unexpected) == 2
    assert "16 missing" in one_line(excinfo) and "(16 in all)" in str(excinfo.value)


def test_bad_input_ids_are_refused(sd_tiny):
    cfg, params = sd_tiny["config"], sd_tiny["params"]
    for ids, named in [
        (np.zeros((1, 78), np.int32), "length"),
        (np.full((1, 5), 523), "outside"),
        (np.zeros((5,), np.int32), "batch"),
        (np.zeros((1, 5), np.float32), "integers"),
    ]:
        with pytest.raises(ValueError, match=named):
            clip_text_apply(cfg, params, ids)
    with pytest.raises(ValueError, match="dtype"):
        clip_text_apply(cfg, params, np.zeros((1, 5), np.int32), dtype="float64")


def _tokenizer_copy(reference: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tokenizer"
    shutil.copytree(reference / "sd_tiny" / "tokenizer", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **changes}))


def test_broken_tokenizer_folders_are_refused(reference, tmp_path, monkeypatch):
    import ddcm_jax.tokenizer as tokenizer_module

    def refused(edit, named: str) -> None:
        folder = _tokenizer_copy(reference, tmp_path / named.replace(" ", "_").replace("/", "_"))
        edit(folder)
        with pytest.raises(TokenizerError) as excinfo:
            CLIPTokenizer.from_folder(folder)
        assert named in one_line(excinfo)

    refused(lambda f: (f / "vocab.json").write_text('{"a": 1,'), "not valid JSON")
    refused(lambda f: (f / "tokenizer_config.json").write_text("[" * 100000), "tokenizer_config")
    refused(lambda f: _edit_json(f / "special_tokens_map.json", pad_token="<pad>"), "'<pad>'")
    refused(lambda f: _edit_json(f / "tokenizer_config.json", bos_token=5), "bos_token")
    refused(
        lambda f: _edit_json(f / "tokenizer_config.json", model_max_length=1), "model_max_length"
    )
    refused(lambda f: _edit_json(f / "tokenizer_config.json", do_lower_case=False), "do_lower_case")
    refused(lambda f: _edit_json(f / "tokenizer_config.json", fancy_option=1), "fancy_option")
    refused(lambda f: (f / "vocab.json").unlink(), "vocab.json: missing")
    refused(lambda f: (f / "merges.txt").write_text("#version: 0.2\np h x\n"), "line 2")
    refused(lambda f: (f / "merges.txt").write_text("q z\n"), "not in vocab.json")
    refused(lambda f: (f / "tokenizer.json").write_text("{}"), "tokenizer.json")
    refused(lambda f: _edit_json(f / "vocab.json", dup=0), "id 0")
    monkeypatch.setattr(tokenizer_module, "MAX_FILE_BYTES", 4096)
    refused(lambda f: None, "more than the 4096 allowed")  # vocab.json is 6.5 kB


def test_tokenizer_basics(reference):
    tok = CLIPTokenizer.from_folder(reference / "sd_tiny" / "tokenizer")
    np.testing.assert_array_equal(tok("a photo of a cat"), tok(["a photo of a cat"]))
    long = tok(["photo " * 100])[0]
    assert long[0] == 521 and long[-1] == 522 and (long[1:-1] == 515).all()
    assert tok.encode("")[-1] == tok.eos_token_id and len(tok.encode("cat " * 200)) == 77
    with pytest.raises(TypeError):
        tok([b"bytes"])
    with pytest.raises(ValueError, match="Unicode"):
        tok(["\ud800"])


# -- against transformers -----------------------------------------------------------------------


def _hf_ids(hf, prompts: list[str]) -> np.ndarray:
    enc = hf(prompts, padding="max_length", max_length=hf.model_max_length, truncation=True)
    return np.asarray(enc["input_ids"])


@pytest.mark.torch
def test_tokenizer_matches_transformers(reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = reference / "sd_tiny" / "tokenizer"
    ours = CLIPTokenizer.from_folder(folder)
    np.testing.assert_array_equal(
        ours(TRICKY_PROMPTS),
        _hf_ids(transformers.CLIPTokenizer.from_pretrained(folder), TRICKY_PROMPTS),
    )

    # SD 1.x pads with <|endoftext|>: the null prompt's ids (and embedding) change.
    sd1 = _tokenizer_copy(reference, tmp_path / "sd1")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        _edit_json(sd1 / name, pad_token="<|endoftext|>")
    ours_sd1 = CLIPTokenizer.from_folder(sd1)
    assert ours_sd1.pad_token_id == 522
    assert ours_sd1([""])[0].tolist() == [521] + [522] * 76
    hf_sd1 = transformers.CLIPTokenizer.from_pretrained(sd1)
    np.testing.assert_array_equal(ours_sd1(TRICKY_PROMPTS), _hf_ids(hf_sd1, TRICKY_PROMPTS))

    # The released SD files' layout: AddedToken objects (normalized true) in tokenizer_config,
    # pad "<|endoftext|>" there but "!" in special_tokens_map.json, which wins.
    sd2 = _tokenizer_copy(reference, tmp_path / "sd2")

    def added(content: str, typed: bool) -> dict:
        token = {"content": content, "lstrip": False, "normalized": True, "rstrip": False,
                 "single_word": False}  # fmt: skip
        return {"__type": "AddedToken", **token} if typed else token

    for name, typed, pad in (("tokenizer_config.json", True, "<|endoftext|>"),
                             ("special_tokens_map.json", False, "!")):  # fmt: skip
        _edit_json(sd2 / name, bos_token=added("<|startoftext|>", typed), pad_token=pad,
                   eos_token=added("<|endoftext|>", typed), unk_token=added("<|endoftext|>", typed))  # fmt: skip
    ours_sd2 = CLIPTokenizer.from_folder(sd2)
    assert ours_sd2.pad_token_id == 0
    hf_sd2 = transformers.CLIPTokenizer.from_pretrained(sd2)
    np.testing.assert_array_equal(ours_sd2(TRICKY_PROMPTS), _hf_ids(hf_sd2, TRICKY_PROMPTS))


@pytest.mark.torch
@pytest.mark.parametrize(
    "spec",
    [
        # quick_gelu, legacy pooling (eos_token_id 2: argmax of the ids), short sequences
        dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
             num_attention_heads=6, max_position_embeddings=24, hidden_act="quick_gelu",
             layer_norm_eps=1e-6, eos_token_id=2, length=16),
        # exact gelu, pooling at the first eos_token_id, full length
        dict(vocab_size=61, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
             num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
             layer_norm_eps=1e-5, eos_token_id=60, length=77),
    ],
)  # fmt: skip
def test_encoder_matches_transformers(spec):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = dict(spec)
    length = spec.pop("length")
    torch.manual_seed(0)
    hf_config = transformers.CLIPTextConfig(**spec, bos_token_id=0, pad_token_id=1)
    model = transformers.CLIPTextModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "final" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 names

    rng = np.random.default_rng(0)
    eos = spec["eos_token_id"]
    ids = rng.integers(3, spec["vocab_size"] - 1, size=(4, length))
    ids[0, 5] = ids[0, 9] = eos  # two eos: the first one counts (or the argmax)
    ids[1, -1] = eos
    ids[2, 3:] = eos  # SD 1.x-style padding with the eos token
    if eos == 2:
        ids[:, 1] = spec["vocab_size"] - 1  # argmax pooling picks the largest id
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids))
    cfg = CLIPTextConfig.from_json(model.config.to_dict())
    params = params_from_state_dict(cfg, state)
    last, pooled = clip_text_apply(cfg, params, ids)
    err = (
        np.abs(np.asarray(last) - out.last_hidden_state.numpy()).max(),
        np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max(),
    )
    print(
        f"{spec['hidden_act']} vs transformers: last_hidden_state {err[0]:.2e}, pooler {err[1]:.2e}"
    )
    assert max(err) < 1e-4
    assert np.abs(out.last_hidden_state.numpy()).max() > 1  # a non-trivial function
