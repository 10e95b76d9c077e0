"""`ddcm convert --format diffusers`: sd_tiny -> a latent MODEL_DIR that reproduces the
reference outputs; .bin / sharded / legacy / Hugging Face cache variants; one-line
refusals; the fingerprint; the released models' manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from ddcm_jax.convert import check_manifest, main
from ddcm_jax.convert.diffusers import PipelineError
from PIL import Image
from safetensors.numpy import load_file, save_file

import ddcm_jax
from ddcm_jax import latent_model as LM
from ddcm_jax.families import find_model
from ddcm_jax.modeldir import ModelDirError

TOL = 1e-4
UNET_W = "unet/diffusion_pytorch_model.safetensors"
VAE_W = "vae/diffusion_pytorch_model.safetensors"
TEXT_W = "text_encoder/model.safetensors"


# XLA:CPU compiles these small programs 2-3x faster without its expensive passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(fn, *args):
    """fn(*args) through jit (the model's own jitted methods inline), compiled with FAST_COMPILE."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args))


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def convert(src: Path, out: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    code = main([str(src), "-o", str(out), "--format", "diffusers", *extra])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture(scope="module")
def tiny_dir(reference: Path) -> Path:
    return reference / "sd_tiny"


@pytest.fixture(scope="module")
def converted(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sd") / "sd_tiny"
    from ddcm_jax.cli import main as cli_main

    assert cli_main(["convert", str(tiny_dir), "-o", str(out), "--format", "diffusers"]) == 0
    return out


@pytest.fixture(scope="module")
def model(converted: Path) -> LM.LatentDiffusionModel:
    return ddcm_jax.load_model(converted)


@pytest.fixture(scope="module")
def io_arrays(tiny_dir: Path) -> dict:
    return dict(np.load(tiny_dir / "io.npz"))


def copy_pipeline(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("io.*"))
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    dst.chmod(0o755)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------- sd_tiny parity


def test_model_dir_layout(converted: Path) -> None:
    assert sorted(p.name for p in converted.iterdir()) == ["model.json", "params", "tokenizer"]
    assert sorted(p.name for p in (converted / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # fmt: skip
    meta = json.loads((converted / "model.json").read_text())
    assert meta["family"] == "sd" and meta["scheduler"]["prediction_type"] == "v_prediction"
    assert meta["param_counts"] == {"text_encoder": 32842, "unet": 203204, "vae": 81215}
    assert meta["source"]["ignored_keys"] == {}  # sd_tiny has no position_ids buffer
    assert meta["fingerprint"] == LM.latent_fingerprint(
        LM.read_latent_model_json(converted)[0], meta["arrays_fingerprint"]
    )
    # Permissions follow the umask like any folder (not mkdtemp's 0700).
    umask = os.umask(0)
    os.umask(umask)
    assert (converted.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_reproduces_reference_outputs(model: LM.LatentDiffusionModel, io_arrays: dict) -> None:
    io = io_arrays
    assert isinstance(model, LM.LatentDiffusionModel) and model.prediction_type == "v_prediction"
    out = run(lambda m, x, t, c: m(x, t, c), model, nhwc(io["unet_x"]), io["unet_t"],
              io["unet_encoder_hidden_states"])  # fmt: skip
    assert out.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(out, nhwc(io["unet_out"]), atol=TOL, rtol=0)
    s = model.scaling_factor
    assert s == pytest.approx(0.18215)
    # The model is a pytree: it passes through jit as an argument.
    enc = run(lambda m, x: m.encode(x), model, nhwc(io["vae_image"]))
    np.testing.assert_allclose(enc, nhwc(io["vae_latent_mode"]) * s, atol=TOL, rtol=0)
    dec = run(lambda m, z: m.decode(z), model, nhwc(io["vae_decode_in"]) * np.float32(s))
    np.testing.assert_allclose(dec, nhwc(io["vae_decode_out"]), atol=TOL, rtol=0)
    ids = model.tokenize(["", "a photo of a cat"])
    np.testing.assert_array_equal(ids, io["text_input_ids"])
    hidden = model.encode_prompt(["", "a photo of a cat"])
    np.testing.assert_allclose(hidden, io["text_last_hidden_state"], atol=TOL, rtol=0)
    assert model.null_prompt.shape == (1, 77, 32)
    np.testing.assert_allclose(model.null_prompt[0], io["text_last_hidden_state"][0], atol=TOL, rtol=0)


def test_alphas_cumprod_are_diffusers_values(model: LM.LatentDiffusionModel, reference: Path) -> None:
    trace = np.load(reference / "ddcm_latent_trace" / "trace.npz")
    assert model.alphas_cumprod.dtype == np.float64
    np.testing.assert_array_equal(model.alphas_cumprod, trace["alphas_cumprod"].astype(np.float64))
    assert model.final_alpha_cumprod == float(trace["alphas_cumprod"][0])  # set_alpha_to_one false
    np.testing.assert_allclose(model.null_prompt, trace["null_prompt_embeds"], atol=TOL, rtol=0)


@pytest.mark.torch
def test_scheduler_settings_match_diffusers_ddim(reference: Path) -> None:
    DDIMScheduler = pytest.importorskip("diffusers").DDIMScheduler
    configs = [reference / p / "scheduler" / "scheduler_config.json"
               for p in ("sd_tiny", "sd_manifests/sd21_base", "sd_manifests/sd14")]  # fmt: skip
    datas = [json.loads(p.read_text()) for p in configs]
    datas.append({"_class_name": "DDPMScheduler", "beta_schedule": "linear", "variance_type": "fixed_small"})
    for data in datas:
        ours = LM.SchedulerConfig.from_diffusers(data)
        theirs = DDIMScheduler.from_config(data)
        for key, value in ours.to_json().items():
            assert theirs.config[key] == value, key
        np.testing.assert_array_equal(ours.alphas_cumprod(), theirs.alphas_cumprod.numpy().astype(np.float64))
        assert ours.final_alpha_cumprod() == float(theirs.final_alpha_cumprod)


def test_converter_agrees_with_the_modules_strict_converters(model, tiny_dir: Path) -> None:
    from ddcm_jax.models import clip, sd_unet, sd_vae

    cfg = model.config
    want = {
        "unet": sd_unet.params_from_state_dict(cfg.unet, load_file(tiny_dir / UNET_W)),
        "vae": sd_vae.params_from_state_dict(cfg.vae, load_file(tiny_dir / VAE_W)),
        "text_encoder": clip.params_from_state_dict(cfg.text_encoder, load_file(tiny_dir / TEXT_W)),
    }
    for name, tree in want.items():
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params[name]), tree)


def test_find_model_and_known_dirs(converted: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDCM_MODELS", str(converted.parent))
    assert converted in ddcm_jax.modeldir.known_model_dirs()
    assert find_model(model.fingerprint[:39]) == converted
    assert ddcm_jax.load_model(converted).fingerprint == model.fingerprint  # handed over, verified


# ---------------------------------------------------------------------- file variants


def test_bin_legacy_and_unprefixed_weights(tiny_dir, converted, tmp_path, capsys) -> None:
    """All three networks as torch.save .bin files; the VAE with diffusers < 0.15 attention
    names; the text encoder without `text_model.` and with a position_ids buffer."""
    torch = pytest.importorskip("torch")
    src = copy_pipeline(tiny_dir, tmp_path / "pipe")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for weights, out_name in ((UNET_W, "diffusion_pytorch_model.bin"), (VAE_W, "diffusion_pytorch_model.bin"),
                              (TEXT_W, "pytorch_model.bin")):  # fmt: skip
        sd = load_file(src / weights)
        if weights == VAE_W:
            renamed = {}
            for k, v in sd.items():
                for new, old in legacy.items():
                    if ".mid_block.attentions." in k and f".{new}." in k:
                        k = k.replace(f".{new}.", f".{old}.")
                renamed[k] = v
            assert sum(".query." in k for k in renamed) == 4  # weight and bias, encoder and decoder
            sd = renamed
        if weights == TEXT_W:
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            sd["embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        (src / weights).unlink()
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                   (src / weights).parent / out_name)  # fmt: skip
    code, err = convert(src, tmp_path / "m", capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["fingerprint"] == json.loads((converted / "model.json").read_text())["fingerprint"]
    assert meta["source"]["weights"]["vae"] == "vae/diffusion_pytorch_model.bin"
    assert meta["source"]["ignored_keys"] == {"text_encoder": ["embeddings.position_ids"]}
    assert meta["source"]["renamed_keys"] == {"vae": 16}


def test_sharded_safetensors_in_a_hugging_face_cache(tiny_dir, converted, tmp_path, capsys) -> None:
    """A snapshot folder of symbolic links to blobs, the UNet in two shards plus an index."""
    repo = tmp_path / "models--x--tiny"
    flat = copy_pipeline(tiny_dir, tmp_path / "flat")
    sd = load_file(flat / UNET_W)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}  # fmt: skip
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, flat / "unet" / name)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (flat / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (flat / UNET_W).unlink()
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(p for p in flat.rglob("*") if p.is_file()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        link = snapshot / f.relative_to(flat)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    code, err = convert(snapshot, tmp_path / "m", capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["fingerprint"] == json.loads((converted / "model.json").read_text())["fingerprint"]
    assert meta["source"]["weights"]["unet"] == "unet/diffusion_pytorch_model.safetensors.index.json"
    assert not any(p.is_symlink() for p in (tmp_path / "m").rglob("*"))  # copies, not links


def test_half_precision_variants(tiny_dir, converted, tmp_path, capsys) -> None:
    """Only an fp16 variant file for the VAE; bfloat16 tensors in the text encoder's file."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    src = copy_pipeline(tiny_dir, tmp_path / "pipe")
    vae = {k: v.astype(np.float16) for k, v in load_file(src / VAE_W).items()}
    save_file(vae, src / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    (src / VAE_W).unlink()
    text = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(src / TEXT_W).items()}
    save_torch(text, src / TEXT_W)
    code, err = convert(src, tmp_path / "m", capsys)
    assert code == 0, err
    m = ddcm_jax.load_model(tmp_path / "m")
    assert m.config.source["weights"]["vae"] == "vae/diffusion_pytorch_model.fp16.safetensors"
    np.testing.assert_array_equal(m.params["vae"]["decoder"]["conv_in"]["bias"],
                                  vae["decoder.conv_in.bias"].astype(np.float32))  # fmt: skip
    want = text["text_model.final_layer_norm.weight"].float().numpy()
    np.testing.assert_array_equal(m.params["text_encoder"]["final_layer_norm"]["scale"], want)
    assert m.fingerprint != ddcm_jax.load_model(converted).fingerprint


# ---------------------------------------------------------------------- refusals


def _malicious_bin(path: Path) -> None:
    marker = path.parent / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def _drop_key(path: Path) -> None:
    sd = load_file(path)
    sd.pop("conv_in.bias")
    save_file(sd, path)


def _add_key(path: Path) -> None:
    sd = load_file(path)
    sd["decoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, path)


def _misshape(path: Path) -> None:
    sd = load_file(path)
    sd["text_model.final_layer_norm.weight"] = np.ones(31, np.float32)
    save_file(sd, path)


def _integer_weights(path: Path) -> None:
    sd = load_file(path)
    sd["conv_in.weight"] = sd["conv_in.weight"].astype(np.int32)
    save_file(sd, path)


def _bad_shard_index(root: Path, duplicate: bool) -> None:
    """conv_in.bias in part 2 (and, with `duplicate`, in part 1 too); the index
    lists conv_in.weight, which is in part 1, under part 2 as well."""
    sd = load_file(root / UNET_W)
    bias = sd["conv_in.bias"] if duplicate else sd.pop("conv_in.bias")
    save_file(sd, root / "unet" / "part-1.safetensors")
    save_file({"conv_in.bias": bias}, root / "unet" / "part-2.safetensors")
    (root / UNET_W).unlink()
    wm = {k: "part-1.safetensors" for k in sd}
    wm["conv_in.bias"] = "part-2.safetensors"
    if not duplicate:
        wm["conv_in.weight"] = "part-2.safetensors"
    (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


REFUSALS = {
    "missing key": (lambda r: _drop_key(r / UNET_W), ["diffusion_pytorch_model.safetensors", "1 missing", "conv_in.bias"]),
    "extra key": (lambda r: _add_key(r / VAE_W), ["vae/diffusion_pytorch_model.safetensors", "1 unexpected", "decoder.extra.weight"]),
    "mis-shaped": (lambda r: _misshape(r / TEXT_W), ["model.safetensors", "mis-shaped", "final_layer_norm.weight"]),
    "integer weights": (lambda r: _integer_weights(r / UNET_W), ["not floating point", "conv_in.weight"]),
    "malicious pickle": (lambda r: ((r / TEXT_W).unlink(), _malicious_bin(r / "text_encoder" / "pytorch_model.bin")),
                         ["pytorch_model.bin", "refused", "os.system"]),
    "broken model_index": (lambda r: (r / "model_index.json").write_text('{"unet": ["diffusers", '),
                           ["model_index.json", "not valid JSON"]),
    "missing component": (lambda r: edit_json(r / "model_index.json", vae=...), ["model_index.json", "missing component vae"]),
    "wrong unet class": (lambda r: edit_json(r / "model_index.json", unet=["diffusers", "UNet2DModel"]),
                         ["model_index.json", "unsupported unet class"]),
    "unknown component": (lambda r: edit_json(r / "model_index.json", controlnet=["diffusers", "ControlNetModel"]),
                          ["model_index.json", "unknown pipeline component controlnet"]),
    "scheduler class": (lambda r: edit_json(r / "scheduler" / "scheduler_config.json", _class_name="FlowMatchEulerDiscreteScheduler"),
                        ["scheduler_config.json", "unsupported scheduler"]),
    "beta schedule": (lambda r: edit_json(r / "scheduler" / "scheduler_config.json", beta_schedule="squaredcos_cap_v2"),
                      ["scheduler_config.json", "beta_schedule"]),
    "prediction type": (lambda r: edit_json(r / "scheduler" / "scheduler_config.json", prediction_type="sample"),
                        ["scheduler_config.json", "prediction_type"]),
    "zero snr": (lambda r: edit_json(r / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True),
                 ["scheduler_config.json", "rescale_betas_zero_snr"]),
    "unet option": (lambda r: edit_json(r / "unet" / "config.json", class_embed_type="timestep"),
                    ["unet/config.json", "class_embed_type"]),
    "cross dim": (lambda r: edit_json(r / "text_encoder" / "config.json", hidden_size=64, intermediate_size=37),
                  ["hidden_size 64", "cross_attention_dim 32"]),
    "no weights": (lambda r: (r / VAE_W).unlink(), ["vae: no weights"]),
    "shard index": (lambda r: _bad_shard_index(r, False), ["index.json", "1 keys in another shard than listed (conv_in.weight)"]),
    "shard duplicate": (lambda r: _bad_shard_index(r, True), ["conv_in.bias is also in part-"]),
    "tokenizer": (lambda r: (r / "tokenizer" / "tokenizer.json").write_text("{}"), ["tokenizer.json"]),
    "symlink loop": (lambda r: ((r / UNET_W).unlink(), (r / UNET_W).symlink_to(r / UNET_W)),
                     ["diffusion_pytorch_model.safetensors: cannot read"]),
    "not safetensors": (lambda r: (r / UNET_W).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
                        ["diffusion_pytorch_model.safetensors: corrupt safetensors header"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(case, tiny_dir, tmp_path, capsys) -> None:
    src = copy_pipeline(tiny_dir, tmp_path / "pipe")
    damage, needles = REFUSALS[case]
    damage(src)
    out = tmp_path / "out" / "m"
    code, err = convert(src, out, capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("ddcm convert: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists() and not (tmp_path / "out").exists()  # no folder, no staging leftovers
    assert not (src / "text_encoder" / "pwned").exists()


def test_usage_errors(tiny_dir, tmp_path, capsys) -> None:
    code, err = convert(tiny_dir, tmp_path / "m", capsys, "--preset", "ffhq256")
    assert code == 2 and "--config and --preset" in err
    code, err = convert(tiny_dir, tmp_path / "m", capsys, "--noise-schedule", "cosine")
    assert code == 2 and not (tmp_path / "m").exists()
    code = main([str(tiny_dir), "-o", str(tmp_path / "m"), "--format", "guided-diffusion"])  # without --config
    assert code == 2 and "needs --config JSON or --preset NAME" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_existing_output_refused_before_reading(tiny_dir, converted, capsys) -> None:
    code, err = convert(tiny_dir, converted, capsys)
    assert code == 1 and "already exists" in err


# ---------------------------------------------------------------------- fingerprint


def test_every_setting_is_in_the_fingerprint(model) -> None:
    cfg, arrays = model.config, "sha256:" + "0" * 64
    R = dataclasses.replace
    variants = [
        cfg,
        R(cfg, scheduler=R(cfg.scheduler, prediction_type="epsilon")),
        R(cfg, scheduler=R(cfg.scheduler, beta_end=0.0121)),
        R(cfg, scheduler=R(cfg.scheduler, beta_schedule="linear")),
        R(cfg, scheduler=R(cfg.scheduler, steps_offset=0)),
        R(cfg, scheduler=R(cfg.scheduler, timestep_spacing="trailing")),
        R(cfg, scheduler=R(cfg.scheduler, set_alpha_to_one=True)),
        R(cfg, scheduler=R(cfg.scheduler, clip_sample=True)),
        R(cfg, vae=R(cfg.vae, scaling_factor=0.13025)),
        R(cfg, unet=R(cfg.unet, upcast_attention=False)),
        R(cfg, unet=R(cfg.unet, compute_dtype="bfloat16")),
        R(cfg, unet=R(cfg.unet, norm_eps=1e-6)),
        R(cfg, text_encoder=R(cfg.text_encoder, layer_norm_eps=1e-6)),
        R(cfg, text_encoder=R(cfg.text_encoder, hidden_act="quick_gelu")),
        R(cfg, tokenizer_files=((cfg.tokenizer_files[0][0], "sha256:" + "1" * 64), *cfg.tokenizer_files[1:])),
        R(cfg, prompt_length=76),
    ]
    fps = {LM.latent_fingerprint(v, arrays) for v in variants}
    assert len(fps) == len(variants)
    assert LM.latent_fingerprint(cfg, "sha256:" + "2" * 64) not in fps
    # The source description is not a setting.
    assert LM.latent_fingerprint(R(cfg, source={"pipeline": "elsewhere"}), arrays) == LM.latent_fingerprint(cfg, arrays)


def test_conversion_fingerprint_follows_the_scheduler(tiny_dir, model, tmp_path, capsys) -> None:
    src = copy_pipeline(tiny_dir, tmp_path / "pipe")
    edit_json(src / "scheduler" / "scheduler_config.json", prediction_type="epsilon")
    code, err = convert(src, tmp_path / "m", capsys)
    assert code == 0, err
    other = ddcm_jax.load_model(tmp_path / "m")
    assert other.prediction_type == "epsilon" and other.fingerprint != model.fingerprint


def _copy_model(converted: Path, dst: Path) -> Path:
    shutil.copytree(converted, dst)
    return dst


def test_load_refuses_edited_settings(converted, tmp_path) -> None:
    d = _copy_model(converted, tmp_path / "a")
    edit_json(d / "model.json", scheduler={**json.loads((d / "model.json").read_text())["scheduler"],
                                           "prediction_type": "epsilon"})  # fmt: skip
    with pytest.raises(ModelDirError, match="settings changed"):
        ddcm_jax.load_model(d)
    d = _copy_model(converted, tmp_path / "b")
    meta = json.loads((d / "model.json").read_text())
    meta["vae"]["scaling_factor"] = 0.2
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="settings changed"):
        ddcm_jax.load_model(d)
    d = _copy_model(converted, tmp_path / "c")
    with open(d / "tokenizer" / "merges.txt", "a") as f:
        f.write("c a\n")
    with pytest.raises(ModelDirError, match=r"merges\.txt: edited"):
        ddcm_jax.load_model(d)
    d = _copy_model(converted, tmp_path / "d")
    (d / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(ModelDirError, match="tokenizer"):
        ddcm_jax.load_model(d)


def test_load_refuses_edited_arrays(converted, tmp_path) -> None:
    import orbax.checkpoint as ocp

    from ddcm_jax import model as M

    d = _copy_model(converted, tmp_path / "a")
    config, _ = LM.read_latent_model_json(d)
    params = M.restore_params(d / "params", LM.abstract_params(config))
    params = jax.tree.map(np.array, params)
    params["unet"]["conv_in"]["bias"][0] += 1e-3
    shutil.rmtree(d / "params")
    with M.quiet_orbax():
        ckpt = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        ckpt.save(d / "params", args=ocp.args.StandardSave(params))
        ckpt.close()
    with pytest.raises(ModelDirError, match="do not match the fingerprint"):
        ddcm_jax.load_model(d)
    assert ddcm_jax.load_model(d, verify=False).params["unet"]["conv_in"]["bias"][0] != 0


# ---------------------------------------------------------------------- released manifests


@pytest.mark.parametrize("name, counts", [
    ("sd21_base", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
    ("sd14", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
])  # fmt: skip
def test_released_manifests_map_completely(reference: Path, name: str, counts: dict) -> None:
    got = check_manifest(reference / "sd_manifests" / name)
    assert got == {**counts, "total": sum(counts.values())}


def test_manifest_refusal_lists_what_does_not_map(reference: Path, tmp_path: Path) -> None:
    d = shutil.copytree(reference / "sd_manifests" / "sd14", tmp_path / "sd14")
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    path = d / "vae" / "state_dict_shapes.json"
    shapes = json.loads(path.read_text())
    shapes["encoder.conv_in.weight"] = [128, 3, 3, 4]
    shapes["decoder.mid_block.attentions.0.query.weight"] = shapes.pop("decoder.mid_block.attentions.0.to_q.weight")
    del shapes["encoder.conv_out.bias"]
    path.write_text(json.dumps(shapes))
    with pytest.raises(PipelineError) as e:
        check_manifest(d)
    msg = str(e.value)
    assert "\n" not in msg and "state_dict_shapes.json" in msg
    assert "1 missing (encoder.conv_out.bias)" in msg and "encoder.conv_in.weight: got [128, 3, 3, 4]" in msg


def test_pipeline_error_is_importable_from_the_package() -> None:
    import ddcm_jax.convert as C

    assert C.PipelineError is PipelineError and issubclass(PipelineError, ValueError)


def test_restore_refuses_a_latent_model_in_one_line(tmp_path, capsys, reference):
    """Latent models compress and generate (tests/test_latent.py); restoration is pixel-space only."""
    from ddcm_jax.cli import main

    out = tmp_path / "sd"
    assert main(["convert", str(reference / "sd_tiny"), "-o", str(out), "--format", "diffusers"]) == 0
    capsys.readouterr()
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    with pytest.raises(SystemExit) as exc:
        main(["restore", str(img), "-o", str(tmp_path / "o"), "--model", str(out), "--task", "colorization", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pixel-space" in err and "Traceback" not in err
