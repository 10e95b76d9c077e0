"""The `ddcm` command line on the converted adm_tiny model and Kodak images."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from headers import forge as forge_header
from PIL import Image

from ddcm_jax import bitstream as bs
from ddcm_jax.cli import main
from ddcm_jax.images import commit_files, load_image

CODING = ["-T", "6", "-K", "32"]
ENC = [*CODING, "--rule", "ddcm", "--crop"]  # the classic DDCM code on the centre square


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def kodak_image(kodak, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    shutil.copy(kodak / "kodim23.png", d / "kodim23.png")
    return d / "kodim23.png"


@pytest.fixture(scope="module")
def encoded(tiny_model_dir, kodak_image, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc")
    assert main(["compress", str(kodak_image), "-o", str(out), "--model", str(tiny_model_dir), *ENC,
                 "--save-reconstruction", "-q"]) == 0  # fmt: skip
    return out / "kodim23.ddcm"


def test_roundtrip_pixel_exact_and_file_size(tiny_model_dir, encoded, tmp_path, capsys):
    code, _, err = run(capsys, "decompress", encoded, "-o", tmp_path, "--model", tiny_model_dir, "-q")
    assert code == 0, err
    rec = np.asarray(Image.open(encoded.with_suffix(".png")))
    dec = np.asarray(Image.open(tmp_path / "kodim23.png"))
    assert rec.shape == (512, 512, 3)  # the centre square of the 768x512 original, at its size
    np.testing.assert_array_equal(dec, rec)
    data = encoded.read_bytes()
    stream = bs.decode(data)
    assert stream.payload_bits == 5 * 5  # (T - 1) * ceil(log2 32)
    assert len(data) == stream.header_bytes + math.ceil(stream.payload_bits / 8) + 4

    code, out, _ = run(capsys, "info", encoded, "--json", tmp_path / "info.json")
    assert code == 0 and "25 bits" in out and "header" in out
    info = json.loads((tmp_path / "info.json").read_text())["items"][0]
    assert info["header_bytes"] == stream.header_bytes and info["payload_bytes"] == 4
    assert info["bpp"] == pytest.approx(25 / 32**2) and info["bpp_file"] == pytest.approx(8 * len(data) / 32**2)


def test_roundtrip_command_table_and_json(tiny_model_dir, kodak_image, tmp_path, capsys):
    summary = tmp_path / "s.json"
    code, out, err = run(capsys, "roundtrip", kodak_image, "-o", tmp_path / "o", "--model", tiny_model_dir,
                         *ENC, "--json", summary)  # fmt: skip
    assert code == 0, err
    assert "PSNR" in out and "kodim23.png" in out
    item = json.loads(summary.read_text())["items"][0]
    assert {"file", "bytes", "bpp", "psnr", "lpips", "seconds"} <= set(item)
    ref = np.asarray(Image.open(kodak_image))[:, 128:640]
    dec = np.asarray(Image.open(tmp_path / "o" / "kodim23.png")).astype(np.float64)
    assert item["psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean((ref - dec) ** 2)), abs=1e-3)
    assert (tmp_path / "o" / "kodim23.ddcm").stat().st_size == item["bytes"]


def _one_error_line(err: str, *fragments: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def _forge(data: bytes, **fields) -> bytes:
    """Rewrite header fields of a valid file (no validation), payload kept, CRC recomputed."""
    stream = bs.decode(data)
    body = bs._header_bytes(forge_header(stream.header, **fields)) + data[stream.header_bytes : -4]
    return body + struct.pack(">I", zlib.crc32(body))


BAD = {
    "truncated": (lambda d: d[: len(d) // 2], "truncated"),
    "random": (lambda d: np.random.default_rng(5).bytes(300), "magic"),
    "magic": (lambda d: b"\x89PNG" + d[4:], "magic"),
    "version": (lambda d: d[:4] + b"\x09" + d[5:], "version 9"),
    "crc": (lambda d: d[:-5] + bytes([d[-5] ^ 0x80]) + d[-4:], "CRC"),
    "fingerprint": (lambda d: _forge(d, fingerprint=b"\xab" * 16), "made with model sha256:abab"),
    "huge_k": (lambda d: _forge(d, codebook_size=2**24 + 1), "codebook size"),
    "many_steps": (lambda d: _forge(d, steps=10**5 + 1), "steps"),
    "huge_side": (lambda d: _forge(d, size=(32, 20000)), "coded size"),
    "too_big_to_decode": (lambda d: _forge(d, size=(8192, 8192)), "needs about"),
    "payload_length": (lambda d: _forge(d, steps=9), "implies"),
    "empty": (lambda d: b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bitstreams_fail_cleanly_and_write_nothing(tiny_model_dir, encoded, tmp_path, capsys, case):
    make, fragment = BAD[case]
    bad = tmp_path / f"{case}.ddcm"
    bad.write_bytes(make(encoded.read_bytes()))
    out = tmp_path / "out"
    code, _, err = run(capsys, "decompress", bad, "-o", out, "--model", tiny_model_dir, "-q")
    assert code == 1
    _one_error_line(err, str(bad), fragment)
    assert not out.exists() or not any(out.iterdir())


def test_wrong_model_is_named(encoded, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DDCM_MODELS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("DDCM_REGISTRY", str(tmp_path / "no_registry.txt"))  # no model `ddcm convert` listed
    code, _, err = run(capsys, "decompress", encoded, "-o", tmp_path / "o", "-q")
    assert code == 1
    _one_error_line(err, str(encoded), "needs the ADM (pixel) model sha256:", "--model")
    assert not (tmp_path / "o").exists()


def test_model_found_by_fingerprint(tiny_model_dir, encoded, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DDCM_MODELS", str(Path(tiny_model_dir).parent))
    code, _, err = run(capsys, "decompress", encoded, "-o", tmp_path, "-q")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "kodim23.png")),
                                  np.asarray(Image.open(encoded.with_suffix(".png"))))  # fmt: skip


def test_bad_images_are_named_and_the_rest_still_done(tiny_model_dir, kodak_image, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(kodak_image, src / "sub" / "good.png")
    (src / "text.png").write_text("not an image")
    (src / "cut.png").write_bytes(kodak_image.read_bytes()[:3000])
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", src, tmp_path / "missing.png", "-o", out, "--model", tiny_model_dir,
                       *ENC, "-q")  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 3 and "Traceback" not in err
    assert any("text.png" in ln and "cannot read image" in ln for ln in lines)
    assert any("cut.png" in ln for ln in lines)
    assert any("missing.png" in ln and "no such file" in ln for ln in lines)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["sub", "sub/good.ddcm"]


def test_usage_errors_exit_2(tiny_model_dir, kodak_image, tmp_path, capsys):
    for argv in (["compress", kodak_image],  # no -o
                 ["compress", kodak_image, "-o", tmp_path, "--model", tiny_model_dir, "-T", "6", "-K", "32",
                  "--seed", "-1"],
                 ["compress", kodak_image, "-o", tmp_path, "--model", tiny_model_dir, "-T", "1", "-K", "32"],
                 ["frobnicate"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
    capsys.readouterr()
    assert not any(tmp_path.iterdir())


def test_two_inputs_with_one_output_name(tiny_model_dir, kodak_image, tmp_path, capsys):
    other = tmp_path / "b"
    other.mkdir()
    shutil.copy(kodak_image, other / kodak_image.name)
    code, _, err = run(capsys, "compress", kodak_image, other / kodak_image.name, "-o", tmp_path / "o",
                       "--model", tiny_model_dir, *ENC, "-q")  # fmt: skip
    assert code == 1
    _one_error_line(err, "would overwrite")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["kodim23.ddcm"]


def test_generate_restore_and_their_files_decode(tiny_model_dir, kodak_image, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "-n", "2", "-o", tmp_path / "g", "--model", tiny_model_dir,
                       *CODING, "--seed", "7", "-q")  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "restore", kodak_image, "--task", "colorization", "-o", tmp_path / "r",
                       "--model", tiny_model_dir, *CODING, "--rule", "ddcm", "--crop", "-q")  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "restore", kodak_image, "--task", "super-resolution", "-o", tmp_path / "t",
                       "--model", tiny_model_dir, *CODING, "-M", "4", "--crop", "-q")  # fmt: skip
    assert code == 0, err
    made_all = (tmp_path / "g" / "gen_0001.ddcm", tmp_path / "r" / "kodim23.ddcm", tmp_path / "t" / "kodim23.ddcm")
    for made in made_all:
        out = tmp_path / "dec" / made.parent.name
        assert main(["decompress", str(made), "-o", str(out), "--model", str(tiny_model_dir), "-q"]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out / made.with_suffix(".png").name)),
                                      np.asarray(Image.open(made.with_suffix(".png"))))  # fmt: skip
    h = bs.decode((tmp_path / "g" / "gen_0001.ddcm").read_bytes()).header
    assert (h.task.name, h.spec.rule, h.provenance.seed) == ("generation", "random", 8)
    h = bs.decode((tmp_path / "r" / "kodim23.ddcm").read_bytes()).header
    assert (h.task.name, h.spec.rule) == ("colorization", "mse")
    h = bs.decode((tmp_path / "t" / "kodim23.ddcm").read_bytes()).header
    assert (h.task.name, h.spec.rule, h.spec.num_atoms, h.task.factor) == ("super-resolution", "turbo", 4, 4)


def test_generate_size(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "-n", "1", "-o", tmp_path / "g", "--model", tiny_model_dir, *CODING,
                       "--size", "16", "-q")  # fmt: skip
    assert code == 0, err
    made = tmp_path / "g" / "gen_0000.ddcm"
    assert np.asarray(Image.open(made.with_suffix(".png"))).shape == (16, 16, 3)
    assert bs.decode(made.read_bytes()).header.geometry.size == (16, 16)
    assert main(["decompress", str(made), "-o", str(tmp_path / "d"), "--model", str(tiny_model_dir), "-q"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d" / "gen_0000.png")),
                                  np.asarray(Image.open(made.with_suffix(".png"))))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run(capsys, "generate", "-n", "1", "-o", tmp_path / "bad", "--model", tiny_model_dir, *CODING, "--size", "15")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith("--size 15 is not a positive multiple of 2, this model's multiple"), err
    assert not (tmp_path / "bad").exists()


def test_console_script_exit_code_and_one_line(tmp_path):
    bad = tmp_path / "junk.ddcm"
    bad.write_bytes(b"DDCM\x01" + bytes(20))
    ddcm = Path(sys.executable).with_name("ddcm")
    cmd = [str(ddcm)] if ddcm.exists() else [sys.executable, "-m", "ddcm_jax.cli"]
    proc = subprocess.run([*cmd, "info", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    _one_error_line(proc.stderr, str(bad))


# --- images and atomic writes ------------------------------------------------------------------


@pytest.mark.parametrize("mode,note", [("L", "converted to RGB"), ("RGBA", "alpha"), ("P", "converted"),
                                       ("I;16", "16-bit"), ("LA", "alpha"), ("CMYK", "converted")])  # fmt: skip
def test_image_modes_become_rgb_with_a_note(kodak, tmp_path, mode, note):
    rgb = np.asarray(Image.open(kodak / "kodim23.png"))[:64, :48]
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # a 16-bit grayscale image
    else:
        img = Image.fromarray(rgb).convert(mode)
    suffix = ".tiff" if mode == "CMYK" else ".png"
    img.save(tmp_path / f"x{suffix}")
    if mode == "I;16":
        assert Image.open(tmp_path / "x.png").mode in ("I;16", "I")
    pixels, notes = load_image(tmp_path / f"x{suffix}")
    assert pixels.shape == (64, 48, 3) and pixels.dtype == np.uint8
    assert any(note in n for n in notes), notes
    if mode == "I;16":
        np.testing.assert_array_equal(pixels[..., 0], rgb[..., 0])


def test_commit_files_is_all_or_nothing(tmp_path):
    blocker = tmp_path / "b.png"
    blocker.mkdir()  # renaming a file over a folder fails
    with pytest.raises(OSError):
        commit_files({tmp_path / "a.ddcm": b"x", blocker: b"y"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]
    assert not any(blocker.iterdir())


def test_decoding_is_independent_of_threefry_setting(tiny_model_dir, kodak_image, tmp_path, capsys):
    """The header records jax_threefry_partitionable; the decoder honours it whatever the global is."""
    with jax.threefry_partitionable(False):
        code, _, err = run(capsys, "compress", kodak_image, "-o", tmp_path, "--model", tiny_model_dir, *ENC,
                           "--save-reconstruction", "-q")  # fmt: skip
    assert code == 0, err
    assert bs.decode((tmp_path / "kodim23.ddcm").read_bytes()).header.provenance.threefry_partitionable is False
    code, _, err = run(capsys, "decompress", tmp_path / "kodim23.ddcm", "-o", tmp_path / "d", "--model",
                       tiny_model_dir, "-q")  # fmt: skip
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d" / "kodim23.png")),
                                  np.asarray(Image.open(tmp_path / "kodim23.png")))  # fmt: skip


def test_no_torch_at_run_time(encoded):
    """The package, the converter and the CLI never import torch (it is only a test/benchmark extra)."""
    script = ("import sys\nfrom ddcm_jax.cli import main\nimport ddcm_jax.convert, ddcm_jax.codec\n"
              f"assert main(['info', '-q', {str(encoded)!r}]) == 0\nprint('torch' in sys.modules)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_default_model_is_packaged_small_and_used_without_model(kodak_image, tmp_path, capsys):
    """The packaged MODEL_DIR: at most 60 MB, attention only at coarse scales, trained without Kodak, the default."""
    from ddcm_jax.families import load_model
    from ddcm_jax.modeldir import default_model_dir

    d = default_model_dir()
    assert sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) <= 60 * 2**20
    model = load_model("default")  # restores and re-checks the fingerprint
    assert min(model.config.architecture.attention_ds) >= 8  # attention only at 1/8 and coarser: any size
    training = model.config.source["training"]
    assert training["data"] and all("kodim" not in item["file"].lower() for item in training["data"])
    code, out, err = run(capsys, "roundtrip", kodak_image, "-o", tmp_path / "rt", "-T", "4", "-K", "256", "-M", "8",
                         "--size", "64")  # fmt: skip
    assert code == 0, err
    assert "PSNR" in out
    data = (tmp_path / "rt" / "kodim23.ddcm").read_bytes()
    assert bs.decode(data).header.model.matches(model.fingerprint)
    # Without --model, the decoder finds the packaged model by the header's fingerprint.
    code, _, err = run(capsys, "decompress", tmp_path / "rt" / "kodim23.ddcm", "-o", tmp_path / "dec", "-q")
    assert code == 0, err
    assert Image.open(tmp_path / "dec" / "kodim23.png").size == (768, 512)  # the whole picture, at its size
