"""DeepSeek-V4's MoE block (`DeepseekV4SparseMoeBlock`): its routers (top-k and hash), the pass
checks op by op and fuses with the experts; its experts compute a clamped SwiGLU."""

from __future__ import annotations

import functools

import torch

from . import fp8_checkpoints as fp8
from .experts_interface import experts_problem
from .spec import MoESpec, build_spec


@functools.cache
def v4_classes():
    """transformers' DeepSeek-V4 modeling module, or None when this transformers has none (looked up
    once: `find_moe_blocks` and the pass ask for every module and graph node)."""
    try:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    except ImportError:
        return None
    return m


def is_v4_block(module: torch.nn.Module) -> bool:
    m = v4_classes()
    return m is not None and isinstance(module, m.DeepseekV4SparseMoeBlock)


def block_part_suffix(cls: type) -> str | None:
    """"" for V4's MoE block class, ".gate" for its routers, None for any other class."""
    m = v4_classes()
    if m is None:
        return None
    if cls is m.DeepseekV4SparseMoeBlock:
        return ""
    if cls in (m.DeepseekV4HashRouter, m.DeepseekV4TopKRouter):
        return ".gate"
    return None


def describe(name: str, block: torch.nn.Module) -> tuple[MoESpec | None, str]:
    """Read a V4 MoE block's spec; (None, reason) when it is not the structure we know."""
    m = v4_classes()
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if isinstance(gate, m.DeepseekV4HashRouter):
        router = "hash"
    elif isinstance(gate, m.DeepseekV4TopKRouter):
        router = "topk"
    else:
        return None, f"unknown router {type(gate).__name__}"
    if type(experts) is not m.DeepseekV4Experts and not fp8.is_fp8_experts(experts):
        return None, f"unknown experts module {type(experts).__name__}"
    scoring_func = _scoring_name(gate.score_fn)
    if scoring_func is None:
        return None, f"unknown router score function {type(gate.score_fn).__name__}"
    why = experts_problem(experts, expected_gate=m.DeepseekV4Experts._apply_gate)
    if why:
        return None, why
    return build_spec(name, experts, gate, router=router, top_k=int(gate.top_k), dtype=_activation_dtype(block),
                      family="deepseek_v4", scoring_func=scoring_func,
                      routed_scaling_factor=float(gate.routed_scaling_factor),
                      swiglu_limit=getattr(experts, "limit", None))


def _activation_dtype(block: torch.nn.Module) -> torch.dtype:
    """The dtype the block's activations run in: a quantized checkpoint's shared expert holds FP8
    weights, so read it from the router (transformers never quantizes it) in that case."""
    dtype = block.shared_experts.down_proj.weight.dtype
    if dtype.is_floating_point and torch.finfo(dtype).bits >= 16:
        return dtype
    return block.gate.weight.dtype


def _scoring_name(score_fn: torch.nn.Module) -> str | None:
    name = type(score_fn).__name__
    if name == "SqrtSoftplusActivation":
        return "sqrtsoftplus"
    if isinstance(score_fn, torch.nn.Sigmoid):
        return "sigmoid"
    if isinstance(score_fn, torch.nn.Softmax) and score_fn.dim in (-1, 1):
        # transformers 5.23 cannot build scoring_func="softmax" (no ACT2FN entry); a user who
        # sets gate.score_fn = nn.Softmax(dim=-1) gets it.
        return "softmax"
    return None
