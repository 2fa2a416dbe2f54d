"""Other Mixture-of-Experts families: their routed experts run through the same transformers
experts code as DeepSeek-V4's (stacked gate_up_proj/down_proj, SwiGLU, weighted top-k sum), so the
pass fuses them; their routers stay graph code. Families that do not fit are left unfused, with
the reason."""

from __future__ import annotations

import pytest
import torch
from expecttest import TestCase
from helpers import _MLA, FAMILIES, eager_backend, family_model, input_ids
from transformers import AutoModelForCausalLM, CompileConfig

import megamoe_compile as mc


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
    for fusion in be.fusions:  # the router as the traced graph shows it
        assert fusion.router_kind == router, fusion.router_kind


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
hidden_states_reshaped = .view(hidden_states, -1, 64)
hidden_states_1 = .reshape(hidden_states_reshaped, -1, 64)
router_logits = linear(hidden_states_1, ...s_mlp_modules_gate_parameters_weight_)
router_probs = softmax(router_logits, dtype=torch.float32, dim=-1)
topk = topk(router_probs, 2, dim=-1)
router_top_value = getitem(topk, 0)
router_indices = getitem(topk, 1)
sum = .sum(router_top_value, dim=-1, keepdim=True)
router_top_value_1 = itruediv(router_top_value, sum)
router_top_value_2 = .to(router_top_value_1, torch.float32)
to = .to(router_indices, torch.int32)
to_1 = .to(router_top_value_2, torch.float32)
fused_moe_default = megamoe.fused_moe.default(hidden_states_reshaped, to, to_1, ...ules_experts_parameters_gate_up_proj_, None, ...modules_experts_parameters_down_proj_, None, kernel='reference', recipe='none', routed_scaling_factor=1.0, swiglu_limit=None, group_name='', shared_batch=False)
hidden_states_2 = .reshape(fused_moe_default, 2, 5, 64)""")

    def test_deepseek_v3_sigmoid_grouped_router_stays_graph_code(self):
        be = _compile_and_compare(family_model("deepseek_v3"))
        self.assertExpectedInline(be.graphs[0].layer_code("model.layers.1.mlp"), """\
