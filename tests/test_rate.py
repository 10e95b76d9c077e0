"""Rate targets (`ddcm_jax.rate.for_bpp`, `--bpp`): the largest exact payload not above the budget."""

from __future__ import annotations

import math

import pytest

from ddcm_jax import bitstream, rate
from ddcm_jax.selection import DDCM
from ddcm_jax.spec import CodeSpec


def turbo_bits(k, m):
    return math.ceil(math.log2(math.comb(k, m))) + m  # the paper's formula, independent of bitstream


@pytest.mark.parametrize("bpp", [0.002, 0.01, 0.05, 0.2])
@pytest.mark.parametrize("k", [256, 1024, 16384])
def test_pixel_turbo_picks_the_largest_m_that_fits(bpp, k):
    spec = CodeSpec.create(steps=30, codebook_size=k, rule="turbo", num_atoms=1)
    pixels = 768 * 512
    out = rate.for_bpp(spec, bpp, pixels)
    m, budget = out.rule.num_atoms, math.floor(bpp * pixels)
    assert out.steps == 30 and out.codebook_size == k and out.no_bits_steps == 0
    assert out.payload_bits() == 29 * turbo_bits(k, m) <= budget
    if m < min(k // 2, 1024):
        assert 29 * turbo_bits(k, m + 1) > budget  # one more atom would not fit


@pytest.mark.parametrize("bpp", [0.0005, 0.003, 0.02, 0.1, 0.2])
def test_latent_turbo_fits_the_budget(bpp):
    spec = CodeSpec.create(steps=20, codebook_size=16384, rule="turbo", num_atoms=1, clip=False).replace(
        schedule="turbo")
    pixels = 512 * 512
    out = rate.for_bpp(spec, bpp, pixels, latent=True)
    budget = math.floor(bpp * pixels)
    assert out.payload_bits() <= budget
    rows, m = out.code_rows, out.rule.num_atoms
    assert rows * turbo_bits(16384, m) <= budget < rows * turbo_bits(16384, m + 1)  # the largest M that fits


def test_latent_no_bits_steps_follow_turbo_ddcms_bins(reference):
    """At the rate Turbo-DDCM's heuristic sees (all steps coded), --bpp places the same no-bits steps."""
    import json

    meta = json.loads((reference / "turbo_ddcm_trace" / "trace.json").read_text())
    for name, ex in meta["no_bits_steps_heuristic_examples"].items():
        d = dict(kv.split("=") for kv in name.replace("H=W", "HW").split(","))
        t, k, m, hw = int(d["T"]), int(d["K"]), int(d["M"]), int(d["HW"])
        spec = CodeSpec.create(steps=t, codebook_size=k, rule="turbo", clip=False).replace(schedule="turbo")
        seen = (t - 1) * turbo_bits(k, m) / hw**2  # the heuristic's input: every step coded
        try:
            out = rate.for_bpp(spec, seen, hw * hw, latent=True)
        except rate.RateError:
            continue  # that rate codes nothing at T with its heuristic's NBS (only when NBS = T - 2)
        assert out.no_bits_steps == ex["no_bits_steps"], name
    # More rate, fewer steps without bits.
    nbs = [rate.for_bpp(spec.replace(steps=50, codebook_size=16384), b, 512 * 512, latent=True).no_bits_steps
           for b in (0.01, 0.03, 0.08, 0.15)]  # fmt: skip
    assert nbs == sorted(nbs, reverse=True) and nbs[-1] == 0 and nbs[0] > 0


@pytest.mark.parametrize("bpp,steps", [(0.001, 50), (0.01, 50), (0.3, 20), (0.0001, 50)])
def test_ddcm_picks_k_then_steps(bpp, steps):
    spec = CodeSpec.create(steps=steps, codebook_size=1024)
    pixels = 256 * 256
    out = rate.for_bpp(spec, bpp, pixels, max_steps=1000)
    budget = math.floor(bpp * pixels)
    b = int(math.log2(out.codebook_size))
    assert isinstance(out.rule, DDCM) and 2**b == out.codebook_size
    assert out.payload_bits() == (out.steps - 1) * b <= budget
    assert (out.steps - 1) * (b + 1) > budget or b == rate.MAX_DDCM_BITS
    if b == rate.MAX_DDCM_BITS and out.steps < 1000:
        assert out.steps * b > budget  # one more step would not fit


def test_refusals():
    spec = CodeSpec.create(steps=30, codebook_size=1024, rule="turbo", num_atoms=4)
    with pytest.raises(rate.RateError, match="smallest turbo code"):
        rate.for_bpp(spec, 0.0001, 64 * 64)
    with pytest.raises(rate.RateError, match="positive"):
        rate.for_bpp(spec, -1, 64 * 64)
    with pytest.raises(rate.RateError, match="smallest ddcm"):
        rate.for_bpp(CodeSpec.create(steps=30, codebook_size=4), 1e-9, 64 * 64)
    with pytest.raises(rate.RateError, match="MatchingPursuit"):
        rate.for_bpp(CodeSpec.create(steps=30, codebook_size=4, num_atoms=2), 0.1, 64 * 64)
    assert bitstream.bits_per_step("turbo", 1024, 7) == turbo_bits(1024, 7)


def test_cli_bpp_pixel(tiny_model_dir, kodak, tmp_path, capsys):
    from ddcm_jax.cli import main

    out = tmp_path / "o"
    assert main(["compress", str(kodak / "kodim23.png"), "-o", str(out), "--model", str(tiny_model_dir), "--crop",
                 "--size", "32", "-T", "10", "-K", "64", "--bpp", "0.0005", "-q"]) == 0  # fmt: skip
    h = bitstream.decode_header((out / "kodim23.ddcm").read_bytes()).header
    budget = math.floor(0.0005 * 512 * 512)  # crop: the centre square is the image the user gets back
    assert h.spec.rule == "turbo" and bitstream.payload_bits(h) <= budget < 9 * turbo_bits(64, h.spec.num_atoms + 1)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", str(kodak / "kodim23.png"), "-o", str(tmp_path / "x"), "--model", str(tiny_model_dir),
              "--bpp", "0.01", "-M", "3"])  # fmt: skip
    assert "give one or the other" in capsys.readouterr().err


