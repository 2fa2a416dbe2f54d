"""The experts implementation `prepare` installs on layers whose original weights it released.

With `MegaMoEConfig(release_original_weights=True)` only the kernel-ready copy of a fused layer's
expert weights remains, so its eager forward must use it too: the layer's experts run through
transformers' own `ExpertsInterface` under the name "megamoe", which calls the fused op.
dynamo traces that call as it is; the pass recognises it as already fused.
"""

from __future__ import annotations

import torch

IMPLEMENTATION = "megamoe"


def megamoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    plan = self._megamoe_plan
    w1, w1_scale, w2, w2_scale = (getattr(self, "megamoe_" + k) for k in ("w1", "w1_scale", "w2", "w2_scale"))
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
