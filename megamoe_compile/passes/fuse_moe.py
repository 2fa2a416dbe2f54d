"""Graph pass: rewrite each prepared DeepSeek-V4 MoE layer's routed experts into one
`megamoe.fused_moe` call.

Works on the FX graph dynamo hands a backend (torch-level ops, parameters as placeholders).
dynamo records in each node's `nn_module_stack` the module calls it came from, keyed by module
identity, so the nodes of one layer's router and experts are found exactly. A region is
rewritten only when its operations are exactly the pattern of `patterns.py`, its constants agree
with the module, and nothing outside it reads its intermediates; otherwise it is left alone and
the reason is reported. The router stays ordinary graph code; its scaling multiply is folded into
the op, and indices/weights are cast to what the kernels take (int32, float32).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import hf
from .. import prepare as prep
from . import patterns

log = logging.getLogger("megamoe_compile")


@dataclass
class LayerFusion:
    """What the pass did with one MoE layer found in a graph."""

    name: str
    layer_index: int | None
    fused: bool
    reason: str = ""
    kernel: str | None = None
    recipe: str | None = None
    traced_as: str | None = None
    notes: list[str] = field(default_factory=list)
    # nn_module_stack key of the MoE block, to find its nodes in the graph (`CompiledGraph.layer_code`).
    module_key: str = field(default="", repr=False)
    # Left unfused for a reason the user must act on (the backend warns once): stale weights.
    needs_attention: bool = field(default=False, repr=False)


class NoMatch(Exception):
    pass


class PatternMismatch(NoMatch):
    """The traced code is not the sequence of operations the patterns write down."""


def fuse_moe_layers(gm: fx.GraphModule) -> list[LayerFusion]:
    """Rewrite `gm` in place; one LayerFusion per MoE layer the graph holds (fused or not).

    Every `megamoe.prepared_weights` marker is removed, fused or not: a layer left unfused is
    exactly the code transformers traced."""
    results = [_fuse_one(gm, block, str(id(block.experts))) for block in prepared_blocks(gm.graph)]
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
    """Each prepared MoE block whose expert weights are inputs of `graph`, once, in graph order."""
    seen = set()
    for node in graph.nodes:
        tensor = _real_tensor(node) if node.op == "placeholder" else None
        block = prep.block_for_weight(tensor) if tensor is not None else None
        if block is not None and id(block) not in seen:
            seen.add(id(block))
            yield block


def unprepared_moe_blocks(graph: fx.Graph) -> list[str]:
    """Names of the DeepSeek-V4 MoE blocks whose code is in `graph` but that `prepare` has not
    planned (so nothing about them can be fused), in graph order. A block met in pieces (graph
    breaks: its router traced as a frame of its own) is named by its path within that frame."""
    m = hf.v4_classes()
    if m is None:
        return []
    parts = {m.DeepseekV4HashRouter: ".gate", m.DeepseekV4TopKRouter: ".gate", m.DeepseekV4Experts: ".experts"}
    found: dict[str, None] = {}
    for node in graph.nodes:
        for key, (path, cls) in (node.meta.get("nn_module_stack") or {}).items():
            if prep.is_prepared_part(key):
                continue
            if cls is m.DeepseekV4SparseMoeBlock:
                found.setdefault(_module_path(path), None)
            elif cls in parts or getattr(cls, "__name__", "") == hf.FP8_EXPERTS_CLASS:
                suffix = parts.get(cls, ".experts")
                block_path = str(path)[: -len(suffix)] if str(path).endswith(suffix) else str(path)
                found.setdefault(_module_path(block_path) or "a DeepseekV4SparseMoeBlock traced in pieces "
                                 "(graph break)", None)
    return list(found)


def _module_path(path: str) -> str:
    """dynamo's source path (e.g. "L['self'].model.layers[1].mlp") as a module name ("model.layers.1.mlp")."""
    import re

    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    return path.replace("._modules.", ".").strip(".")


def _is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.megamoe.prepared_weights.default,
                                                          torch.ops.megamoe.prepared_weights)


# -- one layer --------------------------------------------------------------------------------

