"""Images <-> `.ddcm` bytes: the sampler, the bitstream format and the size policies together.

    spec = CodeSpec.create(steps=20, codebook_size=256)
    enc = encode_image(model, pixels, spec, seed=0)
    enc.data          # the file's bytes
    enc.decoded       # uint8, exactly what decode_bytes(model, enc.data) returns
    pixels, stream = decode_bytes(model, enc.data)

The path: pixels -> coded geometry (`images.prepare`) -> `header_for(spec, ...)`
-> `parallel.encode_sharded(spec_of(header))` -> indices -> `bitstream.encode`;
and back: `bitstream.decode` -> `spec_of(header)` -> `parallel.decode_sharded`
-> pixels. The encoder samples with the header's own spec (eta as stored in
float32), so the decoder, which knows only the header, replays the same
arithmetic. Both run their steps one call each (`sampler.run_steps`), with or
without a `progress(done, total)` listener, so the encoder's reconstruction is
exactly what the decoder will produce on the same kind of machine, whoever
watches; and since no host callback sits in the programs, JAX's persistent
compilation cache can keep them.

Read at this edge, once per call, and passed down: the memory budget
(`budget`, default `memory.budget_bytes()`) and JAX's threefry-partitionable
flag (`partitionable`, default the current `jax.config` value), which decides
the threefry generator's atoms and so is recorded in the header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddcm_jax import bitstream, images, memory
from ddcm_jax.bitstream import Bitstream, BitstreamError, Geometry, Header, Task
from ddcm_jax.codebook import AtomSource
from ddcm_jax.memory import MemoryBudgetError
from ddcm_jax.operators import Colorization, GaussianBlur, Inpainting, SuperResolution
from ddcm_jax.parallel import decode_sharded, encode_sharded, make_mesh
from ddcm_jax.sampler import PRNG_IMPL, Progress
from ddcm_jax.selection import GuidedSubset, Random, replay_rule
from ddcm_jax.shapes import Pixels
from ddcm_jax.spec import CodeSpec

__all__ = [
    "RESTORATION_TASKS",
    "Encoded",
    "check_model",
    "check_prompt",
    "codebook_check",
    "decode_bytes",
    "decode_signature",
    "decode_streams",
    "describe",
    "encode_image",
    "encode_images",
    "fits",
    "generate_image",
    "generate_images",
    "generation_side",
    "header_for",
    "make_operator",
    "measured_view",
    "mesh_for",
    "prompt_hash",
    "restore_image",
    "size_multiple",
    "spec_of",
]

RESTORATION_TASKS = ("colorization", "super-resolution", "inpainting", "blur")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One encoded image: the file bytes and what decoding them gives."""

    data: bytes
    header: Header
    decoded: Pixels  # in the output geometry: decode_bytes returns exactly this
    reference: Pixels | None  # the input in the same geometry (None for generation)
    notes: tuple[str, ...] = ()
    degraded: Pixels | None = None  # restoration: uint8 view of the measurement y (see `_degraded_view`)
    consistency_db: float | None = None  # restoration: PSNR of A(decoded) vs y at the coded size, in dB

    @property
    def payload_bits(self) -> int:
        return bitstream.payload_bits(self.header)

    def rates(self) -> dict[str, Any]:
        """Its size and rates: bytes, payload bits, bits per pixel of the image the user gets back (the
        input's pixels; crop: its centre square) for the payload (`bpp`) and the whole file
        (`bpp_file`), and of the payload over the coded image (`bpp_coded`, `coded_size`)."""
        g = self.header.geometry
        out_pixels = min(g.original_size) ** 2 if g.size_policy == "crop" else g.original_size[0] * g.original_size[1]
        return {"bytes": len(self.data), "payload_bits": self.payload_bits, "bpp": self.payload_bits / out_pixels,
                "bpp_file": 8 * len(self.data) / out_pixels, "bpp_coded": self.payload_bits / (g.size[0] * g.size[1]),
                "coded_size": list(g.size)}  # fmt: skip


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


def prompt_hash(prompt: str) -> bytes:
    """What a file records of the prompt that conditioned it: the first 16 bytes of SHA-256(UTF-8)."""
    return hashlib.sha256(prompt.encode("utf-8")).digest()[: bitstream.PROMPT_HASH_BYTES]


