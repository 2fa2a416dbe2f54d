"""The patterns are data (operations and their dataflow); one checker reads them all."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from helpers import input_ids, tiny_model

import megamoe_compile as mc
from megamoe_compile.passes import fuse_moe, patterns
from megamoe_compile.passes.fx_utils import region
from megamoe_compile.passes.matcher import PatternMismatch, match

ALL_PATTERNS = {**{f"experts {k}": v for k, v in patterns.EXPERTS.items()},
                "experts already fused": patterns.EXPERTS_ALREADY_FUSED,
                **{f"router {kind} {fn}": patterns.router_pattern(kind, fn)
                   for kind in ("topk", "hash") for fn in patterns.SCORES}}


@pytest.mark.parametrize("name", list(ALL_PATTERNS))
def test_every_edge_names_an_earlier_step_or_an_input(name):
    seen: set[str] = set()
    for step in ALL_PATTERNS[name]:
        for role in (*step.args, *(r for _, r in step.keywords)):
            assert role is None or role.startswith("$") or role in seen, (name, step.role, role)
        assert step.role not in seen, f"{name}: role {step.role} defined twice"
        seen.add(step.role)


def _compile_with(model, inspect_graph):
    """Compile `model` with a backend that hands dynamo's graph (markers and all, before any
    rewrite) to `inspect_graph(gm)` while dynamo still holds the graph's tensors."""
    def backend(gm, example_inputs):
        as_traced = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # what runs: `inspect_graph` may break gm
        inspect_graph(gm)
        return as_traced.forward

    mc.prepare(model, mc.MegaMoEConfig())
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(input_ids())


def test_a_changed_edge_is_named_and_the_layer_left_as_traced():
    model = tiny_model(layers=2)
    block = model.model.layers[1].mlp
    seen = {}

    def change_an_edge_then_fuse(gm):
        nodes = [n for n in region(gm.graph, str(id(block.experts))) if not fuse_moe._is_marker(n)]
        roles = match(nodes, patterns.EXPERTS[("grouped_mm", "clamped_swiglu")], "experts")
        assert roles[patterns.W1] is roles["w1_t"].args[0]
        # The down projection now reads the gate/up weights: same operations, other dataflow.
        mm2 = roles["mm2"]
        mm2.args = (mm2.args[0], roles["w1_t"], *mm2.args[2:])
        with pytest.raises(PatternMismatch, match=r"experts: mm2 \(.*\) takes .* as argument 1, not w2_t"):
            match(nodes, patterns.EXPERTS[("grouped_mm", "clamped_swiglu")], "experts")
        seen["fusions"] = {f.name: f for f in fuse_moe.fuse_moe_layers(gm)}
        seen["code"] = gm.code

    _compile_with(model, change_an_edge_then_fuse)
    fusions = seen["fusions"]
    assert not fusions["model.layers.1.mlp"].fused
    assert "mm2" in fusions["model.layers.1.mlp"].reason and "w2_t" in fusions["model.layers.1.mlp"].reason
    assert fusions["model.layers.0.mlp"].fused  # the other layer is untouched by the change
    assert seen["code"].count("megamoe.fused_moe") == 1 and "prepared_weights" not in seen["code"]


def test_a_region_input_must_be_the_same_node_at_every_use():
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    negated = graph.call_function(torch.neg, (a,))
    same = graph.call_function(torch.add, (a, negated))
    other = graph.call_function(torch.add, (b, negated))
    for node in (negated, same, other):
        node.meta["example_value"] = torch.zeros(1)
    pattern = (patterns.step("negated", "neg", "$x"), patterns.step("total", "add", "$x", "negated"))
    assert match([negated, same], pattern, "toy")["$x"] is a
    with pytest.raises(PatternMismatch, match=r"toy: total \(add_1\) takes b as argument 0, not \$x \(a\)"):
        match([negated, other], pattern, "toy")
    commutative = (patterns.step("negated", "neg", "$x"),
                   patterns.step("total", "add", "negated", "$x", commutative=True))
    assert match([negated, same], commutative, "toy")["total"] is same
