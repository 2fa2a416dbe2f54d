"""Other Mixture-of-Experts families: their routed experts run through the same transformers
experts code as DeepSeek-V4's (stacked gate_up_proj/down_proj, SwiGLU, weighted top-k sum), so the
pass fuses them; their routers stay graph code. Families that do not fit are left unfused, with
the reason."""

from __future__ import annotations

import importlib

import pytest
import torch
from expecttest import TestCase
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig

import megamoe_compile as mc
from conftest import VOCAB, eager_backend, input_ids

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, head_dim=16)
_LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                         linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
# model_type -> (config fields, router kind the report names, number of MoE layers)
FAMILIES = {
    "deepseek_v3": (dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                         n_shared_experts=1, routed_scaling_factor=2.5, **_MLA), "sigmoid+bias grouped", 1),
    "deepseek_v2": (dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                         n_shared_experts=1, **_MLA), "softmax grouped", 1),
    "qwen3_moe": (dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True), "softmax", 2),
    "qwen2_moe": (dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=64), "softmax", 2),
    "qwen3_next": (dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=64,
                        **_LINEAR_ATTENTION), "softmax", 2),
    "glm4_moe": (dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                      n_shared_experts=1), "sigmoid+bias", 1),
    "minimax_m2": (dict(num_local_experts=8, num_experts_per_tok=2), "sigmoid+bias", 2),
    "mixtral": (dict(num_local_experts=8, num_experts_per_tok=2), "softmax", 2),
    "olmoe": (dict(num_experts=8, num_experts_per_tok=2), "softmax", 2),
}


def family_model(model_type: str, *, dtype=torch.float32, impl="grouped_mm", seed=0, **fields):
    config_fields, _, _ = FAMILIES.get(model_type, ({}, "", 0))
    config = AutoConfig.for_model(model_type, **{**COMMON, **config_fields, **fields})
    if impl is not None:  # models without transformers' experts interface refuse the setting
        config._experts_implementation = impl
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # random routing biases (zeros at init), so routing varies across layers
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    return model


def _compile_and_compare(model, *, dynamic=False, atol=2e-5, rtol=1e-4, ids=None, fullgraph=True):
    ids = input_ids() if ids is None else ids
    be = eager_backend()
    with torch.no_grad():
        expected = model(ids).logits
        mc.prepare(model, be.config)
        got = torch.compile(model, backend=be, dynamic=dynamic, fullgraph=fullgraph)(ids).logits
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    return be


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_family_fuses_each_moe_layer_and_matches_eager(model_type, impl):
    model = family_model(model_type, impl=impl)
    be = _compile_and_compare(model)
    _, router, layers = FAMILIES[model_type]
    assert [f.fused for f in be.fusions] == [True] * layers, [f.reason for f in be.fusions]
    (graph,) = be.graphs
    assert graph.code.count("torch.ops.megamoe.fused_moe.default(") == layers
    for plan in mc.layer_plans(model):
        assert plan.spec.family == model_type and plan.spec.activation == "swiglu"
        assert plan.spec.router_kind == router, plan.spec.router_kind


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_family_dynamic_shapes_and_bf16(model_type):
    model = family_model(model_type)
    be = _compile_and_compare(model, dynamic=True, ids=input_ids(batch=3, seq=7))
    assert all(f.fused for f in be.fusions)
    model = family_model(model_type, dtype=torch.bfloat16)
    be = _compile_and_compare(model, atol=5e-2, rtol=5e-2)
    assert all(f.fused for f in be.fusions)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_generate_with_static_cache_and_the_megamoe_backend_gives_eager_tokens(model_type):
    """transformers' own static cache and auto-compile (CUDA graphs on a GPU), with megamoe."""
    model = family_model(model_type)
    ids = input_ids(batch=2, seq=4)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    mc.prepare(model)
    # The rest of the graph as traced (fast on 2 cores); the README's CompileConfig(backend="megamoe")
    # compiles it with inductor and CUDA graphs.
    compile_config = CompileConfig(backend=eager_backend(), mode="default", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers auto-compiles on GPUs only; here on CPU too
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                             compile_config=compile_config)
    assert torch.equal(got, expected)
    layers = FAMILIES[model_type][2]
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] >= layers  # the decode graph is fused


