"""Kernel-ready expert weights: read what the checkpoint holds, convert to the recipe's storage,
lay it out for the kernel. Runs once per layer, at load time (`prepare`), never per call.
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


# Attribute names transformers' fine-grained FP8 experts use for the dequantization scales.
_SCALE_NAMES = ("{}_scale_inv", "{}_scale", "{}_weight_scale_inv")


def source_weights(experts: torch.nn.Module, weight_format: str) -> KernelWeights:
    """The experts' weights as stored: dense, FP8 blocks with scales, or packed MXFP4 with scales.

    transformers' `FP8Experts` (a quantized checkpoint loaded without dequantizing) holds
    `gate_up_proj`/`down_proj` as float8_e4m3fn with `*_scale_inv [E, N/128, K/128]` (float32 or
    float8_e8m0fnu), or as int8-packed E2M1 `[E, N, K/2]` with `*_scale_inv [E, N, K/32]`
    float8_e8m0fnu. These are returned as they are (the same tensors, no copy).
    """
    w1, w2 = experts.gate_up_proj, experts.down_proj
    if weight_format == "dense":
        return KernelWeights(w1, None, w2, None)
    s1, s2 = (_find_scale(experts, n) for n in ("gate_up_proj", "down_proj"))
    for name, w, s in (("gate_up_proj", w1, s1), ("down_proj", w2, s2)):
        _check_scale_grid(name, w, s, weight_format)
    return KernelWeights(w1, s1, w2, s2)


def _check_scale_grid(name: str, w: torch.Tensor, s: torch.Tensor, weight_format: str) -> None:
    """A scale tensor must be the grid its format implies; anything else would be misread."""
    r = recipes.recipe(recipes.keeping(weight_format))  # the recipe that stores this format as it is
    rows, cols = r.scale_block
    *lead, n, k = w.shape
    k *= r.values_per_byte  # w's last dimension counts bytes
    expected = (*lead, n // rows, k // cols) if n % rows == 0 and k % cols == 0 else None
    if expected is None or tuple(s.shape) != expected:
        raise ValueError(f"{name} {tuple(w.shape)} ({weight_format}) has scales of shape {tuple(s.shape)}, "
                         f"expected {expected} ({rows}x{cols} {'blocks' if rows > 1 else 'groups'})")


def scale_names(experts: torch.nn.Module) -> tuple[str, ...]:
    """The attribute names of the experts' dequantization scales that exist (none for dense experts)."""
    found = []
    for name in ("gate_up_proj", "down_proj"):
        attr = next((p.format(name) for p in _SCALE_NAMES if isinstance(getattr(experts, p.format(name), None),
                                                                          torch.Tensor)), None)
        if attr is not None:
            found.append(attr)
    return tuple(found)


def _find_scale(experts: torch.nn.Module, name: str) -> torch.Tensor:
    for pattern in _SCALE_NAMES:
        scale = getattr(experts, pattern.format(name), None)
        if isinstance(scale, torch.Tensor):
            return scale
    raise ValueError(f"{type(experts).__name__}.{name} is quantized but no scale tensor was found "
                     f"(looked for {[p.format(name) for p in _SCALE_NAMES]})")


# (checkpoint format, the recipe's weight format) -> convert one (weight, scale) pair to the latter.
_CONVERT = {
    ("dense", "fp8"): lambda w, s: quant.quantize_fp8_blocks(w),
    ("fp8", "fp8"): lambda w, s: (w, s.float()),
    # FP4 checkpoint on Hopper: no FP4 tensor cores, expand to FP8 blocks once.
    ("mxfp4", "fp8"): lambda w, s: quant.mxfp4_to_fp8_blocks(w, _as_e8m0(s)),
    ("dense", "mxfp4"): lambda w, s: quant.quantize_mxfp4(w),
    ("mxfp4", "mxfp4"): lambda w, s: (w.view(torch.int8), _as_e8m0(s)),
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


def _as_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 exponents as uint8, from either raw exponent bytes or float powers of two."""
    found = quant.e8m0_bytes(scale)
    if found is not None:
        return found
    exponent = torch.log2(scale.float()).round()
    e = (exponent + 127).clamp(0, 254).to(torch.uint8)
    # Float scales are accepted only when they are exactly powers of two: rounding any other
    # value to one would silently change the weights.
    if not torch.equal(quant.e8m0_to_float(e), scale.float()):
        raise ValueError("MXFP4 scales given as floats must be exact powers of two in the UE8M0 range")
    return e
