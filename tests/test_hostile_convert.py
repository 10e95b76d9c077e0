"""Hostile and careless inputs to the converter and to model folders (issue 15).

Every hostile file is built here, in tmp_path. Each refusal must be one line
naming the file and the reason (exit 1 through the CLI, the module's error class
through the library), with no traceback, nothing written, bounded memory and time.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import resource
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ddcm_jax.convert import CheckpointError, read_state_dict
from headers import make_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddcm_jax
import ddcm_jax.model as model_mod
import ddcm_jax.models.adm as adm
from ddcm_jax.cli import main as cli_main
from ddcm_jax.model import ModelDirError
from ddcm_jax.printable import printable

# --- building hostile files ---------------------------------------------------------------------


def _int_op(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _str_op(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def tensor_pickle(tensors: dict[str, tuple]) -> bytes:
    """Protocol-2 pickle of a torch state dict, as `torch.save` writes it.

    `tensors`: key -> (storage key, storage type, storage numel, offset, size, stride).
    """
    out = b"\x80\x02ccollections\nOrderedDict\n)R("
    for key, (skey, stype, numel, offset, size, stride) in tensors.items():
        out += _str_op(key) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + _str_op("storage") + f"ctorch\n{stype}\n".encode() + _str_op(skey) + _str_op("cpu")
        out += _int_op(numel) + b"tQ" + _int_op(offset)
        out += b"(" + b"".join(map(_int_op, size)) + b"t(" + b"".join(map(_int_op, stride)) + b"t"
        out += b"\x89ccollections\nOrderedDict\n)RtR"
    return out + b"u."


def write_pt(path: Path, pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def small_pt(path: Path) -> Path:
    """A valid three-tensor checkpoint; `t` is a transposed view sharing `w`'s storage."""
    tensors = {
        "w": ("0", "FloatStorage", 6, 0, (2, 3), (3, 1)),
        "b": ("1", "HalfStorage", 3, 0, (3,), (1,)),
        "t": ("0", "FloatStorage", 6, 0, (3, 2), (1, 3)),
    }
    storages = {"0": np.arange(6, dtype="<f4").tobytes(), "1": np.arange(3, dtype="<f2").tobytes()}
    return write_pt(path, tensor_pickle(tensors), storages)


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def small_safetensors() -> bytes:
    body = np.arange(6, dtype="<f4").tobytes() + np.arange(3, dtype="<i2").tobytes()
    return safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "b": {"dtype": "I16", "shape": [3], "data_offsets": [24, 30]},
         "__metadata__": {"format": "pt"}}, body)  # fmt: skip