class TestRewrittenFamilyLayer(TestCase):
    def test_qwen3_moe_softmax_router_stays_graph_code(self):
        """One fused layer of a family whose router stays graph code: the op takes its ids and weights."""
        be = _compile_and_compare(family_model("qwen3_moe"))
        self.assertExpectedInline(be.graphs[0].layer_code("model.layers.1.mlp"), """\
hidden_states_reshaped_1 = .view(hidden_states_24, -1, 64)
hidden_states_25 = .reshape(hidden_states_reshaped_1, -1, 64)
router_logits_1 = linear(hidden_states_25, ...s_mlp_modules_gate_parameters_weight_)
router_probs_1 = softmax(router_logits_1, dtype=torch.float32, dim=-1)
topk_1 = topk(router_probs_1, 2, dim=-1)
router_top_value_3 = getitem(topk_1, 0)
router_indices_1 = getitem(topk_1, 1)
sum_3 = .sum(router_top_value_3, dim=-1, keepdim=True)
router_top_value_4 = itruediv(router_top_value_3, sum_3)
router_top_value_5 = .to(router_top_value_4, torch.float32)
to_31 = .to(router_indices_1, torch.int32)
to_32 = .to(router_top_value_5, torch.float32)
fused_moe_default_1 = megamoe.fused_moe.default(hidden_states_reshaped_1, to_31, to_32, ...ules_experts_parameters_gate_up_proj_, None, ...modules_experts_parameters_down_proj_, None, kernel='reference', recipe='none', routed_scaling_factor=1.0, swiglu_limit=None, group_name='', shared_batch=False)
hidden_states_26 = .reshape(fused_moe_default_1, 2, 5, 64)""")

    def test_deepseek_v3_sigmoid_grouped_router_stays_graph_code(self):
        be = _compile_and_compare(family_model("deepseek_v3"))
        self.assertExpectedInline(be.graphs[0].layer_code("model.layers.1.mlp"), """\
hidden_states_23 = .view(hidden_states_22, -1, 64)
type_1 = .type(hidden_states_23, torch.float32)
type_2 = .type(...s_mlp_modules_gate_parameters_weight_, torch.float32)
router_logits = linear(type_1, type_2)
scores = .sigmoid(router_logits)
scores_for_choice = add(scores, ...gate_buffers_e_score_correction_bias_)
view_9 = .view(scores_for_choice, -1, 2, 4)
topk = .topk(view_9, 2, dim=-1)
getitem_29 = getitem(topk, 0)
group_scores = .sum(getitem_29, dim=-1)
topk_1 = topk(group_scores, k=1, dim=-1, sorted=False)
group_idx = getitem(topk_1, 1)
group_mask = zeros_like(group_scores)
scatter_ = .scatter_(group_mask, 1, group_idx, 1)
unsqueeze_5 = .unsqueeze(group_mask, -1)
expand_2 = .expand(unsqueeze_5, -1, 2, 4)
score_mask = .reshape(expand_2, -1, 8)
bool_1 = .bool(score_mask)
invert = invert(bool_1)
scores_for_choice_1 = .masked_fill(scores_for_choice, invert, -inf)
topk_2 = topk(scores_for_choice_1, k=2, dim=-1, sorted=False)
topk_indices = getitem(topk_2, 1)
topk_weights = .gather(scores, 1, topk_indices)
sum_2 = .sum(topk_weights, dim=-1, keepdim=True)
denominator = add(sum_2, 1e-20)
topk_weights_1 = itruediv(topk_weights, denominator)
topk_weights_2 = mul(topk_weights_1, 2.5)
hidden_states_24 = .view(hidden_states_22, -1, 64)
to_24 = .to(topk_indices, torch.int32)
to_25 = .to(topk_weights_2, torch.float32)
fused_moe_default = megamoe.fused_moe.default(hidden_states_24, to_24, to_25, ...ules_experts_parameters_gate_up_proj_, None, ...modules_experts_parameters_down_proj_, None, kernel='reference', recipe='none', routed_scaling_factor=1.0, swiglu_limit=None, group_name='', shared_batch=False)
hidden_states_25 = .view(fused_moe_default, 2, 5, 64)
linear_14 = linear(hidden_states_22, ..._modules_gate_proj_parameters_weight_, None)
silu_2 = silu(linear_14)
linear_15 = linear(hidden_states_22, ...ts_modules_up_proj_parameters_weight_, None)
mul_39 = mul(silu_2, linear_15)
down_proj_1 = linear(mul_39, ..._modules_down_proj_parameters_weight_, None)
hidden_states_26 = add(hidden_states_25, down_proj_1)""")


