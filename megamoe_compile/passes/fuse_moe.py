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
import math
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


class NoMatch(Exception):
    pass


def fuse_moe_layers(gm: fx.GraphModule) -> list[LayerFusion]:
    """Rewrite `gm` in place; one LayerFusion per MoE layer the graph holds (fused or not)."""
    graph = gm.graph
    results = [_fuse_one(gm, block, key) for block, key in _moe_blocks_in(graph)]
    if any(r.fused for r in results):
        graph.lint()
        gm.recompile()
    return results


def _moe_blocks_in(graph: fx.Graph):
    """(block, experts nn_module_stack key) for each prepared MoE block whose experts the graph uses."""
    seen = set()
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        tensor = _real_tensor(node)
        if tensor is None:
            continue
        block = prep.block_for_weight(tensor)
        if block is None or id(block) in seen:
            continue
        seen.add(id(block))
        yield block, str(id(block.experts))


def unprepared_moe_weights(graph: fx.Graph) -> bool:
    """Whether the graph reads DeepSeek-V4 expert weights that `prepare` has not seen."""
    m = hf.v4_classes()
    if m is None:
        return False
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if any(cls is m.DeepseekV4Experts or getattr(cls, "__name__", None) == "DeepseekV4Experts"
               for _, cls in stack.values()):
            for arg in node.all_input_nodes:
                t = _real_tensor(arg) if arg.op == "placeholder" else None
                if t is not None and t.dim() == 3 and prep.block_for_weight(t) is None:
                    if arg.name.endswith("gate_up_proj_"):
                        return True
    return False


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
        match = _match(gm.graph, block, experts_key, spec)
        _check_runtime(match, spec, plan)
    except NoMatch as e:
        result.reason = str(e)
        log.info("megamoe: %s not fused: %s", plan.name, e)
        return result
    _rewrite(gm, match, block, plan)
    result.fused, result.kernel, result.recipe = True, plan.kernel, plan.recipe
    result.notes = list(plan.notes)
    torch._dynamo.utils.counters["megamoe"]["fused_moe"] += 1
    log.info("megamoe: fused %s -> megamoe.fused_moe (kernel %s, recipe %s)", plan.name, plan.kernel, plan.recipe)
    return result


@dataclass
class _Match:
    experts: dict[str, fx.Node]
    router: dict[str, fx.Node]
    experts_region: list[fx.Node]
    hidden: fx.Node
    w1: fx.Node
    w2: fx.Node


def _match(graph: fx.Graph, block, experts_key: str, spec: hf.MoESpec) -> _Match:
    experts_region = _region(graph, experts_key)
    router_region = _region(graph, str(id(block.gate)))
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
    hidden, w1, w2 = _check_experts(ex, ro, block, spec)
    return _Match(ex, ro, experts_region, hidden, w1, w2)


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
            raise NoMatch(f"{what} code differs from the known pattern at op {i}: traced {got!r}, "
                          f"expected {'|'.join(allowed)!r}")
    if len(names) > len(pattern):
        raise NoMatch(f"{what} code has extra ops after the known pattern: {names[len(pattern):][:4]}")
    return {role: node for (role, _), node in zip(pattern, ops) if role}


def _check_router(ro: dict[str, fx.Node], block, spec: hf.MoESpec) -> None:
    gate = block.gate
    _expect(_is_tensor(ro["logits"].args[1], gate.weight), "router logits do not use gate.weight")
    _expect(len(ro["logits"].args) == 2 or ro["logits"].args[2] is None, "router linear has a bias")
    scores = ro["scores"]
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
    _expect(scaled.args[0] is norm and _close(_const(scaled.args[1]), spec.routed_scaling_factor),
            f"routing weights are not scaled by routed_scaling_factor={spec.routed_scaling_factor}")