def _fuse_one(gm: fx.GraphModule, block: torch.nn.Module, experts_key: str) -> LayerFusion:
    plan: prep.LayerPlan = block.experts._megamoe_plan
    result = LayerFusion(plan.name, plan.layer_index, False, module_key=str(id(block)))
    if not plan.fuse:
        result.reason = plan.reason
        return result
    spec = plan.spec
    result.traced_as = spec.traced_implementation
    try:
        if plan.eager_fused:  # prepare installed the fused op as the experts' own forward
            result.traced_as = "megamoe"
            _check_already_fused(gm.graph, experts_key, block, plan)
        else:
            marker = _marker(gm.graph, experts_key, plan)
            stale = prep.stale_reason(block.experts)
            if stale:
                result.needs_attention = plan.stale_seen = True
                raise NoMatch(stale)
            match = _match(gm.graph, block, experts_key, spec)
            _check_runtime(match, spec, plan)
    except NoMatch as e:
        result.reason = str(e)
        if hf.untested_transformers() and isinstance(e, PatternMismatch):
            import transformers

            result.reason = f"not recognised for transformers {transformers.__version__} (untested release): {e}"
        log.info("megamoe: %s not fused: %s", plan.name, result.reason)
        return result
    if not plan.eager_fused:
        _rewrite(gm, match, marker, plan)
    result.fused, result.kernel, result.recipe = True, plan.kernel, plan.recipe
    result.notes = list(plan.notes)
    torch._dynamo.utils.counters["megamoe"]["fused_moe"] += 1
    log.info("megamoe: fused %s -> megamoe.fused_moe (kernel %s, recipe %s)", plan.name, plan.kernel, plan.recipe)
    return result


def _check_already_fused(graph: fx.Graph, experts_key: str, block, plan: prep.LayerPlan) -> None:
    region = _region(graph, experts_key)
    ex = _match_sequence(region, patterns.EXPERTS_ALREADY_FUSED, "experts")
    op = ex["op"]
    _expect(op.target in (torch.ops.megamoe.fused_moe, torch.ops.megamoe.fused_moe.default),
            "experts call another op than megamoe.fused_moe")
    _expect(op.args[1] is ex["ids32"] and op.args[2] is ex["weights32"], "fused op does not take the routed ids/weights")
    experts = block.experts
    _expect(_is_tensor(op.args[3], experts.megamoe_w1) and _is_tensor(op.args[5], experts.megamoe_w2),
            "fused op does not use this layer's prepared weights")


def _marker(graph: fx.Graph, experts_key: str, plan: prep.LayerPlan) -> fx.Node:
    """The layer's `megamoe.prepared_weights` call: where its kernel-ready weights enter the graph.

    Its constants were read (and guarded) by dynamo from the plan when the graph was traced; they
    must be the current plan's, or the graph was traced for another one."""
    markers = [n for n in _region(graph, experts_key) if _is_marker(n)]
    if len(markers) != 1:
        raise NoMatch("the traced experts code does not carry this layer's prepared weights "
                      f"({len(markers)} megamoe.prepared_weights calls); call mc.prepare(model, config) "
                      "before compiling")
    marker = markers[0]
    traced = tuple(marker.args[4:9])
    planned = (plan.kernel, plan.recipe, plan.group_name, plan.shared_batch, plan.generation)
    if traced != planned:
        raise NoMatch(f"the graph was traced for kernel/recipe/group {traced}, the layer is now planned for "
                      f"{planned}")
    return marker


@dataclass
class _Match:
    experts: dict[str, fx.Node]
    router: dict[str, fx.Node]
    experts_region: list[fx.Node]
    hidden: fx.Node
    w1: fx.Node
    w2: fx.Node
    swiglu_limit: object  # a float, or the graph node that holds it


