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
