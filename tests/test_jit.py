"""The package's compile options change speed, never bits.

Every program is compiled with 512-bit CPU vectors (`ddcm_jax.jit`). Files made
before that option existed must decode to the same pixels and re-encode to the
same bytes (`test_v1_files` checks that through the command line). Here the
codebook and network programs are compiled both ways, explicitly, and compared
bit for bit; a whole encode both ways gives the same code; and a file is coded
both ways. XLA does not promise equal bits for long reductions: Turbo's noise,
normalised over all D values, differs in the 6th decimal (then the same both
times for encoder and decoder, which run the same programs).
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

from ddcm_jax.cli import main
from ddcm_jax.codebook import AtomSource
from ddcm_jax.jit import VECTOR_WIDTH_OPTION, compiler_options, jit
from ddcm_jax.model import load_model
from ddcm_jax.models.adm import ADMConfig, adm_apply, adm_init


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


def test_networks_are_the_same_bits(tiny_model_dir):
    x = jax.random.normal(jax.random.key(1), (2, 40, 56, 3), jnp.float32)
    t = jnp.array([10, 700])
    tiny = load_model(tiny_model_dir)
    xt = x[:, :32, :32]
    assert_same_bits([f(tiny, xt, t) for f in both_widths(lambda m, x, t: m(x, t))])
    default_like = ADMConfig.from_create_model(dict(image_size=128, num_channels=64, num_res_blocks=1,
                                                    channel_mult="1,2,2,4", attention_resolutions="16,8",
                                                    num_head_channels=32, use_scale_shift_norm=True))  # fmt: skip
    params = adm_init(default_like, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape), params)
    assert_same_bits([f(params, x, t) for f in both_widths(lambda p, x, t: adm_apply(default_like, p, x, t))])


def test_files_are_the_same_bytes_and_pixels_with_and_without_the_option(tiny_model_dir, kodak, tmp_path):
    """What users keep: a file coded by XLA's default build (as every earlier version did) and by ours.

    The same command in a subprocess with XLA_FLAGS setting the default width (so the package passes no
    option) and in this process (with it): identical files, and identical decoded pixels.
    """
    kodak_image = kodak / "kodim23.png"
    argv = ["compress", str(kodak_image), "--model", str(tiny_model_dir), "-T", "8", "-K", "64", "-M", "4",
            "--crop", "--save-reconstruction", "-q"]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --{VECTOR_WIDTH_OPTION}=256".strip()}
    code = "import sys; from ddcm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *argv, "-o", str(tmp_path / "w256")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert main([*argv, "-o", str(tmp_path / "w512")]) == 0
    name = kodak_image.with_suffix(".ddcm").name
    assert (tmp_path / "w256" / name).read_bytes() == (tmp_path / "w512" / name).read_bytes()
    pngs = sorted(p.name for p in (tmp_path / "w512").glob("*.png"))
    assert pngs
    for png in pngs:
        a, b = (np.asarray(Image.open(tmp_path / d / png)) for d in ("w256", "w512"))
        np.testing.assert_array_equal(a, b)


def test_a_whole_encode_gives_the_same_code(tiny_model_dir):
    from ddcm_jax.sampler import encode
    from ddcm_jax.spec import CodeSpec

    model = load_model(tiny_model_dir)
    image = jax.random.uniform(jax.random.key(4), (32, 32, 3), jnp.float32, -1, 1)
    for spec in (CodeSpec.create(steps=6, codebook_size=64),
                 CodeSpec.create(steps=6, codebook_size=64, num_atoms=4, rule="turbo")):  # fmt: skip
        a, b = (f(model, image) for f in both_widths(lambda m, x, s=spec: encode(m, s, x, key=jax.random.key(0))))
        np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
        np.testing.assert_array_equal(np.asarray(a.coeffs), np.asarray(b.coeffs))
        np.testing.assert_allclose(np.asarray(a.image), np.asarray(b.image), rtol=0, atol=1e-4)
