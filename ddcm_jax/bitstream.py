"""The `.ddcm` file: a self-describing header, the packed code, a CRC-32.

A file says everything a decoder needs (rule, steps, K, M, C, t-range, eta,
seed, schedule, which model, sizes, the JAX PRNG settings behind the
codebooks) and `decode` refuses anything it could not decode faithfully: a
wrong magic or version, a CRC mismatch, values outside hard limits (`LIMITS`,
which also bound the size of the code and the work of unranking it), sizes the
size policy cannot produce, a payload whose length disagrees with the header.
`decode_header` makes every check but decoding the payload, so a caller can
hold the header against a model before paying for the code. Layout, version 1
(integers are unsigned LEB128 varints unless a width is given)::

    magic           4 bytes   b"DDCM"
    version         1 byte    1
    flags           1 byte    bit 0 t_range present, 1 class label present,
                              2 x0 clipped to [-1, 1], 3 jax_threefry_partitionable
    rule            1 byte    see RULES
    task            1 byte    see TASKS; super-resolution then adds a varint factor,
                              blur a varint kernel size and a float32 sigma
    steps, K, M, C  varints   C is 0 unless the rule is matching pursuit
    t_min, t_max    varints   if flag bit 0 (original timesteps, inclusive)
    class label     varint    if flag bit 1
    eta             4 bytes   float32, little-endian
    seed            varint    the key the codebooks and x_T come from (< 2**32)
    schedule        1 byte (0 linear, 1 cosine), varint T, varint n + n ASCII respacing
    model           16 bytes  the first 128 bits of the model's SHA-256 fingerprint
    compute dtype   1 byte    0 float32, 1 bfloat16, 2 float16
    coded size      varints   H, W of the image the diffusion model produced
    original size   varints   H0, W0 of the input before the size policy
    size policy     1 byte    0 none, 1 crop, 2 resize, 3 pad, 4 fit (see `ddcm_jax.images`)
    jax version     varint n + n ASCII bytes
    prng            1 byte    0 threefry2x32 (the key x_T and the codebook root come from)
    generator       1 byte    0 threefry, 1 philox, 2 shift (how atoms are drawn, `ddcm_jax.codebook`)
    codebook check  4 bytes   CRC-32 of a coarse probe of the atoms (`codebook_check`)
  version 2 only (a latent diffusion code, `ddcm_jax.latent`):
    latent schedule 1 byte    0 ddcm, 1 turbo (see `ddcm_jax.respacing.latent_timesteps`)
    no-bits steps   varint    NBS: the last NBS steps before the final one add no noise
    prompt flags    1 byte    bit 0: a prompt conditioned the code
    prompt hash     16 bytes  if bit 0: the first 128 bits of SHA-256(prompt, UTF-8)
    guidance        4 bytes   if bit 0: float32, classifier-free guidance scale
  payload           ceil(bits / 8) bytes, MSB first, zero padding at the end
  crc               4 bytes   CRC-32 (big-endian) of every byte before it

In memory a `Header` has five parts, each a frozen dataclass: `spec`
(`StoredSpec`, the code's settings: `ddcm_jax.spec.CodeSpec` with the rule by
name), `geometry`, `model` (`ModelId`), `task` and `provenance`; the byte
layout above interleaves their fields for version 1's sake.

A writer uses version 1 for pixel-space codes (so their bytes never change)
and version 2 for latent ones; the code has `steps - 1 - no_bits_steps` rows
(the noise-adding steps; NBS is 0 in version 1).

Payload, for each *coded* step (a noise-adding step whose original timestep
lies in t_range; all of them without one), in the order the sampler runs:
  ddcm, random, mse:    index (ceil(log2 K) bits)
  matching pursuit:     index_1, then (coefficient_m (C bits), index_m) for m = 2..M,
                        the original DDCM code's order
  turbo:                the lexicographic rank of the sorted atom set
                        (ceil(log2 binom(K, M)) bits), then M sign bits (1 = negative)
Steps outside t_range are not stored (they use atom 0; turbo atoms 0..M-1, +).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ddcm_jax.codes import FORMATS, rank_subset, unrank_subset

__all__ = [
    "LIMITS",
    "MAGIC",
    "RULES",
    "TASKS",
    "VERSION",
    "Bitstream",
    "BitstreamError",
    "FileHeader",
    "Geometry",
    "Header",
    "ModelId",
    "Provenance",
    "StoredSpec",
    "Task",
    "bits_per_step",
    "code_mask",
    "coded_steps",
    "decode",
    "decode_header",
    "encode",
    "idle_step",
    "payload_bits",
    "rank_subset",
    "schedule_timesteps",
    "unrank_subset",
]

MAGIC = b"DDCM"
VERSION = 1  # pixel-space codes
LATENT_VERSION = 2  # latent diffusion codes: version 1 + the latent block
FINGERPRINT_BYTES = 16
RULES = ("ddcm", "mp", "turbo", "random", "mse", "mse_inner")
TASKS = ("compression", "generation", "colorization", "super-resolution", "inpainting", "blur")
# scaled_linear: Stable Diffusion's; flow: FLUX's rectified flow (sigma = t / 1000, `ddcm_jax.flux`)
NOISE_SCHEDULES = ("linear", "cosine", "scaled_linear", "flow")
PROMPT_HASH_BYTES = 16
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SIZE_POLICIES = ("none", "crop", "resize", "pad", "fit")
PRNG_IMPLS = ("threefry2x32",)
CODEBOOK_GENERATORS = ("threefry", "philox", "shift")

# Hard limits: anything beyond them is refused before it can allocate or loop.
LIMITS = dict(
    codebook_size=2**24,
    steps=10**5,
    num_timesteps=10**5,
    num_atoms=1024,
    coef_bits=16,
    side=16384,
    string=64,
    factor=64,
    kernel=255,
    class_label=2**20,
    file_bytes=64 << 20,
    # The code's size and the work of reading it, bounded before any payload is read:
    # (steps - 1) x M atom indices (the decoded arrays), and for turbo
    # (steps - 1) x M x ceil(log2 binom(K, M)), as unranking costs one big-integer
    # binomial of up to the rank's size per atom: at K = 2^24, M = 1024 (0.15 s a
    # step on one CPU core) at most 24 steps, about 4 s.
    code_symbols=2**20,
    rank_work=3 << 27,
)


class BitstreamError(ValueError):
    """A `.ddcm` file that cannot be decoded; the message names the source and the reason."""


# --- header -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredSpec:
    """The code's settings as the file stores them: `ddcm_jax.spec.CodeSpec` with the rule by name.

    `ddcm_jax.codec` converts between the two (`header_for`, `spec_of`); this
    module stays free of JAX, so it holds names and integers only.
    """

    rule: str
    steps: int
    codebook_size: int
    num_atoms: int = 1
    coef_bits: int = 0  # matching pursuit's C; 0 for every other rule
    generator: str = "philox"
    eta: float = 1.0
    respacing: str = ""
    t_range: tuple[int, int] | None = None
    clip: bool = True
    latent_schedule: str | None = None  # "ddcm" / "turbo" for a latent code (format version 2)
    no_bits_steps: int = 0

    def __post_init__(self) -> None:
        # Canonical form: what the file can hold. eta is stored as float32, so an
        # encoder must sample with exactly that value for the decoder to match it.
        object.__setattr__(self, "eta", _f32(float(self.eta)))
        if self.t_range is not None:
            object.__setattr__(self, "t_range", tuple(int(v) for v in self.t_range))

    @property
    def code_rows(self) -> int:
        """Rows of the code: the noise-adding steps, steps - 1 - no_bits_steps."""
        return self.steps - 1 - self.no_bits_steps

    @property
    def coeff_width(self) -> int:
        return FORMATS[self.rule].coeff_width(self.num_atoms)

    @property
    def respacing_or_steps(self) -> str:
        return self.respacing or str(self.steps)

    @property
    def step_bits(self) -> int:
        """Payload bits of one coded step (`bits_per_step`)."""
        return bits_per_step(self.rule, self.codebook_size, self.num_atoms, self.coef_bits)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The coded size, the input's size and the size policy between them (`ddcm_jax.images`)."""

    size: tuple[int, int]  # (H, W) coded
    original_size: tuple[int, int] | None = None  # (H0, W0); None means the coded size
    size_policy: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "original_size", tuple(int(v) for v in (self.original_size or self.size)))


