"""What this library knows of Hugging Face transformers' MoE models: one module per kind of block.

* `deepseek_v4`: DeepSeek-V4's MoE block (its routers are checked op by op and fused too);
* `experts_interface`: every block whose experts run through transformers' experts interface;
* `fp8_checkpoints`: quantized checkpoints (`FP8Experts`, FP8 blocks or MXFP4, their scales);
* `expert_parallel`: experts sharded by transformers' own expert parallelism (DTensors);
* `spec`: `MoESpec` and its one builder; `versions`: the tested transformers releases.

Every assumption about transformers' module classes and attributes lives in this package, so that a
new transformers release is checked against one place (README: tested versions). The graph pass
relies on these facts too and re-checks them against the traced graph. Nothing here imports the
rest of the library but `ops` (what a stored format means).
"""

from __future__ import annotations

import torch

from . import deepseek_v4, experts_interface
from .expert_parallel import local_tensor
from .fp8_checkpoints import FP8_EXPERTS_CLASS, fp8_integration, is_fp8_experts
from .spec import MoESpec, experts_implementation, layer_index, refresh
from .versions import TESTED_TRANSFORMERS, tested_range_text, transformers_version, untested_transformers

# Said when a model has no MoE layer we recognise.
RECOGNISED_FAMILIES = ("recognised: DeepSeek-V4 (DeepseekV4SparseMoeBlock) and every MoE block whose experts run "
                       "through transformers' experts interface (Qwen-MoE, DeepSeek-V2/V3, GLM-4.5, MiniMax-M2, "
                       "Mixtral, OLMoE, ...), dense or FP8Experts")

__all__ = [
    "FP8_EXPERTS_CLASS", "RECOGNISED_FAMILIES", "TESTED_TRANSFORMERS", "MoESpec", "block_part_suffix", "describe",
    "experts_implementation", "find_moe_blocks", "fp8_integration", "is_fp8_experts", "layer_index", "local_tensor",
    "refresh", "tested_range_text", "transformers_version", "unrecognised_moe_modules", "untested_transformers",
]


def find_moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every MoE block: a DeepSeek-V4 `DeepseekV4SparseMoeBlock`, or any module whose
    `experts` child stacks its experts' weights (Qwen-MoE, DeepSeek-V3, Mixtral, ...)."""
    return [(name, module) for name, module in model.named_modules()
            if deepseek_v4.is_v4_block(module) or experts_interface.holds_stacked_experts(module)]


def describe(name: str, block: torch.nn.Module) -> tuple[MoESpec | None, str]:
    """A MoE block's spec; (None, reason) when it is not a structure the fused op can take."""
    if deepseek_v4.is_v4_block(block):
        return deepseek_v4.describe(name, block)
    return experts_interface.describe(name, block)


def block_part_suffix(cls: type) -> str | None:
    """For a module class met in dynamo's `nn_module_stack`: its path suffix within a MoE block
    ("" for a DeepSeek-V4 block, ".gate" for its routers, ".experts" for any experts-interface
    class), or None for other classes. The pass names blocks prepare never planned this way."""
    suffix = deepseek_v4.block_part_suffix(cls)
    if suffix is not None:
        return suffix
    return ".experts" if isinstance(cls, type) and experts_interface.is_experts_interface(cls) else None


def unrecognised_moe_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, reason) of each module that looks like a MoE layer but is no block `find_moe_blocks` finds."""
    return experts_interface.unrecognised_moe_modules(model, [name for name, _ in find_moe_blocks(model)])