def header_for(model: Any, spec: CodeSpec, *, seed: int, geometry: Geometry, partitionable: bool,
               task: Task | None = None) -> Header:  # fmt: skip
    """The file header of a code made under `spec`: the spec, the geometry, the model, the task, the provenance."""
    rule = spec.rule
    if rule.code_name is None:
        raise ValueError(f"rule {type(rule).__name__} cannot be stored in a file")
    stored = bitstream.StoredSpec(rule.code_name, spec.steps, spec.codebook_size, rule.num_atoms,
                                  rule.coef_bits, spec.generator, spec.eta,
                                  spec.respacing, spec.t_range, spec.clip, spec.schedule, spec.no_bits_steps)  # fmt: skip
    provenance = bitstream.Provenance(seed, jax.__version__, PRNG_IMPL, partitionable,
                                      codebook_check(seed, partitionable, spec.generator))  # fmt: skip
    model_id = bitstream.ModelId(_fingerprint_bytes(model), *model.model_id())
    return Header(stored, geometry, model_id, task or Task(), provenance)


def _prompt_task(name: str, prompt: str | None, guidance: float) -> Task:
    """A latent code's task: the prompt's hash and guidance when one conditioned it."""
    return Task(name, prompt_hash=prompt_hash(prompt) if prompt else None, guidance=guidance if prompt else 0.0)


def spec_of(h: Header, rule: Any = None) -> CodeSpec:
    """The spec a header records (`rule`: the encoder's rule object; default the decoder's replay rule).

    Values are the header's canonical ones (eta rounded to float32): an
    encoder samples with them so that its decoder replays the same arithmetic.
    """
    s = h.spec
    rule = replay_rule(s.rule, s.num_atoms, max(s.coef_bits, 1)) if rule is None else rule
    return CodeSpec(s.steps, s.codebook_size, rule, s.generator, s.eta, s.respacing, s.t_range, s.clip,
                    s.latent_schedule, s.no_bits_steps)  # fmt: skip


def _key(h: Header) -> jax.Array:
    return jax.random.key(h.provenance.seed, impl=h.provenance.prng_impl)


def _keys(headers: list[Header]) -> jax.Array:
    return jnp.stack([_key(h) for h in headers])


def _finish(h: Header, x: Any, indices: Any, coeffs: Any, reference: np.ndarray | None,
            notes: tuple[str, ...]) -> Encoded:  # fmt: skip
    data = bitstream.encode(h, np.asarray(indices), np.asarray(coeffs))
    decoded = _restore(x, h)
    return Encoded(data, h, decoded, reference, tuple(notes))


def _restore(x: Any, h: Header) -> np.ndarray:
    """The model's output x (H, W, 3) in [-1, 1] as the input's pixels: the size policy undone."""
    return images.restore_geometry(images.from_model(np.asarray(x)), h.geometry.size_policy, h.geometry.original_size)


def _listener(progress: Progress | None) -> Progress:
    """The codec always runs step by step (see the module docstring), listened to or not."""
    return progress if progress is not None else (lambda done, total: None)


def mesh_for(batch: int) -> Any:
    """The mesh a batch runs on: up to `batch` local devices on the data axis.

    Each device runs one image, so an image's code and reconstruction are the
    same whatever the number of devices (see `ddcm_jax.parallel`).
    """
    return make_mesh(data=max(1, min(batch, jax.local_device_count())))


def _edge(budget: int | None, partitionable: bool | None) -> tuple[int, bool]:
    """The process settings a call depends on, read once at the codec's entry."""
    budget = memory.budget_bytes() if budget is None else budget
    return budget, bool(jax.config.jax_threefry_partitionable) if partitionable is None else partitionable


def coding_side(model: Any, policy: str, coding_size: int | None) -> int:
    """The `native` side of `images.coded_size`: `coding_size`, or the family's default for `policy`
    (a latent model: the side its UNet was trained at, SD 2.1-base 512; a pixel model: the fit
    policy's longer side, or crop / resize's square)."""
    return model.coding_side(policy) if coding_size is None else coding_size


