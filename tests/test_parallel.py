"""Sharding over 8 (forced) CPU devices and two cooperating processes, each in its own subprocess.

The device count must be fixed before JAX starts, so these run `python` / `ddcm`
in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DDCM = [str(Path(sys.executable).with_name("ddcm"))] if Path(sys.executable).with_name("ddcm").exists() \
    else [sys.executable, "-m", "ddcm_jax.cli"]  # fmt: skip
CODING = ["-T", "4", "-K", "24", "--rule", "ddcm", "--crop"]


def run(cmd: list[str], devices: int = 1, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SCRIPT = r"""
import sys, numpy as np, jax, ddcm_jax
from ddcm_jax.parallel import compress_sharded, decompress_sharded, generate_sharded, make_mesh, restore_sharded
from ddcm_jax.operators import Colorization
assert jax.device_count() == 8
m = ddcm_jax.load_model(sys.argv[1])
ims = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
kw = dict(steps=5, codebook_size=100, key=3)
for rule, M in [("ddcm", 1), ("turbo", 4), ("mp", 3)]:
    single = [ddcm_jax.compress(m, im, rule=rule, num_atoms=M, coef_bits=2, **kw) for im in ims]
    for shape in [(8, 1), (2, 4), (1, 8)]:
        mesh = make_mesh(*shape)
        r = compress_sharded(m, ims, mesh=mesh, rule=rule, num_atoms=M, coef_bits=2, **kw)
        for b in range(5):  # the codebook split across devices ranks atoms as one device does
            assert np.array_equal(r.indices[b], single[b].indices), (rule, shape, b)
            assert np.array_equal(r.coeffs[b], single[b].coeffs), (rule, shape, b)
        d = decompress_sharded(m, r.indices, r.coeffs, mesh=mesh, rule=rule, num_atoms=M, coef_bits=2,
                               image_shape=(32, 32, 3), **kw)
        assert np.array_equal(np.asarray(d), np.asarray(r.image)), (rule, shape)
y = ims.mean(-1, keepdims=True)
one = ddcm_jax.restore(m, y[2], Colorization(), image_shape=(32, 32, 3), **kw)
r = restore_sharded(m, y, Colorization(), mesh=make_mesh(2, 4), image_shape=(32, 32, 3), **kw)
assert np.array_equal(r.indices[2], one.indices)
keys = jax.random.split(jax.random.key(1), 3)
g = generate_sharded(m, mesh=make_mesh(4, 2), key=keys, image_shape=(32, 32, 3), steps=5, codebook_size=100)
assert np.array_equal(g.indices[1], ddcm_jax.generate(m, key=keys[1], image_shape=(32, 32, 3), steps=5, codebook_size=100).indices)
print("OK")
"""


def test_sharded_sampling_matches_single_device_calls(tiny_model_dir):
    proc = run([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], devices=8)
    assert proc.stdout.strip().splitlines()[-1] == "OK"


@pytest.fixture(scope="module")
def image_dir(kodak, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    for i, name in enumerate(["kodim01", "kodim05", "kodim09", "kodim13", "kodim17", "kodim21", "kodim23"]):
        sub = d / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        shutil.copy(kodak / f"{name}.png", sub / f"{name}.png")
    return d


@pytest.fixture(scope="module")
def one_device_files(tiny_model_dir, image_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    run([*DDCM, "compress", str(image_dir), "-o", str(out), "--model", str(tiny_model_dir), *CODING, "-q"])
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.ddcm"))}


def test_eight_devices_write_byte_identical_files(tiny_model_dir, image_dir, one_device_files, tmp_path):
    out = tmp_path / "eight"
    run([*DDCM, "compress", str(image_dir), "-o", str(out), "--model", str(tiny_model_dir), *CODING, "-q"], devices=8)
    assert len(_files(one_device_files)) == 7
    assert _files(out) == _files(one_device_files)
    # On 8 devices the decoder reproduces the encoder's reconstruction exactly (roundtrip checks it).
    run([*DDCM, "roundtrip", str(image_dir / "a"), "-o", str(tmp_path / "rt"), "--model", str(tiny_model_dir),
         *CODING, "-q"], devices=8)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_inputs(tiny_model_dir, image_dir, one_device_files, tmp_path):
    out, summary, port = tmp_path / "multi", tmp_path / "summary.json", _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([*DDCM, "compress", str(image_dir), "-o", str(out), "--model", str(tiny_model_dir),
                               *CODING, "-q", "--json", str(summary), "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert _files(out) == _files(one_device_files)  # every input once, the same bytes
    merged = json.loads(summary.read_text())
    assert merged["processes"] == 2 and merged["failed"] == 0
    assert sorted(Path(item["file"]).name for item in merged["items"]) == sorted(
        p.name for p in image_dir.rglob("*.png")
    )
