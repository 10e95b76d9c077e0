"""Latent DDCM, matching pursuit and Turbo-DDCM on Stable Diffusion (sd_tiny), against the
original PyTorch codes' step-by-step traces, and the properties of the latent sampler."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddcm_jax
from ddcm_jax import bitstream, latent

TOL = 1e-4  # the fixtures' README: a float32 port lands within ~1e-4 of every array


def nhwc(a) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(a), -3, -1))


def load(reference: Path, name: str) -> tuple[dict, dict]:
    meta = json.loads((reference / name / "trace.json").read_text())
    with np.load(reference / name / "trace.npz") as z:
        return meta, {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(sd_tiny_model_dir: Path):
    return ddcm_jax.load_model(sd_tiny_model_dir)


@pytest.fixture(scope="module")
def image(reference: Path) -> np.ndarray:
    return nhwc(load(reference, "ddcm_latent_trace")[1]["image"])


def trace_kwargs(meta: dict, z: dict) -> dict:
    kw = dict(steps=meta["T"], codebook_size=meta["K"], num_atoms=meta["M"], coef_bits=meta["C"], key=0,
              x_T=nhwc(z["x_T"]), codebook=nhwc(z["codebook"]))  # fmt: skip
    if "no_bits_steps" in meta:
        kw.update(rule="turbo", no_bits_steps=meta["no_bits_steps"])
    return kw


# -- schedules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddcm_latent_trace", "ddcm_latent_mp_trace", "turbo_ddcm_trace"])
def test_schedule_values_are_the_originals(reference, model, name):
    meta, z = load(reference, name)
    turbo = name.startswith("turbo")
    t, t_prev = (latent.turbo_timesteps if turbo else latent.ddcm_timesteps)(meta["T"])
    np.testing.assert_array_equal(t, z["timesteps"])
    np.testing.assert_array_equal(t_prev, z["prev_timesteps"])  # ddcm: t - 1000 // T, negative at the end
    coded = meta["T"] - 1 - meta.get("no_bits_steps", 0)
    xs = latent.latent_schedule(model.alphas_cumprod, model.final_alpha_cumprod, meta["T"],
                                "turbo" if turbo else "ddcm", coded)  # fmt: skip
    np.testing.assert_allclose(xs.sqrt_a, np.sqrt(z["alpha_prod_t"]), rtol=1e-7)
    np.testing.assert_allclose(xs.alpha_bar_prev, z["alpha_prod_t_prev"], rtol=1e-7)
    eta = z["eta"] if turbo else np.ones(meta["T"])
    np.testing.assert_allclose(xs.sigma, eta * np.sqrt(z["variance"]), rtol=1e-6, atol=1e-7)


def test_turbo_evenly_spaced_schedules(reference):
    meta, _ = load(reference, "turbo_ddcm_trace")
    for steps, expected in meta["evenly_spaced_schedule"].items():
        assert latent.turbo_timesteps(int(steps))[0].tolist() == expected
    assert list(latent.TURBO_TIMESTEPS) == meta["scheduler_list"]
    with pytest.raises(ValueError, match=r"2\.\.162"):
        latent.turbo_timesteps(163)


def test_no_bits_steps_heuristic(reference):
    meta, _ = load(reference, "turbo_ddcm_trace")
    examples = meta["no_bits_steps_heuristic_examples"]
    assert len(examples) >= 5
    for name, want in examples.items():
        d = dict(kv.split("=") for kv in name.replace("H=W", "HW").split(","))
        t, k, m, hw = (int(d[f]) for f in ("T", "K", "M", "HW"))
        assert latent.no_bits_steps_heuristic(t, k, m, hw, hw) == want["no_bits_steps"], name
    assert latent.no_bits_steps_heuristic(10, 64, 4, 128, 128) == meta["no_bits_steps_heuristic"]


# -- the step formula, network out of the loop -------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddcm_latent_trace", "turbo_ddcm_trace"])
def test_step_reproduces_each_traced_step(reference, model, name):
    meta, z = load(reference, name)
    turbo = name.startswith("turbo")
    coded = meta["T"] - 1 - meta.get("no_bits_steps", 0)
    xs = latent.latent_schedule(model.alphas_cumprod, model.final_alpha_cumprod, meta["T"],
                                "turbo" if turbo else "ddcm", coded)  # fmt: skip
    x = nhwc(z["x_t"])
    for i in range(meta["T"]):
        s = jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(a[i]), xs)
        if turbo:  # the trace stores eps; as an epsilon-prediction output it is its own eps_hat
            out, ptype = nhwc(z["eps"][i]), "epsilon"
        else:
            out, ptype = nhwc(z["model_out"][i]), model.prediction_type
        noise = nhwc(z["best_noise"][i]) if i < coded else np.zeros_like(x[i])
        x0_hat, _ = latent.predict(x[i], out, s, ptype)
        if i < coded:
            np.testing.assert_allclose(x0_hat, nhwc(z["x_0_hat"][i]), atol=TOL)
        np.testing.assert_allclose(latent.step(x[i], out, s, noise, ptype), x[i + 1], atol=TOL)


# -- whole runs against the traces --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddcm_latent_trace", "ddcm_latent_mp_trace", "turbo_ddcm_trace"])
def test_compress_replays_the_original(reference, model, name):
    """Each trace replayed through one jitted call of the public keyword API (one scan over the steps)."""
    meta, z = load(reference, name)
    kw = trace_kwargs(meta, z)
    x_T, codebook = kw.pop("x_T"), kw.pop("codebook")
    kw.pop("key")
    run = jax.jit(lambda image, key: ddcm_jax.compress(model, image, key=key, x_T=x_T, codebook=codebook, **kw))
    res = run(nhwc(z["image"]), jax.random.key(0))
    assert isinstance(res, latent.LatentResult)
    np.testing.assert_allclose(model.encode(jnp.asarray(nhwc(z["image"]))[None])[0], nhwc(z["enc_im"]), atol=TOL)
    if name.startswith("turbo"):
        np.testing.assert_array_equal(res.indices, z["sorted_indices"])
        # The file's sign bits (1 = negative); the original's bit is 1 for a positive sign.
        np.testing.assert_array_equal(res.coeffs, 1 - z["sorted_coeff_bits"])
    else:
        np.testing.assert_array_equal(res.indices, np.asarray(meta["indices"]).reshape(res.indices.shape))
        np.testing.assert_array_equal(res.coeffs, np.asarray(meta["coeff_indices"]).reshape(res.coeffs.shape))
    np.testing.assert_allclose(res.latent, nhwc(z["final_latent"]), rtol=1e-3, atol=TOL)
    np.testing.assert_allclose(res.image, nhwc(z["decoded"]), atol=TOL)
    unjitted = ddcm_jax.compress(model, nhwc(z["image"]), key=0, x_T=x_T, codebook=codebook, **kw)
    np.testing.assert_array_equal(unjitted.indices, res.indices)
    np.testing.assert_array_equal(unjitted.coeffs, res.coeffs)
    back = ddcm_jax.decompress(model, unjitted.indices, unjitted.coeffs, image_shape=(128, 128, 3), key=0, x_T=x_T,
                               codebook=codebook, **kw)  # fmt: skip
    np.testing.assert_array_equal(back.latent, unjitted.latent)  # the decoder replays the encoder exactly
    np.testing.assert_array_equal(back.image, unjitted.image)
    decode = jax.jit(lambda idx, co, key: ddcm_jax.decompress(model, idx, co, image_shape=(128, 128, 3), key=key,
                                                              x_T=x_T, codebook=codebook, **kw))  # fmt: skip
    np.testing.assert_array_equal(decode(res.indices, res.coeffs, jax.random.key(0)).latent, res.latent)


def test_turbo_code_is_the_originals_bitstream(reference):
    """Each step's rank of the sorted atom set and its sign bits are the original's step bit string."""
    meta, z = load(reference, "turbo_ddcm_trace")
    k, m = meta["K"], meta["M"]
    n_rank = meta["bits_for_rank"]
    assert bitstream.bits_per_step("turbo", k, m) == n_rank + m
    for i, bits in enumerate(meta["step_bitstrings"]):
        idx = z["sorted_indices"][i].tolist()
        rank = bitstream.rank_subset(idx, k)
        assert rank == meta["ranks"][i]
        signs = "".join(str(int(b)) for b in z["sorted_coeff_bits"][i])  # the original's bit: 1 = positive
        assert format(rank, f"0{n_rank}b") + signs == bits
        assert bitstream.unrank_subset(rank, k, m) == idx


@pytest.mark.parametrize("name", ["ddcm_latent_trace", "ddcm_latent_mp_trace", "turbo_ddcm_trace"])
def test_payload_bits_match_the_originals_bpp(reference, name):
    meta, _ = load(reference, name)
    turbo = name.startswith("turbo")
    spec = latent.make_spec(steps=meta["T"], codebook_size=meta["K"], image_hw=(128, 128),
                            rule="turbo" if turbo else "ddcm", num_atoms=meta["M"], coef_bits=meta["C"],
                            no_bits_steps=meta.get("no_bits_steps"))  # fmt: skip
    assert spec.code_rows == meta["T"] - 1 - meta.get("no_bits_steps", 0)
    assert latent.payload_bits(spec) / 128**2 == pytest.approx(meta["bpp"], abs=1e-8)


# -- properties with key-derived codebooks --------------------------------------------------------------------


def test_key_codebooks_roundtrip_batch_and_progress(model, image):
    kw = dict(steps=6, codebook_size=64, rule="turbo", num_atoms=3, no_bits_steps=1)
    key = jax.random.split(jax.random.key(7), 2)
    pair = np.stack([image, image[:, ::-1]])
    batch = ddcm_jax.compress(model, pair, key=key, **kw)
    assert batch.indices.shape == (2, 4, 3) and batch.latent.shape == (2, 16, 16, 4)
    calls = []
    one = ddcm_jax.compress(model, pair[1], key=key[1], progress=lambda d, t: calls.append((d, t)), **kw)
    assert calls == [(i, 6) for i in range(7)]
    np.testing.assert_array_equal(one.indices, batch.indices[1])
    np.testing.assert_array_equal(one.coeffs, batch.coeffs[1])
    # The same code; the latent to float rounding (a batch runs batched convolutions, summed in another order).
    np.testing.assert_allclose(one.latent, batch.latent[1], atol=1e-5)
    back = ddcm_jax.decompress(model, batch.indices, batch.coeffs, image_shape=(128, 128, 3), key=key, **kw)
    np.testing.assert_array_equal(back.image, batch.image)  # decoding replays the encoder exactly
    # Another key, other codebooks: another code.
    other = ddcm_jax.compress(model, image, key=8, **kw)
    assert not np.array_equal(other.indices, batch.indices[0])


def test_ddcm_t_range_idles_outside(model, image):
    kw = dict(steps=8, codebook_size=32, key=3)
    full = ddcm_jax.compress(model, image, **kw)
    part = ddcm_jax.compress(model, image, t_range=(400, 999), **kw)
    t, _ = latent.ddcm_timesteps(8)
    outside = t[:-1] < 400
    assert outside.any() and (~outside).any()
    np.testing.assert_array_equal(np.asarray(part.indices)[outside], 0)  # the idle code: atom 0
    back = ddcm_jax.decompress(model, part.indices, image_shape=(128, 128, 3), t_range=(400, 999), **kw)
    np.testing.assert_array_equal(back.latent, part.latent)
    assert not np.array_equal(full.latent, part.latent)


def test_generate_is_decodable(model):
    gen = ddcm_jax.generate(model, steps=5, codebook_size=16, key=11)
    assert gen.indices.shape == (4, 1) and gen.image.shape == (128, 128, 3)
    assert np.abs(np.asarray(gen.image)).max() <= 1.0
    back = ddcm_jax.decompress(model, gen.indices, steps=5, codebook_size=16, image_shape=(128, 128, 3), key=11)
    np.testing.assert_array_equal(back.latent, gen.latent)


def test_refusals(model, image):
    kw = dict(steps=6, codebook_size=16, key=0)
    with pytest.raises(ddcm_jax.SpecError, match="no_bits_steps"):
        ddcm_jax.compress(model, image, rule="turbo", num_atoms=2, no_bits_steps=5, **kw)
    with pytest.raises(ValueError, match="t_range"):
        ddcm_jax.compress(model, image, rule="turbo", num_atoms=2, t_range=(0, 500), **kw)
    with pytest.raises(ValueError, match="multiples of 8"):
        ddcm_jax.compress(model, image[:100], **kw)
    with pytest.raises(ValueError, match="class_label"):
        ddcm_jax.compress(model, image, class_label=3, **kw)
    with pytest.raises(ValueError, match="unknown latent schedule"):
        ddcm_jax.compress(model, image, schedule="cosine", **kw)
    with pytest.raises(ValueError, match="sign bits"):  # +-1 signs are not the code's 0/1 sign bits
        ddcm_jax.decompress(model, np.zeros((4, 2), np.int32), -np.ones((4, 2), np.int32), rule="turbo",
                            num_atoms=2, no_bits_steps=1, image_shape=(128, 128, 3), **kw)  # fmt: skip
    with pytest.raises(ddcm_jax.SpecError, match="codebook size"):
        ddcm_jax.compress(model, image, steps=6, codebook_size=0, key=0)


# -- the .ddcm format and the command line ----------------------------------------------------------------


def test_latent_header_roundtrip_and_refusals():
    from headers import flat_fields, make_header

    fp = bytes(range(16))
    h = make_header(rule="turbo", steps=10, codebook_size=64, num_atoms=4, fingerprint=fp, size=(128, 96),
               noise_schedule="scaled_linear", clip=False, latent_schedule="turbo", no_bits_steps=4,
               prompt_hash=bytes(16), guidance=7.5)  # fmt: skip
    assert h.version == 2 and h.spec.code_rows == 5
    rng = np.random.default_rng(0)
    idx = np.sort(np.stack([rng.choice(64, 4, replace=False) for _ in range(5)]), axis=1)
    co = rng.integers(0, 2, (5, 4))
    data = bitstream.encode(h, idx, co)
    st = bitstream.decode(data)
    assert st.header == h
    np.testing.assert_array_equal(st.indices, idx)
    np.testing.assert_array_equal(st.coeffs, co)
    assert st.payload_bits == 5 * (bitstream.bits_per_step("turbo", 64, 4))
    # A pixel header stays version 1, byte for byte what it was.
    pixel = make_header(rule="ddcm", steps=5, codebook_size=16, fingerprint=fp, size=(32, 32))
    assert bitstream.encode(pixel, np.zeros((4, 1)), np.zeros((4, 0)))[4] == 1
    bad = [dict(no_bits_steps=9), dict(latent_schedule="cosine"), dict(guidance=float("nan")),
           dict(prompt_hash=None), dict(clip=True), dict(t_range=(0, 500)), dict(task="colorization")]  # fmt: skip
    for change in bad:
        with pytest.raises(ValueError):
            make_header(**{**flat_fields(h), **change})
    with pytest.raises(ValueError, match="latent codes"):
        make_header(rule="ddcm", steps=5, codebook_size=16, fingerprint=fp, size=(32, 32), no_bits_steps=1)
    with pytest.raises(bitstream.BitstreamError):  # a version-2 file relabelled version 1
        bitstream.decode(data[:4] + b"\x01" + data[5:])


def test_cli_latent_roundtrip_info(sd_tiny_model_dir, kodak, tmp_path, capsys):
    from ddcm_jax.cli import main

    out = tmp_path / "out"
    src = kodak / "kodim23.png"
    m = str(sd_tiny_model_dir)
    assert main(["roundtrip", str(src), "-o", str(out), "--model", m, "-T", "6", "-K", "64", "-M", "2",
                 "--no-bits-steps", "2", "-q", "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    rec = json.loads((tmp_path / "r.json").read_text())["items"][0]
    assert rec["psnr"] is not None
    from PIL import Image

    assert Image.open(out / "kodim23.png").size == (768, 512)  # the input's size, whole
    h = bitstream.decode((out / "kodim23.ddcm").read_bytes()).header
    assert (h.version, h.spec.latent_schedule, h.spec.no_bits_steps, h.spec.code_rows) == (2, "turbo", 2, 3)
    assert h.geometry.size == (96, 128)  # fit: the longer side at the UNet's native 128, a multiple of 16
    capsys.readouterr()
    assert main(["info", str(out / "kodim23.ddcm")]) == 0
    assert "2 no-bits steps" in capsys.readouterr().out
    dec = tmp_path / "dec"
    assert main(["decompress", str(out / "kodim23.ddcm"), "-o", str(dec), "--model", m, "-q"]) == 0
    assert (dec / "kodim23.png").read_bytes() == (out / "kodim23.png").read_bytes()


def test_cli_latent_usage_errors(sd_tiny_model_dir, tmp_path, capsys):
    from ddcm_jax.cli import main

    m = str(sd_tiny_model_dir)  # generating and decoding: test_generate_is_decodable, the compressed CFG tests
    capsys.readouterr()
    for argv, fragment in [
        (["compress", "x.png", "-o", str(tmp_path / "a"), "--model", m, "--quality", "low"], "--quality"),
        (["restore", "x.png", "-o", str(tmp_path / "b"), "--model", m, "--task", "colorization"], "pixel-space"),
        (["compress", "x.png", "-o", str(tmp_path / "c"), "--model", m, "--guidance", "2"], "--prompt"),
        (["compress", "x.png", "-o", str(tmp_path / "d"), "--model", m, "-T", "6", "--no-bits-steps", "5"],
         "--no-bits-steps"),
        (["compress", "x.png", "-o", str(tmp_path / "e"), "--no-bits-steps", "1"], "latent"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert fragment in capsys.readouterr().err, argv


def test_compressed_cfg_replays_step_by_step_and_decodes_without_the_prompt(model):
    """Each step: eps_uncond for the step, and among N key-drawn atoms the one with the largest
    <z, eps_uncond - eps_cond> (DDCM's generate_ccfg); the decoder never sees the prompt."""
    from ddcm_jax.codebook import AtomSource

    steps, k, n, key = 5, 32, 6, jax.random.key(5)
    gen = ddcm_jax.generate(model, steps=steps, codebook_size=k, key=key, prompt="a photo of a cat", ccfg_subset=n)
    xs = latent.latent_schedule(model.alphas_cumprod, model.final_alpha_cumprod, steps, "ddcm", steps - 1)
    null, text = model.null_prompt, model.encode_prompt(["a photo of a cat"])
    x = jax.random.normal(jax.random.fold_in(key, 0), (16, 16, 4), jnp.float32)
    for i in range(steps):
        s = jax.tree_util.tree_map(lambda a, i=i: jnp.asarray(a[i]), xs)
        t = jnp.full((1,), int(xs.t[i]), jnp.int32)
        out_u, out_c = model(x[None], t, null)[0], model(x[None], t, text)[0]
        noise = jnp.zeros_like(x)
        if i < steps - 1:
            ks = np.asarray(jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, 2), i), (n,), 0, k))
            book = AtomSource(k, (16, 16, 4), "philox", root=jax.random.fold_in(key, 1), step=jnp.int32(i))
            atoms = np.asarray(book.get(jnp.asarray(ks)), np.float64)
            scores = atoms.reshape(n, -1) @ np.asarray(out_u - out_c, np.float64).ravel()
            assert int(gen.indices[i, 0]) == ks[int(np.argmax(scores))]
            noise = jnp.asarray(atoms[int(np.argmax(scores))], jnp.float32)
        x = latent.step(x, out_u, s, noise, model.prediction_type)
    np.testing.assert_allclose(gen.latent, x, atol=1e-5)
    back = ddcm_jax.decompress(model, gen.indices, steps=steps, codebook_size=k, image_shape=(128, 128, 3), key=key)
    np.testing.assert_array_equal(back.latent, gen.latent)  # no prompt needed
    again = ddcm_jax.generate(model, steps=steps, codebook_size=k, key=key, prompt="a photo of a cat", ccfg_subset=n)
    np.testing.assert_array_equal(again.indices, gen.indices)  # the subset comes from the key, not the clock
    other = ddcm_jax.generate(model, steps=steps, codebook_size=k, key=key, prompt="the cat", ccfg_subset=n)
    assert not np.array_equal(other.indices, gen.indices)
    with pytest.raises(ValueError, match="guidance"):
        ddcm_jax.compress(model, np.zeros((128, 128, 3), np.float32), steps=5, codebook_size=8, key=0, prompt="a")


