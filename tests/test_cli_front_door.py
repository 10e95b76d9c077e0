"""What a newcomer hits first: the help lists every command, usage errors show the command's own
usage, `ddcm convert` detects a diffusers folder, and a pipeline passed as --model says how to convert it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ddcm_jax.cli import build_parser, main


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    description = out.split("positional arguments")[0]
    for name in commands():
        assert name in description, name  # the one-line summary too, not only the list
    assert {"edit", "train"} <= set(commands())


def test_a_usage_error_prints_the_commands_usage(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(src)
    with pytest.raises(SystemExit) as e:
        main(["compress", str(src), "-o", str(tmp_path / "o"), "--seed", str(2**40)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ddcm compress") and "ddcm compress: error: --seed" in err


def test_convert_detects_a_diffusers_folder(reference, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["convert", str(reference / "sd_tiny"), "-o", str(out), "-q"]) == 0  # no --format
    assert json.loads((out / "model.json").read_text())["family"] == "sd"


def test_convert_of_a_plain_folder_says_what_it_needs(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert main(["convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "model_index.json" in err and len(err.strip().splitlines()) == 1


def test_an_unconverted_pipeline_as_model_suggests_the_command(reference, tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(src)
    code = main(["compress", str(src), "-o", str(tmp_path / "o"), "--model", str(reference / "flux_tiny"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and f"ddcm convert {reference / 'flux_tiny'} -o MODEL_DIR" in err


def test_existing_outputs_are_not_replaced_without_overwrite(tiny_model_dir, tmp_path, capsys):
    """The README's second example once replaced the first one's files silently (2,531 B became 82 B)."""
    src = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(src)
    out = tmp_path / "out"
    args = ["compress", str(src), "-o", str(out), "--model", str(tiny_model_dir), "-T", "3", "-K", "4", "--rule", "ddcm", "-q"]
    assert main(args) == 0
    before = (out / "a.ddcm").read_bytes()
    capsys.readouterr()
    assert main([*args[:-1], "-K", "8", "-q"]) == 1  # another code into the same folder: refused
    err = capsys.readouterr().err
    assert "a.ddcm exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "a.ddcm").read_bytes() == before
    assert main([*args[:-1], "-K", "8", "-q", "--overwrite"]) == 0
    assert (out / "a.ddcm").read_bytes() != before


def test_a_converted_model_is_found_without_ddcm_models(reference, tmp_path, capsys, monkeypatch):
    """`ddcm convert` lists the MODEL_DIR for decoders; a file decodes without --model or DDCM_MODELS, and
    a file whose model is unknown names the model's family and where models are listed."""
    monkeypatch.delenv("DDCM_MODELS", raising=False)
    monkeypatch.setenv("DDCM_REGISTRY", str(tmp_path / "registry" / "models.txt"))
    model = tmp_path / "adm_tiny"
    assert main(["convert", str(reference / "adm_tiny" / "model.pt"), "-o", str(model),
                 "--config", str(reference / "adm_tiny" / "config.json")]) == 0  # fmt: skip
    assert "listed in" in capsys.readouterr().out
    assert (tmp_path / "registry" / "models.txt").read_text().splitlines() == [str(model.absolute())]
    src = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (20, 90, 200)).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--model", str(model), "-T", "3", "-K", "4",
                 "--rule", "ddcm", "-q"]) == 0  # fmt: skip
    assert main(["decompress", str(tmp_path / "c" / "a.ddcm"), "-o", str(tmp_path / "d"), "-q"]) == 0
    (tmp_path / "registry" / "models.txt").write_text("")  # forgotten
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "c" / "a.ddcm"), "-o", str(tmp_path / "e"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "ADM (pixel) model sha256:" in err and "models.txt" in err


def test_a_refusal_says_where_a_value_came_from(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(src)
    with pytest.raises(SystemExit):
        main(["compress", str(src), "-o", str(tmp_path / "o"), "-K", "16"])  # M = 128 comes from -Q medium
    err = capsys.readouterr().err
    assert "--atoms was not given: 128 came from the quality level 'medium'" in err


def test_info_leads_with_bpp_over_the_input(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.new("RGB", (48, 32), (9, 99, 199)).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--model", str(tiny_model_dir), "-T", "3",
                 "-K", "4", "--rule", "ddcm", "--size", "32", "-q"]) == 0  # fmt: skip
    path = tmp_path / "c" / "a.ddcm"
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    bpp = 8 * path.stat().st_size / (48 * 32)  # the whole file over the input's pixels, as roundtrip counts
    assert first.startswith(f"{path}: {bpp:.4f} bpp over the 48x32 input")


def test_compress_says_its_operating_point_and_where_it_came_from(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.new("RGB", (48, 32), (9, 99, 199)).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--model", str(tiny_model_dir), "-Q", "low",
                 "-T", "3", "--size", "32"]) == 0  # fmt: skip
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "operating point: T 3, K 1024, M 128, 32 px (fit); unset values from the quality level 'low'"


