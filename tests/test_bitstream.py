"""The .ddcm format: exact bit accounting, packing order, subset ranks, refusal of bad files, fuzzing."""

from __future__ import annotations

import itertools
import math
import struct
import zlib

import numpy as np
import pytest
from headers import forge as forge_header
from headers import make_header
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddcm_jax import bitstream as bs
from ddcm_jax.bitstream import BitstreamError, Header

FP = bytes(range(16))


def header(**kw) -> Header:
    base = dict(rule="ddcm", steps=10, codebook_size=64, fingerprint=FP, size=(32, 32), jax_version="0.10.2")
    return make_header(**{**base, **kw})


def random_code(h: Header, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A code the sampler could emit for header h (defaults outside t_range)."""
    rng = np.random.default_rng(seed)
    n = h.spec.steps - 1
    if h.spec.rule == "turbo":
        idx = np.sort(np.stack([rng.choice(h.spec.codebook_size, h.spec.num_atoms, replace=False) for _ in range(n)]), 1)
        co = rng.integers(0, 2, (n, h.spec.num_atoms))
    else:
        idx = rng.integers(0, h.spec.codebook_size, (n, h.spec.num_atoms))
        co = rng.integers(0, 2**h.spec.coef_bits, (n, h.spec.coeff_width))
    coded = bs.coded_steps(bs.schedule_timesteps(h), h.spec.t_range)
    for i in np.flatnonzero(~coded):
        d_idx, d_co = bs.idle_step(h.spec.rule, h.spec.num_atoms, h.spec.coeff_width)
        idx[i], co[i] = d_idx, d_co
    return idx, co


HEADERS = {
    "ddcm": header(),
    "ddcm_k_not_pow2": header(codebook_size=1000, steps=20),
    "ddcm_k1": header(codebook_size=1),
    "mp": header(rule="mp", num_atoms=3, coef_bits=2, codebook_size=8),
    "turbo": header(rule="turbo", num_atoms=5, codebook_size=256),
    "turbo_t_range": header(rule="turbo", num_atoms=3, codebook_size=20, t_range=(100, 700), steps=12),
    "random_class": header(rule="random", task="generation", class_label=207, seed=2**32 - 1),
    "mse_sr": header(rule="mse", task="super-resolution", factor=4, size=(256, 256), original_size=(512, 768),
                     size_policy="crop", eta=0.3),
    "mse_blur": header(rule="mse_inner", task="blur", blur_kernel=61, blur_sigma=3.0, noise_schedule="cosine"),
    "ddim_respacing": header(steps=50, respacing="ddim50", t_range=(0, 500)),
}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_round_trip_and_exact_length(name):
    h = HEADERS[name]
    idx, co = random_code(h)
    data = bs.encode(h, idx, co)
    out = bs.decode(data, "x.ddcm")
    assert out.header == h
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_array_equal(out.coeffs, co)
    # File size = header + ceil(payload bits / 8) + CRC, and the bits follow the formula.
    coded = int(bs.coded_steps(bs.schedule_timesteps(h), h.spec.t_range).sum())
    assert out.payload_bits == coded * bs.bits_per_step(h.spec.rule, h.spec.codebook_size, h.spec.num_atoms, h.spec.coef_bits)
    assert len(data) == out.header_bytes + math.ceil(out.payload_bits / 8) + 4
    assert out.header_bytes <= 80  # "a few tens of bytes"


def test_bits_per_step_matches_the_paper_formulas():
    from ddcm_jax import bits_per_image

    for k, m, c in [(64, 1, 0), (1000, 3, 2), (8192, 6, 1), (2, 1, 0)]:
        rule = "mp" if m > 1 else "ddcm"
        assert bs.bits_per_step(rule, k, m, c) == m * math.ceil(math.log2(k)) + (m - 1) * c
        assert bits_per_image(20, k, m, max(c, 1), "ddcm") == 19 * bs.bits_per_step(rule, k, m, c)
    exact = (math.comb(16384, 100) - 1).bit_length()
    assert bs.bits_per_step("turbo", 16384, 100) == exact + 100
    assert bits_per_image(21, 16384, num_atoms=100, rule="turbo") == 20 * (exact + 100)


def test_payload_order_is_the_originals():
    """K = 8 (3 bits), M = 2, C = 2: index_1, coefficient_1, index_2 per step, MSB first."""
    h = header(rule="mp", num_atoms=2, coef_bits=2, codebook_size=8, steps=3)
    data = bs.encode(h, np.array([[5, 3], [0, 7]]), np.array([[2], [1]]))
    payload = data[bs.decode(data).header_bytes : -4]
    # 101 10 011 | 000 01 111 -> 10110011 00001111 (16 bits, no padding)
    assert payload == bytes([0b10110011, 0b00001111])


def test_turbo_payload_is_rank_then_signs():
    h = header(rule="turbo", num_atoms=2, codebook_size=4, steps=2)  # binom(4, 2) = 6: 3 rank bits
    data = bs.encode(h, np.array([[1, 3]]), np.array([[1, 0]]))
    payload = data[bs.decode(data).header_bytes : -4]
    rank = [list(c) for c in itertools.combinations(range(4), 2)].index([1, 3])  # 4
    assert payload == bytes([int(f"{rank:03b}10" + "000", 2)])


@pytest.mark.parametrize("k,m", [(1, 1), (5, 1), (6, 3), (9, 4), (10, 10)])
def test_subset_rank_is_lexicographic(k, m):
    for r, subset in enumerate(itertools.combinations(range(k), m)):
        assert bs.rank_subset(list(subset), k) == r
        assert bs.unrank_subset(r, k, m) == list(subset)


def test_subset_rank_exact_at_k16384_m100():
    k, m, total = 16384, 100, math.comb(16384, 100)
    assert bs.rank_subset(list(range(m)), k) == 0
    assert bs.rank_subset(list(range(k - m, k)), k) == total - 1
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = sorted(rng.choice(k, m, replace=False).tolist())
        r = bs.rank_subset(s, k)
        assert 0 <= r < total and bs.unrank_subset(r, k, m) == s
        if s[-1] < k - 1:  # the next set in lexicographic order ranks one higher
            assert bs.rank_subset([*s[:-1], s[-1] + 1], k) == r + 1
    for r in (0, 1, total // 3, total - 2, total - 1):
        assert bs.rank_subset(bs.unrank_subset(r, k, m), k) == r


# --- refusing bad files -------------------------------------------------------------------------


def forge(h: Header, payload: bytes, **raw) -> bytes:
    """A file with arbitrary header fields (bypassing validation) and a correct CRC."""
    body = bs._header_bytes(forge_header(h, **raw)) + payload
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.fixture(scope="module")
def valid():
    h = HEADERS["ddcm"]
    return h, bs.encode(h, *random_code(h))


def refused(data: bytes, *fragments: str) -> None:
    with pytest.raises(BitstreamError) as e:
        bs.decode(data, "bad.ddcm")
    msg = str(e.value)
    assert msg.startswith("bad.ddcm: ") and "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_truncated_random_and_wrong_magic(valid):
    _, data = valid
    for cut in (0, 2, 4, 10, len(data) // 2, len(data) - 1):
        refused(data[:cut])
    refused(data + b"\0", "trailing")
    refused(np.random.default_rng(0).bytes(200), "magic")
    refused(b"PNG\r" + data[4:], "magic")


def test_unknown_version_and_crc_mismatch(valid):
    _, data = valid
    refused(data[:4] + bytes([3]) + data[5:], "version 3")
    flipped = bytearray(data)
    flipped[-6] ^= 0x10  # a payload bit: only the CRC can tell
    refused(bytes(flipped), "CRC")
    flipped = bytearray(data)
    flipped[-1] ^= 1
    refused(bytes(flipped), "CRC")


@pytest.mark.parametrize("field,value,fragment", [
    ("codebook_size", 2**24 + 1, "codebook size"),
    ("steps", 10**5 + 1, "steps"),
    ("size", (16385, 32), "coded size"),
    ("original_size", (32, 10**6), "original size"),
    ("num_atoms", 5000, "num_atoms"),
    ("seed", 2**40, "seed"),
    ("num_timesteps", 10**7, "num_timesteps"),
    ("t_range", (10, 5000), "t_range"),
    ("eta", float("nan"), "eta"),
    ("respacing", "7", "gives 7 steps"),
])  # fmt: skip
def test_absurd_header_values_are_refused(valid, field, value, fragment):
    h, data = valid
    payload = data[bs.decode(data).header_bytes : -4]
    refused(forge(h, payload, **{field: value}), fragment)


def test_payload_length_must_match_the_header(valid):
    h, data = valid
    payload = data[bs.decode(data).header_bytes : -4]
    refused(forge(h, payload + b"\0"), "implies")
    refused(forge(h, payload[:-1]), "implies")
    refused(forge(h, payload, steps=11), "implies")  # one more step's worth of bits expected


def test_out_of_range_index_and_padding_are_refused():
    h = header(codebook_size=5, steps=2)  # 3 bits per index, 5 padding bits
    refused(forge(h, bytes([0b11100000])), "index 7")
    refused(forge(h, bytes([0b01000001])), "padding")
    t = header(rule="turbo", num_atoms=2, codebook_size=4, steps=2)  # rank < 6 in 3 bits
    refused(forge(t, bytes([0b11100000])), "rank")


def test_encode_refuses_codes_that_do_not_fit():
    h = HEADERS["turbo"]
    idx, co = random_code(h)
    with pytest.raises(ValueError, match="sorted"):
        bs.encode(h, idx[:, ::-1], co)
    with pytest.raises(ValueError, match="index"):
        bs.encode(HEADERS["ddcm"], np.full((9, 1), 64), np.zeros((9, 0)))
    with pytest.raises(ValueError, match="outside t_range"):
        h = HEADERS["turbo_t_range"]
        idx, co = random_code(h)
        coded = bs.coded_steps(bs.schedule_timesteps(h), h.spec.t_range)
        idx[np.flatnonzero(~coded)[0]] = np.arange(3) + 1
        bs.encode(h, idx, co)


# --- fuzzing -------------------------------------------------------------------------------------

SEEDS = sorted(HEADERS)
VALID = {name: bs.encode(HEADERS[name], *random_code(HEADERS[name], 3)) for name in SEEDS}


def _mutate(data: bytes, other: bytes, kind: str, a: int, b: int, fix_crc: bool) -> bytes:
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        for pos in (a, b):
            out[pos % n] ^= 1 << (pos % 8)
        data = bytes(out)
    elif kind == "truncate":
        data = data[: a % n]
    elif kind == "extend":
        data = data + bytes([a % 256]) * (1 + b % 16)
    elif kind == "splice":
        cut = a % n
        data = data[:cut] + other[b % len(other) :]
    elif kind == "byte":
        out = bytearray(data)
        out[a % n] = b % 256
        data = bytes(out)
    if fix_crc and len(data) > 4:  # a mutation the CRC cannot see: the parser alone must cope
        data = data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))
    return data


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    name=st.sampled_from(SEEDS), other=st.sampled_from(SEEDS),
    kind=st.sampled_from(["flip", "truncate", "extend", "splice", "byte"]),
    a=st.integers(0, 2**16), b=st.integers(0, 2**16), fix_crc=st.booleans(),
)  # fmt: skip
def test_fuzz_mutated_streams_fail_cleanly_or_decode(name, other, kind, a, b, fix_crc):
    data = _mutate(VALID[name], VALID[other], kind, a, b, fix_crc)
    try:
        out = bs.decode(data, "fuzz.ddcm")
    except BitstreamError as e:
        assert str(e).startswith("fuzz.ddcm: ") and "\n" not in str(e)
        return
    # A valid decode: a well-formed header and a code that re-encodes to the same bytes.
    h = out.header
    assert out.indices.shape == (h.spec.steps - 1, h.spec.num_atoms)
    assert ((out.indices >= 0) & (out.indices < h.spec.codebook_size)).all()
    assert bs.encode(h, out.indices, out.coeffs) == data


def test_header_parts_replace_and_revalidate():
    """`Header.replace` swaps whole parts or fields of parts, and the result is validated again."""
    h = header(rule="turbo", num_atoms=4, steps=6)
    assert isinstance(h.spec, bs.StoredSpec) and h.geometry.size == (32, 32) and h.task.name == "compression"
    g = h.replace(geometry={"original_size": (30, 20), "size_policy": "pad"})
    assert g.geometry == bs.Geometry((32, 32), (30, 20), "pad") and g.spec == h.spec
    assert bs.decode(bs.encode(g, *random_code(g))).header == g
    assert h.replace(provenance=bs.Provenance(seed=9)).provenance.seed == 9
    with pytest.raises(ValueError, match="turbo needs num_atoms <= codebook size"):
        h.replace(spec={"num_atoms": 65})
    with pytest.raises(ValueError, match="policy pad but original size"):
        h.replace(geometry={"original_size": (64, 64), "size_policy": "pad"})
