"""Issue 28, command-line and file-format side: hostile and careless uses, round 3.

Each test builds its input itself. Findings (numbers of the issue): 1 a failed commit lost the
earlier output, 2 concurrent runs mixed their output pairs, 3 Ctrl-C, 4 an impossible latent
header decoded, 5 a compressed-CFG subset beyond the codebook and the budget, 8 a report on a
full disk, 9 usage errors found after loading the model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddcm_jax import images
from ddcm_jax.cli import main

CODING = ["-T", "3", "-K", "4", "--rule", "ddcm"]


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def usage(capsys, *argv: object) -> str:
    """Run a command that must be refused as a usage error (exit 2); return stderr."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def photo(path: Path, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path


# --- 1. a failed commit leaves what was there before ----------------------------------------------------


def test_rerun_onto_a_folder_keeps_the_earlier_code(tiny_model_dir, tmp_path, capsys):
    src = photo(tmp_path / "x.png")
    out = tmp_path / "out"
    assert run(capsys, "compress", src, "-o", out, "--model", tiny_model_dir, *CODING, "-q")[0] == 0
    before = (out / "x.ddcm").read_bytes()
    (out / "x.png").mkdir()  # in the way of the reconstruction
    code, _, err = run(capsys, "compress", src, "-o", out, "--model", tiny_model_dir, *CODING, "-q",
                       "--save-reconstruction", "--seed", "7")  # fmt: skip
    assert code == 1
    assert err.count("\n") == 1 and "x.png" in err and "folder" in err
    assert (out / "x.ddcm").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["x.ddcm", "x.png"]  # no temporaries either


def test_commit_failing_at_a_later_rename_puts_back_the_earlier_files(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.ddcm", tmp_path / "a.png", tmp_path / "a_degraded.png"
    a.write_bytes(b"old code")
    os.symlink("elsewhere.png", b)  # a symlink is put back as the symlink it was
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        images.commit_files({a: b"new code", b: b"new png", c: b"degraded"})
    monkeypatch.setattr(os, "replace", real)
    assert a.read_bytes() == b"old code"
    assert b.is_symlink() and os.readlink(b) == "elsewhere.png"
    assert not c.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ddcm", "a.png"]


def test_commit_without_hard_links_still_puts_back(tmp_path, monkeypatch):
    a, b = tmp_path / "a.ddcm", tmp_path / "a.png"
    a.write_bytes(b"old code")
    b.write_bytes(b"old png")

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    real = os.replace

    def second_fails(src, dst):
        if Path(dst) == b and "keep" not in str(src):  # the new png; putting things back still works
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "link", no_links)  # a copy serves where links do not
    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="Input/output"):
        images.commit_files({a: b"new code", b: b"new png"})
    monkeypatch.setattr(os, "replace", real)
    assert (a.read_bytes(), b.read_bytes()) == (b"old code", b"old png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ddcm", "a.png"]


def test_a_folder_in_the_way_is_refused_before_anything_is_written(tmp_path):
    a, b = tmp_path / "a.ddcm", tmp_path / "a.png"
    a.write_bytes(b"old code")
    b.mkdir()
    with pytest.raises(IsADirectoryError, match=r"a\.png: is a folder"):
        images.commit_files({a: b"new code", b: b"png"})
    assert a.read_bytes() == b"old code" and b.is_dir() and len(list(tmp_path.iterdir())) == 2


# --- 2. concurrent commits into one folder do not interleave -------------------------------------------


def test_two_writers_commit_their_pairs_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    slow = f"""
import os, time
from pathlib import Path
from ddcm_jax import images
real = os.replace
def replace(a, b):
    real(a, b)
    time.sleep(1.5)  # a slow disk between the two renames
os.replace = replace
images.commit_files({{Path({str(out / "x.ddcm")!r}): b"A", Path({str(out / "x.png")!r}): b"A"}})
"""
    first = subprocess.Popen([sys.executable, "-c", slow])
    try:
        deadline = time.monotonic() + 60
        while not ((out / "x.ddcm").exists() and (out / "x.ddcm").read_bytes() == b"A"):
            assert time.monotonic() < deadline and first.poll() is None, "the first writer never renamed"
            time.sleep(0.01)
        images.commit_files({out / "x.ddcm": b"B", out / "x.png": b"B"})  # waits for the first pair
    finally:
        assert first.wait(timeout=60) == 0
    assert (out / "x.ddcm").read_bytes() == (out / "x.png").read_bytes() == b"B"