def _match(graph: fx.Graph, block, experts_key: str, spec: hf.MoESpec) -> _Match:
    experts_region = [n for n in _region(graph, experts_key) if not _is_marker(n)]
    router_region = _region(graph, str(id(block.gate)))
    for node in _region(graph, str(id(block))):
        if not _is_marker(node) and _has_side_effects(node):
            raise NoMatch(f"the MoE block calls {_op_name(node)} ({node.name}), which returns no tensor and may "
                          "change tensors in place (a hook?); the fused op could not see that change")
    if not experts_region:
        raise NoMatch("the experts' code is not in this graph (a graph break inside the MoE block?)")
    if not router_region:
        raise NoMatch("the router's code is not in this graph (a graph break inside the MoE block?)")

    ex = _match_sequence(experts_region, patterns.EXPERTS[spec.traced_implementation], "experts")
    ro = _match_sequence(router_region, patterns.router_pattern(spec.router, spec.scoring_func), "router")

    # Region boundary: only the final output may be read outside the experts region.
    outside = set(experts_region)
    for node in experts_region:
        if node is ex["out"] or _is_shape_arithmetic(node):  # dynamo shares size expressions
            continue
        for user in node.users:
            if user not in outside:
                raise NoMatch(f"an intermediate of the experts ({node.name}) is used outside them")

    _check_router(ro, block, spec)
    hidden, w1, w2, limit = _check_experts(ex, ro, block, spec)
    return _Match(ex, ro, experts_region, hidden, w1, w2, limit)


def _region(graph: fx.Graph, key: str) -> list[fx.Node]:
    return [n for n in graph.nodes
            if n.op not in ("placeholder", "get_attr", "output") and key in (n.meta.get("nn_module_stack") or {})]


def _match_sequence(region: list[fx.Node], pattern, what: str) -> dict[str, fx.Node]:
    ops = [n for n in region if not _is_shape_arithmetic(n)]
    names = [_op_name(n) for n in ops]
    for i, (role, op) in enumerate(pattern):
        allowed = (op,) if isinstance(op, str) else op
        if i >= len(names) or names[i] not in allowed:
            got = names[i] if i < len(names) else "end of region"
            raise PatternMismatch(f"{what} code differs from the known pattern at op {i}: traced {got!r}, "
                          f"expected {'|'.join(allowed)!r}")
    if len(names) > len(pattern):
        raise PatternMismatch(f"{what} code has extra ops after the known pattern: {names[len(pattern):][:4]}")
    return {role: node for (role, _), node in zip(pattern, ops) if role}


def _check_router(ro: dict[str, fx.Node], block, spec: hf.MoESpec) -> None:
    gate = block.gate
    _expect(_is_tensor(ro["logits"].args[1], gate.weight), "router logits do not use gate.weight")
    _expect(len(ro["logits"].args) == 2 or ro["logits"].args[2] is None, "router linear has a bias")
    scores, logits = ro["scores"], ro["logits"]
    if spec.scoring_func == "sqrtsoftplus":
        softplus = scores.args[0]
        _expect(_op_name(softplus) == "softplus" and softplus.args == (logits,) and not softplus.kwargs,
                "scores are not sqrt(softplus(logits))")
    else:
        _expect(scores.args[0] is logits, f"scores are not {spec.scoring_func}(logits)")
    if spec.scoring_func == "softmax":
        _expect(_dim_arg(scores, 1) in (-1, 1), "softmax scores not over the experts dim")
    if spec.router == "topk":
        biased, topk = ro["biased"], ro["topk"]
        _expect(biased.args[0] is scores and _is_tensor(biased.args[1], gate.e_score_correction_bias),
                "top-k is not taken over scores + e_score_correction_bias")
        _expect(topk.args[0] is biased and _const(topk.args[1]) == spec.top_k
                and _dim_arg(topk, 2, "dim", -1) in (-1, 1), f"top-k is not over experts with k={spec.top_k}")
        _expect(ro["indices"].args == (topk, 1), "indices are not top-k's indices")
    else:
        lookup = ro["lookup"]
        _expect(_is_tensor(lookup.args[0], gate.tid2eid) and lookup.args[1] is ro["ids_flat"],
                "hash routing is not tid2eid[input_ids]")
        _expect(ro["indices"].args[0] is lookup, "hash indices do not come from tid2eid")
    picked, total, den, norm, scaled = (ro[k] for k in ("picked", "total", "denominator", "normalized", "scaled"))
    _expect(picked.args[0] is scores and _const(picked.args[1]) in (1, -1) and picked.args[2] is ro["indices"],
            "routing weights are not the scores gathered at the indices")
    _expect(total.args[0] is picked and _dim_arg(total, 1, "dim") in (-1, 1), "weights are not normalised over top-k")
    _expect(den.args[0] is total and norm.args == (picked, den), "weights are not divided by their sum")
    eps = _const(den.args[1])
    _expect(eps is not None and 0 <= eps <= 1e-6, "unexpected epsilon in weight normalisation")
    # The multiply by routed_scaling_factor stays in the graph (the op takes the scaled weights), so
    # whatever value it has at run time - a constant or a graph input - is the one used.
    _expect(scaled.args[0] is norm and len(scaled.args) == 2 and _is_scalar(scaled.args[1]),
            "routing weights are not scaled by a scalar (routed_scaling_factor)")


