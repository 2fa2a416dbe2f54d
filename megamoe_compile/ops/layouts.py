"""Kernel-ready expert weights: check what the checkpoint holds, convert it to the recipe's storage
(the kernel lays it out). Runs once per layer, at load time (`prepare`), never per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant, recipes


@dataclass
class KernelWeights:
    """The four weight arguments of `megamoe.fused_moe` for one layer."""

    w1: torch.Tensor
    w1_scale: torch.Tensor | None
    w2: torch.Tensor
    w2_scale: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"w1": self.w1, "w1_scale": self.w1_scale, "w2": self.w2, "w2_scale": self.w2_scale}

    def experts(self, first: int, last: int) -> KernelWeights:
        """The weights of experts [first, last) (views, no copy)."""
        def part(t):
            return None if t is None else t[first:last]

        return KernelWeights(part(self.w1), part(self.w1_scale), part(self.w2), part(self.w2_scale))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values() if t is not None)


def scale_grid_problem(name: str, w: torch.Tensor, s: torch.Tensor, weight_format: str) -> str:
    """Why `s` is not the scale grid of weight `w` stored in `weight_format` ("" when it is): the grid
    the recipe that keeps that format implies. Anything else would be misread."""
    r = recipes.recipe(recipes.keeping(weight_format))
    rows, cols = r.scale_block
    *lead, n, k = w.shape
    k *= r.values_per_byte  # w's last dimension counts bytes
    unit = f"{rows}x{cols} {'block' if rows > 1 else 'group'}"
    if n % rows or k % cols:
        return f"{name} {tuple(w.shape)} ({weight_format}) is not a whole grid of {unit}s"
    expected = (*lead, n // rows, k // cols)
    if tuple(s.shape) != expected:
        return (f"{name} {tuple(w.shape)} ({weight_format}) has scales of shape {tuple(s.shape)}, expected "
                f"{expected} (one scale per {unit})")
    return ""


def check_scale_grids(weights: KernelWeights, weight_format: str) -> None:
    """Raise ValueError unless both scales are their weight's grid in `weight_format`."""
    for name, w, s in (("gate_up_proj", weights.w1, weights.w1_scale), ("down_proj", weights.w2, weights.w2_scale)):
        why = scale_grid_problem(name, w, s, weight_format)
        if why:
            raise ValueError(why)


# (checkpoint format, the recipe's weight format) -> convert one (weight, scale) pair to the latter.
_CONVERT = {
    ("dense", "fp8"): lambda w, s: quant.quantize_fp8_blocks(w),
    ("fp8", "fp8"): lambda w, s: (w, s.float()),
    # FP4 checkpoint on Hopper: no FP4 tensor cores, expand to FP8 blocks once.
    ("mxfp4", "fp8"): lambda w, s: quant.mxfp4_to_fp8_blocks(w, quant.ue8m0_bytes(s)),
    ("dense", "mxfp4"): lambda w, s: quant.quantize_mxfp4(w),
    ("mxfp4", "mxfp4"): lambda w, s: (w.view(torch.int8), quant.ue8m0_bytes(s)),
    ("fp8", "mxfp4"): lambda w, s: quant.fp8_blocks_to_mxfp4(w, s.float()),
}


def to_recipe(src: KernelWeights, weight_format: str, recipe: str) -> KernelWeights:
    """Convert source weights to the recipe's storage in the plain [gate; up] layout."""
    r = recipes.recipe(recipe)
    if r.weight_dtype is None:  # the weights as the model holds them
        if weight_format != r.weight_format:
            raise ValueError(f"recipe {recipe!r} needs {r.weight_format} expert weights, the checkpoint holds "
                             f"{weight_format}")
        return src
    convert = _CONVERT[weight_format, r.weight_format]
    (w1, s1), (w2, s2) = convert(src.w1, src.w1_scale), convert(src.w2, src.w2_scale)
    return KernelWeights(w1, s1, w2, s2)
