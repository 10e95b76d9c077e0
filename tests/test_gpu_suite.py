"""benchmarks/gpu_suite.py in its reduced mode, on the CPU: the JSON's structure, its derived
numbers, that the compression it times is `ddcm_jax.compress` itself, and the budget / crash paths."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SUITE = _suite()
MODE = SUITE.MODES["reduced"]


def _run(out: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--mode", "reduced", "--json", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})  # fmt: skip


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_suite") / "reduced.json"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _positive(v: float) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def _check_timing(row: dict) -> None:
    assert _positive(row["seconds"]) and _positive(row["first_call_s"])
    assert all(_positive(s) for s in row["seconds_all"])
    assert row["seconds"] == pytest.approx(statistics.median(row["seconds_all"]), rel=1e-12)
    if "compile_s" in row:  # JAX rows: compiled ahead of time, XLA's memory account of one call
        assert _positive(row["compile_s"])
        assert row["compiled_memory"]["total_bytes"] > 0
        assert "peak_bytes_in_use" in row  # null on a CPU backend


def _parts(doc: dict, case: str) -> dict:
    return doc["cases"][case]["parts"]


def _ran(doc: dict, case: str, side: str) -> dict | None:
    """The side's results, or None when it was skipped for a recorded reason (no torch)."""
    part = _parts(doc, case)[side]
    if part["status"] == "skipped":
        assert part["reason"]
        return None
    assert part["status"] == "ok", part
    assert part["errors"] == [] and part["skipped"] == []
    return part


@pytest.mark.slow
def test_structure(reduced: dict) -> None:
    assert reduced["mode"] == "reduced" and reduced["finished"] is True and reduced["interrupted"] is None
    assert reduced["device"]["jax_device_kind"] and reduced["device"]["jax_backend"]
    assert reduced["versions"]["jax"] and reduced["versions"]["python"]
    assert list(reduced["cases"]) == list(SUITE.CASES)
    for name, case in reduced["cases"].items():
        assert set(case["parts"]) == {"jax", "torch"}
        assert case["status"] in ("ok", "partial"), (name, case["status"])
        assert _ran(reduced, name, "jax") is not None  # the JAX side always runs on a CPU in reduced mode
        for side, part in case["parts"].items():
            assert part["returncode"] == 0 and _positive(part["seconds"])
            if part["status"] != "skipped":
                assert part["env"], (name, side)
    jax_env = _parts(reduced, "adm_forward")["jax"]["env"]
    assert jax_env["rank_promotion"] == "raise"
    assert reduced["elapsed_s"] < 240


