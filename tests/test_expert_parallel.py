"""Expert parallelism on the CPU: two processes over gloo, the reference kernel's collectives.

One spawn runs every scenario (processes are slow to start on 2 cores) and saves what each rank
saw; the tests compare that with a single process running the same model.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from helpers import eager_backend, input_ids, run_on_gloo_ranks, tiny_model

import megamoe_compile as mc

WORLD = 2


def _model():
    return tiny_model(layers=2, experts=4, top_k=2)


def _prompts(rank):
    # Different prompts and lengths per rank.
    return input_ids(batch=1 + rank, seq=3 + 2 * rank, seed=10 + rank)


def _scenarios(rank, results):
    group_name = str(dist.group.WORLD.group_name)

    # The op alone: rank 0 has no tokens at all, rank 1 has three.
    g = torch.Generator().manual_seed(0)
    tokens = [0, 3][rank]
    x = torch.randn(5, 16, generator=g)[:tokens]
    idx = torch.randint(0, 4, (5, 2), generator=g).int()[:tokens]
    wts = torch.rand(5, 2, generator=g)[:tokens]
    w1, w2 = torch.randn(4, 8, 16, generator=g), torch.randn(4, 16, 4, generator=g)
    local = slice(rank * 2, rank * 2 + 2)
    results["op"] = torch.ops.megamoe.fused_moe(
        x, idx, wts, w1[local].contiguous(), None, w2[local].contiguous(), None, kernel="reference",
        recipe="none", routed_scaling_factor=1.5, swiglu_limit=None, group_name=group_name)

    # Each rank its own batch.
    model = _model()
    be = eager_backend(ep_mode="local_batch")
    mc.prepare(model, be.config)
    results["local_experts"] = mc.layer_plans(model)[1].local_experts
    results["prepared_experts"] = model.model.layers[1].mlp.experts.megamoe_w1.shape[0]
    with torch.no_grad():
        results["local_logits"] = torch.compile(model, backend=be, dynamic=True)(_prompts(rank)).logits
    results["local_fused"] = [f.fused for f in be.fusions]
    # generate() in lockstep: synced_gpus keeps a finished rank stepping until all are done.
    model.forward = torch.compile(model.forward, backend=be, dynamic=True)
    with torch.no_grad():
        results["generated"] = model.generate(_prompts(rank), max_new_tokens=3 + 3 * rank,
                                              do_sample=False, synced_gpus=True)
    torch._dynamo.reset()

    # All ranks share one batch: each fuses a slice, outputs are gathered.
    model = _model()
    be = eager_backend(ep_mode="shared_batch")
    mc.prepare(model, be.config)
    with torch.no_grad():
        results["shared_logits"] = torch.compile(model, backend=be)(input_ids(batch=3, seq=3)).logits
    results["shared_fused"] = [f.fused for f in be.fusions]
    torch._dynamo.reset()

    # Misuse fails on every rank with a message, instead of hanging.
    for name, make, config in [
        ("indivisible", lambda: tiny_model(layers=1, experts=3, top_k=2), mc.MegaMoEConfig(ep_mode="local_batch")),
        ("mismatch", _model, mc.MegaMoEConfig(ep_mode="local_batch", skip_layers=[rank])),
    ]:
        try:
            mc.prepare(make(), config)
            results[name] = "no error"
        except ValueError as e:
            results[name] = str(e)

    # Last: transformers' mesh adds process groups. Its own failure stays its own tests'.
    try:
        _transformers_ep_scenario(rank, results)
    except Exception:
        results["hf_ep_error"] = traceback.format_exc()


def _transformers_ep_scenario(rank, results):
    """A model that transformers sharded itself: DistributedConfig(tp_size=2, ep_size=2) on a model built in
    place (what bench_expert_parallel.py does), then prepare + compile in each ep_mode."""
    from transformers import DeepseekV4ForCausalLM
    from transformers.distributed import DistributedConfig

    model = _model()
    ids = input_ids(batch=3, seq=3)  # the same batch on every rank: transformers' AllReduceEP needs it
    with torch.no_grad():
        results["hf_ep_reference"] = model(ids).logits  # the plain model, not sharded
    full = [layer.mlp.experts.gate_up_proj.detach().clone() for layer in model.model.layers]
    dc, _, mesh = DeepseekV4ForCausalLM.prepare_distribute_model(DistributedConfig(tp_size=WORLD, ep_size=WORLD))
    model = DeepseekV4ForCausalLM.maybe_distribute_model(model, dc, mesh)
    sharded = [layer.mlp.experts.gate_up_proj for layer in model.model.layers]
    # "none" last again: re-planning gives transformers' own dispatch back.
    for step, mode in enumerate(("none", "shared_batch", "local_batch", "none")):
        be = eager_backend(kernel="reference", ep_mode=mode)
        mc.prepare(model, be.config)
        layers = []
        for i, (plan, layer) in enumerate(zip(mc.layer_plans(model), model.model.layers)):
            experts = layer.mlp.experts
            local = experts.gate_up_proj.to_local()
            layers.append({
                "fuse": plan.fuse, "reason": plan.reason, "local_experts": plan.local_experts,
                "num_experts": plan.spec.num_experts, "ep_experts": plan.spec.ep_experts,
                "expert_parallel": plan.spec.expert_parallel,
                "original_bytes": plan.original_bytes, "prepared_bytes": plan.prepared_bytes,
                "kernel_buffers": [n for n, _ in experts.named_buffers() if n.startswith("megamoe_")],
                "transformers_forward": "forward" in vars(experts), "notes": list(plan.notes),
                "same_parameter": experts.gate_up_proj is sharded[i], "local_shape": tuple(local.shape),
                "local_is_transformers_slice": torch.equal(local, full[i][rank * 2: rank * 2 + 2]),
            })
        key = f"hf_ep_{mode}" + ("_again" if step == 3 else "")
        results[f"{key}_plans"] = layers
        with torch.no_grad():
            results[f"{key}_eager_logits"] = model(ids).logits  # eager runs the fused op too
            results[f"{key}_logits"] = torch.compile(model, backend=be)(ids).logits
        results[f"{key}_fusions"] = [(f.name, f.fused, f.reason) for f in be.fusions]
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_gloo_ranks(_scenarios, str(tmp_path_factory.mktemp("ep")), WORLD)


def test_op_with_zero_and_some_tokens_matches_all_experts_in_one_process(ranks):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    idx = torch.randint(0, 4, (5, 2), generator=g).int()
    wts = torch.rand(5, 2, generator=g)
    w1, w2 = torch.randn(4, 8, 16, generator=g), torch.randn(4, 16, 4, generator=g)
    full = torch.ops.megamoe.fused_moe(x[:3], idx[:3], wts[:3], w1, None, w2, None, kernel="reference",
                                       recipe="none", routed_scaling_factor=1.5, swiglu_limit=None)
    assert ranks[0]["op"].shape == (0, 16)
    torch.testing.assert_close(ranks[1]["op"], full)


def test_each_rank_keeps_only_its_experts(ranks):
    assert [r["local_experts"] for r in ranks] == [(0, 2), (2, 4)]
    assert [r["prepared_experts"] for r in ranks] == [2, 2]


def test_local_batches_match_one_process(ranks):
    model = _model()
    for rank, res in enumerate(ranks):
        assert res["local_fused"] == [True, True]
        with torch.no_grad():
            expected = model(_prompts(rank)).logits
        torch.testing.assert_close(res["local_logits"], expected, atol=2e-5, rtol=1e-4)


def test_generate_in_lockstep_with_different_prompts(ranks):
    model = _model()
    for rank, res in enumerate(ranks):
        with torch.no_grad():
            expected = model.generate(_prompts(rank), max_new_tokens=3 + 3 * rank, do_sample=False)
        assert torch.equal(res["generated"], expected)


def test_shared_batch_matches_one_process(ranks):
    model = _model()
    with torch.no_grad():
        expected = model(input_ids(batch=3, seq=3)).logits
    for res in ranks:
        assert res["shared_fused"] == [True, True]
        torch.testing.assert_close(res["shared_logits"], expected, atol=2e-5, rtol=1e-4)


def test_misuse_fails_on_every_rank(ranks):
    for res in ranks:
        assert res["indivisible"] == ("model.layers.0.mlp: 3 experts cannot be split evenly over an "
                                      "expert-parallel group of 2 ranks")
        assert res["mismatch"].startswith("megamoe: expert-parallel ranks planned differently")


# -- a model transformers sharded with its own expert parallelism ------------------------------

HF_EP_MODES = ("shared_batch", "local_batch")


def test_transformers_ep_experts_are_read_as_sharded_not_resharded(ranks):
    for rank, res in enumerate(ranks):
        assert "hf_ep_error" not in res, f"rank {rank}:\n{res['hf_ep_error']}"
        for key in ("hf_ep_none", *(f"hf_ep_{m}" for m in HF_EP_MODES), "hf_ep_none_again"):
            for layer in res[f"{key}_plans"]:
                # transformers' range for this rank, E/N = 2 of 4 experts each, kept as it is
                assert layer["expert_parallel"] and layer["num_experts"] == 2
                assert layer["ep_experts"] == layer["local_experts"] == (2 * rank, 2 * rank + 2)
                assert layer["same_parameter"] and layer["local_shape"] == (2, 64, 64)
                assert layer["local_is_transformers_slice"]
                assert layer["original_bytes"] == 2 * (64 * 64 + 64 * 32) * 4  # this rank's shard only
                # recipe "none": the kernel reads transformers' shard itself, no copy
                assert layer["prepared_bytes"] == 0


def test_transformers_ep_model_fuses_over_the_same_ranks(ranks):
    for _rank, res in enumerate(ranks):
        for mode in HF_EP_MODES:
            plans, fusions = res[f"hf_ep_{mode}_plans"], res[f"hf_ep_{mode}_fusions"]
            assert all(p["fuse"] and p["kernel_buffers"] for p in plans)
            assert not any(p["transformers_forward"] for p in plans)  # its dispatch set aside
            assert all("transformers' expert-parallel dispatch replaced by the fused op" in p["notes"][-1]
                       for p in plans)
            assert [(name, fused) for name, fused, _ in fusions] == [("model.layers.0.mlp", True),
                                                                      ("model.layers.1.mlp", True)]
            for logits in ("logits", "eager_logits"):
                torch.testing.assert_close(res[f"hf_ep_{mode}_{logits}"], res["hf_ep_reference"], atol=2e-5, rtol=1e-4)


def test_transformers_ep_model_without_ep_mode_stays_transformers(ranks):
    for rank, res in enumerate(ranks):
        for key in ("hf_ep_none", "hf_ep_none_again"):  # before any fusion, and re-planned after one
            for plan, (_, fused, reason) in zip(res[f"{key}_plans"], res[f"{key}_fusions"]):
                assert not plan["fuse"] and not fused and plan["kernel_buffers"] == []
                assert plan["transformers_forward"]  # transformers' own dispatch in place
                assert reason == plan["reason"] and reason.startswith(
                    f"experts sharded by transformers' expert parallelism (this rank holds experts "
                    f"[{2 * rank}, {2 * rank + 2}) of 4) run transformers' own expert-parallel forward; "
                    "set MegaMoEConfig.ep_mode")
            for logits in ("logits", "eager_logits"):
                torch.testing.assert_close(res[f"{key}_{logits}"], res["hf_ep_reference"], atol=2e-5, rtol=1e-4)
