"""`prepare(model, config)`: the load-time step.

Finds every DeepSeek-V4 MoE block, decides per layer whether it will be fused and with which
kernel and recipe, and builds that kernel's weights once (quantized and laid out), kept on the
experts module as non-persistent buffers so they move with `model.to()` and stay out of
`state_dict()`. The graph pass only reads what prepare decided.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import hf
from .config import MegaMoEConfig
from . import experts as megamoe_experts
from .ops import groups, layouts, recipes
from .ops.fused_moe import LayerShape, auto_family, get_kernel, pick, register_source_check

log = logging.getLogger("megamoe_compile")

_BUFFER_PREFIX = "megamoe_"
# gate_up_proj parameter -> weakref to its MoE block, for the pass: dynamo hands the backend the
# parameters as graph inputs, not the modules that own them.
_BLOCK_BY_WEIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()


# str(id(module)) -> module, for the MoE blocks prepare planned and their gate and experts: dynamo
# keys a node's `nn_module_stack` by that string. Weak values: a freed model leaves no entry (and
# so no id reused by another module can match).
_PREPARED_PARTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def is_prepared_part(module_key: str) -> bool:
    """Whether an `nn_module_stack` key names a prepared MoE block, its router or its experts."""
    return _PREPARED_PARTS.get(module_key) is not None


@dataclass
class PreparedLayer:
    """Everything prepare keeps on one MoE layer, in one place: `experts._megamoe`.

    The kernel-ready weights themselves are the experts' non-persistent buffers `megamoe_*` (model
    state: they move with `model.to()` and dynamo reads them as graph inputs); this record says
    which of them prepare owns (copies it may rebuild in place) and what it set aside to undo its
    changes. Read it through `plan_of`, `kernel_ready` and `kernel_weights`."""

    plan: LayerPlan | None = None
    owned_buffers: frozenset[str] = frozenset()  # buffer names that are copies (not views of the model's tensors)
    released: bool = False  # the original expert weights were freed (release_original_weights)
    original_config: object = None  # the experts' config before prepare gave them the "megamoe" implementation
    transformers_forward: object = None  # transformers' expert-parallel forward, set aside while the op replaces it
    hooked: bool = False  # the load/save hooks are on the MoE block


def _record(experts: torch.nn.Module) -> PreparedLayer:
    record = getattr(experts, "_megamoe", None)
    if record is None:
        record = experts._megamoe = PreparedLayer()
    return record


class UnsupportedLayerError(ValueError):
    """A layer the user forced onto a kernel that cannot take it."""


@dataclass
class LayerPlan:
    """Prepare's decision for one MoE block (the report shows it)."""

    name: str
    layer_index: int | None
    spec: hf.MoESpec | None
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
    # What the kernel-ready copy was built from: (data_ptr, version, dtype, device, shape) of each
    # source tensor; () when the kernel reads the model's own tensors (nothing can go stale).
    source_stamp: tuple = field(default=(), repr=False)
    # A compile found this layer's copy stale (and so traced it unfused); the rebuilt plan gets the
    # next generation, which the traced marker carries, so that graph is not reused.
    stale_seen: bool = field(default=False, repr=False)
    generation: str = "0"


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
    untested = hf.untested_transformers()
    if untested:
        warnings.warn(f"megamoe: {untested}", stacklevel=2)
    blocks = hf.find_moe_blocks(model)
    if not blocks:
        warnings.warn(f"megamoe.prepare: {type(model).__name__} has no MoE layer this version recognises "
                      f"({hf.RECOGNISED_FAMILIES}); nothing is prepared or fused", stacklevel=2)
    config.check_layers_exist([i for name, _ in blocks if (i := hf.layer_index(name)) is not None])
    ep = ExpertParallel.from_config(config)
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
        ep.check_consistent(layer_plans(model))
    model._megamoe_config = config
    return model


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in the expert-parallel group the config names."""

    group: object
    group_name: str
    world: int
    rank: int
    shared_batch: bool
    ranks: tuple[int, ...] = ()  # global ranks of the group, in group-rank order

    @classmethod
    def from_config(cls, config: MegaMoEConfig) -> ExpertParallel | None:
        if config.ep_mode == "none":
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"MegaMoEConfig.ep_mode={config.ep_mode!r} needs torch.distributed initialised "
                             "on every rank (e.g. under torchrun: dist.init_process_group())")
        group = config.ep_group or dist.group.WORLD
        return cls(group, str(group.group_name), dist.get_world_size(group), dist.get_rank(group),
                   config.ep_mode == "shared_batch", tuple(dist.get_process_group_ranks(group)))

    def local_range(self, spec: hf.MoESpec) -> tuple[int, int]:
        """[first, last) global expert ids this rank holds of a layer's `spec.num_experts` experts.

        Only for experts every rank holds whole: experts that transformers' expert parallelism
        already sharded keep the range its mesh gave them (`spec.ep_experts`, checked against
        this group by `transformers_ep_problem`).
        """
        if spec.num_experts % self.world:
            raise ValueError(f"{spec.name}: {spec.num_experts} experts cannot be split evenly over "
                             f"an expert-parallel group of {self.world} ranks")
        local = spec.num_experts // self.world
        return self.rank * local, (self.rank + 1) * local

    def check_consistent(self, plans: list[LayerPlan]) -> None:
        """Fail on every rank, not hang in a kernel, when ranks planned differently."""
        import socket

        import torch.distributed as dist

        mine = {"host": socket.gethostname(),
                "layers": [(p.name, p.fuse, p.kernel, p.recipe, p.shared_batch,
                            p.spec and (p.spec.num_experts, p.spec.hidden, p.spec.intermediate, p.spec.top_k))
                           for p in plans]}
        every = [None] * self.world
        # NCCL's object gather stages through the *current* CUDA device; pin it to the experts' GPU
        # (other libraries may have moved it, e.g. a device mesh built without LOCAL_RANK).
        cuda = next((p.spec.device for p in plans if p.spec is not None and p.spec.device.type == "cuda"), None)
        with torch.cuda.device(cuda) if cuda is not None else contextlib.nullcontext():
            dist.all_gather_object(every, mine, group=self.group)
        for r, theirs in enumerate(every):
            if theirs["layers"] != mine["layers"]:
                diff = next((a, b) for a, b in zip(mine["layers"] + [None], theirs["layers"] + [None]) if a != b)
                raise ValueError(f"megamoe: expert-parallel ranks planned differently (rank {self.rank} vs rank {r}): "
                                 f"{diff[0]} != {diff[1]}; give every rank the same model and MegaMoEConfig")
        hosts = {theirs["host"] for theirs in every}
        if len(hosts) > 1 and any(p.fuse and p.kernel != "reference" for p in plans):
            raise ValueError(f"megamoe: the expert-parallel group spans hosts {sorted(hosts)}; DeepGEMM MegaMoE "
                             "exchanges tokens through NVLink symmetric memory within one node")


def layer_plans(model: torch.nn.Module) -> list[LayerPlan]:
    """The plans `prepare` made, in module order."""
    return [plan for _, b in hf.find_moe_blocks(model) if (plan := plan_of(b))]


def block_for_weight(weight: torch.Tensor) -> torch.nn.Module | None:
    """The prepared MoE block whose experts own `weight` (their gate_up_proj), if any."""
    ref = _BLOCK_BY_WEIGHT.get(weight)
    return ref() if ref is not None else None


def kernel_weights(experts: torch.nn.Module) -> layouts.KernelWeights:
    """The weights `prepare` built for `experts`, in the recipe's dtypes (the originals where the
    recipe keeps them)."""
    w1, s1, w2, s2 = kernel_ready(experts)
    r = recipes.recipe(plan_of(experts).recipe)
    return layouts.KernelWeights(recipes.as_storage(w1, r.weight_dtype), recipes.as_storage(s1, r.scale_dtype),
                                 recipes.as_storage(w2, r.weight_dtype), recipes.as_storage(s2, r.scale_dtype))


# -- what the rest of the library reads of a prepared layer -------------------------------------

def prepared_config(model: torch.nn.Module) -> MegaMoEConfig | None:
    """The config `model` was prepared with (as a whole, or else that of its first planned layer)."""
    config = getattr(model, "_megamoe_config", None)
    return config if config is not None else next((plan.config for plan in layer_plans(model)), None)


def plan_of(module: torch.nn.Module) -> LayerPlan | None:
    """The plan of a MoE block (or of its experts module); None when prepare never planned it."""
    record = getattr(getattr(module, "experts", module), "_megamoe", None)
    return None if record is None else record.plan


def kernel_ready(experts: torch.nn.Module):
    """(w1, w1_scale, w2, w2_scale) the fused op takes for `experts`, as stored: prepare's
    kernel-ready buffers, or the module's own weights where the recipe keeps them as they are."""
    w1 = getattr(experts, _BUFFER_PREFIX + "w1", None)
    if w1 is None:
        return experts.gate_up_proj, None, experts.down_proj, None
    return (w1, getattr(experts, _BUFFER_PREFIX + "w1_scale", None), getattr(experts, _BUFFER_PREFIX + "w2"),
            getattr(experts, _BUFFER_PREFIX + "w2_scale", None))


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


