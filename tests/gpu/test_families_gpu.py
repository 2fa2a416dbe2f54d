"""Other MoE families on DeepGEMM: the op with plain SwiGLU (no clamp, no routed scaling) at the
expert shapes of released models, and a small model of each family from tests/test_families.py
compiled with the megamoe backend. Run with ``pytest -m gpu tests/gpu``; skipped without
CUDA/DeepGEMM.

Accuracy measure: diff = 1 - 2 sum(x y) / sum(x^2 + y^2) (0 = identical).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import cos_diff, deepgemm_kernel_or_skip, op_diff
from helpers import FAMILIES, VOCAB, family_model  # tests/ is on sys.path (tests/conftest.py)

import megamoe_compile as mc
from megamoe_compile import models
from megamoe_compile.ops import deepgemm, quant
from megamoe_compile.ops.fused_moe import LayerShape, get_kernel
from megamoe_compile.ops.layouts import KernelWeights

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def deepgemm_kernel() -> str:
    kernel = deepgemm_kernel_or_skip()
    if kernel != deepgemm.SM90:
        pytest.skip("these tests run the SM90 kernel (recipe fp8)")
    return kernel


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------- the op alone


class SwigluLayer:
    """Random experts in FP8 128x128 blocks: the plain weights (for the float32 reference) and the
    kernel-ready ones. Plain SwiGLU, routing weights used as given (routed_scaling_factor 1.0):
    what the pass emits for the families whose router stays graph code."""

    def __init__(self, kernel: str, experts: int, hidden: int, intermediate: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.kernel, self.experts, self.hidden, self.intermediate = kernel, experts, hidden, intermediate
        bf16 = dict(device="cuda", dtype=torch.bfloat16, generator=g)
        # One bf16 tensor at a time (DeepSeek-V3: w1 alone is 15 GB in bf16).
        w1 = torch.randn(experts, 2 * intermediate, hidden, **bf16).mul_(2 / hidden**0.5)
        q1, s1 = quant.quantize_fp8_blocks(w1, experts_per_chunk=16)
        del w1
        w2 = torch.randn(experts, hidden, intermediate, **bf16).mul_(1 / intermediate**0.5)
        q2, s2 = quant.quantize_fp8_blocks(w2, experts_per_chunk=16)
        del w2
        torch.cuda.empty_cache()
        self.plain = KernelWeights(q1, s1, w2=q2, w2_scale=s2)
        self.ready = deepgemm.layout_weights(kernel, self.plain)

    def expert(self, which: str, e: int) -> torch.Tensor:
        w, s = (self.plain.w1, self.plain.w1_scale) if which == "w1" else (self.plain.w2, self.plain.w2_scale)
        return quant.dequantize_fp8_blocks(w[e], s[e]).float()

    def reference(self, x, topk_idx, topk_weights) -> torch.Tensor:
        """float32 routed MoE on the dequantized weights (activations unquantized), plain SwiGLU."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(topk_idx).tolist():
            token, slot = torch.where(topk_idx == e)
            gate, up = (x[token].float() @ self.expert("w1", e).T).chunk(2, dim=-1)
            h = F.silu(gate) * up
            out.index_add_(0, token, (h @ self.expert("w2", e).T) * topk_weights[token, slot, None])
        return out

    def spec(self, top_k: int) -> models.MoESpec:
        return models.MoESpec(name="test", layer_index=None, router="graph", scoring_func=None, top_k=top_k,
                          num_experts=self.experts, hidden=self.hidden, intermediate=self.intermediate,
                          routed_scaling_factor=None, swiglu_limit=None, experts_implementation="grouped_mm",
                          weight_format="dense", dtype=torch.bfloat16, device=torch.device("cuda", 0),
                          expert_parallel=False, experts_class="Experts", family="test")

    def __call__(self, x, topk_idx, topk_weights):
        r = self.ready
        return torch.ops.megamoe.fused_moe(x, topk_idx, topk_weights, r.w1, r.w1_scale, r.w2, r.w2_scale,
                                           self.kernel, "fp8", 1.0, None, "")