def _check_experts(ex: dict[str, fx.Node], ro: dict[str, fx.Node], block, spec: hf.MoESpec):
    experts = block.experts
    k = spec.top_k
    _expect(ex["weights_flat"].args[0] is ro["scaled"], "experts do not receive the router's weights")
    _expect(ex["ids_flat"].args[0] is ro["indices"], "experts do not receive the router's indices")
    g_hi = None
    if spec.traced_implementation == "grouped_mm":
        hidden, offsets, _ = _check_sorted_dispatch(ex, spec)
        w1, w2 = ex["w1_t"].args[0], ex["w2_t"].args[0]
        for mm, cast, source, w_t in ((ex["mm1"], ex["rows_cast"], ex["rows"], ex["w1_t"]),
                                      (ex["mm2"], ex["act_cast"], ex["swiglu"], ex["w2_t"])):
            _expect(tuple(_const(a) for a in w_t.args[1:]) in ((-2, -1), (-1, -2), (1, 2), (2, 1)),
                    "expert weights are not transposed to [E, K, N]")
            _expect(cast.args[0] is source and mm.args[0] is cast and mm.args[1] is w_t,
                    "a grouped matmul reads other activations or weights")
            offs = mm.kwargs.get("offs", mm.args[2] if len(mm.args) > 2 else None)
            _expect(offs is offsets and mm.kwargs.get("bias") is None, "a grouped matmul is not grouped by these offsets")
        _expect(ex["chunk"].args[0] is ex["mm1"], "gate/up split is not of the first matmul's output")
        col = ex["weights_col"]
        _expect(col.args[0] is ex["weights_sorted"] and _dim_arg(col, 1, "dim") == -1
                and set(ex["weighted"].args) == {ex["mm2"], col}, "down projection is not multiplied by the routing weights")
        _check_restored_order(ex)
    elif spec.traced_implementation == "fp8_grouped_mm":
        hidden, w1, w2 = _check_finegrained_grouped(ex, experts, spec)
    else:
        hidden = ex["rows"].args[0]
        _expect(_const(ex["rows"].args[1]) == k and _dim_arg(ex["rows"], 2, "dim") == 0,
                "tokens are not repeated top_k times")
        w1, w2 = ex["w1_sel"].args[0], ex["w2_sel"].args[0]
        _expect(ex["w1_sel"].args[1] is ex["ids_flat"] and ex["w2_sel"].args[1] is ex["ids_flat"],
                "expert weights are not selected by the routed ids")
        for mm, col, source, sel, out in ((ex["mm1"], ex["rows_col"], ex["rows"], ex["w1_sel"], ex["mm1_out"]),
                                          (ex["mm2"], ex["act_col"], ex["swiglu"], ex["w2_sel"], ex["mm2_out"])):
            _expect(col.args[0] is source and mm.args == (sel, col) and out.args[0] is mm,
                    "a batched matmul reads other activations or weights")
        _expect(ex["chunk"].args[0] is ex["mm1_out"], "gate/up split is not of the first matmul's output")
        col = ex["weights_col"]
        _expect(col.args[0] is ex["weights_flat"] and set(ex["weighted"].args) == {ex["mm2_out"], col},
                "down projection is not multiplied by the routing weights")
        _expect(ex["per_slot"].args[0] is ex["weighted"], "combine does not read the weighted rows")
    _expect(_is_tensor(w1, experts.gate_up_proj) and _is_tensor(w2, experts.down_proj),
            "expert matmuls do not use gate_up_proj/down_proj")
    chunk = ex["chunk"]
    _expect(_const(chunk.args[1]) == 2 and _dim_arg(chunk, 2, "dim", 0) in (-1, 1), "gate/up split is not chunk(2, -1)")
    _expect(ex["gate"].args == (chunk, 0) and ex["up"].args == (chunk, 1), "gate/up halves swapped")
    gc, uc = ex["gate_clamp"], ex["up_clamp"]
    _expect(gc.args[0] is ex["gate"] and uc.args[0] is ex["up"], "clamps are not on gate/up")
    (g_lo, g_hi), (u_lo, u_hi) = _clamp_args(gc), _clamp_args(uc)
    # SwiGLU clamp: gate clamped above by the limit, up to [-limit, limit]. The limit is taken from
    # the graph (a constant, or a graph input under dynamic shapes) and handed to the op.
    _expect(g_lo is None and _is_scalar(g_hi) and _same_scalar(u_hi, g_hi) and _is_negation(u_lo, g_hi),
            "clamps are not gate.clamp(max=limit), up.clamp(-limit, limit)")
    _expect(ex["silu"].args[0] is gc and set(ex["swiglu"].args) == {ex["silu"], uc}, "activation is not silu(gate) * up")
    per_slot, combine = ex["per_slot"], ex["combine"]
    _expect(_const(per_slot.args[2] if len(per_slot.args) > 2 else None) == k, "combine does not view [T, top_k, H]")
    _expect(combine.args[0] is per_slot and _dim_arg(combine, 1, "dim") == 1, "combine does not sum over top_k")
    _expect(ex["out"].args[0] is combine, "the experts' output is not the combined sum")
    return hidden, w1, w2, g_hi


