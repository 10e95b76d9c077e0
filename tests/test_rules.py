"""Operators, the remaining rules and entry points, gradients, and a plain-loop reference sampler."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ddcm_jax
from ddcm_jax.jit import compiler_options
from ddcm_jax.operators import (
    Colorization,
    GaussianBlur,
    Inpainting,
    SuperResolution,
    bicubic_matrix,
)
from ddcm_jax.pixel import predict_x0, schedule_xs, step
from ddcm_jax.schedule import Schedule
from ddcm_jax.selection import DDCM, MSE, AtomSource, Soft, StepContext, Turbo, TurboMSE


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- operators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [Colorization(), Inpainting((rng(0).random((16, 16, 1)) > 0.5).astype(np.float32)),
                                SuperResolution(4), GaussianBlur(jnp.float32(1.5), 7)])  # fmt: skip
def test_operators_are_linear(op):
    x, y = rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(op(2 * x - 3 * y), 2 * op(x) - 3 * op(y), atol=1e-5)


def test_bicubic_matches_pillow_in_the_interior():
    """Pillow's antialiased BICUBIC is Keys a = -0.5 stretched by the factor; borders differ by design."""
    x = rng(2).random((64, 48)).astype(np.float32)
    for f in (2, 4):
        ours = np.asarray(SuperResolution(f)(jnp.asarray(x)[..., None]))[..., 0]
        pil = np.asarray(Image.fromarray(x, mode="F").resize((48 // f, 64 // f), Image.BICUBIC))
        inner = (slice(2, -2), slice(2, -2))
        np.testing.assert_allclose(ours[inner], pil[inner], atol=1e-5)


def _resizer_matrix(n: int, factor: int) -> np.ndarray:
    """The DDRM/DPS `Resizer` construction (MATLAB imresize), written from its formula.

    1-based output coordinates x, matching input coordinate u = x / s + (1 - 1 / s) / 2
    with s = 1 / factor, taps floor(u - w / 2) - 1 + (0 .. ceil(w) + 1) for the kernel
    width w = 4 factor, weights s * cubic(s * (u - tap - 1)) normalised per row, and
    taps folded back with the mirror sequence 0 .. n-1, n-1 .. 0.
    """

    def cubic(x):
        a = np.abs(x)
        return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))

    s, width = 1.0 / factor, 4.0 * factor
    u = np.arange(1, n // factor + 1) / s + 0.5 * (1 - 1 / s)
    taps = np.floor(u - width / 2)[:, None] + np.arange(int(np.ceil(width)) + 2) - 1
    w = s * cubic(s * (u[:, None] - taps - 1))
    w /= w.sum(1, keepdims=True)
    mirror = np.concatenate([np.arange(n), np.arange(n - 1, -1, -1)])
    out = np.zeros((n // factor, n))
    for j in range(n // factor):
        np.add.at(out[j], mirror[np.mod(taps[j].astype(int), 2 * n)], w[j])
    return out


@pytest.mark.parametrize("n,factor", [(32, 2), (32, 4), (30, 3), (256, 4), (16, 8)])
def test_bicubic_matrix_is_the_resizer_of_ddrm_and_dps(n, factor):
    np.testing.assert_allclose(bicubic_matrix(n, factor), _resizer_matrix(n, factor), atol=1e-12)


def test_bicubic_rows_sum_to_one_and_keep_ramps():
    for n, f in [(32, 2), (32, 4), (30, 3)]:
        m = bicubic_matrix(n, f)
        np.testing.assert_allclose(m.sum(1), 1, atol=1e-12)
        ramp = np.arange(n, dtype=np.float64)
        centres = (np.arange(n // f) + 0.5) * f - 0.5
        inner = slice(2, -2)
        np.testing.assert_allclose((m @ ramp)[inner], centres[inner], atol=1e-9)


def test_gaussian_blur_of_an_impulse_is_the_kernel():
    x = np.zeros((15, 15, 1), np.float32)
    x[7, 7] = 1
    out = np.asarray(GaussianBlur(jnp.float32(2.0), 9)(jnp.asarray(x)))[..., 0]
    g = np.exp(-0.5 * (np.arange(-4, 5) / 2.0) ** 2)
    g /= g.sum()
    np.testing.assert_allclose(out[3:12, 3:12], np.outer(g, g), atol=1e-6)
    assert abs(out.sum() - 1) < 1e-5


def test_mse_inner_product_variant_scores():
    op = SuperResolution(2)
    book = AtomSource(8, (8, 8, 3), root=jax.random.key(0), step=jnp.int32(0))
    x0, y = rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
    y = op(jnp.asarray(y))
    ctx = StepContext(jnp.zeros((8, 8, 3)), jnp.asarray(x0), jnp.float32(0.5), jnp.float32(0.9), measurement=y)
    z = np.asarray(book.get(jnp.arange(8)))
    want = [float(np.sum(np.asarray(op(jnp.asarray(zk))) * np.asarray(y - op(jnp.asarray(x0))))) for zk in z]
    assert int(MSE(op, inner_product=True).select(ctx, book).indices[0]) == int(np.argmax(want))
    coef = 0.5 / math.sqrt(0.9)
    want = [-float(np.mean((coef * np.asarray(op(jnp.asarray(zk))) + np.asarray(op(jnp.asarray(x0)) - y)) ** 2)) for zk in z]
    assert int(MSE(op).select(ctx, book).indices[0]) == int(np.argmax(want))


@pytest.mark.parametrize("rule", [DDCM(), Turbo(3)])
def test_priority_weights_score_the_weighted_residual(rule):
    """Priority-aware coding: the rule sees w * (target - x0_hat), nothing else."""
    shape = (8, 8, 3)
    book = AtomSource(64, shape, root=jax.random.key(9), step=jnp.int32(4))
    g = rng(6)
    target, x0 = (jnp.asarray(g.uniform(-1, 1, shape), jnp.float32) for _ in range(2))
    w = jnp.zeros((8, 8, 1)).at[2:5, 3:6].set(1.0)  # only a 3x3 patch matters
    z = np.asarray(book.get(jnp.arange(64)), np.float64)
    scores = z.reshape(64, -1) @ np.asarray(w * (target - x0), np.float64).ravel()
    ctx = StepContext(jnp.zeros(shape), x0, jnp.float32(0.3), jnp.float32(0.9), target=target,
                      weights=jnp.broadcast_to(w, shape))  # fmt: skip
    sel = rule.select(ctx, book)
    if isinstance(rule, Turbo):
        want = np.sort(np.argsort(-np.abs(scores))[:3])
        np.testing.assert_array_equal(sel.indices, want)
        np.testing.assert_array_equal(sel.coeffs, (scores[want] < 0).astype(np.int32))
    else:
        assert int(sel.indices[0]) == int(np.argmax(scores))
    plain = rule.select(ctx._replace(weights=None), book)
    assert not np.array_equal(plain.indices, sel.indices)  # the map changed the choice
    ones = rule.select(ctx._replace(weights=jnp.ones(shape)), book)
    np.testing.assert_array_equal(ones.indices, plain.indices)


# --- entry points on the tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ddcm_jax.load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def image():
    return np.clip(rng(4).standard_normal((16, 16, 3)) * 0.5, -1, 1).astype(np.float32)


@pytest.mark.parametrize("name,op", [("super-resolution", SuperResolution(2)),
                                     ("blur", GaussianBlur(jnp.float32(1.0), 5)),
                                     ("inpainting", Inpainting(np.ones((16, 16, 1), np.float32)))])  # fmt: skip
def test_restore_runs_and_decodes(model, image, name, op):
    res = ddcm_jax.restore(model, op(jnp.asarray(image)), op, steps=4, codebook_size=16, key=1,
                           image_shape=image.shape)  # fmt: skip
    out = ddcm_jax.decompress(model, res, steps=4, codebook_size=16, image_shape=image.shape, key=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(res.image))


def test_restore_a_batch_equals_single_calls(model, image):
    op = Colorization()
    ims = jnp.stack([jnp.asarray(image), -jnp.asarray(image)])
    kw = dict(steps=4, codebook_size=16, key=2)
    batch = ddcm_jax.restore(model, jax.vmap(op)(ims), op, image_shape=ims.shape, **kw)
    for b in range(2):
        one = ddcm_jax.restore(model, op(ims[b]), op, image_shape=image.shape, **kw)
        np.testing.assert_array_equal(batch.indices[b], one.indices)
        np.testing.assert_allclose(batch.image[b], one.image, atol=1e-4)


def test_batch_arguments_are_shared_or_per_image_and_nothing_else(model, image):
    """In a batch, keys and weights are one (shared) or one per image; a shape with more axes is refused."""
    ims = jnp.stack([jnp.asarray(image), -jnp.asarray(image)])
    kw = dict(steps=3, codebook_size=8)
    keys = jax.random.split(jax.random.key(5), 2)
    shared = ddcm_jax.compress(model, ims, key=jax.random.key(5), **kw)
    per_image = ddcm_jax.compress(model, ims, key=keys, **kw)
    for b in range(2):
        np.testing.assert_array_equal(shared.indices[b], ddcm_jax.compress(model, ims[b], key=5, **kw).indices)
        np.testing.assert_array_equal(per_image.indices[b], ddcm_jax.compress(model, ims[b], key=keys[b], **kw).indices)
    with pytest.raises(ValueError, match=r"a \(B,\) array of them, got shape \(1, 2\)"):
        ddcm_jax.compress(model, ims, key=keys[None], **kw)
    with pytest.raises(ValueError, match="weights has shape"):
        ddcm_jax.compress(model, ims, key=5, weights=jnp.ones((1, *ims.shape)), **kw)


def test_t_range_selects_only_inside(model, image):
    kw = dict(steps=6, codebook_size=32, key=4)
    ts = np.asarray(Schedule.create("linear", 1000, "6").timesteps)[::-1][:-1]  # noise-adding steps
    everything = ddcm_jax.compress(model, image, t_range=(0, 999), **kw)
    np.testing.assert_array_equal(everything.indices, ddcm_jax.compress(model, image, **kw).indices)
    lo, hi = int(ts[3]), int(ts[1])
    res = ddcm_jax.compress(model, image, t_range=(lo, hi), **kw)
    inside = (ts >= lo) & (ts <= hi)
    assert inside.sum() == 3
    assert (np.asarray(res.indices)[~inside] == 0).all()
    assert (np.asarray(res.indices)[inside] != 0).any()
    out = ddcm_jax.decompress(model, res, image_shape=image.shape, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(res.image))
    with pytest.raises(ValueError, match="t_min <= t_max"):
        ddcm_jax.compress(model, image, t_range=(500, 100), **kw)


def test_generate_decodes_and_depends_on_the_key(model):
    a = ddcm_jax.generate(model, steps=5, codebook_size=64, key=1, image_shape=(16, 16, 3))
    b = ddcm_jax.generate(model, steps=5, codebook_size=64, key=2, image_shape=(16, 16, 3))
    assert a.indices.shape == (4, 1) and not np.array_equal(a.indices, b.indices)
    out = ddcm_jax.decompress(model, a, steps=5, codebook_size=64, image_shape=(16, 16, 3), key=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(a.image))
    assert a.image.shape == (16, 16, 3)
    with pytest.raises(ValueError, match="class-conditional"):
        ddcm_jax.generate(model, steps=5, codebook_size=64, key=1, class_label=3)


def test_class_conditional_generation_uses_the_label():
    from ddcm_jax.model import DiffusionModel, ModelConfig
    from ddcm_jax.models import ADMConfig, adm_init

    cfg = ADMConfig.from_create_model(dict(image_size=16, num_channels=32, num_res_blocks=1,
                                           channel_mult="1,2", attention_resolutions="8",
                                           class_cond=True))  # fmt: skip
    params = jax.jit(adm_init, static_argnums=0)(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    m = DiffusionModel(ModelConfig(cfg), params, "sha256:test")
    a = ddcm_jax.generate(m, steps=3, codebook_size=8, key=0, class_label=1)
    b = ddcm_jax.generate(m, steps=3, codebook_size=8, key=0, class_label=2)
    np.testing.assert_array_equal(a.indices, b.indices)  # random rule: indices from the key alone
    assert float(jnp.abs(a.image - b.image).max()) > 1e-4
    out = ddcm_jax.decompress(m, a, steps=3, codebook_size=8, image_shape=(16, 16, 3), key=0, class_label=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(a.image))


def test_select_atoms_is_the_argmax_over_key_atoms():
    root = jax.random.key(3)
    r = jax.random.normal(jax.random.key(4), (8, 8, 3))
    idx, noise = ddcm_jax.select_atoms(root, r, 100, step=2)
    # Compiled, as select_atoms and the sampler draw atoms (eager op-by-op Box-Muller may differ by an ulp).
    z = jax.jit(lambda: AtomSource(100, (8, 8, 3), root=root, step=jnp.int32(2)).get(jnp.arange(100)))()
    scores = np.asarray(jnp.einsum("k...,...->k", z, r))
    assert int(idx[0]) == int(np.argmax(scores))
    np.testing.assert_array_equal(noise, z[int(idx[0])])
    idx, _ = ddcm_jax.select_atoms(root, r, 100, step=2, num_atoms=5, rule="turbo")
    assert sorted(np.argsort(-np.abs(scores))[:5].tolist()) == np.asarray(idx).tolist()


def test_bits_accounting():
    assert ddcm_jax.bits_per_image(1000, 64) == 999 * 6
    assert ddcm_jax.bits_per_image(20, 1000, num_atoms=3, coef_bits=2) == 19 * (3 * 10 + 2 * 2)
    assert ddcm_jax.bits_per_image(2, 2**24) == 24
    exact = (math.comb(16384, 100) - 1).bit_length()
    assert ddcm_jax.bits_per_image(21, 16384, num_atoms=100, rule="turbo") == 20 * (exact + 100)
    assert 2 ** (exact - 1) < math.comb(16384, 100) <= 2**exact


# --- jit / loop equivalence --------------------------------------------------------------------


def test_scan_matches_a_plain_python_loop(model, image):
    steps, K, key = 5, 16, jax.random.key(6)
    res = ddcm_jax.compress(model, image, steps=steps, codebook_size=K, key=key)
    xs = schedule_xs(Schedule.create("linear", 1000, str(steps)))
    x = jax.random.normal(jax.random.fold_in(key, 0), image.shape)
    root = jax.random.fold_in(key, 1)
    picked = []
    book = lambda i: AtomSource(K, image.shape, root=root, step=jnp.int32(i))  # noqa: E731
    for n in range(steps):
        s = jax.tree_util.tree_map(lambda a, n=n: a[n], xs)
        eps = model(x[None], jnp.asarray([s.t]))[0, ..., :3]
        if n == steps - 1:
            x = step(x, eps, s, jnp.zeros_like(x))
            break
        x0_hat, _ = predict_x0(x, eps, s)
        z = book(int(s.i)).get(jnp.arange(K))
        k = int(jnp.argmax(jnp.einsum("k...,...->k", z, image - x0_hat)))
        picked.append(k)
        x = step(x, eps, s, z[k])
    assert np.asarray(res.indices)[:, 0].tolist() == picked
    # Eager vs compiled rounding, amplified by up to sqrt(1/alpha_bar) in early steps.
    np.testing.assert_allclose(np.asarray(res.image), np.asarray(x), atol=1e-4)


def test_compress_under_jit_equals_eager_call(model, image):
    kw = dict(steps=4, codebook_size=16, key=2)
    jitted = jax.jit(lambda im: ddcm_jax.compress(model, im, **kw), compiler_options=compiler_options())(image)
    plain = ddcm_jax.compress(model, image, **kw)
    np.testing.assert_array_equal(jitted.indices, plain.indices)
    np.testing.assert_allclose(jitted.image, plain.image, atol=1e-6)


# --- the soft rule and gradients ---------------------------------------------------------------


def _gradient_check(f, x, eps, rtol, seed=0):
    """Autodiff vs central differences along the gradient and along a random direction.

    Errors are measured against |grad|: a direction nearly orthogonal to the
    gradient has a tiny derivative that float32 differences cannot resolve
    relatively, while a wrong gradient errs by a fraction of |grad| anywhere.
    """
    g = jax.grad(f)(x)
    norm = float(jnp.linalg.norm(g))
    assert norm > 1e-3
    rand = jnp.asarray(np.random.default_rng(seed).standard_normal(np.shape(x)), jnp.float32)
    for d in (g / norm, rand / jnp.linalg.norm(rand)):
        ad = float(jnp.vdot(g, d))
        fd = (float(f(x + eps * d)) - float(f(x - eps * d))) / (2 * eps)
        assert abs(ad - fd) <= rtol * norm, (ad, fd, norm)


def test_soft_rule_gradients_match_finite_differences():
    """d compress / d (image, temperature, schedule, model parameter) against central differences.

    The prior is the exact denoiser of Gaussian data (tests/analytic.py) without
    clipping, so the loss is smooth and finite differences are meaningful (a
    random network with x0 clipping has kinks that a difference quotient straddles).
    """
    from analytic import LOG_S, GaussianDataModel

    gen = np.random.default_rng(1)
    im = jnp.asarray(np.clip(gen.standard_normal((8, 8, 3)) * 0.5, -1, 1), jnp.float32)
    v = jnp.asarray(gen.standard_normal((8, 8, 3)), jnp.float32)
    base = Schedule.create("linear", 1000, "4")
    ab0 = jnp.asarray(base.alpha_bar, jnp.float32)

    def loss(image=im, temperature=4.0, log_s=LOG_S, power=None):
        sched = None
        if power is not None:  # a one-parameter family of schedules, alpha_bar ** power
            ab = ab0**power
            sched = Schedule(ab, jnp.concatenate([jnp.ones(1), ab[:-1]]), base.timesteps, "linear", 1000, "4")
        res = ddcm_jax.compress(GaussianDataModel(log_s), image, rule=Soft(temperature), schedule=sched,
                                steps=4, codebook_size=16, key=0, clip=False)  # fmt: skip
        return jnp.sum(res.image * v)

    _gradient_check(jax.jit(lambda x: loss(image=x)), im, 2e-2, 1e-2)
    _gradient_check(jax.jit(lambda t: loss(temperature=t)), jnp.float32(4.0), 1e-2, 1e-2)
    _gradient_check(jax.jit(lambda p: loss(log_s=p)), jnp.float32(LOG_S), 1e-2, 2e-2)
    _gradient_check(jax.jit(lambda p: loss(power=p)), jnp.float32(1.0), 1e-2, 2e-2)


def test_straight_through_forward_equals_hard_choice(model, image):
    book = AtomSource(16, image.shape, root=jax.random.key(8), step=jnp.int32(3))
    x0 = jnp.asarray(rng(5).standard_normal(image.shape), jnp.float32) * 0.3
    ctx = StepContext(jnp.zeros(image.shape), x0, jnp.float32(0.5), jnp.float32(0.9), target=jnp.asarray(image))
    st = jax.jit(Soft(jnp.float32(1.0), straight_through=True).select)(ctx, book)
    hard = jax.jit(DDCM().select)(ctx, book)
    np.testing.assert_array_equal(st.indices, hard.indices)
    np.testing.assert_array_equal(st.noise, hard.noise)  # bit for bit

    kw = dict(steps=4, codebook_size=16, key=3)
    hard = ddcm_jax.compress(model, image, rule=DDCM(), **kw)
    st = ddcm_jax.compress(model, image, rule=Soft(jnp.float32(1.0), straight_through=True), **kw)
    np.testing.assert_array_equal(st.indices, hard.indices)
    # Two differently compiled programs round the network differently (~1e-6, amplified by x0).
    np.testing.assert_allclose(st.image, hard.image, atol=1e-4)
    g = jax.grad(lambda im: jnp.sum(ddcm_jax.compress(model, im, rule=Soft(jnp.float32(1.0), True), **kw).image))(
        jnp.asarray(image)
    )
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_step_by_step_equals_one_scan_and_reports_progress(model, image):
    """`progress=` runs one compiled call per step: the same codes and pixels, batched or not."""
    kw = dict(steps=5, codebook_size=16, num_atoms=2, rule="turbo", key=jax.random.split(jax.random.key(8), 2))
    ims = jnp.stack([jnp.asarray(image), -jnp.asarray(image)])
    seen = []
    stepped = ddcm_jax.compress(model, ims, progress=lambda done, total: seen.append((done, total)), **kw)
    whole = ddcm_jax.compress(model, ims, **kw)
    assert seen == [(i, 5) for i in range(6)]
    np.testing.assert_array_equal(stepped.indices, whole.indices)
    np.testing.assert_array_equal(stepped.coeffs, whole.coeffs)
    np.testing.assert_array_equal(stepped.image, whole.image)
    dec = dict(steps=5, codebook_size=16, num_atoms=2, rule="turbo", image_shape=ims.shape, key=kw["key"])
    seen.clear()
    out = ddcm_jax.decompress(model, whole, progress=lambda done, total: seen.append(done), **dec)
    assert seen == list(range(6))
    np.testing.assert_array_equal(out, whole.image)


def test_turbo_restoration_scores_atoms_against_the_pulled_back_residual():
    """TurboMSE picks the M largest |<A(z_k), y - A(x0_hat)>|, with their signs."""
    shape, op = (8, 8, 3), SuperResolution(2)
    book = AtomSource(64, shape, root=jax.random.key(9), step=jnp.int32(1))
    g = rng(10)
    x0, truth = (jnp.asarray(g.uniform(-1, 1, shape), jnp.float32) for _ in range(2))
    y = op(truth)
    z = np.asarray(jax.vmap(op)(book.get(jnp.arange(64))), np.float64).reshape(64, -1)
    scores = z @ np.asarray(y - op(x0), np.float64).ravel()
    ctx = StepContext(jnp.zeros(shape), x0, jnp.float32(0.3), jnp.float32(0.9), measurement=y)
    sel = TurboMSE(op, 5).select(ctx, book)
    want = np.sort(np.argsort(-np.abs(scores))[:5])
    np.testing.assert_array_equal(sel.indices, want)
    np.testing.assert_array_equal(sel.coeffs, (scores[want] < 0).astype(np.int32))
    np.testing.assert_array_equal(sel.noise, Turbo(5).noise(book, sel.indices, sel.coeffs))
    assert TurboMSE(op, 5).replay() == Turbo(5) and TurboMSE(op, 5).code_name == "turbo"


def test_select_atoms_called_eagerly_compiles_once():
    """A new key, step or residual of the same shape reuses the compiled selection."""
    from ddcm_jax.selection import _select_atoms

    r = jax.random.normal(jax.random.key(4), (8, 8, 3))
    ddcm_jax.select_atoms(jax.random.key(0), r, 32, step=1)
    before = _select_atoms._cache_size()
    for i in range(3):
        ddcm_jax.select_atoms(jax.random.key(i + 1), r * (i + 2), 32, step=i + 2)
    assert _select_atoms._cache_size() == before