def softmax_routing(tokens: int, experts: int, top_k: int, seed: int):
    """Top-k of a softmax, renormalized (Qwen3-MoE / Mixtral style), float32 weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    probs = torch.randn(tokens, experts, device="cuda", generator=g).mul_(2).softmax(-1)
    weights, idx = probs.topk(top_k, dim=-1)
    return idx.to(torch.int32), (weights / weights.sum(-1, keepdim=True)).float()


FAMILY_SHAPES = {  # name -> (experts, hidden, moe_intermediate, top_k)
    "qwen3_30b_a3b": (128, 2048, 768, 8),
    "deepseek_v3": (256, 7168, 2048, 8),
    "glm45_air": (128, 4096, 1408, 8),
    "mixtral_8x7b": (8, 4096, 14336, 2),
}
TOKENS = (1, 32, 512)
# Shapes sgl-deep-gemm 0.1.5's SM90 MegaMoE refuses when its symmetric buffer is laid out (a TMA
# alignment assertion, measured on an H200): prepare leaves such layers unfused with this reason.
REFUSED = {"glm45_air": "num_bytes % 16 == 0"}
# Shapes refused before DeepGEMM sees them (its SM90 kernel asserts intermediate / 64 <= 64 at launch).
REFUSED_AT_PLAN = {"mixtral_8x7b": "takes moe_intermediate up to 4096"}
# Shape-major order, so each layer is built once (one at a time: DeepSeek-V3's is ~34 GB while quantizing).
CASES = [pytest.param(name, t, id=f"{name}-E{e}-H{h}-I{i}-k{k}-T{t}")
         for name, (e, h, i, k) in FAMILY_SHAPES.items() for t in TOKENS]

_LAYERS: dict = {}


def swiglu_layer(kernel: str, name: str) -> SwigluLayer:
    if name not in _LAYERS:
        _LAYERS.clear()
        torch.cuda.empty_cache()
        experts, hidden, intermediate, _ = FAMILY_SHAPES[name]
        _LAYERS[name] = SwigluLayer(kernel, experts, hidden, intermediate)
    return _LAYERS[name]


@pytest.fixture(scope="module", autouse=True)
def _free_layers():
    yield
    _LAYERS.clear()
    deepgemm.release_buffers()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("name, tokens", CASES)
def test_plain_swiglu_op_matches_float32_reference(deepgemm_kernel, name, tokens):
    experts, hidden, intermediate, top_k = FAMILY_SHAPES[name]
    if name in REFUSED_AT_PLAN:
        shape = LayerShape(experts, hidden, intermediate, top_k, torch.bfloat16, torch.device("cuda"))
        why = get_kernel(deepgemm_kernel).refuses(shape)
        print(f"\n[refused] {deepgemm_kernel} swiglu {name} E={experts} H={hidden} I={intermediate}: {why}")
        assert REFUSED_AT_PLAN[name] in why
        return
    lay = swiglu_layer(deepgemm_kernel, name)
    if name in REFUSED:  # refused at load time, clearly (never a wrong result)
        with pytest.raises(RuntimeError, match=re.escape(REFUSED[name])) as refused:
            deepgemm.reserve_buffer(deepgemm_kernel, lay.spec(top_k), max(TOKENS))
        print(f"\n[refused] {deepgemm_kernel} swiglu {name} E={experts} H={hidden} I={intermediate}: {refused.value}")
        return
    deepgemm.reserve_buffer(deepgemm_kernel, lay.spec(top_k), max(TOKENS))
    diff = op_diff(lay, tokens, hidden, *softmax_routing(tokens, experts, top_k, seed=tokens))
    print(f"\n[accuracy] {deepgemm_kernel} swiglu {name} E={experts} H={hidden} I={intermediate} k={top_k} "
          f"T={tokens}: diff {diff:.2e}")
    assert diff <= 2e-3


# --------------------------------------------------------------------------- small family models

# Sizes DeepGEMM takes (multiples of 128; the V4 GPU tests' proven E16-H512-I256 shape), top-2.
SMALL = dict(hidden_size=512, moe_intermediate_size=256, intermediate_size=256)
EXPERTS = 16
_EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_experts", "num_local_experts")
# OLMoE normalizes q/k over the whole projection (RMSNorm of hidden_size): heads x head_dim = hidden.
_PER_FAMILY = {"olmoe": dict(num_attention_heads=16, num_key_value_heads=16)}


def small_family_model(model_type: str, device) -> torch.nn.Module:
    """The family's tiny model of tests/test_families.py at DeepGEMM-sized experts, bf16 on `device`."""
    fields = FAMILIES[model_type][0]
    count = next(k for k in _EXPERT_COUNT_FIELDS if k in fields)
    model = family_model(model_type, dtype=torch.bfloat16, **SMALL, **{count: EXPERTS}, **_PER_FAMILY.get(model_type, {}))
    return model.to(device).requires_grad_(False)