def _check_experts(ex: dict[str, fx.Node], ro: dict[str, fx.Node], block, spec: hf.MoESpec):
    experts = block.experts
    k = spec.top_k
    _expect(ex["weights_flat"].args[0] is ro["scaled"], "experts do not receive the router's weights")
    _expect(ex["ids_flat"].args[0] is ro["indices"], "experts do not receive the router's indices")
    if spec.traced_implementation == "grouped_mm":
        hidden = ex["rows"].args[0]
        _expect(_const(ex["token_of_row"].args[1]) == k, "row -> token map does not divide by top_k")
        w1, w2 = ex["w1_t"].args[0], ex["w2_t"].args[0]
        _expect(ex["mm1"].args[1] is ex["w1_t"] and ex["mm2"].args[1] is ex["w2_t"], "grouped matmuls use other weights")
    else:
        hidden = ex["rows"].args[0]
        _expect(_const(ex["rows"].args[1]) == k, "tokens are not repeated top_k times")
        w1, w2 = ex["w1_sel"].args[0], ex["w2_sel"].args[0]
        _expect(ex["w1_sel"].args[1] is ex["ids_flat"] and ex["w2_sel"].args[1] is ex["ids_flat"],
                "expert weights are not selected by the routed ids")
    _expect(_is_tensor(w1, experts.gate_up_proj) and _is_tensor(w2, experts.down_proj),
            "expert matmuls do not use gate_up_proj/down_proj")
    chunk = ex["chunk"]
    _expect(_const(chunk.args[1]) == 2 and _dim_arg(chunk, 2, "dim", 0) in (-1, 1), "gate/up split is not chunk(2, -1)")
    _expect(ex["gate"].args == (chunk, 0) and ex["up"].args == (chunk, 1), "gate/up halves swapped")
    limit = spec.swiglu_limit
    gc, uc = ex["gate_clamp"], ex["up_clamp"]
    _expect(gc.args[0] is ex["gate"] and uc.args[0] is ex["up"], "clamps are not on gate/up")
    _expect(_clamp_bounds(gc) == (None, limit), f"gate clamp is not clamp(max={limit})")
    _expect(_clamp_bounds(uc) == (None if limit is None else -limit, limit), f"up clamp is not clamp(+-{limit})")
    _expect(ex["silu"].args[0] is gc and set(ex["swiglu"].args) == {ex["silu"], uc}, "activation is not silu(gate) * up")
    per_slot, combine = ex["per_slot"], ex["combine"]
    _expect(_const(per_slot.args[2] if len(per_slot.args) > 2 else None) == k, "combine does not view [T, top_k, H]")
    _expect(combine.args[0] is per_slot and _dim_arg(combine, 1, "dim") == 1, "combine does not sum over top_k")
    return hidden, w1, w2


def _check_runtime(match: _Match, spec: hf.MoESpec, plan: prep.LayerPlan) -> None:
    hidden = match.hidden.meta.get("example_value")
    if hidden is None:
        raise NoMatch("hidden states have no example value")
    if torch.is_grad_enabled():  # dynamo guards on grad mode: a no_grad call recompiles and fuses
        requires = [n for n in (match.hidden, match.w1, match.w2)
                    if getattr(n.meta.get("example_value"), "requires_grad", False)]
        if requires:
            raise NoMatch("gradients are enabled and required; the fused op is inference-only "
                          "(run under torch.no_grad() or torch.inference_mode())")
    if hidden.device.type != spec.device.type:
        raise NoMatch(f"hidden states on {hidden.device}, experts prepared for {spec.device}")
    if plan.kernel != "reference" and hidden.dtype != torch.bfloat16:
        raise NoMatch(f"{plan.kernel} takes bfloat16 activations, this layer runs in {hidden.dtype}")


# -- rewrite ----------------------------------------------------------------------------------

def _rewrite(gm: fx.GraphModule, match: _Match, block, plan: prep.LayerPlan) -> None:
    graph = gm.graph
    ex, ro = match.experts, match.router
    out = ex["out"]
    weights = prep.kernel_weights(block.experts)
    with graph.inserting_before(out):
        if plan.recipe == "none":
            w1, s1, w2, s2 = match.w1, None, match.w2, None
        else:
            w1, s1, w2, s2 = (_constant(gm, plan, key, t) for key, t in weights.tensors().items())
        idx = graph.call_method("to", (ro["indices"], torch.int32))
        wts = graph.call_method("to", (ro["normalized"], torch.float32))
        fused = graph.call_function(
            torch.ops.megamoe.fused_moe.default,
            (match.hidden, idx, wts, w1, s1, w2, s2),
            {"kernel": plan.kernel, "recipe": plan.recipe,
             "routed_scaling_factor": plan.spec.routed_scaling_factor,
             "swiglu_limit": plan.spec.swiglu_limit, "group_name": ""},
        )
    for new in (idx, wts, fused):
        new.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack", {}))
    fused.meta["example_value"] = out.meta.get("example_value")
    out.replace_all_uses_with(fused)
    for node in reversed(match.experts_region):
        if not node.users:  # shape arithmetic that later code shares stays
            graph.erase_node(node)
    scaled = ro["scaled"]
    if not scaled.users:
        graph.erase_node(scaled)


def _constant(gm: fx.GraphModule, plan: prep.LayerPlan, key: str, tensor: torch.Tensor | None):
    if tensor is None:
        return None
    name = "megamoe_" + plan.name.replace(".", "_") + "_" + key
    if not hasattr(gm, name):
        gm.register_buffer(name, tensor, persistent=False)
    return gm.graph.get_attr(name)


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
        name = getattr(node.target, "__name__", None) or str(node.target)
        return name.split(".")[-1]
    return node.op


def _is_shape_arithmetic(node: fx.Node) -> bool:
    """SymInt/SymFloat plumbing (sizes, `.item()` of a float attribute) that dynamic shapes add."""
    value = node.meta.get("example_value")
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


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


def _clamp_bounds(node: fx.Node):
    """(min, max) of a clamp as floats (None = unbounded); "?" for a bound that is not a constant."""
    bounds = []
    for position, name in ((1, "min"), (2, "max")):
        bound = node.kwargs.get(name, node.args[position] if len(node.args) > position else None)
        value = None if bound is None else _const(bound)
        bounds.append(None if bound is None else ("?" if value is None else float(value)))
    return tuple(bounds)


def _close(a, b) -> bool:
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6)


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)
