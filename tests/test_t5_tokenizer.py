"""The T5 tokenizer (FLUX tokenizer_2): reference ids and pieces, transformers parity, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ddcm_jax.t5_tokenizer as t5_tokenizer_module
from ddcm_jax.t5_tokenizer import T5Tokenizer, T5TokenizerError

TRICKY_PROMPTS = [
    "",
    "a photo of a cat",
    "A  Photo of the cat, 2x!",
    "  leading and trailing spaces  ",
    "tabs\t\tand\r\nnewlines\u3000ideographic\u00a0nbsp",
    "a </s> inside, <pad> and <unk> and <extra_id_0><extra_id_3> sentinels, <extra_id_9> not one",
    "café naïve 中文 🐱 emoji",
    "photos cats the of",
    "photo of the cat " * 200,  # far longer than 512 pieces: truncated, </s> kept
    "x" * 600,
]


@pytest.fixture(scope="module")
def flux_tiny(reference: Path) -> dict:
    folder = reference / "flux_tiny"
    return {
        "folder": folder / "tokenizer_2",
        "io": dict(np.load(folder / "io.npz")),
        "json": json.loads((folder / "io.json").read_text()),
        "tok": T5Tokenizer.from_folder(folder / "tokenizer_2"),
    }


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_reference_ids_and_pieces(flux_tiny):
    tok, io, meta = flux_tiny["tok"], flux_tiny["io"], flux_tiny["json"]
    prompts = meta["prompts"]
    assert prompts == ["", "a photo of a cat", "A  Photo of the cat, 2x!"]
    ids = tok(prompts)
    assert ids.dtype == np.int64 and ids.shape == (3, 512)
    np.testing.assert_array_equal(ids, io["t5_input_ids"])
    assert (tok.model_max_length, tok.pad_id, tok.eos_id) == (512, 0, 1)
    for prompt in prompts:
        assert tok.pieces(prompt) == meta["t5_pieces"][prompt]


def test_basics_and_truncation(flux_tiny):
    tok = flux_tiny["tok"]
    np.testing.assert_array_equal(tok("a photo of a cat"), tok(["a photo of a cat"]))
    long = tok(["photo " * 600])[0]
    assert (long[:511] == 7).all() and long[511] == 1  # "▁photo" x 511, then </s>
    assert tok.pieces("x" * 600)[-1] == "</s>" and len(tok.pieces("x" * 600)) == 512
    assert tok([]).shape == (0, 512)
    with pytest.raises(TypeError):
        tok([b"bytes"])
    with pytest.raises(ValueError, match="Unicode"):
        tok(["\ud800"])


def _hf_ids(hf, prompts: list[str]) -> np.ndarray:
    enc = hf(prompts, padding="max_length", truncation=True, max_length=512)
    return np.asarray(enc["input_ids"])


def test_matches_transformers(flux_tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(flux_tiny["folder"])
    ours = flux_tiny["tok"](TRICKY_PROMPTS)
    np.testing.assert_array_equal(ours, _hf_ids(hf, TRICKY_PROMPTS))
    assert ours[-2, -1] == 1 and ours[-1, -1] == 1  # the long prompts end in </s>

    # from_pretrained rebuilds the pipeline from the vocabulary: a normaliser other than
    # Precompiled in tokenizer.json is dropped, and without tokenizer_config.json it adds
    # 100 sentinels (new ids here) and keeps the default special tokens. (Constructed as
    # `T5TokenizerFast(tokenizer_file=...)` instead, transformers 5 runs the file's own
    # pipeline: it would lowercase here. diffusers loads through from_pretrained.)
    folder = tmp_path / "tok"
    folder.mkdir()
    data = json.loads((flux_tiny["folder"] / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = T5Tokenizer.from_folder(folder)
    hf = transformers.T5TokenizerFast.from_pretrained(folder)  # what diffusers calls
    prompts = [*TRICKY_PROMPTS, "<extra_id_42> and <extra_id_99>"]
    np.testing.assert_array_equal(ours(prompts), _hf_ids(hf, prompts))


def _copy(reference_folder: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(reference_folder, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_bad_files_are_refused(flux_tiny, tmp_path, monkeypatch):
    def model_type(kind):
        def edit(d):
            d["model"] = {"type": kind, "vocab": {"a": 0}, "merges": []}

        return edit

    cases = [
        ("tokenizer.json", lambda p: p.write_text('{"model": {'), "not valid JSON"),
        ("tokenizer.json", lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
        ("tokenizer.json", lambda p: p.write_text("[1, 2]"), "not a tokenizers file"),
        ("tokenizer.json", lambda p: _edit_json(p, model_type("BPE")), "BPE"),
        ("tokenizer.json", lambda p: _edit_json(p, model_type("WordPiece")), "'WordPiece'"),
        ("tokenizer.json", lambda p: p.unlink(), "tokenizer.json: missing"),
        (
            "tokenizer.json",
            lambda p: _edit_json(p, lambda d: d["model"]["vocab"].__setitem__(5, ["x"])),
            "model.vocab[5]",
        ),
        (
            "tokenizer.json",
            lambda p: _edit_json(p, lambda d: d["model"].__setitem__("unk_id", 3)),
            "unk_id",
        ),
        (
            "tokenizer.json",
            lambda p: _edit_json(p, lambda d: d["added_tokens"][1].__setitem__("id", 7)),
            "'</s>' has id 7",
        ),
        ("tokenizer_config.json", lambda p: p.write_text("{"), "tokenizer_config.json: not valid"),
        (
            "tokenizer_config.json",
            lambda p: _edit_json(p, lambda d: d.__setitem__("do_lower_case", True)),
            "do_lower_case",
        ),
        (
            "tokenizer_config.json",
            lambda p: _edit_json(p, lambda d: d.__setitem__("padding_side", "left")),
            "padding_side",
        ),
        (
            "tokenizer_config.json",
            lambda p: _edit_json(p, lambda d: d.__setitem__("model_max_length", 1 << 40)),
            "model_max_length",
        ),
        (
            "tokenizer_config.json",
            lambda p: _edit_json(p, lambda d: d.__setitem__("tokenizer_class", "CLIPTokenizer")),
            "tokenizer_class",
        ),
        (
            "tokenizer_config.json",
            lambda p: _edit_json(p, lambda d: d.__setitem__("unk_token", "<pad>")),
            "unk_token",
        ),
    ]
    for i, (name, edit, named) in enumerate(cases):
        folder = _copy(flux_tiny["folder"], tmp_path, f"case{i}")
        edit(folder / name)
        with pytest.raises(T5TokenizerError) as excinfo:
            T5Tokenizer.from_folder(folder)
        message = one_line(excinfo)
        assert named in message and name in message, (named, message)

    # bounded reads: the file is named, before anything is parsed
    monkeypatch.setattr(t5_tokenizer_module, "MAX_FILE_BYTES", 4096)  # tokenizer.json: 7.7 kB
    with pytest.raises(T5TokenizerError) as excinfo:
        T5Tokenizer.from_folder(flux_tiny["folder"])
    assert "tokenizer.json" in one_line(excinfo) and "4096 allowed" in one_line(excinfo)
    with pytest.raises(T5TokenizerError, match=r"where/tokenizer.json: 5000 bytes"):
        T5Tokenizer.from_bytes(b" " * 5000, None, "where")