@pytest.mark.parametrize("bpp,reach", [(0.05, "the largest point not above the target"),
                                       (40.0, "the target is out of reach")])  # fmt: skip
def test_bpp_says_what_it_chose_and_whether_the_target_is_out_of_reach(tiny_model_dir, tmp_path, capsys, bpp,
                                                                         reach):  # fmt: skip
    """`--bpp 0.05` on a latent model once gave 0.0166 bpp (M capped) without a word."""
    src = tmp_path / "a.png"
    Image.new("RGB", (48, 32), (9, 99, 199)).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "c"), "--model", str(tiny_model_dir), "-T", "3",
                 "-K", "64", "--size", "32", "--bpp", str(bpp), "--json", str(tmp_path / "s.json")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"operating point: per image, the largest payload not above --bpp {bpp:g}")
    note = next(line for line in out.splitlines() if line.startswith(f"note: {src}: --bpp"))
    rec = json.loads((tmp_path / "s.json").read_text())["items"][0]
    assert f"gives {rec['bpp']:.4f} bpp" in note and reach in note
    assert note.split(": ", 2)[2] in rec["notes"]
    if bpp > 1:  # 2 coded steps of the most atoms 64 can give: far below 40 bpp x 1,536 pixels
        assert rec["bpp"] < 0.9 * bpp


@pytest.mark.parametrize("task", ["super-resolution", "colorization", "blur", "inpainting"])
def test_a_degraded_photo_is_restored_as_the_measurement(tiny_model_dir, task):
    """`restore --measured`: the input is y itself (grey, blurred, holed, or low-resolution), not a clean photo."""
    import numpy as np

    from ddcm_jax import CodeSpec, codec, images
    from ddcm_jax.families import load_model

    model = load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    side = 8 if task == "super-resolution" else 32
    photo = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    if task == "colorization":
        photo = np.repeat(photo[..., :1], 3, axis=2)  # a grey photo: its own measurement
    spec = CodeSpec.create(steps=3, codebook_size=8, rule="turbo", num_atoms=2)
    enc = codec.encode_images(model, [photo], spec, task=task, measured=True, size_policy="pad", blur_kernel=5,
                              blur_sigma=1.0)[0]  # fmt: skip
    assert enc.reference is None and enc.consistency_db is not None
    out_side = 4 * side if task == "super-resolution" else side
    assert enc.decoded.shape == (out_side, out_side, 3)
    y_view = enc.degraded
    if task == "inpainting":  # the default hole (the centre half of each side) is dropped, the rest is y
        keep = np.ones((side, side), bool)
        keep[side // 4 : side - side // 4, side // 4 : side - side // 4] = False
        assert (y_view[keep] == photo[keep]).all() and (y_view[~keep] == images.from_model(np.zeros(3))).all()
    else:  # exactly the given photo: pooled back from its enlargement, its own grey, not blurred again
        assert (y_view == photo).all()
    decoded, _ = codec.decode_bytes(model, enc.data)
    assert (decoded == enc.decoded).all()


def test_restore_measured_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    import numpy as np

    src = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "r"
    assert main(["restore", str(src), "--task", "super-resolution", "--measured", "-o", str(out), "--model",
                 str(tiny_model_dir), "-T", "3", "-K", "8", "-M", "2", "--pad"]) == 0  # fmt: skip
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(str(src)))
    assert "consistency with the measured input" in line
    with Image.open(out / "small.png") as im:
        assert im.size == (48, 32)
    assert sorted(p.name for p in out.iterdir()) == ["small.ddcm", "small.png"]  # no _degraded.png: that is the input
