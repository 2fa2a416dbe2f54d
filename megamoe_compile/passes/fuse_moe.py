"""Graph pass: rewrite each prepared MoE layer's routed experts into one `megamoe.fused_moe` call.

Works on the FX graph dynamo hands a backend (torch-level ops, parameters as placeholders).
dynamo records in each node's `nn_module_stack` the module calls it came from, keyed by module
identity, so the nodes of one layer's router and experts are found exactly. A region is
rewritten only when its operations and dataflow are exactly a pattern of `patterns.py`
(`matcher.match`), its constants agree with the module (checked here), and nothing outside it
reads its intermediates; otherwise it is left alone and the reason is reported. The router stays
ordinary graph code: the op takes the routing weights it produced (scaled), and indices/weights
are cast to what the kernels take (int32, float32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import layer_state as state
from .. import models
from ..ops.fused_moe import get_kernel
from . import patterns
from .fx_utils import (
    MARKER_OP,
    argument,
    clamp_args,
    const,
    dim_arg,
    has_side_effects,
    int_list,
    is_negation,
    is_scalar,
    is_shape_arithmetic,
    is_tensor,
    module_path,
    op_name,
    op_namespace,
    qualified_name,
    real_tensor,
    region,
    same_scalar,
    same_size,
)
from .matcher import NoMatch, PatternMismatch, match

log = logging.getLogger("megamoe_compile")

__all__ = ["LayerFusion", "NoMatch", "PatternMismatch", "fuse_moe_layers", "prepared_blocks", "remove_markers",
           "unprepared_moe_blocks"]


@dataclass
class LayerFusion(state.FusedPlanView):
    """What the pass did with one MoE layer found in a graph; the layer's plan says the rest."""

    name: str
    fused: bool
    reason: str = ""
    traced_as: str | None = None
    plan: state.LayerPlan | None = field(default=None, repr=False)  # None: a layer prepare never planned
    # nn_module_stack key of the MoE block, to find its nodes in the graph (`CompiledGraph.layer_code`).
    module_key: str = field(default="", repr=False)
    # Left unfused for a reason the user must act on (the backend warns once): stale weights.
    needs_attention: bool = field(default=False, repr=False)
    # What a graph router (other families') computes, read from the traced ops that make the experts'
    # ids and weights, e.g. "sigmoid+bias grouped" ("" where the experts were not matched).
    router_kind: str = ""

    @property
    def layer_index(self) -> int | None:
        return self.plan.layer_index if self.plan is not None else models.layer_index(self.name)

    @property
    def notes(self) -> list[str]:
        return list(self.plan.notes) if self.fused else []


def fuse_moe_layers(gm: fx.GraphModule) -> list[LayerFusion]:
    """Rewrite `gm` in place; one LayerFusion per MoE layer the graph holds (fused or not).

    Every `megamoe.prepared_weights` marker is removed, fused or not: a layer left unfused is
    exactly the code transformers traced."""
    results = [_fuse_one(gm, block) for block in prepared_blocks(gm.graph)]
    if remove_markers(gm) or any(r.fused for r in results):
        gm.graph.lint()
        gm.recompile()
    return results


def remove_markers(gm: fx.GraphModule) -> int:
    """Erase every `megamoe.prepared_weights` call (a no-op: it only carried weights and constants
    into the trace); returns how many. The caller recompiles `gm`."""
    markers = [n for n in gm.graph.nodes if _is_marker(n)]
    for node in markers:
        gm.graph.erase_node(node)
    return len(markers)


def prepared_blocks(graph: fx.Graph):
    """Each prepared MoE block whose expert weights (or kernel-ready weights) are inputs of `graph`,
    once, in graph order. The tensors lead to their layer (`layer_state.prepared_block`): model
    state, so a copy of a prepared model is found as itself."""
    seen = set()
    for node in graph.nodes:
        tensor = real_tensor(node) if node.op == "placeholder" else None
        block = state.prepared_block(tensor) if tensor is not None else None
        if block is not None and id(block) not in seen:
            seen.add(id(block))
            yield block


