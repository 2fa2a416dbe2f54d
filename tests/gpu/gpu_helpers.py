"""GPU test helpers: skip cleanly without CUDA / DeepGEMM; small DeepSeek-V4 models on the GPU.

Not a test module and not a conftest.py: the GPU tests import it by name (`from gpu_helpers import ...`,
tests/gpu being on sys.path as the directory of the test files), as they import tests/helpers.py.
"""

from __future__ import annotations

import pytest
import torch

V4_VOCAB = 1024


def deepgemm_skip_reason() -> str | None:
    """Why the DeepGEMM GPU tests cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return f"DeepGEMM MegaMoE needs sm_90 or sm_100, this GPU is sm_{major}{minor}"
    from megamoe_compile.ops import deepgemm

    kernel = deepgemm.SM90 if major == 9 else deepgemm.SM100
    api, why = deepgemm._api(kernel)
    return None if api is not None else why


def deepgemm_kernel_or_skip() -> str:
    """The DeepGEMM kernel name of this GPU; skips the calling test where DeepGEMM cannot run."""
    why = deepgemm_skip_reason()
    if why is not None:
        pytest.skip(why)
    return "deepgemm_sm90" if torch.cuda.get_device_capability()[0] == 9 else "deepgemm_sm100"


def v4_config(*, layers: int = 4, hash_layers: int = 2, hidden: int = 512, intermediate: int = 256,
              experts: int = 16, top_k: int = 4, impl: str = "grouped_mm"):
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(
        vocab_size=V4_VOCAB, hidden_size=hidden, moe_intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, head_dim=64, q_lora_rank=128, o_groups=2,
        o_lora_rank=64, n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=1,
        num_nextn_predict_layers=0, index_n_heads=4, index_head_dim=32, index_topk=16,
        sliding_window=32, hc_mult=2, hc_sinkhorn_iters=2,
        mlp_layer_types=["hash_moe"] * hash_layers + ["moe"] * (layers - hash_layers),
        layer_types=["sliding_attention"] * layers,
    )
    cfg._experts_implementation = impl
    return cfg


def v4_model(seed: int = 0, **config):
    """A small DeepSeek-V4 causal LM, bf16 on cuda, random weights, hash tables and router biases."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(v4_config(**config)).to(device="cuda", dtype=torch.bfloat16).eval()
    model.requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                table = torch.stack([torch.randperm(gate.num_experts)[: gate.top_k] for _ in range(V4_VOCAB)])
                gate.tid2eid.copy_(table.to(gate.tid2eid))
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V4_VOCAB, (batch, seq), generator=g).cuda()


def cos_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - 2 sum(a b) / sum(a^2 + b^2), in float64 (0 = identical)."""
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())


def op_diff(layer, tokens: int, hidden: int, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> float:
    """`layer(x, ...)` (the fused op on a test layer) on random bf16 tokens against `layer.reference`:
    checks the output's shape, dtype and finiteness, returns `cos_diff`."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    y = layer(x, topk_idx, topk_weights)
    assert y.shape == (tokens, hidden) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    return cos_diff(y, layer.reference(x, topk_idx, topk_weights))
