"""MoE blocks whose experts run through transformers' experts interface (`@use_experts_implementation`):
Qwen-MoE, DeepSeek-V2/V3, GLM-4.5, MiniMax-M2, Mixtral, OLMoE and the other families that share it.

Only the experts are fused: dispatch -> FFN1 -> SwiGLU -> FFN2 -> weighted top-k sum, on the ids and
weights the block's router made. The router (softmax, sigmoid + correction bias, group-limited
top-k, norm_topk_prob, routed scaling), shared experts and their gates stay graph code.
"""

from __future__ import annotations

import re

import torch

from . import fp8_checkpoints as fp8
from .spec import MoESpec, build_spec

# Where `use_experts_implementation` defines the forward it wraps experts classes with.
_EXPERTS_INTERFACE_FILE = "transformers/integrations/moe.py"
# Families whose experts hold stacked weights but compute something else than the fused op.
_UNFIT_FAMILIES = {
    "llama4": "Llama-4 multiplies the experts' input by the routing weights (the fused op weights their output)",
}
_MOE_CLASS_NAME = re.compile(r"(Moe|MoE|MoA|Experts)(Block|Layer)?$|SparseMoe")  # not ...MoeMLP (dense)


def is_experts_interface(experts) -> bool:
    """Whether `experts` runs through transformers' experts interface (`@use_experts_implementation`:
    stacked 3-D expert weights, forward picked by `config._experts_implementation`), or is
    transformers' fine-grained FP8 experts, which does too."""
    cls = experts if isinstance(experts, type) else type(experts)
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    # The decorator's dispatching forward (functools.wraps copies the name, not the code).
    return (code is not None and code.co_filename.replace("\\", "/").endswith(_EXPERTS_INTERFACE_FILE)) or \
        cls.__name__ == fp8.FP8_EXPERTS_CLASS


