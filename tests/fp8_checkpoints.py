"""FP8 checkpoint helpers shared by the tests (not a test module): FP8 128x128 weight blocks as
checkpoints store them, and a CPU stand-in for the hub kernel `kernels-community/finegrained-fp8`
that transformers' FP8Linear and FP8Experts call, so that a loaded FP8 model runs eagerly and traces
on CPU as it would on a GPU.

The stand-in's ops are defined with torch.library when this module is first imported, once per
process: tests import them from here (STANDIN_OPS, OTHER_OPS, standin_kernel), never define them.
"""

from __future__ import annotations

import torch
from transformers.integrations import finegrained_fp8 as tf8

from megamoe_compile.ops import quant

# -- a CPU stand-in for the hub kernel `kernels-community/finegrained-fp8` -----------------------
# Semantics from the kernel's published source: the grouped ops take raw activations sorted by
# expert and quantize them inside - FP8 block path: per row and 128-wide K block, scale amax/448;
# MXFP4 path: per 1x32, scale amax/448 rounded up to a power of two - multiply with the
# dequantized weights, accumulate in float32 and return A's dtype. Weights are dequantized here
# with transformers' own `Fp8Dequantize` (not this library's quant code).

_NS = "_finegrained_fp8_cpu_standin"


def _dequantize(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return tf8.Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.float32)


def _fake_quantize_activations(a: torch.Tensor, group: int, pow2: bool) -> torch.Tensor:
    a = a.float()
    if a.shape[-1] % group:
        return a
    g = a.reshape(*a.shape[:-1], a.shape[-1] // group, group)
    s = g.abs().amax(-1, keepdim=True) / 448.0
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s.clamp(min=2.0 ** -126))))
    q = (g / s.clamp(min=1e-12)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(a.shape)


def _grouped(A, B, Bs, offsets, group, pow2, out_dtype):
    C = torch.zeros(A.shape[0], B.shape[1], dtype=torch.float32)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            C[start:end] = _fake_quantize_activations(A[start:end], group, pow2) @ _dequantize(B[e], Bs[e]).T
        start = end
    return C.to(out_dtype or A.dtype)


def _define_grouped_ops(ns: str):
    @torch.library.custom_op(f"{ns}::w8a8_block_dynamic_fp8_matmul_grouped", mutates_args=())
    def fp8_block(A: torch.Tensor, B: torch.Tensor, Bs: torch.Tensor, offsets: torch.Tensor,
                  tokens_per_expert: torch.Tensor, block_size: list[int],
                  output_dtype: torch.dtype | None = None) -> torch.Tensor:
        return _grouped(A, B, Bs, offsets, block_size[1], False, output_dtype)

    @fp8_block.register_fake
    def _(A, B, Bs, offsets, tokens_per_expert, block_size, output_dtype=None):
        return A.new_empty(A.shape[0], B.shape[1], dtype=output_dtype or A.dtype)

    @torch.library.custom_op(f"{ns}::w4a8_mx_dynamic_fp4_matmul_grouped", mutates_args=())
    def fp4_mx(A: torch.Tensor, B: torch.Tensor, Bs: torch.Tensor, offsets: torch.Tensor,
               tokens_per_expert: torch.Tensor, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        return _grouped(A, B, Bs, offsets, 32, True, output_dtype)

    @fp4_mx.register_fake
    def _(A, B, Bs, offsets, tokens_per_expert, output_dtype=None):
        return A.new_empty(A.shape[0], B.shape[1], dtype=output_dtype or A.dtype)

    return getattr(torch.ops, ns)


@torch.library.custom_op(f"{_NS}::matmul_2d", mutates_args=())
def _matmul_2d(A: torch.Tensor, B: torch.Tensor, Bs: torch.Tensor, output_dtype: torch.dtype) -> torch.Tensor:
    group, pow2 = (32, True) if B.dtype == torch.int8 else (128, False)
    x = _fake_quantize_activations(A.reshape(-1, A.shape[-1]), group, pow2)
    return (x @ _dequantize(B, Bs).T).to(output_dtype).reshape(*A.shape[:-1], B.shape[0])


@_matmul_2d.register_fake
def _(A, B, Bs, output_dtype):
    return A.new_empty(*A.shape[:-1], B.shape[0], dtype=output_dtype)


STANDIN_OPS = _define_grouped_ops(_NS)
OTHER_OPS = _define_grouped_ops("some_other_kernels")  # same names, another library


def standin_kernel(grouped_ops) -> tf8.FineGrainedFP8:
    def matmul(input, weight, weight_scale_inv, block_size, output_dtype, activation_scale=None):
        return torch.ops._finegrained_fp8_cpu_standin.matmul_2d(input, weight, weight_scale_inv, output_dtype)

    def matmul_grouped(A, B, Bs, offsets, tokens_per_expert, block_size):
        if B.dtype == torch.int8:
            return grouped_ops.w4a8_mx_dynamic_fp4_matmul_grouped(A, B, Bs, offsets, tokens_per_expert, A.dtype)
        return grouped_ops.w8a8_block_dynamic_fp8_matmul_grouped(A, B, Bs, offsets, tokens_per_expert, block_size)

    def batched(*args, **kwargs):
        raise NotImplementedError("the CPU stand-in has no batched matmul")

    return tf8.FineGrainedFP8(matmul=matmul, batched_matmul=batched, grouped_matmul=matmul_grouped)


# -- quantized weights ------------------------------------------------------------------------

def fp8_blocks(v: torch.Tensor, pow2: bool):
    """FP8 128x128 blocks of a 2-D weight (edge blocks padded with zeros, as checkpoints do)."""
    n, k = v.shape
    padded = torch.zeros(-(-n // 128) * 128, -(-k // 128) * 128)
    padded[:n, :k] = v.float()
    q, s = quant.quantize_fp8_blocks(padded, power_of_two_scale=pow2, experts_per_chunk=None)
    return q[:n, :k].contiguous(), s
