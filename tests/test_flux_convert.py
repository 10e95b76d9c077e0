"""FLUX MODEL_DIRs: the converter (sharded, streaming, strict), the FLUX.1-dev manifest, a
schnell-style model (no guidance embedding) and the command line on flux_tiny."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from ddcm_jax.convert import check_manifest, convert_pipeline
from ddcm_jax.convert.diffusers import PipelineError
from PIL import Image

import ddcm_jax
from ddcm_jax.cli import main
from ddcm_jax.modeldir import ModelDirError
from ddcm_jax.models import flux_transformer
from ddcm_jax.tensorfile import TensorFile


def derived(reference: Path, tmp: Path, transformer: dict | None = None) -> Path:
    """A copy of flux_tiny whose transformer has the config `transformer` (the original's keys
    updated) and fresh random weights of that config (seeded, the fixtures' fan-in rule)."""
    root = tmp / "pipeline"
    shutil.copytree(reference / "flux_tiny", root, ignore=shutil.ignore_patterns("io.*"))
    if transformer is None:
        return root
    folder = root / "transformer"
    for p in folder.iterdir():
        p.chmod(0o644)
        p.unlink()
    data = json.loads((reference / "flux_tiny" / "transformer" / "config.json").read_text())
    data.update(transformer)
    (folder / "config.json").write_text(json.dumps(data))
    return root


def random_state_dict(config, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """diffusers-layout weights for `config`, from the plan's own shapes."""
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(flux_transformer.abstract_params(config))[0]
    out = {}
    for path, leaf in flat:
        names = tuple(k.key for k in path)
        key = flux_transformer.torch_key(names)
        shape = tuple(reversed(leaf.shape)) if names[-1] == "kernel" else tuple(leaf.shape)
        scale = 1 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.1
        out[key] = (rng.standard_normal(shape) * scale).astype(dtype)
    return out


def write_shards(folder: Path, state: dict[str, np.ndarray], shards: int) -> None:
    from safetensors.numpy import save_file

    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


# -- the released model's manifest ---------------------------------------------------------------------


def test_flux1_dev_manifest_maps_completely(reference):
    folder = reference / "flux_manifests" / "flux1_dev"
    summary = json.loads((folder / "summary.json").read_text())
    counts = check_manifest(folder)
    for component, want in summary["known_params"].items():
        assert counts[component] == want, component
    assert counts["total"] == sum(summary["known_params"].values())


def test_manifest_with_a_missing_key_is_refused(reference, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(reference / "flux_manifests" / "flux1_dev", folder)
    path = folder / "transformer" / "state_dict_shapes.json"
    path.chmod(0o644)
    shapes = json.loads(path.read_text())
    shapes.pop(sorted(shapes)[0])
    path.write_text(json.dumps(shapes))
    with pytest.raises(PipelineError) as info:
        check_manifest(folder)
    assert "state_dict_shapes.json" in str(info.value) and "\n" not in str(info.value)


# -- streaming a sharded snapshot -----------------------------------------------------------------------


def test_sharded_conversion_streams_the_transformer(reference, tmp_path):
    """A bfloat16 transformer in three shards, 24x larger than its largest tensor: the converter's
    peak allocation (NumPy, traced) stays within a small multiple of that tensor, and the stored
    weights are the snapshot's, bit for bit (bfloat16 kept)."""
    root = derived(reference, tmp_path, {"num_layers": 3, "num_single_layers": 3, "attention_head_dim": 32,
                                         "axes_dims_rope": [8, 12, 12], "num_attention_heads": 4})  # fmt: skip
    config = flux_transformer.FluxTransformerConfig.from_json(json.loads((root / "transformer" / "config.json").read_text()))
    state = random_state_dict(config, ml_dtypes.bfloat16)
    write_shards(root / "transformer", state, 3)
    largest = max(a.size for a in state.values()) * 4  # its float32 bytes
    total = sum(a.nbytes for a in state.values())
    assert total > 20 * max(a.nbytes for a in state.values())
    from ddcm_jax import tensorfile

    grew: dict[str, tuple[int, int]] = {}  # file -> (allocated when it starts, peak growth while written)
    write = tensorfile.write_streaming

    def measured(path, *args, **kw):
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        n = write(path, *args, **kw)
        grew[Path(path).stem] = held, tracemalloc.get_traced_memory()[1] - held
        return n

    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tensorfile, "write_streaming", measured)
            convert_pipeline(root, tmp_path / "model")
    finally:
        tracemalloc.stop()
    held, growth = grew["transformer"]
    assert growth < 3 * largest + (1 << 20), (growth, largest, total)  # one tensor and its copies at a time
    assert held < grew["text_encoder"][0] + (1 << 20)  # and nothing of it was read before its turn
    model = ddcm_jax.load_model(tmp_path / "model")
    flat = jax.tree_util.tree_flatten_with_path(model.params["transformer"])[0]
    for path, leaf in flat:
        names = tuple(k.key for k in path)
        want = state[flux_transformer.torch_key(names)].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(leaf), want.T if names[-1] == "kernel" else want)
    with TensorFile(tmp_path / "model" / "weights" / "transformer.safetensors") as f:
        assert {f.entries[n][0] for n in f.names} == {np.dtype(ml_dtypes.bfloat16)}


def test_a_missing_shard_is_refused_before_writing(reference, tmp_path):
    root = derived(reference, tmp_path, {})
    config = flux_transformer.FluxTransformerConfig.from_json(json.loads((root / "transformer" / "config.json").read_text()))
    write_shards(root / "transformer", random_state_dict(config), 2)
    next((root / "transformer").glob("*00002-of-00002.safetensors")).unlink()
    with pytest.raises(PipelineError) as info:
        convert_pipeline(root, tmp_path / "model")
    assert "00002-of-00002" in str(info.value)
    assert not (tmp_path / "model").exists()


# -- a schnell-style model ---------------------------------------------------------------------------------


def test_schnell_style_model_codes_without_guidance(reference, tmp_path):
    """No guidance embedding (FLUX.1-schnell): the original passes a guidance value to every transformer
    and fails on such a model; here it codes and decodes, and refuses a guidance value."""
    root = derived(reference, tmp_path, {"guidance_embeds": False})
    config = flux_transformer.FluxTransformerConfig.from_json(json.loads((root / "transformer" / "config.json").read_text()))
    write_shards(root / "transformer", random_state_dict(config), 1)
    convert_pipeline(root, tmp_path / "model")
    model = ddcm_jax.load_model(tmp_path / "model")
    assert not model.guidance_embeds
    image = np.random.default_rng(1).uniform(-1, 1, (64, 96, 3)).astype(np.float32)  # not square
    kw = dict(steps=5, codebook_size=32, num_atoms=3, rule="turbo", no_bits_steps=1)
    res = ddcm_jax.compress(model, image, key=3, **kw)
    assert res.indices.shape == (3, 3) and res.latent.shape == (8, 12, 16)
    back = ddcm_jax.decompress(model, res.indices, res.coeffs, image_shape=image.shape, key=3, **kw)
    np.testing.assert_array_equal(back.image, res.image)
    with pytest.raises(ValueError, match="guidance"):
        ddcm_jax.compress(model, image, key=3, prompt="a cat", guidance=3.5, **kw)


# -- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def png(reference, tmp_path_factory) -> Path:
    z = np.load(reference / "turbo_flux_trace" / "trace.npz")
    pixels = np.round((np.moveaxis(z["image"], 0, -1) + 1) * 127.5).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "kodim23.png"
    Image.fromarray(pixels).save(path)
    return path


CLI_CODE = ["-T", "5", "-K", "32", "-M", "4"]


@pytest.fixture(scope="module")
def flux_file(flux_tiny_model_dir, png, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("code")
    assert main(["compress", str(png), "-o", str(out), "--model", str(flux_tiny_model_dir), *CLI_CODE, "-q"]) == 0
    return out / "kodim23.ddcm"


def test_cli_round_trip(flux_tiny_model_dir, png, flux_file, tmp_path, capsys):
    """`ddcm compress` / `info` / `decompress` on a FLUX MODEL_DIR; the file decodes to exactly the
    picture its encoder made (`codec.encode_image`'s `decoded`, the same settings)."""
    from ddcm_jax.codec import encode_image
    from ddcm_jax.spec import CodeSpec

    assert main(["info", str(flux_file)]) == 0
    info = capsys.readouterr().out
    assert "flow/1000" in info and "turbo" in info and "K 32, M 4" in info
    assert main(["decompress", str(flux_file), "-o", str(tmp_path / "dec"), "--model", str(flux_tiny_model_dir),
                 "-q"]) == 0  # fmt: skip
    decoded = np.asarray(Image.open(tmp_path / "dec" / "kodim23.png"))
    model = ddcm_jax.load_model(flux_tiny_model_dir)
    spec = CodeSpec.create(steps=5, codebook_size=32, rule="turbo", num_atoms=4)
    encoded = encode_image(model, np.asarray(Image.open(png)), spec)
    assert encoded.data == flux_file.read_bytes()  # the command line is the library, byte for byte
    np.testing.assert_array_equal(encoded.decoded, decoded)


def test_flux_file_does_not_decode_with_another_family(flux_file, sd_tiny_model_dir, tmp_path, capsys):
    code = main(["decompress", str(flux_file), "-o", str(tmp_path / "dec"), "--model", str(sd_tiny_model_dir), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "kodim23.ddcm" in err and len(err.strip().splitlines()) == 1


def test_memory_budget_refuses_before_loading(flux_tiny_model_dir, monkeypatch):
    monkeypatch.setenv("DDCM_MEMORY_LIMIT", "100K")
    with pytest.raises(ModelDirError) as info:
        ddcm_jax.load_model(flux_tiny_model_dir)
    assert "parameters" in str(info.value) and "budget" in str(info.value)


def test_edited_weights_are_refused(flux_tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(flux_tiny_model_dir, folder)
    path = folder / "weights" / "vae.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="fingerprint"):
        ddcm_jax.load_model(folder)
