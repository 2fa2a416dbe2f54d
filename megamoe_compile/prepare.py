"""`prepare(model, config)`: the load-time step.

Finds every MoE block, decides per layer whether it will be fused and with which
kernel and recipe, and builds that kernel's weights once (quantized and laid out), kept on the
experts module as non-persistent buffers so they move with `model.to()` and stay out of
`state_dict()`. What it keeps on each layer is `layer_state.PreparedLayer`; the graph pass only
reads what prepare decided.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import torch

from . import experts as megamoe_experts
from . import layer_state as state
from . import models
from .config import MegaMoEConfig
from .layer_state import BUFFER_PREFIX, LayerPlan, UnsupportedLayerError, kernel_ready, layer_plans, record
from .ops import layouts, recipes
from .ops.fused_moe import LayerShape, auto_family, get_kernel, pick
from .ops.groups import ExpertParallel, check_calls

log = logging.getLogger("megamoe_compile")


def prepare(model: torch.nn.Module, config: MegaMoEConfig | None = None) -> torch.nn.Module:
    """Plan and build kernel-ready weights for every MoE layer of `model`, in place.

    Idempotent: a second call with an equal config on an unchanged model does nothing; with
    another config it re-plans. Returns `model`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"megamoe.prepare: model must be a torch.nn.Module, got {type(model).__name__}")
    config = MegaMoEConfig() if config is None else config
    if not isinstance(config, MegaMoEConfig):
        raise TypeError(f"megamoe.prepare: config must be a MegaMoEConfig, got {type(config).__name__} "
                        "(e.g. mc.MegaMoEConfig(**fields))")
    untested = models.untested_transformers()
    if untested:
        warnings.warn(f"megamoe: {untested}", stacklevel=2)
    blocks = models.find_moe_blocks(model)
    if not blocks:
        others = models.unrecognised_moe_modules(model)
        found = f"; found {len(others)} it does not: {others[0][1]}" if others else ""
        warnings.warn(f"megamoe.prepare: {type(model).__name__} has no MoE layer this version recognises "
                      f"({models.RECOGNISED_FAMILIES}){found}; nothing is prepared or fused", stacklevel=2)
    config.check_layers_exist([i for name, _ in blocks if (i := models.layer_index(name)) is not None])
    ep = ExpertParallel.of(config.ep_mode, config.ep_group)
    start, shown = time.perf_counter(), False
    for i, (name, block) in enumerate(blocks):
        plan = _plan_layer(name, block, config, ep)
        if plan.fuse:
            log.info("megamoe: %s -> %s (%s)", name, plan.kernel, plan.recipe)
        else:
            log.info("megamoe: %s left unfused: %s", name, plan.reason)
        elapsed = time.perf_counter() - start
        if elapsed > 2.0 and (not shown or i + 1 == len(blocks) or i % 4 == 0):
            log.warning("megamoe: prepared %d/%d MoE layers (%.1f s)", i + 1, len(blocks), elapsed)
            shown = True
    if ep is not None:
        _check_ranks_planned_alike(ep, layer_plans(model))
    model._megamoe_config = config
    return model


# -- planning ---------------------------------------------------------------------------------