def unprepared_moe_blocks(graph: fx.Graph) -> list[str]:
    """Names of the MoE blocks whose code is in `graph` but that `prepare` has not planned (so
    nothing about them can be fused), in graph order. A block met in pieces (graph breaks: its
    router traced as a frame of its own) is named by its path within that frame."""
    prepared = set()
    for block in prepared_blocks(graph):
        prepared.update(str(id(m)) for m in (block, getattr(block, "gate", None), block.experts) if m is not None)
    found: dict[str, None] = {}
    for node in graph.nodes:
        for key, (path, cls) in (node.meta.get("nn_module_stack") or {}).items():
            if key in prepared:
                continue
            suffix = models.block_part_suffix(cls)
            if suffix is None:
                continue
            block_path = str(path)[: -len(suffix)] if suffix and str(path).endswith(suffix) else str(path)
            found.setdefault(module_path(block_path) or "a MoE block traced in pieces (graph break)", None)
    return list(found)


def _is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and qualified_name(node) == MARKER_OP


# -- one layer --------------------------------------------------------------------------------

def _fuse_one(gm: fx.GraphModule, block: torch.nn.Module) -> LayerFusion:
    plan = state.plan_of(block)
    experts_key = str(id(block.experts))
    result = LayerFusion(plan.name, False, plan=plan, module_key=str(id(block)))
    if plan.spec is not None and plan.spec.router == "graph":
        result.router_kind = _traced_router(gm.graph, block, plan.spec)
    if not plan.fuse:
        result.reason = plan.reason
        return result
    spec = plan.spec
    result.traced_as = spec.traced_implementation
    try:
        if plan.eager_fused:  # prepare installed the fused op as the experts' own forward
            result.traced_as = "megamoe"
            _check_already_fused(gm.graph, experts_key, block)
        else:
            if not region(gm.graph, str(id(block))):
                raise NoMatch("only this layer's experts module is in the graph (compiled on its own, or split from "
                              "its MoE block by a graph break); the fused op replaces the block from the router's "
                              "output on: compile the MoE block or the whole model")
            configured = state.configured_implementation(block.experts)
            if configured != spec.experts_implementation:  # model.set_experts_implementation after prepare
                result.needs_attention = True
                raise NoMatch(f"{plan.name}: the model's experts implementation is now {configured!r} (set after "
                              f"prepare, which planned the layer for {spec.experts_implementation!r}); it runs "
                              f"{configured!r} unfused until mc.prepare(model, config) plans it again")
            marker = _marker(gm.graph, experts_key, plan)
            stale = state.stale_reason(block.experts)
            if stale:
                result.needs_attention = plan.stale_seen = True
                raise NoMatch(stale)
            found = _match(gm.graph, block, experts_key, spec)
            _check_runtime(found, spec, plan)
    except NoMatch as e:
        result.reason = str(e)
        if models.untested_transformers() and isinstance(e, PatternMismatch):
            import transformers

            result.reason = f"not recognised for transformers {transformers.__version__} (untested release): {e}"
        log.info("megamoe: %s not fused: %s", plan.name, result.reason)
        return result
    if not plan.eager_fused:
        _rewrite(gm, found, marker, plan)
    result.fused = True
    torch._dynamo.utils.counters["megamoe"]["fused_moe"] += 1
    log.info("megamoe: fused %s -> megamoe.fused_moe (kernel %s, recipe %s)", plan.name, plan.kernel, plan.recipe)
    return result


def _check_already_fused(graph: fx.Graph, experts_key: str, block) -> None:
    ex = match(region(graph, experts_key), patterns.EXPERTS_ALREADY_FUSED, "experts")
    _expect(ex["op"].target in (torch.ops.megamoe.fused_moe, torch.ops.megamoe.fused_moe.default),
            "experts call another op than megamoe.fused_moe")
    w1, _, w2, _ = state.kernel_ready(block.experts)
    _expect(is_tensor(ex[patterns.W1], w1) and is_tensor(ex[patterns.W2], w2),
            "fused op does not use this layer's prepared weights")


