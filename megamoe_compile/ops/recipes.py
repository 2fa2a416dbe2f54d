"""What each recipe stores: the one table the op's argument checks read.

A recipe names how the expert weights are stored (and so how activations are quantized before
each GEMM). Kernel-ready weights are kept as integer "bit" tensors of the same element size
(uint8 for FP8 codes, int32 for float32 scales): `Module.to(dtype)`, `.float()` and `.half()`
convert only floating-point tensors, so a model cast after `prepare` keeps its kernel-ready
weights bit for bit. `as_storage` views such bits back as the recipe's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Recipe:
    name: str
    weight_dtype: torch.dtype | None  # None: the activations' floating dtype (weights as the model holds them)
    values_per_byte: int  # along K: 2 for packed FP4
    scale_dtype: torch.dtype | None  # None: no scales
    # Scale grid of the plain layout (the reference kernel's): one scale per block (rows, cols).
    scale_block: tuple[int, int] | None


RECIPES: dict[str, Recipe] = {
    "none": Recipe("none", None, 1, None, None),
    "fp8": Recipe("fp8", torch.float8_e4m3fn, 1, torch.float32, (128, 128)),
    "fp8_fp4": Recipe("fp8_fp4", torch.int8, 2, torch.uint8, (1, 32)),
    "fp4_fp4": Recipe("fp4_fp4", torch.int8, 2, torch.uint8, (1, 32)),
}

# Same-size integer dtypes that hold another dtype's bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"megamoe: unknown recipe {name!r}; recipes are {list(RECIPES)}") from None


def to_bits(t: torch.Tensor) -> torch.Tensor:
    """`t` viewed as a same-size integer dtype (no copy); integer tensors are returned as they are."""
    if not (t.is_floating_point() or t.is_complex()):
        return t
    return t.view(_BITS[t.element_size()])


def as_storage(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """`t` viewed as `dtype` when it holds that dtype's bits (same element size); else `t` itself."""
    if t is None or dtype is None or t.dtype == dtype:
        return t
    if not (t.is_floating_point() or t.is_complex()) and t.element_size() == dtype.itemsize:
        return t.view(dtype)
    return t