def _check_finegrained_grouped(ex: dict[str, fx.Node], experts, spec: hf.MoESpec):
    """Dataflow and constants of `fp8_grouped_mm_experts_forward` (transformers' FP8Experts).

    Every edge the fused op's semantics rely on is checked: rows sorted by expert and mapped back
    to tokens by perm // top_k, per-expert counts over exactly num_experts bins, both matmuls on
    this module's own weights and scales (the tensors `layouts.source_weights` reads), the kernel
    op that matches the weight format, the routing weights applied to the down projection, and
    the inverse permutation before the per-token sum.
    """
    hidden, offsets, counts = _check_sorted_dispatch(ex, spec)
    rows = ex["rows"]

    expected_op = patterns.FINEGRAINED_GROUPED_MATMULS[spec.weight_format]
    s1, s2 = hf.fp8_expert_scales(experts)
    hidden_value = hidden.meta.get("example_value")
    for mm, source, weight, scale in ((ex["mm1"], rows, experts.gate_up_proj, s1),
                                      (ex["mm2"], ex["swiglu"], experts.down_proj, s2)):
        _expect(_op_name(mm) == expected_op and _op_namespace(mm).startswith(patterns.FINEGRAINED_FP8_NAMESPACE),
                f"expert matmul is {_op_namespace(mm)}::{_op_name(mm)}, not the finegrained-fp8 {expected_op} "
                f"that {spec.weight_format} weights take")
        _expect(not mm.kwargs, "expert matmul has keyword arguments")
        _expect(mm.args[0] is source, "expert matmul reads the wrong activations")
        _expect(_is_tensor(mm.args[1], weight) and _is_tensor(mm.args[2], scale),
                "expert matmul does not use this module's weights and scale_inv")
        _expect(mm.args[3] is offsets and mm.args[4] is counts, "expert matmul is not grouped by these offsets")
        rest = list(mm.args[5:])
        if spec.weight_format == "fp8":
            _expect(bool(rest) and _int_list(rest.pop(0)) == list(hf.FP8_BLOCK),
                    f"FP8 expert matmul block size is not {list(hf.FP8_BLOCK)}")
        out_dtype = rest.pop(0) if rest else None
        _expect(not rest and (out_dtype is None or (hidden_value is not None and out_dtype == hidden_value.dtype)),
                "expert matmul output dtype is not the activations' dtype")
    _expect(ex["chunk"].args[0] is ex["mm1"], "gate/up split is not of the first matmul's output")
    cast, col, weighted = ex["weights_cast"], ex["weights_col"], ex["weighted"]
    _expect(cast.args[0] is ex["weights_sorted"] and _dim_arg(col, 1, "dim") == -1 and col.args[0] is cast,
            "routing weights are not a column of the sorted weights")
    _expect(set(weighted.args) == {ex["mm2"], col} and len(weighted.args) == 2,
            "down projection is not multiplied by the routing weights")
    _check_restored_order(ex)
    return hidden, ex["mm1"].args[1], ex["mm2"].args[1]


