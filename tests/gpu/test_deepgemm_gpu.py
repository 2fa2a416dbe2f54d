"""DeepGEMM MegaMoE on a real GPU: the op against a float32 reference, and whole models compiled
with the megamoe backend. Run with ``pytest -m gpu tests/gpu``; skipped without CUDA/DeepGEMM.

Accuracy measure: diff = 1 - 2 sum(x y) / sum(x^2 + y^2) (0 = identical).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import cos_diff, deepgemm_kernel_or_skip, ids, op_diff, v4_model

import megamoe_compile as mc
from megamoe_compile.ops import deepgemm, quant
from megamoe_compile.ops.fused_moe import get_kernel
from megamoe_compile.ops.layouts import KernelWeights

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def deepgemm_kernel() -> str:
    return deepgemm_kernel_or_skip()

SCALE, LIMIT = 1.5, 10.0


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# --------------------------------------------------------------------------- the op alone


class Layer:
    """Random experts quantized to the kernel's recipe: the plain weights (for the reference) and
    the kernel-ready ones (after `layout_weights`)."""

    def __init__(self, kernel: str, experts: int, hidden: int, intermediate: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.kernel, self.experts, self.hidden, self.intermediate = kernel, experts, hidden, intermediate
        # std 4/sqrt(H): gate/up pre-activations of std ~4, so the swiglu clamp at 10 is exercised.
        bf16 = dict(device="cuda", dtype=torch.bfloat16, generator=g)
        w1 = torch.randn(experts, 2 * intermediate, hidden, **bf16).mul_(4 / hidden**0.5)
        w2 = torch.randn(experts, hidden, intermediate, **bf16).mul_(1 / intermediate**0.5)
        if kernel == deepgemm.SM90:
            (q1, s1), (q2, s2) = (quant.quantize_fp8_blocks(w, experts_per_chunk=16) for w in (w1, w2))
        else:
            (q1, s1), (q2, s2) = (quant.quantize_mxfp4(w, experts_per_chunk=16) for w in (w1, w2))
        del w1, w2
        self.plain = KernelWeights(q1, s1, w2=q2, w2_scale=s2)
        self.ready = deepgemm.layout_weights(kernel, self.plain)

    def expert(self, which: str, e: int) -> torch.Tensor:
        w, s = (self.plain.w1, self.plain.w1_scale) if which == "w1" else (self.plain.w2, self.plain.w2_scale)
        if self.kernel == deepgemm.SM90:
            return quant.dequantize_fp8_blocks(w[e], s[e]).float()
        return quant.dequantize_mxfp4(w[e], s[e]).float()

    def reference(self, x, topk_idx, topk_weights) -> torch.Tensor:
        """float32 routed MoE on the dequantized weights (activations unquantized)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(topk_idx).tolist():
            token, slot = torch.where(topk_idx == e)
            h = x[token].float() @ self.expert("w1", e).T
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate.clamp(max=LIMIT)) * up.clamp(-LIMIT, LIMIT)
            out.index_add_(0, token, (h @ self.expert("w2", e).T) * (topk_weights[token, slot, None] * SCALE))
        return out

    def spec(self, top_k: int):
        from megamoe_compile import models

        return models.MoESpec(name="test", layer_index=None, router="topk", scoring_func="sqrtsoftplus", top_k=top_k,
                          num_experts=self.experts, hidden=self.hidden, intermediate=self.intermediate,
                          routed_scaling_factor=SCALE, swiglu_limit=LIMIT, experts_implementation="grouped_mm",
                          weight_format="dense", dtype=torch.bfloat16, device=torch.device("cuda", 0),
                          expert_parallel=False)

    def __call__(self, x, topk_idx, topk_weights):
        r = self.ready
        return torch.ops.megamoe.fused_moe(x, topk_idx, topk_weights, r.w1, r.w1_scale, r.w2, r.w2_scale,
                                           self.kernel, get_kernel(self.kernel).default, SCALE, LIMIT, "")


