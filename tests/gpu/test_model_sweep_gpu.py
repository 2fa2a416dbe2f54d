"""The model types the CPU sweep fuses (docs/models.md), on DeepGEMM: each as a small bf16 model
at expert sizes the SM90 kernel takes (hidden 512, moe_intermediate 256, 16 experts, top-2),
prepared with kernel="deepgemm" and compiled with the megamoe backend; every MoE layer must be
fused on the kernel, and the logits close to eager transformers (bf16 + FP8 noise; random routers
sit near ties, so a few positions may route otherwise: the median per position is bounded).
Run with ``pytest -m gpu tests/gpu``; skipped without CUDA/DeepGEMM."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import cos_diff, deepgemm_kernel_or_skip
from model_sweep import build, docs_fused

import megamoe_compile as mc
from megamoe_compile.ops import deepgemm

pytestmark = pytest.mark.gpu
GPU_SIZES = dict(hidden_size=512, moe_intermediate_size=256, intermediate_size=256, num_experts=16,
                 n_routed_experts=16, num_local_experts=16, num_attention_heads=16, num_key_value_heads=16,
                 shared_expert_intermediate_size=256)


@pytest.fixture(scope="module")
def sm90():
    kernel = deepgemm_kernel_or_skip()
    if kernel != deepgemm.SM90:
        pytest.skip("runs the SM90 kernel (recipe fp8)")
    return kernel


@pytest.mark.parametrize("model_type", docs_fused())
def test_swept_family_fused_on_deepgemm(sm90, model_type):
    torch._dynamo.reset()
    model = build(model_type, GPU_SIZES, max_parameters=2_000_000_000).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        out = model(input_ids=ids)
        eager = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()
        config = mc.MegaMoEConfig(kernel="deepgemm", inner_backend="eager", max_tokens_per_rank=256)
        mc.prepare(model, config)
        plans = mc.layer_plans(model)
        assert plans and all(p.fuse and p.kernel == sm90 for p in plans), [(p.name, p.reason) for p in plans]
        be = mc.backend(config)
        out = torch.compile(model, backend=be)(input_ids=ids)
        got = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()
    assert be.fusions and all(f.fused for f in be.fusions), [(f.name, f.reason) for f in be.fusions]
    flat_got, flat_eager = got.reshape(-1, got.shape[-1]), eager.reshape(-1, eager.shape[-1])
    positions = torch.tensor([cos_diff(a, b) for a, b in zip(flat_got, flat_eager)])
    print(f"\n[sweep-gpu] {model_type}: {len(plans)} MoE layers on {sm90}/{plans[0].recipe}, "
          f"E{plans[0].spec.num_experts} H{plans[0].spec.hidden} I{plans[0].spec.intermediate} top-{plans[0].spec.top_k}: "
          f"diff {cos_diff(got, eager):.2e} (per position median {positions.median():.2e}, max {positions.max():.2e})")
    assert positions.median() < 2e-2