def _plan_layer(name: str, block: torch.nn.Module, config: MegaMoEConfig,
                ep: ExpertParallel | None = None) -> LayerPlan:
    experts = block.experts
    if ep is not None:  # per group, not per layer; here so that re-plans at compile time apply it too
        check_calls(ep.group_name, config.ep_check_calls)
    rec = record(experts)
    old = rec.plan
    if rec.released:
        if old.config.plan_key() != config.plan_key():
            raise ValueError(f"{name}: its original expert weights were released "
                             "(release_original_weights=True); reload the model to plan it differently")
        return _keep(old, block, config, ep)
    fingerprint = _fingerprint(name, config, block)
    if old is not None and old.fingerprint == fingerprint and not state.stale_reason(experts):
        return _keep(old, block, config, ep)
    _restore_implementation(experts)  # describe reads the model's own experts implementation
    try:
        spec, why = models.describe(name, block)
    except Exception as e:  # a structure describe does not know: left as it is, and said (never a crash)
        spec, why = None, (f"not recognised: reading {type(block).__name__} / {type(experts).__name__} raised "
                           f"{type(e).__name__}: {e}")
    index = models.layer_index(name)
    previous = _drop_buffers(experts)

    if spec is None:
        plan = LayerPlan(name, index, None, False, reason=why)
    else:
        plan = LayerPlan(name, index, spec, False, original_bytes=_nbytes(experts))
        selected, why = config.selects(block, name, index)
        if not selected:
            plan.reason = why
        elif spec.expert_parallel and (why := transformers_ep_problem(spec, ep)):
            plan.local_experts = spec.ep_experts  # for the report: the range transformers gave this rank
            plan.reason = why
        else:
            kernel, recipe, why = choose_kernel(config, spec)
            if kernel is None:
                plan.reason = why
            else:
                plan.fuse, plan.kernel, plan.recipe = True, kernel, recipe
                if ep is not None:
                    plan.group_name, plan.shared_batch = ep.group_name, ep.shared_batch
                    # transformers' shard as it is, or this rank's even share of whole experts
                    plan.local_experts = (spec.ep_experts if spec.expert_parallel
                                          else ep.local_range(name, spec.num_experts))
                try:
                    _build(experts, spec, plan, config, ep, previous)
                except RuntimeError as e:  # the kernel library refused this shape at load time
                    _drop_buffers(experts)
                    if config.kernel != "auto":
                        raise UnsupportedLayerError(f"{name}: {e}") from e
                    plan.fuse, plan.kernel, plan.recipe = False, None, None
                    plan.reason, plan.prepared_bytes = str(e), 0
                if plan.fuse:
                    _use_megamoe_implementation(experts)
                if plan.fuse and spec.expert_parallel:
                    _replace_transformers_ep_forward(block, plan)
                elif plan.fuse and spec.experts_implementation in (None, "eager"):
                    plan.notes.append(
                        "experts_implementation 'eager' loops in Python (a graph break); this layer "
                        "is traced through 'grouped_mm', which computes the same function"
                    )
    plan.fingerprint, plan.config = fingerprint, config
    if old is not None:
        plan.generation = str(int(old.generation) + 1) if old.stale_seen else old.generation
    rec.plan = plan
    # What the kernel-ready copy (if any) is built from, and the block it belongs to.
    copied = plan.fuse and kernel_ready(experts)[0] is not getattr(experts, "gate_up_proj", None)
    state.stamp_provenance(experts, block, name, derived=copied)
    _install_hooks(block)
    if plan.fuse and config.release_original_weights:
        if plan.recipe == "none":
            plan.notes.append("release_original_weights: recipe 'none' computes with the model's own expert "
                              "weights; nothing to release (choose a quantized recipe to hold only its copy)")
        elif spec.experts_class == models.FP8_EXPERTS_CLASS:
            plan.notes.append(f"release_original_weights: not for {spec.experts_class} (its forward is "
                              "transformers' quantized-experts code); original weights kept")
        elif plan.prepared_bytes == 0:
            plan.notes.append("release_original_weights: the kernel uses the model's own tensors; nothing to release")
        else:
            _release_original_weights(block, plan)
    return plan


def transformers_ep_problem(spec: models.MoESpec, ep: ExpertParallel | None) -> str:
    """Why experts that transformers' expert parallelism sharded cannot be fused ("" when they can).

    They can when megamoe's group is transformers' EP mesh, rank for rank: the kernel splits
    experts evenly and contiguously by group rank, which is exactly how the mesh sharded them.
    """
    first, last = spec.ep_experts
    held = (f"experts sharded by transformers' expert parallelism (this rank holds experts [{first}, {last}) "
            f"of {spec.num_experts * len(spec.ep_ranks)})")
    if ep is None:
        return (f"{held} run transformers' own expert-parallel forward; set MegaMoEConfig.ep_mode "
                "('shared_batch' for the batch every rank holds) to fuse them over the same ranks")
    if ep.ranks != spec.ep_ranks:
        return (f"{held}: transformers' EP mesh is ranks {list(spec.ep_ranks)} but the megamoe group is ranks "
                f"{list(ep.ranks)}; the kernel needs the same ranks in the same order (set MegaMoEConfig.ep_group "
                "to the EP mesh's group)")
    return ""