@dataclasses.dataclass(frozen=True)
class ModelId:
    """Which model decodes the file: its fingerprint and the diffusion settings a decoder checks."""

    fingerprint: bytes  # the first FINGERPRINT_BYTES bytes of the model's SHA-256
    noise_schedule: str = "linear"
    num_timesteps: int = 1000
    compute_dtype: str = "float32"

    @property
    def fingerprint_hex(self) -> str:
        return "sha256:" + self.fingerprint.hex()

    def matches(self, fingerprint: str) -> bool:
        """Whether a model's 'sha256:<hex>' fingerprint is the one this file was made with."""
        return fingerprint.startswith(self.fingerprint_hex)


@dataclasses.dataclass(frozen=True)
class Task:
    """What the code is of: the task and its measurement's settings, the class label, the prompt."""

    name: str = "compression"
    factor: int | None = None  # super-resolution
    blur_kernel: int | None = None
    blur_sigma: float | None = None
    class_label: int | None = None
    prompt_hash: bytes | None = None  # latent: SHA-256 prefix of the prompt that conditioned the code
    guidance: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance", _f32(float(self.guidance)))
        if self.blur_sigma is not None:
            object.__setattr__(self, "blur_sigma", _f32(float(self.blur_sigma)))


@dataclasses.dataclass(frozen=True)
class Provenance:
    """The randomness behind the code: the seed and the JAX settings its codebooks were drawn under."""

    seed: int = 0
    jax_version: str = ""
    prng_impl: str = "threefry2x32"
    threefry_partitionable: bool = True
    codebook_check: int = 0


