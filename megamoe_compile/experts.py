"""The experts implementation `prepare` installs where a fused layer's eager forward must run the op.

Two cases: with `MegaMoEConfig(release_original_weights=True)` only the kernel-ready copy of the
expert weights remains; with experts that transformers' expert parallelism sharded, its dispatch
(local ids, masking, all-reduce) is replaced by the op over the same ranks. The layer's experts
then run through transformers' own `ExpertsInterface` under the name "megamoe", which calls the
fused op. dynamo traces that call as it is; the pass recognises it as already fused.
"""

from __future__ import annotations

import torch

IMPLEMENTATION = "megamoe"


def megamoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    plan = self._megamoe_plan
    # Scales are absent for recipe "none" (weights as the model holds them).
    w1, w1_scale, w2, w2_scale = (getattr(self, "megamoe_" + k, None) for k in ("w1", "w1_scale", "w2", "w2_scale"))
    # The router already applied routed_scaling_factor to these weights.
    return torch.ops.megamoe.fused_moe(
        hidden_states, top_k_index.to(torch.int32), top_k_weights.to(torch.float32),
        w1, w1_scale, w2, w2_scale, kernel=plan.kernel, recipe=plan.recipe,
        routed_scaling_factor=1.0, swiglu_limit=plan.spec.swiglu_limit,
        group_name=plan.group_name, shared_batch=plan.shared_batch,
    )


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, megamoe_experts_forward)