def choose_kernel(config: MegaMoEConfig, spec: models.MoESpec) -> tuple[str | None, str | None, str]:
    """(kernel, recipe, "") for a layer, or (None, None, reason) when it stays unfused.

    Raises UnsupportedLayerError when the user forced a kernel that cannot take the layer.
    """
    family = config.kernel if config.kernel != "auto" else auto_family(spec.device)
    kernel, why = pick(family, _layer_shape(spec))
    if kernel is None or why:
        if config.kernel != "auto":
            raise UnsupportedLayerError(f"{spec.name}: kernel={config.kernel!r} cannot run this layer: {why}")
        return None, None, why
    recipe = config.recipe if config.recipe != "auto" else default_recipe(kernel.name, spec)
    why = recipe_problem(kernel.name, recipe, spec)
    if why:
        if config.kernel != "auto" or config.recipe != "auto":
            raise UnsupportedLayerError(f"{spec.name}: {why}")
        return None, None, why
    return kernel.name, recipe, ""


def default_recipe(kernel: str, spec: models.MoESpec) -> str:
    # The reference kernel keeps what the checkpoint holds, so it re-quantizes nothing.
    return get_kernel(kernel).default_recipe(spec.weight_format)


def recipe_problem(kernel: str, recipe: str, spec: models.MoESpec) -> str:
    """Why `kernel` cannot run `recipe` on this layer ("" when it can)."""
    k = get_kernel(kernel)
    return (k.refuses_recipe(recipe)
            or recipes.recipe(recipe).problem(spec.weight_format, spec.hidden, spec.intermediate)
            or k.library_problem(recipe))


def _layer_shape(spec: models.MoESpec, num_experts: int | None = None) -> LayerShape:
    return LayerShape(spec.num_experts if num_experts is None else num_experts, spec.hidden, spec.intermediate,
                      spec.top_k, spec.dtype, spec.device)


def _build(experts: torch.nn.Module, spec: models.MoESpec, plan: LayerPlan, config: MegaMoEConfig,
           ep: ExpertParallel | None, previous: dict[str, torch.Tensor] | None = None) -> None:
    previous = previous or {}
    with torch.no_grad():
        source = models.fp8_checkpoints.checkpoint_weights(experts, spec.weight_format)
        if spec.expert_parallel:  # DTensor shards of transformers' EP: this rank's part as it is
            source = layouts.KernelWeights(*(None if t is None else models.local_tensor(t)
                                             for t in source.tensors().values()))
        elif plan.local_experts is not None:
            source = source.experts(*plan.local_experts)  # this rank's experts only
        weights = layouts.to_recipe(source, spec.weight_format, plan.recipe)
        kernel = get_kernel(plan.kernel)
        weights = kernel.layout(weights, plan.recipe)
        _reserve(plan, weights.w1.shape[0], config, ep)
        # Before any CUDA-graph capture: the kernel's JIT compile and first-use allocations.
        kernel.warm_up(weights, _layer_shape(spec, num_experts=weights.w1.shape[0]), plan.recipe, spec.swiglu_limit,
                       plan.group_name)
    if plan.recipe == "none" and plan.local_experts is None:
        plan.prepared_bytes = 0  # the kernel reads the model's own weights
        return
    # Views of the model's own tensors (a checkpoint already in the recipe's format, this rank's
    # slice of the experts) are not copies: they cost no memory, and are never written into.
    model_storage = {models.local_tensor(p).untyped_storage().data_ptr() for p in experts.parameters()}
    model_storage |= {b.untyped_storage().data_ptr() for n, b in experts.named_buffers()
                      if not n.startswith(BUFFER_PREFIX)}
    owned = set()
    for key, tensor in weights.tensors().items():
        if tensor is None:
            continue
        # Quantized copies are kept as integer bits, so `model.to(dtype)` leaves them as they are
        # (recipe "none" keeps the model's dtype and is cast along with it).
        stored = tensor if plan.recipe == "none" else recipes.to_bits(tensor)
        name = BUFFER_PREFIX + key
        if tensor.untyped_storage().data_ptr() not in model_storage:
            owned.add(name)
            old = previous.get(name)
            if (old is not None and name in record(experts).owned_buffers and old.shape == stored.shape
                    and old.dtype == stored.dtype and old.device == stored.device and old.stride() == stored.stride()
                    and _writable(old)):
                # A rebuild (weights loaded or changed): into the same memory, so that compiled code
                # holding it - CUDA graphs read their static inputs by address - sees the new weights.
                old.copy_(stored)
                stored = old
        experts.register_buffer(name, stored, persistent=False)
    record(experts).owned_buffers = frozenset(owned)
    plan.prepared_bytes = sum(t.numel() * t.element_size() for t in weights.tensors().values()
                              if t is not None and t.untyped_storage().data_ptr() not in model_storage)