@dataclasses.dataclass(frozen=True)
class Header:
    """Everything a decoder needs besides the weights: the spec, the geometry, the model, the task, the provenance.

    Validated at construction (`ValueError` for anything no encoder of this
    format produces); `decode_header` builds one from bytes.
    """

    spec: StoredSpec
    geometry: Geometry
    model: ModelId
    task: Task = dataclasses.field(default_factory=Task)
    provenance: Provenance = dataclasses.field(default_factory=Provenance)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def version(self) -> int:
        return VERSION if self.spec.latent_schedule is None else LATENT_VERSION

    def replace(self, **parts: Any) -> Header:
        """This header with whole parts replaced, or fields of parts: `replace(spec={"steps": 9})`."""
        new = {name: dataclasses.replace(getattr(self, name), **v) if isinstance(v, dict) else v
               for name, v in parts.items()}  # fmt: skip
        return dataclasses.replace(self, **new)


def _validate(h: Header) -> None:
    """Raise ValueError for a header no encoder of this format can produce."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(what)

    lim = LIMITS
    s, g, m, t, p = h.spec, h.geometry, h.model, h.task, h.provenance
    need(s.rule in RULES, f"unknown rule {s.rule!r}")
    need(t.name in TASKS, f"unknown task {t.name!r}")
    need(2 <= s.steps <= lim["steps"], f"steps {s.steps} outside 2..{lim['steps']}")
    need(1 <= m.num_timesteps <= lim["num_timesteps"], f"num_timesteps {m.num_timesteps} out of range")
    need(s.steps <= m.num_timesteps, f"steps {s.steps} > num_timesteps {m.num_timesteps}")
    need(1 <= s.codebook_size <= lim["codebook_size"], f"codebook size {s.codebook_size} outside 1..2^24")
    need(1 <= s.num_atoms <= lim["num_atoms"], f"num_atoms {s.num_atoms} outside 1..{lim['num_atoms']}")
    fmt = FORMATS[s.rule]
    why = fmt.check(s.codebook_size, s.num_atoms, s.coef_bits)
    need(why is None, f"rule {s.rule}: {why}")
    if s.generator == "shift":
        need(s.codebook_size <= 3 * g.size[0] * g.size[1], "the shift codebook has at most H x W x 3 atoms")
    need(t.name != "super-resolution" or (t.factor is not None and 1 <= t.factor <= lim["factor"]),
         "super-resolution needs a factor in 1..64")  # fmt: skip
    need(t.name != "blur" or (t.blur_kernel is not None and 1 <= t.blur_kernel <= lim["kernel"]
                              and t.blur_kernel % 2 == 1 and t.blur_sigma is not None
                              and math.isfinite(t.blur_sigma) and t.blur_sigma > 0),
         "blur needs an odd kernel size in 1..255 and a positive sigma")  # fmt: skip
    if s.t_range is not None:
        lo, hi = s.t_range
        need(0 <= lo <= hi < m.num_timesteps, f"t_range {s.t_range} outside 0..{m.num_timesteps - 1}")
    need(t.class_label is None or 0 <= t.class_label < lim["class_label"], "class label out of range")
    need(math.isfinite(s.eta) and 0 <= s.eta <= 16, f"eta {s.eta} outside [0, 16]")
    # jax.random.key keeps only the low 32 bits of an int seed (without x64): larger
    # seeds would alias smaller ones, so the format refuses them.
    need(0 <= p.seed < 2**32, "seed outside 0..2^32-1")
    need(m.noise_schedule in NOISE_SCHEDULES, f"unknown noise schedule {m.noise_schedule!r}")
    need(len(s.respacing) <= lim["string"] and s.respacing.isascii(), "respacing string too long")
    need(len(m.fingerprint) == FINGERPRINT_BYTES, "fingerprint must be 16 bytes")
    need(m.compute_dtype in COMPUTE_DTYPES, f"unknown compute dtype {m.compute_dtype!r}")
    for name, size in (("coded size", g.size), ("original size", g.original_size)):
        need(len(size) == 2 and all(1 <= v <= lim["side"] for v in size), f"{name} {size} outside 1..16384")
    need(g.size_policy in SIZE_POLICIES, f"unknown size policy {g.size_policy!r}")
    _validate_geometry(g)
    need(len(p.jax_version) <= lim["string"] and p.jax_version.isascii(), "jax version string too long")
    for name, text in (("respacing", s.respacing), ("jax version", p.jax_version)):
        need(text.isprintable(), f"{name} string has control characters")
    need(p.prng_impl in PRNG_IMPLS, f"unknown PRNG {p.prng_impl!r}")
    need(s.generator in CODEBOOK_GENERATORS, f"unknown codebook generator {s.generator!r}")
    need(0 <= p.codebook_check < 2**32, "codebook check out of range")
    _validate_latent(s, t)
    rows = s.code_rows
    need(rows * s.num_atoms <= lim["code_symbols"],
         f"(steps - 1) x M = {rows * s.num_atoms} atoms is more than {lim['code_symbols']}")  # fmt: skip
    work = fmt.decode_work(rows, s.codebook_size, s.num_atoms)
    need(work <= lim["rank_work"], f"{s.rule} code too costly to decode: (steps - 1) x M x rank bits = "
                                   f"{work} > {lim['rank_work']}")  # fmt: skip


def _validate_latent(s: StoredSpec, t: Task) -> None:
    """A latent code's block, and the pixel-only settings it must leave at their neutral values."""
    if s.latent_schedule is None:
        if s.no_bits_steps or t.prompt_hash is not None or t.guidance:
            raise ValueError("no-bits steps and prompts belong to latent codes (format version 2)")
        return
    from ddcm_jax.respacing import LATENT_SCHEDULES, TURBO_TIMESTEPS

    if s.latent_schedule not in LATENT_SCHEDULES:
        raise ValueError(f"unknown latent schedule {s.latent_schedule!r}")
    if s.latent_schedule == "turbo" and s.steps > len(TURBO_TIMESTEPS):
        raise ValueError(f"the turbo schedule has at most {len(TURBO_TIMESTEPS)} steps, not {s.steps}")
    if not 0 <= s.no_bits_steps <= s.steps - 2:
        raise ValueError(f"no-bits steps {s.no_bits_steps} outside 0..steps-2")
    if t.name not in ("compression", "generation") or t.class_label is not None:
        raise ValueError(f"a latent code is a compression or generation without class label, not {t.name}")
    if s.respacing or s.clip or s.eta != 1.0:
        raise ValueError("a latent code has no respacing, no x0 clipping and eta 1")
    if FORMATS[s.rule].codes_first_steps and s.t_range is not None:
        raise ValueError(f"a latent {s.rule} code has no t_range")
    if t.prompt_hash is not None and len(t.prompt_hash) != PROMPT_HASH_BYTES:
        raise ValueError("prompt hash must be 16 bytes")
    if not (math.isfinite(t.guidance) and 0 <= t.guidance <= 100):
        raise ValueError(f"guidance {t.guidance} outside [0, 100]")
    if t.prompt_hash is None and t.guidance:
        raise ValueError("guidance without a prompt")