def _check_sorted_dispatch(ex: dict[str, fx.Node], spec: hf.MoESpec):
    """grouped_mm dispatch: rows sorted by expert id and mapped back to tokens by perm // top_k,
    routing weights permuted alike, per-expert counts over exactly num_experts bins and their
    int32 cumulative offsets. Returns (hidden, offsets, counts)."""
    k, num_experts = spec.top_k, spec.num_experts
    sort, perm, ids_sorted = ex["sort"], ex["perm"], ex["ids_sorted"]
    _expect(sort.args[0] is ex["ids_flat"] and _dim_arg(sort, 1, "dim", -1) in (-1, 0)
            and not sort.kwargs.get("descending", False) and not (len(sort.args) > 2 and sort.args[2]),
            "experts are not sorted ascending by routed id")
    _expect(ids_sorted.args == (sort, 0) and perm.args == (sort, 1), "sort outputs used the wrong way round")
    token_of_row, rows = ex["token_of_row"], ex["rows"]
    _expect(token_of_row.args[0] is perm and _const(token_of_row.args[1]) == k,
            "row -> token map is not perm // top_k")
    _expect(len(rows.args) == 2 and rows.args[1] is token_of_row, "rows are not hidden[perm // top_k]")
    hidden = rows.args[0]
    _expect(ex["weights_sorted"].args == (ex["weights_flat"], perm), "routing weights are not permuted like the rows")
    histc_input, counts, offsets = ex["histc_input"], ex["counts"], ex["offsets"]
    _expect(histc_input.args[0] is ids_sorted, "expert counts are not over the sorted ids")
    bins = counts.kwargs.get("bins", counts.args[1] if len(counts.args) > 1 else None)
    lo = counts.kwargs.get("min", counts.args[2] if len(counts.args) > 2 else None)
    hi = counts.kwargs.get("max", counts.args[3] if len(counts.args) > 3 else None)
    _expect(counts.args[0] is histc_input and _const(bins) == num_experts and _const(lo) == 0
            and _const(hi) == num_experts - 1, f"expert counts are not histc over {num_experts} experts")
    _expect(offsets.args[0] is counts and _dim_arg(offsets, 1, "dim", None) == 0,
            "expert offsets are not the cumulative counts")
    _expect(offsets.kwargs.get("dtype") == torch.int32, "expert offsets are not int32")

    return hidden, offsets, counts


def _check_restored_order(ex: dict[str, fx.Node]) -> None:
    """grouped_mm combine: weighted rows put back in token order through inv[perm] = arange."""
    perm, weighted = ex["perm"], ex["weighted"]
    inv_perm, positions, scatter, unsorted = ex["inv_perm"], ex["positions"], ex["scatter"], ex["unsorted"]
    _expect(inv_perm.args[0] is perm and scatter.args == (inv_perm, perm, positions),
            "inverse permutation is not inv[perm] = arange")
    _expect(len(positions.args) == 1 and _same_size(positions.args[0], perm),
            "inverse permutation does not cover every row")
    _expect(unsorted.args == (weighted, inv_perm), "rows are not restored to token order")
    _expect(ex["per_slot"].args[0] is unsorted, "combine does not read the restored rows")


