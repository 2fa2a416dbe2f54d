"""Snapshots of rewritten graphs: what a reviewer sees of one fused layer."""

from __future__ import annotations

import torch
from expecttest import TestCase
from helpers import eager_backend, input_ids, tiny_model

import megamoe_compile as mc


def _compile(model, be, *, dynamic=False):
    mc.prepare(model, be.config)
    with torch.no_grad():
        torch.compile(model, backend=be, dynamic=dynamic, fullgraph=True)(input_ids())
    (graph,) = be.graphs
    return graph


class TestRewrittenGraph(TestCase):
    def setUp(self):
        torch._dynamo.reset()

    def test_top_k_layer_grouped_mm(self):
        graph = _compile(tiny_model(layers=2), eager_backend())
        self.assertExpectedInline(graph.layer_code("model.layers.1.mlp"), """\
flat = .view(residual, -1, 64)
flat_1 = .reshape(residual, -1, 64)
logits = linear(flat_1, ...s_mlp_modules_gate_parameters_weight_)
softplus = softplus(logits)
scores = .sqrt(softplus)
add = add(scores, ...gate_buffers_e_score_correction_bias_)
topk = topk(add, 2, dim=-1, sorted=False)
indices = getitem(topk, 1)
weights = .gather(scores, 1, indices)
sum = .sum(weights, dim=-1, keepdim=True)
add_1 = add(sum, 1e-20)
weights_1 = truediv(weights, add_1)
weights_2 = mul(weights_1, 1.5)
to = .to(indices, torch.int32)
to_1 = .to(weights_2, torch.float32)
fused_moe_default = megamoe.fused_moe.default(flat, to, to_1, ...ules_experts_parameters_gate_up_proj_, None, ...modules_experts_parameters_down_proj_, None, kernel='reference', recipe='none', routed_scaling_factor=1.0, swiglu_limit=10.0, group_name='', shared_batch=False)
routed = .view(fused_moe_default, 2, 5, 64)
linear = linear(residual, ..._modules_gate_proj_parameters_weight_, None)
gate = .clamp(linear, max=10.0)
linear_1 = linear(residual, ...ts_modules_up_proj_parameters_weight_, None)
up = .clamp(linear_1, min=-10.0, max=10.0)
silu = silu(gate)
mul = mul(silu, up)
linear_2 = linear(mul, ..._modules_down_proj_parameters_weight_, None)
mlp_output = add(routed, linear_2)""")

    def test_hash_layer_batched_mm_fp8_weights(self):
        model = tiny_model(layers=1, hash_layers=1, impl="batched_mm", hidden=128, intermediate=128)
        graph = _compile(model, eager_backend(kernel="reference", recipe="fp8"))
        self.assertExpectedInline(graph.layer_code("model.layers.0.mlp"), """\
flat = .view(residual, -1, 128)
flat_1 = .reshape(residual, -1, 128)
logits = linear(flat_1, ...s_mlp_modules_gate_parameters_weight_)
softplus = softplus(logits)
scores = .sqrt(softplus)
reshape = .reshape(l_args_0_, -1)
getitem = getitem(...les_mlp_modules_gate_buffers_tid2eid_, reshape)
indices = .long(getitem)
weights = .gather(scores, 1, indices)
sum = .sum(weights, dim=-1, keepdim=True)
add = add(sum, 1e-20)
weights_1 = truediv(weights, add)
weights_2 = mul(weights_1, 1.5)
to = .to(indices, torch.int32)
to_1 = .to(weights_2, torch.float32)
fused_moe_default = megamoe.fused_moe.default(flat, to, to_1, ...p_modules_experts_buffers_megamoe_w1_, ...les_experts_buffers_megamoe_w1_scale_, ...p_modules_experts_buffers_megamoe_w2_, ...les_experts_buffers_megamoe_w2_scale_, kernel='reference', recipe='fp8', routed_scaling_factor=1.0, swiglu_limit=10.0, group_name='', shared_batch=False)
routed = .view(fused_moe_default, 2, 5, 128)
linear = linear(residual, ..._modules_gate_proj_parameters_weight_, None)
gate = .clamp(linear, max=10.0)
linear_1 = linear(residual, ...ts_modules_up_proj_parameters_weight_, None)
up = .clamp(linear_1, min=-10.0, max=10.0)
silu = silu(gate)
mul = mul(silu, up)
linear_2 = linear(mul, ..._modules_down_proj_parameters_weight_, None)
mlp_output = add(routed, linear_2)""")


def test_layer_code_does_not_depend_on_where_the_layer_is_traced():
    """Names are numbered within the layer: the same layer code reads the same at another depth."""
    two = _compile(tiny_model(layers=2), eager_backend()).layer_code("model.layers.1.mlp")
    three = _compile(tiny_model(layers=3), eager_backend()).layer_code("model.layers.2.mlp")
    assert two.replace("layers_1_", "layers_X_") == three.replace("layers_2_", "layers_X_")
    assert "fused_moe" in two
