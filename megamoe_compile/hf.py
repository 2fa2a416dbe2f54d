"""What this library relies on from Hugging Face transformers' DeepSeek-V4 code.

Every assumption about transformers' module classes and attributes lives here, so that a new
transformers release is checked against one file (README: tested range). The graph pass relies
on these facts too; it re-checks them against the traced graph.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch

# The transformers releases whose MoE code the tests verify: (first, last) minor versions, inclusive.
TESTED_TRANSFORMERS = ((5, 23), (5, 25))


def transformers_version() -> tuple[int, int] | None:
    try:
        import transformers
    except ImportError:
        return None
    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return (int(found.group(1)), int(found.group(2))) if found else None


def tested_range_text() -> str:
    (a, b), (c, d) = TESTED_TRANSFORMERS
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b}-{c}.{d}"


def untested_transformers() -> str:
    """"" for a tested transformers release; else a sentence naming the installed and tested ones."""
    version = transformers_version()
    if version is None or TESTED_TRANSFORMERS[0] <= version <= TESTED_TRANSFORMERS[1]:
        return ""
    import transformers

    return (f"transformers {transformers.__version__} is not a release megamoe-compile was tested with "
            f"({tested_range_text()}); MoE layers whose traced code differs from the tested releases' are "
            "reported 'not recognised' and left unfused, never rewritten")
# Experts implementations whose traced code the pass recognises. "eager" loops in Python over
# the experts that were hit, which breaks dynamo's graph; prepare traces those layers through
# "grouped_mm", which computes the same function (see `traced_implementation`).
TRACEABLE_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
# transformers' fine-grained FP8 experts (`integrations/finegrained_fp8.py`, `FP8Experts`): the
# module a quantized checkpoint's experts become. The pass knows the traced code of its grouped_mm
# forward (`fp8_grouped_mm_experts_forward`); "eager" is traced through it like the dense class.
FP8_EXPERTS_CLASS = "FP8Experts"
# Where `use_experts_implementation` defines the forward it wraps experts classes with.
_EXPERTS_INTERFACE_FILE = "transformers/integrations/moe.py"
FP8_TRACEABLE_IMPLEMENTATIONS = ("grouped_mm",)
# The kernels' FP8 weight blocks; FP8Experts' `block_size` and scale grids must be these.
FP8_BLOCK = (128, 128)
MXFP4_GROUP = 32
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
# Said when a model has no MoE layer we recognise.
RECOGNISED_FAMILIES = ("recognised: DeepSeek-V4 (DeepseekV4SparseMoeBlock) and every MoE block whose experts run "
                       "through transformers' experts interface (Qwen-MoE, DeepSeek-V2/V3, GLM-4.5, MiniMax-M2, "
                       "Mixtral, "
                       "OLMoE, ...), dense or FP8Experts")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def v4_classes():
    """The transformers classes we recognise, or None when this transformers has no DeepSeek-V4."""
    try:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    except ImportError:
        return None
    return m


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
    router_kind: str = ""  # for the report, e.g. "softmax", "sigmoid+bias grouped"

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
        return "fp8_" + self.traced_base if self.experts_class == FP8_EXPERTS_CLASS else self.traced_base


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


def is_experts_interface(experts) -> bool:
    """Whether `experts` runs through transformers' experts interface (`@use_experts_implementation`:
    stacked 3-D expert weights, forward picked by `config._experts_implementation`), or is
    transformers' fine-grained FP8 experts, which does too."""
    cls = experts if isinstance(experts, type) else type(experts)
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    # The decorator's dispatching forward (functools.wraps copies the name, not the code).
    return (code is not None and code.co_filename.replace("\\", "/").endswith(_EXPERTS_INTERFACE_FILE)) or \
        cls.__name__ == FP8_EXPERTS_CLASS


