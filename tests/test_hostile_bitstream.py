"""Hostile and careless `.ddcm` inputs (issue 15): each refused in one line, fast, in bounded memory.

Every hostile file is built here, in tmp_path. Time limits are enforced with SIGALRM
(`deadline`), so a regression fails in seconds instead of running for minutes.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import signal
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from headers import forge as forge_header
from headers import make_header

from ddcm_jax import bitstream as bs
from ddcm_jax.bitstream import BitstreamError, Header
from ddcm_jax.cli import InputError, _read_limited, main
from ddcm_jax.codes import rank_bits

FP = bytes(range(16))
FOREIGN = b"\xab" * 16  # a fingerprint no model here has


class TooSlow(BaseException):  # not an Exception: the CLI's per-input handler must not swallow it
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise TooSlow(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def forge(h: Header, payload: bytes, **raw) -> bytes:
    """A file with arbitrary header fields (bypassing validation) and a correct CRC."""
    body = bs._header_bytes(forge_header(h, **raw)) + payload
    return body + struct.pack(">I", zlib.crc32(body))


def turbo_payload(steps: int, k: int, m: int, seed: int = 0) -> bytes:
    """Valid turbo payload bits for steps - 1 coded steps: random ranks below 2^(bits - 1) < binom(K, M)."""
    n_rank = (math.comb(k, m) - 1).bit_length()
    rng = random.Random(seed)
    value, n = 0, 0
    for _ in range(steps - 1):
        value = (value << n_rank | rng.getrandbits(n_rank - 1)) << m | rng.getrandbits(m)
        n += n_rank + m
    value <<= -n % 8
    return value.to_bytes((n + 7) // 8, "big")


def big_turbo(steps: int, fingerprint: bytes = FP) -> bytes:
    """A turbo file at the format's extremes: K = 2^24, M = 1024 (21 steps: 42 KB)."""
    h = dict(rule="turbo", codebook_size=2**24, num_atoms=1024, fingerprint=fingerprint, size=(256, 256),
             jax_version="0.10.2")  # fmt: skip
    base = make_header(**{**h, "steps": 2})
    return forge(base, turbo_payload(steps, 2**24, 1024), steps=steps)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def argv_for(command: str, path: Path, out: Path) -> list:
    return [command, path] if command == "info" else [command, path, "-o", out, "-q"]


