"""Every Python block of README.md and docs/*.md runs as pasted.

Each block runs in a fresh interpreter, in a folder laid out as the docs say a reader's is: the
models they name converted into `models/` by `ddcm convert` (the test fixtures, converted through
the same command: adm_tiny, and the tiny Stable Diffusion and FLUX.1 pipelines standing in for the
released ones, which are not on this machine) and a `photo.png`. A block that needs anything else
fails here, as it would for the reader.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_OPEN = re.compile(r"^(\s*)(`{3,})python\s*$")

# The model folders the docs name, and the session fixture converted the same way.
MODELS = {"models/adm_tiny": "tiny_model_dir", "models/sd21-base": "sd_tiny_model_dir",
          "models/flux1-dev": "flux_tiny_model_dir"}  # fmt: skip


def python_blocks() -> list[tuple[str, str]]:
    """(page:line, code) of every ```python block, dedented (blocks inside list items are indented)."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = _OPEN.match(lines[i])
            if not m:
                i += 1
                continue
            start, fence = i + 1, m.group(2)
            j = start
            while j < len(lines) and lines[j].strip() != fence:
                j += 1
            out.append((f"{page.relative_to(ROOT)}:{start}", textwrap.dedent("\n".join(lines[start:j]))))
            i = j + 1
    return out


BLOCKS = python_blocks()


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 6, [where for where, _ in BLOCKS]


@pytest.mark.parametrize("where,code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_block_runs_as_pasted(where, code, request, tmp_path, kodak):
    (tmp_path / "models").mkdir()
    for folder, fixture in MODELS.items():
        if folder in code:
            (tmp_path / folder).symlink_to(request.getfixturevalue(fixture), target_is_directory=True)
    px = np.asarray(Image.open(kodak / "kodim23.png").convert("RGB"))[200:248, 300:340]
    Image.fromarray(px).save(tmp_path / "photo.png")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{where}:\n{proc.stderr[-3000:]}"
