"""Bad input gives clear errors; the op itself against an independent implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import input_ids, tiny_model

import megamoe_compile as mc


@pytest.mark.parametrize("fields, message", [
    (dict(kernel="cuda"), "MegaMoEConfig.kernel must be one of ['auto', 'reference', 'deepgemm'], got 'cuda'"),
    (dict(recipe="int4"), "MegaMoEConfig.recipe must be one of"),
    (dict(inner_backend="tvm"), "MegaMoEConfig.inner_backend must be one of ['inductor', 'aot_eager', 'eager']"),
    (dict(skip_layers=3), "MegaMoEConfig.skip_layers must be a sequence (list, tuple, range), got int: 3"),
    (dict(skip_layers=[-1]), "decoder-layer indices >= 0"),
    (dict(include="model.*"), "MegaMoEConfig.include must be a sequence"),
    (dict(filter_fn="yes"), "filter_fn must be callable"),
    (dict(max_tokens_per_rank=0), "max_tokens_per_rank must be a positive int"),
    (dict(ep_group=object()), "ep_group/ep_check_calls are set but ep_mode is 'none'"),
    (dict(ep_check_calls=True), "ep_group/ep_check_calls are set but ep_mode is 'none'"),
])
def test_invalid_config_values(fields, message):
    with pytest.raises(ValueError, match=None) as info:
        mc.MegaMoEConfig(**fields)
    assert message in str(info.value)


def test_unknown_compile_option_is_rejected_for_a_non_inductor_inner_backend():
    model = tiny_model(layers=1, hash_layers=0)
    with pytest.raises(Exception, match="neither MegaMoEConfig fields"), torch.no_grad():
        torch.compile(model, backend="megamoe", options={"inner_backend": "eager", "bogus": 1})(input_ids())


def test_forcing_deepgemm_on_cpu_names_the_layer_and_the_constraint():
    model = tiny_model(layers=2)
    with pytest.raises(mc.UnsupportedLayerError) as info:
        mc.prepare(model, mc.MegaMoEConfig(kernel="deepgemm"))
    assert str(info.value).startswith("model.layers.0.mlp: kernel='deepgemm' cannot run this layer: ")
    assert "CUDA GPU" in str(info.value)


def test_forcing_a_recipe_on_a_shape_it_cannot_take():
    model = tiny_model(layers=1, hash_layers=0, hidden=64)
    with pytest.raises(mc.UnsupportedLayerError, match=r"model.layers.0.mlp: recipe 'fp8' needs hidden size a multiple of 128, got 64"):
        mc.prepare(model, mc.MegaMoEConfig(kernel="reference", recipe="fp8"))


def test_a_failed_prepare_loses_nothing():
    model = tiny_model(layers=1, hash_layers=0, hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mc.UnsupportedLayerError):
        mc.prepare(model, mc.MegaMoEConfig(kernel="deepgemm"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        model(input_ids())  # still runs eagerly


# -- the op ----------------------------------------------------------------------------------

def _naive_moe(x, idx, weights, w1, w2, scale, limit):
    """Token by token, slot by slot: an implementation independent of the reference kernel."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = w1[e].double() @ x[t].double()
            gate, up = h[: h.numel() // 2].clamp(max=limit), h[h.numel() // 2:].clamp(-limit, limit)
            out[t] += weights[t, k].double() * scale * (w2[e].double() @ (F.silu(gate) * up))
    return out


def _random_layer(tokens=7, hidden=64, inter=32, experts=6, top_k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]
                      or [torch.empty(0, top_k, dtype=torch.long)]).int().reshape(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=g)
    w1 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    return x, idx, weights, w1, w2


