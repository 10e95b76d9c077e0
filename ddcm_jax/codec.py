"""Images <-> `.ddcm` bytes: the sampler, the bitstream format and the size policies together.

    enc = encode_image(model, pixels, CodecSettings(steps=20, codebook_size=256))
    enc.data          # the file's bytes
    enc.decoded       # uint8, exactly what decode_bytes(model, enc.data) returns
    pixels, stream = decode_bytes(model, enc.data)

The encoder samples with the header's own values (eta as stored, the seed's
threefry key, the schedule the header names), so the decoder, which knows only
the header, replays the same arithmetic. Both always compile the per-step
progress callback in (`ddcm_jax.progress.on_step` listens to it; unheard, it
does nothing), so that encoder and decoder programs never differ by it.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import numpy as np

from ddcm_jax import bitstream, images
from ddcm_jax.bitstream import Bitstream, BitstreamError, Header
from ddcm_jax.codebook import atom, step_key
from ddcm_jax.memory import MemoryBudgetError, check_fits
from ddcm_jax.operators import Colorization, GaussianBlur, Inpainting, SuperResolution
from ddcm_jax.sampler import PRNG_IMPL, compress, decompress, generate, restore
from ddcm_jax.schedule import Schedule

__all__ = [
    "RESTORATION_TASKS",
    "CodecSettings",
    "Encoded",
    "check_model",
    "codebook_check",
    "decode_bytes",
    "encode_image",
    "generate_image",
    "restore_image",
]

RESTORATION_TASKS = ("colorization", "super-resolution", "inpainting", "blur")


@dataclasses.dataclass(frozen=True)
class CodecSettings:
    """What an encoder chooses. `rule`: "ddcm" (matching pursuit when num_atoms > 1), "mp", "turbo"."""

    steps: int
    codebook_size: int
    num_atoms: int = 1
    coef_bits: int = 1
    rule: str = "ddcm"
    seed: int = 0
    t_range: tuple[int, int] | None = None
    eta: float = 1.0
    size_policy: str = "crop"

    @property
    def header_rule(self) -> str:
        if self.rule == "ddcm":
            return "ddcm" if self.num_atoms == 1 else "mp"
        if self.rule in ("mp", "turbo"):
            return self.rule
        raise ValueError(f"unknown rule {self.rule!r} (ddcm, mp, turbo)")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One encoded image: the file bytes and what decoding them gives."""

    data: bytes
    header: Header
    decoded: np.ndarray  # uint8 (H, W, 3) in the output geometry: decode_bytes returns exactly this
    reference: np.ndarray | None  # uint8, the input in the same geometry (None for generation)
    notes: tuple[str, ...] = ()

    @property
    def payload_bits(self) -> int:
        return bitstream.payload_bits(self.header)


def codebook_check(seed: int, partitionable: bool) -> int:
    """CRC-32 of a coarse probe of the atoms the key `seed` gives under these PRNG settings.

    32 values of atom 0 of step 0, rounded to quarters: a different generator or
    normal transform changes them entirely, while last-bit float differences
    between backends almost never move a value across a rounding boundary.
    """
    root = jax.random.fold_in(jax.random.key(seed, impl=PRNG_IMPL), 1)
    with jax.threefry_partitionable(partitionable):
        z = np.asarray(atom(step_key(root, 0), 0, (32,)), np.float64)
    return zlib.crc32(np.round(z * 4).astype(np.int8).tobytes())


def _fingerprint_bytes(model: Any) -> bytes:
    fp = str(model.fingerprint)
    if not fp.startswith("sha256:"):
        raise ValueError(f"model fingerprint {fp!r} is not a sha256 fingerprint")
    return bytes.fromhex(fp[len("sha256:") :])[: bitstream.FINGERPRINT_BYTES]


def _header(model: Any, s: CodecSettings, *, rule: str, size: tuple[int, int],
            original: tuple[int, int], policy: str, **extra: Any) -> Header:  # fmt: skip
    d = model.config.diffusion
    m = s.num_atoms if rule in ("mp", "turbo") else 1
    t_range = None if s.t_range is None else (min(s.t_range), max(s.t_range))
    return Header(
        rule=rule, steps=s.steps, codebook_size=s.codebook_size, num_atoms=m,
        coef_bits=s.coef_bits if rule == "mp" else 0, fingerprint=_fingerprint_bytes(model),
        size=size, original_size=original, size_policy=policy, t_range=t_range, eta=s.eta,
        seed=s.seed, noise_schedule=d.noise_schedule, num_timesteps=d.num_timesteps,
        compute_dtype=model.config.compute_dtype, jax_version=jax.__version__,
        threefry_partitionable=bool(jax.config.jax_threefry_partitionable),
        codebook_check=codebook_check(s.seed, bool(jax.config.jax_threefry_partitionable)),
        **extra,
    )  # fmt: skip


