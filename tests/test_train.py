"""`ddcm train`: a few steps reduce the loss; an interrupted run resumes to the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from ddcm_jax.cli import main
from ddcm_jax.families import load_model
from ddcm_jax.models.adm import ADMConfig, adm_init
from ddcm_jax.schedule import beta_schedule
from ddcm_jax.train import (
    PIP_IMAGES,
    TrainConfig,
    _pyramid,
    batch_at,
    diffusion_loss,
    load_training_images,
    train,
)

TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
            learn_sigma=False, use_scale_shift_norm=True)  # fmt: skip


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(model=TINY, images=PIP_IMAGES, max_side=None, crop=16, batch_size=8, steps=30, learning_rate=2e-3, warmup=5,
                                 checkpoint_every=10), **kw})  # fmt: skip


def held_out_loss(cfg: TrainConfig, params) -> float:
    """The loss on fixed batches and keys the run never drew (batch indices past its steps)."""
    arch = ADMConfig.from_create_model(cfg.model)
    pyramid = _pyramid(load_training_images(cfg.images)[0], cfg)
    ab = jnp.asarray(np.cumprod(1 - beta_schedule("linear", 1000)), jnp.float32)
    losses = [diffusion_loss(arch, params, jnp.asarray(batch_at(pyramid, cfg, 10_000 + i)), jax.random.key(77 + i), ab)
              for i in range(8)]  # fmt: skip
    return float(np.mean(losses))


def test_a_few_steps_reduce_the_loss(tmp_path):
    cfg = config()
    info = train(cfg, tmp_path / "m", quiet=True)
    model = load_model(tmp_path / "m")  # a MODEL_DIR like the converter's, fingerprint verified
    assert model.fingerprint == info["fingerprint"] and info["steps"] == 30
    init = jax.jit(adm_init, static_argnums=0)(model.config.architecture, jax.random.key(cfg.seed))
    before, after = held_out_loss(cfg, init), held_out_loss(cfg, model.params)
    assert before == pytest.approx(1.0, abs=0.05)  # zero-initialised output: eps_hat = 0
    assert after < 0.8 * before, (before, after)
    data = model.config.source["training"]["data"]
    assert [d["image"] for d in data] == list(cfg.images)
    assert all(len(d["sha256"]) == 64 and "kodim" not in d["file"] for d in data)


def test_resume_continues_the_step_count_and_reproduces_a_straight_run(tmp_path):
    cfg = config(steps=20)
    straight = train(cfg, tmp_path / "a", quiet=True, checkpoint_dir=tmp_path / "ca")
    part = train(cfg, tmp_path / "b", quiet=True, checkpoint_dir=tmp_path / "cb", stop_after=12)
    assert part["steps"] == 12
    rest = train(cfg, tmp_path / "b", quiet=True, checkpoint_dir=tmp_path / "cb", resume=True, overwrite=True)
    assert rest["steps"] == 20
    assert rest["fingerprint"] == straight["fingerprint"]  # same data, keys and updates: same weights
    with pytest.raises(ValueError, match="earlier run"):
        train(cfg, tmp_path / "c", quiet=True, checkpoint_dir=tmp_path / "cb")
    with pytest.raises(ValueError, match=r"another training config.*learning_rate"):
        train(config(steps=20, learning_rate=1e-3), tmp_path / "b", quiet=True, checkpoint_dir=tmp_path / "cb",
              resume=True, overwrite=True)  # fmt: skip


def test_train_command_line(tmp_path, capsys):
    import json

    (tmp_path / "cfg.json").write_text(json.dumps({"model": TINY, "crop": 16, "batch_size": 4, "warmup": 2,
                                                   "images": list(PIP_IMAGES), "max_side": None}))
    code = main(["train", "-o", str(tmp_path / "m"), "--config", str(tmp_path / "cfg.json"), "--steps", "3", "-q"])
    assert code == 0
    assert "3 steps" in capsys.readouterr().out
    assert main(["train", "-o", str(tmp_path / "m"), "--config", str(tmp_path / "cfg.json"), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("content, reason", [("[1, 2]", "JSON object"), ('{"stpes": 3}', "unknown fields"),
                                             ("{not json", "cannot read")])  # fmt: skip
def test_bad_training_config_is_one_line(tmp_path, capsys, content, reason):
    (tmp_path / "cfg.json").write_text(content)
    assert main(["train", "-o", str(tmp_path / "m"), "--config", str(tmp_path / "cfg.json"), "-q"]) == 1
    err = capsys.readouterr().err
    assert reason in err and str(tmp_path / "cfg.json") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("source, side", [
    ({"format": "ddcm_jax.train", "training": {"config": {"crop": 16}}}, 16),
    ({"format": "ddcm_jax.train", "training": {"config": {"crop": 32}}}, 32),
    ({"format": "ddcm_jax.train", "training": {"config": {"crop": 64}}}, 32),  # larger than the native size
    ({"format": "ddcm_jax.train", "training": {"config": {"crop": 15}}}, 32),  # not a multiple of 2
    ({"format": "ddcm_jax.train", "training": {"config": {"crop": True}}}, 32),
    ({"format": "ddcm_jax.train", "training": {"config": {"crop": "16"}}}, 32),
    ({"format": "ddcm_jax.train", "training": {"config": [16]}}, 32),
    ({"format": "ddcm_jax.train", "training": "crop 16"}, 32),
    ({"format": "guided-diffusion", "training": {"config": {"crop": 16}}}, 32),
    ({}, 32),
])  # fmt: skip
def test_generation_size_is_the_training_crop_when_there_is_a_sane_one(source, side):
    from ddcm_jax.model import ModelConfig

    arch = ADMConfig.from_create_model({**TINY, "image_size": 32})
    assert arch.size_multiple == 2
    assert ModelConfig(arch, source=source).generation_size == side


def test_packaged_models_generate_at_their_training_crop():
    import json
    from importlib import resources

    from ddcm_jax.model import ModelConfig

    sides = {}
    for name in ("default", "small-v1"):
        text = resources.files("ddcm_jax").joinpath("weights", name, "model.json").read_text()
        config, _ = ModelConfig.from_json(json.loads(text))
        sides[name] = (config.image_size, config.generation_size)
    assert sides == {"default": (128, 64), "small-v1": (128, 32)}
