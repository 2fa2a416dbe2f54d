"""Builders of the tiny models and inputs shared by the tests (no hub access needed): DeepSeek-V4
models from DeepseekV4Config, the other MoE families, the static-decode V4 model; CPU gloo ranks.

Not a test module (pytest collects nothing here). Test modules, tests/gpu's included, import from
it (`from helpers import ...`), never from conftest.py or from one another: pytest puts tests/ on
sys.path, as the directory of tests/conftest.py (its default "prepend" import mode).
"""

from __future__ import annotations

import os
import traceback

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CompileConfig,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
)

import megamoe_compile as mc
from megamoe_compile.decode.v4_static_decode import cache_keyword

VOCAB = 128


# -- tiny DeepSeek-V4 models ----------------------------------------------------------------------

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


# -- other Mixture-of-Experts families (tests/test_families.py) -----------------------------------

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
                         n_shared_experts=1, topk_method="group_limited_greedy", **_MLA), "softmax grouped", 1),
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


# -- DeepSeek-V4 static-cache decode (tests/test_v4_static_decode.py, tests/gpu) --------------------
# Windows are tiny (sliding 6, CSA every 4 tokens, HCA every 8, index top-3) so that a few decode
# steps close several CSA and HCA windows, make the indexer drop entries and wrap the ring. The
# indexer has 16 heads so that its scores do not tie exactly at the top-k boundary.

CSA_RATE, HCA_RATE, WINDOW = 4, 8, 6
LAYER_TYPES = ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention",
               "compressed_sparse_attention"]
TOL = dict(atol=2e-5, rtol=1e-5)  # float32 rounding: the pool is summed in another order than a cat


def decode_model(seed: int = 0) -> DeepseekV4ForCausalLM:
    config = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        head_dim=32, q_lora_rank=32, o_groups=1, o_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2,
        num_nextn_predict_layers=0, index_n_heads=16, index_head_dim=8, index_topk=3, sliding_window=WINDOW,
        hc_mult=2, hc_sinkhorn_iters=2, mlp_layer_types=["hash_moe", "moe", "hash_moe", "moe"],
        layer_types=LAYER_TYPES,
        compress_rates={"compressed_sparse_attention": CSA_RATE, "heavily_compressed_attention": HCA_RATE},
    )
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position_bias" in name or "sinks" in name:  # zero-initialised: make them count
                param.normal_(0, 0.5)
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(gate.num_experts)[: gate.top_k] for _ in range(VOCAB)]))
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed + 100 * length))


def compile_config(backend="eager", **options) -> CompileConfig:
    config = CompileConfig(backend=backend, fullgraph=True, mode=None, options=options or None)
    config._compile_all_devices = True  # generate() auto-compiles on CUDA only, unless told
    return config


def generate(model, ids, new_tokens, cache=None, attention_mask=None, **kwargs):
    options = dict(attention_mask=torch.ones_like(ids) if attention_mask is None else attention_mask,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   output_logits=True, return_dict_in_generate=True)
    if cache is not None:
        options[cache_keyword()] = cache  # 5.23: past_key_values (the enabled models take either)
    options.update(kwargs)
    with torch.no_grad():
        return model.generate(ids, **options)


def forward(model, ids, cache):
    """One plain forward over `cache` (transformers 5.24 names the argument `cache`, 5.23 `past_key_values`)."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, **{cache_keyword(): cache})


def assert_same_generation(got, expected):
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, step=step: f"step {step}: {m}")
