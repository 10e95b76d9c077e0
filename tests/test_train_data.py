"""Training data: no Kodak image can enter it; Debian packages unpack with their licences; the fit policy."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess

import numpy as np
import pytest
from headers import make_header
from PIL import Image

from ddcm_jax import bitstream, images, train_data
from ddcm_jax.train import load_training_images


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["kodim01.png", "kodim10.png", "kodim23.png"])
def test_no_kodak_image_enters_training_even_disguised(kodak, tmp_path, name):
    original = np.asarray(Image.open(kodak / name).convert("RGB"))
    data = (kodak / name).read_bytes()
    with pytest.raises(train_data.KodakError, match="Kodak"):
        train_data.check_not_kodak("photo.png", data, original)  # the very file, renamed
    disguises = {
        "jpeg q70, half size": Image.fromarray(original).resize((original.shape[1] // 2, original.shape[0] // 2)),
        "mirrored": Image.fromarray(original[:, ::-1].copy()),
        "rotated": Image.fromarray(np.rot90(original).copy()),
        "brighter": Image.fromarray(np.clip(original.astype(int) + 20, 0, 255).astype(np.uint8)),
    }
    for what, img in disguises.items():
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=70)
        path = tmp_path / "x.jpg"
        path.write_bytes(buf.getvalue())
        pixels = np.asarray(Image.open(path).convert("RGB"))
        with pytest.raises(train_data.KodakError):
            train_data.check_not_kodak(f"{what}.jpg", buf.getvalue(), pixels)


def test_other_photographs_pass_the_kodak_guard():
    pytest.importorskip("skimage")
    from skimage import data

    for img in (data.astronaut(), data.chelsea(), data.coffee()):
        assert train_data.kodak_similarity(img) < train_data.KODAK_CORRELATION
    rng = np.random.default_rng(0)
    assert train_data.kodak_similarity(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) < 0.5


def test_signatures_file_matches_the_kodak_files(kodak):
    digests, sigs = train_data._kodak()
    assert len(digests) == 24 and sigs.shape == (24, 16, 16)
    assert hashlib.sha256((kodak / "kodim05.png").read_bytes()).hexdigest() in digests


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_package_unpacks_with_licence_and_feeds_training(tmp_path):
    """A package built here stands in for apt-get's download: unpack, licence, Kodak check, prepared cache."""
    root = tmp_path / "build"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: fake-wallpapers\nVersion: 1.2-3\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")  # fmt: skip
    pic = root / "usr/share/backgrounds/field.png"
    pic.parent.mkdir(parents=True)
    rng = np.random.default_rng(1)
    pixels = (np.linspace(0, 255, 200)[None, :, None] * np.ones((120, 1, 3)) * 0.5
              + rng.integers(0, 100, (120, 200, 3))).astype(np.uint8)  # fmt: skip
    pic.write_bytes(_png(pixels))
    doc = root / "usr/share/doc/fake-wallpapers"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nCopyright: 2020 Someone\nLicense: GPL-2+\n\n"
                                   "Files: src/field.png\nCopyright: 2021 A Photographer\nLicense: CC-BY-4.0\n\n"
                                   "Files: debian/*\nCopyright: 2022 Packager\nLicense: MIT\n")  # fmt: skip
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--build", str(root), str(cache / "debs" / "fake-wallpapers_1.2-3_all.deb")],
                   check=True, capture_output=True)  # fmt: skip
    train_data.fetch(cache, ["fake-wallpapers"])  # the .deb is there: no apt-get
    path = "usr/share/backgrounds/field.png"
    assert train_data.locate(cache, "fake-wallpapers", path).is_file()
    info = train_data.package_info(cache, "fake-wallpapers", path)
    assert info == {"package": "fake-wallpapers", "version": "1.2-3", "licence": "CC-BY-4.0",
                    "copyright": "2021 A Photographer"}  # fmt: skip
    spec = f"debian:fake-wallpapers/{path}"
    arrays, record = load_training_images([spec], cache=cache, max_side=100)
    assert arrays[0].shape == (60, 100, 3) and record[0]["licence"] == "CC-BY-4.0"
    assert record[0]["sha256"] == hashlib.sha256(pic.read_bytes()).hexdigest()
    assert list(cache.glob("prepared-*.npz"))  # a machine without the package trains from this file
    shutil.rmtree(cache / "pkgs")
    again, _ = load_training_images([spec], cache=cache, max_side=100)
    np.testing.assert_array_equal(again[0], arrays[0])


@pytest.mark.parametrize("size", [(512, 768), (768, 512), (100, 100), (33, 700), (150, 90), (1, 1000)])
def test_fit_policy_keeps_the_whole_picture_and_comes_back_at_its_size(size):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    coded = images.prepare(pixels, "fit", 192, 8)
    assert coded.shape[:2] == images.coded_size(size, "fit", 192, 8)
    assert coded.shape[0] % 8 == 0 and coded.shape[1] % 8 == 0 and max(coded.shape[:2]) <= max(192, *size) + 7
    h, w = images.fit_content(size, coded.shape[:2])
    assert abs(h / w - size[0] / size[1]) < 2.5 / min(h, w) + 1e-9  # aspect ratio kept to rounding
    back = images.restore_geometry(coded, "fit", size)
    assert back.shape == pixels.shape
    if max(size) <= 192:  # small inputs are not enlarged: exact
        np.testing.assert_array_equal(back, pixels)
    header = make_header(rule="ddcm", steps=4, codebook_size=16, fingerprint=bytes(16), size=coded.shape[:2],
                              original_size=size, size_policy="fit", jax_version="0.10.2")  # fmt: skip
    data = bitstream.encode(header, np.zeros((3, 1), np.int64), np.zeros((3, 0), np.int64))
    assert bitstream.decode_header(data).header == header  # the format holds it, its geometry checks accept it
