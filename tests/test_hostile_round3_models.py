"""Hostile and careless model folders and pipelines, round 3 (issue 28: findings 6, 7, 8).

Every hostile input is built here, in tmp_path. A refusal is one line naming the file and the
reason, given at once: a FIFO is refused before it is opened, a network whose config cannot
match its weights (or exceeds the memory budget) before it is traced. Whatever could hang on a
regression runs under a deadline, so that it fails instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from ddcm_jax.convert import main as convert_main

import ddcm_jax
from ddcm_jax import latent_model as LM
from ddcm_jax import model as M
from ddcm_jax.images import _host_tag
from ddcm_jax.model import ModelDirError
from ddcm_jax.models import adm, clip, sd_unet, sd_vae
from ddcm_jax.tokenizer import CLIPTokenizer, TokenizerError

# --- deadlines --------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised in the main thread when a call runs past its deadline (not an Exception: the
    converter's own handlers must not turn it into a refusal)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with `Hang` after `seconds` of Python work instead of running on for minutes.

    The alarm repeats every 0.2 s after that: one that lands in a finaliser or a callback
    (where exceptions are dropped) is followed by one that lands in the work itself.
    """

    def fire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.2)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def rescued(fifo: Path, after: float = 10.0) -> Iterator[None]:
    """A reader that opens `fifo` blocking (in any thread: orbax reads in tensorstore's) is let
    go after `after` s, by a writer that opens and closes it: it then reads an empty file, and
    the test fails instead of hanging."""
    stop = threading.Event()

    def rescue() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader has it open (yet)
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            stop.wait(0.05)

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # shared/ is read-only
    return dst


def fifo_in_place_of(path: Path) -> Path:
    path.unlink()
    os.mkfifo(path)
    return path


