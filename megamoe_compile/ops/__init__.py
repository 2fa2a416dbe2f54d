"""Custom ops and the kernels behind them.

`fused_moe` (the op), the kernel registry, and the kernels: `reference` (plain torch, any
device) and the DeepGEMM kernels (`deepgemm_sm90`, `deepgemm_sm100`). Both kernel modules are
imported here and register their kernels; `deep_gemm` itself is not imported until a DeepGEMM
kernel is asked whether it can run (or used).
"""

from . import (
    deepgemm,  # noqa: F401  (registers "deepgemm_sm90"/"deepgemm_sm100"; imports no deep_gemm)
    reference,  # noqa: F401  (registers the "reference" kernel)
)
from .fused_moe import fused_moe, kernel_names, register_kernel

__all__ = ["fused_moe", "kernel_names", "register_kernel"]