def _validate_geometry(g: Geometry) -> None:
    """The coded and original sizes must be ones the size policy can produce (`ddcm_jax.images`)."""
    (hc, wc), (h0, w0) = g.size, g.original_size
    if g.size_policy == "none" and (h0, w0) != (hc, wc):
        raise ValueError(f"policy none but original size {h0}x{w0} differs from the coded {hc}x{wc}")
    if g.size_policy in ("crop", "resize") and hc != wc:
        raise ValueError(f"policy {g.size_policy} codes a square, not {hc}x{wc}")
    if g.size_policy == "pad" and (h0 > hc or w0 > wc):
        raise ValueError(f"policy pad but original size {h0}x{w0} is larger than the coded {hc}x{wc}")
    if g.size_policy == "fit" and not (hc >= h0 and wc >= w0):
        # scaled: the longer side was brought to the frame's, the other one fits inside it
        long_c, long_0, short_c, short_0 = (hc, h0, wc, w0) if h0 >= w0 else (wc, w0, hc, h0)
        if long_c >= long_0 or round(short_0 * long_c / long_0) > short_c:
            raise ValueError(f"policy fit cannot code {h0}x{w0} in a {hc}x{wc} frame")


# --- bit accounting -----------------------------------------------------------------------------


def bits_per_step(rule: str, codebook_size: int, num_atoms: int = 1, coef_bits: int = 0) -> int:
    """Payload bits of one coded step (exact, big integers): the rule's format says."""
    return FORMATS[rule].bits_per_step(codebook_size, num_atoms, coef_bits)