def _marker(graph: fx.Graph, experts_key: str, plan: state.LayerPlan) -> fx.Node:
    """The layer's `megamoe.prepared_weights` call: where its kernel-ready weights enter the graph.

    Its constants were read (and guarded) by dynamo from the plan when the graph was traced; they
    must be the current plan's, or the graph was traced for another one."""
    markers = [n for n in region(graph, experts_key) if _is_marker(n)]
    if len(markers) != 1:
        raise NoMatch("the traced experts code does not carry this layer's prepared weights "
                      f"({len(markers)} megamoe.prepared_weights calls); call mc.prepare(model, config) "
                      "before compiling")
    marker = markers[0]
    traced, planned = tuple(marker.args[4:]), state.marker_constants(plan)
    if traced != planned:
        raise NoMatch(f"the graph was traced for kernel/recipe/group {traced}, the layer is now planned for "
                      f"{planned}")
    return marker


@dataclass
class _Match:
    experts: dict[str, fx.Node]
    router: dict[str, fx.Node]
    experts_region: list[fx.Node]
    swiglu_limit: object  # a float, or the graph node that holds it


def _match(graph: fx.Graph, block, experts_key: str, spec: models.MoESpec) -> _Match:
    experts_region = [n for n in region(graph, experts_key) if not _is_marker(n)]
    for node in region(graph, str(id(block))):
        if has_side_effects(node):
            raise NoMatch(f"the MoE block calls {op_name(node)} ({node.name}), which returns no tensor and may "
                          "change tensors in place (a hook?); the fused op could not see that change")
    if not experts_region:
        raise NoMatch("the experts' code is not in this graph (a graph break inside the MoE block?)")
    ex = match(experts_region, patterns.EXPERTS[(spec.traced_implementation, spec.activation)], "experts")
    ro = {}
    if spec.router != "graph":  # DeepSeek-V4: its router is checked op by op too
        router_region = region(graph, str(id(block.gate)))
        if not router_region:
            raise NoMatch("the router's code is not in this graph (a graph break inside the MoE block?)")
        ro = match(router_region, patterns.router_pattern(spec.router, spec.scoring_func), "router")

    # Region boundary: only the final output may be read outside the experts region.
    inside = set(experts_region)
    for node in experts_region:
        if node is ex["out"] or is_shape_arithmetic(node):  # dynamo shares size expressions
            continue
        for user in node.users:
            if user not in inside:
                raise NoMatch(f"an intermediate of the experts ({node.name}) is used outside them")

    if ro:
        _check_router(ro, block, spec)
        _expect(ex[patterns.WEIGHTS] is ro["scaled"], "experts do not receive the router's weights")
        _expect(ex[patterns.IDS] is ro["indices"], "experts do not receive the router's indices")
    limit = _check_experts(ex, block, spec)
    return _Match(ex, ro, experts_region, limit)


_SCORING_OPS = ("softmax", "sigmoid", "softplus")


def _traced_router(graph: fx.Graph, block, spec: models.MoESpec) -> str:
    """What another family's router computes, for the report (fused or not): read from the traced
    ops within the MoE block that the experts' inputs (ids, weights, hidden states) come from (the
    first scoring function; a per-expert correction bias, a tensor of the block named `..._bias`
    with one row, among their inputs), and from the config (`spec.router_config`: group-limited
    top-k). e.g. "softmax", "sigmoid+bias grouped"; "" when the experts are not in this graph."""
    experts_region = region(graph, str(id(block.experts)))
    if not experts_region:
        return ""
    block_region = region(graph, str(id(block)))  # in graph order
    inside, in_experts = set(block_region), set(experts_region)
    biases = {id(t) for n, t in (*block.named_parameters(), *block.named_buffers())
              if not n.startswith("experts.") and n.rsplit(".", 1)[-1].endswith("_bias") and t.dim() >= 1
              and t.numel() == t.shape[-1]}
    stack = [a for n in experts_region for a in n.all_input_nodes if a not in in_experts]
    feeding, has_bias, seen = set(), False, set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            has_bias |= id(real_tensor(node)) in biases
        elif node in inside:
            feeding.add(node)
            stack.extend(node.all_input_nodes)
    ops = [op_name(n) for n in block_region if n in feeding]
    kind = next((op for op in ops if op in _SCORING_OPS), "?")
    if kind == "softplus" and "sqrt" in ops:
        kind = "sqrtsoftplus"
    return kind + ("+bias" if has_bias else "") + (f" {spec.router_config}" if spec.router_config else "")


