"""Issue 28, loader side: hostile and careless inputs, round 3.

Each test builds its hostile input itself, in tmp_path. Findings (numbers of the issue):
5 memory far beyond the file's size (a pickle copying one memoised dict again and again,
pickles flooding small containers, a safetensors header flooding metadata, a huge
merges.txt or vocab.json), 8 a JSON reader's refusal that does not name its file; and
fuzzers over the diffusers pipeline readers (model_index.json, component configs,
tokenizer files, shard indexes, safetensors headers): each mutation is a clean refusal
of the module's error class or a valid result, with bounded memory.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ddcm_jax.convert import CheckpointError, PipelineError, checkpoint, read_state_dict
from ddcm_jax.convert import diffusers as D
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_hostile_convert import (
    _json_values,
    mutate,
    safetensors_bytes,
    small_safetensors,
    write_pt,
)

from ddcm_jax.printable import printable
from ddcm_jax.tokenizer import CLIPTokenizer, TokenizerError

MiB = 1 << 20


def bounded(call: Callable[[], object], path: Path, error: type, match: str, limit: int) -> str:
    """call() raises exactly `error`, one printable line naming `path` and matching `match`,
    within `limit` bytes of traced memory and 2 s."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(error, match=match) as info:
            call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    secs = time.perf_counter() - t0
    msg = str(info.value)
    assert type(info.value) is error, msg
    assert len(msg.splitlines()) == 1 and msg.isprintable() and printable(path) in msg, msg
    assert peak <= limit, f"peak {peak:,} bytes (limit {limit:,})"
    assert secs < 2, f"{secs:.1f} s"
    return msg


@pytest.fixture
def pipeline(tmp_path, reference) -> Path:
    """A writable copy of sd_tiny's JSON and tokenizer files (no weights)."""
    src = reference / "sd_tiny"
    dst = tmp_path / "sd"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "io.*"))
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module")
def text_config(reference):
    return D.read_pipeline_configs(reference / "sd_tiny").text_encoder


# --- finding 5: pickles that make far more objects than bytes ------------------------------------


def od_copies(entries: int, copies: int) -> bytes:
    """`collections.OrderedDict(d)` called `copies` times on one memoised dict d of `entries` keys."""
    d = b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(entries))
    head = b"\x80\x02ccollections\nOrderedDict\nq\x00}q\x01(" + d + b"u("
    return head + b"h\x00h\x01\x85R" * copies + b"l."


@pytest.mark.parametrize("where", ["pt", "bin in a pipeline"])
def test_ordered_dict_copies_of_one_memoised_dict_are_bounded(tmp_path, where):
    """26 KB: 4000 entries copied 400 times took 137 MB, 7.6 s (42 KB: 1.2 GB, 60 s: the square of the file)."""
    if where == "pt":
        path = write_pt(tmp_path / "od.pt", od_copies(4000, 400), {})
        call = lambda: read_state_dict(path)  # noqa: E731
    else:
        (tmp_path / "unet").mkdir()
        path = write_pt(tmp_path / "unet" / "diffusion_pytorch_model.bin", od_copies(4000, 400), {})
        call = lambda: D.open_weights(tmp_path / "unet", "unet")  # noqa: E731
    bounded(call, path, CheckpointError, "OrderedDict copies would need", 16 * MiB)


FLOODS = {
    "empty dicts": b"}",
    "one-item dicts": b"}K\x00Ns",
    "empty lists": b"]",
    "one-tuples": b"N\x85",
    "short strings": b"\x8c\x02ab",
}