# --- 3. Ctrl-C stops at once, with one line and exit 130, wherever it lands -----------------------------


def terminal(argv: list[str]) -> list[str]:
    """argv run with a terminal's Ctrl-C: a runner started in the background (`cmd &`) hands its
    children SIGINT ignored, which would decide these tests by how the suite was launched. An exec
    wrapper restores the default (a `preexec_fn` would fork JAX's threads, with a warning)."""
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", reset, *argv]


@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_ctrl_c_while_jax_imports_is_one_line_and_130(tiny_model_dir, tmp_path, delay):
    script = Path(sys.executable).with_name("ddcm")  # the console script a user runs
    assert script.exists()
    src = photo(tmp_path / "x.png", size=(64, 64))
    proc = subprocess.Popen(terminal([str(script), "compress", str(src), "-o", str(tmp_path / "out"), "--model",
                                      str(tiny_model_dir), "-T", "200", "-K", "16", "--rule", "ddcm", "-q"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.endswith("interrupted\n") and "Traceback" not in err


def test_ctrl_c_inside_a_gc_callback_still_stops(tiny_model_dir, tmp_path):
    # JAX runs Python code from the garbage collector (its `_xla_gc_callback`); a SIGINT handled
    # there raised a KeyboardInterrupt that Python printed as "Exception ignored" and dropped.
    out = tmp_path / "out"
    src = photo(tmp_path / "x.png", size=(64, 64))
    child = f"""
import gc, os, signal, sys
from ddcm_jax import cli, images
armed = []
def callback(phase, info):
    if phase == "start" and armed:
        armed.clear()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100000):  # the handler runs here, inside the callback
            pass
gc.callbacks.append(callback)
load = images.load_image
def load_then_collect(*args, **kwargs):
    armed.append(1)
    gc.collect()
    return load(*args, **kwargs)
images.load_image = load_then_collect
sys.exit(cli.main(["compress", {str(src)!r}, "-o", {str(out)!r}, "--model", {str(tiny_model_dir)!r},
                   "-T", "3", "-K", "4", "--rule", "ddcm", "-q"]))
"""
    proc = subprocess.run(terminal([sys.executable, "-c", child]), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "ddcm compress: interrupted\n"
    assert not out.exists() or not list(out.iterdir())


def test_ctrl_c_during_a_commit_waits_for_the_pair(tmp_path):
    out = tmp_path / "out"
    child = f"""
import os, signal, sys
from pathlib import Path
from ddcm_jax import cli, images
stop = cli._StopOnInterrupt.install()
stop.command = "compress"
real = os.replace
def replace(a, b):
    real(a, b)
    os.kill(os.getpid(), signal.SIGINT)  # between the two renames
    for _ in range(100000):
        pass
os.replace = replace
images.commit_files({{Path({str(out / "x.ddcm")!r}): b"code", Path({str(out / "x.png")!r}): b"png"}})
print("not reached")
"""
    proc = subprocess.run(terminal([sys.executable, "-c", child]), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "ddcm compress: interrupted\n")
    assert sorted(p.name for p in out.iterdir()) == ["x.ddcm", "x.png"]


# --- 4. a version-2 (latent) header the writer cannot make is refused -----------------------------------


@pytest.fixture(scope="module")
def latent_file(sd_tiny_model_dir, tmp_path_factory) -> Path:
    """A 5-step latent (version-2) code of a 40 x 44 image, padded."""
    where = tmp_path_factory.mktemp("latent")
    src = photo(where / "x.png", size=(40, 44))
    assert main(["compress", str(src), "-o", str(where / "out"), "--model", str(sd_tiny_model_dir), "-T", "5",
                 "-K", "16", "-M", "1", "--pad", "-q"]) == 0  # fmt: skip
    return where / "out" / "x.ddcm"


def test_latent_pad_header_with_a_tiny_original_is_refused(sd_tiny_model_dir, latent_file, tmp_path, capsys):
    from headers import forge as forge_header

    from ddcm_jax import bitstream as bs

    data = latent_file.read_bytes()
    stream = bs.decode(data)
    assert stream.header.version == bs.LATENT_VERSION and stream.header.geometry.size_policy == "pad"
    assert run(capsys, "decompress", latent_file, "-o", tmp_path / "ok", "--model", sd_tiny_model_dir, "-q")[0] == 0
    body = bs._header_bytes(forge_header(stream.header, original_size=(3, 2))) + data[stream.header_bytes : -4]
    path = tmp_path / "tiny.ddcm"
    path.write_bytes(body + int.to_bytes(__import__("zlib").crc32(body), 4, "big"))
    code, _, err = run(capsys, "decompress", path, "-o", tmp_path / "out", "--model", sd_tiny_model_dir, "-q")
    assert code == 1, err
    assert err.count("\n") == 1 and str(path) in err and "not 3x2 padded to a multiple" in err
    assert not (tmp_path / "out").exists()


# --- 5. compressed CFG: a subset within the codebook, and within the budget -----------------------------


def test_ccfg_subset_beyond_the_codebook_is_a_usage_error(sd_tiny_model_dir, tmp_path, capsys, monkeypatch):
    import ddcm_jax.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda path: pytest.fail("model loaded before usage checks"))
    err = usage(capsys, "generate", "-n", 1, "--prompt", "cat", "--ccfg-subset", 524288, "-K", 16, "-T", 5, "-o",
                tmp_path / "g", "--model", sd_tiny_model_dir)  # fmt: skip
    assert "--ccfg-subset 524288" in err and "K = 16" in err


def test_ccfg_subset_is_checked_against_the_budget(sd_tiny_model_dir):
    import ddcm_jax
    from ddcm_jax import codec, latent
    from ddcm_jax.memory import MemoryBudgetError
    from ddcm_jax.spec import CodeSpec

    model = ddcm_jax.load_model(sd_tiny_model_dir)
    spec = CodeSpec.create(steps=5, codebook_size=1 << 20, rule="random", clip=False)
    side = codec.generation_side(model, None)
    small = latent.forward_bytes(model, side, side) + (1 << 20)  # the network fits; 2^20 atoms do not
    with pytest.raises(MemoryBudgetError, match="compressed CFG over 1048576 atoms"):
        codec.generate_images(model, spec, [0], prompt="cat", ccfg_subset=1 << 20, budget=small)
    with pytest.raises(ValueError, match="more atoms than the codebook"):
        codec.generate_images(model, spec.replace(codebook_size=16), [0], prompt="cat", ccfg_subset=17)
    with pytest.raises(ValueError, match="more atoms than the codebook"):
        latent.generate(model, steps=5, codebook_size=16, key=__import__("jax").random.key(0), prompt="cat",
                        ccfg_subset=17)  # fmt: skip


# --- 8. a report that cannot be written names itself ----------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_json_report_on_a_full_disk_names_the_report(tiny_model_dir, tmp_path, capsys):
    src = photo(tmp_path / "x.png")
    code, _, err = run(capsys, "compress", src, "-o", tmp_path / "out", "--model", tiny_model_dir, *CODING, "-q",
                       "--json", "/dev/full")  # fmt: skip
    assert code == 1
    assert err == "ddcm compress: --json /dev/full: No space left on device\n"
    assert (tmp_path / "out" / "x.ddcm").exists()  # the codes themselves were written


# --- 9. usage errors at once, before any model loads -----------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import ddcm_jax.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda path: pytest.fail("model loaded before usage checks"))


def test_prompt_that_is_not_utf8_is_a_usage_error(sd_tiny_model_dir, tmp_path, capsys, no_model_loads):
    bad = os.fsdecode(b"caf\xe9")  # what Python makes of a Latin-1 terminal's bytes: a surrogate
    err = usage(capsys, "generate", "-n", 1, "--prompt", bad, "--guidance", 3, "-o", tmp_path / "g", "--model",
                sd_tiny_model_dir, "-T", 5, "-K", 16)  # fmt: skip
    assert "--prompt: not valid UTF-8" in err
    src = photo(tmp_path / "x.png")
    err = usage(capsys, "edit", src, "-o", tmp_path / "e", "--model", sd_tiny_model_dir, "--src-prompt", "a",
                "--dst-prompt", bad)  # fmt: skip
    assert "--dst-prompt: not valid UTF-8" in err


def test_tskip_past_the_steps_is_a_usage_error(sd_tiny_model_dir, latent_file, tmp_path, capsys, no_model_loads):
    src = photo(tmp_path / "x.png")
    err = usage(capsys, "edit", src, "-o", tmp_path / "e", "--model", sd_tiny_model_dir, "--src-prompt", "a",
                "--dst-prompt", "b", "-T", 5, "-K", 16, "-M", 1, "--tskip", 100)  # fmt: skip
    assert "--tskip 100" in err and "5 steps" in err
    err = usage(capsys, "edit", latent_file, "-o", tmp_path / "e", "--src-prompt", "a", "--dst-prompt", "b",
                "--tskip", 100)  # fmt: skip
    assert "--tskip 100" in err and "5 steps" in err and "x.ddcm" in err


def test_steps_beyond_the_turbo_schedule_are_a_usage_error(sd_tiny_model_dir, tmp_path, capsys, no_model_loads):
    src = photo(tmp_path / "x.png")
    err = usage(capsys, "compress", src, "-o", tmp_path / "out", "--model", sd_tiny_model_dir, "-T", 163)
    assert "--steps" in err and "2..162" in err


# --- fuzzing the version-2 header: a clean refusal or a valid file, with bounded memory -----------------

_FUZZ_N = os.environ.get("DDCM_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_FUZZ_N or 300), deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=_FUZZ_N is None, database=None)  # fmt: skip


def _latent_streams() -> dict[str, bytes]:
    from headers import make_header

    from ddcm_jax import bitstream as bs

    fp = bytes(range(16))
    common = dict(fingerprint=fp, noise_schedule="scaled_linear", clip=False)
    heads = {
        "turbo_pad": make_header(rule="turbo", steps=8, codebook_size=64, num_atoms=3, size=(48, 64),
                                 original_size=(41, 60), size_policy="pad", latent_schedule="turbo",
                                 no_bits_steps=2, **common),
        "ddcm_prompt": make_header(rule="ddcm", steps=6, codebook_size=100, size=(64, 64), latent_schedule="ddcm",
                                   no_bits_steps=0, prompt_hash=bytes(range(16)), guidance=7.5, **common),
        "ccfg_generation": make_header(rule="ddcm", steps=5, codebook_size=16, size=(32, 32), task="generation",
                                       latent_schedule="ddcm", no_bits_steps=0, **common),
    }  # fmt: skip
    rng = np.random.default_rng(0)
    out = {}
    for name, h in heads.items():
        rows, k, m = h.spec.code_rows, h.spec.codebook_size, h.spec.num_atoms
        if h.spec.rule == "turbo":
            idx = np.sort(np.stack([rng.choice(k, m, replace=False) for _ in range(rows)]), axis=1)
            co = rng.integers(0, 2, (rows, m))
        else:
            idx, co = rng.integers(0, k, (rows, 1)), np.zeros((rows, 0), np.int64)
        out[name] = bs.encode(h, idx, co)
    return out


LATENT_STREAMS = _latent_streams()


@FUZZ
@given(name=st.sampled_from(sorted(LATENT_STREAMS)), kind=st.sampled_from(["flip", "truncate", "byte", "splice"]),
       a=st.integers(0, 2**16), b=st.integers(0, 2**16), fix_crc=st.booleans())  # fmt: skip
def test_fuzz_version_2_headers_fail_cleanly_or_decode(name, kind, a, b, fix_crc):
    import struct
    import tracemalloc
    import zlib

    from ddcm_jax import bitstream as bs

    data = bytearray(LATENT_STREAMS[name])
    n = len(data)
    if kind == "flip":
        for pos in (a, b):
            data[pos % n] ^= 1 << (pos % 8)
    elif kind == "truncate":
        data = data[: a % n]
    elif kind == "byte":
        data[a % n] = b % 256
    else:  # another file's bytes from a point on
        other = LATENT_STREAMS[sorted(LATENT_STREAMS)[b % len(LATENT_STREAMS)]]
        data = data[: a % n] + other[b % len(other) :]
    data = bytes(data)
    if fix_crc and len(data) > 4:  # a change the CRC cannot see: the parser alone must cope
        data = data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))
    tracemalloc.start()
    try:
        out = bs.decode(data, "fuzz.ddcm")
    except bs.BitstreamError as e:
        assert str(e).startswith("fuzz.ddcm: ") and "\n" not in str(e)
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < (16 << 20), f"{peak} bytes to read a {len(data)}-byte file"
    h = out.header
    assert out.indices.shape[0] == h.spec.code_rows
    assert ((out.indices >= 0) & (out.indices < h.spec.codebook_size)).all()
    assert bs.encode(h, out.indices, out.coeffs) == data