def npy_header(descr: str, shape: tuple, fortran: bool = False) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    text += " " * (63 - (len(text) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def stream_member(z: zipfile.ZipFile, name: str, head: bytes, zeros: int, compress: int) -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = compress
    chunk = bytes(1 << 20)
    with z.open(info, "w") as w:
        w.write(head)
        for start in range(0, zeros, len(chunk)):
            w.write(chunk[: min(len(chunk), zeros - start)])


def lie_about_size(path: Path, name: str, claimed: int) -> None:
    """Rewrite a zip member's uncompressed size in its local and central headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    struct.pack_into("<I", data, info.header_offset + 22, claimed)  # local file header
    pos = struct.unpack_from("<I", data, data.rfind(b"PK\x05\x06") + 16)[0]  # central directory
    while data[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46 : pos + 46 + n] == name.encode():
            struct.pack_into("<I", data, pos + 24, claimed)
        pos += 46 + n + m + k
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo(name).file_size == claimed


# --- checking refusals --------------------------------------------------------------------------


def refused(path: Path, match: str, *, factor: int = 8) -> str:
    """read_state_dict refuses `path` with one line naming it; memory and time stay small."""
    size = path.stat().st_size
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=match) as info:
            read_state_dict(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 10
    assert peak <= factor * size + (4 << 20), f"peak {peak:,} bytes for a {size:,}-byte file"
    assert type(info.value) is CheckpointError
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and msg.isprintable() and printable(path) in msg, msg
    return msg


def one_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def convert_refused(capsys, ckpt: Path, out: Path, *extra: str, needles: tuple[str, ...] = ()) -> str:
    """`ddcm convert` exits 1 with one line on stderr, writes nothing, leaves no stray folder."""
    parent = out.parent if out.parent.is_dir() else None
    before = sorted(os.listdir(parent)) if parent else None
    t0 = time.perf_counter()
    code = cli_main(["convert", str(ckpt), "-o", str(out), *extra])
    secs = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert code == 1, captured
    assert captured.out == ""
    line = one_line(captured.err, "ddcm convert:", *needles)
    assert secs < 20
    if parent:
        assert sorted(os.listdir(parent)) == before  # no MODEL_DIR, no staging folder
    return line


def run_py(code: str, *args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


@pytest.fixture(scope="module")
def tiny(reference):
    return {"pt": reference / "adm_tiny" / "model.pt", "config": reference / "adm_tiny" / "config.json"}


# --- finding 4: allocations beyond what the file holds ------------------------------------------


def test_zero_stride_view_over_one_float_is_refused(tmp_path, capsys, tiny):
    """644 bytes: one float viewed as (22000, 22000) with stride (0, 0) took 2.1 GB."""
    path = write_pt(tmp_path / "broadcast.pt", tensor_pickle({"w": ("0", "FloatStorage", 1, 0, (22000, 22000), (0, 0))}),
                    {"0": np.float32(1).tobytes()})  # fmt: skip
    assert path.stat().st_size < 1000
    refused(path, r"repeats the 1 elements of its storage \(zero or overlapping strides\)")
    convert_refused(capsys, path, tmp_path / "out" / "m", "--config", str(tiny["config"]),
                    needles=(str(path), "repeats"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_overlapping_views_and_shared_storages_are_bounded(tmp_path):
    base = ("0", "FloatStorage", 8, 0, (8,), (1,))
    ok = write_pt(tmp_path / "ok.pt", tensor_pickle({"a": base, "b": ("0", "FloatStorage", 8, 2, (2, 3), (3, 1)),
                                                     "c": ("0", "FloatStorage", 8, 0, (4, 2), (1, 4))}),
                  {"0": np.arange(8, dtype="<f4").tobytes()})  # fmt: skip
    got = read_state_dict(ok)
    np.testing.assert_array_equal(got["b"], np.arange(2, 8, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(got["c"], np.arange(8, dtype=np.float32).reshape(2, 4).T)
    # Overlapping strides: 8 elements viewed as 7 x 2 (stride 1, 1) reads 14 > 8 elements.
    lap = write_pt(tmp_path / "lap.pt", tensor_pickle({"a": ("0", "FloatStorage", 8, 0, (7, 2), (1, 1))}),
                   {"0": bytes(32)})  # fmt: skip
    refused(lap, "repeats")
    # Many tensors over one storage: each fits it, together they exceed what the file holds.
    n = 1 << 16
    many = {f"k{i}": ("0", "FloatStorage", n, 0, (n,), (1,)) for i in range(400)}
    path = write_pt(tmp_path / "many.pt", tensor_pickle(many), {"0": bytes(4 * n)})
    refused(path, "more than a .*-byte file can hold")


def test_deflated_pickle_bomb_is_refused(tmp_path, capsys, tiny):
    """A small .pt whose data.pkl deflates to hundreds of MB (3.2 GB in the report)."""
    path = tmp_path / "bomb.pt"
    real = 256 << 20
    with zipfile.ZipFile(path, "w") as z:
        stream_member(z, "archive/data.pkl", b"", real, zipfile.ZIP_DEFLATED)
        z.writestr("archive/byteorder", "little")
    assert path.stat().st_size < 1 << 20
    refused(path, r"data\.pkl would unpack to 268,435,456 bytes, more than the")
    convert_refused(capsys, path, tmp_path / "m", "--config", str(tiny["config"]), needles=(str(path), "unpack"))
    # The header may lie: claim 1000 bytes; the reader must still stop and refuse.
    lie_about_size(path, "archive/data.pkl", 1000)
    refused(path, r"data\.pkl")


def test_npz_members_are_capped_and_checked_against_their_header(tmp_path):
    real = 64 << 20
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as z:
        stream_member(z, "w.npy", npy_header("<f4", (real // 4,)), real, zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    refused(bomb, r"w\.npy would unpack to")
    lie_about_size(bomb, "w.npy", 200)
    refused(bomb, r"w\.npy")
    # A stored member whose header claims (22000, 22000) over 16 bytes of data.
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as z:
        z.writestr("w.npy", npy_header("<f4", (22000, 22000)) + bytes(16))
    refused(liar, r"w\.npy holds 16 bytes of data, its header says 1936000000")
    pickled = tmp_path / "obj.npz"
    with zipfile.ZipFile(pickled, "w") as z:
        z.writestr("w.npy", npy_header("|O", (1,)) + b"\x80\x02N.")
    refused(pickled, "refused dtype")


def test_safetensors_extent_checks(tmp_path):
    # Overlapping entries: a 64 KiB body read a thousand times over.
    body = bytes(1 << 16)
    header = {f"k{i}": {"dtype": "F32", "shape": [1 << 14], "data_offsets": [0, 1 << 16]} for i in range(1000)}
    path = tmp_path / "lap.safetensors"
    path.write_bytes(safetensors_bytes(header, body))
    refused(path, "overlap")
    # A shape whose product overflows int64 (np.prod wrapped it to 0 and matched 0 bytes).
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b""))
    refused(path, "wrong byte length|malformed shape")
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)))
    refused(path, "outside the file")
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    refused(path, "header length")
    path.write_bytes(safetensors_bytes({"w": {"w": {"w": {"w": 1}}}}, b""))
    refused(path, "malformed safetensors entry")


# --- finding 9: tracebacks from ddcm convert -----------------------------------------------------


def test_cli_safetensors_float_shape(tmp_path, capsys, tiny):
    path = tmp_path / "inf.safetensors"
    text = b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}'
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(4))
    convert_refused(capsys, path, tmp_path / "m", "--config", str(tiny["config"]), needles=(str(path), "shape"))


def test_cli_deeply_nested_pickle(tmp_path, capsys, tiny):
    depth = 5000
    pkl = b"\x80\x02" + (b"}(" + _str_op("model")) * depth + b"}" + b"u" * depth + b"."
    path = write_pt(tmp_path / "deep.pt", pkl, {})
    refused(path, "nested more than")
    convert_refused(capsys, path, tmp_path / "m", "--config", str(tiny["config"]), needles=(str(path), "nested"))


BAD_CONFIGS = {
    "channel_mult_1e308": ({"channel_mult": [1e308, 1]}, "channel_mult"),
    "num_heads_0": ({"num_heads": 0}, "num_heads 0"),
    "attention_resolutions_0": ({"attention_resolutions": "0"}, "attention_resolutions 0"),
    "num_channels_negative": ({"num_channels": -32}, "num_channels -32"),
    "image_size_huge": ({"image_size": 1000000}, "image_size 1000000"),
    "num_res_blocks_1000": ({"num_res_blocks": [1000, 1000]}, "num_res_blocks 1000"),
    "image_size_float": ({"image_size": 32.0}, "image_size must be an integer"),
    "image_size_string": ({"image_size": "32"}, "image_size must be an integer"),
    "learn_sigma_string": ({"learn_sigma": "yes"}, "learn_sigma must be true or false"),
    "dropout_inf": ({"dropout": 1e400}, "dropout"),
    "too_many_parameters": ({"num_channels": 4096, "channel_mult": [1] * 8, "num_res_blocks": 16,
                             "image_size": 256}, "parameters"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_cli_bad_configs(tmp_path, capsys, tiny, case):
    edit, needle = BAD_CONFIGS[case]
    config = {**json.loads(tiny["config"].read_text()), **edit}
    path = tmp_path / "bad config.json"
    path.write_text(json.dumps(config).replace("Infinity", "1e400"))
    line = convert_refused(capsys, tiny["pt"], tmp_path / "m", "--config", str(path), needles=(needle,))
    assert str(path) in line


def test_cli_config_nan_and_nesting(tmp_path, capsys, tiny):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**json.loads(tiny["config"].read_text()), "image_size": float("nan")}))
    convert_refused(capsys, tiny["pt"], tmp_path / "m", "--config", str(path), needles=(str(path), "NaN"))
    path.write_text("[" * 100_000 + "]" * 100_000)
    convert_refused(capsys, tiny["pt"], tmp_path / "m", "--config", str(path), needles=(str(path),))


def test_cli_output_below_a_regular_file(tmp_path, capsys, tiny):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me")
    convert_refused(capsys, tiny["pt"], blocker / "sub" / "m", "--config", str(tiny["config"]),
                    needles=("somefile",))  # fmt: skip
    assert blocker.read_text() == "keep me" and os.listdir(tmp_path) == ["somefile"]


def test_cli_overwrite_never_replaces_a_file_or_a_foreign_folder(tmp_path, capsys, tiny):
    target = tmp_path / "existing"
    target.write_text("keep me")
    convert_refused(capsys, tiny["pt"], target, "--config", str(tiny["config"]), "--overwrite",
                    needles=("not a directory",))  # fmt: skip
    assert target.read_text() == "keep me"
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_text("x")
    convert_refused(capsys, tiny["pt"], folder, "--config", str(tiny["config"]), "--overwrite",
                    needles=("not a model directory",))  # fmt: skip
    assert os.listdir(folder) == ["a.jpg"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_cli_unwritable_output(tmp_path, capsys, tiny, monkeypatch, code):
    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    out = tmp_path / "m" if code == errno.ENOSPC else tmp_path / "new" / "m"
    convert_refused(capsys, tiny["pt"], out, "--config", str(tiny["config"]), needles=(os.strerror(code),))
    assert os.listdir(tmp_path) == []


def test_cli_full_disk(tmp_path, capsys, tiny, monkeypatch):
    import orbax.checkpoint as ocp

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    convert_refused(capsys, tiny["pt"], tmp_path / "m", "--config", str(tiny["config"]),
                    needles=("not enough free space",))  # fmt: skip
    monkeypatch.undo()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.Checkpointer, "save", full)
    monkeypatch.setattr(ocp.AsyncCheckpointer, "save", full)
    convert_refused(capsys, tiny["pt"], tmp_path / "m", "--config", str(tiny["config"]),
                    needles=("No space left on device",))  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_cli_write_failing_inside_orbax_is_one_line(tmp_path, tiny):
    """A real failure in the middle of orbax's write (file size limit): one line, nothing left."""
    out = tmp_path / "m"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from ddcm_jax.cli import main\n"
        "sys.exit(main(['convert', *sys.argv[1:]]))\n"
    )
    proc = run_py(code, str(tiny["pt"]), "-o", str(out), "--config", str(tiny["config"]))
    assert proc.returncode == 1, proc.stderr
    one_line(proc.stderr, "ddcm convert:", str(out), "cannot write")
    assert os.listdir(tmp_path) == []


# --- finding 12: names from files are escaped ---------------------------------------------------


def test_escape_codes_in_keys_are_escaped(tmp_path, capsys, tiny):
    evil = "evil\nsecond line\x1b[31m"
    path = tmp_path / "keys.npz"
    np.savez(path, **{evil: np.zeros(2, np.float32)})
    line = convert_refused(capsys, path, tmp_path / "m", "--config", str(tiny["config"]),
                           needles=("unexpected", "evil\\nsecond line\\x1b[31m"))  # fmt: skip
    assert "\x1b" not in line
    st_path = tmp_path / "keys.safetensors"
    st_path.write_bytes(safetensors_bytes({evil: {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    msg = refused(st_path, "unsupported dtype")
    assert "evil\\nsecond" in msg
    pkl = b"\x80\x04" + b"\x8c\x08os\x1b[2J\nx" + b"\x8c\x06system" + b"\x93."
    g = write_pt(tmp_path / "global.pt", pkl, {})
    msg = refused(g, "refused")
    assert "\\x1b[2J\\n" in msg


# --- finding 15: permissions of a converted folder ----------------------------------------------


def test_model_dir_permissions_follow_the_umask(tmp_path, capsys, tiny):
    old = os.umask(0o027)
    try:
        assert cli_main(["convert", str(tiny["pt"]), "-o", str(tmp_path / "m"), "--config", str(tiny["config"])]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    root = tmp_path / "m"
    assert root.stat().st_mode & 0o777 == 0o750
    for p in root.rglob("*"):
        assert p.stat().st_mode & 0o027 == 0, p
    assert sorted(os.listdir(tmp_path)) == ["m"]
    meta = json.loads((root / "model.json").read_text())
    assert meta["config_fingerprint"].startswith("sha256:")


# --- finding 7: edited settings in model.json ---------------------------------------------------


def _edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    edit(meta)
    (dst / "model.json").write_text(json.dumps(meta, indent=2))
    return dst


EDITS = {
    "num_head_channels": lambda m: m["architecture"].update(num_head_channels=8),
    "num_heads": lambda m: m["architecture"].update(num_heads=2),
    "new_attention_order": lambda m: m["architecture"].update(use_new_attention_order=True),
    "noise_schedule": lambda m: m["diffusion"].update(noise_schedule="cosine"),
    "num_timesteps": lambda m: m["diffusion"].update(num_timesteps=4000),
    "compute_dtype": lambda m: (m["architecture"].update(compute_dtype="bfloat16"), m.update(compute_dtype="bfloat16")),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_edited_model_json_is_refused(tiny_model_dir, tmp_path, case):
    d = _edit(tiny_model_dir, tmp_path / "m", EDITS[case])
    with pytest.raises(ModelDirError, match=r"model\.json: settings changed since the model was saved "
                                            r"\(config_fingerprint mismatch\)") as info:  # fmt: skip
        ddcm_jax.load_model(d)
    assert len(str(info.value).splitlines()) == 1


def test_edited_model_json_fails_decoding_through_the_cli(tiny_model_dir, tmp_path, capsys):
    d = _edit(tiny_model_dir, tmp_path / "m", EDITS["num_head_channels"])
    dummy = tmp_path / "x.ddcm"
    dummy.write_bytes(b"DDCM")
    code = cli_main(["decompress", str(dummy), "-o", str(tmp_path / "out"), "--model", str(d), "-q"])
    assert code == 1
    one_line(capsys.readouterr().err, "config_fingerprint mismatch")
    assert not (tmp_path / "out").exists()


def test_model_json_copies_must_agree_and_old_folders_still_load(tiny_model_dir, tmp_path):
    d = _edit(tiny_model_dir, tmp_path / "m", lambda m: m.update(image_size=64))
    with pytest.raises(ModelDirError, match="image_size 64 disagrees"):
        ddcm_jax.load_model(d)
    # A folder written before config_fingerprint existed: checked by its arrays only.
    old = _edit(tiny_model_dir, tmp_path / "old", lambda m: m.pop("config_fingerprint"))
    model = ddcm_jax.load_model(old)
    assert model.fingerprint == json.loads((tiny_model_dir / "model.json").read_text())["fingerprint"]


def test_config_fingerprint_is_stable_and_the_packaged_model_has_it(tiny_model_dir, tmp_path):
    meta = json.loads((tiny_model_dir / "model.json").read_text())
    model = ddcm_jax.load_model(tiny_model_dir)
    assert meta["config_fingerprint"] == model_mod.config_fingerprint(model.config, model.fingerprint)
    fp = ddcm_jax.save_model(tmp_path / "again", model.config, model.params)
    again = json.loads((tmp_path / "again" / "model.json").read_text())
    assert fp == meta["fingerprint"] and again["config_fingerprint"] == meta["config_fingerprint"]
    # The previous default, which the version-1 files name, keeps its arrays; every packaged model has the field.
    v1 = model_mod.resolve_model_dir("small-v1")
    assert json.loads((v1 / "model.json").read_text())["fingerprint"] == (
        "sha256:168eee37d2d24ebf9d93b954f77f6fc8c9039253ae24c45cb1c9396559637c50")
    for folder in (model_mod.default_model_dir(), v1):
        packaged = json.loads((folder / "model.json").read_text())
        config, fp = model_mod.read_model_json(folder)
        assert packaged["config_fingerprint"] == model_mod.config_fingerprint(config, fp)


# --- finding 8: configs that would take the machine down ----------------------------------------

LOAD = (
    "import sys\n"
    "from ddcm_jax.families import load_model\nfrom ddcm_jax.modeldir import ModelDirError\n"
    "try:\n"
    "    load_model(sys.argv[1])\n"
    "except ModelDirError as e:\n"
    "    print(e, file=sys.stderr); sys.exit(1)\n"
)


@pytest.mark.parametrize("edit,needle", [
    (lambda m: (m["architecture"].update(image_size=1000000), m.update(image_size=1000000)), "image_size 1000000"),
    (lambda m: m["architecture"].update(num_res_blocks=[1000, 1000]), "num_res_blocks 1000"),
])  # fmt: skip
def test_model_json_that_would_abort_or_exhaust_is_refused_quickly(tiny_model_dir, tmp_path, edit, needle):
    d = _edit(tiny_model_dir, tmp_path / "m", edit)
    t0 = time.perf_counter()
    proc = run_py(LOAD, str(d), timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    one_line(proc.stderr, str(d / "model.json"), needle)
    assert time.perf_counter() - t0 < 30


MODEL_JSON_EDITS = {
    "channels_float": (lambda a: a.update(model_channels=32.0), "model_channels must be an integer"),
    "channels_huge_float": (lambda a: a.update(model_channels=1e308), "model_channels must be an integer"),
    "bool_as_int": (lambda a: a.update(use_scale_shift_norm=1), "use_scale_shift_norm must be true or false"),
    "heads_zero": (lambda a: a.update(num_heads=0), "num_heads 0"),
    "levels": (lambda a: a.update(channel_mult=[1] * 9, num_res_blocks=[1] * 9), "entries"),
    "num_classes_str": (lambda a: a.update(num_classes="1000"), "num_classes must be an integer"),
    "not_an_object": (lambda a: a.clear() or a.update(image_size=[32]), "must be an integer|missing"),
}


@pytest.mark.parametrize("case", sorted(MODEL_JSON_EDITS))
def test_model_json_types_and_ranges(tiny_model_dir, tmp_path, case):
    edit, needle = MODEL_JSON_EDITS[case]
    d = _edit(tiny_model_dir, tmp_path / "m", lambda m: edit(m["architecture"]))
    t0 = time.perf_counter()
    with pytest.raises(ModelDirError, match=needle):
        ddcm_jax.load_model(d)
    assert time.perf_counter() - t0 < 5


def test_param_count_is_exact_and_bounds_configs():
    import jax
    from ddcm_jax.convert import PRESETS

    for kwargs in [*PRESETS.values(), dict(image_size=32, num_channels=32, num_res_blocks=[2, 1], channel_mult="1,2",
                                           attention_resolutions="32,16", class_cond=True, num_head_channels=16,
                                           resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True),
                   dict(image_size=16, num_channels=64, num_res_blocks=1, channel_mult=[0.5, 1], conv_resample=False)]:  # fmt: skip
        cfg = adm.ADMConfig.from_create_model(kwargs)
        n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(adm.abstract_params(cfg)))
        assert adm.param_count(cfg) == n
    t0 = time.perf_counter()
    with pytest.raises(adm.ConfigError, match="parameters, more than the limit"):
        adm.ADMConfig.from_create_model(dict(image_size=4096, num_channels=4096, num_res_blocks=16,
                                             channel_mult=[1] * 8, attention_resolutions="4096,2048"))  # fmt: skip
    assert time.perf_counter() - t0 < 5  # refused by arithmetic, before anything is traced


# --- finding 10: unreadable params in a model folder --------------------------------------------


def _damage(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in (dst / "params").rglob("*"):
        if p.is_file() and "/d/" in p.as_posix():
            p.write_bytes(bytes(p.stat().st_size))
    return dst


def _forged_ddcm(path: Path, fingerprint: str) -> Path:
    """A valid .ddcm header naming `fingerprint` with a class label: an unconditional model refuses
    it in check_model, after loading, so the error says which model was found, without decoding."""
    from ddcm_jax import bitstream as bs

    h = make_header(rule="ddcm", steps=2, codebook_size=2, fingerprint=bytes.fromhex(fingerprint[7:39]),
                  size=(8, 8), class_label=0)  # fmt: skip
    path.write_bytes(bs.encode(h, np.zeros((1, 1), np.int64), np.zeros((1, 0), np.int64)))
    return path


def test_unreadable_params_are_one_line_without_event_loop_noise(tiny_model_dir, tmp_path):
    bad = _damage(tiny_model_dir, tmp_path / "bad")
    dummy = tmp_path / "x.ddcm"
    dummy.write_bytes(b"DDCM")
    code = "import sys\nfrom ddcm_jax.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = run_py(code, "decompress", str(dummy), "-o", str(tmp_path / "out"), "--model", str(bad), "-q")
    assert proc.returncode == 1
    line = one_line(proc.stderr, str(bad / "params"), "cannot restore parameters")
    assert "tensorstore_spec" not in line and len(line) < 600
    # The same damaged folder found through DDCM_MODELS, before an intact copy: the intact one
    # decodes (here: refuses the forged class label, which only a loaded model can say).
    good = tmp_path / "good"
    shutil.copytree(tiny_model_dir, good)
    fp = json.loads((good / "model.json").read_text())["fingerprint"]
    forged = _forged_ddcm(tmp_path / "f.ddcm", fp)
    proc = run_py(code, "decompress", str(forged), "-o", str(tmp_path / "out"), "-q",
                  env={"DDCM_MODELS": os.pathsep.join([str(bad), str(good)])})  # fmt: skip
    assert proc.returncode == 1
    one_line(proc.stderr, "class label")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_damaged_copy_does_not_shadow_the_packaged_model(tmp_path, monkeypatch, tiny_model_dir):
    from ddcm_jax import families

    packaged = model_mod.default_model_dir()
    fp = json.loads((packaged / "model.json").read_text())["fingerprint"]
    bad = _damage(packaged, tmp_path / "bad")
    monkeypatch.setenv("DDCM_MODELS", str(bad))
    monkeypatch.setenv("DDCM_REGISTRY", str(tmp_path / "no_registry.txt"))  # nothing `ddcm convert` listed
    models: dict = {}
    assert families.find_model(fp[:39], models) == packaged
    assert list(models) == [packaged] and models[packaged].fingerprint == fp  # the caller keeps what was loaded
    # Found again with the caller's models without reloading the packaged model (the damaged
    # copy is tried again and skipped again).
    loaded: list[Path] = []
    real_load = families.load_model
    monkeypatch.setattr(families, "load_model", lambda root, **kw: loaded.append(Path(root)) or real_load(root, **kw))
    assert families.find_model(fp[:39], models) == packaged
    assert loaded == [bad]
    monkeypatch.setattr(families, "load_model", real_load)
    assert ddcm_jax.load_model(packaged).fingerprint == fp
    # A damaged copy of a model that has no intact copy: not found at all.
    tiny_bad = _damage(tiny_model_dir, tmp_path / "tiny_bad")
    monkeypatch.setenv("DDCM_MODELS", str(tiny_bad))
    tiny_fp = json.loads((tiny_model_dir / "model.json").read_text())["fingerprint"]
    assert families.find_model(tiny_fp[:39]) is None


# --- fuzzing the readers and model.json ---------------------------------------------------------

# 500 fixed examples per fuzzer in the suite (about 15 s for all); DDCM_FUZZ_EXAMPLES=N runs N fresh ones.
_FUZZ_N = os.environ.get("DDCM_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_FUZZ_N or 500), deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=_FUZZ_N is None, database=None)  # fmt: skip
_BASE_MAXRSS: list[int] = []


def _check_read(path: Path) -> None:
    """read_state_dict either refuses cleanly or returns arrays within the budget."""
    try:
        state = read_state_dict(path)
    except CheckpointError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1 and msg.isprintable() and "internal error" not in msg, msg
        return
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    assert sum(v.nbytes for v in state.values()) <= 4 * path.stat().st_size + (1 << 20)


def _rss_guard() -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if not _BASE_MAXRSS:
        _BASE_MAXRSS.append(rss)
    assert rss - _BASE_MAXRSS[0] < 512 * 1024, "fuzzing grew the peak memory by more than 512 MiB"


def mutate(data: st.DataObject, raw: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    if kind == "flip":
        out = bytearray(raw)
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            out[pos] ^= data.draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    pos = data.draw(st.integers(0, len(raw)))
    if kind == "insert":
        return raw[:pos] + data.draw(st.binary(min_size=1, max_size=16)) + raw[pos:]
    end = data.draw(st.integers(pos, len(raw)))
    return raw[:pos] + raw[end:] + raw[pos:end]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_INTS = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**32, 2**63, 2**64]))


@FUZZ
@given(data=st.data())
def test_fuzz_torch_zip(fuzz_dir, data):
    path = fuzz_dir / "f.pt"
    if data.draw(st.booleans()):  # field edits in the pickle, re-zipped
        offset, n = data.draw(_INTS), data.draw(_INTS)
        size = tuple(data.draw(st.lists(_INTS, max_size=4)))
        stride = tuple(data.draw(st.lists(_INTS, max_size=4)))
        stype = data.draw(st.sampled_from(["FloatStorage", "HalfStorage", "LongStorage", "BoolStorage"]))
        tensors = {"w": ("0", "FloatStorage", 6, 0, (2, 3), (3, 1)), "x": ("0", stype, n, offset, size, stride)}
        storages = {"0": bytes(data.draw(st.sampled_from([0, 4, 24, 64])))}
        write_pt(path, tensor_pickle(tensors), storages)
    else:
        base = fuzz_dir / "base.pt"
        raw = (base if base.exists() else small_pt(base)).read_bytes()
        path.write_bytes(mutate(data, raw))
    _check_read(path)
    _rss_guard()


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(fuzz_dir, data):
    path = fuzz_dir / "f.safetensors"
    if data.draw(st.booleans()):
        value = st.one_of(_INTS, st.floats(allow_nan=False), st.text(max_size=4), st.none(), st.booleans(),
                          st.lists(_INTS, max_size=4))  # fmt: skip
        entry = {"dtype": data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "X"])),
                 "shape": data.draw(st.one_of(st.lists(_INTS, max_size=4), value)),
                 "data_offsets": data.draw(st.one_of(st.lists(_INTS, min_size=2, max_size=2), value))}  # fmt: skip
        if data.draw(st.booleans()):
            del entry[data.draw(st.sampled_from(sorted(entry)))]
        raw = safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": entry},
                                bytes(data.draw(st.sampled_from([0, 8, 16, 64]))))  # fmt: skip
    else:
        raw = mutate(data, small_safetensors())
    path.write_bytes(raw)
    _check_read(path)
    _rss_guard()


@FUZZ
@given(data=st.data())
def test_fuzz_npz(fuzz_dir, data):
    path = fuzz_dir / "f.npz"
    if data.draw(st.booleans()):
        descr = data.draw(st.sampled_from(["<f4", ">f8", "|b1", "<i8", "|O", "<U4", "<c8", "V2", "<f16"]))
        shape = tuple(data.draw(st.lists(_INTS, max_size=3)))
        with zipfile.ZipFile(path, "w", data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as z:
            z.writestr("a.npy", npy_header(descr, shape, data.draw(st.booleans()))
                       + bytes(data.draw(st.sampled_from([0, 1, 8, 24, 100]))))  # fmt: skip
    else:
        base = fuzz_dir / "base.npz"
        if not base.exists():
            np.savez_compressed(base, w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(3, bool))
        path.write_bytes(mutate(data, base.read_bytes()))
    _check_read(path)
    _rss_guard()


def _json_values() -> st.SearchStrategy:
    leaf = st.one_of(_INTS, st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                     st.text(max_size=6), st.sampled_from([16, 32, 64, 8, -1, 0, 1e308]))  # fmt: skip
    return st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=4), c, max_size=3)),
                        max_leaves=6)  # fmt: skip


