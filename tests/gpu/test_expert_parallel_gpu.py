"""Expert parallelism on several GPUs of one host: one process per GPU, NCCL, DeepGEMM MegaMoE.

Skipped unless at least 2 GPUs and DeepGEMM are there. Run: python -m pytest -m multigpu tests/gpu
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch

# tests/gpu is on sys.path (pytest puts a test file's directory there); spawned ranks get the same sys.path.
from gpu_helpers import cos_diff, deepgemm_skip_reason, ids, v4_model

pytestmark = pytest.mark.multigpu

EXPERTS, HIDDEN, INTER, TOP_K = 64, 2048, 1024, 6
HIDDEN_MODEL = 512  # v4_model's hidden size (16 experts, top-4)
TOKENS = {0: [0, 1, 7, 128], 1: [1, 0, 33, 128]}  # per rank, per round: 0 and 1 on some ranks


def _world() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _skip():
    if _world() < 2:
        pytest.skip(f"needs >= 2 GPUs, found {_world()}")
    why = deepgemm_skip_reason()
    if why:
        pytest.skip(why)


def _layer(seed=0):
    """All experts' FP8 weights and their float32 dequantization, identical on every rank."""
    from megamoe_compile.ops import quant

    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=g) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", generator=g) / INTER**0.5
    (q1, s1), (q2, s2) = quant.quantize_fp8_blocks(w1), quant.quantize_fp8_blocks(w2)
    return (q1, s1, q2, s2), (quant.dequantize_fp8_blocks(q1, s1), quant.dequantize_fp8_blocks(q2, s2))


def _reference(x, idx, weights, d1, d2, scale, limit):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in idx.unique().tolist():
        t, k = torch.where(idx == e)
        h = x[t].float() @ d1[e].T
        gate, up = h.chunk(2, -1)
        h = torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
        out.index_add_(0, t, (h @ d2[e].T) * weights[t, k, None] * scale)
    return out