def coded_steps(timesteps_run_order: Sequence[int], t_range: tuple[int, int] | None,
                rows: int | None = None) -> np.ndarray:  # fmt: skip
    """Mask over the `rows` noise-adding steps (default all but the last, in the sampler's order)
    that are stored."""
    t = np.asarray(timesteps_run_order[: len(timesteps_run_order) - 1 if rows is None else rows])
    if t_range is None:
        return np.ones(t.shape, bool)
    return (t >= t_range[0]) & (t <= t_range[1])


def code_mask(h: Header) -> np.ndarray:
    """Over the code's `code_rows` rows: which are stored (inside t_range)."""
    return coded_steps(schedule_timesteps(h), h.spec.t_range, h.spec.code_rows)


def schedule_timesteps(h: Header) -> np.ndarray:
    """Original timesteps in the order the sampler runs them (the last one adds no noise)."""
    if h.spec.latent_schedule is not None:
        from ddcm_jax.respacing import latent_timesteps

        return latent_timesteps(h.spec.latent_schedule, h.spec.steps, h.model.num_timesteps)[0]
    return _timesteps(h.model.noise_schedule, h.model.num_timesteps, h.spec.respacing_or_steps, h.spec.steps)


@functools.lru_cache(maxsize=256)
def _timesteps(noise_schedule: str, num_timesteps: int, respacing: str, steps: int) -> np.ndarray:
    from ddcm_jax.respacing import space_timesteps

    try:
        kept = space_timesteps(num_timesteps, respacing)
    except ValueError as e:
        raise ValueError(f"schedule {noise_schedule}/{num_timesteps}/{respacing!r}: {e}") from None
    if len(kept) != steps:
        raise ValueError(f"respacing {respacing!r} gives {len(kept)} steps, header says {steps}")
    out = np.asarray(kept[::-1])
    out.flags.writeable = False  # shared by the cache
    return out


def payload_bits(h: Header) -> int:
    """Exact payload length in bits: coded steps x `bits_per_step`."""
    n = int(code_mask(h).sum())
    return n * h.spec.step_bits


