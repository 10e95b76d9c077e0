"""Shape annotations for public signatures, in jaxtyping's notation without the dependency.

`Annotated[jax.Array, "*B H W C"]`: a leading `*B` is an optional batch axis
(present for a batch, absent for one image); other names must agree across
the arguments of one call. They document; nothing checks them at run time.
"""

from __future__ import annotations

from typing import Annotated, Any

import jax

__all__ = [
    "Atoms", "Code", "Codebook", "Coeffs", "Image", "Indices", "Key", "Label", "Measurement", "Pixels",
    "StepIndices", "Weights",
]  # fmt: skip

Image = Annotated[jax.Array, "*B H W C float32 in [-1, 1]"]
Weights = Annotated[jax.Array, "*B H W 1|C float32"]
Measurement = Annotated[jax.Array, "*B ... float32 (the operator's output)"]
Indices = Annotated[jax.Array, "*B steps-1 M int32"]
Coeffs = Annotated[jax.Array, "*B steps-1 coeff_width int32"]
Code = Annotated[Any, "(Indices, Coeffs)"]
Key = Annotated[Any, "*B typed jax.random.key, or an int seed"]
Label = Annotated[Any, "*B int class label"]
Pixels = Annotated[Any, "H W 3 uint8 numpy array"]
Codebook = Annotated[jax.Array, "steps-1 K H W C float32 (an explicit codebook instead of the key's)"]
StepIndices = Annotated[jax.Array, "M int32 (one step's chosen atoms)"]
Atoms = Annotated[jax.Array, "... float32 (a residual, or the noise built from atoms; one image's shape)"]