def holds_stacked_experts(module: torch.nn.Module) -> bool:
    """A module whose `experts` child stacks its experts' weights (3-D `gate_up_proj` or `up_proj`)."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, torch.nn.Module):
        return False
    if is_experts_interface(experts):
        return True
    weight = getattr(experts, "gate_up_proj", None)
    if weight is None:
        weight = getattr(experts, "up_proj", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 3


def family(block: torch.nn.Module) -> str:
    """transformers' model type of a block's model ("qwen3_moe"), from the module that defines it."""
    parts = type(block).__module__.split(".")
    return parts[parts.index("models") + 1] if "models" in parts[:-1] else type(block).__name__


def describe(name: str, block: torch.nn.Module) -> tuple[MoESpec | None, str]:
    """The spec of a MoE block whose experts run through transformers' experts interface, or
    (None, reason)."""
    experts, kind = block.experts, family(block)
    if kind in _UNFIT_FAMILIES:
        return None, _UNFIT_FAMILIES[kind]
    if getattr(experts, "zero_expert_num", 0):
        return None, f"{experts.zero_expert_num} zero-compute (identity) experts; the fused op runs SwiGLU experts only"
    if not is_experts_interface(experts):
        return None, (f"experts module {type(experts).__name__} has a forward of its own, not transformers' experts "
                      "interface (@use_experts_implementation)")
    why = experts_problem(experts, expected_gate=default_apply_gate())
    if why:
        return None, why
    gate = getattr(block, "gate", None)
    config = getattr(experts, "config", None)
    top_k = next((int(v) for v in (getattr(gate, "top_k", None), getattr(block, "top_k", None),
                                   getattr(config, "num_experts_per_tok", None)) if v is not None), None)
    if top_k is None:
        return None, "the number of experts per token (top_k) is not found on the router or the config"
    limit = getattr(experts, "limit", None) if fp8.is_fp8_experts(experts) else clamped_swiglu_limit(experts)
    return build_spec(name, experts, gate, router="graph", top_k=top_k, dtype=_activation_dtype(block), family=kind,
                      swiglu_limit=limit, router_config=_router_config(gate, config))


def _router_config(gate, config) -> str:
    """What the config says of a graph router that its traced ops do not show plainly:
    group-limited top-k (`n_group` > 1, unless `topk_method` is "greedy", which ignores groups)."""
    groups = next((g for g in (getattr(gate, "n_group", None), getattr(gate, "num_group", None),
                               getattr(config, "n_group", None), getattr(config, "num_expert_group", None))
                   if g is not None), 1)
    method = next((m for m in (getattr(gate, "topk_method", None), getattr(config, "topk_method", None))
                   if m is not None), None)
    return "grouped" if int(groups) > 1 and method != "greedy" else ""


def unrecognised_moe_modules(model: torch.nn.Module, recognised: list[str]) -> list[tuple[str, str]]:
    """(name, reason) of each outermost module that looks like a MoE layer by its class name
    (`...MoE`, `...SparseMoeBlock`, `...Experts`) but is not one of the `recognised` blocks (nor
    inside one): families with expert code of their own (DBRX, JetMoE, Doge, ...). The report lists
    them, unfused, with the reason."""
    found: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not name or not _MOE_CLASS_NAME.search(cls):
            continue
        if any(name == r or name.startswith(r + ".") or r.startswith(name + ".") for r in recognised) or \
                any(name.startswith(f + ".") for f, _ in found):
            continue
        experts = getattr(module, "experts", module)
        stacked = sorted(f"{n} {tuple(p.shape)}" for n, p in experts.named_parameters() if p.dim() == 3)
        lists = sorted(n for n, m in experts.named_children() if isinstance(m, torch.nn.ModuleList))
        held = (f"3-D weights {', '.join(stacked[:3])}" if stacked else
                f"experts as module lists ({', '.join(lists)})" if lists else "no stacked expert weights")
        found.append((name, f"{cls} is not a MoE layer this version recognises (it holds {held}); the pass fuses "
                            "experts run by transformers' experts interface: stacked gate_up_proj [experts, 2 x "
                            "intermediate, hidden] and down_proj, SiLU SwiGLU"))
    return found


def default_apply_gate():
    from transformers.integrations import moe

    return getattr(moe, "_default_apply_gate", None)


def experts_problem(experts: torch.nn.Module, expected_gate) -> str:
    """Why an experts-interface module is not what the fused op computes ("" when it is): biases,
    another weight layout, a post-expert norm, another activation or gating function."""
    stacked = getattr(experts, "gate_up_proj", None)
    if not isinstance(stacked, torch.Tensor) or stacked.dim() != 3:
        held = sorted(n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3)
        return (f"experts {type(experts).__name__} hold no stacked gate_up_proj [experts, 2 x intermediate, hidden] "
                f"(3-D weights: {held or 'none'}); the fused op reads that layout")
    if getattr(experts, "has_bias", False):
        return "experts have biases (the fused kernel has none)"
    if not getattr(experts, "has_gate", True) or getattr(experts, "is_transposed", False) \
            or not getattr(experts, "is_concatenated", True):
        return "experts weights are not in [gate; up] x hidden layout"
    if getattr(experts, "has_post_expert_norm", False):
        return "experts apply a post-expert norm"
    if getattr(experts, "swiglu_alpha", None) is not None:
        return ("experts gate as (up + 1) * gate * sigmoid(swiglu_alpha * gate) (GPT-OSS style), not SiLU SwiGLU "
                "silu(gate) * up")
    if fp8.is_fp8_experts(experts):
        return _activation_problem(experts) or fp8.fp8_experts_problem(experts)
    if "_apply_gate" not in vars(experts) and clamped_swiglu_limit(experts) is not None:
        return ""  # the class's own clamped SwiGLU (HY-V4, GLM-5-Next): the pass checks its traced ops
    if "_apply_gate" in vars(experts) or getattr(type(experts), "_apply_gate", None) is not expected_gate:
        limit = getattr(experts, "swiglu_limit", None)
        whose = "the instance's" if "_apply_gate" in vars(experts) else f"{type(experts).__name__}'s own"
        return (f"experts gating function is {whose} _apply_gate"
                + (f" (SwiGLU clamped at swiglu_limit={limit})" if limit is not None else "")
                + ", not transformers' default silu(gate) * up that the pass recognises")
    return _activation_problem(experts)


def clamped_swiglu_limit(experts: torch.nn.Module) -> float | None:
    """The clamp of an experts class whose own `_apply_gate` is a clamped SwiGLU (a `swiglu_limit`
    and no other gating attribute): silu(gate.clamp(max=l)) * up.clamp(-l, l), what DeepSeek-V4's
    experts compute. Only a candidate: the pass matches the traced ops against that pattern and
    leaves the layer unfused if they differ."""
    limit = getattr(experts, "swiglu_limit", None)
    own = getattr(type(experts), "_apply_gate", None)
    if not isinstance(limit, (int, float)) or isinstance(limit, bool) or own is None or \
            own is default_apply_gate() or getattr(experts, "swiglu_alpha", None) is not None or \
            getattr(experts, "limit_after_act", False):
        return None
    return float(limit)


def _activation_problem(experts: torch.nn.Module) -> str:
    act = getattr(experts, "act_fn", None)
    if act is None:
        return f"experts {type(experts).__name__} have no act_fn (an activation of their own), not SiLU (SwiGLU)"
    if not is_silu(act):
        return f"experts activation is {getattr(act, '__name__', type(act).__name__)}, not SiLU (SwiGLU)"
    return ""


def is_silu(act) -> bool:
    """Whether an experts `act_fn` is SiLU: transformers' activation modules, or the function itself
    (LFM2-MoE holds `F.silu`)."""
    return type(act).__name__ in ("SiLU", "SiLUActivation") or act in (torch.nn.functional.silu, torch.ops.aten.silu)


def _activation_dtype(block: torch.nn.Module) -> torch.dtype:
    """The dtype the block's activations run in: the experts' own (dense weights), else that of the
    first 16/32-bit floating parameter of the block (a quantized checkpoint's router or shared expert)."""
    for t in (block.experts.gate_up_proj, *block.parameters()):
        if t.dtype.is_floating_point and torch.finfo(t.dtype).bits >= 16:
            return t.dtype
    return torch.get_default_dtype()