# --- byte-level helpers -------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated ({what})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        n = shift = 0
        for _ in range(10):  # 64-bit values at most
            b = self.byte(what)
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b == 0 and shift > 7:
                    raise ValueError(f"non-canonical varint ({what})")
                return n
        raise ValueError(f"varint too long ({what})")

    def string(self, what: str) -> str:
        n = self.varint(what)
        if n > LIMITS["string"]:
            raise ValueError(f"{what} longer than {LIMITS['string']} bytes")
        raw = self.take(n, what)
        if not raw.isascii():
            raise ValueError(f"{what} is not ASCII")
        return raw.decode("ascii")

    def f32(self, what: str) -> float:
        return struct.unpack("<f", self.take(4, what))[0]

    def enum(self, names: Sequence[str], what: str) -> str:
        v = self.byte(what)
        if v >= len(names):
            raise ValueError(f"unknown {what} code {v}")
        return names[v]


def _f32(v: float) -> float:
    """v rounded to float32 (inf when out of range, for validation to refuse)."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        return math.inf


def _header_bytes(h: Header) -> bytes:
    s, g, m, t, p = h.spec, h.geometry, h.model, h.task, h.provenance
    out = bytearray(MAGIC)
    out.append(h.version)
    flags = ((s.t_range is not None) << 0 | (t.class_label is not None) << 1
             | bool(s.clip) << 2 | bool(p.threefry_partitionable) << 3)  # fmt: skip
    out += bytes([flags, RULES.index(s.rule), TASKS.index(t.name)])
    if t.name == "super-resolution":
        out += _varint(t.factor)
    elif t.name == "blur":
        out += _varint(t.blur_kernel) + struct.pack("<f", t.blur_sigma)
    for v in (s.steps, s.codebook_size, s.num_atoms, s.coef_bits):
        out += _varint(v)
    if s.t_range is not None:
        out += _varint(s.t_range[0]) + _varint(s.t_range[1])
    if t.class_label is not None:
        out += _varint(t.class_label)
    out += struct.pack("<f", s.eta) + _varint(p.seed)
    resp = s.respacing.encode("ascii")
    out += bytes([NOISE_SCHEDULES.index(m.noise_schedule)]) + _varint(m.num_timesteps) + _varint(len(resp)) + resp
    out += m.fingerprint + bytes([COMPUTE_DTYPES.index(m.compute_dtype)])
    out += b"".join(_varint(v) for v in (*g.size, *g.original_size))
    jv = p.jax_version.encode("ascii")
    out += bytes([SIZE_POLICIES.index(g.size_policy)]) + _varint(len(jv)) + jv
    out += bytes([PRNG_IMPLS.index(p.prng_impl), CODEBOOK_GENERATORS.index(s.generator)])
    out += struct.pack(">I", p.codebook_check)
    if s.latent_schedule is not None:
        from ddcm_jax.respacing import LATENT_SCHEDULES

        out += bytes([LATENT_SCHEDULES.index(s.latent_schedule)]) + _varint(s.no_bits_steps)
        out.append(int(t.prompt_hash is not None))
        if t.prompt_hash is not None:
            out += t.prompt_hash + struct.pack("<f", t.guidance)
    return bytes(out)


def _read_header(r: _Reader) -> Header:
    if r.take(4, "magic") != MAGIC:
        raise ValueError("not a .ddcm file (wrong magic)")
    version = r.byte("version")
    if version not in (VERSION, LATENT_VERSION):
        raise ValueError(f"unsupported format version {version} (this reader knows {VERSION} and {LATENT_VERSION})")
    flags = r.byte("flags")
    if flags >> 4:
        raise ValueError(f"unknown flags 0x{flags:02x}")
    rule, task = r.enum(RULES, "rule"), r.enum(TASKS, "task")
    factor = blur_kernel = blur_sigma = None
    if task == "super-resolution":
        factor = r.varint("factor")
    elif task == "blur":
        blur_kernel, blur_sigma = r.varint("blur kernel"), r.f32("blur sigma")
    steps, k, m, c = (r.varint(w) for w in ("steps", "K", "M", "C"))
    t_range = (r.varint("t_min"), r.varint("t_max")) if flags & 1 else None
    class_label = r.varint("class label") if flags & 2 else None
    eta, seed = r.f32("eta"), r.varint("seed")
    noise_schedule, num_timesteps = r.enum(NOISE_SCHEDULES, "noise schedule"), r.varint("num_timesteps")
    respacing = r.string("respacing")
    fingerprint = r.take(FINGERPRINT_BYTES, "fingerprint")
    compute_dtype = r.enum(COMPUTE_DTYPES, "compute dtype")
    size = (r.varint("height"), r.varint("width"))
    original = (r.varint("original height"), r.varint("original width"))
    size_policy = r.enum(SIZE_POLICIES, "size policy")
    jax_version = r.string("jax version")
    prng_impl = r.enum(PRNG_IMPLS, "prng")
    generator = r.enum(CODEBOOK_GENERATORS, "codebook generator")
    check = struct.unpack(">I", r.take(4, "codebook check"))[0]
    latent: dict[str, Any] = {}
    prompt: dict[str, Any] = {}
    if version == LATENT_VERSION:
        from ddcm_jax.respacing import LATENT_SCHEDULES

        latent["latent_schedule"] = r.enum(LATENT_SCHEDULES, "latent schedule")
        latent["no_bits_steps"] = r.varint("no-bits steps")
        prompt_flags = r.byte("prompt flags")
        if prompt_flags >> 1:
            raise ValueError(f"unknown prompt flags 0x{prompt_flags:02x}")
        if prompt_flags & 1:
            prompt["prompt_hash"] = r.take(PROMPT_HASH_BYTES, "prompt hash")
            prompt["guidance"] = r.f32("guidance")
    spec = StoredSpec(rule, steps, k, m, c, generator, eta, respacing, t_range, bool(flags & 4), **latent)
    return Header(
        spec, Geometry(size, original, size_policy), ModelId(fingerprint, noise_schedule, num_timesteps, compute_dtype),
        Task(task, factor, blur_kernel, blur_sigma, class_label, **prompt),
        Provenance(seed, jax_version, prng_impl, bool(flags & 8), check),
    )


# --- payload ------------------------------------------------------------------------------------


def idle_step(rule: str, num_atoms: int, coeff_width: int) -> tuple[list[int], list[int]]:
    """The code of a step outside t_range, which carries no bits (the rule's format says: atom 0;
    turbo: atoms 0..M-1, positive)."""
    return FORMATS[rule].idle(num_atoms, coeff_width)


def _pack(s: StoredSpec, indices: np.ndarray, coeffs: np.ndarray, coded: np.ndarray) -> bytes:
    fmt = FORMATS[s.rule]
    bits = "".join(fmt.pack([int(v) for v in indices[i]], [int(v) for v in coeffs[i]], s.codebook_size,
                            s.num_atoms, s.coef_bits) for i in np.flatnonzero(coded))  # fmt: skip
    if not bits:
        return b""
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _unpack(s: StoredSpec, payload: bytes, coded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The code of every step from an exact-length payload (`decode` checked the length)."""
    fmt = FORMATS[s.rule]
    rows = np.flatnonzero(coded)
    pad = 8 * len(payload) - len(rows) * s.step_bits
    if pad and payload[-1] & ((1 << pad) - 1):
        raise ValueError("nonzero padding bits after the payload")
    buf = np.frombuffer(payload + bytes(4), np.uint8)
    base = np.arange(len(rows), dtype=np.int64)[:, None] * s.step_bits
    idle_idx, idle_co = fmt.idle(s.num_atoms, s.coeff_width)
    indices = np.tile(np.asarray(idle_idx, np.int32), (len(coded), 1)).reshape(len(coded), s.num_atoms)
    coeffs = np.tile(np.asarray(idle_co, np.int32), (len(coded), 1)).reshape(len(coded), s.coeff_width)
    idx, co = fmt.unpack(payload, buf, base, rows, s.codebook_size, s.num_atoms, s.coef_bits)
    indices[rows], coeffs[rows] = idx, co
    return indices, coeffs


