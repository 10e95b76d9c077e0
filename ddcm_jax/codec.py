"""Images <-> `.ddcm` bytes: the sampler, the bitstream format and the size policies together.

    enc = encode_image(model, pixels, CodecSettings(steps=20, codebook_size=256))
    enc.data          # the file's bytes
    enc.decoded       # uint8, exactly what decode_bytes(model, enc.data) returns
    pixels, stream = decode_bytes(model, enc.data)

The encoder samples with the header's own values (eta as stored, the seed's
threefry key, the schedule the header names), so the decoder, which knows only
the header, replays the same arithmetic. Encoding and decoding both run
through `ddcm_jax.parallel` with one image per device (several images side by
side on several devices), and both compile the per-step progress callback in
(`ddcm_jax.progress.on_step` listens to it; unheard, it does nothing), so the
encoder's reconstruction is exactly what the decoder will produce on the same
kind of machine.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import bitstream, images
from ddcm_jax.bitstream import Bitstream, BitstreamError, Header
from ddcm_jax.codebook import AtomSource
from ddcm_jax.memory import MemoryBudgetError, check_fits
from ddcm_jax.operators import Colorization, GaussianBlur, Inpainting, SuperResolution
from ddcm_jax.parallel import (
    compress_sharded,
    decompress_sharded,
    generate_sharded,
    make_mesh,
    restore_sharded,
)
from ddcm_jax.sampler import PRNG_IMPL
from ddcm_jax.schedule import Schedule

__all__ = [
    "RESTORATION_TASKS",
    "CodecSettings",
    "Encoded",
    "check_model",
    "codebook_check",
    "decode_bytes",
    "decode_signature",
    "decode_streams",
    "encode_image",
    "encode_images",
    "generate_image",
    "generate_images",
    "mesh_for",
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
    generator: str = "philox"

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


def codebook_check(seed: int, partitionable: bool, generator: str = "philox") -> int:
    """CRC-32 of a coarse probe of the atoms the key `seed` gives under these settings.

    32 values of atom 0 of step 0, rounded to quarters: a different generator or
    normal transform changes them entirely, while last-bit float differences
    between backends almost never move a value across a rounding boundary.
    """
    root = jax.random.fold_in(jax.random.key(seed, impl=PRNG_IMPL), 1)
    with jax.threefry_partitionable(partitionable):
        book = AtomSource(1, (32,), generator, root=root, step=jnp.int32(0))
        z = np.asarray(book.get(jnp.zeros((1,), jnp.int32))[0], np.float64)
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
        threefry_partitionable=bool(jax.config.jax_threefry_partitionable), generator=s.generator,
        codebook_check=codebook_check(s.seed, bool(jax.config.jax_threefry_partitionable), s.generator),
        **extra,
    )  # fmt: skip


def _schedule(h: Header) -> Schedule:
    return Schedule.create(h.noise_schedule, h.num_timesteps, h.respacing_or_steps)


def _key(h: Header) -> jax.Array:
    return jax.random.key(h.seed, impl=h.prng_impl)


def _finish(h: Header, x: Any, indices: Any, coeffs: Any, reference: np.ndarray | None,
            notes: tuple[str, ...]) -> Encoded:  # fmt: skip
    data = bitstream.encode(h, np.asarray(indices), np.asarray(coeffs))
    decoded = images.restore_geometry(images.from_model(np.asarray(x)), h.size_policy, h.original_size)
    return Encoded(data, h, decoded, reference, tuple(notes))


def mesh_for(batch: int) -> Any:
    """The mesh a batch runs on: up to `batch` local devices on the data axis.

    Each device runs one image, so an image's code and reconstruction are the
    same whatever the number of devices (see `ddcm_jax.parallel`).
    """
    return make_mesh(data=max(1, min(batch, jax.local_device_count())))


def _coded_inputs(model: Any, pixel_list: list[np.ndarray], policy: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    arch = model.config.architecture
    sizes = {images.coded_size(p.shape[:2], policy, arch.image_size, arch.size_multiple) for p in pixel_list}
    if len(sizes) != 1:
        raise ValueError(f"a batch must share one coded size, got {sorted(sizes)}")
    check_fits(arch, *sizes.pop())
    coded = np.stack([images.prepare(p, policy, arch.image_size, arch.size_multiple) for p in pixel_list])
    return coded, [(int(p.shape[0]), int(p.shape[1])) for p in pixel_list]


def _keys(headers: list[Header]) -> jax.Array:
    return jnp.stack([_key(h) for h in headers])


def encode_images(model: Any, pixel_list: list[np.ndarray], settings: CodecSettings, *, task: str = "compression",
                  notes: list[tuple[str, ...]] | None = None, mesh: Any = None, **op_args: Any) -> list[Encoded]:  # fmt: skip
    """Compress (or, with a restoration `task`, restore) uint8 RGB images that share a coded size.

    The images run side by side, one per device of `mesh` (default `mesh_for`).
    Restoration degrades each coded input by the task and samples the
    posterior; its file holds only the indices, and decoding it reproduces the
    restored image without the measurement.
    """
    coded, originals = _coded_inputs(model, pixel_list, settings.size_policy)
    mesh = mesh_for(len(pixel_list)) if mesh is None else mesh
    x = np.stack([images.to_model(c) for c in coded])
    if task == "compression":
        heads = [_header(model, settings, rule=settings.header_rule, size=coded.shape[1:3], original=o,
                         policy=settings.size_policy) for o in originals]  # fmt: skip
        h = heads[0]
        res = compress_sharded(model, x, mesh=mesh, steps=h.steps, codebook_size=h.codebook_size,
                               num_atoms=settings.num_atoms, coef_bits=settings.coef_bits, rule=h.rule,
                               key=_keys(heads), t_range=h.t_range, schedule=_schedule(h), eta=h.eta,
                               clip=h.clip, generator=h.generator)  # fmt: skip
    else:
        op = make_operator(task, coded.shape[1:3], **op_args)
        extra: dict[str, Any] = {"task": task}
        if task == "super-resolution":
            extra["factor"] = op.factor
        elif task == "blur":
            extra.update(blur_kernel=op.kernel_size, blur_sigma=float(op.sigma))
        heads = [_header(model, settings, rule="mse", size=coded.shape[1:3], original=o,
                         policy=settings.size_policy, **extra) for o in originals]  # fmt: skip
        h = heads[0]
        y = jax.vmap(op)(jnp.asarray(x))
        res = restore_sharded(model, y, op, mesh=mesh, image_shape=(*h.size, 3), steps=h.steps,
                              codebook_size=h.codebook_size, key=_keys(heads), schedule=_schedule(h),
                              eta=h.eta, clip=h.clip, generator=h.generator)  # fmt: skip
    notes = notes or [()] * len(pixel_list)
    return [_finish(hb, res.image[b], res.indices[b], res.coeffs[b], images.reference(p, settings.size_policy), n)
            for b, (hb, p, n) in enumerate(zip(heads, pixel_list, notes, strict=True))]  # fmt: skip


def encode_image(model: Any, pixels: np.ndarray, settings: CodecSettings, *, notes: tuple[str, ...] = (),
                 mesh: Any = None) -> Encoded:  # fmt: skip
    """Compress uint8 RGB pixels (H0, W0, 3) under the settings' size policy."""
    return encode_images(model, [pixels], settings, notes=[notes], mesh=mesh)[0]


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
                  notes: tuple[str, ...] = (), mesh: Any = None, **op_args: Any) -> Encoded:  # fmt: skip
    """Compressed restoration of one image (see `encode_images`)."""
    return encode_images(model, [pixels], settings, task=task, notes=[notes], mesh=mesh, **op_args)[0]