def family_ids(device, batch: int = 4, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g).to(device)


def check_family_model(model_type: str, config: mc.MegaMoEConfig, device) -> dict:
    """Prepare + compile one family model; check every MoE layer is fused once on the planned
    kernel. Returns the logits diff vs eager HF and what was fused (the GPU test bounds them;
    the same function runs on CPU with the reference kernel as a dry run of this file)."""
    _, _, layers = FAMILIES[model_type]
    model = small_family_model(model_type, device)
    ids = family_ids(device)
    eager = model(ids).logits.float()
    mc.prepare(model, config)
    plans = mc.layer_plans(model)
    assert len(plans) == layers and all(p.fuse for p in plans), [p.reason for p in plans]
    for plan in plans:
        assert plan.spec.family == model_type and plan.spec.activation == "swiglu"
        if plan.kernel in deepgemm.KERNELS:
            deepgemm.reserve_buffer(plan.kernel, plan.spec, config.max_tokens_per_rank)  # no-op once prepare did
    be = mc.backend(config)
    out = torch.compile(model, backend=be)(ids).logits.float()
    fused = [f for f in be.fusions if f.fused]
    assert len(fused) == layers and len(be.fusions) == layers, [(f.name, f.fused, f.reason) for f in be.fusions]
    ops_in_graphs = sum(g.code.count("torch.ops.megamoe.fused_moe.default(") for g in be.graphs)
    assert ops_in_graphs == layers, ops_in_graphs
    kernels = sorted({p.kernel for p in plans})
    diff = cos_diff(out, eager)
    # Per position: a token whose top-k flips under FP8 noise is far off (random routers are
    # near ties); the median shows the noise of the rest.
    positions = torch.tensor([cos_diff(out[b, s], eager[b, s]) for b in range(out.shape[0]) for s in range(out.shape[1])])
    shape = {"hidden": plans[0].spec.hidden, "intermediate": plans[0].spec.intermediate,
             "experts": plans[0].spec.num_experts, "top_k": plans[0].spec.top_k}
    print(f"\n[model] {model_type} ({layers} MoE layers, {shape}, router {be.fusions[0].router_kind}) on "
          f"{kernels}/{plans[0].recipe} vs HF eager bf16 logits: diff {diff:.2e} "
          f"(per position: median {positions.median():.2e}, max {positions.max():.2e})")
    return {"diff": diff, "median_position_diff": float(positions.median()), "kernels": kernels, "layers": layers, "shape": shape}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_model_fused_on_deepgemm_matches_eager(deepgemm_kernel, fresh_dynamo, model_type):
    config = mc.MegaMoEConfig(kernel="deepgemm", inner_backend="eager", max_tokens_per_rank=256)
    result = check_family_model(model_type, config, "cuda")
    assert result["kernels"] == [deepgemm_kernel]
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == result["layers"]
    assert result["diff"] <= 2e-2  # FP8 weights and activations, as the V4 model tests
