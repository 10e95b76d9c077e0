"""`ddcm_jax.jit`: 512-bit vectors change the speed of codebook scoring, never its bits.

`select_atoms` is compiled with the option; the codec's programs are not (the
option moves Turbo's long noise normalisation in its last bits, see
`ddcm_jax.jit`), so files keep their bytes and pixels; `test_v1_files` checks
that through the command line, and the last test here checks that the command
line ignores a width set either way.
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
from ddcm_jax.cli import main
from ddcm_jax.codebook import AtomSource
from ddcm_jax.jit import VECTOR_WIDTH_OPTION, compiler_options, jit


def both_widths(fn):
    """fn compiled with XLA's default 256-bit and with 512-bit vectors."""
    return [jax.jit(fn, compiler_options={VECTOR_WIDTH_OPTION: w}) for w in ("256", "512")]


def assert_same_bits(outs) -> None:
    a, b = (jax.tree_util.tree_leaves(o) for o in outs)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_options_follow_xla_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert compiler_options() == {VECTOR_WIDTH_OPTION: "512"}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert compiler_options() == {}  # the user's setting wins
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


def test_the_command_line_codes_the_same_file_whatever_the_width(tiny_model_dir, kodak, tmp_path):
    argv = ["compress", str(kodak / "kodim23.png"), "--model", str(tiny_model_dir), "-T", "8", "-K", "64", "-M", "4",
            "--crop", "--save-reconstruction", "-q"]  # fmt: skip
    code = "import sys; from ddcm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    for width in ("256", "512"):
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --{VECTOR_WIDTH_OPTION}={width}".strip()}
        proc = subprocess.run([sys.executable, "-c", code, *argv, "-o", str(tmp_path / width)], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    assert main([*argv, "-o", str(tmp_path / "default")]) == 0
    outs = [tmp_path / d for d in ("256", "512", "default")]
    assert len({(d / "kodim23.ddcm").read_bytes() for d in outs}) == 1
    pixels = [np.asarray(Image.open(d / "kodim23.png")) for d in outs]
    np.testing.assert_array_equal(pixels[0], pixels[2])