def generate_images(model: Any, settings: CodecSettings, seeds: list[int], *, class_label: int | None = None,
                    mesh: Any = None) -> list[Encoded]:  # fmt: skip
    """Compressed generation at the model's native size, one image per seed."""
    n = model.config.architecture.image_size
    check_fits(model.config.architecture, n, n)
    heads = [_header(model, dataclasses.replace(settings, seed=sd), rule="random", size=(n, n), original=(n, n),
                     policy="none", task="generation", class_label=class_label) for sd in seeds]  # fmt: skip
    h = heads[0]
    labels = None if class_label is None else jnp.full((len(seeds),), class_label, jnp.int32)
    res = generate_sharded(model, mesh=mesh_for(len(seeds)) if mesh is None else mesh, key=_keys(heads),
                           image_shape=(n, n, 3), steps=h.steps, codebook_size=h.codebook_size,
                           class_label=labels, schedule=_schedule(h), eta=h.eta, clip=h.clip,
                           generator=h.generator)  # fmt: skip
    return [_finish(hb, res.image[b], res.indices[b], res.coeffs[b], None, ()) for b, hb in enumerate(heads)]


def generate_image(model: Any, settings: CodecSettings, *, class_label: int | None = None) -> Encoded:
    """Compressed generation of one image (seed: `settings.seed`)."""
    return generate_images(model, settings, [settings.seed], class_label=class_label)[0]