def test_ladder_points_increase_in_rate():
    for spec in (CodeSpec.create(steps=10, codebook_size=1024, rule="turbo", num_atoms=3),
                 CodeSpec.create(steps=10, codebook_size=1024)):  # fmt: skip
        bits = [p.payload_bits() for p in rate.ladder(spec)]
        assert bits == sorted(bits) and len(set(bits)) == len(bits)
    assert [p.rule.num_atoms for p in rate.ladder(CodeSpec.create(steps=5, codebook_size=64, rule="turbo"))] == [
        1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("target,reached", [(1.0, True), (99.0, False)])
def test_cli_psnr_target(tiny_model_dir, kodak, tmp_path, capsys, target, reached):
    import json

    from ddcm_jax.cli import main

    out = tmp_path / "o"
    assert main(["roundtrip", str(kodak / "kodim23.png"), "-o", str(out), "--model", str(tiny_model_dir), "--crop",
                 "--size", "32", "-T", "5", "-K", "16", "--psnr", str(target), "-q",
                 "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    rec = json.loads((tmp_path / "r.json").read_text())["items"][0]
    h = bitstream.decode_header((out / "kodim23.ddcm").read_bytes()).header
    note = next(n for n in rec["notes"] if n.startswith("--psnr"))
    # The search starts at the level's M (128, clipped to the ladder's top K / 2 = 8).
    if reached:  # every point reaches 1 dB: down from M = 8 to M = 1, 1 + log2(4) encodes
        assert h.spec.num_atoms == 1 and rec["psnr"] >= target and "reached" in note and "after 3 encodes" in note
    else:  # nothing reaches 99 dB: the start is also the top, M = 8, after one encode
        assert h.spec.num_atoms == 8 and rec["psnr"] < target and "did not reach" in note and "after 1 encodes" in note


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 17])
@pytest.mark.parametrize("start", [None, 0, 3, 6, 9, 16])
def test_search_finds_the_lowest_reaching_point(n, start):
    """Against a scan of every threshold (and none): the lowest index, within 2 + ceil(log2 n) calls."""
    for first in range(n + 1):  # the predicate holds from `first` on; n: nowhere
        calls = []

        def reaches(i, first=first, calls=calls):
            assert 0 <= i < n
            calls.append(i)
            return i >= first

        got = rate.search(n, reaches, start if start is not None and start < n else None)
        assert got == min(first, n - 1)
        assert len(calls) <= 2 + (n - 1).bit_length() and len(set(calls)) == len(calls)


def test_search_from_the_start_point_costs_less_near_it():
    calls = []
    assert rate.search(10, lambda i: calls.append(i) or i >= 8, start=7) == 8
    assert calls == [7, 9, 8]
    with pytest.raises(ValueError, match="no operating points"):
        rate.search(0, lambda i: True)
