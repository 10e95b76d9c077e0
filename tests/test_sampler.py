"""The DDCM sampler against the original PyTorch traces (teacher-forced and free-running)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddcm_jax
from ddcm_jax.jit import compiler_options
from ddcm_jax.operators import Colorization
from ddcm_jax.pixel import predict_x0, schedule_xs, step
from ddcm_jax.sampler import compress, decompress, restore
from ddcm_jax.schedule import Schedule, space_timesteps
from ddcm_jax.selection import DDCM, MSE, AtomSource, MatchingPursuit, StepContext

TRACES = ["ddcm_compress_trace", "ddcm_mp_trace", "ddcm_colorization_trace"]


def nhwc(a):
    return np.moveaxis(np.asarray(a), -3, -1)


def load_trace(reference, name):
    meta = json.loads((reference / name / "trace.json").read_text())
    return meta, dict(np.load(reference / name / "trace.npz"))


def rule_for(meta):
    if meta["loss"] == "mse":
        assert meta["operator"]["name"] == "colorization"
        return MSE(Colorization())
    return DDCM() if meta["M"] == 1 else MatchingPursuit(meta["M"], meta["C"])


@pytest.mark.parametrize("name", TRACES)
def test_schedule_matches_trace(reference, name):
    meta, tr = load_trace(reference, name)
    sched = Schedule.create("linear", 1000, meta["diffusion"]["timestep_respacing"])
    np.testing.assert_array_equal(sched.timesteps, tr["timestep_map"])
    np.testing.assert_allclose(sched.alpha_bar, tr["alphas_cumprod"], rtol=1e-15)


def test_space_timesteps_semantics():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10,20")[:3] == [0, 5, 11]  # two sections, rounded strides
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


@pytest.mark.parametrize("name", TRACES)
def test_teacher_forced_steps(reference, tiny_model_dir, name):
    """Each step, given the trace's x_t and codebook, picks the same atoms and x_prev."""
    meta, tr = load_trace(reference, name)
    model = ddcm_jax.load_model(tiny_model_dir)
    rule = rule_for(meta)
    sched = Schedule.create("linear", 1000, meta["diffusion"]["timestep_respacing"])
    xs = schedule_xs(sched, meta["eta"])
    target = jnp.asarray(nhwc(tr["reference_image"]))
    y = jnp.asarray(nhwc(tr["measurement"])) if "measurement" in tr else None

    @jax.jit
    def one(x_t, rows, s):
        eps = model(x_t[None], s.t[None])[0, ..., :3]
        x0_hat, _ = predict_x0(x_t, eps, s)
        ctx = StepContext(x_t, x0_hat, s.sigma, s.alpha_bar_prev, target, y)
        book = AtomSource.from_array(rows)
        sel = rule.select(ctx, book)
        return x0_hat, sel, step(x_t, eps, s, sel.noise)

    for n in range(len(tr["step"])):
        s = jax.tree_util.tree_map(lambda a, n=n: a[n], xs)
        assert int(s.t) == tr["timestep"][n]
        x_t, rows = jnp.asarray(nhwc(tr["x_t"][n])), jnp.asarray(nhwc(tr["codebook"][n]))
        x0_hat, sel, x_prev = one(x_t, rows, s)
        # x0_hat amplifies the network's ~1e-6 error by sqrt(1/alpha_bar - 1) (157 at t = 999).
        np.testing.assert_allclose(x0_hat, nhwc(tr["pred_xstart"][n]), atol=1e-5 * float(s.sqrt_recipm1_ab) + 1e-5)
        np.testing.assert_allclose(x_prev, nhwc(tr["x_prev"][n]), atol=1e-4)
        if np.array_equal(sel.indices, tr["indices"][n]) and np.array_equal(sel.coeffs, tr["coeffs"][n]):
            continue
        # Only an exact tie may differ: in matching pursuit, candidates that are the same
        # vector in exact arithmetic (an atom mixed with itself, or c = 1 on a normalised
        # current) score equal, and the reference's pick among them is float32 rounding.
        # Then the reference's code must decode to our noise.
        assert isinstance(rule, MatchingPursuit), (n, sel.indices, tr["indices"][n])
        assert sel.indices[0] == tr["indices"][n][0]
        book = AtomSource.from_array(rows)
        ref_noise = rule.noise(book, jnp.asarray(tr["indices"][n]), jnp.asarray(tr["coeffs"][n]))
        np.testing.assert_allclose(sel.noise, ref_noise, atol=1e-5)


@pytest.mark.parametrize("name", TRACES)
def test_free_running_matches_trace(reference, tiny_model_dir, name):
    meta, tr = load_trace(reference, name)
    model = ddcm_jax.load_model(tiny_model_dir)
    steps, K = len(tr["step"]), meta["K"]
    rule = rule_for(meta)
    x_T, book = nhwc(tr["x_T"]), nhwc(tr["codebook"][: steps - 1])
    # Through one jitted call of the public keyword API: the steps are one scan. With the
    # package's compile options, as the Python API guide says, so that decompress (compiled
    # with them) can rebuild the encoder's image bit for bit.
    jit = functools.partial(jax.jit, compiler_options=compiler_options())
    if meta["loss"] == "mse":
        run = jit(lambda y, key: restore(model, y, Colorization(), steps=steps, codebook_size=K, rule=rule,
                                         key=key, x_T=x_T, codebook=book))  # fmt: skip
        res = run(nhwc(tr["measurement"]), jax.random.key(0))
    else:
        run = jit(lambda image, key: compress(model, image, steps=steps, codebook_size=K, rule=rule, key=key,
                                              x_T=x_T, codebook=book))  # fmt: skip
        res = run(nhwc(tr["reference_image"]), jax.random.key(0))
    np.testing.assert_array_equal(res.indices, tr["indices"][: steps - 1])
    np.testing.assert_allclose(res.image, nhwc(tr["final"]), atol=1e-3)
    out = decompress(model, res, steps=steps, codebook_size=K, image_shape=x_T.shape, rule=rule,
                     key=0, x_T=x_T, codebook=book)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out), np.asarray(res.image))
