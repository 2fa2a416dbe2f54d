"""megamoe-compile: `torch.compile(model, backend="megamoe")` for Hugging Face MoE models, DeepSeek-V4 first.

    import megamoe_compile as mc
    mc.prepare(model, mc.MegaMoEConfig(skip_layers=[0]))   # load time: plan + kernel-ready weights
    compiled = torch.compile(model, backend="megamoe")
    print(mc.explain(model, input_ids))                      # what was fused, and why not

Data flows one way: config -> prepare (weights) -> pass (graph) -> ops (kernels).
"""

from . import ops  # noqa: F401  (defines torch.ops.megamoe.*)
from .backend import CompiledGraph, MegaMoEBackend, backend, compile, megamoe_backend
from .config import MegaMoEConfig
from .decode import DeepseekV4StaticCache, cache_keyword, disable_static_decode, enable_static_decode
from .explain import LayerReport, MoEReport, explain
from .layer_state import LayerPlan, UnsupportedLayerError, layer_plans
from .prepare import prepare

__all__ = [
    "CompiledGraph", "DeepseekV4StaticCache", "LayerPlan", "LayerReport", "MegaMoEBackend", "MegaMoEConfig",
    "MoEReport", "UnsupportedLayerError", "backend", "cache_keyword", "compile", "disable_static_decode",
    "enable_static_decode", "explain", "layer_plans", "megamoe_backend", "prepare",
]
__version__ = "0.1.0"


def _register_backend() -> None:
    # When dynamo resolves "megamoe" through our entry point it imports this package and then
    # registers the entry point's object itself; registering here too would be a duplicate.
    from torch._dynamo.backends import registry

    if "megamoe" in registry._COMPILER_FNS or registry._BACKENDS.get("megamoe") is not None:
        return
    registry.register_backend(megamoe_backend, name="megamoe")


_register_backend()