@pytest.mark.slow
def test_adm_forward(reduced: dict) -> None:
    jx = _ran(reduced, "adm_forward", "jax")
    assert [(r["batch"], r["dtype"]) for r in jx["rows"]] == [tuple(i) for i in MODE["forward"]["items"]]
    assert jx["config"]["params"] == sum(int(np.prod(v.shape)) for v in _leaves(SUITE.adm_params(MODE)))
    for r in jx["rows"]:
        _check_timing(r)
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-9)
    summary = reduced["cases"]["adm_forward"]["summary"]
    tr = _ran(reduced, "adm_forward", "torch")
    if tr is not None:
        assert [r["batch"] for r in tr["rows"]] == list(MODE["torch_forward"]["batches"])
        for r in tr["rows"]:
            _check_timing(r)
            assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-9)
            j = next(x for x in jx["rows"] if x["batch"] == r["batch"] and x["dtype"] == "float32")
            assert summary[f"torch_over_jax_seconds_float32_b{r['batch']}"] == pytest.approx(r["seconds"] / j["seconds"])


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.slow
def test_ddcm_compress_numbers(reduced: dict) -> None:
    cc = MODE["compress"]
    jx = _ran(reduced, "ddcm_compress", "jax")
    rows = {(r["batch"], r["steps"], r["dtype"]): r for r in jx["rows"]}
    assert list(rows) == [(b, s, d) for b, s, _, d in cc["plan"]]
    for (batch, steps, _), r in rows.items():
        _check_timing(r)
        assert r["K"] == cc["K"] and r["D"] == 3 * SUITE.adm_config(MODE).image_size ** 2
        assert r["seconds_per_image"] == pytest.approx(r["seconds"] / batch, rel=1e-9)
        assert r["images_per_s"] == pytest.approx(batch / r["seconds"], rel=1e-9)
        assert r["seconds_per_step"] == pytest.approx(r["seconds"] / steps, rel=1e-9)
        assert r["indices_shape"] == [batch, steps - 1, 1] and r["image_finite"]
    # The extrapolation to 1000 steps: two runs at batch 1 (fixed part apart), linear scaling otherwise
    # (and where timing noise made the two runs' fixed part negative).
    full, half = rows[1, cc["steps"], "float32"], rows[1, cc["half_steps"], "float32"]
    ex = full["extrapolated"]
    per_step = (full["seconds"] - half["seconds"]) / (cc["steps"] - cc["half_steps"])
    fixed = full["seconds"] - cc["steps"] * per_step
    if fixed >= 0:
        assert ex["method"].startswith("two runs")
        assert ex["per_step_s"] == pytest.approx(per_step, rel=1e-9)
        assert ex["fixed_s"] == pytest.approx(fixed, rel=1e-9, abs=1e-12)
    else:
        assert ex["method"].startswith("linear scaling (the two runs")
        assert ex["per_step_s"] == pytest.approx(full["seconds"] / cc["steps"], rel=1e-9) and ex["fixed_s"] == 0
    assert ex["seconds"] == pytest.approx(ex["fixed_s"] + 1000 * ex["per_step_s"], rel=1e-9)
    assert ex["seconds_per_image"] == pytest.approx(ex["seconds"], rel=1e-9)
    ex2 = rows[2, cc["steps"], "float32"]["extrapolated"]
    assert ex2["method"] == "linear scaling" and ex2["fixed_s"] == 0.0
    assert ex2["seconds"] == pytest.approx(rows[2, cc["steps"], "float32"]["seconds"] * 1000 / cc["steps"], rel=1e-9)
    assert ex2["seconds_per_image"] == pytest.approx(ex2["seconds"] / 2, rel=1e-9)
    assert "extrapolated" not in half

    summary = reduced["cases"]["ddcm_compress"]["summary"]
    assert summary["jax_b1_seconds_per_image_1000_steps"] == ex["seconds_per_image"]
    tr = _ran(reduced, "ddcm_compress", "torch")
    if tr is not None:
        (t,) = tr["rows"]
        _check_timing(t)
        assert (t["batch"], t["steps"], t["K"], t["indices_count"]) == (1, cc["steps"], cc["K"], cc["steps"] - 1)
        assert t["seconds_per_image"] == t["seconds"]
        assert summary["jax_over_torch_seconds_per_image_b1"] == pytest.approx(
            full["seconds_per_image"] / t["seconds_per_image"], rel=1e-9)  # fmt: skip
        for b, d, at in ((1, "float32", "b1"), (2, "float32", "b2"), (2, "bfloat16", "b2_bfloat16")):
            assert summary[f"speedup_vs_torch_b1_per_image_jax_{at}"] == pytest.approx(
                t["seconds_per_image"] / rows[b, cc["steps"], d]["seconds_per_image"], rel=1e-9)  # fmt: skip


