"""What prepare keeps on each MoE layer, and how the rest of the library reads it.

One record per layer, `PreparedLayer`, on the experts module (`experts._megamoe`): the plan
(`LayerPlan`), which kernel-ready buffers prepare owns, what it set aside to undo its changes, a
link to the MoE block, and the layer's `Provenance` (what its kernel-ready weights were built
from, ops/provenance.py). The kernel-ready weights themselves are the experts' non-persistent
buffers `megamoe_*`. All of it is model state: `copy.deepcopy`, pickling and `torch.save` carry it
over with the model, and a copy is a prepared model of its own.

Readers: prepare (writes), the experts' "megamoe" forward, the graph pass and the report. Nothing
here plans or builds weights (prepare.py does).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field

import torch

from . import models
from .config import MegaMoEConfig
from .ops import layouts, provenance, recipes

BUFFER_PREFIX = "megamoe_"
STALE_HINT = ("call mc.prepare(model, config) again to rebuild it (load_state_dict rebuilds it by itself)")


class UnsupportedLayerError(ValueError):
    """A layer the user forced onto a kernel that cannot take it."""


@dataclass
class LayerPlan:
    """Prepare's decision for one MoE block (the report shows it)."""

    name: str
    layer_index: int | None
    spec: models.MoESpec | None
    fuse: bool
    reason: str = ""
    kernel: str | None = None
    recipe: str | None = None
    notes: list[str] = field(default_factory=list)
    original_bytes: int = 0
    prepared_bytes: int = 0
    released: bool = False  # the original expert weights were freed (release_original_weights)
    # The experts' own forward runs the fused op (after a release, or in place of transformers'
    # expert-parallel dispatch): the traced graph then already holds the op.
    eager_fused: bool = False
    # Expert parallelism: the op's process group ("" = none), this rank's experts, and whether all
    # ranks share one batch (each fuses a slice) or each has its own.
    group_name: str = ""
    local_experts: tuple[int, int] | None = None
    shared_batch: bool = False
    config: MegaMoEConfig | None = field(default=None, repr=False)
    fingerprint: tuple = ()
    # A compile found this layer's copy stale (and so traced it unfused); the rebuilt plan gets the
    # next generation, which the traced marker carries, so that graph is not reused.
    stale_seen: bool = field(default=False, repr=False)
    generation: str = "0"

    def __deepcopy__(self, memo):
        # The config is frozen and may hold a process group or a filter function: shared, not copied.
        new = copy.copy(self)
        memo[id(self)] = new
        new.notes = list(self.notes)
        new.spec = copy.deepcopy(self.spec, memo)
        return new


class FusedPlanView:
    """For records that pair a plan with whether the layer was fused (the pass's, the report's):
    the kernel and recipe it runs, read from the plan; None when it was not fused."""

    plan: LayerPlan | None
    fused: bool

    @property
    def kernel(self) -> str | None:
        return self.plan.kernel if self.fused else None

    @property
    def recipe(self) -> str | None:
        return self.plan.recipe if self.fused else None


@dataclass
class PreparedLayer:
    """Everything prepare keeps on one MoE layer, in one place: `experts._megamoe`."""

    plan: LayerPlan | None = None
    owned_buffers: frozenset[str] = frozenset()  # buffer names that are copies (not views of the model's tensors)
    released: bool = False  # the original expert weights were freed (release_original_weights)
    original_config: object = None  # the experts' config before prepare gave them the "megamoe" implementation
    transformers_forward: object = None  # transformers' expert-parallel forward, set aside while the op replaces it
    hooked: bool = False  # the load/save hooks are on the MoE block
    block: provenance.WeakLink = field(default_factory=provenance.WeakLink)  # the MoE block (weakly: no cycle)
    provenance: provenance.Provenance | None = None


def record(experts: torch.nn.Module) -> PreparedLayer:
    """The layer's record, created empty on first use."""
    found = getattr(experts, "_megamoe", None)
    if found is None:
        found = experts._megamoe = PreparedLayer()
    return found


def record_of(module: torch.nn.Module) -> PreparedLayer | None:
    """The record of a MoE block (or of its experts module); None when prepare never planned it."""
    return getattr(getattr(module, "experts", module), "_megamoe", None)


def plan_of(module: torch.nn.Module) -> LayerPlan | None:
    """The plan of a MoE block (or of its experts module); None when prepare never planned it."""
    found = record_of(module)
    return None if found is None else found.plan


def layer_plans(model: torch.nn.Module) -> list[LayerPlan]:
    """The plans `prepare` made, in module order."""
    return [plan for _, b in models.find_moe_blocks(model) if (plan := plan_of(b))]


def prepared_config(model: torch.nn.Module) -> MegaMoEConfig | None:
    """The config `model` was prepared with (as a whole, or else that of its first planned layer)."""
    config = getattr(model, "_megamoe_config", None)
    return config if config is not None else next((plan.config for plan in layer_plans(model)), None)


def kernel_ready(experts: torch.nn.Module):
    """(w1, w1_scale, w2, w2_scale) the fused op takes for `experts`, as stored: prepare's
    kernel-ready buffers, or the module's own weights where the recipe keeps them as they are."""
    w1 = getattr(experts, BUFFER_PREFIX + "w1", None)
    if w1 is None:
        return experts.gate_up_proj, None, experts.down_proj, None
    return (w1, getattr(experts, BUFFER_PREFIX + "w1_scale", None), getattr(experts, BUFFER_PREFIX + "w2"),
            getattr(experts, BUFFER_PREFIX + "w2_scale", None))