@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_reference_op_matches_a_naive_loop(tokens):
    x, idx, weights, w1, w2 = _random_layer(tokens=tokens)
    got = torch.ops.megamoe.fused_moe(x, idx, weights, w1, None, w2, None, kernel="reference",
                                      recipe="none", routed_scaling_factor=1.5, swiglu_limit=0.5)
    expected = _naive_moe(x, idx, weights, w1, w2, 1.5, 0.5)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_w4a4_matches_a_naive_loop_on_fp4_activations():
    """recipe "fp4_fp4": MXFP4 weights, and each GEMM's input rounded to MXFP4 the way DeepGEMM's
    w4a4 kernel rounds it (staging: ties down; SwiGLU output: ties to even)."""
    from megamoe_compile.ops import quant

    x, idx, weights, w1, w2 = _random_layer(hidden=64, inter=64)
    (q1, s1), (q2, s2) = quant.quantize_mxfp4(w1), quant.quantize_mxfp4(w2)
    d1, d2 = quant.dequantize_mxfp4(q1, s1), quant.dequantize_mxfp4(q2, s2)
    got = torch.ops.megamoe.fused_moe(x, idx, weights, q1, s1, q2, s2, kernel="reference", recipe="fp4_fp4",
                                      routed_scaling_factor=1.5, swiglu_limit=0.5)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = quant.fake_quantize_mxfp4_activations(x[t:t + 1], ties="down")[0]
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = (d1[e] @ xt).double()
            gate, up = h[:64].clamp(max=0.5), h[64:].clamp(-0.5, 0.5)
            a = quant.fake_quantize_mxfp4_activations((F.silu(gate) * up).float()[None], ties="even")[0]
            expected[t] += weights[t, k].double() * 1.5 * (d2[e].double() @ a.double())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # FP4 activations are what set it apart from the FP8-activation recipe on the same weights.
    fp8_acts = torch.ops.megamoe.fused_moe(x, idx, weights, q1, s1, q2, s2, kernel="reference", recipe="fp8_fp4",
                                           routed_scaling_factor=1.5, swiglu_limit=0.5)
    assert not torch.allclose(got, fp8_acts, atol=1e-4)


def test_op_schema_fake_and_dispatch_pass_opcheck():
    x, idx, weights, w1, w2 = _random_layer()
    torch.library.opcheck(torch.ops.megamoe.fused_moe.default, (x, idx, weights, w1, None, w2, None),
                          dict(kernel="reference", recipe="none", routed_scaling_factor=1.0,
                               swiglu_limit=None, group_name=""))


@pytest.mark.parametrize("change, message", [
    (dict(idx=lambda t: t.long()), "topk_idx must be int32, got torch.int64"),
    (dict(weights=lambda t: t.half()), "topk_weights must be float32, got torch.float16"),
    (dict(x=lambda t: t[:3]), "7 tokens in x but"),
    (dict(x=lambda t: t[None]), "x must be [tokens, hidden]"),
])
def test_op_rejects_bad_inputs(change, message):
    x, idx, weights, w1, w2 = _random_layer()
    args = dict(x=x, idx=idx, weights=weights)
    args = {k: change.get(k, lambda t: t)(v) for k, v in args.items()}
    if "x" in change and change["x"](x).shape[0] == 3:
        args["x"], args["idx"], args["weights"] = x, idx[:3], weights[:3]
        message = "7 tokens in x but 3 in topk_idx"
    with pytest.raises(Exception) as info:
        torch.ops.megamoe.fused_moe(args["x"], args["idx"], args["weights"], w1, None, w2, None,
                                    kernel="reference", recipe="none", routed_scaling_factor=1.0,
                                    swiglu_limit=None)
    assert message in str(info.value)


def test_unknown_kernel_and_out_of_range_experts():
    x, idx, weights, w1, w2 = _random_layer()
    with pytest.raises(ValueError, match="unknown kernel 'triton'"):
        torch.ops.megamoe.fused_moe(x, idx, weights, w1, None, w2, None, kernel="triton", recipe="none",
                                    routed_scaling_factor=1.0, swiglu_limit=None)
    with pytest.raises(ValueError, match=r"expert id 9 outside \[0, 6\)"):
        torch.ops.megamoe.fused_moe(x, idx.clone().fill_(9), weights, w1, None, w2, None, kernel="reference",
                                    recipe="none", routed_scaling_factor=1.0, swiglu_limit=None)
