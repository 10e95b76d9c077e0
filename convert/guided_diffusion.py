"""Strict mapping of guided-diffusion state dicts onto the Flax ADM parameter tree.

Every Flax parameter names its PyTorch key (`ddcm_jax.models.adm.torch_key`)
and a layout transform chosen by the two ranks:

  Flax 4-D conv kernel HWIO  <- torch Conv2d weight OIHW   (transpose 2,3,1,0)
  Flax 2-D dense kernel (I,O) <- torch Linear weight (O,I) (transpose)
  Flax 2-D dense kernel (I,O) <- torch Conv1d weight (O,I,1) (attention qkv/proj_out)
  biases, norm scales, embedding tables                       unchanged

`plan_conversion` checks names and shapes before any array is touched: every
checkpoint key must be used exactly once, every Flax parameter filled, every
shape agree. It needs only shapes, so the 2 GB ImageNet model can be checked
with `jax.eval_shape` and a shape manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ddcm_jax.models.adm import ADMConfig, abstract_params, torch_key
from ddcm_jax.printable import printable

__all__ = ["PRESETS", "ConversionError", "ConversionPlan", "convert_state_dict", "plan_conversion"]


# `create_model` keyword arguments of the released checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI's 256x256_diffusion_uncond.pt (the DDCM paper's pixel-space model).
    "imagenet256-uncond": dict(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
        attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
        num_heads_upsample=-1, learn_sigma=True, class_cond=False,
        use_scale_shift_norm=True, resblock_updown=True, use_fp16=False,
        use_new_attention_order=False, dropout=0.0,
    ),
    # OpenAI's 256x256_diffusion.pt (class-conditional ImageNet 256).
    "imagenet256-cond": dict(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult="",
        attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
        num_heads_upsample=-1, learn_sigma=True, class_cond=True,
        use_scale_shift_norm=True, resblock_updown=True, use_fp16=False,
        use_new_attention_order=False, dropout=0.0,
    ),
    # The FFHQ 256 model of DPS (ffhq_10m.pt), used for face restoration.
    "ffhq256": dict(
        image_size=256, num_channels=128, num_res_blocks=1, channel_mult="",
        attention_resolutions="16", num_heads=4, num_head_channels=64,
        num_heads_upsample=-1, learn_sigma=True, class_cond=False,
        use_scale_shift_norm=True, resblock_updown=True, use_fp16=False,
        use_new_attention_order=False, dropout=0.0,
    ),
}  # fmt: skip


class ConversionError(ValueError):
    """Checkpoint and architecture disagree; lists missing/unexpected/mis-shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], misshaped: list[str]):
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                # Keys come from the file: escape them so the message stays one plain line.
                shown = ", ".join(printable(k)[:200] for k in keys[:8])
                shown += f", … ({len(keys)} in all)" if len(keys) > 8 else ""
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__("checkpoint does not match the architecture: " + "; ".join(parts))


def _layout(leaf: str, flax_shape: tuple[int, ...], torch_shape: tuple[int, ...]) -> str:
    if leaf != "kernel":  # biases, norm scales and embedding tables keep their layout
        return "same"
    if len(flax_shape) == 4 and len(torch_shape) == 4:
        return "conv2d"
    if len(flax_shape) == 2 and len(torch_shape) == 2:
        return "linear"
    if len(flax_shape) == 2 and len(torch_shape) == 3 and torch_shape[2] == 1:
        return "conv1d"
    return "same"


def _to_flax(layout: str, a: np.ndarray) -> np.ndarray:
    if layout == "conv2d":
        return a.transpose(2, 3, 1, 0)
    if layout == "linear":
        return a.T
    if layout == "conv1d":
        return a[:, :, 0].T
    return a


def _torch_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "conv2d":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if layout == "linear":
        return flax_shape[::-1]
    if layout == "conv1d":
        return (flax_shape[1], flax_shape[0], 1)
    return flax_shape


@dataclasses.dataclass(frozen=True)
class ConversionPlan:
    """For each Flax leaf path: (torch key, layout). Built only when everything matches."""

    config: ADMConfig
    entries: tuple[tuple[tuple[str, ...], str, str], ...]


def _flax_leaves(config: ADMConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def plan_conversion(config: ADMConfig, shapes: Mapping[str, tuple[int, ...]]) -> ConversionPlan:
    """Match checkpoint `{key: shape}` to the architecture or raise `ConversionError`."""
    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    used: set[str] = set()
    missing, misshaped, entries = [], [], []
    for path, flax_shape in sorted(_flax_leaves(config).items()):
        key = torch_key(path)
        if key in used:  # two Flax leaves naming one key would be a bug in the rule
            raise AssertionError(f"torch key {key} produced twice")
        used.add(key)
        if key not in shapes:
            missing.append(key)
            continue
        layout = _layout(path[-1], flax_shape, shapes[key])
        if _torch_shape(layout, flax_shape) != shapes[key]:
            default = {4: "conv2d", 2: "linear"}.get(len(flax_shape), "same") if path[-1] == "kernel" else "same"
            expect = _torch_shape(layout if layout != "same" else default, flax_shape)
            misshaped.append(f"{key} {shapes[key]} (expected {expect})")
            continue
        entries.append((path, key, layout))
    unexpected = sorted(set(shapes) - used)
    if missing or unexpected or misshaped:
        raise ConversionError(sorted(missing), unexpected, misshaped)
    return ConversionPlan(config, tuple(entries))


def convert_state_dict(config: ADMConfig, state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """guided-diffusion state dict -> Flax params (float32 NumPy arrays), strictly."""
    plan = plan_conversion(config, {k: np.shape(v) for k, v in state_dict.items()})
    params: dict[str, Any] = {}
    for path, key, layout in plan.entries:
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        value = _to_flax(layout, np.asarray(state_dict[key]).astype(np.float32))
        node[path[-1]] = np.ascontiguousarray(value)
    return params