def generation_side(model: Any, size: int | None = None) -> int:
    """The side `generate` makes: `size`, checked against the model, or the family's default (a latent
    model's native size, a pixel model's `generation_size`)."""
    if size is None:
        return model.generation_side()
    if size < 1 or size % size_multiple(model):
        raise ValueError(f"{size} is not a positive multiple of {size_multiple(model)}, this model's multiple")
    return size


def size_multiple(model: Any) -> int:
    """Coded sides must be multiples of this (the network's downsampling; latent: times the VAE's)."""
    return model.size_multiple()


def fits(model: Any, height: int, width: int, *, budget: int) -> None:
    """Raise MemoryBudgetError unless coding an (height, width) image fits the memory budget."""
    model.check_memory(height, width, budget)


def _coded_inputs(model: Any, pixel_list: list[np.ndarray], policy: str, budget: int,
                  coding_size: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:  # fmt: skip
    native, multiple = coding_side(model, policy, coding_size), size_multiple(model)
    sizes = {images.coded_size(p.shape[:2], policy, native, multiple) for p in pixel_list}
    if len(sizes) != 1:
        raise ValueError(f"a batch must share one coded size, got {sorted(sizes)}")
    fits(model, *sizes.pop(), budget=budget)
    coded = np.stack([images.prepare(p, policy, native, multiple) for p in pixel_list])
    return coded, [(int(p.shape[0]), int(p.shape[1])) for p in pixel_list]


def encode_images(model: Any, pixel_list: list[Pixels], spec: CodeSpec, *, seed: int = 0,
                  size_policy: str = "fit", coding_size: int | None = None, task: str = "compression",
                  notes: list[tuple[str, ...]] | None = None, mesh: Any = None, budget: int | None = None,
                  partitionable: bool | None = None, progress: Progress | None = None,
                  no_bits_steps: int | None = None, schedule: str | None = None, prompt: str | None = None,
                  guidance: float = 0.0, measured: bool = False, **op_args: Any) -> list[Encoded]:  # fmt: skip
    """Compress (or, with a restoration `task`, restore) uint8 RGB images that share a coded size.

    A latent model compresses (`ddcm_jax.latent`): the spec's schedule (or
    `schedule`) defaults to its rule's own, `no_bits_steps` to Turbo-DDCM's heuristic at the coded
    size (turbo) or 0, and `prompt` / `guidance` condition the code (the file
    keeps the prompt's hash; the decoder must be given the prompt).

    The images run side by side, one per device of `mesh` (default `mesh_for`).
    Restoration degrades each coded input by the task and samples the
    posterior with `TurboMSE(operator, M)` when the spec's rule is `Turbo(M)`,
    else with DDCM's single-atom `MSE(operator)` (the spec's t_range is not
    used); its file holds only the code, and decoding it reproduces the
    restored image without the measurement.

    `measured` (restoration): the inputs are already degraded photos, the measurements y themselves
    (a grey, blurred or holed photo; for super-resolution the low-resolution one, whose result is
    `factor` times larger), not clean photos to degrade; there is no original to compare with
    (`reference` None). `measured_view` gives the geometry and y of each task.
    """
    budget, partitionable = _edge(budget, partitionable)
    given = pixel_list
    if measured:
        if task == "compression":
            raise ValueError("measured inputs are for restoration tasks")
        pixel_list = [measured_view(task, p, op_args.get("factor", 4)) for p in pixel_list]
    coded, originals = _coded_inputs(model, pixel_list, size_policy, budget, coding_size)
    if task != "compression" and not model.restores:
        raise ValueError(f"{task}: restoration runs on pixel-space models; latent models compress and generate")
    spec = model.complete_spec(spec, coded.shape[1:3], no_bits_steps=no_bits_steps, schedule=schedule)
    mesh = mesh_for(len(pixel_list)) if mesh is None else mesh
    x = np.stack([images.to_model(c) for c in coded])
    task_fields = _prompt_task(task, prompt, guidance)
    if task != "compression":
        op = make_operator(task, coded.shape[1:3], **op_args)
        spec = spec.replace(rule=spec.rule.restoring(op), t_range=None)
        sr, blur = task == "super-resolution", task == "blur"
        task_fields = Task(task, factor=op.factor if sr else None, blur_kernel=op.kernel_size if blur else None,
                           blur_sigma=float(op.sigma) if blur else None)  # fmt: skip
    heads = [header_for(model, spec, seed=seed, geometry=Geometry(coded.shape[1:3], o, size_policy),
                        partitionable=partitionable, task=task_fields) for o in originals]  # fmt: skip
    run = spec_of(heads[0], spec.rule)
    with jax.threefry_partitionable(partitionable):
        if task == "compression":
            res = encode_sharded(model, run, x, mesh=mesh, key=_keys(heads), prompt=prompt, guidance=guidance,
                                 progress=_listener(progress))  # fmt: skip
        else:
            y = _measurements(op, task, x, measured)
            if measured and task == "super-resolution":
                y = _low_resolution_y(given, y, size_policy, coding_side(model, size_policy, coding_size),
                                      size_multiple(model), op.factor)  # fmt: skip
            res = encode_sharded(model, run, mesh=mesh, key=_keys(heads), measurements=y,
                                 image_shape=(*heads[0].geometry.size, 3), progress=_listener(progress))  # fmt: skip
    notes = notes or [()] * len(pixel_list)
    out = [_finish(hb, res.image[b], res.indices[b], res.coeffs[b], None if measured else
                   images.reference(p, size_policy), n)
           for b, (hb, p, n) in enumerate(zip(heads, pixel_list, notes, strict=True))]  # fmt: skip
    if task == "compression":
        return out
    y = np.asarray(y)
    # Consistency of what the user gets (the decoded uint8 pixels) with the measurement, at the coded size.
    a_out = np.asarray(jax.vmap(op)(jnp.asarray(images.to_model(images.from_model(np.asarray(res.image))))))
    return [dataclasses.replace(e, degraded=_degraded_view(y[b], hb), consistency_db=_psnr_pm1(a_out[b], y[b]))
            for b, (e, hb) in enumerate(zip(out, heads, strict=True))]  # fmt: skip


def measured_view(task: str, pixels: Pixels, factor: int = 4) -> Pixels:
    """A degraded photo as the image the restoration codes: the photo itself (its grey, blur or holes are
    the measurement), or for super-resolution the low-resolution photo enlarged `factor` times, each pixel
    a factor x factor block, so that the result has the size the task promises; y is then the
    low-resolution photo itself where the coded size is the enlarged size (--pad, or a --size that holds
    it; `_low_resolution_y`), and A of the coded copy where the coding size scaled it down."""
    if task != "super-resolution":
        return pixels
    from PIL import Image

    h, w = pixels.shape[:2]
    return np.asarray(Image.fromarray(pixels).resize((w * factor, h * factor), Image.NEAREST))


def _low_resolution_y(photos: list[Pixels], pooled: jax.Array, policy: str, side: int, multiple: int,
                      factor: int) -> jax.Array:  # fmt: skip
    """The measured low-resolution photos as y, prepared at 1/factor of the coded geometry, where that gives
    y's shape (the enlarged size is coded: --pad, or a --size that holds it); else A of the enlargement (the
    coding size scaled the photo down, and y is of that copy)."""
    small = [images.prepare(p, policy, max(1, side // factor), max(1, multiple // factor)) for p in photos]
    if any(s.shape != tuple(pooled.shape[1:]) for s in small):
        return pooled
    return jnp.asarray(np.stack([images.to_model(s) for s in small]))


def _measurements(op: Any, task: str, x: np.ndarray, measured: bool) -> jax.Array:
    """y of each coded image: A(x), except a measured blurred photo, which is y itself (blurring it again would
    measure a different photo). A measured grey photo's A is its own grey; a measured holed photo's A drops its
    holes; a measured low-resolution photo's A pools its enlargement back to it."""
    x = jnp.asarray(x)
    if measured and task == "blur":
        return x
    return jax.vmap(op)(x)


def _psnr_pm1(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of signals in [-1, 1] (peak-to-peak 2), as 8-bit PSNR is of [0, 255]."""
    mse = float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(4.0 / mse))


def _degraded_view(y: np.ndarray, h: Header) -> np.ndarray:
    """The measurement as an image: grey (colorization), masked or blurred at the output's geometry;
    super-resolution's low-resolution image as it is."""
    if y.shape[-1] == 1:
        y = np.repeat(y, 3, axis=-1)
    view = images.from_model(y)
    g = h.geometry
    if view.shape[:2] != tuple(g.size):  # super-resolution: the small image itself
        return view
    return images.restore_geometry(view, g.size_policy, g.original_size)


def encode_image(model: Any, pixels: Pixels, spec: CodeSpec, *, notes: tuple[str, ...] = (),
                 **kw: Any) -> Encoded:  # fmt: skip
    """Compress uint8 RGB pixels (H0, W0, 3); keywords as `encode_images` (seed, size_policy, ...)."""
    return encode_images(model, [pixels], spec, notes=[notes], **kw)[0]


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


def restore_image(model: Any, pixels: Pixels, task: str, spec: CodeSpec, *, notes: tuple[str, ...] = (),
                  **kw: Any) -> Encoded:  # fmt: skip
    """Compressed restoration of one image (see `encode_images`)."""
    return encode_images(model, [pixels], spec, task=task, notes=[notes], **kw)[0]


def generate_images(model: Any, spec: CodeSpec, seeds: list[int], *, class_label: int | None = None,
                    mesh: Any = None, budget: int | None = None, partitionable: bool | None = None,
                    progress: Progress | None = None, prompt: str | None = None, guidance: float = 0.0,
                    schedule: str | None = None, ccfg_subset: int | None = None,
                    size: int | None = None) -> list[Encoded]:  # fmt: skip
    """Compressed generation of `size` x `size` images, one per seed (the spec's rule: `Random`).

    `size`: see `generation_side`.

    A latent model may be given a `prompt` with classifier-free `guidance` (the
    file records the prompt's hash: its decoder needs the prompt), or with
    `ccfg_subset` N, compressed CFG (`ddcm_jax.latent.generate`: the guidance
    is in the code, and the file decodes without the prompt).
    """
    budget, partitionable = _edge(budget, partitionable)
    side = generation_side(model, size)
    hw = (side, side)
    fits(model, *hw, budget=budget)
    if ccfg_subset is not None:
        _check_subset(model, hw, ccfg_subset, spec.codebook_size, budget)
    rule = Random() if ccfg_subset is None else GuidedSubset(ccfg_subset)
    spec = model.complete_spec(spec.replace(rule=rule, t_range=None), hw, schedule=schedule, no_bits_steps=0)
    recorded = None if ccfg_subset is not None else prompt  # compressed CFG decodes without its prompt
    task_fields = _prompt_task("generation", recorded, guidance)
    task_fields = dataclasses.replace(task_fields, class_label=class_label)
    heads = [header_for(model, spec, seed=sd, geometry=Geometry(hw), partitionable=partitionable,
                        task=task_fields) for sd in seeds]  # fmt: skip
    labels = None if class_label is None else jnp.full((len(seeds),), class_label, jnp.int32)
    with jax.threefry_partitionable(partitionable):
        res = encode_sharded(model, spec_of(heads[0], spec.rule), mesh=mesh_for(len(seeds)) if mesh is None else mesh,
                             key=_keys(heads), image_shape=(*hw, 3), class_label=labels, prompt=prompt,
                             guidance=guidance, progress=_listener(progress))  # fmt: skip
    return [_finish(hb, res.image[b], res.indices[b], res.coeffs[b], None, ()) for b, hb in enumerate(heads)]


def _check_subset(model: Any, hw: tuple[int, int], subset: int, codebook_size: int, budget: int) -> None:
    """Compressed CFG scores `subset` atoms at once: at most K of them, within the memory budget."""
    if subset > codebook_size:
        raise ValueError(f"ccfg_subset {subset} is more atoms than the codebook's K = {codebook_size}")
    # The subset's atoms and their float32 scores, on top of the network's working set.
    extra = 4 * subset * (int(np.prod(model.state_shape((*hw, 3)))) + 1)
    try:
        model.check_memory(*hw, budget - extra)
    except MemoryBudgetError:
        raise MemoryBudgetError(f"compressed CFG over {subset} atoms needs about {memory.format_bytes(extra)} more "
                                f"than the network with this model (budget {memory.format_bytes(budget)}; set "
                                "DDCM_MEMORY_LIMIT to change it)") from None  # fmt: skip


def generate_image(model: Any, spec: CodeSpec, *, seed: int = 0, class_label: int | None = None,
                   **kw: Any) -> Encoded:  # fmt: skip
    """Compressed generation of one image."""
    return generate_images(model, spec, [seed], class_label=class_label, **kw)[0]


def check_model(h: Header, model: Any, source: str, *, budget: int) -> None:
    """Raise BitstreamError unless `model` can decode a file with header `h` faithfully.

    Needs only the header (`bitstream.decode_header`): check before decoding the payload.
    """
    from ddcm_jax.printable import printable

    source = printable(source)
    if not h.model.matches(str(model.fingerprint)):
        raise BitstreamError(f"{source}: made with model {h.model.fingerprint_hex}…, not with this one "
                             f"({str(model.fingerprint)[:39]}…)")  # fmt: skip
    why = model.header_mismatch(h)
    if why is not None:
        raise BitstreamError(f"{source}: {why}")
    (hc, wc), mult = h.geometry.size, size_multiple(model)
    if hc % mult or wc % mult:
        raise BitstreamError(f"{source}: coded size {hc}x{wc} is not a multiple of {mult}, which this model needs")
    _check_padding(h.geometry, mult, source)
    _check_budget_and_atoms(h, model, source, budget)


def _check_padding(g: Geometry, mult: int, source: str) -> None:
    """Both families: a padded image (pad, or fit of a small image) is its size rounded up to `mult`.

    The writer cannot make any other; a forged one would decode to a crop of the padding."""
    (hc, wc), (h0, w0) = g.size, g.original_size
    padded = g.size_policy == "pad" or (g.size_policy == "fit" and hc >= h0 and wc >= w0)
    if padded and (hc - h0 >= mult or wc - w0 >= mult):
        raise BitstreamError(f"{source}: coded size {hc}x{wc} is not {h0}x{w0} padded to a multiple of {mult}")


def _check_budget_and_atoms(h: Header, model: Any, source: str, budget: int) -> None:
    """Both families: decoding fits the memory budget, and this JAX draws the encoder's atoms."""
    try:
        fits(model, *h.geometry.size, budget=budget)
    except MemoryBudgetError as e:
        raise BitstreamError(f"{source}: decoding {e}") from None
    p, generator = h.provenance, h.spec.generator
    if codebook_check(p.seed, p.threefry_partitionable, generator) != p.codebook_check:
        raise BitstreamError(f"{source}: this JAX ({jax.__version__}) draws other codebook atoms than the "
                             f"encoder's (jax {p.jax_version or '?'}, {generator}); it cannot decode the file")  # fmt: skip


def check_prompt(h: Header, prompt: str | None, source: str) -> None:
    """Raise BitstreamError unless `prompt` is the one the file was conditioned on (none: none)."""
    from ddcm_jax.printable import printable

    if h.task.prompt_hash is None:
        if prompt:
            raise BitstreamError(f"{printable(source)}: coded without a prompt; do not give one")
        return
    if not prompt:
        raise BitstreamError(f"{printable(source)}: coded with a prompt (guidance {h.task.guidance:g}); give the same "
                             "prompt to decode it")  # fmt: skip
    if prompt_hash(prompt) != h.task.prompt_hash:
        raise BitstreamError(f"{printable(source)}: the prompt given is not the one the file was coded with")


def decode_signature(h: Header) -> tuple[Any, ...]:
    """What files must share to be decoded side by side (everything but seed and original size)."""
    spec = dataclasses.replace(h.spec, respacing=h.spec.respacing_or_steps)  # "" and "T" are one schedule
    p = h.provenance
    return spec, h.model, h.task, h.geometry.size, h.geometry.size_policy, p.prng_impl, p.threefry_partitionable


def decode_streams(model: Any, streams: list[Bitstream], *, mesh: Any = None,
                   progress: Progress | None = None, prompt: str | None = None, edit_prompt: str | None = None,
                   tskip: int = 0) -> list[Pixels]:  # fmt: skip
    """Decode parsed files that share a `decode_signature` (checked by `check_model` first).

    Returns uint8 pixels in each file's recorded geometry. A latent code
    conditioned on a prompt needs that `prompt` (`check_prompt`); with
    `edit_prompt`, its steps from `tskip` on follow that prompt instead
    (text-based editing, `ddcm_jax.latent.decode`).
    """
    heads = [st.header for st in streams]
    if len({decode_signature(h) for h in heads}) != 1:
        raise ValueError("files decoded together must share their decoding settings")
    h = heads[0]
    if edit_prompt is not None and h.task.prompt_hash is None:
        raise ValueError("text-based editing needs a latent code made with a prompt")
    labels = None if h.task.class_label is None else jnp.full((len(heads),), h.task.class_label, jnp.int32)
    with jax.threefry_partitionable(h.provenance.threefry_partitionable):
        x = decode_sharded(model, spec_of(h), np.stack([st.indices for st in streams]),
                           np.stack([st.coeffs for st in streams]), mesh=mesh_for(len(streams)) if mesh is None
                           else mesh, key=_keys(heads), image_shape=(*h.geometry.size, 3), class_label=labels,
                           prompt=prompt, guidance=h.task.guidance, edit_prompt=edit_prompt, tskip=tskip,
                           progress=_listener(progress))  # fmt: skip
    return [_restore(x[b], hb) for b, hb in enumerate(heads)]


def decode_bytes(model: Any, data: bytes, source: str = "<bytes>", *, mesh: Any = None,
                 budget: int | None = None, progress: Progress | None = None,
                 prompt: str | None = None) -> tuple[Pixels, Bitstream]:  # fmt: skip
    """uint8 pixels in the geometry the header records, and the parsed file.

    Raises BitstreamError (naming `source`) for a file this model cannot decode
    (or, for a latent code, a `prompt` that is not the encoder's); the header is
    checked against the model before the payload is decoded.
    """
    budget, _ = _edge(budget, False)  # decoding takes the threefry setting from the file, not the process
    head = bitstream.decode_header(data, source).header
    check_model(head, model, source, budget=budget)
    check_prompt(head, prompt, source)
    stream = bitstream.decode(data, source)
    return decode_streams(model, [stream], mesh=mesh, progress=progress, prompt=prompt)[0], stream


def describe(stream: bitstream.FileHeader | Bitstream, nbytes: int) -> dict[str, Any]:
    """What `ddcm info` reports about a checked file of `nbytes` bytes (`bitstream.decode_header`: no payload
    decoding): sizes, rates over the input's pixels (`bpp_input`, what `roundtrip` reports) and over the
    coded image (`bpp`, the papers' payload count), and every setting of its header."""
    h = stream.header
    s, g, m, t, p = h.spec, h.geometry, h.model, h.task, h.provenance
    coded = g.size[0] * g.size[1]
    n_coded = int(bitstream.code_mask(h).sum())
    steps = s.respacing_or_steps if s.latent_schedule is None else f"latent-{s.latent_schedule}"
    out = {
        "format_version": h.version,
        "bytes": nbytes, "header_bytes": stream.header_bytes, "payload_bytes": stream.payload_bytes, "crc_bytes": 4,
        "payload_bits": stream.payload_bits, "coded_steps": n_coded,
        "bpp": stream.payload_bits / coded, "bpp_file": 8 * nbytes / coded,
        "bpp_input": 8 * nbytes / (g.original_size[0] * g.original_size[1]),
        "bpp_payload_input": stream.payload_bits / (g.original_size[0] * g.original_size[1]),
        "rule": s.rule, "task": t.name, "steps": s.steps, "codebook_size": s.codebook_size,
        "num_atoms": s.num_atoms, "coef_bits": s.coef_bits,
        "t_range": None if s.t_range is None else list(s.t_range), "eta": s.eta, "seed": p.seed,
        "schedule": f"{m.noise_schedule}/{m.num_timesteps}/{steps}", "clip": s.clip,
        "class_label": t.class_label, "model": m.fingerprint_hex, "compute_dtype": m.compute_dtype,
        "coded_size": list(g.size), "original_size": list(g.original_size), "size_policy": g.size_policy,
        "jax_version": p.jax_version, "prng": p.prng_impl, "generator": s.generator,
        "threefry_partitionable": p.threefry_partitionable,
    }  # fmt: skip
    if s.latent_schedule is not None:
        out.update(no_bits_steps=s.no_bits_steps, prompt_hash=None if t.prompt_hash is None else t.prompt_hash.hex(),
                   guidance=t.guidance)  # fmt: skip
    if t.name == "super-resolution":
        out["factor"] = t.factor
    if t.name == "blur":
        out.update(blur_kernel=t.blur_kernel, blur_sigma=t.blur_sigma)
    return out