def block_part_suffix(cls: type) -> str | None:
    """For a module class met in dynamo's `nn_module_stack`: its path suffix within a MoE block
    ("" for a DeepSeek-V4 block, ".gate" for its routers, ".experts" for any experts-interface
    class), or None for other classes. The pass names blocks prepare never planned this way."""
    m = v4_classes()
    if m is not None:
        if cls is m.DeepseekV4SparseMoeBlock:
            return ""
        if cls in (m.DeepseekV4HashRouter, m.DeepseekV4TopKRouter):
            return ".gate"
    return ".experts" if isinstance(cls, type) and is_experts_interface(cls) else None


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every MoE block: a DeepSeek-V4 `DeepseekV4SparseMoeBlock`, or any module whose
    `experts` child runs through transformers' experts interface (Qwen-MoE, DeepSeek-V3, Mixtral, ...)."""
    m = v4_classes()
    found = []
    for name, module in model.named_modules():
        if m is not None and isinstance(module, m.DeepseekV4SparseMoeBlock):
            found.append((name, module))
        elif _holds_stacked_experts(module):
            found.append((name, module))
    return found


_MOE_CLASS_NAME = re.compile(r"(Moe|MoE|MoA|Experts)(Block|Layer)?$|SparseMoe")  # not ...MoeMLP (dense)