def kernel_weights(experts: torch.nn.Module) -> layouts.KernelWeights:
    """The weights `prepare` built for `experts`, in the recipe's dtypes (the originals where the
    recipe keeps them)."""
    w1, s1, w2, s2 = kernel_ready(experts)
    r = recipes.recipe(plan_of(experts).recipe)
    return layouts.KernelWeights(recipes.as_storage(w1, r.weight_dtype), recipes.as_storage(s1, r.scale_dtype),
                                 recipes.as_storage(w2, r.weight_dtype), recipes.as_storage(s2, r.scale_dtype))


def source_names(experts: torch.nn.Module) -> tuple[str, ...]:
    """The experts' tensors a kernel-ready copy is built from: the weights and, for a quantized
    checkpoint, their scales."""
    return ("gate_up_proj", "down_proj", *models.fp8_checkpoints.scale_names(experts))


def stamp_provenance(experts: torch.nn.Module, block: torch.nn.Module, name: str, derived: bool) -> None:
    """Give the layer a new provenance (its sources as they are now) and link it to the block."""
    rec = record(experts)
    rec.block = provenance.WeakLink(block)
    rec.provenance = provenance.Provenance(experts, name, source_names(experts), derived=derived,
                                           stale_hint=STALE_HINT)
    link(experts)


def link(experts: torch.nn.Module) -> None:
    """Let the pass and the op find this layer from the tensors a graph holds: its own expert
    weights and its kernel-ready w1 (at prepare; copies and loads of the model link their own).
    `model.to(device)` moves buffers into new tensors: the layer is then still found through its
    expert weights (moved in place), and its copy is stale until prepared again."""
    rec = record_of(experts)
    if rec is not None and rec.provenance is not None:
        rec.provenance.name(*(getattr(experts, n, None) for n in source_names(experts)),
                            getattr(experts, BUFFER_PREFIX + "w1", None))


def prepared_block(tensor: torch.Tensor) -> torch.nn.Module | None:
    """The prepared MoE block whose experts own `tensor` (their weights or kernel-ready w1), if any."""
    p = provenance.of(tensor)
    experts = None if p is None else p.owner()
    rec = None if experts is None else record_of(experts)
    if rec is None or rec.plan is None or rec.provenance is not p:
        return None
    block = rec.block()
    return block if block is not None and getattr(block, "experts", None) is experts else None


def stale_reason(experts: torch.nn.Module) -> str:
    """Why the kernel-ready copy of `experts` no longer matches the weights it was built from
    ("" when it does, or when there is no copy)."""
    rec = record_of(experts)
    if rec is None or rec.plan is None or not rec.plan.fuse or rec.released or rec.provenance is None:
        return ""
    return rec.provenance.stale_reason()


def configured_implementation(experts: torch.nn.Module) -> str | None:
    """The experts implementation the model is configured with now (not prepare's "megamoe"):
    `model.set_experts_implementation(...)` after prepare changes it."""
    rec = record_of(experts)
    return models.experts_implementation(experts, None if rec is None else rec.original_config)


def marker_constants(plan: LayerPlan) -> tuple:
    """The plan's constants a traced `megamoe.prepared_weights` marker carries (and dynamo guards on)."""
    return plan.kernel, plan.recipe, plan.group_name, plan.shared_batch, plan.generation


def fused_call(plan: LayerPlan, hidden, indices, weights, kernel_weights, swiglu_limit) -> tuple[tuple, dict]:
    """(args, kwargs) of the `megamoe.fused_moe` call for a layer: the one builder of that call,
    used by the graph rewrite (with graph nodes) and by the experts' own forward (with tensors).
    `indices` are int32 and `weights` float32 routing weights that already carry the router's
    routed_scaling_factor (so the op multiplies by 1.0)."""
    kwargs = {"kernel": plan.kernel, "recipe": plan.recipe, "routed_scaling_factor": 1.0,
              "swiglu_limit": swiglu_limit, "group_name": plan.group_name, "shared_batch": plan.shared_batch}
    if plan.group_name:  # expert parallelism: the layer's number, alike on every rank (lockstep check)
        kwargs["layer_id"] = layer_id(plan)
    return (hidden, indices, weights, *kernel_weights), kwargs


def layer_id(plan: LayerPlan) -> int:
    """The layer's number, the same on every rank: its decoder-layer index, else a hash of its name."""
    return plan.layer_index if plan.layer_index is not None else zlib.crc32(plan.name.encode()) & 0x7FFFFFFF


# -- released weights: saving and loading refused ------------------------------------------------

def released_message(block: torch.nn.Module, what: str) -> str:
    return (f"megamoe: {plan_of(block).name}: cannot {what}: prepare released its original expert "
            "weights (MegaMoEConfig(release_original_weights=True)); only the kernel-ready copy is held. Reload the "
            "model from its checkpoint (and prepare it without release_original_weights) to save or load weights.")


def refuse_save_released(block, state_dict, prefix, local_metadata) -> None:
    if record(block.experts).released:
        raise RuntimeError(released_message(block, "save its weights (state_dict / save_pretrained)"))


def refuse_load_into_released(block, state_dict, prefix, *args) -> None:
    if record(block.experts).released and any(k.startswith(prefix + "experts.") for k in state_dict):
        raise RuntimeError(released_message(block, "load weights into it (load_state_dict)"))
