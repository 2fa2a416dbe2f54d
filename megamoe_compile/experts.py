"""The experts implementation "megamoe" that `prepare` gives every layer it plans to fuse.

transformers' experts modules pick their forward by name through `ExpertsInterface`
(`config._experts_implementation`); prepare gives each fused layer's experts their own config
naming "megamoe", which runs:

* in eager mode, the layer's own implementation, unchanged (the model computes what it did);
* while dynamo traces it, `megamoe.prepared_weights(...)` on the layer's kernel-ready weights,
  then the traceable implementation the pass recognises. dynamo thereby reads the kernel-ready
  tensors as this module's state (graph inputs, guarded like buffers: a second model of the same
  architecture runs the same graph on its own tensors) and guards on the string that names the
  implementation and on the plan's constants, so a re-planned layer recompiles;
* where prepare set the original weights aside (`release_original_weights=True`, or experts
  sharded by transformers' expert parallelism, whose dispatch the op replaces), the fused op
  itself, eager and compiled; the pass then finds the op already in the graph.
"""

from __future__ import annotations

import inspect

import torch

from . import layer_state as state

IMPLEMENTATION = "megamoe"


def megamoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    plan = state.plan_of(self)
    if plan.eager_fused:
        # The router already applied routed_scaling_factor to these weights.
        args, kwargs = state.fused_call(plan, hidden_states, top_k_index.to(torch.int32),
                                        top_k_weights.to(torch.float32), state.kernel_ready(self),
                                        getattr(self, "limit", None))
        return torch.ops.megamoe.fused_moe(*args, **kwargs)
    # The implementation the model is configured with now: `model.set_experts_implementation(...)`
    # after prepare is followed (the pass then finds the layer planned for another one and says so).
    configured = state.configured_implementation(self)
    if torch.compiler.is_compiling():
        torch.ops.megamoe.prepared_weights(*state.kernel_ready(self), *state.marker_constants(plan))
        implementation = plan.spec.traced_base if configured == plan.spec.experts_implementation else configured
    else:
        implementation = configured
    return _implementation(self, plan, implementation)(self, hidden_states, top_k_index, top_k_weights)


def _implementation(experts: torch.nn.Module, plan, name: str | None):
    if name in (None, "eager"):
        # The class's own forward, under every `use_experts_implementation` wrapper.
        return inspect.unwrap(type(experts).forward)
    # transformers' fine-grained FP8 experts dispatch through their own interface; all others share one.
    return _INTERFACES.get(plan.spec.experts_class, _INTERFACES["dense"])[name]


# "dense" or an experts class name -> the transformers `ExpertsInterface` its forward dispatches through. Filled
# by `register()` at prepare time, so that a traced forward imports nothing (dynamo cannot trace
# an import of transformers' lazy modules on every torch release).
_INTERFACES: dict[str, object] = {}


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    from . import models

    ExpertsInterface.register(IMPLEMENTATION, megamoe_experts_forward)
    _INTERFACES["dense"] = ALL_EXPERTS_FUNCTIONS
    fp8 = models.fp8_integration()
    if fp8 is not None and hasattr(fp8, "FP8ExpertsInterface"):
        fp8.FP8ExpertsInterface.register(IMPLEMENTATION, megamoe_experts_forward)
        _INTERFACES[models.FP8_EXPERTS_CLASS] = fp8.ALL_FP8_EXPERTS_FUNCTIONS