def test_cli_compressed_cfg_files_decode_without_the_prompt(sd_tiny_model_dir, tmp_path, capsys):
    from ddcm_jax.cli import main

    m = str(sd_tiny_model_dir)
    gen = tmp_path / "gen"
    assert main(["generate", "-n", "1", "-o", str(gen), "--model", m, "-T", "5", "-K", "16", "-q",
                 "--prompt", "a photo of a cat", "--ccfg-subset", "4"]) == 0  # fmt: skip
    h = bitstream.decode_header((gen / "gen_0000.ddcm").read_bytes()).header
    assert h.task.prompt_hash is None and h.task.name == "generation"
    assert main(["decompress", str(gen / "gen_0000.ddcm"), "-o", str(tmp_path / "d"), "--model", m, "-q"]) == 0
    assert (tmp_path / "d" / "gen_0000.png").read_bytes() == (gen / "gen_0000.png").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compress", "x.png", "-o", str(tmp_path / "c"), "--model", m, "--prompt", "a cat"])
    assert "--guidance" in capsys.readouterr().err


def test_text_based_editing_switches_the_prompt_at_tskip(model, image):
    kw = dict(steps=6, codebook_size=16, key=4, image_shape=(128, 128, 3), guidance=5.0)
    res = ddcm_jax.compress(model, image, steps=6, codebook_size=16, key=4, prompt="a cat", guidance=5.0)
    src = ddcm_jax.decompress(model, res.indices, prompt="a cat", **kw)
    np.testing.assert_array_equal(src.latent, res.latent)
    # tskip = 0: every step follows the destination, as decoding the code with that prompt does.
    all_dst = ddcm_jax.decompress(model, res.indices, prompt="a cat", edit_prompt="the photo", tskip=0, **kw)
    plain_dst = ddcm_jax.decompress(model, res.indices, prompt="the photo", **kw)
    np.testing.assert_array_equal(all_dst.latent, plain_dst.latent)
    # tskip = T: no step changes; in between, a different image from both.
    none = ddcm_jax.decompress(model, res.indices, prompt="a cat", edit_prompt="the photo", tskip=6, **kw)
    np.testing.assert_array_equal(none.latent, src.latent)
    mid = ddcm_jax.decompress(model, res.indices, prompt="a cat", edit_prompt="the photo", tskip=3, **kw)
    assert not np.allclose(mid.latent, src.latent) and not np.allclose(mid.latent, plain_dst.latent)