def _writable(t: torch.Tensor) -> bool:
    """Whether a rebuild may write into `t` in place: an inference tensor (built under
    torch.inference_mode()) can be written only inside inference mode."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


def _reserve(plan: LayerPlan, local_experts: int, config: MegaMoEConfig, ep: ExpertParallel | None) -> None:
    """The kernel's buffers for `config.max_tokens_per_rank` tokens (load time; a collective for
    DeepGEMM, so on every rank alike). Layers of one shape share them."""
    get_kernel(plan.kernel).reserve(_layer_shape(plan.spec, num_experts=local_experts), config.max_tokens_per_rank,
                                    None if ep is None else ep.group, plan.recipe)


def _keep(plan: LayerPlan, block: torch.nn.Module, config: MegaMoEConfig, ep: ExpertParallel | None) -> LayerPlan:
    """A plan that still holds under `config`: only what does not touch the weights may differ
    (`max_tokens_per_rank` reserves a buffer of that size, nothing is rebuilt). The router facts the
    report shows but the weights do not depend on (routed scaling, SwiGLU limit) are read again."""
    experts = block.experts
    if plan.fuse and plan.config is not None and plan.config.max_tokens_per_rank != config.max_tokens_per_rank:
        _reserve(plan, kernel_ready(experts)[0].shape[0], config, ep)
    plan.config = config
    if plan.spec is not None:
        plan.spec = models.refresh(plan.spec, block)
    state.link(experts)  # tensors replaced by a load with assign=True are found again
    return plan


def _use_megamoe_implementation(experts: torch.nn.Module) -> None:
    """Give the experts the "megamoe" implementation (megamoe_compile/experts.py).

    The experts' forward picks its implementation from `self.config`, shared by the whole model:
    this module gets its own copy, so other (skipped) layers keep theirs."""
    megamoe_experts.register()
    rec = record(experts)
    if rec.original_config is None:
        rec.original_config = experts.config
    cfg = copy.copy(rec.original_config)
    cfg._experts_implementation = megamoe_experts.IMPLEMENTATION
    experts.config = cfg


def _install_hooks(block: torch.nn.Module) -> None:
    """Once per MoE block: rebuild the kernel-ready copy after `load_state_dict` (load time, not
    per call), and refuse to save or load a layer whose original weights were released."""
    rec = record(block.experts)
    if rec.hooked:
        return
    block.register_load_state_dict_pre_hook(state.refuse_load_into_released)
    block.register_load_state_dict_post_hook(_rebuild_after_load)
    block.register_state_dict_post_hook(state.refuse_save_released)
    rec.hooked = True


def _rebuild_after_load(block, incompatible_keys) -> None:
    # Re-plan whatever the load changed (a copy in place, or new tensors with assign=True);
    # `_plan_layer` does nothing when the fingerprint is unchanged and the copy is fresh.
    plan = state.plan_of(block)
    if plan is not None and not plan.released:
        _plan_layer(plan.name, block, plan.config, ExpertParallel.of(plan.config.ep_mode, plan.config.ep_group))


def _release_original_weights(block: torch.nn.Module, plan: LayerPlan) -> None:
    """Keep only the kernel-ready weights; the layer's eager forward then runs the fused op."""
    experts = block.experts
    plan.eager_fused = True
    for name in ("gate_up_proj", "down_proj"):
        old = models.local_tensor(getattr(experts, name))
        setattr(experts, name, torch.nn.Parameter(old.new_empty(0), requires_grad=False))
    record(experts).released = True
    # Nothing is left to go stale: the kernel-ready copy is the layer's only weights now.
    state.stamp_provenance(experts, block, plan.name, derived=False)
    plan.notes.append("original expert weights released; eager and compiled forward use the fused op")
    plan.released = True