@pytest.mark.parametrize("case", sorted(FLOODS))
def test_pickle_floods_are_refused_before_unpickling(tmp_path, case, monkeypatch):
    """128 KB of empty dicts took 11 MB (8 MB: 681 MB, 30 s): a pickle's objects are estimated first.
    (A smaller slack than the 4 MiB refuses the flood after fewer opcodes, for speed.)"""
    monkeypatch.setattr(checkpoint, "_PARSE_SLACK", 256 << 10, raising=False)
    op = FLOODS[case]
    path = write_pt(tmp_path / "flood.pt", b"\x80\x02(" + op * ((1 << 17) // len(op)) + b"l.", {})
    bounded(
        lambda: read_state_dict(path),
        path,
        CheckpointError,
        "the pickle's objects would need",
        4 * MiB,
    )


def test_memo_indices_must_follow_the_puts(tmp_path):
    path = write_pt(tmp_path / "memo.pt", b"\x80\x02Nq\x00Nq\x05h\x05.", {})
    bounded(
        lambda: read_state_dict(path), path, CheckpointError, "memo index 5 out of range", 8 * MiB
    )


# --- finding 5: safetensors headers flooding metadata -------------------------------------------


def metadata_flood(entries: int) -> bytes:
    """Valid tensors and `entries` metadata strings: read without complaint before (exit 0)."""
    meta = ",".join(f'"{i:x}":""' for i in range(entries))
    text = (
        '{"__metadata__":{' + meta + '},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    ).encode()
    return len(text).to_bytes(8, "little") + text + bytes(4)


SAFETENSORS_CASES = {
    "metadata flood": (lambda: metadata_flood(200_000), "holds up to 400,0[0-9][0-9] JSON values"),
    "metadata not strings": (lambda: safetensors_bytes({"__metadata__": {"a": [{}, {}]}}, b""),
                             "__metadata__ must map names to strings"),
    "metadata a list": (lambda: safetensors_bytes({"__metadata__": ["x"]}, b""), "__metadata__ must map"),
}  # fmt: skip


@pytest.mark.parametrize("reader", ["checkpoint", "pipeline"])
@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_safetensors_metadata_is_bounded_and_strings(tmp_path, reader, case):
    """2.1 MB of metadata took 47 MB and was accepted (16.9 MB: 365 MB)."""
    build, match = SAFETENSORS_CASES[case]
    if reader == "checkpoint":
        path = tmp_path / "m.safetensors"
        error, call = CheckpointError, lambda: read_state_dict(path)
    else:
        (tmp_path / "unet").mkdir()
        path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
        error, call = PipelineError, lambda: D.open_weights(tmp_path / "unet", "unet")
    path.write_bytes(build())
    bounded(call, path, error, match, 2 * path.stat().st_size + 4 * MiB)


# --- finding 5: tokenizer files -----------------------------------------------------------------


def _tokenizer_refused(
    folder: Path, name: str, match: str, text_config, limit: int = 64 * MiB
) -> None:
    """Refused by CLIPTokenizer.from_folder and by the pipeline reader, naming the file."""
    bounded(lambda: CLIPTokenizer.from_folder(folder), folder / name, TokenizerError, match, limit)
    bounded(
        lambda: D._read_tokenizer(folder, text_config), folder / name, PipelineError, match, limit
    )


def test_merges_txt_is_bounded(pipeline, text_config):
    """4.5 MB of merges took 145 MB, 7.9 s (16 MB: 517 MB, 26 s), 140,000 short lines 18 MB: both accepted."""
    folder = pipeline / "tokenizer"
    (folder / "merges.txt").write_text("#version: 0.2\n" + "p h\n" * 1_125_000)
    _tokenizer_refused(
        folder, "merges.txt", "4,500,014 characters, more than the 4,194,304", text_config
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "p h\n" * 140_000)
    _tokenizer_refused(
        folder, "merges.txt", "140,001 lines, more than the 131,072 merges", text_config
    )


def test_vocab_json_flood_is_refused_before_parsing(pipeline, text_config):
    """6 MB of empty objects took 151 MB before a refusal."""
    folder = pipeline / "tokenizer"
    (folder / "vocab.json").write_text('{"a": [' + ",".join(["{}"] * 2_000_000) + "]}")
    _tokenizer_refused(folder, "vocab.json", "up to 4,000,003 JSON values", text_config)


# --- finding 8: JSON refusals name their file ----------------------------------------------------

PIPELINE_JSON = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
                 "tokenizer/special_tokens_map.json", "unet/diffusion_pytorch_model.safetensors.index.json"]  # fmt: skip
BAD_JSON = {
    "5000-digit integer": ('{"a": 1' + "0" * 5000 + "}", "an integer of 5,001 digits"),
    "nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


def _read(pipeline: Path, name: str, text_config) -> object:
    if name.startswith("tokenizer/"):
        return D._read_tokenizer(pipeline / "tokenizer", text_config)
    if name.endswith(".index.json"):
        return D.open_weights(pipeline / "unet", "unet")
    return D.read_pipeline_configs(pipeline)


@pytest.mark.parametrize("bad", sorted(BAD_JSON))
@pytest.mark.parametrize("name", PIPELINE_JSON)
def test_json_refusals_name_the_file(pipeline, text_config, name, bad):
    """A 5000-digit vocab.json id said 'Exceeds the limit (4300 digits) ... sys.set_int_max_str_digits'
    without naming the file (a plain ValueError); the configs said it naming the file."""
    text, match = BAD_JSON[bad]
    (pipeline / name).write_text(text)
    msg = bounded(
        lambda: _read(pipeline, name, text_config), pipeline / name, PipelineError, match, 64 * MiB
    )
    assert "set_int_max_str_digits" not in msg
    if name.startswith("tokenizer/"):
        bounded(lambda: CLIPTokenizer.from_folder(pipeline / "tokenizer"), pipeline / name, TokenizerError,
                match, 64 * MiB)  # fmt: skip


def test_shard_index_flood_is_refused_before_parsing(pipeline):
    """A 10 MB index of 400,000 keys took 132 MB before it was found to name a missing shard."""
    path = pipeline / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = ",".join(f'"k{i}":"s.safetensors"' for i in range(400_000))
    path.write_text('{"weight_map":{' + weight_map + "}}")
    bounded(lambda: D.open_weights(pipeline / "unet", "unet"), path, PipelineError,
            "up to 800,0[0-9][0-9] JSON values", 3 * path.stat().st_size + 4 * MiB)  # fmt: skip


# --- fuzzing the pipeline readers ---------------------------------------------------------------

# 100 fixed examples per fuzzer in the suite (1-2 s each); DDCM_FUZZ_EXAMPLES=N runs N fresh ones.
_FUZZ_N = os.environ.get("DDCM_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_FUZZ_N or 100), deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=_FUZZ_N is None, database=None)  # fmt: skip
_BASE_MAXRSS: list[int] = []


def _rss_guard() -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if not _BASE_MAXRSS:
        _BASE_MAXRSS.append(rss)
    assert rss - _BASE_MAXRSS[0] < 512 * 1024, "fuzzing grew the peak memory by more than 512 MiB"


def _clean(e: Exception, error: type | tuple[type, ...]) -> None:
    msg = str(e)
    assert type(e) in (error if isinstance(error, tuple) else (error,)), (
        f"{type(e).__name__}: {msg}"
    )
    assert len(msg.splitlines()) == 1 and msg.isprintable() and "internal error" not in msg, msg
    event("refused")


def _edit_json(data: st.DataObject, raw: bytes) -> bytes:
    """Byte damage, or one to three keys of the object set to random JSON values."""
    if data.draw(st.booleans()):
        return mutate(data, raw)
    obj = json.loads(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(obj)) | st.text(max_size=5)) if obj else "x"
        obj[key] = data.draw(_json_values())
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def fuzz_pipeline(tmp_path_factory, reference) -> Path:
    dst = tmp_path_factory.mktemp("fuzz") / "sd"
    shutil.copytree(
        reference / "sd_tiny", dst, ignore=shutil.ignore_patterns("*.safetensors", "io.*")
    )
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


class _Damaged:
    """Write damaged bytes over a file for one example, then restore it."""

    def __init__(self, path: Path, raw: bytes) -> None:
        self.path, self.raw, self.saved = path, raw, path.read_bytes()

    def __enter__(self) -> Path:
        self.path.write_bytes(self.raw)
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.write_bytes(self.saved)


CONFIG_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json"]  # fmt: skip


@FUZZ
@given(data=st.data())
def test_fuzz_pipeline_configs(fuzz_pipeline, data):
    """model_index.json and the component configs: a clean PipelineError, or validated configs."""
    path = fuzz_pipeline / data.draw(st.sampled_from(CONFIG_FILES))
    with _Damaged(path, _edit_json(data, path.read_bytes())):
        try:
            configs = D.read_pipeline_configs(fuzz_pipeline)
        except Exception as e:
            _clean(e, PipelineError)
        else:
            event("valid")
            assert (
                configs.text_encoder.vocab_size > 0
                and configs.unet is not None
                and configs.vae is not None
            )
    _rss_guard()


TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer_files(fuzz_pipeline, text_config, data):
    """vocab.json, merges.txt and the token configs: a clean refusal, or a tokenizer that encodes."""
    name = data.draw(st.sampled_from(TOKENIZER_FILES))
    path = fuzz_pipeline / "tokenizer" / name
    raw = path.read_bytes()
    with _Damaged(path, mutate(data, raw) if name == "merges.txt" else _edit_json(data, raw)):
        try:
            tok, files = D._read_tokenizer(fuzz_pipeline / "tokenizer", text_config)
        except Exception as e:
            _clean(e, PipelineError)
        else:
            event("valid")
            assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(files)
            ids = tok(["a photo of a cat!", ""])
            assert ids.shape == (2, tok.model_max_length) and ids.dtype == np.int32
            assert 0 <= ids.min() and ids.max() < text_config.vocab_size
    _rss_guard()


def _shard(keys: dict[str, int]) -> bytes:
    header, offset = {}, 0
    for key, n in keys.items():
        header[key] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    return safetensors_bytes(header, bytes(offset))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "unet"
    folder.mkdir()
    (folder / "s-1.safetensors").write_bytes(_shard({"a": 2, "b": 3}))
    (folder / "s-2.safetensors").write_bytes(_shard({"c": 1}))
    index = {"metadata": {"total_size": 24},
             "weight_map": {"a": "s-1.safetensors", "b": "s-1.safetensors", "c": "s-2.safetensors"}}  # fmt: skip
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@FUZZ
@given(data=st.data())
def test_fuzz_shard_index(sharded, data):
    """A damaged `*.safetensors.index.json`: a clean refusal, or the three tensors of its shards."""
    path = sharded / "diffusion_pytorch_model.safetensors.index.json"
    raw = path.read_bytes()
    if data.draw(st.booleans()):
        index = json.loads(raw)
        key = data.draw(st.sampled_from(["a", "c", "d", ""]))
        index["weight_map"][key] = data.draw(
            st.sampled_from(["s-1.safetensors", "s-2.safetensors", "s-3.safetensors", "../s-1.safetensors",
                             "s-1.bin", "", None, 1]))  # fmt: skip
        raw = json.dumps(index).encode()
    else:
        raw = _edit_json(data, raw)
    with _Damaged(path, raw):
        try:
            source = D.open_weights(sharded, "unet")
        except Exception as e:
            _clean(e, (PipelineError, CheckpointError))
        else:
            event("valid")
            try:
                assert source.shapes == {
                    "a": ((2,), np.float32),
                    "b": ((3,), np.float32),
                    "c": ((1,), np.float32),
                }
                assert [source.read(k).shape for k in source.order(["a", "b", "c"])] == [
                    (2,),
                    (3,),
                    (1,),
                ]
            finally:
                source.close()
    _rss_guard()


@FUZZ
@given(data=st.data())
def test_fuzz_pipeline_safetensors_header(fuzz_dir_st, data):
    """The pipeline's own safetensors reader (tensors read on demand): a clean refusal, or entries
    whose bytes lie inside the file."""
    path = fuzz_dir_st / "f.safetensors"
    path.write_bytes(mutate(data, small_safetensors()))
    try:
        st_file = D._SafetensorsFile(path)
    except Exception as e:
        _clean(e, PipelineError)
    else:
        event("valid")
        try:
            for name, (dtype, shape, begin, end) in st_file.entries.items():
                assert 0 <= begin <= end <= path.stat().st_size
                array = st_file.read(name)
                assert array.shape == shape and array.dtype == dtype and array.nbytes == end - begin
        finally:
            st_file.close()
    _rss_guard()


@pytest.fixture(scope="module")
def fuzz_dir_st(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_st")