def _schedule(h: Header) -> Schedule:
    return Schedule.create(h.noise_schedule, h.num_timesteps, h.respacing_or_steps)


def _key(h: Header) -> jax.Array:
    return jax.random.key(h.seed, impl=h.prng_impl)


def _finish(h: Header, x: Any, code: Any, reference: np.ndarray | None, notes: list[str]) -> Encoded:
    data = bitstream.encode(h, np.asarray(code.indices), np.asarray(code.coeffs))
    decoded = images.restore_geometry(images.from_model(np.asarray(x)), h.size_policy, h.original_size)
    return Encoded(data, h, decoded, reference, tuple(notes))


def _coded_input(model: Any, pixels: np.ndarray, policy: str) -> tuple[np.ndarray, tuple[int, int]]:
    arch = model.config.architecture
    size = images.coded_size(pixels.shape[:2], policy, arch.image_size, arch.size_multiple)
    check_fits(arch, *size)
    coded = images.prepare(pixels, policy, arch.image_size, arch.size_multiple)
    return coded, (int(pixels.shape[0]), int(pixels.shape[1]))


def encode_image(model: Any, pixels: np.ndarray, settings: CodecSettings, *, notes: tuple[str, ...] = ()) -> Encoded:  # fmt: skip
    """Compress uint8 RGB pixels (H0, W0, 3) under the settings' size policy."""
    coded, original = _coded_input(model, pixels, settings.size_policy)
    h = _header(model, settings, rule=settings.header_rule, size=coded.shape[:2], original=original,
                policy=settings.size_policy)  # fmt: skip
    res = compress(model, images.to_model(coded), steps=h.steps, codebook_size=h.codebook_size,
                   num_atoms=settings.num_atoms, coef_bits=settings.coef_bits, rule=h.rule, key=_key(h),
                   t_range=h.t_range, schedule=_schedule(h), eta=h.eta, clip=h.clip,
                   progress=True)  # fmt: skip
    return _finish(h, res.image, res, images.reference(pixels, settings.size_policy), list(notes))


