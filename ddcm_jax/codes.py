"""The file format of each rule's code: what one step of a `.ddcm` payload holds (NumPy only).

A rule (`ddcm_jax.selection`) names its format by `code_name`; the format
says everything the bitstream needs about that code, so that a rule a file
can store touches this module and the rule's own class, and nothing else:

  check(K, M, C)         why these settings cannot be stored (or None)
  coeff_width(M)         coefficients per step; coeff_levels(C): each in 0 .. levels - 1
  bits_per_step(K, M, C) payload bits of one coded step (exact)
  idle(M, width)         the code of a step outside t_range, which carries no bits
  check_code(indices)    a code the writer could not have made (turbo: unsorted sets)
  pack(...) / unpack(...) the MSB-first bit fields of the coded steps
  decode_work(rows, K, M) the integer work decoding costs (bounded by the header limits)

`FORMATS` maps every stored rule name to its format. Imports no JAX: the
bitstream is read and written with NumPy alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_LN2 = math.log(2)

__all__ = ["FORMATS", "CodeFormat", "ceil_log2", "rank_bits", "rank_subset", "unrank_subset"]


def ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


@functools.lru_cache(maxsize=64)
def rank_bits(codebook_size: int, num_atoms: int) -> int:
    """ceil(log2 binom(K, M)): the width of a turbo step's subset rank."""
    return ceil_log2(math.comb(codebook_size, num_atoms))


def rank_subset(atoms: Sequence[int], codebook_size: int) -> int:
    """Lexicographic rank of the sorted M-subset `atoms` of range(K), in 0 .. binom(K, M) - 1.

    Through the complement d_i = K - 1 - c_i, lexicographic order on (c_1 < ... < c_M)
    is reversed colexicographic order on the d's, whose rank is sum_i binom(d_i, M + 1 - i):
    O(M) exact big-integer binomials.
    """
    m = len(atoms)
    return math.comb(codebook_size, m) - 1 - sum(
        math.comb(codebook_size - 1 - c, m - i) for i, c in enumerate(atoms)
    )


def unrank_subset(rank: int, codebook_size: int, num_atoms: int) -> list[int]:
    """The sorted subset with lexicographic rank `rank` (inverse of `rank_subset`).

    Greedy in the combinatorial number system: for j = M .. 1, d_j is the largest
    d < d_{j+1} with binom(d, j) <= rem, then rem -= binom(d_j, j). A float estimate
    of d_j (from log-gamma) is made exact with one big-integer binomial and a few
    one-word multiply/divide steps along d (binom(d +- 1, j) from binom(d, j)), so
    each element costs one `math.comb` instead of a bisection of ~log2 K of them;
    a set dense below the previous element walks down from it without any.
    """
    k, m = codebook_size, num_atoms
    total = math.comb(k, m)
    if not 0 <= rank < total:
        raise ValueError(f"rank {rank} outside 0..binom({k}, {m}) - 1")
    rem = total - 1 - rank
    out: list[int] = []
    hi, c_hi = k, total  # d_j < hi, and c_hi = binom(hi, j)
    for j in range(m, 0, -1):
        if rem == 0:  # every remaining d_i is its smallest value, i - 1
            out.extend(k - j + i for i in range(j))
            break
        d, c = _largest_binomial_below(rem, j, hi, c_hi)
        rem -= c
        out.append(k - 1 - d)
        hi, c_hi = d, c * j // (d - j + 1)  # binom(d, j - 1); d >= j since rem > 0
    return out