# --- files --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """A checked file whose payload is not decoded yet: the header and the byte counts.

    `decode_header` returns it after every check but the payload's own content
    (magic, version, header limits, exact length, CRC), without decoding the code.
    """

    header: Header
    header_bytes: int
    payload_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes + 4

    @property
    def payload_bits(self) -> int:
        return payload_bits(self.header)


@dataclasses.dataclass(frozen=True)
class Bitstream(FileHeader):
    """A decoded file: the header and the code for every noise-adding step.

    `indices` (code_rows, M) and `coeffs` (code_rows, coeff_width), in the order
    the sampler runs; steps outside t_range hold their implied defaults.
    """

    indices: np.ndarray = dataclasses.field(kw_only=True)
    coeffs: np.ndarray = dataclasses.field(kw_only=True)


def encode(header: Header, indices: Any, coeffs: Any) -> bytes:
    """The file bytes for `header` and the sampler's code (steps-1 rows each).

    Raises ValueError if the code does not fit the header (shapes, index range,
    turbo sets not sorted and distinct, defaults outside t_range).
    """
    s = header.spec
    indices = np.asarray(indices, np.int64)
    rows = s.code_rows
    coeffs = np.asarray(coeffs, np.int64).reshape(rows, s.coeff_width)
    if indices.shape != (rows, s.num_atoms):
        raise ValueError(f"indices must be {(rows, s.num_atoms)}, got {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= s.codebook_size):
        raise ValueError("atom index outside 0..K-1")
    coded = code_mask(header)
    fmt = FORMATS[s.rule]
    if coeffs.size and (coeffs.min() < 0 or coeffs.max() >= fmt.coeff_levels(s.coef_bits)):
        raise ValueError("coefficient outside its bit width")
    why = fmt.check_code(indices)
    if why is not None:
        raise ValueError(why)
    default_idx, default_co = idle_step(s.rule, s.num_atoms, s.coeff_width)
    for i in np.flatnonzero(~coded):
        if list(indices[i]) != default_idx or list(coeffs[i]) != default_co:
            raise ValueError(f"step {i} is outside t_range but does not hold the default code")
    head = _header_bytes(header)
    body = head + _pack(s, indices, coeffs, coded)
    return body + struct.pack(">I", zlib.crc32(body))


@contextlib.contextmanager
def _naming(source: str) -> Iterator[None]:
    """Turn the parser's ValueErrors into one-line BitstreamErrors that name `source`."""
    from ddcm_jax.printable import printable

    try:
        yield
    except BitstreamError:
        raise
    except (ValueError, OverflowError, struct.error) as e:
        raise BitstreamError(f"{printable(source)}: {printable(e)}") from None


