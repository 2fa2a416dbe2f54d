"""`MoESpec`: the facts of one MoE block that decide how (and whether) it is fused, and the one
builder of it (`build_spec`), which both family readers (`deepseek_v4`, `experts_interface`) call
with what they read of their router."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from . import expert_parallel as ep
from . import fp8_checkpoints as fp8

# Experts implementations whose traced code the pass recognises. "eager" loops in Python over
# the experts that were hit, which breaks dynamo's graph; prepare traces those layers through
# "grouped_mm", which computes the same function (see `MoESpec.traced_base`).
TRACEABLE_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class MoESpec:
    """The facts of one MoE block that decide how (and whether) it is fused."""

    name: str
    layer_index: int | None
    # DeepSeek-V4 blocks: "topk" | "hash", a router the pass checks op by op. Other families:
    # "graph", a router that stays ordinary graph code; the op takes whatever ids/weights it made.
    router: str
    scoring_func: str | None  # DeepSeek-V4 only
    top_k: int
    num_experts: int
    hidden: int
    intermediate: int
    routed_scaling_factor: float | None  # DeepSeek-V4 only (other routers apply theirs in the graph)
    swiglu_limit: float | None
    experts_implementation: str
    weight_format: str  # "dense" | "fp8" | "mxfp4": how the checkpoint stores the experts
    dtype: torch.dtype
    device: torch.device
    expert_parallel: bool
    # "DeepseekV4Experts" (the model's own experts) or "FP8Experts" (transformers' fine-grained FP8
    # experts of a quantized checkpoint: FP8 blocks or packed MXFP4, with `*_scale_inv` tensors).
    experts_class: str = "DeepseekV4Experts"
    # expert_parallel only (transformers sharded the experts, see `transformers_ep_shard`): the
    # global expert ids [first, last) this rank holds and the global ranks of transformers' EP mesh,
    # in mesh order. `num_experts` is then this rank's count, `last - first`.
    ep_experts: tuple[int, int] | None = None
    ep_ranks: tuple[int, ...] = ()
    family: str = "deepseek_v4"  # transformers' model type, e.g. "qwen3_moe"
    # Config facts of a graph router the report shows beside what the traced graph says it computes
    # (e.g. "grouped": group-limited top-k, n_group > 1).
    router_config: str = ""

    @property
    def activation(self) -> str:
        """"clamped_swiglu" (silu(gate.clamp(max=l)) * up.clamp(-l, l)) or "swiglu" (silu(gate) * up)."""
        return "swiglu" if self.swiglu_limit is None else "clamped_swiglu"

    @property
    def traced_base(self) -> str:
        """The experts implementation dynamo traces ("eager" loops in Python: traced through grouped_mm)."""
        impl = self.experts_implementation
        return "grouped_mm" if impl in (None, "eager") else impl

    @property
    def traced_implementation(self) -> str:
        # FP8Experts' forwards call transformers' finegrained-fp8 kernels: other traced code.
        return "fp8_" + self.traced_base if self.experts_class == fp8.FP8_EXPERTS_CLASS else self.traced_base


def layer_index(name: str) -> int | None:
    found = _LAYER_INDEX.search(name + ".")
    return int(found.group(1)) if found else None


def experts_implementation(experts: torch.nn.Module, config=None) -> str | None:
    """The experts implementation `config` (default: the module's own config) names."""
    config = config if config is not None else getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None)


def build_spec(name: str, experts: torch.nn.Module, gate, *, router: str, top_k: int, dtype: torch.dtype,
               family: str, scoring_func: str | None = None, routed_scaling_factor: float | None = None,
               swiglu_limit: float | None = None, router_config: str = "") -> tuple[MoESpec | None, str]:
    """The spec of a block whose router and activation the caller read; (None, reason) when the
    experts' weights, their format or implementation are not what the fused op takes. The sizes
    are those of the expert weights this rank holds."""
    quantized = fp8.is_fp8_experts(experts)
    ep_shard = None
    if ep.is_sharded(experts):
        ep_shard, why = ep.transformers_ep_shard(experts, gate)
        if ep_shard is None:
            return None, why
    gate_up, down = ep.local_tensor(experts.gate_up_proj), ep.local_tensor(experts.down_proj)
    weight_format = fp8.weight_format(experts)
    if weight_format is None:
        return None, f"expert weights of dtype {gate_up.dtype} are not a format we read"
    impl = experts_implementation(experts)
    why = _implementation_problem(impl, quantized)
    if why:
        return None, why
    num_experts, two_i, hidden = gate_up.shape
    packed = 2 if weight_format == "mxfp4" else 1  # two FP4 values per byte along K
    spec = MoESpec(
        name=name, layer_index=layer_index(name), router=router, scoring_func=scoring_func, top_k=int(top_k),
        num_experts=int(num_experts), hidden=int(hidden) * packed, intermediate=int(two_i) // 2,
        routed_scaling_factor=routed_scaling_factor, swiglu_limit=None if swiglu_limit is None else float(swiglu_limit),
        experts_implementation=impl, weight_format=weight_format, dtype=dtype, device=gate_up.device,
        expert_parallel=ep_shard is not None,
        experts_class=fp8.FP8_EXPERTS_CLASS if quantized else type(experts).__name__,
        ep_experts=None if ep_shard is None else ep_shard[0], ep_ranks=() if ep_shard is None else ep_shard[1],
        family=family, router_config=router_config,
    )
    if tuple(down.shape[-2:]) != (spec.hidden, spec.intermediate // packed):
        return None, f"down_proj shape {tuple(down.shape)} does not fit gate_up_proj {tuple(gate_up.shape)}"
    return spec, ""


def refresh(spec: MoESpec, block: torch.nn.Module) -> MoESpec:
    """`spec` with the router and activation constants read again from the block: values the
    kernel-ready weights do not depend on (the op takes them from the traced graph), which a
    user may change after prepare without a re-plan."""
    changes = {}
    gate, limit = getattr(block, "gate", None), getattr(block.experts, "limit", None)
    if spec.routed_scaling_factor is not None and getattr(gate, "routed_scaling_factor", None) is not None:
        changes["routed_scaling_factor"] = float(gate.routed_scaling_factor)
    if spec.swiglu_limit is not None and limit is not None:
        changes["swiglu_limit"] = float(limit)
    return dataclasses.replace(spec, **changes) if changes else spec


def _implementation_problem(impl: str | None, quantized: bool) -> str:
    if quantized and impl not in (None, "eager", *fp8.FP8_TRACEABLE_IMPLEMENTATIONS):
        return (f"experts_implementation {impl!r} of {fp8.FP8_EXPERTS_CLASS} is not one the pass recognises "
                f"{['eager', *fp8.FP8_TRACEABLE_IMPLEMENTATIONS]}")
    if impl not in (None, "eager", *TRACEABLE_IMPLEMENTATIONS):
        return f"experts_implementation {impl!r} is not one the pass recognises {['eager', *TRACEABLE_IMPLEMENTATIONS]}"
    return ""