def _largest_binomial_below(rem: int, j: int, hi: int, c_hi: int) -> tuple[int, int]:
    """(d, binom(d, j)) for the largest d < hi with binom(d, j) <= rem.

    Needs 1 <= rem < binom(hi, j) = c_hi, so j <= d < hi.
    """
    if j == 1:
        return rem, rem
    n = rem.bit_length()
    s = max(0, n - 60)
    ln_rem = math.log(rem >> s) + s * _LN2
    # binom(x, j) ~ (x - (j - 1) / 2)^j / j!, then Newton on ln binom(x, j) = ln rem.
    x = math.exp((ln_rem + math.lgamma(j + 1)) / j) + (j - 1) / 2
    for _ in range(4):
        x = min(max(x, float(j)), hi - 1.0)
        f = math.lgamma(x + 1) - math.lgamma(x - j + 1) - math.lgamma(j + 1) - ln_rem
        step = f / math.log((x + 0.5) / (x - j + 0.5))
        x -= step
        if abs(step) < 0.25:
            break
    d = min(max(int(x), j), hi - 1)
    if hi - 1 - d <= 2 + j // 8:  # close to the top: start from binom(hi - 1, j), one word op away
        d, c = hi - 1, c_hi * (hi - j) // hi
        walk = 4 + j // 4
    else:
        c = math.comb(d, j)
        walk = 16
    for _ in range(walk):
        if c > rem:  # binom(d - 1, j) = binom(d, j) (d - j) / d
            c = c * (d - j) // d
            d -= 1
            continue
        if d + 1 == hi:
            return d, c
        up = c * (d + 1) // (d + 1 - j)  # binom(d + 1, j)
        if up > rem:
            return d, c
        d, c = d + 1, up
    # The estimate was far off (it never is by more than a step or two): exact bisection.
    lo_d, hi_d = j - 1, hi - 1
    while lo_d < hi_d:
        mid = (lo_d + hi_d + 1) // 2
        if math.comb(mid, j) <= rem:
            lo_d = mid
        else:
            hi_d = mid - 1
    return lo_d, math.comb(lo_d, j)