def _same_size(arg, node: fx.Node) -> bool:
    """Whether `arg` (an int or a SymInt node) is the length of `node`'s 1-D value."""
    value = node.meta.get("example_value")
    if value is None or value.dim() != 1:
        return False
    size = value.shape[0]
    if isinstance(arg, fx.Node):
        arg = arg.meta.get("example_value")
    if isinstance(arg, int) and isinstance(size, int):
        return arg == size
    return isinstance(arg, torch.SymInt) and isinstance(size, torch.SymInt) and str(arg) == str(size)


def _op_namespace(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0]
    return ""


def _int_list(arg):
    if isinstance(arg, (list, tuple)):
        values = [_const(a) for a in arg]
        return values if all(isinstance(v, int) for v in values) else None
    return None


def _check_runtime(match: _Match, spec: hf.MoESpec, plan: prep.LayerPlan) -> None:
    hidden = match.hidden.meta.get("example_value")
    if hidden is None:
        raise NoMatch("hidden states have no example value")
    if torch.is_grad_enabled():  # dynamo guards on grad mode: a no_grad call recompiles and fuses
        requires = [n for n in (match.hidden, match.w1, match.w2, match.router["scaled"])
                    if getattr(n.meta.get("example_value"), "requires_grad", False)]
        if requires:
            raise NoMatch("gradients are enabled and required; the fused op is inference-only "
                          "(run under torch.no_grad() or torch.inference_mode())")
    weight = match.w1.meta.get("example_value")
    if plan.recipe == "none" and weight is not None and weight.dtype != hidden.dtype:
        # transformers casts the activations to the weights' dtype; the op computes in x's.
        raise NoMatch(f"the experts hold {weight.dtype} weights but run on {hidden.dtype} activations")
    if hidden.device.type != spec.device.type:
        raise NoMatch(f"hidden states on {hidden.device}, experts prepared for {spec.device}")
    if plan.kernel != "reference" and hidden.dtype != torch.bfloat16:
        raise NoMatch(f"{plan.kernel} takes bfloat16 activations, this layer runs in {hidden.dtype}")


# -- rewrite ----------------------------------------------------------------------------------

def _rewrite(gm: fx.GraphModule, match: _Match, marker: fx.Node, plan: prep.LayerPlan) -> None:
    graph = gm.graph
    ex, ro = match.experts, match.router
    out = ex["out"]
    w1, s1, w2, s2 = marker.args[:4]  # the layer's kernel-ready weights, as graph inputs
    kernel, recipe, group_name, shared_batch = marker.args[4:8]
    with graph.inserting_before(out):
        idx = graph.call_method("to", (ro["indices"], torch.int32))
        wts = graph.call_method("to", (ro["scaled"], torch.float32))
        fused = graph.call_function(
            torch.ops.megamoe.fused_moe.default,
            (match.hidden, idx, wts, w1, s1, w2, s2),
            {"kernel": kernel, "recipe": recipe, "routed_scaling_factor": 1.0,
             "swiglu_limit": match.swiglu_limit, "group_name": group_name, "shared_batch": shared_batch},
        )
    for new in (idx, wts, fused):
        new.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack", {}))
    fused.meta["example_value"] = out.meta.get("example_value")
    out.replace_all_uses_with(fused)
    for node in reversed(match.experts_region):
        if not node.users:  # shape arithmetic that later code shares stays
            graph.erase_node(node)


# -- node helpers -----------------------------------------------------------------------------

_OPERATORS = {operator.getitem: "getitem", operator.mul: "mul", operator.floordiv: "floordiv",
              operator.truediv: "truediv", operator.add: "add", operator.setitem: "setitem",
              operator.neg: "neg", operator.sub: "sub"}


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target in _OPERATORS:
            return _OPERATORS[node.target]
        if isinstance(node.target, torch._ops.OpOverload):  # ns::name.overload -> name
            return node.target.overloadpacket.__name__
        name = getattr(node.target, "__name__", None) or str(node.target)
        return name.split(".")[-1]
    return node.op