def _check_router(ro: dict[str, fx.Node], block, spec: models.MoESpec) -> None:
    """The router's constants and tensors (its dataflow is the pattern's)."""
    gate = block.gate
    _expect(is_tensor(ro[patterns.GATE_WEIGHT], gate.weight), "router logits do not use gate.weight")
    _expect(argument(ro["logits"], 2, "bias") is None, "router linear has a bias")
    if spec.scoring_func == "sqrtsoftplus":
        _expect(len(ro["softplus"].args) == 1 and not ro["softplus"].kwargs, "scores are not sqrt(softplus(logits))")
    if spec.scoring_func == "softmax":
        _expect(dim_arg(ro["scores"], 1) in (-1, 1), "softmax scores not over the experts dim")
    if spec.router == "topk":
        _expect(is_tensor(ro[patterns.SCORE_BIAS], gate.e_score_correction_bias),
                "top-k is not taken over scores + e_score_correction_bias")
        topk = ro["topk"]
        _expect(const(topk.args[1]) == spec.top_k and dim_arg(topk, 2, "dim", -1) in (-1, 1),
                f"top-k is not over experts with k={spec.top_k}")
        _expect(ro["indices"].args[1:] == (1,), "indices are not top-k's indices")
    else:
        _expect(is_tensor(ro[patterns.TID2EID], gate.tid2eid), "hash routing is not tid2eid[input_ids]")
    picked, den, scaled = ro["picked"], ro["denominator"], ro["scaled"]
    _expect(const(picked.args[1]) in (1, -1), "routing weights are not the scores gathered at the indices")
    _expect(dim_arg(ro["total"], 1, "dim") in (-1, 1), "weights are not normalised over top-k")
    eps = const(den.args[1])
    _expect(eps is not None and 0 <= eps <= 1e-6, "unexpected epsilon in weight normalisation")
    # The multiply by routed_scaling_factor stays in the graph (the op takes the scaled weights), so
    # whatever value it has at run time - a constant or a graph input - is the one used.
    _expect(len(scaled.args) == 2 and is_scalar(scaled.args[1]),
            "routing weights are not scaled by a scalar (routed_scaling_factor)")