def fields(buf: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """The `width`-bit (<= 25) MSB-first fields at bit `offsets` of `buf` (bytes, 4 zero bytes after)."""
    if width == 0:
        return np.zeros(offsets.shape, np.int64)
    at = offsets >> 3
    word = sum(buf[at + i].astype(np.int64) << (24 - 8 * i) for i in range(4))
    return (word >> (32 - (offsets & 7) - width)) & ((1 << width) - 1)


class CodeFormat:
    """What one step of a rule's code is in a file."""

    codes_first_steps = False  # a latent code of this rule codes its first steps, never idles by t_range

    def check(self, codebook_size: int, num_atoms: int, coef_bits: int) -> str | None:
        return None if (num_atoms, coef_bits) == (1, 0) else "uses exactly one atom per step and no coefficient bits"

    def coeff_width(self, num_atoms: int) -> int:
        return 0

    def coeff_levels(self, coef_bits: int) -> int:
        return 1

    def bits_per_step(self, codebook_size: int, num_atoms: int, coef_bits: int) -> int:
        return num_atoms * ceil_log2(codebook_size)

    def idle(self, num_atoms: int, coeff_width: int) -> tuple[list[int], list[int]]:
        return [0] * num_atoms, [0] * coeff_width

    def check_code(self, indices: np.ndarray) -> str | None:
        return None

    def decode_work(self, rows: int, codebook_size: int, num_atoms: int) -> int:
        return 0

    def pack(self, idx: list[int], co: list[int], codebook_size: int, num_atoms: int, coef_bits: int) -> str:
        """One coded step as a string of '0' / '1'."""
        b = ceil_log2(codebook_size)
        parts = [format(idx[0], f"0{b}b") if b else ""]
        for m in range(1, num_atoms):
            parts.append(format(co[m - 1], f"0{coef_bits}b") + (format(idx[m], f"0{b}b") if b else ""))
        return "".join(parts)

    def unpack(self, payload: bytes, buf: np.ndarray, base: np.ndarray, rows: np.ndarray, codebook_size: int,
               num_atoms: int, coef_bits: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(indices (n, M), coeffs (n, width)) of the n coded steps starting at bit `base` (n, 1)."""
        k, m, c = codebook_size, num_atoms, coef_bits
        b = ceil_log2(k)
        at = np.arange(m, dtype=np.int64) * (b + c)  # index m: m (b + C); coefficient m: m (b + C) - C
        idx = fields(buf, base + at, b)
        if idx.size and idx.max() >= k:
            bad = int(np.flatnonzero(idx.max(axis=1) >= k)[0])
            raise ValueError(f"atom index {int(idx[bad].max())} >= K = {k} at step {int(rows[bad])}")
        return idx, fields(buf, base + at[1:] - c, c)


class SingleAtom(CodeFormat):
    """DDCM's code (and every single-atom rule's: random, mse): the index of one atom, ceil(log2 K) bits."""


class Pursuit(CodeFormat):
    """Matching pursuit: M atom indices and M-1 coefficient indices of C bits each."""

    def check(self, codebook_size: int, num_atoms: int, coef_bits: int) -> str | None:
        if num_atoms < 2:
            return "matching pursuit needs at least 2 atoms"
        return None if 1 <= coef_bits <= 16 else f"coef_bits {coef_bits} outside 1..16"

    def coeff_width(self, num_atoms: int) -> int:
        return num_atoms - 1

    def coeff_levels(self, coef_bits: int) -> int:
        return 2**coef_bits

    def bits_per_step(self, codebook_size: int, num_atoms: int, coef_bits: int) -> int:
        return num_atoms * ceil_log2(codebook_size) + (num_atoms - 1) * coef_bits


class Subset(CodeFormat):
    """Turbo-DDCM: the rank of the sorted set of M atoms, then M sign bits (1 = negative)."""

    codes_first_steps = True

    def check(self, codebook_size: int, num_atoms: int, coef_bits: int) -> str | None:
        if coef_bits:
            return "turbo has no coefficient bits"
        return None if num_atoms <= codebook_size else "turbo needs num_atoms <= codebook size"

    def coeff_width(self, num_atoms: int) -> int:
        return num_atoms

    def coeff_levels(self, coef_bits: int) -> int:
        return 2

    def bits_per_step(self, codebook_size: int, num_atoms: int, coef_bits: int) -> int:
        return rank_bits(codebook_size, num_atoms) + num_atoms

    def idle(self, num_atoms: int, coeff_width: int) -> tuple[list[int], list[int]]:
        return list(range(num_atoms)), [0] * coeff_width  # atoms 0..M-1, positive

    def check_code(self, indices: np.ndarray) -> str | None:
        return "turbo atom sets must be sorted and distinct" if (np.diff(indices, axis=1) <= 0).any() else None

    def decode_work(self, rows: int, codebook_size: int, num_atoms: int) -> int:
        return rows * num_atoms * rank_bits(codebook_size, num_atoms)

    def pack(self, idx: list[int], co: list[int], codebook_size: int, num_atoms: int, coef_bits: int) -> str:
        n_rank = rank_bits(codebook_size, num_atoms)
        rank = format(rank_subset(idx, codebook_size), f"0{n_rank}b") if n_rank else ""
        return rank + "".join("1" if v else "0" for v in co)

    def unpack(self, payload: bytes, buf: np.ndarray, base: np.ndarray, rows: np.ndarray, codebook_size: int,
               num_atoms: int, coef_bits: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        k, m = codebook_size, num_atoms
        n_rank, total = rank_bits(k, m), math.comb(k, m)
        coeffs = fields(buf, base + n_rank + np.arange(m), 1)
        indices = np.zeros((len(rows), m), np.int64)
        for j, (i, start) in enumerate(zip(rows, base[:, 0].tolist(), strict=True)):
            end = start + n_rank
            chunk = int.from_bytes(payload[start >> 3 : (end + 7) >> 3], "big") if n_rank else 0
            rank = (chunk >> (-end % 8)) & ((1 << n_rank) - 1)
            if rank >= total:
                raise ValueError(f"atom-set rank out of range at coded step {i}")
            indices[j] = unrank_subset(rank, k, m)
        return indices, coeffs


FORMATS: dict[str, Any] = {
    "ddcm": SingleAtom(),
    "mp": Pursuit(),
    "turbo": Subset(),
    "random": SingleAtom(),
    "mse": SingleAtom(),
    "mse_inner": SingleAtom(),
}