# -- planning ---------------------------------------------------------------------------------

def _plan_layer(name: str, block: torch.nn.Module, config: MegaMoEConfig,
                ep: ExpertParallel | None = None) -> LayerPlan:
    experts = block.experts
    if ep is not None:  # per group, not per layer; here so that re-plans at compile time apply it too
        groups.check_calls(ep.group_name, config.ep_check_calls)
    record = _record(experts)
    old = record.plan
    if record.released:
        if old.config.plan_key() != config.plan_key():
            raise ValueError(f"{name}: its original expert weights were released "
                             "(release_original_weights=True); reload the model to plan it differently")
        return _keep(old, experts, config, ep)
    fingerprint = _fingerprint(name, config, block)
    if old is not None and old.fingerprint == fingerprint:
        return _keep(old, experts, config, ep)
    _restore_implementation(experts)  # describe reads the model's own experts implementation
    spec, why = hf.describe(name, block)
    index = hf.layer_index(name)
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
                    plan.local_experts = spec.ep_experts if spec.expert_parallel else ep.local_range(spec)
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
    record.plan = plan
    for part in (block, getattr(block, "gate", None), experts):
        if part is not None:
            _PREPARED_PARTS[str(id(part))] = part
    _install_hooks(block)
    _BLOCK_BY_WEIGHT[experts.gate_up_proj] = weakref.ref(block)
    if plan.fuse and config.release_original_weights and plan.recipe != "none":
        if spec.experts_class == hf.FP8_EXPERTS_CLASS:
            plan.notes.append(f"release_original_weights: not for {spec.experts_class} (its forward is "
                              "transformers' quantized-experts code); original weights kept")
        elif plan.prepared_bytes == 0:
            plan.notes.append("release_original_weights: the kernel uses the model's own tensors; nothing to release")
        else:
            _release_original_weights(block, plan)
    return plan


