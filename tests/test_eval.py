"""`ddcm eval` and its parts: MS-SSIM against published implementations, the other codecs, the results
files against an independent recomputation from the written files, resuming, re-plotting."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddcm_jax import baselines, codec, metrics
from ddcm_jax.cli import main


def _noisy(a: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(a.astype(np.float64) + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photo(kodak: Path) -> np.ndarray:
    return np.asarray(Image.open(kodak / "kodim23.png").convert("RGB"))[100:300, 200:421]  # 200 x 221: odd width


def test_ssim_equals_scikit_image(photo):
    from skimage.metrics import structural_similarity

    b = _noisy(photo, 15)
    ref = structural_similarity(photo, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255)  # fmt: skip
    assert metrics.ssim(photo, b) == pytest.approx(ref, abs=1e-9)


@pytest.mark.torch
def test_ms_ssim_equals_pytorch_msssim(photo):
    """CompressAI reports MS-SSIM through pytorch-msssim's `ms_ssim`: ours must be that number (its odd-size
    pooling included: 221 columns)."""
    torch = pytest.importorskip("torch")
    ref_ms_ssim = pytest.importorskip("pytorch_msssim").ms_ssim
    as_torch = lambda v: torch.from_numpy(v.astype(np.float32)).permute(2, 0, 1)[None]  # noqa: E731
    for sigma in (4, 20, 60):
        b = _noisy(photo, sigma, seed=sigma)
        ref = float(ref_ms_ssim(as_torch(photo), as_torch(b), data_range=255))
        assert metrics.ms_ssim(photo, b) == pytest.approx(ref, abs=2e-5)


def test_ms_ssim_properties(photo):
    assert metrics.ms_ssim(photo, photo) == pytest.approx(1.0, abs=1e-12)
    b, c = _noisy(photo, 10), _noisy(photo, 40)
    assert metrics.ms_ssim(photo, b) == pytest.approx(metrics.ms_ssim(b, photo), abs=1e-12)
    assert 0 < metrics.ms_ssim(photo, c) < metrics.ms_ssim(photo, b) < 1
    assert metrics.ms_ssim(photo[:160], photo[:160]) is None  # five scales need 161 px a side
    assert metrics.ms_ssim_skip_reason(160, 400) is not None and metrics.ms_ssim_skip_reason(161, 161) is None


@pytest.mark.parametrize("name", list(baselines.BASELINES))
def test_baseline_codecs_round_trip_and_fit_budgets(name, photo):
    b = baselines.BASELINES[name]
    if b.missing_reason():
        pytest.skip(b.missing_reason())
    lo, hi = b.qualities
    sizes = [len(b.encode(photo, q)) for q in (lo, (lo + hi) // 2, hi)]
    assert sizes[0] < sizes[1] < sizes[2]
    data = b.encode(photo, b.ladder[3])
    out = b.decode(data)
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert metrics.psnr(photo, out) > 25
    budget = (sizes[0] + sizes[1]) // 2
    hit = baselines.at_bytes(b, photo, budget)
    assert hit.fits and len(hit.data) <= budget and hit.quality < hi
    assert hit.data == b.encode(photo, hit.quality)
    assert not baselines.at_bytes(b, photo, sizes[0] - 1).fits
    with pytest.raises(ValueError, match="outside"):
        b.encode(photo, hi + 1)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory, kodak) -> Path:
    """Two 176 x 168 crops of Kodak images (MS-SSIM needs 161 px a side)."""
    folder = tmp_path_factory.mktemp("eval_in")
    for n, (top, left) in (("kodim23", (150, 300)), ("kodim04", (300, 150))):
        px = np.asarray(Image.open(kodak / f"{n}.png").convert("RGB"))[top : top + 168, left : left + 176]
        Image.fromarray(px).save(folder / f"{n}.png")
    return folder


EVAL_FLAGS = ["--quality", "low,high", "-T", "5", "--size", "32", "--codecs", "jpeg,webp", "--scales", "1,2,4", "-q"]


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, two_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_out")
    assert main(["eval", str(two_images), "-o", str(out), "--model", str(tiny_model_dir), *EVAL_FLAGS]) == 0
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def test_eval_results_recomputed_from_the_written_files(evaluated, two_images, tiny_model_dir):
    from ddcm_jax.families import load_model

    model = load_model(tiny_model_dir)
    ours = json.loads((evaluated / "ddcm.json").read_text())
    assert ours["results"]["point"] == ["low_T5_px32", "high_T5_px32"]
    assert len(ours["per_image"]) == 4
    for rec in ours["per_image"]:
        source = np.asarray(Image.open(two_images / f"{rec['image']}.png").convert("RGB"))
        data = (evaluated / rec["file"]).read_bytes()
        png = np.asarray(Image.open(evaluated / rec["decoded"]).convert("RGB"))
        assert len(data) == rec["bytes"]
        assert rec["bpp"] == pytest.approx(8 * len(data) / source[..., 0].size, abs=1e-6)
        assert rec["psnr"] == pytest.approx(_psnr(source, png), abs=1e-3)
        assert 0 < rec["ms-ssim"] < 1 and rec["lpips"] > 0  # adm_tiny is barely trained: LPIPS may pass 1
        decoded, stream = codec.decode_bytes(model, data)
        assert (decoded == png).all()  # the PNG is what the file decodes to
        assert rec["bpp_payload"] == pytest.approx(stream.payload_bits / source[..., 0].size, abs=1e-6)
        assert rec["encoding_time"] > 0 and rec["decoding_time"] > 0
    for i, point in enumerate(ours["results"]["point"]):
        recs = [r for r in ours["per_image"] if r["point"] == point]
        for k in ("bpp", "psnr", "ms-ssim", "lpips"):
            assert ours["results"][k][i] == pytest.approx(np.mean([r[k] for r in recs]), abs=1e-5)
    assert ours["device"] and ours["name"].startswith("DDCM")

    by_image = {(r["point"], r["image"]): r for r in ours["per_image"]}
    for name in ("jpeg", "webp"):
        res = json.loads((evaluated / f"{name}.json").read_text())
        assert res["results"]["quality"] == list(baselines.BASELINES[name].ladder)
        for rec in res["per_image"]:
            source = np.asarray(Image.open(two_images / f"{rec['image']}.png").convert("RGB"))
            data = (evaluated / rec["file"]).read_bytes()
            png = np.asarray(Image.open(evaluated / rec["decoded"]).convert("RGB"))
            assert len(data) == rec["bytes"]
            assert rec["psnr"] == pytest.approx(_psnr(source, png), abs=1e-3)
            with Image.open(io.BytesIO(data)) as im:
                coded = np.asarray(im.convert("RGB"))
            if rec["point"].startswith("same-bytes"):
                label = rec["point"].removeprefix("same-bytes-").removesuffix("-scaled")
                assert rec["budget"] == by_image[(label, rec["image"])]["bytes"]
                assert rec["fits"] == (rec["bytes"] <= rec["budget"])
                assert coded.shape[0] == round(source.shape[0] / rec["scale"])
            else:
                assert (coded == png).all()
        for point, s in res["same_bytes"].items():
            assert s["images"] == 2 and 0 <= s["fits"] <= 2, point
            if point.endswith("-scaled"):  # the scaled search includes full size: it fits at least as often
                assert s["fits"] >= res["same_bytes"][point.removesuffix("-scaled")]["fits"]
    for plot in ("rd_psnr.png", "rd_lpips.png", "rd_ms-ssim.png", "figure.png"):
        with Image.open(evaluated / plot) as im:
            assert im.format == "PNG" and im.width > 300


def test_eval_resumes_without_re_encoding(evaluated, two_images, tiny_model_dir, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in evaluated.rglob("*.ddcm")}
    calls = []
    real = codec.encode_images
    monkeypatch.setattr(codec, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(baselines.Baseline, "encode", lambda *a, **k: calls.append(2) or pytest.fail("re-encoded"))
    report = evaluated / "second.json"
    assert main(["eval", str(two_images), "-o", str(evaluated), "--model", str(tiny_model_dir), *EVAL_FLAGS,
                 "--json", str(report)]) == 0  # fmt: skip
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in evaluated.rglob("*.ddcm")} == before
    assert json.loads(report.read_text())["reused"] == 4 + 2 * (8 + 2 * 2) * 2


def test_eval_refuses_records_of_another_input_unless_overwrite(tiny_model_dir, two_images, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes((two_images / "kodim23.png").read_bytes())
    flags = ["--quality", "low", "-T", "3", "--size", "32", "--codecs", "none", "-q"]
    out = tmp_path / "out"
    assert main(["eval", str(src), "-o", str(out), "--model", str(tiny_model_dir), *flags]) == 0
    first = (out / "ddcm" / "low_T3_px32" / "a.ddcm").read_bytes()
    (src / "a.png").write_bytes((two_images / "kodim04.png").read_bytes())  # another picture, same name
    capsys.readouterr()
    assert main(["eval", str(src), "-o", str(out), "--model", str(tiny_model_dir), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.json" in err[0] and "--overwrite" in err[0]
    assert (out / "ddcm" / "low_T3_px32" / "a.ddcm").read_bytes() == first  # nothing replaced
    assert main(["eval", str(src), "-o", str(out), "--model", str(tiny_model_dir), *flags, "--overwrite"]) == 0
    assert (out / "ddcm" / "low_T3_px32" / "a.ddcm").read_bytes() != first


def test_eval_plot_redraws_from_results_files(evaluated, tmp_path, capsys):
    published = tmp_path / "published.json"  # a curve in CompressAI's own schema, as a paper would give it
    published.write_text(json.dumps({"name": "Some codec", "results": {"bpp": [0.1, 0.2], "psnr-rgb": [24.0, 26.0]}}))
    out = tmp_path / "plots"
    assert main(["eval", "--plot", str(evaluated / "ddcm.json"), str(evaluated / "jpeg.json"), str(published),
                 "-o", str(out), "-q"]) == 0  # fmt: skip
    assert (out / "rd_psnr.png").is_file() and (out / "rd_lpips.png").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "results": {"bpp": [0.1], "psnr": [1, 2]}}))
    assert main(["eval", "--plot", str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and "psnr" in err[0]
