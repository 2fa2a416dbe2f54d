"""Tiny DeepSeek-V4 models built from DeepseekV4Config (no hub access needed)."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

import megamoe_compile as mc

VOCAB = 128


def tiny_config(*, layers: int = 2, hash_layers: int = 1, experts: int = 4, top_k: int = 2,
                hidden: int = 64, intermediate: int = 32, scoring: str = "sqrtsoftplus",
                impl: str = "grouped_mm", **overrides) -> DeepseekV4Config:
    cfg = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=hidden, moe_intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=2, head_dim=32, q_lora_rank=32, o_groups=1,
        o_lora_rank=16, n_routed_experts=experts, num_experts_per_tok=top_k, scoring_func=scoring,
        num_nextn_predict_layers=0, index_n_heads=2, index_head_dim=16, index_topk=4,
        sliding_window=16, hc_mult=2, hc_sinkhorn_iters=2,
        mlp_layer_types=["hash_moe"] * hash_layers + ["moe"] * (layers - hash_layers),
        layer_types=["sliding_attention"] * layers, **overrides,
    )
    cfg._experts_implementation = impl
    return cfg


def tiny_model(*, dtype: torch.dtype = torch.float32, seed: int = 0, softmax_router: bool = False,
               **config) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(tiny_config(**config)).to(dtype).eval()
    with torch.no_grad():
        for block in (layer.mlp for layer in model.model.layers):
            # Random hash tables and router biases, so routing differs across tokens and layers.
            if hasattr(block.gate, "tid2eid"):
                table = torch.stack([torch.randperm(block.gate.num_experts)[: block.gate.top_k]
                                     for _ in range(VOCAB)])
                block.gate.tid2eid.copy_(table)
            if hasattr(block.gate, "e_score_correction_bias"):
                block.gate.e_score_correction_bias.normal_(0, 0.1)
            if softmax_router:
                # transformers 5.23 cannot build scoring_func="softmax" (ACT2FN has no entry);
                # a user who wants it sets the module, which the pass recognises.
                block.gate.score_fn = torch.nn.Softmax(dim=-1)
    return model


def input_ids(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run_on_gloo_ranks(scenarios, directory: str, world: int = 2) -> list[dict]:
    """Run `scenarios(rank, results)` (a module-level function) in `world` CPU processes over gloo;
    return what each rank put in `results`. One spawn for many checks: processes start slowly on
    2 cores. A rank's exception fails here, with its traceback."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(scenarios, directory, world), nprocs=world, join=True)
    out = [torch.load(os.path.join(directory, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return out


def _gloo_worker(rank: int, scenarios, directory: str, world: int) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(directory, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    results = {}
    try:
        scenarios(rank, results)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
    dist.destroy_process_group()


def eager_backend(**fields) -> mc.MegaMoEBackend:
    """The megamoe backend with the rest of the graph run as traced (fast tests on 2 cores)."""
    return mc.backend(inner_backend="eager", **fields)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import importlib

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    importlib.import_module("megamoe_compile.backend")._WARNED.clear()  # one-time warnings, once per test
    yield
    torch._dynamo.reset()