def _check_experts(ex: dict[str, fx.Node], block, spec: models.MoESpec):
    """The experts' constants and tensors; returns the SwiGLU clamp bound as traced."""
    experts = block.experts
    k = spec.top_k
    impl = spec.traced_implementation
    if impl in ("grouped_mm", "fp8_grouped_mm"):
        _check_sorted_dispatch(ex, spec)
        _check_restored_order(ex)
    if impl == "grouped_mm":
        for w_t, mm in ((ex["w1_t"], ex["mm1"]), (ex["w2_t"], ex["mm2"])):
            _expect(tuple(const(a) for a in w_t.args[1:]) in ((-2, -1), (-1, -2), (1, 2), (2, 1)),
                    "expert weights are not transposed to [E, K, N]")
            _expect(mm.kwargs.get("bias") is None and len(mm.args) <= 3, "a grouped matmul adds a bias")
        _expect(dim_arg(ex["weights_col"], 1, "dim") == -1, "routing weights are not a column of the sorted weights")
    elif impl == "fp8_grouped_mm":
        _check_finegrained_grouped(ex, experts, spec)
    else:  # batched_mm
        _expect(const(ex["rows"].args[1]) == k and dim_arg(ex["rows"], 2, "dim") == 0,
                "tokens are not repeated top_k times")
        for mm in (ex["mm1"], ex["mm2"]):
            _expect(len(mm.args) == 2 and not mm.kwargs, "a batched matmul takes extra arguments")
    _expect(is_tensor(ex[patterns.W1], experts.gate_up_proj) and is_tensor(ex[patterns.W2], experts.down_proj),
            "expert matmuls do not use gate_up_proj/down_proj")
    chunk = ex["chunk"]
    _expect(const(chunk.args[1]) == 2 and dim_arg(chunk, 2, "dim", 0) in (-1, 1), "gate/up split is not chunk(2, -1)")
    _expect(ex["gate"].args[1:] == (0,) and ex["up"].args[1:] == (1,), "gate/up halves swapped")
    limit = None
    if spec.activation == "clamped_swiglu":
        (g_lo, limit), (u_lo, u_hi) = clamp_args(ex["gate_clamp"]), clamp_args(ex["up_clamp"])
        # SwiGLU clamp: gate clamped above by the limit, up to [-limit, limit]. The limit is taken from
        # the graph (a constant, or a graph input under dynamic shapes) and handed to the op.
        _expect(g_lo is None and is_scalar(limit) and same_scalar(u_hi, limit) and is_negation(u_lo, limit),
                "clamps are not gate.clamp(max=limit), up.clamp(-limit, limit)")
    _expect(len(ex["silu"].args) == 1 and not ex["silu"].kwargs, "activation is not silu(gate) * up")
    per_slot, combine = ex["per_slot"], ex["combine"]
    _expect(const(per_slot.args[2] if len(per_slot.args) > 2 else None) == k, "combine does not view [T, top_k, H]")
    _expect(dim_arg(combine, 1, "dim") == 1, "combine does not sum over top_k")
    return limit


def _check_finegrained_grouped(ex: dict[str, fx.Node], experts, spec: models.MoESpec) -> None:
    """Constants of `fp8_grouped_mm_experts_forward` (transformers' FP8Experts): both matmuls are
    the finegrained-fp8 kernel op that matches the weight format, on this module's own weights and
    scales (the tensors `models.fp8_checkpoints.checkpoint_weights` reads), with the kernels' block size."""
    expected_op = patterns.FINEGRAINED_GROUPED_MATMULS[spec.weight_format]
    s1, s2 = models.fp8_checkpoints.checkpoint_scales(experts)
    hidden_value = ex[patterns.HIDDEN].meta.get("example_value")
    for mm in (ex["mm1"], ex["mm2"]):
        _expect(op_name(mm) == expected_op and op_namespace(mm).startswith(patterns.FINEGRAINED_FP8_NAMESPACE),
                f"expert matmul is {op_namespace(mm)}::{op_name(mm)}, not the finegrained-fp8 {expected_op} "
                f"that {spec.weight_format} weights take")
        _expect(not mm.kwargs, "expert matmul has keyword arguments")
        rest = list(mm.args[5:])
        if spec.weight_format == "fp8":
            _expect(bool(rest) and int_list(rest.pop(0)) == list(models.fp8_checkpoints.fp8_block()),
                    f"FP8 expert matmul block size is not {list(models.fp8_checkpoints.fp8_block())}")
        out_dtype = rest.pop(0) if rest else None
        _expect(not rest and (out_dtype is None or (hidden_value is not None and out_dtype == hidden_value.dtype)),
                "expert matmul output dtype is not the activations' dtype")
    _expect(is_tensor(ex[patterns.W1_SCALE], s1) and is_tensor(ex[patterns.W2_SCALE], s2),
            "expert matmul does not use this module's weights and scale_inv")
    _expect(dim_arg(ex["weights_col"], 1, "dim") == -1, "routing weights are not a column of the sorted weights")


