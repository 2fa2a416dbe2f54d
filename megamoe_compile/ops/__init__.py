"""Custom ops and the kernels behind them.

`fused_moe` (the op), the kernel registry, and the kernels: `reference` (plain torch, any
device) and the DeepGEMM kernels (`deepgemm_sm90`, `deepgemm_sm100`), whose module is imported
only when DeepGEMM is used.
"""

from . import reference  # noqa: F401  (registers the "reference" kernel)
from . import deepgemm  # noqa: F401  (registers "deepgemm_sm90"/"deepgemm_sm100"; imports no deep_gemm)
from .fused_moe import fused_moe, kernel_names, register_kernel

__all__ = ["fused_moe", "kernel_names", "register_kernel"]