def check_model(h: Header, model: Any, source: str) -> None:
    """Raise BitstreamError unless `model` can decode a file with header `h` faithfully.

    Needs only the header (`bitstream.decode_header`): check before decoding the payload.
    """
    from ddcm_jax.printable import printable

    source = printable(source)
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
    if h.size_policy == "pad" and any(c - o >= arch.size_multiple for c, o in zip(h.size, h.original_size, strict=True)):
        raise BitstreamError(f"{source}: coded size {h.size[0]}x{h.size[1]} is not {h.original_size[0]}x"
                             f"{h.original_size[1]} padded to a multiple of {arch.size_multiple}")  # fmt: skip
    try:
        check_fits(arch, *h.size)
    except MemoryBudgetError as e:
        raise BitstreamError(f"{source}: decoding {e}") from None
    if codebook_check(h.seed, h.threefry_partitionable, h.generator) != h.codebook_check:
        raise BitstreamError(f"{source}: this JAX ({jax.__version__}) draws other codebook atoms than the "
                             f"encoder's (jax {h.jax_version or '?'}, {h.generator}); it cannot decode the file")  # fmt: skip


def decode_signature(h: Header) -> tuple[Any, ...]:
    """What files must share to be decoded side by side (everything but seed and original size)."""
    return (h.rule, h.steps, h.codebook_size, h.num_atoms, h.coef_bits, h.eta, h.noise_schedule, h.num_timesteps,
            h.respacing_or_steps, h.clip, h.size, h.size_policy, h.class_label, h.generator, h.prng_impl,
            h.threefry_partitionable, h.fingerprint)  # fmt: skip


def decode_streams(model: Any, streams: list[Bitstream], *, mesh: Any = None) -> list[np.ndarray]:
    """Decode parsed files that share a `decode_signature` (checked by `check_model` first).

    Returns uint8 pixels in each file's recorded geometry.
    """
    heads = [st.header for st in streams]
    if len({decode_signature(h) for h in heads}) != 1:
        raise ValueError("files decoded together must share their decoding settings")
    h = heads[0]
    rule = h.rule if h.rule in ("mp", "turbo") else "ddcm"
    with jax.threefry_partitionable(h.threefry_partitionable):
        x = decompress_sharded(model, np.stack([st.indices for st in streams]),
                               np.stack([st.coeffs for st in streams]),
                               mesh=mesh_for(len(streams)) if mesh is None else mesh, image_shape=(*h.size, 3),
                               steps=h.steps, codebook_size=h.codebook_size, num_atoms=h.num_atoms,
                               coef_bits=max(h.coef_bits, 1), rule=rule, key=_keys(heads),
                               class_label=None if h.class_label is None else
                               jnp.full((len(heads),), h.class_label, jnp.int32),
                               schedule=_schedule(h), eta=h.eta, clip=h.clip, generator=h.generator)  # fmt: skip
    return [images.restore_geometry(images.from_model(np.asarray(x[b])), hb.size_policy, hb.original_size)
            for b, hb in enumerate(heads)]  # fmt: skip


def decode_bytes(model: Any, data: bytes, source: str = "<bytes>", *, mesh: Any = None) -> tuple[np.ndarray, Bitstream]:
    """uint8 pixels in the geometry the header records, and the parsed file.

    Raises BitstreamError (naming `source`) for a file this model cannot decode;
    the header is checked against the model before the payload is decoded.
    """
    check_model(bitstream.decode_header(data, source).header, model, source)
    stream = bitstream.decode(data, source)
    return decode_streams(model, [stream], mesh=mesh)[0], stream
