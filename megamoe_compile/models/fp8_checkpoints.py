"""Quantized checkpoints: transformers' fine-grained FP8 experts (`FP8Experts`) and the tensors they hold.

What a checkpoint stores is read here; what each stored format means (its scale grid, its dtypes)
is the recipe table's (`ops/recipes.py`): the recipe that keeps a format as it is describes it.
"""

from __future__ import annotations

import torch

from ..ops import layouts, recipes

# transformers' fine-grained FP8 experts (`integrations/finegrained_fp8.py`, `FP8Experts`): the
# module a quantized checkpoint's experts become. The pass knows the traced code of its grouped_mm
# forward (`fp8_grouped_mm_experts_forward`); "eager" is traced through it like the dense class.
FP8_EXPERTS_CLASS = "FP8Experts"
FP8_TRACEABLE_IMPLEMENTATIONS = ("grouped_mm",)
# Attribute names of the dequantization scales of `gate_up_proj` / `down_proj`, first found wins
# (`FP8Experts` holds `*_scale_inv`).
_SCALE_NAMES = ("{}_scale_inv", "{}_scale", "{}_weight_scale_inv")
_WEIGHTS = ("gate_up_proj", "down_proj")


def fp8_block() -> tuple[int, int]:
    """The FP8 weight blocks the kernels take (the "fp8" recipe's scale grid): 128 x 128."""
    return recipes.recipe(recipes.keeping("fp8")).scale_block


def fp8_integration():
    """transformers' fine-grained FP8 integration module (holds `FP8Experts`), or None."""
    try:
        from transformers.integrations import finegrained_fp8 as f
    except ImportError:
        return None
    return f if isinstance(getattr(f, FP8_EXPERTS_CLASS, None), type) else None


def is_fp8_experts(experts: torch.nn.Module) -> bool:
    """Whether `experts` is transformers' `FP8Experts` (quantized checkpoint), exactly that class.

    `use_experts_implementation` wraps FP8Experts in place (no subclass), so `type(...) is` holds
    for what `replace_with_fp8_linear` builds; a user subclass is not recognised.
    """
    f = fp8_integration()
    return f is not None and type(experts) is getattr(f, FP8_EXPERTS_CLASS)


def weight_format(experts: torch.nn.Module) -> str | None:
    """"dense", "fp8" or "mxfp4" (int8-packed E2M1): how the experts' weights are stored; None for
    anything else."""
    dtype = experts.gate_up_proj.dtype
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return "dense"
    if dtype == torch.float8_e4m3fn:
        return "fp8"
    if dtype in (torch.int8, torch.uint8):
        return "mxfp4"
    return None


def scale_names(experts: torch.nn.Module) -> tuple[str, ...]:
    """The attribute names of the experts' dequantization scales that exist (none for dense experts)."""
    return tuple(name for w in _WEIGHTS if (name := _scale_name(experts, w)) is not None)


def _scale_name(experts: torch.nn.Module, weight: str) -> str | None:
    return next((p.format(weight) for p in _SCALE_NAMES if isinstance(getattr(experts, p.format(weight), None),
                                                                     torch.Tensor)), None)


