"""What this library relies on from Hugging Face transformers' DeepSeek-V4 code.

Every assumption about transformers' module classes and attributes lives here, so that a new
transformers release is checked against one file (README: tested range). The graph pass relies
on these facts too; it re-checks them against the traced graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

TESTED_TRANSFORMERS = ">=5.23,<5.24"
# Experts implementations whose traced code the pass recognises. "eager" loops in Python over
# the experts that were hit, which breaks dynamo's graph; prepare traces those layers through
# "grouped_mm", which computes the same function (see `traced_implementation`).
TRACEABLE_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def v4_classes():
    """The transformers classes we recognise, or None when this transformers has no DeepSeek-V4."""
    try:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    except ImportError:
        return None
    return m


@dataclass(frozen=True)
class MoESpec:
    """The facts of one `DeepseekV4SparseMoeBlock` that decide how (and whether) it is fused."""

    name: str
    layer_index: int | None
    router: str  # "topk" | "hash"
    scoring_func: str
    top_k: int
    num_experts: int
    hidden: int
    intermediate: int
    routed_scaling_factor: float
    swiglu_limit: float | None
    experts_implementation: str
    weight_format: str  # "dense" | "fp8" | "mxfp4": how the checkpoint stores the experts
    dtype: torch.dtype
    device: torch.device
    expert_parallel: bool

    @property
    def traced_implementation(self) -> str:
        impl = self.experts_implementation
        return "grouped_mm" if impl in (None, "eager") else impl


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    m = v4_classes()
    if m is None:
        return []
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, m.DeepseekV4SparseMoeBlock)]


def layer_index(name: str) -> int | None:
    found = _LAYER_INDEX.search(name + ".")
    return int(found.group(1)) if found else None


def describe(name: str, block: torch.nn.Module) -> tuple[MoESpec | None, str]:
    """Read a MoE block's spec; (None, reason) when it is not the structure we know."""
    m = v4_classes()
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if isinstance(gate, m.DeepseekV4HashRouter):
        router = "hash"
    elif isinstance(gate, m.DeepseekV4TopKRouter):
        router = "topk"
    else:
        return None, f"unknown router {type(gate).__name__}"
    if type(experts) is not m.DeepseekV4Experts:
        return None, f"unknown experts module {type(experts).__name__}"
    scoring_func = _scoring_name(gate.score_fn)
    if scoring_func is None:
        return None, f"unknown router score function {type(gate.score_fn).__name__}"
    if getattr(experts, "has_bias", False):
        return None, "experts have biases (the fused kernel has none)"
    if not getattr(experts, "has_gate", True) or getattr(experts, "is_transposed", False):
        return None, "experts weights are not in [gate; up] x hidden layout"
    if getattr(experts, "has_post_expert_norm", False):
        return None, "experts apply a post-expert norm"
    if type(experts.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        return None, f"experts activation is {type(experts.act_fn).__name__}, not SiLU (SwiGLU)"
    if "_apply_gate" in vars(experts) or type(experts)._apply_gate is not m.DeepseekV4Experts._apply_gate:
        return None, "experts gating function was replaced"
    gate_up, down = experts.gate_up_proj, experts.down_proj
    weight_format = _weight_format(experts)
    if weight_format is None:
        return None, f"expert weights of dtype {gate_up.dtype} are not a format we read"
    num_experts, two_i, hidden = gate_up.shape
    if weight_format == "mxfp4":
        hidden *= 2  # two FP4 values per byte
    intermediate = two_i // 2
    limit = getattr(experts, "limit", None)
    impl = experts_implementation(experts)
    if impl not in (None, "eager", *TRACEABLE_IMPLEMENTATIONS):
        return None, f"experts_implementation {impl!r} is not one the pass recognises {['eager', *TRACEABLE_IMPLEMENTATIONS]}"
    spec = MoESpec(
        name=name,
        layer_index=layer_index(name),
        router=router,
        scoring_func=scoring_func,
        top_k=int(gate.top_k),
        num_experts=int(num_experts),
        hidden=int(hidden),
        intermediate=int(intermediate),
        routed_scaling_factor=float(gate.routed_scaling_factor),
        swiglu_limit=None if limit is None else float(limit),
        experts_implementation=impl,
        weight_format=weight_format,
        dtype=block.shared_experts.down_proj.weight.dtype,
        device=gate_up.device,
        expert_parallel=bool(getattr(experts, "_is_expert_parallel", False)),
    )
    if tuple(down.shape[-2:]) != (spec.hidden, spec.intermediate // (2 if weight_format == "mxfp4" else 1)):
        return None, f"down_proj shape {tuple(down.shape)} does not fit gate_up_proj {tuple(gate_up.shape)}"
    return spec, ""


def experts_implementation(experts: torch.nn.Module) -> str | None:
    """The experts implementation the model was configured with (before prepare's retracing)."""
    original = getattr(experts, "_megamoe_original_config", None)
    config = original if original is not None else getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None)


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


def _weight_format(experts: torch.nn.Module) -> str | None:
    w = experts.gate_up_proj
    if w.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return "dense"
    if w.dtype == torch.float8_e4m3fn:
        return "fp8"
    if w.dtype in (torch.int8, torch.uint8):
        return "mxfp4"
    return None
