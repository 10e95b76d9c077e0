"""The torch-free converter: strict mapping, safe reading of untrusted files, MODEL_DIR."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from ddcm_jax.convert import (
    PRESETS,
    CheckpointError,
    ConversionError,
    convert_state_dict,
    plan_conversion,
    read_state_dict,
)

import ddcm_jax
from ddcm_jax.models import ADMConfig, abstract_params


@pytest.fixture(scope="module")
def tiny(reference):
    cfg_path = reference / "adm_tiny" / "config.json"
    return {
        "pt": reference / "adm_tiny" / "model.pt",
        "config_path": cfg_path,
        "config": ADMConfig.from_create_model(json.loads(cfg_path.read_text())),
        "state": read_state_dict(reference / "adm_tiny" / "model.pt"),
    }


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddcm_jax.cli", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- the real ImageNet 256 checkpoint, by shape only -------------------------------------------


def test_imagenet256_manifest_maps_exactly(reference):
    manifest = reference / "adm_imagenet256_uncond_manifest"
    shapes = json.loads((manifest / "state_dict_shapes.json").read_text())
    cfg = ADMConfig.from_create_model(json.loads((manifest / "config.json").read_text()))
    plan = plan_conversion(cfg, shapes)  # abstract: jax.eval_shape, nothing allocated
    assert {key for _, key, _ in plan.entries} == set(shapes)
    assert len(plan.entries) == len(shapes) == 566
    assert sum(math.prod(s) for s in shapes.values()) == 552_814_086
    tree = abstract_params(cfg)
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)) == 552_814_086
    assert ADMConfig.from_create_model(PRESETS["imagenet256-uncond"]) == cfg


def test_imagenet256_manifest_reports_every_disagreement(reference):
    manifest = reference / "adm_imagenet256_uncond_manifest"
    shapes = json.loads((manifest / "state_dict_shapes.json").read_text())
    cfg = ADMConfig.from_create_model(json.loads((manifest / "config.json").read_text()))
    shapes.pop("out.2.bias")
    shapes["extra.weight"] = [3]
    shapes["input_blocks.0.0.weight"] = [256, 3, 5, 5]
    with pytest.raises(ConversionError) as err:
        plan_conversion(cfg, shapes)
    assert err.value.missing == ["out.2.bias"]
    assert err.value.unexpected == ["extra.weight"]
    assert err.value.misshaped == ["input_blocks.0.0.weight (256, 3, 5, 5) (expected (256, 3, 3, 3))"]


def test_ffhq_preset_architecture():
    cfg = ADMConfig.from_create_model(PRESETS["ffhq256"])
    assert (cfg.model_channels, cfg.num_res_blocks, cfg.attention_ds) == (128, (1,) * 6, (16,))
    assert cfg.num_head_channels == 64 and cfg.learn_sigma and cfg.use_scale_shift_norm
    assert cfg.resblock_updown and cfg.channel_mult == (1, 1, 2, 2, 4, 4)


# --- conversion and MODEL_DIR ------------------------------------------------------------------


def test_model_dir_contents(tiny_model_dir, tiny):
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    assert meta["diffusion"] == {"noise_schedule": "linear", "num_timesteps": 1000, "prediction": "epsilon"}
    assert meta["learn_sigma"] is True and meta["image_size"] == 32
    assert meta["compute_dtype"] == "float32" and meta["converter_version"]
    model = ddcm_jax.load_model(tiny_model_dir)
    assert model.fingerprint == meta["fingerprint"] == ddcm_jax.fingerprint(model.params)
    assert model.config.architecture == tiny["config"]


def test_fingerprint_sensitive_to_values_and_names(tiny):
    params = convert_state_dict(tiny["config"], tiny["state"])
    base = ddcm_jax.fingerprint(params)
    assert ddcm_jax.fingerprint(convert_state_dict(tiny["config"], tiny["state"])) == base
    changed = jax.tree_util.tree_map(np.copy, params)
    changed["out_2"]["bias"][0] = np.nextafter(changed["out_2"]["bias"][0], np.float32(1))
    assert ddcm_jax.fingerprint(changed) != base
    renamed = dict(params)
    renamed["out_9"] = renamed.pop("out_2")
    assert ddcm_jax.fingerprint(renamed) != base


def test_tampered_model_dir_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["fingerprint"] = "sha256:" + "0" * 64
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ddcm_jax.ModelDirError, match=r"settings changed.*config_fingerprint"):
        ddcm_jax.load_model(copy)  # the fingerprint is one of the settings config_fingerprint covers
    del meta["config_fingerprint"]  # as written before config_fingerprint existed: arrays checked
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ddcm_jax.ModelDirError, match="do not match the fingerprint"):
        ddcm_jax.load_model(copy)
    with pytest.raises(ddcm_jax.ModelDirError, match=r"no model\.json"):
        ddcm_jax.load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "module_prefix"])
def test_other_formats_give_the_same_model(tiny, tmp_path, fmt):
    state = tiny["state"]
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        path = tmp_path / "m.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    elif fmt == "npz":
        path = tmp_path / "m.npz"
        np.savez(path, **state)
    else:  # DataParallel checkpoints prefix every key
        path = tmp_path / "m.npz"
        np.savez(path, **{f"module.{k}": v for k, v in state.items()})
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(loaded[k], state[k])


@pytest.mark.torch
def test_torch_written_checkpoints_read_identically(tiny, tmp_path):
    """bf16/fp16 storages, nested training dicts, shared storages, non-contiguous views."""
    import torch

    sd = {k: torch.from_numpy(v) for k, v in tiny["state"].items()}
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "nested.pt")
    assert read_state_dict(tmp_path / "nested.pt").keys() == sd.keys()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    special = {"bf16": base.to(torch.bfloat16), "half": base.half(), "t": base.t(),
               "slice": base[1:, ::2], "long": torch.arange(5)}  # fmt: skip
    torch.save(special, tmp_path / "special.pt")
    got = read_state_dict(tmp_path / "special.pt")
    for k, v in special.items():
        np.testing.assert_array_equal(got[k].astype(np.float64), v.double().numpy())
        assert got[k].shape == tuple(v.shape)
    torch.save(sd, tmp_path / "protocol4.pt", pickle_protocol=4)  # STACK_GLOBAL, FRAME, MEMOIZE
    assert read_state_dict(tmp_path / "protocol4.pt").keys() == sd.keys()


def test_cli_convert_and_mismatch_writes_nothing(tiny, tmp_path):
    cfg = json.loads(tiny["config_path"].read_text())
    cfg["num_channels"] = 64  # wrong architecture for these weights
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    proc = run_cli("convert", str(tiny["pt"]), "-o", str(out), "--config", str(wrong))
    assert_one_line_error(proc, str(tiny["pt"]), "143 mis-shaped", "input_blocks.0.0.weight (32, 3, 3, 3) (expected (64, 3, 3, 3))")
    assert not out.exists() and os.listdir(tmp_path) == ["wrong.json"]


def test_cli_refuses_existing_output(tiny, tiny_model_dir):
    proc = run_cli("convert", str(tiny["pt"]), "-o", str(tiny_model_dir), "--config", str(tiny["config_path"]))
    assert_one_line_error(proc, "already exists")


def test_cli_preset_and_usage_errors(tiny, tmp_path):
    proc = run_cli("convert", str(tiny["pt"]), "-o", str(tmp_path / "o"), "--preset", "ffhq256")
    assert_one_line_error(proc, "missing", "unexpected")  # tiny weights are not the FFHQ model
    proc = run_cli("convert", str(tiny["pt"]), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2  # neither --config nor --preset
    assert not (tmp_path / "o").exists()


# --- untrusted files ---------------------------------------------------------------------------


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _torch_like_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_that_runs_os_system_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    _torch_like_zip(ckpt, pickle.dumps({"w": _Evil(f"touch {marker}")}, protocol=protocol))
    out = tmp_path / "model"
    proc = run_cli("convert", str(ckpt), "-o", str(out), "--preset", "ffhq256")
    assert_one_line_error(proc, str(ckpt), "refused")
    assert "system" in proc.stderr
    assert not marker.exists() and not out.exists()


def test_refused_globals_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    for module, name, arg in [("builtins", "eval", f"open('{marker}', 'w')"),
                              ("posix", "system", f"touch {marker}"),
                              ("subprocess", "getoutput", f"touch {marker}")]:  # fmt: skip
        payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps((arg,), 2)[2:-1] + b"R."
        ckpt = tmp_path / f"{name}.pt"
        _torch_like_zip(ckpt, payload)
        with pytest.raises(CheckpointError, match=f"refused.*{module}.{name}"):
            read_state_dict(ckpt)
    assert not marker.exists()


def test_tensor_larger_than_its_storage_is_refused(tmp_path):
    """A tensor claiming 10^12 elements over a 4-byte storage must not allocate."""
    payload = (
        b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n"
        b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
        b"K\x00J@B\x0f\x00J@B\x0f\x00\x86J@B\x0f\x00K\x01\x86\x89ccollections\nOrderedDict\n)Rtu."
    )
    ckpt = tmp_path / "big.pt"
    with zipfile.ZipFile(ckpt, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + payload[2:].replace(b"Rtu.", b"RtRu."))
        z.writestr("archive/data/0", np.zeros(1, np.float32).tobytes())
    with pytest.raises(CheckpointError, match="reaches element"):
        read_state_dict(ckpt)


@pytest.mark.parametrize("cut", [0.0001, 0.3, 0.7, 0.999])
def test_truncated_checkpoint_gives_one_line_error(tiny, tmp_path, cut):
    data = tiny["pt"].read_bytes()
    ckpt = tmp_path / "trunc.pt"
    ckpt.write_bytes(data[: max(1, int(len(data) * cut))])
    out = tmp_path / "model"
    proc = run_cli("convert", str(ckpt), "-o", str(out), "--config", str(tiny["config_path"]))
    assert_one_line_error(proc, str(ckpt))
    assert not out.exists()


def test_corrupted_pickle_bytes(tiny, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(tiny["pt"]) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data[:200] + bytes(b ^ 0x5A for b in data[200:260]) + data[260:]
            dst.writestr(info, data)
    ckpt = tmp_path / "corrupt.pt"
    ckpt.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=str(ckpt)):
        read_state_dict(ckpt)


def test_legacy_format_and_garbage(tmp_path):
    legacy = tmp_path / "old.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19." + bytes(100))
    with pytest.raises(CheckpointError, match=r"legacy.*re-save"):
        read_state_dict(legacy)
    garbage = tmp_path / "noise.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch zip"):
        read_state_dict(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)


def test_malformed_safetensors(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}})
    path = tmp_path / "lie.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(16))
    with pytest.raises(CheckpointError, match="outside the file"):
        read_state_dict(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_state_dict(path)
