"""The `.ddcm` version-1 format is pinned by files written before the codec's redesign.

`../shared/reference/ddcm_v1_files/` holds six files, each beside the PNG that
decoding it gave. Its README states the contract, tested here through the command line:
- same picture across versions and backends: each file decodes to its PNG within
  60 dB PSNR and 2 grey levels (faster arithmetic may move values by a level);
- re-encoding is not pinned across versions: the same command on the same input writes
  a file at least as good, its decoding's PSNR against the input at most 0.1 dB below
  the pinned file's (a generation has no input: its file must decode, to the size pinned).
Same bits within one version on one backend are tested where codes are made
(decompress(compress(x)) equals the encoder's image: test_cli, test_sampler).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddcm_jax import images, metrics
from ddcm_jax.cli import main

# folder -> (command, its arguments after the input and "-o OUT"), as the README lists them
# The defaults changed after version 1 (model, rule, size policy): the packaged model of that time
# is `small-v1`, and the commands spell out what were then the defaults (--rule ddcm, --crop,
# generate's --size 128).
V1 = ["--model", "small-v1"]
COMMANDS = {
    "default_ddcm": ("compress", ["kodim05.png"], ["-T", "20", "-K", "256", "--rule", "ddcm", "--crop", *V1]),
    "default_turbo": ("compress", ["kodim19.png"], ["-T", "16", "-K", "512", "-M", "4", "--rule", "turbo", "--resize",
                                                     *V1]),
    "default_mp": ("compress", ["kodim23.png"], ["-T", "12", "-K", "64", "-M", "3", "-C", "2", "--rule", "ddcm", "--pad",
                                                 *V1]),
    "tiny_ddcm": ("compress", ["kodim23.png"], ["-T", "10", "-K", "64", "--rule", "ddcm", "--crop", "--model", "TINY"]),
    "default_colorization": ("restore", ["kodim05.png"], ["--task", "colorization", "-T", "20", "-K", "64", "--crop",
                                                          "--rule", "ddcm", *V1]),
    "default_generate": ("generate", [], ["-n", "1", "-T", "20", "-K", "16", "--seed", "7", "--size", "128", *V1]),
}  # fmt: skip


@pytest.fixture(scope="module")
def v1(reference: Path) -> Path:
    folder = reference / "ddcm_v1_files"
    if not folder.is_dir():
        pytest.fail(f"{folder} not found (set DDCM_SHARED)")
    return folder


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _args(args: list[str], tiny: Path) -> list[str]:
    return [str(tiny) if a == "TINY" else a for a in args]


# The contract's tolerances (ddcm_v1_files/README.md).
MIN_PSNR_DB = 60.0
MAX_LEVELS = 2
REENCODE_SLACK_DB = 0.1
CASES = sorted(COMMANDS)
POLICY = {"--crop": "crop", "--resize": "resize", "--pad": "pad"}


def _assert_same_picture(got: np.ndarray, want: np.ndarray, case: str) -> None:
    assert got.shape == want.shape, case
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= MAX_LEVELS, f"{case}: decoded pixels differ by up to {diff.max()} levels"
    assert metrics.psnr(want, got) >= MIN_PSNR_DB, f"{case}: {metrics.psnr(want, got):.2f} dB from its pinned PNG"


@pytest.mark.parametrize("case", CASES)
def test_v1_file_decodes_to_its_picture(case, v1, tiny_model_dir, tmp_path, capsys):
    (ddcm,) = (v1 / case).glob("*.ddcm")
    model = ["--model", str(tiny_model_dir)] if case.startswith("tiny") else []
    assert main(["decompress", str(ddcm), "-o", str(tmp_path), "-q", *model]) == 0
    out = tmp_path / ddcm.with_suffix(".png").name
    _assert_same_picture(_pixels(out), _pixels(ddcm.with_suffix(".png")), case)


@pytest.mark.parametrize("case", CASES)
def test_v1_command_writes_a_file_at_least_as_good(case, v1, kodak, tiny_model_dir, tmp_path, capsys):
    command, inputs, args = COMMANDS[case]
    (ddcm,) = (v1 / case).glob("*.ddcm")
    report = tmp_path / "report.json"
    argv = [command, *(str(kodak / name) for name in inputs), "-o", str(tmp_path / "out"), "-q",
            "--json", str(report), *_args(args, tiny_model_dir)]  # fmt: skip
    assert main(argv) == 0
    (record,) = json.loads(report.read_text())["items"]
    pinned = _pixels(ddcm.with_suffix(".png"))
    if not inputs:  # a generation: nothing to compare with; the new file decodes to a picture of that size
        assert main(["decompress", str(tmp_path / "out" / ddcm.name), "-o", str(tmp_path / "dec"), "-q",
                     *_args(args, tiny_model_dir)[-2:]]) == 0  # fmt: skip
        assert _pixels(tmp_path / "dec" / ddcm.with_suffix(".png").name).shape == pinned.shape
        return
    (policy,) = [POLICY[a] for a in args if a in POLICY]
    source, _ = images.load_image(kodak / inputs[0])
    pinned_db = metrics.psnr(images.reference(source, policy), pinned)
    assert record["psnr"] >= pinned_db - REENCODE_SLACK_DB, f"{case}: {record['psnr']:.3f} dB < pinned {pinned_db:.3f}"