def _replace_transformers_ep_forward(block: torch.nn.Module, plan: LayerPlan) -> None:
    """transformers' EP installed its dispatch (`ep_forward`: local ids, masking, all-reduce) as the
    experts' instance forward. The fused op takes the router's global ids and combines across the
    group itself, so that dispatch is set aside (restored on re-plan) and the op runs instead."""
    experts = block.experts
    if "forward" in vars(experts):
        record(experts).transformers_forward = vars(experts).pop("forward")
    plan.eager_fused = True
    plan.notes.append("transformers' expert-parallel dispatch replaced by the fused op over the same ranks "
                      "(its experts shard used as it is)")


def _restore_implementation(experts: torch.nn.Module) -> None:
    rec = record(experts)
    if rec.original_config is not None:
        experts.config = rec.original_config
        rec.original_config = None
    if rec.transformers_forward is not None:
        experts.forward = rec.transformers_forward
        rec.transformers_forward = None


def _drop_buffers(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Remove prepare's buffers; returns them (a rebuild may write into them again)."""
    return {key: experts._buffers.pop(key) for key in [k for k in experts._buffers if k.startswith(BUFFER_PREFIX)]}


def _nbytes(module: torch.nn.Module) -> int:
    # What this rank holds: a DTensor's numel() counts every rank's shard.
    return sum(models.local_tensor(p).numel() * p.element_size() for n, p in module.named_parameters())


def _fingerprint(name: str, config: MegaMoEConfig, block: torch.nn.Module) -> tuple:
    """What a plan depends on besides the weights' values (whose changes the layer's provenance
    sees): an equal fingerprint and a fresh copy mean prepare has nothing to redo. The name
    (selection patterns match it), the router facts the plan's spec records, and what the expert
    weights are (dtype, device, shape)."""
    gate, experts = getattr(block, "gate", None), block.experts
    weights = tuple((n, t.dtype, t.device, tuple(t.shape)) for n in state.source_names(experts)
                    if (t := getattr(experts, n, None)) is not None and (t := models.local_tensor(t)) is not None)
    return (name, config.plan_key(), state.configured_implementation(experts), getattr(gate, "top_k", None),
            type(getattr(gate, "score_fn", None)), weights)


def _check_ranks_planned_alike(ep: ExpertParallel, plans: list[LayerPlan]) -> None:
    layers = [(p.name, p.fuse, p.kernel, p.recipe, p.shared_batch,
               p.spec and (p.spec.num_experts, p.spec.hidden, p.spec.intermediate, p.spec.top_k)) for p in plans]
    device = next((p.spec.device for p in plans if p.spec is not None and p.spec.device.type == "cuda"), None)
    ep.check_consistent(layers, one_host=any(p.fuse and p.kernel != "reference" for p in plans), device=device)
