"""How much memory a run will need, asked of XLA before anything is allocated.

A bitstream or a `--pad` input can name any image size up to the format's
limits, and ADM's self-attention grows with the square of the pixel count: a
32px network run on a 768x512 photo asks for hundreds of GB. `check_fits`
compiles the network's forward pass for the size (shapes only, about a second,
cached) and compares XLA's own peak estimate with the budget, so that such a
request ends in one clear line instead of an out-of-memory crash.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp

from ddcm_jax.jit import jit

__all__ = [
    "HOST_BYTES_PER_PIXEL",
    "LPIPS_MAX_PIXELS",
    "MemoryBudgetError",
    "budget_bytes",
    "check_fits",
    "check_host",
    "format_bytes",
    "forward_bytes",
    "host_bytes",
]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class MemoryBudgetError(ValueError):
    """A run that would need more memory than the budget allows."""


def budget_bytes() -> int:
    """DDCM_MEMORY_LIMIT (e.g. '8G') if set; else the device's limit, or 80 % of RAM on CPU."""
    env = os.environ.get("DDCM_MEMORY_LIMIT", "").strip().lower()
    if env:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", env)
        if not m:
            raise ValueError(f"DDCM_MEMORY_LIMIT={env!r}: expected a size such as 8G or 512M")
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


@functools.lru_cache(maxsize=64)
def forward_bytes(arch: object, height: int, width: int) -> int:
    """XLA's estimate of the memory one network call at batch 1 needs (temporaries + buffers)."""
    from ddcm_jax.models.adm import abstract_params, adm_apply

    params = abstract_params(arch)
    x = jax.ShapeDtypeStruct((1, height, width, arch.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = None if arch.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    compiled = jit(functools.partial(adm_apply, arch)).lower(params, x, t, y).compile()
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis: count the arguments at least
        return sum(int(p.size) * 4 for p in jax.tree_util.tree_leaves(params))
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def check_fits(arch: object, height: int, width: int, *, budget: int, codebook_chunk: int = 64,
               what: str = "") -> None:  # fmt: skip
    """Raise MemoryBudgetError if sampling an (height, width) image would exceed the budget.

    Adds the sampler's own working set to the network's: one chunk of atoms
    being scored and a handful of images (x_t, x0_hat, the target, the noise).
    The network's part is XLA's estimate (`forward_bytes`, a compilation), asked
    only when the arithmetic bound `activation_bound` does not already fit.
    """
    from ddcm_jax.models.adm import activation_bound

    own = (codebook_chunk + 8) * height * width * 3 * 4
    if activation_bound(arch, int(height), int(width)) + own <= budget:
        return  # fits even by the arithmetic over-estimate: no need to compile the network to ask XLA
    need = forward_bytes(arch, int(height), int(width)) + own
    if need > budget:
        prefix = f"{what}: " if what else ""
        raise MemoryBudgetError(
            f"{prefix}a {height}x{width} image needs about {format_bytes(need)} with this model "
            f"(budget {format_bytes(budget)}; set DDCM_MEMORY_LIMIT to change it)"
        )


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': the unit that keeps the number readable, never '0.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# Host memory of the steps around the network, in bytes per pixel of the full-size image they
# handle: peak RSS growth measured on this project's code paths (x86-64, 2 cores; 3000 x 3000
# for load/resample/PNG, 1024 x 1024 for LPIPS), rounded up: load 10.0, resample 9.9 (per
# output pixel), PNG 4.0 (plus the 3-byte array it encodes), LPIPS 307 (AlexNet features of two
# images plus XLA's temporaries).
HOST_BYTES_PER_PIXEL = {"load": 12, "resample": 12, "png": 8, "lpips": 320}
# LPIPS above this many pixels (about 2048 x 2048) is skipped with a note: it would take minutes
# and gigabytes for a number that says little more than PSNR at that size.
LPIPS_MAX_PIXELS = 1 << 22


def host_bytes(stage: str, height: int, width: int) -> int:
    """Estimated peak host bytes of `stage` ("load", "resample", "png", "lpips") at (height, width)."""
    return HOST_BYTES_PER_PIXEL[stage] * int(height) * int(width)


def check_host(stage: str, height: int, width: int, *, budget: int, what: str = "") -> None:
    """Raise MemoryBudgetError if the host-side `stage` at (height, width) would exceed the budget."""
    need = host_bytes(stage, height, width)
    if need > budget:
        prefix = f"{what}: " if what else ""
        verb = {"load": "loading", "resample": "resampling", "png": "writing", "lpips": "LPIPS of"}[stage]
        raise MemoryBudgetError(
            f"{prefix}{verb} a {width}x{height} image needs about {format_bytes(need)} "
            f"(budget {format_bytes(budget)}; set DDCM_MEMORY_LIMIT to change it)"
        )