def routing(tokens: int, experts: int, top_k: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(tokens, experts, device="cuda", generator=g)
    weights, idx = scores.topk(top_k, dim=-1)
    return idx.to(torch.int32), (weights / weights.sum(-1, keepdim=True)).float()


_LAYERS: dict = {}


def layer(kernel, experts, hidden, intermediate) -> Layer:
    key = (kernel, experts, hidden, intermediate)
    if key not in _LAYERS:
        _LAYERS.clear()  # one V4-Flash-sized layer at a time (about 20 GB while quantizing)
        torch.cuda.empty_cache()
        _LAYERS[key] = Layer(*key)
    return _LAYERS[key]


SHAPES = [  # (experts, hidden, intermediate, top_k, max tokens reserved)
    pytest.param(256, 4096, 2048, 6, 1024, id="v4flash-E256-H4096-I2048-k6"),
    pytest.param(16, 512, 256, 4, 1024, id="E16-H512-I256-k4"),
    pytest.param(32, 2048, 1024, 8, 1024, id="E32-H2048-I1024-k8"),
]


@pytest.mark.parametrize("tokens", [1, 7, 128, 1000])
@pytest.mark.parametrize("experts, hidden, intermediate, top_k, max_tokens", SHAPES)
def test_op_matches_float32_reference(deepgemm_kernel, experts, hidden, intermediate, top_k, max_tokens, tokens):
    lay = layer(deepgemm_kernel, experts, hidden, intermediate)
    deepgemm.reserve_buffer(deepgemm_kernel, lay.spec(top_k), max_tokens)
    diff = op_diff(lay, tokens, hidden, *routing(tokens, experts, top_k, seed=tokens))
    print(f"\n[accuracy] {deepgemm_kernel} E={experts} H={hidden} I={intermediate} k={top_k} T={tokens}: "
          f"diff {diff:.2e}")
    assert diff <= 2e-3


def test_op_replays_from_a_cuda_graph(deepgemm_kernel):
    lay = layer(deepgemm_kernel, 16, 512, 256)
    deepgemm.reserve_buffer(deepgemm_kernel, lay.spec(4), 1024)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    idx, weights = routing(64, 16, 4, seed=5)
    lay(x, idx, weights)  # warm-up (JIT compilation) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lay(x, idx, weights)
    for seed in (6, 7):
        x.copy_(torch.randn_like(x))
        new_idx, new_weights = routing(64, 16, 4, seed=seed)
        idx.copy_(new_idx)
        weights.copy_(new_weights)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, lay(x, idx, weights))  # bit-identical to an eager call


def test_zero_tokens_return_empty(deepgemm_kernel):
    lay = layer(deepgemm_kernel, 16, 512, 256)
    y = lay(torch.empty(0, 512, device="cuda", dtype=torch.bfloat16),
            torch.empty(0, 4, device="cuda", dtype=torch.int32), torch.empty(0, 4, device="cuda"))
    assert y.shape == (0, 512)


def test_too_many_tokens_raise_clearly(deepgemm_kernel):
    deepgemm.release_buffers()
    lay = layer(deepgemm_kernel, 16, 512, 256)
    deepgemm.reserve_buffer(deepgemm_kernel, lay.spec(4), 16)
    idx, weights = routing(17, 16, 4, seed=0)
    with pytest.raises(RuntimeError, match=r"MegaMoEConfig\.max_tokens_per_rank=16"):
        lay(torch.randn(17, 512, device="cuda", dtype=torch.bfloat16), idx, weights)
    deepgemm.release_buffers()


def test_private_group_leaves_the_default_group_alone(deepgemm_kernel):
    import torch.distributed as dist

    from megamoe_compile.ops import groups

    group = groups.resolve("", torch.device("cuda", 0))
    assert group.size() == 1 and group.rank() == 0
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- whole models


def reserve_for(model, config: mc.MegaMoEConfig) -> None:
    """What prepare() does once the lead wires it (a no-op where it already did)."""
    for plan in mc.layer_plans(model):
        if plan.fuse and plan.kernel in deepgemm.KERNELS:
            deepgemm.reserve_buffer(plan.kernel, plan.spec, config.max_tokens_per_rank)


def fused_layers(model) -> list[int]:
    return [p.layer_index for p in mc.layer_plans(model) if p.fuse]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_model_compiled_matches_eager_and_fuses_every_layer(deepgemm_kernel, fresh_dynamo):
    config = mc.MegaMoEConfig()
    model = v4_model()
    tokens = ids()
    eager = model(tokens).logits
    mc.prepare(model, config)
    reserve_for(model, config)
    report = mc.explain(model, tokens)
    print("\n" + str(report))
    assert [r.index for r in report.fused] == [0, 1, 2, 3]
    assert {r.kernel for r in report.fused} == {deepgemm_kernel}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="megamoe")
    out = compiled(tokens).logits
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 4
    diff = cos_diff(out, eager)
    print(f"[model] megamoe ({deepgemm_kernel}) vs HF eager bf16 logits: diff {diff:.2e}")
    assert diff <= 2e-2  # FP8 weights and activations in 4 MoE layers
    # The same compiled model on another batch of the same shape.
    other = ids(seed=2)
    assert cos_diff(compiled(other).logits, model(other).logits) <= 2e-2
    # Against the reference kernel emulating the same recipe (the same quantization of the same
    # weights, re-prepared; the backend never re-plans): the kernel's own error only.
    torch._dynamo.reset()
    emulation = mc.MegaMoEConfig(kernel="reference", recipe=get_kernel(deepgemm_kernel).default, inner_backend="eager")
    mc.prepare(model, emulation)
    emulated = torch.compile(model, backend=mc.backend(emulation))(tokens).logits
    diff_emulated = cos_diff(out, emulated)
    print(f"[model] megamoe ({deepgemm_kernel}) vs reference-kernel {get_kernel(deepgemm_kernel).default} emulation: "
          f"diff {diff_emulated:.2e}")
    # Not bit-matching: both quantize activations to FP8, with different rounding points, and the
    # random 4-layer model amplifies that noise (each op alone is ~1e-3 off float32, see above).
    assert diff_emulated <= 2e-2


