"""The recipe table: the one home of every fact about each recipe.

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
    """Every fact about one recipe: its weight storage, the activations its GEMMs read, and what it
    asks of a layer. Readers (prepare, the op's checks, the reference kernel, the layouts, the
    DeepGEMM adapter) take these facts from here."""

    name: str
    # The checkpoint weight format the recipe keeps as it is ("dense", "fp8" or "mxfp4"); others
    # are converted to it.
    weight_format: str
    weight_dtype: torch.dtype | None  # None: the activations' floating dtype (weights as the model holds them)
    values_per_byte: int  # along K: 2 for packed FP4
    # float32, or uint8 UE8M0 exponent bytes (powers of two); None: no scales.
    scale_dtype: torch.dtype | None
    # Scale grid of the plain layout (the reference kernel's): one scale per block (rows, cols).
    scale_block: tuple[int, int] | None
    dim_multiple: int  # hidden and intermediate sizes must be multiples of this
    # Activations as each GEMM reads them: None (unquantized, x's dtype), "fp8" or "mxfp4",
    # quantized per 1 x act_group along K with float32 or power-of-two (UE8M0) scales.
    activation: str | None
    act_group: int | None
    act_pow2: bool
    mma_type: str | None  # DeepGEMM SM100's MMA type for this recipe
    opt_in: bool = False  # never a default: chosen only when asked for by name

    @property
    def ue8m0_scales(self) -> bool:
        return self.scale_dtype == torch.uint8

    def problem(self, weight_format: str, hidden: int, intermediate: int) -> str:
        """Why a layer with this checkpoint format and these sizes cannot use the recipe ("" when it can)."""
        if self.weight_dtype is None and weight_format != self.weight_format:
            return (f"recipe {self.name!r} needs {self.weight_format} expert weights; this checkpoint holds "
                    f"{weight_format}")
        for dim, size in (("hidden", hidden), ("moe_intermediate", intermediate)):
            if size % self.dim_multiple:
                return f"recipe {self.name!r} needs {dim} size a multiple of {self.dim_multiple}, got {size}"
        return ""


_MXFP4_WEIGHTS = dict(weight_format="mxfp4", weight_dtype=torch.int8, values_per_byte=2, scale_dtype=torch.uint8,
                      scale_block=(1, 32), dim_multiple=32)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # The expert weights as the model holds them (reference kernel only, exact).
    Recipe("none", weight_format="dense", weight_dtype=None, values_per_byte=1, scale_dtype=None, scale_block=None,
           dim_multiple=1, activation=None, act_group=None, act_pow2=False, mma_type=None),
    # FP8 e4m3 weights, one float32 scale per 128x128 block; FP8 activations per 1x128, float32
    # scales (DeepGEMM fp8_mega_moe, Hopper).
    Recipe("fp8", weight_format="fp8", weight_dtype=torch.float8_e4m3fn, values_per_byte=1, scale_dtype=torch.float32,
           scale_block=(128, 128), dim_multiple=128, activation="fp8", act_group=128, act_pow2=False, mma_type=None),
    # MXFP4 weights (e2m1, UE8M0 scale per 1x32); FP8 activations per 1x32, power-of-two scales
    # (DeepGEMM fp8_fp4_mega_moe, Blackwell).
    Recipe("fp8_fp4", **_MXFP4_WEIGHTS, activation="fp8", act_group=32, act_pow2=True, mma_type="fp8xfp4"),
    # Opt-in w4a4: the same MXFP4 weights, MXFP4 activations per 1x32 (fp8_fp4_mega_moe with
    # mma_type "mxf4xmxf4", Blackwell; never a default).
    Recipe("fp4_fp4", **_MXFP4_WEIGHTS, activation="mxfp4", act_group=32, act_pow2=True, mma_type="mxf4xmxf4",
           opt_in=True),
)}

# Same-size integer dtypes that hold another dtype's bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"megamoe: unknown recipe {name!r}; recipes are {list(RECIPES)}") from None


def keeping(weight_format: str) -> str:
    """The recipe that keeps a checkpoint's weight format as it is (not an opt-in one)."""
    return next(r.name for r in RECIPES.values() if r.weight_format == weight_format and not r.opt_in)


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