def test_cli_edit_image_then_reedit_the_file(sd_tiny_model_dir, kodak, tmp_path, capsys):
    from ddcm_jax.cli import main

    m, out = str(sd_tiny_model_dir), tmp_path / "ed"
    edit = ["--src-prompt", "a photo of a cat", "--dst-prompt", "a photo of the cat", "--tskip", "2", "-q"]
    assert main(["edit", str(kodak / "kodim23.png"), "-o", str(out), "--model", m, "-T", "6", "-K", "64", "-M", "2",
                 "--no-bits-steps", "2", *edit]) == 0  # the settings of the other CLI tests: compiled once  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["kodim23.ddcm", "kodim23.png", "kodim23_edit.png"]
    h = bitstream.decode_header((out / "kodim23.ddcm").read_bytes()).header
    assert h.task.prompt_hash is not None and h.task.guidance == 6.0
    again = tmp_path / "again"
    assert main(["edit", str(out / "kodim23.ddcm"), "-o", str(again), "--model", m, *edit]) == 0
    assert (again / "kodim23_edit.png").read_bytes() == (out / "kodim23_edit.png").read_bytes()
    capsys.readouterr()
    assert main(["edit", str(out / "kodim23.ddcm"), "-o", str(tmp_path / "x"), "--model", m, "--src-prompt", "cat",
                 "--dst-prompt", "dog", "-q"]) == 1  # fmt: skip
    assert "not the one the file was coded with" in capsys.readouterr().err
    # Decoding a prompt-conditioned code needs its prompt back; without it, one line and no output.
    assert main(["decompress", str(out / "kodim23.ddcm"), "-o", str(tmp_path / "d"), "--model", m, "-q"]) == 1
    assert "give the same prompt" in capsys.readouterr().err
    assert not (tmp_path / "d" / "kodim23.png").exists()