def _worker(rank, world, directory):
    import torch.distributed as dist

    import megamoe_compile as mc
    from megamoe_compile.ops import deepgemm, layouts

    # What torchrun sets: transformers' device mesh picks the GPU from LOCAL_RANK (0 when unset,
    # which would move rank 1's current device to cuda:0 under torch.multiprocessing).
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{directory}/store", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    results = {}
    try:
        group = dist.group.WORLD
        (q1, s1, q2, s2), (d1, d2) = _layer()
        local = EXPERTS // world
        part = layouts.KernelWeights(q1, s1, q2, s2).experts(rank * local, (rank + 1) * local)
        weights = deepgemm.layout_weights("deepgemm_sm90", layouts.KernelWeights(
            *(t.contiguous() for t in part.tensors().values())))
        from megamoe_compile.models import MoESpec

        spec = MoESpec("op", None, "topk", "sqrtsoftplus", TOP_K, local, HIDDEN, INTER, 1.5, 10.0,
                       "grouped_mm", "dense", torch.bfloat16, torch.device("cuda", rank), False)
        deepgemm.reserve_buffer("deepgemm_sm90", spec, 256, group=group)
        diffs = []
        for round_, tokens in enumerate(TOKENS[rank] if world == 2 else [r % 3 for r in range(4)]):
            g = torch.Generator(device="cuda").manual_seed(100 * round_ + rank)
            x = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16()
            idx = torch.stack([torch.randperm(EXPERTS, device="cuda", generator=g)[:TOP_K] for _ in range(tokens)]
                              ).int() if tokens else torch.empty(0, TOP_K, dtype=torch.int32, device="cuda")
            wts = torch.rand(tokens, TOP_K, device="cuda", generator=g)
            y = torch.ops.megamoe.fused_moe(x, idx, wts, weights.w1, weights.w1_scale, weights.w2, weights.w2_scale,
                                            kernel="deepgemm_sm90", recipe="fp8", routed_scaling_factor=1.5,
                                            swiglu_limit=10.0, group_name=str(group.group_name))
            torch.cuda.synchronize()
            assert y.shape == (tokens, HIDDEN)
            if tokens:
                diffs.append((tokens, cos_diff(y.float(), _reference(x, idx, wts, d1, d2, 1.5, 10.0))))
        results["op_diffs"] = diffs

        for mode in ("local_batch", "shared_batch"):
            torch._dynamo.reset()
            model = v4_model()
            prompt = ids(batch=1 + rank % 2, seq=8 + 4 * rank, seed=rank) if mode == "local_batch" else ids()
            with torch.no_grad():
                expected = model(prompt).logits
                # The rest of the graph as traced: inductor around the op is covered on one GPU.
                # local_batch also runs the opt-in lockstep check before every fused call.
                config = mc.MegaMoEConfig(ep_mode=mode, inner_backend="eager", ep_check_calls=mode == "local_batch")
                mc.prepare(model, config)
                be = mc.backend(config)
                got = torch.compile(model, backend=be)(prompt).logits
            results[mode] = (all(f.fused for f in be.fusions), cos_diff(got.float(), expected.float()))
            if mode == "local_batch":  # rank 1 "skipped" layer 0: both ranks must raise, not hang
                from megamoe_compile.layer_state import kernel_weights

                w = kernel_weights(model.model.layers[rank].mlp.experts)
                x = torch.randn(2, HIDDEN_MODEL, device="cuda", dtype=torch.bfloat16)
                idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32, device="cuda")
                try:
                    torch.ops.megamoe.fused_moe(x, idx, torch.rand(2, 4, device="cuda"), w.w1, w.w1_scale, w.w2,
                                                w.w2_scale, kernel="deepgemm_sm90", recipe="fp8",
                                                routed_scaling_factor=1.0, swiglu_limit=None,
                                                group_name=str(group.group_name))
                    results["out_of_step"] = "no error"
                except RuntimeError as e:
                    results["out_of_step"] = str(e)

        # A model that transformers sharded with its own expert parallelism (its DTensor shards, its
        # dispatch): prepare keeps the shards and runs the fused op over the same ranks instead.
        from transformers import DeepseekV4ForCausalLM
        from transformers.distributed import DistributedConfig

        torch._dynamo.reset()
        model, prompt = v4_model(), ids()
        with torch.no_grad():
            expected = model(prompt).logits
            dc, _, mesh = DeepseekV4ForCausalLM.prepare_distribute_model(DistributedConfig(tp_size=world, ep_size=world))
            model = DeepseekV4ForCausalLM.maybe_distribute_model(model, dc, mesh)
            config = mc.MegaMoEConfig(ep_mode="shared_batch", inner_backend="eager")
            mc.prepare(model, config)
            be = mc.backend(config)
            got = torch.compile(model, backend=be)(prompt).logits
        plans = mc.layer_plans(model)
        results["transformers_ep"] = (all(f.fused for f in be.fusions) and len(be.fusions) == len(plans),
                                      [(p.kernel, p.local_experts) for p in plans],
                                      cos_diff(got.float(), expected.float()))
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, f"{directory}/rank{rank}.pt")
    deepgemm.release_buffers()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    _skip()
    import torch.multiprocessing as mp

    directory = str(tmp_path_factory.mktemp("ep_gpu"))
    world = _world()
    mp.spawn(_worker, args=(world, directory), nprocs=world, join=True)
    out = [torch.load(f"{directory}/rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return out


def test_op_on_every_rank_matches_a_float32_reference_over_all_experts(ranks):
    for rank, res in enumerate(ranks):
        print(f"rank {rank}: (tokens, diff) {res['op_diffs']}")
        assert res["op_diffs"] and all(d <= 2e-3 for _, d in res["op_diffs"])


@pytest.mark.parametrize("mode", ["local_batch", "shared_batch"])
def test_model_on_every_rank_matches_the_unfused_model(ranks, mode):
    for rank, res in enumerate(ranks):
        fused, diff = res[mode]
        print(f"rank {rank} {mode}: fused={fused} diff={diff:.2e}")
        assert fused and diff < 2e-2


def test_ranks_out_of_step_fail_together_with_ep_check_calls(ranks):
    for rank, res in enumerate(ranks):
        print(f"rank {rank} out of step: {res['out_of_step'][:160]}")
        assert res["out_of_step"].startswith("megamoe: expert-parallel ranks are out of step")
        assert "rank 0: layer 0" in res["out_of_step"] and "rank 1: layer 1" in res["out_of_step"]


def test_a_model_sharded_by_transformers_ep_fuses_over_the_same_ranks(ranks):
    world = len(ranks)
    for rank, res in enumerate(ranks):
        fused, layers, diff = res["transformers_ep"]
        print(f"rank {rank} transformers EP model: fused={fused} layers={layers} diff={diff:.2e}")
        local = 16 // world  # v4_model: 16 experts
        assert fused and all(layer == ("deepgemm_sm90", (rank * local, (rank + 1) * local)) for layer in layers)
        assert diff < 2e-2
