"""The `.ddcm` version-1 format is pinned by files written before the codec's redesign.

`../shared/reference/ddcm_v1_files/` holds six files, each beside the PNG that
decoding it gave (see its README). Through the command line, each must decode
to those pixels (exactly, up to the cross-processor drift described below), and
re-encoding its input with the same command must write the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


# The pixels of a decode are pinned "on this kind of machine". On this project's AVX-512 Xeon
# machines default_mp (a 768 x 512 padded decode, the one large image) comes out 1 grey level off
# in 32 of its 1,179,648 values, with the untouched pre-redesign code too: XLA:CPU's code for the
# large convolutions rounds differently across processors, while the indices (and so the file's
# bytes, checked below) are identical. One rule for every file: exact, or a drift of one level in
# at most 1e-4 of the values; anything more is a real change of the decoder.
MAX_DRIFT_FRACTION = 1e-4
CASES = sorted(COMMANDS)


def _assert_same_image(got: np.ndarray, want: np.ndarray, case: str) -> None:
    assert got.shape == want.shape, case
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"{case}: decoded pixels differ by up to {diff.max()} levels"
    assert np.count_nonzero(diff) <= MAX_DRIFT_FRACTION * diff.size, f"{case}: {np.count_nonzero(diff)} values differ"


@pytest.mark.parametrize("case", CASES)
def test_v1_file_decodes_to_its_png(case, v1, tiny_model_dir, tmp_path, capsys):
    (ddcm,) = (v1 / case).glob("*.ddcm")
    model = ["--model", str(tiny_model_dir)] if case.startswith("tiny") else []
    assert main(["decompress", str(ddcm), "-o", str(tmp_path), "-q", *model]) == 0
    out = tmp_path / ddcm.with_suffix(".png").name
    _assert_same_image(_pixels(out), _pixels(ddcm.with_suffix(".png")), case)


@pytest.mark.parametrize("case", CASES)
def test_v1_command_writes_the_same_bytes(case, v1, kodak, tiny_model_dir, tmp_path, capsys):
    command, inputs, args = COMMANDS[case]
    (ddcm,) = (v1 / case).glob("*.ddcm")
    argv = [command, *(str(kodak / name) for name in inputs), "-o", str(tmp_path), "-q", *_args(args, tiny_model_dir)]
    assert main(argv) == 0
    assert (tmp_path / ddcm.name).read_bytes() == ddcm.read_bytes(), case