@pytest.fixture(scope="module")
def model_json_text(tiny_model_dir):
    return (tiny_model_dir / "model.json").read_text()


@FUZZ
@given(data=st.data())
def test_fuzz_model_json(fuzz_dir, model_json_text, data):
    """Field edits and byte damage: a clean ModelDirError, or settings within every limit."""
    folder = fuzz_dir / "m"
    folder.mkdir(exist_ok=True)
    meta = json.loads(model_json_text)
    if data.draw(st.booleans()):
        section = data.draw(st.sampled_from(["architecture", "diffusion", None]))
        target = meta if section is None else meta[section]
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=5))
            target[key] = data.draw(_json_values())
        if data.draw(st.booleans()):
            meta.pop("config_fingerprint")  # as an older folder: only the checks of the settings apply
        raw = json.dumps(meta).encode()
    else:
        raw = mutate(data, model_json_text.encode())
    (folder / "model.json").write_bytes(raw)
    try:
        config, _ = model_mod.read_model_json(folder)
    except ModelDirError as e:
        assert type(e) is ModelDirError and len(str(e).splitlines()) == 1 and str(e).isprintable()
        return
    arch = config.architecture
    hash(arch)  # usable as a static jit argument
    assert adm.param_count(arch) <= adm.LIMITS["params"]
    assert arch.image_size % arch.size_multiple == 0


