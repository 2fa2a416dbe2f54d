"""`MegaMoEConfig(ep_check_calls=True)`: ranks that fall out of step fail together, with a message.

Two CPU processes over gloo (reference kernel). Without the check, a rank that skipped a fused call
leaves the others waiting in the kernel's (or the collectives') synchronisation for good.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import eager_backend, input_ids, run_on_gloo_ranks, tiny_model

import megamoe_compile as mc
from megamoe_compile.layer_state import kernel_weights
from megamoe_compile.ops import groups

WORLD = 2


def _call_layer(model, layer: int, group_name: str):
    """One fused call with layer `layer`'s prepared weights (what the compiled model would make)."""
    w = kernel_weights(model.model.layers[layer].mlp.experts)
    x = torch.randn(2, model.config.hidden_size)
    idx = torch.tensor([[0, 3], [1, 2]], dtype=torch.int32)
    return torch.ops.megamoe.fused_moe(x, idx, torch.rand(2, 2), w.w1, w.w1_scale, w.w2, w.w2_scale,
                                       kernel="reference", recipe="none", routed_scaling_factor=1.0,
                                       swiglu_limit=None, group_name=group_name, layer_id=layer)


def _scenarios(rank, results):
    group_name = str(dist.group.WORLD.group_name)
    model = tiny_model(layers=2, experts=4, top_k=2)
    be = eager_backend(ep_mode="local_batch", ep_check_calls=True)
    mc.prepare(model, be.config)
    with torch.no_grad():  # in step: the check passes, the model runs as usual
        results["logits"] = torch.compile(model, backend=be)(input_ids(batch=1, seq=3 + rank, seed=rank)).logits
    results["fused"] = [f.fused for f in be.fusions]
    results["calls_after_forward"] = groups._STEP_CHECKS[group_name]

    def attempt(name, fn):
        try:
            fn()
            results[name] = "no error"
        except RuntimeError as e:
            results[name] = str(e)

    # Rank 1 skipped layer 0's call: it is at layer 1 while rank 0 is at layer 0.
    attempt("skipped_layer", lambda: _call_layer(model, rank, group_name))
    # Rank 1 made one call more than rank 0 (same layer, different call number).
    groups._STEP_CHECKS[group_name] += rank
    attempt("extra_call", lambda: _call_layer(model, 0, group_name))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_on_gloo_ranks(_scenarios, str(tmp_path_factory.mktemp("ep_steps")), WORLD)


def test_ranks_in_step_run_normally(ranks):
    model = tiny_model(layers=2, experts=4, top_k=2)
    for rank, res in enumerate(ranks):
        assert res["fused"] == [True, True]
        assert res["calls_after_forward"] == 2  # one per fused layer
        with torch.no_grad():
            expected = model(input_ids(batch=1, seq=3 + rank, seed=rank)).logits
        torch.testing.assert_close(res["logits"], expected, atol=2e-5, rtol=1e-4)


def test_a_skipped_call_fails_on_every_rank(ranks):
    for res in ranks:
        assert res["skipped_layer"].startswith(
            "megamoe: expert-parallel ranks are out of step before a fused MoE call "
            "(rank 0: layer 0 call 2, rank 1: layer 1 call 2); every rank must make the same MoE calls")


def test_an_extra_call_fails_on_every_rank(ranks):
    for res in ranks:
        assert "(rank 0: layer 0 call 3, rank 1: layer 0 call 4)" in res["extra_call"]


def test_the_check_is_opt_in():
    assert mc.MegaMoEConfig().ep_check_calls is False
    with pytest.raises(ValueError, match="ep_check_calls are set but ep_mode is 'none'"):
        mc.MegaMoEConfig(ep_check_calls=True)