def unrecognised_moe_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, reason) of each outermost module that looks like a MoE layer by its class name
    (`...MoE`, `...SparseMoeBlock`, `...Experts`) but is not a block `find_moe_blocks` recognises (nor
    inside one): families with expert code of their own (DBRX, JetMoE, Doge, ...). The report lists
    them, unfused, with the reason."""
    recognised = [name for name, _ in find_moe_blocks(model)]
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


def _holds_stacked_experts(module: torch.nn.Module) -> bool:
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


def layer_index(name: str) -> int | None:
    found = _LAYER_INDEX.search(name + ".")
    return int(found.group(1)) if found else None


def describe(name: str, block: torch.nn.Module) -> tuple[MoESpec | None, str]:
    """Read a MoE block's spec; (None, reason) when it is not the structure we know."""
    m = v4_classes()
    if m is None or not isinstance(block, m.DeepseekV4SparseMoeBlock):
        return _describe_family(name, block)
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if isinstance(gate, m.DeepseekV4HashRouter):
        router = "hash"
    elif isinstance(gate, m.DeepseekV4TopKRouter):
        router = "topk"
    else:
        return None, f"unknown router {type(gate).__name__}"
    quantized = is_fp8_experts(experts)
    if type(experts) is not m.DeepseekV4Experts and not quantized:
        return None, f"unknown experts module {type(experts).__name__}"
    scoring_func = _scoring_name(gate.score_fn)
    if scoring_func is None:
        return None, f"unknown router score function {type(gate.score_fn).__name__}"
    why = _experts_problem(experts, expected_gate=m.DeepseekV4Experts._apply_gate)
    if why:
        return None, why
    held, why = _held_weights(experts, gate)
    if held is None:
        return None, why
    ep_shard, gate_up, down, weight_format = held
    num_experts, two_i, hidden = gate_up.shape
    if weight_format == "mxfp4":
        hidden *= 2  # two FP4 values per byte
    intermediate = two_i // 2
    limit = getattr(experts, "limit", None)
    impl = experts_implementation(experts)
    why = _implementation_problem(impl, quantized)
    if why:
        return None, why
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
        dtype=_activation_dtype(block),
        device=gate_up.device,
        expert_parallel=ep_shard is not None,
        experts_class=FP8_EXPERTS_CLASS if quantized else "DeepseekV4Experts",
        ep_experts=None if ep_shard is None else ep_shard[0],
        ep_ranks=() if ep_shard is None else ep_shard[1],
    )
    if tuple(down.shape[-2:]) != (spec.hidden, spec.intermediate // (2 if weight_format == "mxfp4" else 1)):
        return None, f"down_proj shape {tuple(down.shape)} does not fit gate_up_proj {tuple(gate_up.shape)}"
    return spec, ""


# Families whose experts hold stacked weights but compute something else than the fused op.
_UNFIT_FAMILIES = {
    "llama4": "Llama-4 multiplies the experts' input by the routing weights (the fused op weights their output)",
}


def _describe_family(name: str, block: torch.nn.Module) -> tuple[MoESpec | None, str]:
    """The spec of a non-V4 MoE block whose experts run through transformers' experts interface.

    Only the experts are fused: dispatch -> FFN1 -> SwiGLU -> FFN2 -> weighted top-k sum, on the
    ids and weights the block's router made. The router (softmax, sigmoid + correction bias, group-
    limited top-k, norm_topk_prob, routed scaling), shared experts and their gates stay graph code.
    """
    experts, kind = block.experts, family(block)
    if kind in _UNFIT_FAMILIES:
        return None, _UNFIT_FAMILIES[kind]
    if getattr(experts, "zero_expert_num", 0):
        return None, f"{experts.zero_expert_num} zero-compute (identity) experts; the fused op runs SwiGLU experts only"
    if not is_experts_interface(experts):
        return None, (f"experts module {type(experts).__name__} has a forward of its own, not transformers' experts "
                      "interface (@use_experts_implementation)")
    why = _experts_problem(experts, expected_gate=_default_apply_gate())
    if why:
        return None, why
    gate = getattr(block, "gate", None)
    held, why = _held_weights(experts, gate)
    if held is None:
        return None, why
    ep_shard, gate_up, down, weight_format = held
    top_k = next((int(v) for v in (getattr(gate, "top_k", None), getattr(block, "top_k", None),
                                   getattr(experts.config, "num_experts_per_tok", None)) if v is not None), None)
    if top_k is None:
        return None, "the number of experts per token (top_k) is not found on the router or the config"
    num_experts, two_i, hidden = gate_up.shape
    if weight_format == "mxfp4":
        hidden *= 2
    quantized = is_fp8_experts(experts)
    impl = experts_implementation(experts)
    why = _implementation_problem(impl, quantized)
    if why:
        return None, why
    limit = getattr(experts, "limit", None) if quantized else clamped_swiglu_limit(experts)
    spec = MoESpec(
        name=name, layer_index=layer_index(name), router="graph", scoring_func=None, top_k=top_k,
        num_experts=int(num_experts), hidden=int(hidden), intermediate=int(two_i // 2), routed_scaling_factor=None,
        swiglu_limit=None if limit is None else float(limit), experts_implementation=impl,
        weight_format=weight_format, dtype=_family_activation_dtype(block), device=gate_up.device,
        expert_parallel=ep_shard is not None, experts_class=FP8_EXPERTS_CLASS if quantized else type(experts).__name__,
        ep_experts=None if ep_shard is None else ep_shard[0], ep_ranks=() if ep_shard is None else ep_shard[1],
        family=kind, router_kind=_router_kind(gate),
    )
    if tuple(down.shape[-2:]) != (spec.hidden, spec.intermediate // (2 if weight_format == "mxfp4" else 1)):
        return None, f"down_proj shape {tuple(down.shape)} does not fit gate_up_proj {tuple(gate_up.shape)}"
    return spec, ""


def _held_weights(experts: torch.nn.Module, gate):
    """((ep_shard, gate_up, down, weight_format), "") for the expert weights this rank holds, or
    (None, reason). Shapes and dtypes are the local ones: a DTensor's own `.shape` is the global one."""
    ep_shard = None
    if getattr(experts, "_is_expert_parallel", False) or is_dtensor(experts.gate_up_proj) \
            or is_dtensor(experts.down_proj):
        ep_shard, why = transformers_ep_shard(experts, gate)
        if ep_shard is None:
            return None, why
    gate_up, down = local_tensor(experts.gate_up_proj), local_tensor(experts.down_proj)
    weight_format = _weight_format(experts)
    if weight_format is None:
        return None, f"expert weights of dtype {gate_up.dtype} are not a format we read"
    return (ep_shard, gate_up, down, weight_format), ""


def _default_apply_gate():
    from transformers.integrations import moe

    return getattr(moe, "_default_apply_gate", None)


def _experts_problem(experts: torch.nn.Module, expected_gate) -> str:
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
    if is_fp8_experts(experts):
        return _activation_problem(experts) or _fp8_experts_problem(experts)
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
            own is _default_apply_gate() or getattr(experts, "swiglu_alpha", None) is not None or \
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


def _implementation_problem(impl: str | None, quantized: bool) -> str:
    if quantized and impl not in (None, "eager", *FP8_TRACEABLE_IMPLEMENTATIONS):
        return (f"experts_implementation {impl!r} of {FP8_EXPERTS_CLASS} is not one the pass recognises "
                f"{['eager', *FP8_TRACEABLE_IMPLEMENTATIONS]}")
    if impl not in (None, "eager", *TRACEABLE_IMPLEMENTATIONS):
        return f"experts_implementation {impl!r} is not one the pass recognises {['eager', *TRACEABLE_IMPLEMENTATIONS]}"
    return ""


def _router_kind(gate) -> str:
    """What a family's router computes, read from its attributes (for the report only)."""
    if gate is None:
        return "?"
    source = _forward_source(type(gate))
    kind = "sigmoid" if "sigmoid" in source else "softmax" if "softmax" in source else type(gate).__name__
    if hasattr(gate, "e_score_correction_bias") or "e_score_correction_bias" in source:
        kind += "+bias"
    groups = getattr(gate, "n_group", None) or getattr(gate, "num_group", None) or 1
    if int(groups) > 1:
        kind += " grouped"
    return kind


@functools.cache
def _forward_source(cls: type) -> str:
    """A router class's forward source, read once per class (prepare describes every layer)."""
    import inspect

    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _family_activation_dtype(block: torch.nn.Module) -> torch.dtype:
    """The dtype the block's activations run in: the experts' own (dense weights), else that of the
    first 16/32-bit floating parameter of the block (a quantized checkpoint's router or shared expert)."""
    for t in (block.experts.gate_up_proj, *block.parameters()):
        if t.dtype.is_floating_point and torch.finfo(t.dtype).bits >= 16:
            return t.dtype
    return torch.get_default_dtype()


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def transformers_ep_shard(experts: torch.nn.Module, gate: torch.nn.Module
                          ) -> tuple[tuple[tuple[int, int], tuple[int, ...]] | None, str]:
    """((first, last), ep_ranks) of experts that transformers' expert parallelism sharded, or (None, reason).

    Facts (transformers 5.23, `distributed/expert_parallel.py`): `DistributedConfig(ep_size=N)`
    applies the model's `base_model_ep_plan` (`apply_expert_parallelism`). Style "grouped_gemm"
    (`MoEParamShard(Shard(0), shards_expert_dim=True)`) turns `gate_up_proj`/`down_proj` into DTensor
    parameters `Shard(0)` on the 1-D EP mesh, global shape [E, ...], local [E/N, ...]: EP-mesh rank r
    holds experts [r*E/N, (r+1)*E/N); it sets `num_experts = E/N` and `_is_expert_parallel = True`.
    Style "ep_dispatch_experts" installs `ep_forward` as the module's own `forward`: it runs an
    `EPImplementation` (AutoEP -> AllReduceEP at inference on a shared batch: ids of other ranks'
    experts become the sentinel E/N with weight 0, this rank's become local ids, the output is
    all-reduced) around the experts' class forward on the local shard. The router is not sharded:
    its ids are global. Anything else sharded (tensor parallelism's "moe_tp_experts": the expert
    weights split along N or K) is not a layout the fused op takes.
    """
    w1, w2 = experts.gate_up_proj, experts.down_proj
    if not getattr(experts, "_is_expert_parallel", False):
        placements = tuple(getattr(w1, "placements", ())), tuple(getattr(w2, "placements", ()))
        return None, (f"expert weights are DTensors {placements[0]}/{placements[1]} not sharded by transformers' "
                      "expert parallelism (tensor parallelism splits each expert; FSDP gathers them per call); "
                      "the pass does not fuse distributed expert weights")
    if not (is_dtensor(w1) and is_dtensor(w2)):
        return None, "experts are marked expert-parallel but their weights are not transformers' sharded DTensors"
    from torch.distributed.tensor import Shard

    mesh = w1.device_mesh
    if (w2.device_mesh != mesh or mesh.ndim != 1 or tuple(w1.placements) != (Shard(0),)
            or tuple(w2.placements) != (Shard(0),)):
        return None, (f"expert weights sharded as {tuple(w1.placements)}/{tuple(w2.placements)} over mesh "
                      f"{mesh}; transformers' expert parallelism shards dim 0 over one 1-D mesh")
    size, global_experts = mesh.size(), int(w1.shape[0])
    local = int(w1.to_local().shape[0])
    if global_experts != local * size or int(w2.shape[0]) != global_experts \
            or int(w2.to_local().shape[0]) != local or getattr(experts, "num_experts", local) != local:
        return None, (f"expert weights {tuple(w1.shape)} are not split evenly into {size} shards of "
                      f"{getattr(experts, 'num_experts', '?')} experts")
    if int(getattr(gate, "num_experts", global_experts)) != global_experts:
        return None, f"the router picks among {gate.num_experts} experts, the sharded experts hold {global_experts}"
    import torch.distributed as dist

    rank = mesh.get_local_rank()
    return ((rank * local, (rank + 1) * local), tuple(dist.get_process_group_ranks(mesh.get_group()))), ""


def experts_implementation(experts: torch.nn.Module, config=None) -> str | None:
    """The experts implementation `config` (default: the module's own config) names."""
    config = config if config is not None else getattr(experts, "config", None)
    return getattr(config, "_experts_implementation", None)


def fp8_expert_scales(experts: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """FP8Experts' dequantization scales (`gate_up_proj_scale_inv`, `down_proj_scale_inv`)."""
    return getattr(experts, "gate_up_proj_scale_inv", None), getattr(experts, "down_proj_scale_inv", None)


def _fp8_experts_problem(experts: torch.nn.Module) -> str:
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
    for attr in ("gate_softcap", "up_softcap"):  # swiglu_alpha: refused for every family (_experts_problem)
        if getattr(experts, attr, None) is not None:
            return (f"FP8 experts apply {attr}={getattr(experts, attr)!r}; the fused kernel computes a clamped "
                    "SwiGLU only")
    gate_fn = type(experts)._apply_gate
    if "_apply_gate" in vars(experts) or getattr(gate_fn, "__qualname__", "") != f"{FP8_EXPERTS_CLASS}._apply_gate" \
            or getattr(gate_fn, "__module__", None) != f.__name__:
        return "experts gating function was replaced"
    w1, w2 = experts.gate_up_proj, experts.down_proj
    s1, s2 = fp8_expert_scales(experts)
    if not isinstance(s1, torch.Tensor) or not isinstance(s2, torch.Tensor):
        return "FP8 experts without gate_up_proj_scale_inv/down_proj_scale_inv"
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0]:
        return f"FP8 expert weights of shapes {tuple(w1.shape)}, {tuple(w2.shape)} are not [E, N, K]"
    e8m0 = torch.float8_e8m0fnu  # transformers' scale_fmt="ue8m0" (torch >= 2.11 has the dtype)
    if w1.dtype == torch.float8_e4m3fn and w2.dtype == torch.float8_e4m3fn:
        block = tuple(experts.block_size) if experts.block_size is not None else None
        if block != FP8_BLOCK:
            return f"FP8 experts with weight_block_size {block}; the kernels take {list(FP8_BLOCK)} blocks"
        for name, w, s in (("gate_up_proj", w1, s1), ("down_proj", w2, s2)):
            grid = (w.shape[0], w.shape[1] // FP8_BLOCK[0], w.shape[2] // FP8_BLOCK[1])
            if w.shape[1] % FP8_BLOCK[0] or w.shape[2] % FP8_BLOCK[1] or tuple(s.shape) != grid:
                return f"FP8 {name} {tuple(w.shape)} with scales {tuple(s.shape)} is not a whole grid of 128x128 blocks"
            if s.dtype not in (torch.float32, e8m0):
                return f"FP8 {name}_scale_inv of dtype {s.dtype} (expected float32 or float8_e8m0fnu)"
        return ""
    if w1.dtype == torch.int8 and w2.dtype == torch.int8:
        for name, w, s in (("gate_up_proj", w1, s1), ("down_proj", w2, s2)):
            grid = (w.shape[0], w.shape[1], w.shape[2] * 2 // MXFP4_GROUP)
            if (w.shape[2] * 2) % MXFP4_GROUP or tuple(s.shape) != grid:
                return f"FP4 {name} {tuple(w.shape)} with scales {tuple(s.shape)} is not MXFP4 (one scale per 1x32)"
            if s.dtype != e8m0:
                # scale_fmt="float" stores FP4 scales as float32; transformers' own FP4 kernels
                # take UE8M0 only, and a float32 scale need not be a power of two.
                return f"FP4 {name}_scale_inv of dtype {s.dtype}; MXFP4 needs UE8M0 (scale_fmt='ue8m0') scales"
        return ""
    return (f"FP8 expert weights of dtypes {w1.dtype}/{w2.dtype} are not a format we read (float8_e4m3fn or "
            "int8-packed FP4)")


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


def _weight_format(experts: torch.nn.Module) -> str | None:
    w = experts.gate_up_proj
    if w.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return "dense"
    if w.dtype == torch.float8_e4m3fn:
        return "fp8"
    if w.dtype in (torch.int8, torch.uint8):
        return "mxfp4"
    return None