def one_line(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "Error:" not in lines[0], text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- finding 6: FIFOs in model folders ----------------------------------------------------------------

FIFO_CASES = {
    "sd tokenizer file": ("sd", "tokenizer/merges.txt"),
    "sd orbax manifest": ("sd", "params/manifest.ocdbt"),
    "adm orbax manifest": ("adm", "params/manifest.ocdbt"),
    "adm nested orbax manifest": ("adm", "params/ocdbt.process_0/manifest.ocdbt"),
    "adm model.json": ("adm", "model.json"),
}


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_fifo_in_a_model_folder_is_refused_at_once(
    case, tiny_model_dir, sd_tiny_model_dir, tmp_path
):
    family, rel = FIFO_CASES[case]
    folder = copy_dir(tiny_model_dir if family == "adm" else sd_tiny_model_dir, tmp_path / "m")
    fifo = fifo_in_place_of(folder / rel)
    t0 = time.perf_counter()
    with rescued(fifo), pytest.raises(ModelDirError) as e:
        ddcm_jax.load_model(folder)
    assert time.perf_counter() - t0 < 5
    assert str(e.value) == f"{fifo}: is not a regular file"


def test_fifo_in_a_tokenizer_folder_is_named_as_such(reference, tmp_path):
    folder = copy_dir(reference / "sd_tiny" / "tokenizer", tmp_path / "tok")
    fifo = fifo_in_place_of(folder / "vocab.json")
    with rescued(fifo), pytest.raises(TokenizerError, match=f"^{fifo}: is not a regular file$"):
        CLIPTokenizer.from_folder(folder)  # was "vocab.json: missing"


def test_fifo_as_the_converter_config_is_refused_at_once(reference, tmp_path, capsys):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    with rescued(fifo):
        code = convert_main(
            [str(reference / "adm_tiny" / "model.pt"), "-o", str(out), "--config", str(fifo)]
        )
    assert code == 1
    one_line(capsys.readouterr().err, f"ddcm convert: {fifo}: is not a regular file")
    assert not out.exists()


# --- finding 6: sizes refused from the arithmetic -------------------------------------------------------


def test_implied_parameter_counts_are_the_traced_ones(reference):
    """The arithmetic that refuses huge configs counts exactly what the networks hold."""
    root = reference / "sd_tiny"
    unet = sd_unet.SDUNetConfig.from_json(json.loads((root / "unet" / "config.json").read_text()))
    vae = sd_vae.SDVAEConfig.from_json(json.loads((root / "vae" / "config.json").read_text()))
    text = clip.CLIPTextConfig.from_json(
        json.loads((root / "text_encoder" / "config.json").read_text())
    )
    # Every branch the sd_tiny configs leave out: conv projections, plain and cross blocks in
    # other places, several (transformer) layers, a time embedding width, three levels; a VAE
    # without mid attention or quant conv.
    unet = dataclasses.replace(unet, block_out_channels=(16, 32, 48), num_attention_heads=(2, 4, 4),
                               layers_per_block=(1, 2, 1), transformer_layers_per_block=(1, 1, 2),
                               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                               use_linear_projection=False, time_embedding_dim=24)  # fmt: skip
    vae = dataclasses.replace(vae, block_out_channels=(8, 16), layers_per_block=2,
                              mid_block_add_attention=False, use_quant_conv=False)  # fmt: skip
    text = dataclasses.replace(text, num_hidden_layers=3, intermediate_size=40)

    def traced(tree: object) -> int:
        return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))

    assert LM.implied_param_counts(unet, vae, text) == {
        "text_encoder": traced(clip.abstract_params(text)),
        "unet": traced(sd_unet.abstract_params(unet)),
        "vae": traced(sd_vae.abstract_params(vae)),
    }
    # The released pipelines (their counts are checked against their manifests in test_sd_convert).
    from ddcm_jax.convert.diffusers import read_pipeline_configs

    sd14 = read_pipeline_configs(reference / "sd_manifests" / "sd14")
    assert LM.implied_param_counts(sd14.unet, sd14.vae, sd14.text_encoder) == {
        "unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}  # fmt: skip


def _pipeline_with(reference: Path, dst: Path, component: str, **changes: object) -> Path:
    root = copy_dir(reference / "sd_tiny", dst)
    for name in ("io.json", "io.npz"):
        (root / name).unlink()
    path = root / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return root


CONVERT_SIZE_CASES = {
    # Every size the UNet config allows at its maximum: about 8.5e13 parameters.
    "maximal unet": ("unet", dict(block_out_channels=[16384] * 8, layers_per_block=32, transformer_layers_per_block=32,
                                  attention_head_dim=1024, norm_num_groups=1024,
                                  down_block_types=["CrossAttnDownBlock2D"] * 8, up_block_types=["CrossAttnUpBlock2D"] * 8),
                     ["unet/config.json: implies 84,759,791,321,092 parameters", "more than the memory budget"]),
    # 1,024 layers of sd_tiny's width: 7 million parameters for weights of 33 thousand.
    "1024-layer text encoder": ("text_encoder", dict(num_hidden_layers=1024),
                                ["text_encoder/model.safetensors: holds 32,842 values",
                                 "text_encoder/config.json implies 6,971,200 parameters"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONVERT_SIZE_CASES))
def test_convert_refuses_a_config_its_weights_cannot_fill_at_once(
    case, reference, tmp_path, capsys
):
    """Before: more than 60 s (the UNet) and 37 s (the text encoder) of tracing, then a listing
    of 16,000 missing keys; now refused from the configs' arithmetic."""
    component, changes, needles = CONVERT_SIZE_CASES[case]
    root = _pipeline_with(reference, tmp_path / "pipe", component, **changes)
    out = tmp_path / "out" / "m"
    t0 = time.perf_counter()
    with deadline(20):
        code = convert_main([str(root), "-o", str(out), "--format", "diffusers"])
    assert time.perf_counter() - t0 < 3
    assert code == 1
    one_line(capsys.readouterr().err, "ddcm convert: ", str(root), *needles)
    assert not (tmp_path / "out").exists()


def test_load_refuses_a_model_json_describing_a_huge_adm_unet(tiny_model_dir, tmp_path):
    """Before: ~10 s tracing the network, then orbax's 'structure mismatch'; now milliseconds."""
    folder = copy_dir(tiny_model_dir, tmp_path / "m")
    data = json.loads((folder / "model.json").read_text())
    data["architecture"] = {**data["architecture"], "model_channels": 384, "channel_mult": [1] * 6,
                            "num_res_blocks": [16] * 6, "attention_ds": [1, 2, 4, 8, 16, 32]}  # fmt: skip
    data.pop("config_fingerprint")
    config = M.ModelConfig.from_json(data)[0]
    data["config_fingerprint"] = M.config_fingerprint(
        config, data["fingerprint"]
    )  # a consistent model.json
    (folder / "model.json").write_text(json.dumps(data))
    implied = adm.param_count(config.architecture)
    t0 = time.perf_counter()
    with deadline(20), pytest.raises(ModelDirError) as e:
        ddcm_jax.load_model(folder)
    assert time.perf_counter() - t0 < 5  # the old path traced the whole network first (~10 s)
    held = M.checkpoint_values(tiny_model_dir / "params")
    assert held == adm.param_count(M.read_model_json(tiny_model_dir)[0].architecture)
    assert (
        str(e.value)
        == f"{folder / 'params'}: holds {held:,} parameter values, model.json implies {implied:,}"
    )


def test_a_checkpoint_compressed_below_a_byte_per_value_still_loads(tiny_model_dir, tmp_path):
    """All zeros: orbax stores the arrays in far fewer bytes than values; the count is then
    asked of orbax's metadata, which agrees, and the model loads."""
    config, _ = M.read_model_json(tiny_model_dir)
    zeros = jax.tree.map(
        lambda s: np.zeros(s.shape, np.float32), adm.abstract_params(config.architecture)
    )
    fp = M.save_model(tmp_path / "zeros", config, zeros)
    assert M.check_checkpoint_files(tmp_path / "zeros" / "params") < adm.param_count(
        config.architecture
    )
    assert ddcm_jax.load_model(tmp_path / "zeros").fingerprint == fp


def test_load_refuses_a_model_json_describing_a_huge_sd_unet(sd_tiny_model_dir, tmp_path):
    folder = copy_dir(sd_tiny_model_dir, tmp_path / "m")
    data = json.loads((folder / "model.json").read_text())
    config, _, arrays = LM.LatentModelConfig.from_json(data)
    unet = dataclasses.replace(config.unet, layers_per_block=(32, 32), transformer_layers_per_block=(32, 32),
                               down_block_types=("CrossAttnDownBlock2D",) * 2,
                               up_block_types=("CrossAttnUpBlock2D",) * 2)  # fmt: skip
    data["unet"] = unet.to_json()
    data["fingerprint"] = LM.latent_fingerprint(dataclasses.replace(config, unet=unet), arrays)
    (folder / "model.json").write_text(json.dumps(data))
    t0 = time.perf_counter()
    with (
        deadline(20),
        pytest.raises(
            ModelDirError, match=r"params: holds 319,725 parameter values, model\.json implies"
        ),
    ):
        ddcm_jax.load_model(folder)
    assert time.perf_counter() - t0 < 5  # the old path traced the whole network first (~10 s)


# --- finding 7: staging folders of killed conversions ------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def quiet_conversion(reference, tmp_path_factory):
    """`ddcm convert -q` of sd_tiny beside the debris of killed conversions, live ones and other hosts'."""
    parent = tmp_path_factory.mktemp("staging")
    host, dead = _host_tag(), _dead_pid()
    folders = {
        "dead": f".m.staging-{host}~{dead}.0123456789ab",
        "live": f".m.staging-{host}~{os.getpid()}.0123456789ab",
        "other host": f".m.staging-{host}x~{dead}.0123456789ab",
        "untagged": ".m.staging-0123456789ab",  # written before the tag: its writer is unknown
        "backup": f".m.replaced-{host}~{dead}.0123456789ab",  # may hold the only copy of a model
        "other target": f".n.staging-{host}~{dead}.0123456789ab",
    }
    for name in folders.values():
        (parent / name / "params").mkdir(parents=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(60):
        code = convert_main(
            [str(reference / "sd_tiny"), "-o", str(parent / "m"), "--format", "diffusers", "-q"]
        )
    return {
        "code": code,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "parent": parent,
        "folders": folders,
    }


def test_convert_removes_the_staging_folders_of_dead_processes(quiet_conversion):
    parent, folders = quiet_conversion["parent"], quiet_conversion["folders"]
    assert quiet_conversion["code"] == 0, quiet_conversion["err"]
    left = sorted(p.name for p in parent.iterdir())
    assert left == sorted([*(v for k, v in folders.items() if k != "dead"), "m"])


def test_staging_folders_name_their_host_and_process(tmp_path):
    stage = M.fresh_name(tmp_path, "m", "staging")
    assert stage.name.startswith(f".m.staging-{_host_tag()}~{os.getpid()}.")
    stage.mkdir()
    assert M.remove_stale_staging(tmp_path / "m") == [] and stage.is_dir()  # this process lives
    dead = tmp_path / stage.name.replace(f"~{os.getpid()}.", f"~{_dead_pid()}.")
    stage.rename(dead)
    assert M.remove_stale_staging(tmp_path / "m") == [dead] and not dead.exists()


# --- finding 8: -q, and a model.json nested too deeply ------------------------------------------------------


def test_convert_quiet_prints_nothing_for_a_pipeline(quiet_conversion):
    assert quiet_conversion["code"] == 0
    assert quiet_conversion["out"] == "" and quiet_conversion["err"] == ""
    assert (quiet_conversion["parent"] / "m" / "model.json").is_file()


def test_deeply_nested_model_json_is_refused_naming_it(tiny_model_dir, tmp_path):
    folder = copy_dir(tiny_model_dir, tmp_path / "m")
    (folder / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelDirError, match=r"model\.json: not valid JSON \(nested too deeply\)$"):
        ddcm_jax.load_model(folder)


def test_cli_refuses_a_deeply_nested_model_json_naming_it(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from ddcm_jax.cli import main as cli_main

    folder = copy_dir(tiny_model_dir, tmp_path / "m")
    (folder / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    code = cli_main(
        ["compress", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--model", str(folder), "-q"]
    )
    assert code == 1
    one_line(
        capsys.readouterr().err, f"{folder / 'model.json'}: not valid JSON (nested too deeply)"
    )
