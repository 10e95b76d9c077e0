"""Strict JAX settings for the whole suite, and paths to the shared reference fixtures."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import jax
import pytest

# Implicit rank promotion hides shape bugs (an (H, W, 3) image silently
# broadcast against a (3,) vector); make it an error everywhere in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parent.parent
# The command line's persistent XLA cache stays out of the tests (one test turns it on in a tmp folder).
os.environ.setdefault("DDCM_COMPILE_CACHE", "0")
# `ddcm convert` lists its MODEL_DIRs for decoders: in tests, in a file of this run, not the user's.
os.environ.setdefault("DDCM_REGISTRY", os.path.join(tempfile.mkdtemp(prefix="ddcm-registry-"), "models.txt"))
SHARED = Path(os.environ.get("DDCM_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
KODAK = SHARED / "data" / "kodak"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect once and freeze the heap before an xdist worker reports that it has finished.

    After the report, pytest still collects garbage at unconfigure and the worker's
    end runs more collections; execnet sends a SIGINT to a worker still executing 5 s
    after the controller asks it to stop. A worker's heap here is over a million
    objects (JAX's traces and programs), a full collection 1-1.4 s on 2 busy cores,
    so the worker sometimes ran past 5 s and the interrupt surfaced in a GC callback
    as a `KeyboardInterrupt` warning under a passing run. Frozen objects are never
    scanned again, so those later collections only see what is new.
    """
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="PyTorch not installed (pip install '.[bench]')")
        for item in items:
            if "torch" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE} (set DDCM_SHARED)")
    return REFERENCE


@pytest.fixture(scope="session")
def kodak() -> Path:
    """The 24 Kodak images (evaluation only: never train on them)."""
    if not (KODAK / "kodim23.png").is_file():
        pytest.fail(f"Kodak images not found at {KODAK} (set DDCM_SHARED)")
    return KODAK


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, reference: Path) -> Path:
    """adm_tiny converted once per session through the public converter."""
    from ddcm_jax.convert import main

    out = tmp_path_factory.mktemp("models") / "adm_tiny"
    code = main([str(reference / "adm_tiny" / "model.pt"), "-o", str(out),
                 "--config", str(reference / "adm_tiny" / "config.json")])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def sd_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, reference: Path) -> Path:
    """The sd_tiny pipeline converted once per session through the public converter."""
    from ddcm_jax.convert import main

    out = tmp_path_factory.mktemp("models") / "sd_tiny"
    assert main([str(reference / "sd_tiny"), "-o", str(out), "--format", "diffusers"]) == 0
    return out


@pytest.fixture(scope="session")
def flux_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, reference: Path) -> Path:
    """The flux_tiny pipeline converted once per session through the public converter."""
    from ddcm_jax.convert import main

    out = tmp_path_factory.mktemp("models") / "flux_tiny"
    assert main([str(reference / "flux_tiny"), "-o", str(out), "--format", "diffusers"]) == 0
    return out