@pytest.mark.slow
def test_ddcm_compress_times_the_real_thing(reduced: dict) -> None:
    """The indices the suite recorded are those of a direct `ddcm_jax.compress` call with the same key.

    One call at the largest batch checks every row of the full step count: a smaller batch's
    images are a prefix of a larger one's, and with a shared key batched indices equal single calls.
    """
    import ddcm_jax

    jx = _ran(reduced, "ddcm_compress", "jax")
    params = SUITE.adm_params(MODE)
    assert jx["config"]["params_sha256"] == SUITE.params_sha256(params)
    model = SUITE.adm_model(MODE, params)
    steps, k = MODE["compress"]["steps"], MODE["compress"]["K"]
    rows = [r for r in jx["rows"] if r["steps"] == steps and r["dtype"] == "float32"]
    batch = max(r["batch"] for r in rows)
    images, labels = SUITE.compress_inputs(MODE, batch)
    res = ddcm_jax.compress(model, images, steps=steps, codebook_size=k, key=SUITE.SEED, class_label=labels)
    indices = np.asarray(res.indices)
    assert len(rows) == 2
    for r in rows:
        np.testing.assert_array_equal(indices[: r["batch"]], np.asarray(r["indices"]), err_msg=f"batch {r['batch']}")


@pytest.mark.slow
def test_sd_components(reduced: dict) -> None:
    tb = MODE["turbo"]
    jx = _ran(reduced, "sd_components", "jax")
    assert jx["config"]["manifest_check"]["status"].startswith("not applicable")
    turbo, *unet = jx["rows"]
    assert (turbo["component"], turbo["K"], turbo["M"], turbo["D"]) == ("turbo_select", tb["K"], tb["M"],
                                                                       tb["latent"] ** 2 * 4)  # fmt: skip
    _check_timing(turbo)
    assert turbo["distinct_indices"] and turbo["noise_std"] == pytest.approx(1.0, rel=1e-4)
    assert turbo["steps_per_s"] == pytest.approx(1 / turbo["seconds"], rel=1e-9)
    assert [(r["batch"], r["dtype"]) for r in unet] == [tuple(i) for i in MODE["sd"]["items"]]
    for r in unet:
        assert r["component"] == "sd_unet"
        _check_timing(r)
        assert r["latents_per_s"] == pytest.approx(r["batch"] / r["seconds"], rel=1e-9)
    tr = _ran(reduced, "sd_components", "torch")
    if tr is not None:
        (t,) = tr["rows"]
        _check_timing(t)
        summary = reduced["cases"]["sd_components"]["summary"]
        assert summary["turbo_select_torch_over_jax_seconds"] == pytest.approx(t["seconds"] / turbo["seconds"])


