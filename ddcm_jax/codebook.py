"""Codebooks derived from keys by integer folds, and chunked scoring over them.

Step i's codebook comes from `fold_in(root, i)` and its atom k from
`fold_in(step_key, k)`, so any single atom can be regenerated without the
others: a decoder told index k at step i draws exactly one normal vector.
Keys are looked up by integer (respaced step, atom index), never by float time.

Scores over a codebook are computed in chunks of atoms (`lax.map` over chunk
starts), so the K x D codebook never exists in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["atom", "atoms", "chunked_scores", "step_key"]


def step_key(root: jax.Array, i: jax.Array | int) -> jax.Array:
    """The key of respaced step i's codebook."""
    return jax.random.fold_in(root, i)


def atom(key: jax.Array, k: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
    """Atom k of the codebook whose step key is `key`: N(0, I) of `shape`, float32."""
    return jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32)


def atoms(key: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Atoms ks (N,) -> (N, *shape)."""
    return jax.vmap(lambda k: atom(key, k, shape))(ks)


def chunked_scores(
    get_atoms: Callable[[jax.Array], jax.Array],
    score: Callable[[jax.Array], jax.Array],
    codebook_size: int,
    chunk: int,
) -> jax.Array:
    """Scores (K, ...) of every atom, `chunk` atoms at a time.

    `get_atoms(ks)` returns the atoms (n, *shape) for indices ks (n,);
    `score(z)` maps (n, *shape) -> (n,) or (n, w). Peak memory is chunk x D
    (times w), not K x D.
    """
    chunk = max(1, min(chunk, codebook_size))
    n_chunks = -(-codebook_size // chunk)

    def one(start: jax.Array) -> jax.Array:
        ks = start + jnp.arange(chunk)
        # Indices past K (last chunk) are scored on clamped atoms and masked out.
        s = score(get_atoms(jnp.minimum(ks, codebook_size - 1)))
        valid = (ks < codebook_size).reshape((chunk,) + (1,) * (s.ndim - 1))
        return jnp.where(valid, s, -jnp.inf)

    out = jax.lax.map(one, jnp.arange(n_chunks) * chunk)
    return out.reshape(-1, *out.shape[2:])[:codebook_size]