def decode_header(data: bytes, source: str = "<bytes>") -> FileHeader:
    """Check a `.ddcm` file up to its payload: magic, version, header, length, CRC-32.

    Cheap whatever the file claims (the header's limits bound what decoding the
    payload costs); raises BitstreamError naming `source` and the reason.
    """
    with _naming(source):
        if len(data) > LIMITS["file_bytes"]:
            raise ValueError(f"{len(data)} bytes is larger than any valid .ddcm file")
        if not MAGIC.startswith(data[: len(MAGIC)]) or not data:
            raise ValueError("not a .ddcm file (wrong magic)" if data else "empty file")
        r = _Reader(data)
        header = _read_header(r)
        n_head = r.pos
        n_payload = -(-payload_bits(header) // 8)
        want = n_head + n_payload + 4
        if len(data) != want:
            what = "truncated" if len(data) < want else "has trailing bytes"
            raise ValueError(f"{what}: {len(data)} bytes, the header implies {want}")
        if zlib.crc32(data[:-4]) != struct.unpack(">I", data[-4:])[0]:
            raise ValueError("CRC-32 mismatch (the file is corrupt)")
    return FileHeader(header, n_head, n_payload)


def decode(data: bytes, source: str = "<bytes>") -> Bitstream:
    """Parse and check a `.ddcm` file and decode its code; raises BitstreamError naming `source`."""
    head = decode_header(data, source)
    h, start = head.header, head.header_bytes
    with _naming(source):
        coded = code_mask(h)
        indices, coeffs = _unpack(h.spec, data[start : start + head.payload_bytes], coded)
    return Bitstream(h, head.header_bytes, head.payload_bytes, indices=indices, coeffs=coeffs)
