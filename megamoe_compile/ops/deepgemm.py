"""DeepGEMM MegaMoE kernels behind `megamoe.fused_moe` (SM90 `fp8_mega_moe`, SM100 `fp8_fp4_mega_moe`).

Importing this module never imports deep_gemm; availability is probed on first use.
"""

from __future__ import annotations

import functools

import torch

from .. import hf
from .layouts import KernelWeights


@functools.cache
def _deep_gemm():
    """(module, "") or (None, reason) for the installed deep_gemm."""
    try:
        import deep_gemm
    except Exception as e:  # ImportError, or a host-glue ABI mismatch surfacing as OSError/RuntimeError
        return None, (f"deep_gemm is not importable ({type(e).__name__}: {e}); install the extra "
                      f"'megamoe-compile[deepgemm]' with the sgl-deep-gemm release built for torch "
                      f"{torch.__version__.split('+')[0]} (0.1.4.post1-0.1.5 for torch 2.11, 0.2.x for torch >= 2.13)")
    return deep_gemm, ""


def kernel_for(spec: hf.MoESpec) -> tuple[str | None, str]:
    """The DeepGEMM kernel for this layer on its device, or (None, why not)."""
    if spec.device.type != "cuda":
        return None, f"DeepGEMM kernels need a CUDA GPU; the experts are on {spec.device}"
    major, minor = torch.cuda.get_device_capability(spec.device)
    if major == 9:
        kernel, entry = "deepgemm_sm90", "fp8_mega_moe"
    elif major == 10:
        kernel, entry = "deepgemm_sm100", "fp8_fp4_mega_moe"
    else:
        return None, f"DeepGEMM MegaMoE needs sm_90 (Hopper) or sm_100 (Blackwell); this GPU is sm_{major}{minor}"
    dg, why = _deep_gemm()
    if dg is None:
        return None, why
    if not hasattr(dg, entry):
        return None, f"deep_gemm {getattr(dg, '__version__', '?')} has no {entry}; sgl-deep-gemm >= 0.1.4 has it"
    return kernel, ""


def layout_weights(kernel: str, weights: KernelWeights) -> KernelWeights:
    raise NotImplementedError(f"{kernel}: weight layout not implemented yet")