UNFIT = {
    "gpt_oss": (dict(num_local_experts=8, num_experts_per_tok=2), "experts have biases"),
    "llama4_text": (dict(num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                         intermediate_size_mlp=128), "multiplies the experts' input by the routing weights"),
    "longcat_flash": (dict(n_routed_experts=4, zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=32,
                           ffn_hidden_size=64, num_layers=1, **_MLA), "zero-compute (identity) experts"),
}


@pytest.mark.parametrize("model_type", list(UNFIT))
def test_families_that_do_not_fit_are_left_unfused_with_the_reason(model_type):
    fields, reason = UNFIT[model_type]
    model = family_model(model_type, impl=None, **fields)
    be = _compile_and_compare(model, fullgraph=False)  # some loop over experts in Python: graph breaks
    plans = mc.layer_plans(model)
    assert plans and all(not p.fuse and reason in p.reason for p in plans), [p.reason for p in plans]
    assert be.graphs and not any("megamoe.fused_moe" in g.code for g in be.graphs)
    assert {f.name for f in be.fusions if not f.fused} <= {p.name for p in plans} and not any(f.fused for f in be.fusions)


def test_a_replaced_gate_function_is_left_unfused():
    model = family_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts._apply_gate = lambda gate_up: torch.nn.functional.gelu(gate_up.chunk(2, -1)[0]) * gate_up.chunk(2, -1)[1]
    be = _compile_and_compare(model)
    fusions = {f.name: f for f in be.fusions}
    assert not fusions["model.layers.0.mlp"].fused and "gating function" in fusions["model.layers.0.mlp"].reason
    assert fusions["model.layers.1.mlp"].fused


def test_report_names_family_router_and_activation():
    model = family_model("minimax_m2")
    report = mc.explain(model, input_ids())
    text = str(report)
    assert "minimax_m2" in text and "sigmoid+bias" in text and "swiglu" in text


def fp8_family_checkpoint(path, model_type: str):
    """A family's FP8 block-quantized checkpoint as the Qwen/GLM/MiniMax/DeepSeek-V3 FP8 releases ship
    them: every linear (and per-expert projection) in float8_e4m3fn 128x128 blocks with float32
    `weight_scale_inv`; embeddings, head, norms and the router as they are."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    from test_quantized_checkpoints import _fp8_blocks

    dense = family_model(model_type, hidden_size=256, moe_intermediate_size=128, head_dim=64)
    dense.save_pretrained(path)
    tensors = {}
    for key, value in load_file(path / "model.safetensors").items():
        if key.endswith(".weight") and value.dim() == 2 and not re.search(r"(embed|head|gate\.weight|norm)", key):
            tensors[key], tensors[key[: -len("weight")] + "weight_scale_inv"] = _fp8_blocks(value, False)
        else:
            tensors[key] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    return dense


def test_fp8_checkpoint_of_a_family_is_fused_as_it_is(tmp_path, monkeypatch):
    """transformers' fine-grained FP8 experts (FP8Experts, no clamp): prepare keeps their FP8 values."""
    from transformers.integrations import finegrained_fp8 as tf8
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    from test_quantized_checkpoints import _STANDIN_OPS, _kernel

    dense = fp8_family_checkpoint(tmp_path, "qwen3_moe")
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)  # as on a GPU
    monkeypatch.setattr(tf8, "_FINEGRAINED_FP8", _kernel(_STANDIN_OPS))  # a CPU stand-in for the hub kernel
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    experts = model.model.layers[0].mlp.experts
    assert type(experts) is tf8.FP8Experts and experts.gate_up_proj.dtype == torch.float8_e4m3fn
    be = _compile_and_compare(model, atol=1e-3, rtol=1e-3)
    assert [(f.fused, f.traced_as, f.recipe) for f in be.fusions] == [(True, "fp8_grouped_mm", "fp8")] * 2
    from megamoe_compile import layer_state

    w1, w1_scale, _, _ = layer_state.kernel_weights(experts).tensors().values()
    assert torch.equal(w1.view(torch.uint8), experts.gate_up_proj.view(torch.uint8))  # the checkpoint's values
    assert torch.equal(w1_scale, experts.gate_up_proj_scale_inv.float())
    with torch.no_grad():
        ids = input_ids()
        quantization_error = (model(ids).logits - dense(ids).logits).abs().max()
    assert quantization_error > 1e-3  # the comparison above is against the quantized model, not the dense one