_DEVICES_SCRIPT = """
import sys
import jax, numpy as np
import ddcm_jax
from ddcm_jax.parallel import compress_sharded, decompress_sharded, make_mesh
assert jax.local_device_count() == 3
model = ddcm_jax.load_model(sys.argv[1])
image = np.load(sys.argv[2])
kw = dict(steps=5, codebook_size=32, rule="turbo", num_atoms=2, no_bits_steps=1)
keys = jax.random.split(jax.random.key(5), 3)
batch = np.stack([image, image[:, ::-1], image[::-1]])
mesh = make_mesh()
got = compress_sharded(model, batch, mesh=mesh, key=keys, **kw)
for b in range(3):
    one = ddcm_jax.compress(model, batch[b], key=keys[b], **kw)  # the library call alone: the same code
    np.testing.assert_array_equal(np.asarray(one.indices), np.asarray(got.indices[b]))
    np.testing.assert_array_equal(np.asarray(one.coeffs), np.asarray(got.coeffs[b]))
    np.testing.assert_allclose(np.asarray(one.image), np.asarray(got.image[b]), atol=1e-5)
    # The codec's path on one device (what `ddcm` runs for one image): the same bits as on three.
    alone = compress_sharded(model, batch[b : b + 1], mesh=make_mesh(1), key=keys[b : b + 1], **kw)
    np.testing.assert_array_equal(np.asarray(alone.indices[0]), np.asarray(got.indices[b]))
    np.testing.assert_array_equal(np.asarray(alone.image[0]), np.asarray(got.image[b]))
back = decompress_sharded(model, got.indices, got.coeffs, mesh=mesh, image_shape=image.shape, key=keys, **kw)
np.testing.assert_array_equal(np.asarray(back), np.asarray(got.image))
print("ok", sorted({d.id for d in got.latent.devices()}))
"""


def test_a_batch_runs_across_devices_with_single_image_codes(sd_tiny_model_dir, image, tmp_path):
    """With 3 (forced host) devices, a batch of 3 runs one image per device (`ddcm_jax.parallel`, as for
    pixel models): every code and sign equals the same image's library call, every image bit for bit the
    same image's run on one device, and decoding the batch (spread the same way) replays it exactly."""
    import os
    import subprocess
    import sys

    np.save(tmp_path / "image.npy", image)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    proc = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(sd_tiny_model_dir), str(tmp_path / "image.npy")],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok [0, 1, 2]"), proc.stdout