@pytest.mark.slow
def test_latent_turbo_roundtrip(reduced: dict) -> None:
    lc = MODE["latent"]
    jx = _ran(reduced, "latent_turbo", "jax")
    cfg = jx["config"]
    assert cfg["manifest_check"]["status"].startswith("not applicable")
    n = lc["image"]
    assert (cfg["T"], cfg["K"], cfg["M"], cfg["rule"]) == (lc["T"], lc["K"], lc["M"], "turbo")
    assert cfg["D"] == math.prod(cfg["latent"]) and cfg["latent"] == [n // 8, n // 8, 4]
    coded = lc["T"] - 1 - cfg["no_bits_steps"]
    assert coded >= 1
    rows = jx["rows"]
    assert [(r["phase"], r["batch"], r["dtype"], r["kernel"]) for r in rows] == [
        (ph, b, d, k) for b, d, _, k in lc["plan"] for ph in ("compress", "decompress")]  # fmt: skip
    for enc, dec in zip(rows[::2], rows[1::2], strict=True):
        _check_timing(enc)
        _check_timing(dec)
        b = enc["batch"]
        assert enc["indices_shape"] == [b, coded, lc["M"]] and enc["image_finite"]
        assert enc["seconds_per_image"] == pytest.approx(enc["seconds"] / b, rel=1e-9)
        assert dec["decoded_equals_encoder_image"] is True  # the decoder rebuilt the encoder's picture
        assert dec["roundtrip_seconds"] == pytest.approx(enc["seconds"] + dec["seconds"], rel=1e-9)
        assert dec["roundtrip_seconds_per_image"] == pytest.approx(dec["roundtrip_seconds"] / b, rel=1e-9)
        assert dec["roundtrip_images_per_s"] == pytest.approx(b / dec["roundtrip_seconds"], rel=1e-9)
        for r in (enc, dec):
            assert r["compiled_memory"]["total_bytes"] > 0
    summary = reduced["cases"]["latent_turbo"]["summary"]
    tr = _ran(reduced, "latent_turbo", "torch")
    if tr is not None:
        (t,) = tr["rows"]
        _check_timing(t["compress"])
        _check_timing(t["decompress"])
        assert (t["batch"], t["T"], t["K"], t["M"], t["coded_steps"]) == (1, lc["T"], lc["K"], lc["M"], coded)
        assert tr["config"]["no_bits_steps"] == cfg["no_bits_steps"]
        assert t["roundtrip_seconds_per_image"] == pytest.approx(t["compress"]["seconds"] + t["decompress"]["seconds"])
        assert summary["torch_b1_roundtrip_seconds_per_image"] == t["roundtrip_seconds_per_image"]
        for dec in rows[1::2]:
            at = f"jax_{dec['dtype']}_b{dec['batch']}" + ("" if dec["kernel"] == "xla" else f"_{dec['kernel']}")
            assert summary[f"{at}_roundtrip_seconds_per_image"] == dec["roundtrip_seconds_per_image"]
            assert summary[f"speedup_vs_torch_b1_per_image_{at}"] == pytest.approx(
                t["roundtrip_seconds_per_image"] / dec["roundtrip_seconds_per_image"], rel=1e-9)  # fmt: skip


@pytest.mark.slow
def test_latent_turbo_times_the_real_thing(reduced: dict) -> None:
    """The recorded indices and signs are those of a direct `ddcm_jax.compress` (rule turbo) with the
    same key and weights, with either codebook kernel, and `ddcm_jax.decompress` of them gives that
    call's picture."""
    import ddcm_jax

    jx = _ran(reduced, "latent_turbo", "jax")
    params = SUITE.latent_params(MODE)
    assert jx["config"]["params_sha256"] == SUITE.params_sha256(params)
    model = SUITE.latent_model(MODE, params)
    lc = MODE["latent"]
    enc = [r for r in jx["rows"] if r["phase"] == "compress" and r["dtype"] == "float32"]
    assert {r["kernel"] for r in enc} == {"xla", "pallas"}
    batch = max(r["batch"] for r in enc)
    images = SUITE.latent_inputs(MODE, batch)
    kw = dict(steps=lc["T"], codebook_size=lc["K"], num_atoms=lc["M"], rule="turbo", key=SUITE.SEED)
    res = ddcm_jax.compress(model, images, **kw)
    for r in enc:
        np.testing.assert_array_equal(np.asarray(res.indices)[: r["batch"]], np.asarray(r["indices"]))
        np.testing.assert_array_equal(np.asarray(res.coeffs)[: r["batch"]], np.asarray(r["coeffs"]))
    back = ddcm_jax.decompress(model, res.indices, res.coeffs, image_shape=images.shape, **kw)
    np.testing.assert_array_equal(np.asarray(back.image), np.asarray(res.image))


@pytest.mark.slow
def test_selection_kernels(reduced: dict) -> None:
    """Each item timed with XLA's stream and the fused kernel, which chose the same indices."""
    items = MODE["selection"]["items"]
    jx = _ran(reduced, "selection", "jax")
    assert [(r["case"], r["kernel"]) for r in jx["rows"]] == [(it[0], k) for it in items for k in ("xla", "pallas")]
    pairs = zip(jx["rows"][::2], jx["rows"][1::2], strict=True)
    for (_, rule, k, shape, m), (xla, pallas) in zip(items, pairs, strict=True):
        for r in (xla, pallas):
            _check_timing(r)
            assert (r["rule"], r["K"], r["D"], r["M"]) == (rule, k, math.prod(shape), m)
        assert pallas["same_indices_as_xla"] is True
        assert pallas["xla_over_pallas_seconds"] == pytest.approx(xla["seconds"] / pallas["seconds"], rel=1e-9)
    summary = reduced["cases"]["selection"]["summary"]
    assert all(summary[f"{it[0]}_same_indices"] for it in items)
    tr = _ran(reduced, "selection", "torch")
    if tr is not None:
        assert [r["case"] for r in tr["rows"]] == [it[0] for it in items]
        for t in tr["rows"]:
            _check_timing(t)
            for r in jx["rows"]:
                if r["case"] == t["case"]:
                    assert summary[f"{t['case']}_torch_over_jax_{r['kernel']}_seconds"] == pytest.approx(
                        t["seconds"] / r["seconds"], rel=1e-9)  # fmt: skip


def test_extrapolate() -> None:
    two = SUITE.extrapolate(10.0, 100, 1000, (6.0, 50))
    assert two["per_step_s"] == pytest.approx(0.08) and two["fixed_s"] == pytest.approx(2.0)
    assert two["seconds"] == pytest.approx(82.0)
    lin = SUITE.extrapolate(10.0, 100, 1000)
    assert (lin["per_step_s"], lin["fixed_s"], lin["seconds"]) == (0.1, 0.0, pytest.approx(100.0))
    noisy = SUITE.extrapolate(10.0, 100, 1000, (4.0, 50))  # 0.12 s per step would leave -2 s fixed
    assert noisy["method"].startswith("linear scaling") and noisy["fixed_s"] == 0.0
    assert noisy["seconds"] == pytest.approx(100.0)


def test_budget_exhausted_skips_everything(tmp_path: Path) -> None:
    out = tmp_path / "none.json"
    proc = _run(out, "--budget-s", "0", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["finished"] is True
    for case in doc["cases"].values():
        assert case["status"] == "skipped"
        assert all("budget exhausted" in p["reason"] for p in case["parts"].values())


@pytest.mark.slow
def test_crash_is_recorded_and_the_rest_runs(tmp_path: Path) -> None:
    out = tmp_path / "crash.json"
    proc = _run(out, "--cases", "sd_components", env={"GPU_SUITE_CRASH": "sd_components:jax"}, timeout=120)
    assert proc.returncode == 1  # a side ended in error
    doc = json.loads(out.read_text())
    assert list(doc["cases"]) == ["sd_components"] and doc["finished"] is True
    parts = _parts(doc, "sd_components")
    assert parts["jax"]["status"] == "error" and parts["jax"]["returncode"] == 3
    assert parts["jax"]["error"] == "exit code 3" and "log_tail" in parts["jax"]
    assert parts["torch"]["status"] in ("ok", "skipped")  # ran after the crash (or had no torch)
    assert doc["cases"]["sd_components"]["status"] == "error"


@pytest.mark.slow
def test_hard_timeout_kills_and_keeps_the_file(tmp_path: Path) -> None:
    out = tmp_path / "timeout.json"
    # The part hangs (GPU_SUITE_HANG), so the kill does not depend on how fast this machine compiles: with a
    # warm compile cache the real part once finished inside the 3 s.
    proc = _run(out, "--cases", "adm_forward", "--budget-s", "3", env={"GPU_SUITE_HANG": "adm_forward:jax"},
                timeout=60)  # fmt: skip
    assert proc.returncode == 1
    doc = json.loads(out.read_text())
    assert doc["finished"] is True and doc["elapsed_s"] < 20
    parts = _parts(doc, "adm_forward")
    assert parts["jax"]["status"] == "timeout" and "budget" in parts["jax"]["error"]
    assert parts["torch"]["status"] == "skipped" and "budget exhausted" in parts["torch"]["reason"]
    assert doc["cases"]["adm_forward"]["status"] == "timeout"