hidden_states_1 = .view(hidden_states, -1, 64)
type = .type(hidden_states_1, torch.float32)
type_1 = .type(...s_mlp_modules_gate_parameters_weight_, torch.float32)
router_logits = linear(type, type_1)
scores = .sigmoid(router_logits)
scores_for_choice = add(scores, ...gate_buffers_e_score_correction_bias_)
view = .view(scores_for_choice, -1, 2, 4)
topk = .topk(view, 2, dim=-1)
getitem = getitem(topk, 0)
group_scores = .sum(getitem, dim=-1)
topk_1 = topk(group_scores, k=1, dim=-1, sorted=False)
group_idx = getitem(topk_1, 1)
group_mask = zeros_like(group_scores)
scatter_ = .scatter_(group_mask, 1, group_idx, 1)
unsqueeze = .unsqueeze(group_mask, -1)
expand = .expand(unsqueeze, -1, 2, 4)
score_mask = .reshape(expand, -1, 8)
bool = .bool(score_mask)
invert = invert(bool)
scores_for_choice_1 = .masked_fill(scores_for_choice, invert, -inf)
topk_2 = topk(scores_for_choice_1, k=2, dim=-1, sorted=False)
topk_indices = getitem(topk_2, 1)
topk_weights = .gather(scores, 1, topk_indices)
sum = .sum(topk_weights, dim=-1, keepdim=True)
denominator = add(sum, 1e-20)
topk_weights_1 = itruediv(topk_weights, denominator)
topk_weights_2 = mul(topk_weights_1, 2.5)
hidden_states_2 = .view(hidden_states, -1, 64)
to = .to(topk_indices, torch.int32)
to_1 = .to(topk_weights_2, torch.float32)
fused_moe_default = megamoe.fused_moe.default(hidden_states_2, to, to_1, ...ules_experts_parameters_gate_up_proj_, None, ...modules_experts_parameters_down_proj_, None, kernel='reference', recipe='none', routed_scaling_factor=1.0, swiglu_limit=None, group_name='', shared_batch=False)
hidden_states_3 = .view(fused_moe_default, 2, 5, 64)
linear = linear(hidden_states, ..._modules_gate_proj_parameters_weight_, None)
silu = silu(linear)
linear_1 = linear(hidden_states, ...ts_modules_up_proj_parameters_weight_, None)
mul = mul(silu, linear_1)
down_proj = linear(mul, ..._modules_down_proj_parameters_weight_, None)
hidden_states_4 = add(hidden_states_3, down_proj)""")


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
    if model_type == "longcat_flash" and not hasattr(model.model.layers[0].mlp.experts, "zero_expert_num"):
        # transformers 5.25 routes the identity experts in the block (weight 0 for the experts module,
        # the identity added outside it): what remains is plain SwiGLU experts, which are fused, exactly.
        be = _compile_and_compare(model, fullgraph=False)
        assert be.fusions and all(f.fused for f in be.fusions), [f.reason for f in be.fusions]
        return
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


def test_an_act_fn_that_is_the_silu_function_is_fused():  # LFM2-MoE holds F.silu, not a module
    model = family_model("qwen3_moe")
    for layer in model.model.layers:
        del layer.mlp.experts.act_fn  # a child module: replaced by a plain attribute
        layer.mlp.experts.act_fn = torch.nn.functional.silu
    be = _compile_and_compare(model)
    assert be.fusions and all(f.fused for f in be.fusions)


class _ClampedSwiGLU(torch.nn.Module):
    """A family's experts class with its own clamped-SwiGLU `_apply_gate` (as HY-V4 and GLM-5-Next
    define it): the pass fuses it when its traced ops are exactly that, and says why not otherwise."""

    swiglu_limit = 0.05  # small enough that the tiny model's activations do reach it

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return torch.nn.functional.silu(gate) * up


class _AlphaGate(_ClampedSwiGLU):
    swiglu_alpha = 1.702


class _OtherGate(_ClampedSwiGLU):
    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate.clamp(max=self.swiglu_limit)) * (up + 1)


def _with_experts_class(model, mixin):
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.__class__ = type(f"Own{type(experts).__name__}", (mixin, type(experts)), {})
    return model


@pytest.mark.parametrize("mixin, fused, reason", [
    (_ClampedSwiGLU, True, ""),
    (_AlphaGate, False, "sigmoid(swiglu_alpha * gate)"),
    (_OtherGate, False, "differs from the known pattern"),
])
def test_a_family_with_its_own_clamped_swiglu(mixin, fused, reason):
    model = _with_experts_class(family_model("qwen3_moe"), mixin)
    be = _compile_and_compare(model)
    assert [f.fused for f in be.fusions] == [fused, fused], [f.reason for f in be.fusions]
    assert all(reason in f.reason for f in be.fusions), [f.reason for f in be.fusions]


@pytest.mark.parametrize("change, reason", [
    (lambda e: delattr(e, "act_fn"), "have no act_fn"),
    (lambda e: setattr(e, "gate_up_proj", None), "hold no stacked gate_up_proj"),
])
def test_experts_of_another_structure_are_left_unfused_with_the_reason(change, reason):
    model = family_model("qwen3_moe")
    for layer in model.model.layers:
        change(layer.mlp.experts)
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference"))  # never raises on a structure
    plans = mc.layer_plans(model)
    assert plans and all(not p.fuse and reason in p.reason for p in plans), [p.reason for p in plans]


def test_report_names_family_router_and_activation():
    model = family_model("minimax_m2")
    report = mc.explain(model, input_ids())
    text = str(report)
    assert "minimax_m2" in text and "sigmoid+bias" in text and "swiglu" in text


def test_families_fuse_with_a_transformers_that_has_no_deepseek_v4(monkeypatch):
    """The other families need nothing of transformers' DeepSeek-V4 module: with none (an older or a
    trimmed transformers), prepare, the pass and the report still fuse them."""
    from megamoe_compile.models import deepseek_v4

    monkeypatch.setattr(deepseek_v4, "v4_classes", lambda: None)
    model = family_model("qwen3_moe")
    be = _compile_and_compare(model)
    assert [f.fused for f in be.fusions] == [True, True], [f.reason for f in be.fusions]
    assert "2 of 2 MoE layers fused" in str(mc.explain(model, input_ids()))


def test_the_router_is_described_from_its_traced_ops_not_its_source():
    """A router whose class is unchanged but whose scoring is replaced (softmax -> sigmoid) is
    reported as what it computes, with the correction bias only where one feeds the top-k."""
    model = family_model("qwen3_moe")
    gate = model.model.layers[0].mlp.gate

    def sigmoid_forward(hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
        scores = logits.sigmoid()
        weights, ids = torch.topk(scores, gate.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), ids

    gate.forward = sigmoid_forward
    be = _compile_and_compare(model)
    assert [f.router_kind for f in be.fusions] == ["sigmoid", "softmax"], [f.router_kind for f in be.fusions]
    assert all(f.fused for f in be.fusions)


def test_a_greedy_router_over_groups_is_not_called_grouped_and_unfused_layers_name_their_router():
    """DeepSeek-V2's topk_method="greedy" ignores n_group; a layer the config skips still shows its router."""
    model = family_model("deepseek_v2", topk_method="greedy")
    report = mc.explain(model, input_ids(), config=mc.MegaMoEConfig(skip_layers=[1], inner_backend="eager"))
    (layer,) = report.layers
    assert not layer.fused and layer.router == "deepseek_v2 softmax k=2", layer.router


def fp8_family_checkpoint(path, model_type: str):
    """A family's FP8 block-quantized checkpoint as the Qwen/GLM/MiniMax/DeepSeek-V3 FP8 releases ship
    them: every linear (and per-expert projection) in float8_e4m3fn 128x128 blocks with float32
    `weight_scale_inv`; embeddings, head, norms and the router as they are."""
    import json
    import re

    from fp8_checkpoints import fp8_blocks
    from safetensors.torch import load_file, save_file

    dense = family_model(model_type, hidden_size=256, moe_intermediate_size=128, head_dim=64)
    dense.save_pretrained(path)
    tensors = {}
    for key, value in load_file(path / "model.safetensors").items():
        if key.endswith(".weight") and value.dim() == 2 and not re.search(r"(embed|head|gate\.weight|norm)", key):
            tensors[key], tensors[key[: -len("weight")] + "weight_scale_inv"] = fp8_blocks(value, False)
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
    from fp8_checkpoints import STANDIN_OPS, standin_kernel
    from transformers.integrations import finegrained_fp8 as tf8
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    dense = fp8_family_checkpoint(tmp_path, "qwen3_moe")
    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)  # as on a GPU
    monkeypatch.setattr(tf8, "_FINEGRAINED_FP8", standin_kernel(STANDIN_OPS))  # a CPU stand-in for the hub kernel
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