def test_skipped_layers_stay_unfused(deepgemm_kernel, fresh_dynamo):
    config = mc.MegaMoEConfig(skip_layers=[0, 3], inner_backend="eager")  # eager: saves a compile
    model = v4_model()
    tokens = ids()
    eager = model(tokens).logits
    mc.prepare(model, config)
    reserve_for(model, config)
    assert fused_layers(model) == [1, 2]
    be = mc.backend(config)
    out = torch.compile(model, backend=be)(tokens).logits
    fused = sorted(f.layer_index for f in be.fusions if f.fused)
    assert fused == [1, 2]
    skipped = [f for f in be.fusions if not f.fused]
    assert skipped and all("skip_layers" in f.reason for f in skipped)
    diff = cos_diff(out, eager)
    print(f"\n[model] skip_layers=[0, 3] vs HF eager: diff {diff:.2e}")
    assert diff <= 2e-2


def test_reduce_overhead_and_fullgraph(deepgemm_kernel, fresh_dynamo):
    config = mc.MegaMoEConfig()
    model = v4_model()
    mc.prepare(model, config)
    reserve_for(model, config)
    compiled = torch.compile(model, backend="megamoe", mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3, 4):  # warm-up, record, then replays with new inputs
        tokens = ids(seed=seed)
        out = compiled(tokens).logits.clone()
        diff = cos_diff(out, model(tokens).logits)
        print(f"\n[model] reduce-overhead + fullgraph, call {seed}: diff {diff:.2e}")
        assert diff <= 2e-2
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 4


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_two_models_and_a_reload_each_run_their_own_weights(deepgemm_kernel, fresh_dynamo, mode):
    """Issue 13 on the GPU: the DeepGEMM kernel-ready weights are each model's own graph inputs
    (also as static inputs of CUDA graphs); load_state_dict rebuilds them; a weight changed in
    place is refused, not computed with."""
    config = mc.MegaMoEConfig(inner_backend="inductor")
    first, second = v4_model(seed=0), v4_model(seed=5)
    tokens = ids()
    eager = {0: first(tokens).logits, 5: second(tokens).logits}
    for model in (first, second):
        mc.prepare(model, config)
        reserve_for(model, config)
    diffs = {}
    for seed, model in ((0, first), (5, second), (0, first)):
        out = torch.compile(model, backend="megamoe", mode=mode)(tokens).logits.clone()
        diffs[seed] = cos_diff(out, eager[seed])
        assert diffs[seed] <= 2e-2, (seed, diffs[seed])
    assert cos_diff(eager[0], eager[5]) > 0.1  # the two models do differ
    # A checkpoint loaded after prepare and compile: the kernel-ready copies are rebuilt.
    first.load_state_dict(second.state_dict())
    reloaded = torch.compile(first, backend="megamoe", mode=mode)(tokens).logits.clone()
    diff_reload = cos_diff(reloaded, eager[5])
    print(f"\n[model] two models, mode={mode}: diffs {diffs}; after load_state_dict: {diff_reload:.2e}")
    assert diff_reload <= 2e-2
    # A weight changed in place: refused where the op runs Python; CUDA-graph replays run none, so
    # there the contract is "prepare again", which rebuilds into the same (captured) memory.
    compiled_second = torch.compile(second, backend="megamoe", mode=mode)
    with torch.no_grad():
        second.model.layers[2].mlp.experts.gate_up_proj.mul_(0.5)
    changed = second(tokens).logits
    if mode is None:
        with pytest.raises(RuntimeError, match="changed after prepare"):
            compiled_second(tokens)
    mc.prepare(second, config)
    diff_changed = cos_diff(compiled_second(tokens).logits.clone(), changed)
    print(f"[model] weight changed in place, then prepare: {diff_changed:.2e}")
    assert diff_changed <= 2e-2
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] >= 4


def test_model_over_max_tokens_raises_clearly(deepgemm_kernel, fresh_dynamo):
    deepgemm.release_buffers()
    config = mc.MegaMoEConfig(max_tokens_per_rank=16, inner_backend="eager")
    model = v4_model()
    mc.prepare(model, config)
    reserve_for(model, config)
    compiled = torch.compile(model, backend=mc.backend(config))
    compiled(ids(batch=1, seq=16))  # 16 tokens fit
    with pytest.raises(RuntimeError, match=r"max_tokens_per_rank"):
        compiled(ids(batch=2, seq=16))
    deepgemm.release_buffers()


def test_forcing_deepgemm_on_an_unsupported_shape_raises(deepgemm_kernel):
    model = v4_model(hidden=320, intermediate=256)  # hidden not a multiple of 128
    with pytest.raises(mc.UnsupportedLayerError, match="multiple of 128"):
        mc.prepare(model, mc.MegaMoEConfig(kernel="deepgemm"))
    # kernel="auto" leaves those layers unfused, with the reason in the plan.
    mc.prepare(model, mc.MegaMoEConfig())
    plans = mc.layer_plans(model)
    assert plans and not any(p.fuse for p in plans) and all("multiple of 128" in p.reason for p in plans)
