"""The DeepGEMM adapter against a fake `deep_gemm` (CPU, no GPU, no DeepGEMM needed).

Two fakes stand for the two API generations: "0.1" has sgl-deep-gemm 0.1.5's signatures (torch
2.11), "0.2" those of sgl-deep-gemm 0.2.x / DeepGEMM 2.8 (`num_shared_experts` before `mma_type`
in the buffer call, `transform_weights_for_mega_moe(l1, l2, activation, mma_type)`,
`mega_moe_pre_dispatch(..., mma_type)`, and here a pre-dispatch that folds `routed_scaling_factor`
itself). 0.1 selects FP4 activations (w4a4) with the pre-dispatch's `use_fp4_acts` and has one weight
layout for both MMA types. Each records its calls, so the tests assert exactly which tensors, dtypes,
shapes, recipe tuples, MMA types and scalars the adapter hands over.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import megamoe_compile as mc
from megamoe_compile import models
from megamoe_compile.ops import deepgemm, groups
from megamoe_compile.ops.layouts import KernelWeights

GENERATIONS = ("0.1", "0.2")


# --------------------------------------------------------------------------- the fake


class FakeGroup:
    group_name = "fake"

    def size(self):
        return 1

    def rank(self):
        return 0

    def barrier(self):
        pass


class FakeBuffer:
    def __init__(self, group, num_experts, max_tokens, top_k, hidden, intermediate, act_group, mma_type=None):
        self.group, self.mma_type = group, mma_type
        self.num_experts, self.num_topk = num_experts, top_k
        self.hidden, self.intermediate_hidden = hidden, intermediate
        self.num_max_tokens_per_rank = -(-max_tokens // 64) * 64  # DeepGEMM aligns up
        n = self.num_max_tokens_per_rank
        self.buffer = torch.zeros(1024, dtype=torch.int8)
        fp4_acts = mma_type is not None and mma_type.split("x")[0] != "fp8"
        # FP4 activations: two E2M1 codes per byte in the token slots.
        self.x = torch.zeros(n, hidden // 2, dtype=torch.int8) if fp4_acts else torch.zeros(n, hidden, dtype=torch.float8_e4m3fn)
        self.x_sf = torch.zeros(n, hidden // act_group, dtype=torch.float32)
        self.topk_idx = torch.zeros(n, top_k, dtype=torch.int64)
        self.topk_weights = torch.zeros(n, top_k, dtype=torch.float32)
        self.destroyed = False

    def destroy(self):
        self.destroyed = True


def fake_deep_gemm(generation: str, *, drop: tuple[str, ...] = ()) -> types.ModuleType:
    """A `deep_gemm` with the mega functions of one API generation; `.calls` records every call."""
    dg = types.ModuleType("deep_gemm")
    dg.__version__ = f"{generation}-fake"
    dg.calls = []

    def record(name, **kw):
        dg.calls.append((name, kw))

    # ---- SM90
    def get_symm_buffer_for_sm90_mega_moe(group, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                          intermediate_hidden, use_fp8_dispatch=True, activation="swiglu"):
        record("sm90_buffer", group=group, args=(num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                                 intermediate_hidden), activation=activation)
        return FakeBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, 128)

    def transform_weights_for_mega_moe_sm90(l1_weights, l2_weights):
        record("sm90_transform", l1=l1_weights, l2=l2_weights)
        return (l1_weights[0].clone(), l1_weights[1]), l2_weights

    def fp8_mega_moe(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats=None,
                     recipe=(128, 128, 128), activation="swiglu", activation_clamp=None, fast_math=True):
        record("fp8_mega_moe", y=y, l1=l1_weights, l2=l2_weights, buffer=sym_buffer, recipe=recipe,
               activation=activation, activation_clamp=activation_clamp, fast_math=fast_math)
        y.fill_(1.0)

    def mega_moe_pre_dispatch_sm90(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                                   num_tokens, group_size=128, routed_scaling_factor=1.0):
        record("pre_dispatch_sm90", x=x, topk_idx=topk_idx, topk_weights=topk_weights.clone(),
               bufs=(buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights), num_tokens=num_tokens,
               group_size=group_size, routed_scaling_factor=routed_scaling_factor)

    # ---- SM100
    def transform_sf_into_required_layout(sf, mn, k, recipe, num_groups=None, is_sfa=None,
                                          disable_ue8m0_cast=False):
        record("transform_sf", sf=sf, mn=mn, k=k, recipe=recipe, num_groups=num_groups)
        return torch.zeros(num_groups, mn, k // 128, dtype=torch.int32)  # 4 UE8M0 bytes per int32

    def fp8_fp4_mega_moe(y, l1_weights, l2_weights, sym_buffer, cumulative_local_expert_recv_stats=None,
                         recipe=(1, 1, 32), activation="swiglu", activation_clamp=None, fast_math=True):
        record("fp8_fp4_mega_moe", y=y, l1=l1_weights, l2=l2_weights, buffer=sym_buffer, recipe=recipe,
               activation=activation, activation_clamp=activation_clamp, fast_math=fast_math)
        y.fill_(2.0)

    if generation == "0.1":
        def get_symm_buffer_for_mega_moe(group, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                         intermediate_hidden, use_fp8_dispatch=None, mma_type="fp8xfp4",
                                         activation="swiglu"):
            record("buffer", group=group, args=(num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                                intermediate_hidden), mma_type=mma_type)
            return FakeBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, 32,
                              mma_type)

        def transform_weights_for_mega_moe(l1_weights, l2_weights, activation="swiglu"):
            record("transform_weights", l1=l1_weights, l2=l2_weights, mma_type=None)
            return l1_weights, l2_weights

        def mega_moe_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                                  num_tokens, group_size=32, use_fp4_acts=False):
            record("pre_dispatch", x=x, topk_idx=topk_idx, topk_weights=topk_weights.clone(),
                   bufs=(buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights), num_tokens=num_tokens,
                   group_size=group_size, routed_scaling_factor=None, use_fp4_acts=use_fp4_acts, mma_type=None)
    else:
        def get_symm_buffer_for_mega_moe(group, num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                         intermediate_hidden, num_shared_experts=0, use_fp8_dispatch=None,
                                         mma_type="fp8xfp4", activation="swiglu"):
            assert num_shared_experts == 0
            record("buffer", group=group, args=(num_experts, num_max_tokens_per_rank, num_topk, hidden,
                                                intermediate_hidden), mma_type=mma_type)
            return FakeBuffer(group, num_experts, num_max_tokens_per_rank, num_topk, hidden, intermediate_hidden, 32,
                              mma_type)

        def transform_weights_for_mega_moe(l1_weights, l2_weights, activation="swiglu", mma_type="fp8xfp4"):
            record("transform_weights", l1=l1_weights, l2=l2_weights, mma_type=mma_type)
            return l1_weights, l2_weights

        def mega_moe_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                                  num_tokens, group_size=32, routed_scaling_factor=1.0, mma_type="fp8xfp4"):
            record("pre_dispatch", x=x, topk_idx=topk_idx, topk_weights=topk_weights.clone(),
                   bufs=(buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights), num_tokens=num_tokens,
                   group_size=group_size, routed_scaling_factor=routed_scaling_factor, use_fp4_acts=None,
                   mma_type=mma_type)

    for name, fn in list(locals().items()):
        if callable(fn) and not name.startswith("record") and name not in drop and name[0] != "_":
            setattr(dg, name, fn)
    return dg


@pytest.fixture
def install(monkeypatch):
    """install(generation) -> the fake module, in sys.modules, with a fake private group."""

    def _install(generation: str, **kw) -> types.ModuleType:
        dg = fake_deep_gemm(generation, **kw)
        monkeypatch.setitem(sys.modules, "deep_gemm", dg)
        deepgemm.reset_probe()
        return dg

    monkeypatch.setattr(groups, "_make_private_group", lambda index: FakeGroup())
    deepgemm.release_buffers()
    monkeypatch.setattr(groups, "_PRIVATE_GROUPS", {})
    yield _install
    deepgemm.release_buffers()
    deepgemm.reset_probe()


def gpu(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def spec(*, hidden=512, intermediate=256, experts=8, top_k=4, device="cpu", dtype=torch.bfloat16,
         name="model.layers.3.mlp") -> models.MoESpec:
    return models.MoESpec(
        name=name, layer_index=3, router="topk", scoring_func="sqrtsoftplus", top_k=top_k,
        num_experts=experts, hidden=hidden, intermediate=intermediate, routed_scaling_factor=1.5,
        swiglu_limit=10.0, experts_implementation="grouped_mm", weight_format="dense", dtype=dtype,
        device=torch.device(device), expert_parallel=False,
    )


def calls(dg, name):
    return [kw for n, kw in dg.calls if n == name]


def routing(tokens, experts=8, top_k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, top_k, generator=g)
    return idx.reshape(tokens, top_k), weights


def sm90_weights(experts=8, hidden=512, intermediate=256) -> KernelWeights:
    w1 = torch.randn(experts, 2 * intermediate, hidden).to(torch.float8_e4m3fn)
    w2 = torch.randn(experts, hidden, intermediate).to(torch.float8_e4m3fn)
    s1 = torch.rand(experts, 2 * intermediate // 128, hidden // 128)
    s2 = torch.rand(experts, hidden // 128, intermediate // 128)
    return KernelWeights(w1, s1, w2, s2)


def sm100_weights(experts=8, hidden=512, intermediate=256) -> KernelWeights:
    g = torch.Generator().manual_seed(3)
    w1 = torch.randint(-128, 128, (experts, 2 * intermediate, hidden // 2), generator=g, dtype=torch.int8)
    w2 = torch.randint(-128, 128, (experts, hidden, intermediate // 2), generator=g, dtype=torch.int8)
    s1 = torch.randint(110, 140, (experts, 2 * intermediate, hidden // 32), generator=g).to(torch.uint8)
    s2 = torch.randint(110, 140, (experts, hidden, intermediate // 32), generator=g).to(torch.uint8)
    return KernelWeights(w1, s1, w2, s2)


def call_op(kernel, x, idx, weights, w: KernelWeights, recipe, scale=1.5, limit=10.0):
    return torch.ops.megamoe.fused_moe(x, idx, weights, w.w1, w.w1_scale, w.w2, w.w2_scale, kernel, recipe,
                                       scale, limit, "")


# --------------------------------------------------------------------------- weight layout


@pytest.mark.parametrize("generation", GENERATIONS)
def test_sm90_layout_passes_fp8_weights_and_float32_block_scales(install, generation):
    dg = install(generation)
    w = sm90_weights()
    out = deepgemm.layout_weights("deepgemm_sm90", w)
    (call,) = calls(dg, "sm90_transform")
    (l1, l1_sf), (l2, l2_sf) = call["l1"], call["l2"]
    assert l1.dtype == l2.dtype == torch.float8_e4m3fn
    assert l1_sf.dtype == l2_sf.dtype == torch.float32 and l1_sf.is_contiguous() and l2_sf.is_contiguous()
    assert l1.shape == (8, 512, 512) and l1_sf.shape == (8, 4, 4)
    assert l2.shape == (8, 512, 256) and l2_sf.shape == (8, 4, 2)
    assert torch.equal(l1.view(torch.uint8), w.w1.view(torch.uint8)) and torch.equal(l1_sf, w.w1_scale)
    assert torch.equal(l2.view(torch.uint8), w.w2.view(torch.uint8)) and torch.equal(l2_sf, w.w2_scale)
    assert out.w2 is l2 and out.w1_scale is l1_sf and out.w1 is not l1  # the fake interleaves into a copy


@pytest.mark.parametrize("generation", GENERATIONS)
def test_sm100_layout_turns_ue8m0_bytes_into_float32_powers_of_two(install, generation):
    dg = install(generation)
    w = sm100_weights()
    out = deepgemm.layout_weights("deepgemm_sm100", w)
    sf1, sf2 = calls(dg, "transform_sf")
    for call, scale, mn, k in ((sf1, w.w1_scale, 512, 512), (sf2, w.w2_scale, 512, 256)):
        assert call["sf"].dtype == torch.float32 and call["sf"].shape == (8, mn, k // 32)
        assert torch.equal(call["sf"], torch.exp2(scale.float() - 127))  # exact: 2^(e - 127)
        assert (call["mn"], call["k"], call["recipe"], call["num_groups"]) == (mn, k, (1, 32), 8)
    (tw,) = calls(dg, "transform_weights")
    (l1, l1_sf), (l2, l2_sf) = tw["l1"], tw["l2"]
    assert l1.dtype == l2.dtype == torch.int8 and torch.equal(l1, w.w1) and torch.equal(l2, w.w2)
    assert l1_sf.dtype == l2_sf.dtype == torch.int32
    assert l1_sf.shape == (8, 512, 4) and l2_sf.shape == (8, 512, 2)
    # mma_type goes to the generation whose transform takes one, and must match the buffer's.
    assert tw["mma_type"] == (None if generation == "0.1" else "fp8xfp4")
    assert out.w1 is l1 and out.w2_scale is l2_sf


def test_e8m0_conversion_is_bit_exact():
    e = torch.arange(0, 255, dtype=torch.int32).to(torch.uint8)
    f = deepgemm.e8m0_to_float32(e)
    assert torch.equal((f.view(torch.int32) >> 23).to(torch.uint8), e)
    assert f[127] == 1.0 and f[128] == 2.0 and f[126] == 0.5


def test_layout_rejects_wrong_storage(install):
    install("0.1")
    w = sm90_weights()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        deepgemm.layout_weights("deepgemm_sm90", KernelWeights(w.w1.float(), w.w1_scale, w.w2, w.w2_scale))
    with pytest.raises(ValueError, match="int8"):
        deepgemm.layout_weights("deepgemm_sm100", w)


# --------------------------------------------------------------------------- buffers


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("kernel", ["deepgemm_sm90", "deepgemm_sm100"])
def test_buffer_is_reserved_once_per_shape_with_the_api_arguments(install, generation, kernel):
    dg = install(generation)
    a = deepgemm.reserve_buffer(kernel, spec(), 100)
    b = deepgemm.reserve_buffer(kernel, spec(name="model.layers.4.mlp"), 100)  # same shape: shared
    c = deepgemm.reserve_buffer(kernel, spec(top_k=2), 100)
    assert a is b and a is not c
    name = "sm90_buffer" if kernel == "deepgemm_sm90" else "buffer"
    made = calls(dg, name)
    assert [m["args"] for m in made] == [(8, 100, 4, 512, 256), (8, 100, 2, 512, 256)]
    assert all(isinstance(m["group"], FakeGroup) for m in made)
    if kernel == "deepgemm_sm100":
        assert {m["mma_type"] for m in made} == {"fp8xfp4"}
    assert deepgemm.reserve_buffer("reference", spec(), 100) is None


def test_sm90_falls_back_to_the_generic_buffer_function(install):
    dg = install("0.2", drop=("get_symm_buffer_for_sm90_mega_moe",))
    deepgemm.reserve_buffer("deepgemm_sm90", spec(), 64)
    (made,) = calls(dg, "buffer")
    assert made["args"] == (8, 64, 4, 512, 256)


def test_release_buffers_destroys_them(install):
    install("0.1")
    buf = deepgemm.reserve_buffer("deepgemm_sm90", spec(), 64)
    deepgemm.release_buffers()
    assert buf.destroyed and not deepgemm.buffers()


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("generation", GENERATIONS)
def test_sm90_kernel_stages_then_launches(install, generation):
    dg = install(generation)
    w = sm90_weights()
    buf = deepgemm.reserve_buffer("deepgemm_sm90", spec(), 64)
    x = torch.randn(7, 512, dtype=torch.bfloat16)
    idx, weights = routing(7)
    y = call_op("deepgemm_sm90", x, idx, weights, w, "fp8")
    (pre,) = calls(dg, "pre_dispatch_sm90")
    assert torch.equal(pre["x"], x) and pre["x"].dtype == torch.bfloat16 and pre["x"].shape == (7, 512)
    assert pre["topk_idx"].dtype == torch.int32 and torch.equal(pre["topk_idx"], idx)
    # The routed scaling factor is folded by the pre-dispatch, not by the adapter.
    assert pre["topk_weights"].dtype == torch.float32 and torch.equal(pre["topk_weights"], weights)
    assert pre["routed_scaling_factor"] == 1.5
    assert all(a is b for a, b in zip(pre["bufs"], (buf.x, buf.x_sf, buf.topk_idx, buf.topk_weights)))
    assert (pre["num_tokens"], pre["group_size"]) == (7, 128)
    (k,) = calls(dg, "fp8_mega_moe")
    assert k["y"] is y and y.dtype == torch.bfloat16 and y.shape == (7, 512) and torch.all(y == 1)
    assert k["l1"][0] is w.w1 and k["l1"][1] is w.w1_scale and k["l2"][0] is w.w2 and k["l2"][1] is w.w2_scale
    assert k["buffer"] is buf and k["recipe"] == (128, 128, 128)
    assert (k["activation"], k["activation_clamp"], k["fast_math"]) == ("swiglu", 10.0, True)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_sm100_kernel_stages_then_launches(install, generation):
    dg = install(generation)
    w = sm100_weights()
    buf = deepgemm.reserve_buffer("deepgemm_sm100", spec(), 64)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    idx, weights = routing(5)
    y = call_op("deepgemm_sm100", x, idx, weights, w, "fp8_fp4", limit=None)
    (pre,) = calls(dg, "pre_dispatch")
    assert torch.equal(pre["x"], x) and torch.equal(pre["topk_idx"], idx)
    assert (pre["num_tokens"], pre["group_size"]) == (5, 32)
    # FP8 activations: 0.1's flag keeps its default, 0.2 is told the MMA type the buffer has.
    assert (pre["use_fp4_acts"], pre["mma_type"]) == ((False, None) if generation == "0.1" else (None, "fp8xfp4"))
    if generation == "0.1":  # no routed_scaling_factor argument: the adapter scales the float32 weights
        assert pre["routed_scaling_factor"] is None
        assert pre["topk_weights"].dtype == torch.float32
        assert torch.equal(pre["topk_weights"], weights * 1.5)
    else:
        assert pre["routed_scaling_factor"] == 1.5 and torch.equal(pre["topk_weights"], weights)
    assert all(a is b for a, b in zip(pre["bufs"], (buf.x, buf.x_sf, buf.topk_idx, buf.topk_weights)))
    (k,) = calls(dg, "fp8_fp4_mega_moe")
    assert k["y"] is y and y.dtype == torch.bfloat16 and y.shape == (5, 512) and torch.all(y == 2)
    assert k["recipe"] == (1, 1, 32) and k["buffer"] is buf and k["activation_clamp"] is None
    assert k["l1"][0] is w.w1 and k["l2"][1] is w.w2_scale


# --------------------------------------------------------------------------- w4a4 (recipe "fp4_fp4")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_w4a4_mode_reaches_buffer_weights_and_pre_dispatch_alike(install, generation):
    dg = install(generation)
    w = deepgemm.layout_weights("deepgemm_sm100", sm100_weights(), recipe="fp4_fp4")
    fp8_acts = deepgemm.reserve_buffer("deepgemm_sm100", spec(), 64)
    fp4_acts = deepgemm.reserve_buffer("deepgemm_sm100", spec(), 64, recipe="fp4_fp4")
    assert fp4_acts is not fp8_acts  # token slots differ: one buffer per MMA type
    assert [m["mma_type"] for m in calls(dg, "buffer")] == ["fp8xfp4", "mxf4xmxf4"]
    assert fp4_acts.x.dtype == torch.int8 and fp4_acts.x.shape[1] == 256  # packed E2M1, hidden / 2
    (tw,) = calls(dg, "transform_weights")
    # 0.2 lays L1 out per MMA type; 0.1's transform has one layout for both and takes none.
    assert tw["mma_type"] == (None if generation == "0.1" else "mxf4xmxf4")

    x = torch.randn(3, 512, dtype=torch.bfloat16)
    idx, weights = routing(3)
    y = call_op("deepgemm_sm100", x, idx, weights, w, "fp4_fp4")
    (pre,) = calls(dg, "pre_dispatch")
    assert pre["group_size"] == 32 and pre["num_tokens"] == 3 and torch.equal(pre["x"], x)
    assert (pre["use_fp4_acts"], pre["mma_type"]) == ((True, None) if generation == "0.1" else (None, "mxf4xmxf4"))
    assert all(a is b for a, b in zip(pre["bufs"], (fp4_acts.x, fp4_acts.x_sf, fp4_acts.topk_idx,
                                                      fp4_acts.topk_weights)))
    (k,) = calls(dg, "fp8_fp4_mega_moe")
    assert k["buffer"] is fp4_acts and k["recipe"] == (1, 1, 32) and k["y"] is y and y.shape == (3, 512)
    # The default recipe on the same layer shape still finds the FP8-activation buffer.
    call_op("deepgemm_sm100", x, idx, weights, w, "fp8_fp4")
    assert calls(dg, "fp8_fp4_mega_moe")[-1]["buffer"] is fp8_acts


def test_w4a4_needs_a_release_that_stages_fp4_activations(install, monkeypatch):
    from megamoe_compile.prepare import choose_kernel

    dg = install("0.1")
    del dg.mega_moe_pre_dispatch  # a pre-dispatch without use_fp4_acts / mma_type

    def mega_moe_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                              num_tokens, group_size=32):
        raise AssertionError("must not be called")

    dg.mega_moe_pre_dispatch = mega_moe_pre_dispatch
    deepgemm.reset_probe()
    why = deepgemm.recipe_problem("deepgemm_sm100", "fp4_fp4")
    assert "recipe 'fp4_fp4' (w4a4, mma_type 'mxf4xmxf4') needs mega_moe_pre_dispatch" in why
    assert "0.1-fake" in why and "use recipe 'fp8_fp4'" in why
    assert deepgemm.recipe_problem("deepgemm_sm100", "fp8_fp4") == ""
    gpu(monkeypatch, (10, 0))
    with pytest.raises(mc.UnsupportedLayerError, match="needs mega_moe_pre_dispatch"):
        choose_kernel(mc.MegaMoEConfig(recipe="fp4_fp4"), spec(device="cuda"))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_w4a4_is_opt_in_and_blackwell_only(install, monkeypatch, generation):
    from megamoe_compile.prepare import choose_kernel

    install(generation)
    gpu(monkeypatch, (10, 0))
    assert choose_kernel(mc.MegaMoEConfig(), spec(device="cuda")) == ("deepgemm_sm100", "fp8_fp4", "")
    assert choose_kernel(mc.MegaMoEConfig(recipe="fp4_fp4"), spec(device="cuda")) == ("deepgemm_sm100", "fp4_fp4", "")
    gpu(monkeypatch, (9, 0))
    with pytest.raises(mc.UnsupportedLayerError, match="Hopper has no FP4 tensor cores"):
        choose_kernel(mc.MegaMoEConfig(recipe="fp4_fp4"), spec(device="cuda"))
    # Anywhere, the reference kernel emulates it.
    assert choose_kernel(mc.MegaMoEConfig(kernel="reference", recipe="fp4_fp4"), spec()) == ("reference", "fp4_fp4", "")
    with pytest.raises(ValueError, match="supports recipes"):
        deepgemm.layout_weights("deepgemm_sm90", sm90_weights(), recipe="fp4_fp4")
    with pytest.raises(ValueError, match="supports recipes"):
        deepgemm.reserve_buffer("deepgemm_sm90", spec(), 64, recipe="fp4_fp4")


def test_kernel_picks_the_smallest_buffer_that_fits(install):
    dg = install("0.1")
    small = deepgemm.reserve_buffer("deepgemm_sm90", spec(), 8)
    large = deepgemm.reserve_buffer("deepgemm_sm90", spec(), 256)
    w = sm90_weights()
    for tokens, expected in ((8, small), (9, large)):
        idx, weights = routing(tokens)
        call_op("deepgemm_sm90", torch.randn(tokens, 512, dtype=torch.bfloat16), idx, weights, w, "fp8")
        assert calls(dg, "fp8_mega_moe")[-1]["buffer"] is expected


def test_a_buffer_reserved_later_is_seen_by_the_next_call(install):
    dg = install("0.1")
    small = deepgemm.reserve_buffer("deepgemm_sm90", spec(), 8)
    w = sm90_weights()
    idx, weights = routing(8)
    call_op("deepgemm_sm90", torch.randn(8, 512, dtype=torch.bfloat16), idx, weights, w, "fp8")
    assert calls(dg, "fp8_mega_moe")[-1]["buffer"] is small
    large = deepgemm.reserve_buffer("deepgemm_sm90", spec(), 64)  # invalidates the cached launch plan
    idx, weights = routing(9)
    call_op("deepgemm_sm90", torch.randn(9, 512, dtype=torch.bfloat16), idx, weights, w, "fp8")
    assert calls(dg, "fp8_mega_moe")[-1]["buffer"] is large


def test_too_many_tokens_raise_before_any_launch(install):
    dg = install("0.1")
    deepgemm.reserve_buffer("deepgemm_sm90", spec(), 16)
    idx, weights = routing(17)
    with pytest.raises(RuntimeError, match=r"17 tokens .*MegaMoEConfig\.max_tokens_per_rank=16"):
        call_op("deepgemm_sm90", torch.randn(17, 512, dtype=torch.bfloat16), idx, weights, sm90_weights(), "fp8")
    assert not calls(dg, "pre_dispatch_sm90") and not calls(dg, "fp8_mega_moe")


def test_zero_tokens_launch_nothing(install):
    dg = install("0.1")
    deepgemm.reserve_buffer("deepgemm_sm90", spec(), 16)
    y = call_op("deepgemm_sm90", torch.empty(0, 512, dtype=torch.bfloat16), torch.empty(0, 4, dtype=torch.int32),
                torch.empty(0, 4), sm90_weights(), "fp8")
    assert y.shape == (0, 512) and y.dtype == torch.bfloat16
    assert [name for name, _ in dg.calls] == ["sm90_buffer"]  # the reservation only, no launch


def test_unreserved_shape_is_allocated_with_a_warning(install, caplog):
    dg = install("0.1")
    idx, weights = routing(3)
    with caplog.at_level("WARNING", logger="megamoe_compile"):
        call_op("deepgemm_sm90", torch.randn(3, 512, dtype=torch.bfloat16), idx, weights, sm90_weights(), "fp8")
    assert "no symmetric buffer reserved" in caplog.text
    (made,) = calls(dg, "sm90_buffer")
    assert made["args"] == (8, mc.MegaMoEConfig().max_tokens_per_rank, 4, 512, 256)


def test_kernel_rejects_non_bf16_activations_and_wrong_recipe(install):
    install("0.1")
    idx, weights = routing(2)
    with pytest.raises(TypeError, match="bfloat16"):
        call_op("deepgemm_sm90", torch.randn(2, 512), idx, weights, sm90_weights(), "fp8")
    with pytest.raises(ValueError, match=r"takes recipes \['fp8'\], got 'none'"):
        call_op("deepgemm_sm90", torch.randn(2, 512, dtype=torch.bfloat16), idx, weights, sm90_weights(), "none")


def test_unregistered_group_name_is_a_clear_error(install):
    install("0.1")
    idx, weights = routing(2)
    w = sm90_weights()
    with pytest.raises(RuntimeError, match="process group 'ep8' is not registered"):
        torch.ops.megamoe.fused_moe(torch.randn(2, 512, dtype=torch.bfloat16), idx, weights, w.w1, w.w1_scale,
                                    w.w2, w.w2_scale, "deepgemm_sm90", "fp8", 1.0, None, "ep8")


# --------------------------------------------------------------------------- kernel choice


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("capability, kernel", [((9, 0), "deepgemm_sm90"), ((10, 0), "deepgemm_sm100")])
def test_kernel_for_picks_by_capability(install, monkeypatch, generation, capability, kernel):
    install(generation)
    gpu(monkeypatch, capability)
    assert deepgemm.kernel_for(spec(device="cuda")) == (kernel, "")


def test_kernel_for_reasons(install, monkeypatch):
    install("0.1")
    assert "need a CUDA GPU" in deepgemm.kernel_for(spec())[1]
    gpu(monkeypatch, (8, 0))
    assert deepgemm.kernel_for(spec(device="cuda")) == (
        None, "DeepGEMM MegaMoE needs sm_90 (Hopper) or sm_100 (Blackwell); this GPU is sm_80")
    gpu(monkeypatch, (12, 0))
    assert "this GPU is sm_120" in deepgemm.kernel_for(spec(device="cuda"))[1]
    gpu(monkeypatch, (9, 0))
    assert "hidden size a multiple of 128, got 320" in deepgemm.kernel_for(spec(device="cuda", hidden=320))[1]
    assert "moe_intermediate size a multiple of 128" in deepgemm.kernel_for(spec(device="cuda", intermediate=64))[1]
    assert "bfloat16 activations" in deepgemm.kernel_for(spec(device="cuda", dtype=torch.float16))[1]
    assert deepgemm.kernel_for(spec(device="cuda", hidden=384))[0] == "deepgemm_sm90"
    gpu(monkeypatch, (10, 0))
    assert "multiple of 512 (its pre-dispatch), got 384" in deepgemm.kernel_for(spec(device="cuda", hidden=384))[1]


def test_missing_deep_gemm_names_the_matching_release(install, monkeypatch):
    install("0.1")
    monkeypatch.setitem(sys.modules, "deep_gemm", None)  # import raises ImportError
    deepgemm.reset_probe()
    gpu(monkeypatch)
    kernel, why = deepgemm.kernel_for(spec(device="cuda"))
    assert kernel is None
    assert "deep_gemm" in why and "not importable" in why
    assert 'pip install "sgl-deep-gemm>=0.2"` for torch >= 2.13' in why
    assert 'pip install "sgl-deep-gemm>=0.1.4.post1,<0.1.6"` for torch 2.11' in why
    assert 'pip install -e ".[deepgemm]"' in why  # not on the package index: from a clone
    with pytest.raises(RuntimeError, match="cannot run: deep_gemm"):
        deepgemm.layout_weights("deepgemm_sm90", sm90_weights())


def test_missing_mega_functions_are_named_with_the_version(install, monkeypatch):
    install("0.1", drop=("fp8_mega_moe", "mega_moe_pre_dispatch_sm90"))
    gpu(monkeypatch)
    kernel, why = deepgemm.kernel_for(spec(device="cuda"))
    assert kernel is None
    assert "0.1-fake" in why and "fp8_mega_moe" in why and "mega_moe_pre_dispatch_sm90" in why


def test_forcing_deepgemm_on_an_unsupported_gpu_raises(install, monkeypatch):
    from megamoe_compile.prepare import choose_kernel

    install("0.1")
    gpu(monkeypatch, (8, 6))
    with pytest.raises(mc.UnsupportedLayerError, match="sm_86"):
        choose_kernel(mc.MegaMoEConfig(kernel="deepgemm"), spec(device="cuda"))
    assert choose_kernel(mc.MegaMoEConfig(), spec(device="cuda"))[0] is None  # auto: left unfused


def test_an_sm90_intermediate_over_4096_is_refused_at_load_time(install, monkeypatch):
    """DeepGEMM's SM90 MegaMoE asserts intermediate / 64 <= 64 only at its first launch (Mixtral-8x7B's
    14336, measured on an H200): the layer stays unfused, with the reason, instead of failing later."""
    from megamoe_compile.prepare import choose_kernel

    install("0.1")
    gpu(monkeypatch)
    assert deepgemm.kernel_for(spec(device="cuda", intermediate=4096)) == ("deepgemm_sm90", "")
    kernel, recipe, why = choose_kernel(mc.MegaMoEConfig(), spec(device="cuda", intermediate=14336))
    assert kernel is None and why == ("deepgemm_sm90 takes moe_intermediate up to 4096 (DeepGEMM's SM90 "
                                      "MegaMoE: intermediate / 64 <= 64), got 14336")
    with pytest.raises(mc.UnsupportedLayerError, match="up to 4096"):
        choose_kernel(mc.MegaMoEConfig(kernel="deepgemm"), spec(device="cuda", intermediate=14336))


def test_import_needs_no_deep_gemm():
    code = ("import sys; import megamoe_compile.ops.deepgemm as d; import megamoe_compile.ops as o; "
            "assert 'deep_gemm' not in sys.modules; "
            "assert {'deepgemm_sm90', 'deepgemm_sm100'} <= set(o.kernel_names())")
    subprocess.run([sys.executable, "-c", code], check=True)