def transformers_ep_problem(spec: hf.MoESpec, ep: ExpertParallel | None) -> str:
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


def choose_kernel(config: MegaMoEConfig, spec: hf.MoESpec) -> tuple[str | None, str | None, str]:
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


def default_recipe(kernel: str, spec: hf.MoESpec) -> str:
    # The reference kernel keeps what the checkpoint holds, so it re-quantizes nothing.
    return get_kernel(kernel).default_recipe(spec.weight_format)


def recipe_problem(kernel: str, recipe: str, spec: hf.MoESpec) -> str:
    """Why `kernel` cannot run `recipe` on this layer ("" when it can)."""
    k = get_kernel(kernel)
    return (k.refuses_recipe(recipe)
            or recipes.recipe(recipe).problem(spec.weight_format, spec.hidden, spec.intermediate)
            or k.library_problem(recipe))


def _layer_shape(spec: hf.MoESpec, num_experts: int | None = None) -> LayerShape:
    return LayerShape(spec.num_experts if num_experts is None else num_experts, spec.hidden, spec.intermediate,
                      spec.top_k, spec.dtype, spec.device)


def _build(experts: torch.nn.Module, spec: hf.MoESpec, plan: LayerPlan, config: MegaMoEConfig,
           ep: ExpertParallel | None, previous: dict[str, torch.Tensor] | None = None) -> None:
    previous = previous or {}
    with torch.no_grad():
        source = layouts.source_weights(experts, spec.weight_format)
        if spec.expert_parallel:  # DTensor shards of transformers' EP: this rank's part as it is
            source = layouts.KernelWeights(*(None if t is None else hf.local_tensor(t)
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
    model_storage = {hf.local_tensor(p).untyped_storage().data_ptr() for p in experts.parameters()}
    model_storage |= {b.untyped_storage().data_ptr() for n, b in experts.named_buffers()
                      if not n.startswith(_BUFFER_PREFIX)}
    owned = set()
    for key, tensor in weights.tensors().items():
        if tensor is None:
            continue
        # Quantized copies are kept as integer bits, so `model.to(dtype)` leaves them as they are
        # (recipe "none" keeps the model's dtype and is cast along with it).
        stored = tensor if plan.recipe == "none" else recipes.to_bits(tensor)
        name = _BUFFER_PREFIX + key
        if tensor.untyped_storage().data_ptr() not in model_storage:
            owned.add(name)
            old = previous.get(name)
            if (old is not None and name in _record(experts).owned_buffers and old.shape == stored.shape
                    and old.dtype == stored.dtype and old.device == stored.device and old.stride() == stored.stride()):
                # A rebuild (weights loaded or changed): into the same memory, so that compiled code
                # holding it - CUDA graphs read their static inputs by address - sees the new weights.
                old.copy_(stored)
                stored = old
        experts.register_buffer(name, stored, persistent=False)
    _record(experts).owned_buffers = frozenset(owned)
    plan.source_stamp = _source_stamp(experts)
    experts_ref = weakref.ref(experts)
    register_source_check(getattr(experts, _BUFFER_PREFIX + "w1"),
                          lambda: stale_reason(experts_ref()) if experts_ref() is not None else "")
    plan.prepared_bytes = sum(t.numel() * t.element_size() for t in weights.tensors().values()
                              if t is not None and t.untyped_storage().data_ptr() not in model_storage)


def _reserve(plan: LayerPlan, local_experts: int, config: MegaMoEConfig, ep: ExpertParallel | None) -> None:
    """The kernel's buffers for `config.max_tokens_per_rank` tokens (load time; a collective for
    DeepGEMM, so on every rank alike). Layers of one shape share them."""
    get_kernel(plan.kernel).reserve(_layer_shape(plan.spec, num_experts=local_experts), config.max_tokens_per_rank,
                                    None if ep is None else ep.group, plan.recipe)


def _keep(plan: LayerPlan, experts: torch.nn.Module, config: MegaMoEConfig, ep: ExpertParallel | None) -> LayerPlan:
    """A plan that still holds under `config`: only what does not touch the weights may differ
    (`max_tokens_per_rank` reserves a buffer of that size, nothing is rebuilt)."""
    if plan.fuse and plan.config is not None and plan.config.max_tokens_per_rank != config.max_tokens_per_rank:
        _reserve(plan, kernel_ready(experts)[0].shape[0], config, ep)
    plan.config = config
    return plan


def _use_megamoe_implementation(experts: torch.nn.Module) -> None:
    """Give the experts the "megamoe" implementation (megamoe_compile/experts.py).

    The experts' forward picks its implementation from `self.config`, shared by the whole model:
    this module gets its own copy, so other (skipped) layers keep theirs."""
    import copy

    megamoe_experts.register()
    record = _record(experts)
    if record.original_config is None:
        record.original_config = experts.config
    cfg = copy.copy(record.original_config)
    cfg._experts_implementation = megamoe_experts.IMPLEMENTATION
    experts.config = cfg


def _run_fused_op_in_forward(block: torch.nn.Module, plan: LayerPlan) -> None:
    """Make the experts' own forward (eager, and so what dynamo traces) the fused op on the
    kernel-ready weights."""
    experts = block.experts
    # dynamo sees the prepared weights as the layer's inputs: find the block through them.
    _BLOCK_BY_WEIGHT[experts.megamoe_w1] = weakref.ref(block)
    plan.eager_fused = True


def _source_stamp(experts: torch.nn.Module) -> tuple:
    """(data_ptr, version, dtype, device, shape) of each tensor a kernel-ready copy is built from:
    the expert weights and, for a quantized checkpoint, their scales."""
    tensors = [experts.gate_up_proj, experts.down_proj,
               *(s for s in hf.fp8_expert_scales(experts) if isinstance(s, torch.Tensor))]
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in map(hf.local_tensor, tensors))


def stale_reason(experts: torch.nn.Module) -> str:
    """Why the kernel-ready copy of `experts` no longer matches the weights it was built from
    ("" when it does, or when there is no copy)."""
    plan = plan_of(experts)
    if plan is None or not plan.fuse or plan.released or not plan.source_stamp:
        return ""
    if _source_stamp(experts) == plan.source_stamp:
        return ""
    return (f"{plan.name}: its expert weights changed after prepare (modified in place, replaced, cast or "
            "moved), so its kernel-ready copy is stale; call mc.prepare(model, config) again to rebuild it "
            "(load_state_dict rebuilds it by itself)")


def _install_hooks(block: torch.nn.Module) -> None:
    """Once per MoE block: rebuild the kernel-ready copy after `load_state_dict` (load time, not
    per call), and refuse to save or load a layer whose original weights were released."""
    record = _record(block.experts)
    if record.hooked:
        return
    block.register_load_state_dict_pre_hook(_refuse_load_into_released)
    block.register_load_state_dict_post_hook(_rebuild_after_load)
    block.register_state_dict_post_hook(_refuse_save_released)
    record.hooked = True


def _released_message(block: torch.nn.Module, what: str) -> str:
    return (f"megamoe: {plan_of(block).name}: cannot {what}: prepare released its original expert "
            "weights (MegaMoEConfig(release_original_weights=True)); only the kernel-ready copy is held. Reload the "
            "model from its checkpoint (and prepare it without release_original_weights) to save or load weights.")


def _refuse_save_released(block, state_dict, prefix, local_metadata) -> None:
    if _record(block.experts).released:
        raise RuntimeError(_released_message(block, "save its weights (state_dict / save_pretrained)"))


def _refuse_load_into_released(block, state_dict, prefix, *args) -> None:
    if _record(block.experts).released and any(k.startswith(prefix + "experts.") for k in state_dict):
        raise RuntimeError(_released_message(block, "load weights into it (load_state_dict)"))


def _rebuild_after_load(block, incompatible_keys) -> None:
    # Re-plan whatever the load changed (a copy in place, or new tensors with assign=True);
    # `_plan_layer` does nothing when the fingerprint is unchanged.
    plan = plan_of(block)
    if plan is not None and not plan.released:
        _plan_layer(plan.name, block, plan.config, ExpertParallel.from_config(plan.config))


def _release_original_weights(block: torch.nn.Module, plan: LayerPlan) -> None:
    """Keep only the kernel-ready weights; the layer's eager forward then runs the fused op."""
    experts = block.experts
    _run_fused_op_in_forward(block, plan)
    plan.source_stamp = ()
    for name in ("gate_up_proj", "down_proj"):
        old = hf.local_tensor(getattr(experts, name))
        setattr(experts, name, torch.nn.Parameter(old.new_empty(0), requires_grad=False))
    _record(experts).released = True
    plan.notes.append("original expert weights released; eager and compiled forward use the fused op")
    plan.released = True


def _replace_transformers_ep_forward(block: torch.nn.Module, plan: LayerPlan) -> None:
    """transformers' EP installed its dispatch (`ep_forward`: local ids, masking, all-reduce) as the
    experts' instance forward. The fused op takes the router's global ids and combines across the
    group itself, so that dispatch is set aside (restored on re-plan) and the op runs instead."""
    experts = block.experts
    if "forward" in vars(experts):
        _record(experts).transformers_forward = vars(experts).pop("forward")
    _run_fused_op_in_forward(block, plan)
    plan.notes.append("transformers' expert-parallel dispatch replaced by the fused op over the same ranks "
                      "(its experts shard used as it is)")


def _restore_implementation(experts: torch.nn.Module) -> None:
    record = _record(experts)
    if record.original_config is not None:
        experts.config = record.original_config
        record.original_config = None
    if record.transformers_forward is not None:
        experts.forward = record.transformers_forward
        record.transformers_forward = None


def _drop_buffers(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Remove prepare's buffers; returns them (a rebuild may write into them again)."""
    return {key: experts._buffers.pop(key) for key in [k for k in experts._buffers if k.startswith(_BUFFER_PREFIX)]}


def _nbytes(module: torch.nn.Module) -> int:
    # What this rank holds: a DTensor's numel() counts every rank's shard.
    return sum(hf.local_tensor(p).numel() * p.element_size() for n, p in module.named_parameters())


def _configured_implementation(experts: torch.nn.Module) -> str | None:
    """The experts implementation the model was configured with (not prepare's "megamoe")."""
    return hf.experts_implementation(experts, _record(experts).original_config)


def _fingerprint(name: str, config: MegaMoEConfig, block: torch.nn.Module) -> tuple:
    """What a plan depends on: an equal fingerprint means prepare has nothing to redo. The name
    (selection patterns match it), the router facts the plan's spec records, and the weights."""
    gate = getattr(block, "gate", None)
    return (name, config.plan_key(), _configured_implementation(block.experts), getattr(gate, "top_k", None),
            type(getattr(gate, "score_fn", None)), _source_stamp(block.experts))