def _check_sorted_dispatch(ex: dict[str, fx.Node], spec: models.MoESpec) -> None:
    """grouped dispatch: ids sorted ascending, rows mapped back to tokens by perm // top_k,
    per-expert counts over exactly num_experts bins, int32 cumulative offsets."""
    k, num_experts = spec.top_k, spec.num_experts
    sort = ex["sort"]
    _expect(dim_arg(sort, 1, "dim", -1) in (-1, 0) and not sort.kwargs.get("descending", False)
            and not (len(sort.args) > 2 and sort.args[2]), "experts are not sorted ascending by routed id")
    _expect(ex["ids_sorted"].args[1:] == (0,) and ex["perm"].args[1:] == (1,), "sort outputs used the wrong way round")
    _expect(const(ex["token_of_row"].args[1]) == k, "row -> token map is not perm // top_k")
    _expect(len(ex["rows"].args) == 2, "rows are not hidden[perm // top_k]")
    counts = ex["counts"]
    bins, lo, hi = (argument(counts, i, name) for i, name in ((1, "bins"), (2, "min"), (3, "max")))
    _expect(const(bins) == num_experts and const(lo) == 0 and const(hi) == num_experts - 1,
            f"expert counts are not histc over {num_experts} experts")
    offsets = ex["offsets"]
    _expect(dim_arg(offsets, 1, "dim", None) == 0, "expert offsets are not the cumulative counts")
    _expect(offsets.kwargs.get("dtype") == torch.int32, "expert offsets are not int32")


def _check_restored_order(ex: dict[str, fx.Node]) -> None:
    """grouped combine: the inverse permutation inv[perm] = arange covers every row."""
    positions = ex["positions"]
    _expect(len(positions.args) == 1 and same_size(positions.args[0], ex["perm"]),
            "inverse permutation does not cover every row")
    _expect(len(ex["scatter"].args) == 3, "inverse permutation is not inv[perm] = arange")


def _check_runtime(found: _Match, spec: models.MoESpec, plan: state.LayerPlan) -> None:
    hidden_node, ex = found.experts[patterns.HIDDEN], found.experts
    hidden = hidden_node.meta.get("example_value")
    if hidden is None:
        raise NoMatch("hidden states have no example value")
    if torch.is_grad_enabled():  # dynamo guards on grad mode: a no_grad call recompiles and fuses
        requires = [n for n in (hidden_node, ex[patterns.W1], ex[patterns.W2], ex[patterns.WEIGHTS])
                    if getattr(n.meta.get("example_value"), "requires_grad", False)]
        if requires:
            raise NoMatch("gradients are enabled and required; the fused op is inference-only "
                          "(run under torch.no_grad() or torch.inference_mode())")
    weight = ex[patterns.W1].meta.get("example_value")
    if plan.recipe == "none" and weight is not None and weight.dtype != hidden.dtype:
        # transformers casts the activations to the weights' dtype; the op computes in x's.
        raise NoMatch(f"the experts hold {weight.dtype} weights but run on {hidden.dtype} activations")
    if hidden.device.type != spec.device.type:
        raise NoMatch(f"hidden states on {hidden.device}, experts prepared for {spec.device}")
    why = get_kernel(plan.kernel).activation_problem(hidden.dtype)
    if why:
        raise NoMatch(why)


# -- rewrite ----------------------------------------------------------------------------------

def _rewrite(gm: fx.GraphModule, found: _Match, marker: fx.Node, plan: state.LayerPlan) -> None:
    graph = gm.graph
    out = found.experts["out"]
    with graph.inserting_before(out):
        # Whatever ids and weights the router made (for DeepSeek-V4 checked above to be its top-k
        # and scaled weights), cast to what the kernels take.
        idx = graph.call_method("to", (found.experts[patterns.IDS], torch.int32))
        wts = graph.call_method("to", (found.experts[patterns.WEIGHTS], torch.float32))
        # The layer's kernel-ready weights, as graph inputs (the marker's first four arguments).
        args, kwargs = state.fused_call(plan, found.experts[patterns.HIDDEN], idx, wts, marker.args[:4],
                                       found.swiglu_limit)
        fused = graph.call_function(torch.ops.megamoe.fused_moe.default, args, kwargs)
    for new in (idx, wts, fused):
        new.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack", {}))
    fused.meta["example_value"] = out.meta.get("example_value")
    out.replace_all_uses_with(fused)
    for node in reversed(found.experts_region):
        if not node.users:  # shape arithmetic that later code shares stays
            graph.erase_node(node)


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)