@FUZZ
@given(kwargs=st.fixed_dictionaries(
    {"image_size": st.sampled_from([16, 32, 64, 0, -32, 33, 4097, 32.0, "32", True]),
     "num_channels": st.sampled_from([32, 64, 0, -32, 33, 4096, 1e308, float("nan"), None]),
     "num_res_blocks": st.one_of(st.integers(-1, 20), st.lists(st.integers(-1, 20), max_size=4)),
     },
    optional={"channel_mult": st.one_of(st.text("0123456789, ", max_size=8), st.lists(st.floats(-2, 5), max_size=4)),
              "attention_resolutions": st.one_of(st.text("0123456789,", max_size=6), st.lists(_INTS, max_size=3)),
              "num_heads": _INTS, "num_head_channels": _INTS, "num_heads_upsample": _INTS,
              "learn_sigma": st.sampled_from([True, False, 1, "true"]), "dropout": st.floats(),
              "compute_dtype": st.sampled_from(["float32", "bfloat16", "int8", None, 3])}))  # fmt: skip
def test_fuzz_create_model_kwargs(kwargs):
    try:
        cfg = adm.ADMConfig.from_create_model(kwargs)
    except adm.ConfigError as e:
        assert type(e) is adm.ConfigError and len(str(e).splitlines()) == 1
        return
    assert adm.param_count(cfg) <= adm.LIMITS["params"]
    assert cfg == adm.ADMConfig.from_json(json.loads(json.dumps(cfg.to_json())))


@pytest.mark.torch
def test_handmade_checkpoints_are_what_torch_reads(tmp_path):
    import torch

    path = small_pt(tmp_path / "s.pt")
    ref = torch.load(path, weights_only=True)
    got = read_state_dict(path)
    assert list(got) == list(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v.numpy())
