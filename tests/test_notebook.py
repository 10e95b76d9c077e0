"""notebooks/quickstart.ipynb runs top to bottom on the tiny reference model."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tiny_model_dir, kodak, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DDCM_NOTEBOOK_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("DDCM_NOTEBOOK_IMAGE", str(kodak / "kodim23.png"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "bpp" in text and "PSNR" in text and "turbo M=4" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