def make_operator(task: str, shape: tuple[int, int], *, factor: int = 4, blur_sigma: float = 3.0,
                  blur_kernel: int = 61, mask: np.ndarray | None = None) -> Any:  # fmt: skip
    """The degradation of a restoration task, for a coded image of `shape` (H, W)."""
    if task == "colorization":
        return Colorization()
    if task == "super-resolution":
        if shape[0] % factor or shape[1] % factor:
            raise ValueError(f"super-resolution: size {shape[0]}x{shape[1]} is not divisible by {factor}")
        return SuperResolution(factor)
    if task == "blur":
        return GaussianBlur(np.float32(blur_sigma), blur_kernel)
    if task == "inpainting":
        if mask is None:  # the default: the central half of each side is missing
            mask = np.ones((*shape, 1), np.float32)
            mask[shape[0] // 4 : shape[0] - shape[0] // 4, shape[1] // 4 : shape[1] - shape[1] // 4] = 0
        mask = np.asarray(mask, np.float32)
        if mask.shape[:2] != tuple(shape):
            raise ValueError(f"inpainting: mask {mask.shape[:2]} does not match the coded size {shape}")
        return Inpainting(mask.reshape(*shape, -1)[..., :1])
    raise ValueError(f"unknown task {task!r} ({', '.join(RESTORATION_TASKS)})")


def restore_image(model: Any, pixels: np.ndarray, task: str, settings: CodecSettings, *,
                  notes: tuple[str, ...] = (), **op_args: Any) -> Encoded:  # fmt: skip
    """Compressed restoration: degrade the coded input by `task`, then sample the posterior.

    The measurement is formed from the input; the bitstream holds only the
    indices, so decoding reproduces the restored image without it.
    """
    coded, original = _coded_input(model, pixels, settings.size_policy)
    op = make_operator(task, coded.shape[:2], **op_args)
    extra: dict[str, Any] = {"task": task}
    if task == "super-resolution":
        extra["factor"] = op.factor
    elif task == "blur":
        extra.update(blur_kernel=op.kernel_size, blur_sigma=float(op.sigma))
    h = _header(model, settings, rule="mse", size=coded.shape[:2], original=original,
                policy=settings.size_policy, **extra)  # fmt: skip
    y = op(images.to_model(coded))
    res = restore(model, y, op, steps=h.steps, codebook_size=h.codebook_size, key=_key(h),
                  image_shape=(*h.size, 3), schedule=_schedule(h), eta=h.eta, clip=h.clip,
                  progress=True)  # fmt: skip
    return _finish(h, res.image, res, images.reference(pixels, settings.size_policy), list(notes))


def generate_image(model: Any, settings: CodecSettings, *, class_label: int | None = None) -> Encoded:
    """Compressed generation at the model's native size: uniformly random atoms."""
    n = model.config.architecture.image_size
    check_fits(model.config.architecture, n, n)
    h = _header(model, settings, rule="random", size=(n, n), original=(n, n), policy="none",
                task="generation", class_label=class_label)  # fmt: skip
    res = generate(model, steps=h.steps, codebook_size=h.codebook_size, key=_key(h),
                   class_label=class_label, image_shape=(n, n, 3), schedule=_schedule(h), eta=h.eta,
                   clip=h.clip, progress=True)  # fmt: skip
    return _finish(h, res.image, res, None, [])


def check_model(h: Header, model: Any, source: str) -> None:
    """Raise BitstreamError unless `model` can decode a file with header `h` faithfully."""
    arch, d = model.config.architecture, model.config.diffusion
    if not h.matches_fingerprint(str(model.fingerprint)):
        raise BitstreamError(f"{source}: made with model {h.fingerprint_hex}…, not with this one "
                             f"({str(model.fingerprint)[:39]}…)")  # fmt: skip
    if (h.noise_schedule, h.num_timesteps) != (d.noise_schedule, d.num_timesteps):
        raise BitstreamError(f"{source}: encoded with the {h.noise_schedule}/{h.num_timesteps} schedule, "
                             f"the model uses {d.noise_schedule}/{d.num_timesteps}")  # fmt: skip
    if h.compute_dtype != model.config.compute_dtype:
        raise BitstreamError(f"{source}: encoded with {h.compute_dtype} compute, this model directory "
                             f"computes in {model.config.compute_dtype}")  # fmt: skip
    if (h.class_label is None) != (arch.num_classes is None):
        raise BitstreamError(f"{source}: class label {h.class_label} does not fit this "
                             f"{'class-conditional' if arch.num_classes else 'unconditional'} model")  # fmt: skip
    if h.class_label is not None and h.class_label >= arch.num_classes:
        raise BitstreamError(f"{source}: class label {h.class_label} >= the model's {arch.num_classes} classes")
    if h.size[0] % arch.size_multiple or h.size[1] % arch.size_multiple:
        raise BitstreamError(f"{source}: coded size {h.size[0]}x{h.size[1]} is not a multiple of "
                             f"{arch.size_multiple}, which this network needs")  # fmt: skip
    try:
        check_fits(arch, *h.size)
    except MemoryBudgetError as e:
        raise BitstreamError(f"{source}: decoding {e}") from None
    if codebook_check(h.seed, h.threefry_partitionable) != h.codebook_check:
        raise BitstreamError(f"{source}: this JAX ({jax.__version__}) draws other codebook atoms than the "
                             f"encoder's (jax {h.jax_version or '?'}, {h.prng_impl}); it cannot decode the file")  # fmt: skip


def decode_bytes(model: Any, data: bytes, source: str = "<bytes>") -> tuple[np.ndarray, Bitstream]:
    """uint8 pixels in the geometry the header records, and the parsed file.

    Raises BitstreamError (naming `source`) for a file this model cannot decode.
    """
    stream = bitstream.decode(data, source)
    h = stream.header
    check_model(h, model, source)
    rule = h.rule if h.rule in ("mp", "turbo") else "ddcm"
    with jax.threefry_partitionable(h.threefry_partitionable):
        x = decompress(model, stream.indices, stream.coeffs, steps=h.steps, codebook_size=h.codebook_size,
                       image_shape=(*h.size, 3), num_atoms=h.num_atoms, coef_bits=max(h.coef_bits, 1),
                       rule=rule, key=_key(h), class_label=h.class_label, schedule=_schedule(h),
                       eta=h.eta, clip=h.clip, progress=True)  # fmt: skip
    pixels = images.restore_geometry(images.from_model(np.asarray(x)), h.size_policy, h.original_size)
    return pixels, stream
