"""Snapshots of rewritten graphs: what a reviewer sees of one fused layer."""

from __future__ import annotations

import torch
from expecttest import TestCase

import megamoe_compile as mc
from conftest import eager_backend, input_ids, tiny_model


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
flat_2 = .view(residual_1, -1, 64)
flat_3 = .reshape(residual_1, -1, 64)
logits_1 = linear(flat_3, ...s_mlp_modules_gate_parameters_weight_)
softplus_1 = softplus(logits_1)
scores_3 = .sqrt(softplus_1)
add_62 = add(scores_3, ...gate_buffers_e_score_correction_bias_)
topk = topk(add_62, 2, dim=-1, sorted=False)
indices_1 = getitem(topk, 1)
weights_3 = .gather(scores_3, 1, indices_1)
sum_19 = .sum(weights_3, dim=-1, keepdim=True)
add_63 = add(sum_19, 1e-20)
weights_4 = truediv(weights_3, add_63)
weights_5 = mul(weights_4, 1.5)
to_64 = .to(indices_1, torch.int32)
to_65 = .to(weights_5, torch.float32)
fused_moe_default_1 = megamoe.fused_moe.default(flat_2, to_64, to_65, ...ules_experts_parameters_gate_up_proj_, None, ...modules_experts_parameters_down_proj_, None, kernel='reference', recipe='none', routed_scaling_factor=1.0, swiglu_limit=10.0, group_name='', shared_batch=False)
routed_1 = .view(fused_moe_default_1, 2, 5, 64)
linear_17 = linear(residual_1, ..._modules_gate_proj_parameters_weight_, None)
gate_5 = .clamp(linear_17, max=10.0)
linear_18 = linear(residual_1, ...ts_modules_up_proj_parameters_weight_, None)
up_5 = .clamp(linear_18, min=-10.0, max=10.0)
silu_3 = silu(gate_5)
mul_72 = mul(silu_3, up_5)
linear_19 = linear(mul_72, ..._modules_down_proj_parameters_weight_, None)
mlp_output_1 = add(routed_1, linear_19)""")

    def test_hash_layer_batched_mm_fp8_weights(self):
        model = tiny_model(layers=1, hash_layers=1, impl="batched_mm", hidden=128, intermediate=128)
        graph = _compile(model, eager_backend(kernel="reference", recipe="fp8"))
        self.assertExpectedInline(graph.layer_code("model.layers.0.mlp"), """\
flat = .view(residual, -1, 128)
flat_1 = .reshape(residual, -1, 128)
logits = linear(flat_1, ...s_mlp_modules_gate_parameters_weight_)
softplus = softplus(logits)
scores_1 = .sqrt(softplus)
reshape_7 = .reshape(l_args_0_, -1)
getitem_43 = getitem(...les_mlp_modules_gate_buffers_tid2eid_, reshape_7)
indices = .long(getitem_43)
weights = .gather(scores_1, 1, indices)
sum_9 = .sum(weights, dim=-1, keepdim=True)
add_31 = add(sum_9, 1e-20)
weights_1 = truediv(weights, add_31)
weights_2 = mul(weights_1, 1.5)
to_35 = .to(indices, torch.int32)
to_36 = .to(weights_2, torch.float32)
fused_moe_default = megamoe.fused_moe.default(flat, to_35, to_36, ...p_modules_experts_buffers_megamoe_w1_, ...les_experts_buffers_megamoe_w1_scale_, ...p_modules_experts_buffers_megamoe_w2_, ...les_experts_buffers_megamoe_w2_scale_, kernel='reference', recipe='fp8', routed_scaling_factor=1.0, swiglu_limit=10.0, group_name='', shared_batch=False)
routed = .view(fused_moe_default, 2, 5, 128)
linear_7 = linear(residual, ..._modules_gate_proj_parameters_weight_, None)
gate_2 = .clamp(linear_7, max=10.0)
linear_8 = linear(residual, ...ts_modules_up_proj_parameters_weight_, None)
up_2 = .clamp(linear_8, min=-10.0, max=10.0)
silu_1 = silu(gate_2)
mul_38 = mul(silu_1, up_2)
linear_9 = linear(mul_38, ..._modules_down_proj_parameters_weight_, None)
mlp_output = add(routed, linear_9)""")