def one_line(err: str, *fragments: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_file(reference) -> bytes:
    """The version-1 file made with adm_tiny (its fingerprint is the converted tiny model's)."""
    return (reference / "ddcm_v1_files" / "tiny_ddcm" / "kodim23.ddcm").read_bytes()


def reforge(data: bytes, **fields) -> bytes:
    stream = bs.decode(data)
    return forge(stream.header, data[stream.header_bytes : -4], **fields)


# --- 3. slow headers: bounded work, fast rank decoding, header checked before the payload ----------


def test_info_on_a_huge_turbo_header_does_not_decode_ranks(tmp_path, capsys):
    """K = 2^24, M = 1024, 21 steps: `ddcm info` took 67 s decoding subset ranks it never prints."""
    path = tmp_path / "big.ddcm"
    path.write_bytes(big_turbo(21))
    with deadline(5):
        code, out, err = run(capsys, "info", path)
    assert code == 0, err
    assert "K 16777216, M 1024" in out and "20 coded steps" in out


def test_decompress_checks_the_model_before_decoding_the_payload(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "foreign.ddcm"
    path.write_bytes(big_turbo(21, fingerprint=FOREIGN))
    with deadline(60):  # loading the model takes a few seconds; decoding 20 ranks used to take 67
        code, _, err = run(capsys, "decompress", path, "-o", tmp_path / "out", "--model", tiny_model_dir, "-q")
    assert code == 1
    one_line(err, str(path), "made with model sha256:abab")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["info", "decompress"])
def test_turbo_work_beyond_the_limit_is_refused_up_front(tmp_path, capsys, command):
    """40 steps at K = 2^24, M = 1024 is over `rank_work`: refused from the header alone."""
    path = tmp_path / "costly.ddcm"
    path.write_bytes(big_turbo(40, fingerprint=FOREIGN))
    with deadline(5):
        with pytest.raises(BitstreamError, match="too costly to decode"):
            bs.decode_header(path.read_bytes(), "costly.ddcm")
        code, _, err = run(capsys, *argv_for(command, path, tmp_path / "out"))
    assert code == 1
    one_line(err, str(path), "too costly to decode")
    assert not (tmp_path / "out").exists()


def test_too_many_atom_indices_are_refused_up_front(tmp_path, capsys):
    """Matching pursuit with M = 1024, K = 2: 1099 x 1024 indices (a 281 KB file, arrays of 9 MB)."""
    h = make_header(rule="mp", steps=2, codebook_size=2, num_atoms=1024, coef_bits=1, fingerprint=FP, size=(32, 32))
    steps = 1100
    payload = bytes(-(-(steps - 1) * bs.bits_per_step("mp", 2, 1024, 1) // 8))
    path = tmp_path / "many.ddcm"
    path.write_bytes(forge(h, payload, steps=steps, num_timesteps=2000))
    with deadline(3):
        code, _, err = run(capsys, "info", path)
    assert code == 1
    one_line(err, str(path), "(steps - 1) x M")


def test_the_limits_are_the_headers_own():
    """An encoder is refused the same settings, before it runs."""
    with pytest.raises(ValueError, match="too costly"):
        make_header(rule="turbo", steps=40, codebook_size=2**24, num_atoms=1024, fingerprint=FP, size=(32, 32))
    with pytest.raises(ValueError, match=r"\(steps - 1\) x M"):
        make_header(rule="mp", steps=1100, num_timesteps=2000, codebook_size=2, num_atoms=1024, coef_bits=1,
               fingerprint=FP, size=(32, 32))  # fmt: skip
    rows = bs.LIMITS["rank_work"] // (1024 * rank_bits(2**24, 1024))  # the most coded steps at the extremes
    assert rows >= 20
    make_header(rule="turbo", steps=rows + 1, codebook_size=2**24, num_atoms=1024, fingerprint=FP, size=(32, 32))
    with pytest.raises(ValueError, match="too costly"):
        make_header(rule="turbo", steps=rows + 2, codebook_size=2**24, num_atoms=1024, fingerprint=FP, size=(32, 32))
    make_header(rule="turbo", steps=1000, codebook_size=16384, num_atoms=64, fingerprint=FP, size=(32, 32))


def test_rank_decoding_is_fast_at_the_extremes():
    """Two K = 2^24, M = 1024 steps: about 0.3 s (a bisection of math.comb per atom took 3 s per step)."""
    h = make_header(rule="turbo", steps=3, codebook_size=2**24, num_atoms=1024, fingerprint=FP, size=(32, 32))
    rng = np.random.default_rng(0)
    idx = np.sort(np.stack([rng.choice(2**24, 1024, replace=False) for _ in range(2)]), axis=1)
    co = rng.integers(0, 2, (2, 1024))
    data = bs.encode(h, idx, co)
    with deadline(3):
        out = bs.decode(data)
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_array_equal(out.coeffs, co)


@pytest.mark.parametrize("k", range(1, 10))
def test_unrank_is_exact_for_every_subset(k):
    for m in range(1, k + 1):
        for r, subset in enumerate(itertools.combinations(range(k), m)):
            assert bs.unrank_subset(r, k, m) == list(subset)


def test_unrank_is_exact_on_structured_sets():
    """Dense runs, sets hugging either end, gaps just past the walking threshold, random sets."""
    rng = random.Random(1)
    k = 2**24
    for m in (2, 3, 17, 200):
        d = [k - 1]  # complement values d_j spaced just wider than the walk from the element above
        for j in range(m - 1, 0, -1):
            d.append(d[-1] - (j // 8 + 4))
        cases = [list(range(m)), list(range(k - m, k)), sorted(k - 1 - x for x in d),
                 list(range(0, 2 * m, 2)), sorted(rng.sample(range(k), m)),
                 sorted(rng.sample(range(k // 2 - m, k // 2 + m), m))]  # fmt: skip
        for s in cases:
            r = bs.rank_subset(s, k)
            assert bs.unrank_subset(r, k, m) == s
    for k, m in ((1030, 1024), (5000, 1000), (64, 32)):
        total = math.comb(k, m)
        for r in (0, 1, total // 3, total - 2, total - 1):
            s = bs.unrank_subset(r, k, m)
            assert len(s) == m and s == sorted(set(s)) and 0 <= s[0] and s[-1] < k
            assert bs.rank_subset(s, k) == r
    with pytest.raises(ValueError):
        bs.unrank_subset(math.comb(10, 3), 10, 3)


def test_wide_fields_unpack_across_byte_boundaries():
    """The vectorised reader: 24-bit indices and 16-bit coefficients at every bit offset."""
    h = make_header(rule="mp", steps=9, codebook_size=2**24 - 3, num_atoms=7, coef_bits=13, fingerprint=FP,
               size=(32, 32))  # fmt: skip
    rng = np.random.default_rng(2)
    idx, co = rng.integers(0, 2**24 - 3, (8, 7)), rng.integers(0, 2**13, (8, 6))
    out = bs.decode(bs.encode(h, idx, co))
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_array_equal(out.coeffs, co)
    idx[5, 3] = 2**24 - 1  # beyond K, at the sixth step
    data = bs._header_bytes(h) + bs._pack(h.spec, idx, co, np.ones(8, bool))
    with pytest.raises(BitstreamError, match=f"index {2**24 - 1} >= K = {2**24 - 3} at step 5"):
        bs.decode(data + struct.pack(">I", zlib.crc32(data)))


# --- 11. sizes the size policy cannot produce ------------------------------------------------------


@pytest.mark.parametrize("policy,size,original,fragment", [
    ("pad", (128, 128), (5000, 7000), "larger than the coded 128x128"),
    ("pad", (128, 128), (64, 129), "larger than the coded"),
    ("crop", (128, 96), (512, 768), "codes a square"),
    ("resize", (96, 128), (512, 768), "codes a square"),
    ("none", (128, 128), (64, 64), "differs from the coded"),
])  # fmt: skip
def test_impossible_geometry_is_refused_in_the_header(policy, size, original, fragment):
    h = make_header(rule="ddcm", steps=10, codebook_size=64, fingerprint=FP, size=(128, 128), jax_version="0.10.2")
    payload = bytes(-(-9 * 6 // 8))
    with pytest.raises(BitstreamError, match=fragment) as e:
        bs.decode(forge(h, payload, size=size, original_size=original, size_policy=policy), "g.ddcm")
    assert str(e.value).startswith("g.ddcm: ") and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=fragment):
        make_header(rule="ddcm", steps=10, codebook_size=64, fingerprint=FP, size=size, original_size=original,
               size_policy=policy)  # fmt: skip


def test_possible_geometry_is_accepted():
    for policy, size, original in (("pad", (128, 128), (127, 100)), ("crop", (64, 64), (5000, 7)),
                                   ("resize", (64, 64), (1, 16384)), ("none", (32, 48), None)):  # fmt: skip
        make_header(rule="ddcm", steps=10, codebook_size=64, fingerprint=FP, size=size, original_size=original,
               size_policy=policy)  # fmt: skip


@pytest.mark.parametrize("original,fragment", [
    ((5000, 7000), "larger than the coded 32x32"),  # decoded, exit 0, to a 32x32 PNG before
    ((20, 32), "not 20x32 padded to a multiple of 2"),  # the writer pads by less than the multiple
])  # fmt: skip
def test_decompress_refuses_a_pad_header_the_writer_cannot_make(tiny_model_dir, tiny_file, tmp_path, capsys,
                                                                 original, fragment):  # fmt: skip
    path = tmp_path / "pad.ddcm"
    path.write_bytes(reforge(tiny_file, size_policy="pad", original_size=original))
    code, _, err = run(capsys, "decompress", path, "-o", tmp_path / "out", "--model", tiny_model_dir, "-q")
    assert code == 1
    one_line(err, str(path), fragment)
    assert not (tmp_path / "out").exists()


# --- 12. text from files is escaped -----------------------------------------------------------------


def test_control_characters_in_header_strings_are_refused(tmp_path, capsys, tiny_file):
    path = tmp_path / "esc.ddcm"
    path.write_bytes(reforge(tiny_file, jax_version="\x1b[2J\x1b[31mpwned"))
    code, out, err = run(capsys, "info", path)
    assert code == 1 and "\x1b" not in out
    one_line(err, str(path), "jax version string has control characters")
    path.write_bytes(reforge(tiny_file, respacing="1\r0"))
    code, out, err = run(capsys, "info", path)
    assert code == 1
    one_line(err, "respacing string has control characters")


def test_file_names_are_escaped_in_info_and_decompress(tmp_path, capsys, tiny_file):
    good = tmp_path / "ok\x1b[31m\nname.ddcm"
    good.write_bytes(tiny_file)
    code, out, err = run(capsys, "info", good)
    assert code == 0, err
    assert "\x1b" not in out and out.splitlines()[0].startswith(str(tmp_path) + "/ok\\x1b[31m\\nname.ddcm: ")
    assert out.splitlines()[1].strip().startswith(".ddcm v1")
    bad = tmp_path / "bad\x1b[2J\nname.ddcm"
    bad.write_bytes(b"DDCM\x01" + bytes(20))
    for argv in (["info", bad], ["decompress", bad, "-o", tmp_path / "out", "-q"]):
        code, out, err = run(capsys, *argv)
        assert code == 1 and "\x1b" not in out
        one_line(err, "bad\\x1b[2J\\nname.ddcm")
    assert not (tmp_path / "out").exists()


# --- 13. endless and special files --------------------------------------------------------------------


def test_read_limited_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.ddcm"
    os.mkfifo(fifo)  # no writer: a blocking open would hang
    with deadline(5):
        for path in (Path("/dev/zero"), fifo, tmp_path):
            with pytest.raises(InputError, match="not a regular file") as e:
                _read_limited(path)
            assert str(e.value).startswith(f"{path}: ")


def test_read_limited_refuses_a_sparse_file_over_the_limit_by_its_size(tmp_path):
    path = tmp_path / "huge.ddcm"
    with open(path, "wb") as f:
        f.truncate(bs.LIMITS["file_bytes"] + 1)  # sparse: no disk, no memory
    with deadline(5), pytest.raises(InputError, match="larger than any valid"):
        _read_limited(path)
    with open(path, "r+b") as f:
        f.truncate(bs.LIMITS["file_bytes"])
    assert stat.S_ISREG(path.stat().st_mode)
    with deadline(5):
        assert len(_read_limited(path)) == bs.LIMITS["file_bytes"]  # at the limit: read (and then refused by decode)


@pytest.mark.parametrize("command", ["info", "decompress"])
def test_endless_and_special_files_fail_in_one_line(tmp_path, capsys, command):
    fifo = tmp_path / "pipe.ddcm"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with deadline(5):
            code, _, err = run(capsys, *argv_for(command, path, tmp_path / "out"))
        assert code == 1
        one_line(err, str(path))
    assert not (tmp_path / "out").exists()


# --- the version-1 files still read -------------------------------------------------------------------


def test_version_1_reference_files_still_read(reference, capsys):
    files = sorted((reference / "ddcm_v1_files").glob("*/*.ddcm"))
    assert len(files) == 6
    for path in files:
        data = path.read_bytes()
        head, stream = bs.decode_header(data, str(path)), bs.decode(data, str(path))
        assert head.header == stream.header and head.total_bytes == len(data)
        assert bs.encode(stream.header, stream.indices, stream.coeffs) == data
    code, _, err = run(capsys, "info", *files)
    assert code == 0, err
