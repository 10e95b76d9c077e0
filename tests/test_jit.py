"""`ddcm_jax.jit`: the package's XLA:CPU options, and what they may and may not change.

512-bit vectors change the speed of codebook scoring, never its bits. Every
program the package compiles gets the options (`select_atoms`, the model calls,
the codec's programs); they change how XLA sums, which the format allows: a file
decodes to the same picture whatever options it was coded and decoded with
(`test_v1_files` checks the pinned files; the last test here, a file coded with
a width the user set), and the same bits within one program.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddcm_jax
from ddcm_jax import metrics
from ddcm_jax.cli import main
from ddcm_jax.codebook import AtomSource
from ddcm_jax.jit import LIBRARY_FUSION_OPTION, VECTOR_WIDTH_OPTION, compiler_options, jit


def both_widths(fn):
    """fn compiled with XLA's default 256-bit and with 512-bit vectors."""
    return [jax.jit(fn, compiler_options={VECTOR_WIDTH_OPTION: w}) for w in ("256", "512")]


def assert_same_bits(outs) -> None:
    a, b = (jax.tree_util.tree_leaves(o) for o in outs)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_options_follow_xla_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler_options() == {VECTOR_WIDTH_OPTION: "512", LIBRARY_FUSION_OPTION: ""}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert compiler_options() == {LIBRARY_FUSION_OPTION: ""}  # the user's setting wins
    monkeypatch.setenv("XLA_FLAGS", f"--{LIBRARY_FUSION_OPTION}=LIBRARY_FUSION_TYPE_DOT --{VECTOR_WIDTH_OPTION}=256")
    assert compiler_options() == {}
    # XLA reads XLA_FLAGS once, at its first compile in the process: compile with it unset.
    monkeypatch.delenv("XLA_FLAGS")
    f = jit(lambda x: x * 2)
    assert float(f(jnp.float32(1.5))) == 3.0


@pytest.mark.parametrize("generator", ["philox", "threefry", "shift"])
@pytest.mark.parametrize("shape", [(37, 23, 3), (64, 64, 3)])
def test_codebook_scores_and_choices_are_the_same_bits(generator, shape):
    r = jax.random.normal(jax.random.key(5), shape, jnp.float32)

    def select(r):
        book = AtomSource(300, shape, generator, root=jax.random.key(3), step=jnp.int32(7)).with_base()
        return book.scores(r), book.best(r), book.top_abs(r, 5) if generator != "shift" else ()

    assert_same_bits([f(r) for f in both_widths(select)])


def test_select_atoms_at_top_level_and_inside_a_jit():
    r = jax.random.normal(jax.random.key(6), (40, 24, 3), jnp.float32)
    key = jax.random.key(9)
    eager = ddcm_jax.select_atoms(key, r, 512, step=3)  # optioned program
    nested = jax.jit(lambda r: ddcm_jax.select_atoms(key, r, 512, step=3))(r)  # inside the caller's program
    assert_same_bits([eager, nested])
    yours = jax.jit(lambda r: ddcm_jax.select_atoms(key, r, 512, step=3), compiler_options=compiler_options())(r)
    assert_same_bits([eager, yours])


def test_a_model_call_runs_the_optioned_program_at_top_level(tiny_model_dir):
    # Eagerly: the optioned program (compiled once, then cached); inside a caller's plain
    # jax.jit: the caller's program. Both compute the network to float32 rounding.
    tiny_model = ddcm_jax.load_model(tiny_model_dir)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float32)
    t = jnp.array([10, 900])
    eager = np.asarray(tiny_model(x, t))
    nested = np.asarray(jax.jit(lambda m, x, t: m(x, t))(tiny_model, x, t))
    np.testing.assert_allclose(eager, nested, atol=1e-5)
    # (The caller's jit given compiler_options() gives the eager call's bits: test_adm.)


def test_a_file_coded_with_another_width_decodes_to_the_same_picture(tiny_model_dir, kodak, tmp_path):
    # The user's XLA_FLAGS width wins, in a program whose last bits then differ: its
    # file still decodes, under the package's own options, to the picture it was coded
    # with, within the format's tolerance (>= 60 dB, <= 2 grey levels).
    argv = ["compress", str(kodak / "kodim23.png"), "--model", str(tiny_model_dir), "-T", "8", "-K", "64", "-M", "4",
            "--crop", "--save-reconstruction", "-q"]  # fmt: skip
    code = "import sys; from ddcm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --{VECTOR_WIDTH_OPTION}=256".strip()}
    proc = subprocess.run([sys.executable, "-c", code, *argv, "-o", str(tmp_path / "256")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert main(["decompress", str(tmp_path / "256" / "kodim23.ddcm"), "--model", str(tiny_model_dir),
                 "-o", str(tmp_path / "decoded"), "-q"]) == 0  # fmt: skip
    coded = np.asarray(Image.open(tmp_path / "256" / "kodim23.png")).astype(np.int16)
    decoded = np.asarray(Image.open(tmp_path / "decoded" / "kodim23.png")).astype(np.int16)
    assert np.abs(coded - decoded).max() <= 2
    assert metrics.psnr(coded.astype(np.uint8), decoded.astype(np.uint8)) >= 60.0
