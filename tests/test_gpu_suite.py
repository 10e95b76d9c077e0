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
    rows = {(r["batch"], r["steps"]): r for r in jx["rows"]}
    assert list(rows) == [(b, s) for b, s, _ in cc["plan"]]
    for (batch, steps), r in rows.items():
        _check_timing(r)
        assert r["K"] == cc["K"] and r["D"] == 3 * SUITE.adm_config(MODE).image_size ** 2
        assert r["seconds_per_image"] == pytest.approx(r["seconds"] / batch, rel=1e-9)
        assert r["images_per_s"] == pytest.approx(batch / r["seconds"], rel=1e-9)
        assert r["seconds_per_step"] == pytest.approx(r["seconds"] / steps, rel=1e-9)
        assert r["indices_shape"] == [batch, steps - 1, 1] and r["image_finite"]
    # The extrapolation to 1000 steps: two runs at batch 1 (fixed part apart), linear scaling otherwise
    # (and where timing noise made the two runs' fixed part negative).
    full, half = rows[1, cc["steps"]], rows[1, cc["half_steps"]]
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
    ex2 = rows[2, cc["steps"]]["extrapolated"]
    assert ex2["method"] == "linear scaling" and ex2["fixed_s"] == 0.0
    assert ex2["seconds"] == pytest.approx(rows[2, cc["steps"]]["seconds"] * 1000 / cc["steps"], rel=1e-9)
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
        for b in (1, 2):
            assert summary[f"speedup_vs_torch_b1_per_image_jax_b{b}"] == pytest.approx(
                t["seconds_per_image"] / rows[b, cc["steps"]]["seconds_per_image"], rel=1e-9)  # fmt: skip


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
    rows = [r for r in jx["rows"] if r["steps"] == steps]
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