def _returns_tensor(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return any(isinstance(v, torch.Tensor) for v in (value if isinstance(value, (tuple, list)) else (value,)))


def _is_shape_arithmetic(node: fx.Node) -> bool:
    """Nodes that compute no tensor: SymInt/SymFloat plumbing that dynamic shapes add (sizes,
    `.item()` of a float attribute) and host-side queries transformers makes while tracing (on
    CUDA, `torch.cuda.get_device_capability()` before each grouped matmul). The patterns speak of
    tensor operations only; in-place `setitem`, which returns None, is one of them."""
    if node.op == "call_function" and node.target is operator.setitem:
        return False
    return not _returns_tensor(node) and not _has_side_effects(node)


# Calls that return no tensor and are known to change nothing: host queries transformers makes
# while tracing (device capability before a grouped matmul, the finegrained-fp8 kernel loader).
_PURE_HOST_CALLS = ("get_device_capability", "_load_finegrained_fp8_kernel", "is_compiling",
                    "is_torchdynamo_compiling")
_PURE_METHODS = ("size", "stride", "dim", "numel", "item", "get_device", "storage_offset", "__getitem__")


def _has_side_effects(node: fx.Node) -> bool:
    """A node that returns no tensor and is not known to be pure: a custom op returning nothing
    (it can only act through side effects, e.g. changing its inputs in place), or an unknown
    callable. SymInt arithmetic (operator.*, math.*, torch.sym_*) is pure."""
    if node.op not in ("call_function", "call_method", "call_module") or _returns_tensor(node):
        return False
    if node.op == "call_method":
        return node.target not in _PURE_METHODS
    if node.op == "call_module":
        return True
    target = node.target
    if target is operator.setitem:
        return False  # in-place on a tensor: the patterns name it where transformers does it
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return not _is_marker(node) and _op_namespace(node) not in ("aten", "prims")
    module = getattr(target, "__module__", "") or ""
    if module in ("_operator", "operator", "math", "builtins") or module.startswith("torch.fx.experimental"):
        return False
    name = getattr(target, "__name__", "")
    if name.startswith("sym_") or name in _PURE_HOST_CALLS:
        return False
    return True


def _real_tensor(node: fx.Node) -> torch.Tensor | None:
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None)
    return example if isinstance(example, torch.Tensor) else None


def _is_tensor(arg, tensor: torch.Tensor) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "placeholder" and _real_tensor(arg) is tensor


def _const(arg):
    """The Python value of a literal, or of a float attribute that dynamic shapes lifted to an input."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg
    if isinstance(arg, fx.Node):
        if arg.op == "call_method" and arg.target == "item" and arg.args[0].op == "placeholder":
            value = _real_tensor(arg.args[0])
            return None if value is None else value.item()
        if arg.op == "call_function" and arg.target in (operator.neg, torch.neg):
            inner = _const(arg.args[0])
            return None if inner is None else -inner
    return None


def _dim_arg(node: fx.Node, position: int, name: str = "dim", default=None):
    if len(node.args) > position:
        return _const(node.args[position])
    return _const(node.kwargs.get(name, default))


def _clamp_args(node: fx.Node):
    """(min, max) arguments of a clamp as traced: None, a number, or a node."""
    return tuple(node.kwargs.get(name, node.args[position] if len(node.args) > position else None)
                 for position, name in ((1, "min"), (2, "max")))


def _is_scalar_node(arg) -> bool:
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return isinstance(value, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(value, bool)


def _is_scalar(arg) -> bool:
    return (isinstance(arg, (int, float)) and not isinstance(arg, bool)) or _is_scalar_node(arg)


def _same_scalar(a, b) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return _is_scalar(a) and _is_scalar(b) and float(a) == float(b)


def _is_negation(a, b) -> bool:
    """Whether `a` is -`b` (numbers, or a neg node of `b`)."""
    if isinstance(b, fx.Node):
        return (isinstance(a, fx.Node) and a.op == "call_function" and a.target in (operator.neg, torch.neg)
                and a.args[0] is b)
    return _is_scalar(a) and not isinstance(a, fx.Node) and float(a) == -float(b)


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)