def checkpoint_scales(experts: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The dequantization scales of `gate_up_proj` and `down_proj` (None where there is none)."""
    names = [_scale_name(experts, w) for w in _WEIGHTS]
    return tuple(None if n is None else getattr(experts, n) for n in names)


def checkpoint_weights(experts: torch.nn.Module, fmt: str) -> layouts.KernelWeights:
    """The experts' weights as stored: dense, FP8 blocks with scales, or packed MXFP4 with scales.

    transformers' `FP8Experts` (a quantized checkpoint loaded without dequantizing) holds
    `gate_up_proj`/`down_proj` as float8_e4m3fn with `*_scale_inv [E, N/128, K/128]` (float32 or
    float8_e8m0fnu), or as int8-packed E2M1 `[E, N, K/2]` with `*_scale_inv [E, N, K/32]`
    float8_e8m0fnu. These are returned as they are (the same tensors, no copy), their scale grids
    checked against the format.
    """
    w1, w2 = experts.gate_up_proj, experts.down_proj
    if fmt == "dense":
        return layouts.KernelWeights(w1, None, w2, None)
    s1, s2 = checkpoint_scales(experts)
    for name, s in zip(_WEIGHTS, (s1, s2)):
        if s is None:
            raise ValueError(f"{type(experts).__name__}.{name} is quantized but no scale tensor was found "
                             f"(looked for {[p.format(name) for p in _SCALE_NAMES]})")
    weights = layouts.KernelWeights(w1, s1, w2, s2)
    layouts.check_scale_grids(weights, fmt)
    return weights


def fp8_experts_problem(experts: torch.nn.Module) -> str:
    """Why an `FP8Experts` module is not what the fused op computes ("" when it is).

    Facts (transformers 5.23, `integrations/finegrained_fp8.py`): `gate_up_proj [E, 2I, H]` and
    `down_proj [E, H, I]` are float8_e4m3fn with `*_scale_inv [E, N/128, K/128]` (float32, or
    float8_e8m0fnu for scale_fmt="ue8m0"), or, for `expert_dtype="fp4"`, int8 with two E2M1 codes
    per byte (`[E, N, K/2]`, low nibble first) and `*_scale_inv [E, N, K/32]` UE8M0. Activations are
    quantized dynamically inside transformers' kernels ("dynamic"); "static" uses per-expert
    activation scales the fused kernels do not take.
    """
    f = fp8_integration()
    if getattr(experts, "activation_scheme", None) != "dynamic":
        return (f"FP8 experts use activation_scheme={getattr(experts, 'activation_scheme', None)!r}; the fused "
                "kernels quantize activations dynamically")
    if getattr(experts, "limit_after_act", False) and getattr(experts, "limit", None) is not None:
        return (f"FP8 experts clamp after the activation (limit_after_act=True: silu(gate).clamp(max="
                f"{experts.limit})); the fused kernel clamps gate before silu")
    for attr in ("gate_softcap", "up_softcap"):  # swiglu_alpha: refused for every family (experts_problem)
        if getattr(experts, attr, None) is not None:
            return (f"FP8 experts apply {attr}={getattr(experts, attr)!r}; the fused kernel computes a clamped "
                    "SwiGLU only")
    gate_fn = type(experts)._apply_gate
    if "_apply_gate" in vars(experts) or getattr(gate_fn, "__qualname__", "") != f"{FP8_EXPERTS_CLASS}._apply_gate" \
            or getattr(gate_fn, "__module__", None) != f.__name__:
        return "experts gating function was replaced"
    w1, w2 = experts.gate_up_proj, experts.down_proj
    s1, s2 = checkpoint_scales(experts)
    if not isinstance(s1, torch.Tensor) or not isinstance(s2, torch.Tensor):
        return f"FP8 experts without scales for gate_up_proj/down_proj (looked for {list(_SCALE_NAMES)})"
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0]:
        return f"FP8 expert weights of shapes {tuple(w1.shape)}, {tuple(w2.shape)} are not [E, N, K]"
    if w1.dtype == torch.float8_e4m3fn and w2.dtype == torch.float8_e4m3fn:
        block = tuple(experts.block_size) if experts.block_size is not None else None
        if block != fp8_block():
            return f"FP8 experts with weight_block_size {block}; the kernels take {list(fp8_block())} blocks"
        for name, w, s in (("gate_up_proj", w1, s1), ("down_proj", w2, s2)):
            why = layouts.scale_grid_problem(name, w, s, "fp8")
            if why:
                return f"FP8 {why}"
            if s.dtype not in (torch.float32, torch.float8_e8m0fnu):  # scale_fmt "float" or "ue8m0"
                return f"FP8 {name}_scale_inv of dtype {s.dtype} (expected float32 or float8_e8m0fnu)"
        return ""
    if w1.dtype == torch.int8 and w2.dtype == torch.int8:
        for name, w, s in (("gate_up_proj", w1, s1), ("down_proj", w2, s2)):
            why = layouts.scale_grid_problem(name, w, s, "mxfp4")
            if why:
                return f"FP4 {why}"
            if s.dtype != torch.float8_e8m0fnu:
                # scale_fmt="float" stores FP4 scales as float32; transformers' own FP4 kernels
                # take UE8M0 only, and a float32 scale need not be a power of two.
                return f"FP4 {name}_scale_inv of dtype {s.dtype}; MXFP4 needs UE8M0 (scale_fmt='ue8m0') scales"
        return ""
    return (f"FP8 expert weights of dtypes {w1.dtype}/{w2.dtype} are not a format we read (float8_e4m3fn or "
            "int8-packed FP4)")
