"""Reference kernel: the fused MoE in plain torch, on any device.

Recipe "none" computes what Hugging Face's experts code computes (matmuls in the activation
dtype). Recipes "fp8", "fp8_fp4" and "fp4_fp4" emulate DeepGEMM's numerics: weights as stored,
activations fake-quantized per group before each GEMM, so the CPU shows the accuracy the GPU
kernel will have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import groups, quant, recipes
from .fused_moe import Kernel, register

_DEQUANTIZE = {"fp8": quant.dequantize_fp8_blocks, "mxfp4": quant.dequantize_mxfp4}  # by weight format


def expert_weight(w: torch.Tensor, scale: torch.Tensor | None, recipe: str, e: int) -> torch.Tensor:
    """Expert `e`'s weight [N, K] as a float tensor, dequantized from the recipe's storage."""
    r = recipes.recipe(recipe)
    if r.weight_dtype is None:
        return w[e]
    return _DEQUANTIZE[r.weight_format](w[e], scale[e])


def _activations(x: torch.Tensor, recipe: str, gemm: int) -> torch.Tensor:
    """x as GEMM `gemm` (1 or 2) of the recipe's kernel reads it."""
    r = recipes.recipe(recipe)
    if r.activation is None:
        return x
    if r.activation == "mxfp4":
        # w4a4: DeepGEMM's pre-dispatch stages the hidden states rounding ties down; the L1
        # epilogue converts the SwiGLU output with the hardware's round-to-nearest-even.
        return quant.fake_quantize_mxfp4_activations(x.float(), ties="down" if gemm == 1 else "even")
    return quant.fake_quantize_fp8_groups(x.float(), r.act_group, power_of_two_scale=r.act_pow2)


def reference_fused_moe(
    x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, *,
    recipe, routed_scaling_factor, swiglu_limit, group_name,
):
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # It loops over the experts that were hit, read on the host: no CUDA graph can hold that.
        raise RuntimeError("megamoe: the reference kernel cannot run inside a CUDA-graph capture (it reads the "
                           "routed expert ids on the host); on a GPU use kernel='deepgemm', or compile without "
                           "CUDA graphs (no mode='reduce-overhead')")
    if group_name:
        return _expert_parallel(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, recipe=recipe,
                                routed_scaling_factor=routed_scaling_factor, swiglu_limit=swiglu_limit,
                                group_name=group_name)
    out = _local_experts(x, topk_idx, topk_weights * routed_scaling_factor, w1, w1_scale, w2, w2_scale,
                         recipe, swiglu_limit, first_expert=0, num_experts=w1.shape[0])
    return out.to(x.dtype)


def _expert_parallel(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, *, recipe,
                     routed_scaling_factor, swiglu_limit, group_name):
    """Expert parallelism with plain collectives (any backend, gloo included): every rank sees
    every rank's tokens, adds what its own experts contribute, and the sums come back home."""
    import torch.distributed as dist

    group = groups.resolve(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = w1.shape[0]
    counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device), group=group)
    counts = [int(c) for c in counts]
    most = max(counts)

    def gather(t, fill):
        padded = t.new_full((most, *t.shape[1:]), fill)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat(parts)

    # Padding rows route to expert -1, which no rank owns.
    xs, ids, ws = gather(x, 0), gather(topk_idx, -1), gather(topk_weights * routed_scaling_factor, 0)
    partial = _local_experts(xs, ids, ws, w1, w1_scale, w2, w2_scale, recipe, swiglu_limit,
                             first_expert=rank * local, num_experts=local * world)
    dist.all_reduce(partial, group=group)
    return partial[rank * most: rank * most + counts[rank]].to(x.dtype)


def _local_experts(x, topk_idx, weights, w1, w1_scale, w2, w2_scale, recipe, swiglu_limit, *,
                   first_expert, num_experts):
    """float32 [T, H]: the contribution of experts [first_expert, first_expert + w1.shape[0])."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return out
    compute_dtype = x.dtype if recipes.recipe(recipe).weight_dtype is None else torch.float32
    # One pass per expert that some token picked: only those weights are read (and dequantized).
    for global_e in torch.unique(topk_idx).tolist():
        if not -1 <= global_e < num_experts:  # -1: no expert (padding rows, masked slots)
            raise ValueError(f"reference kernel: expert id {global_e} outside [0, {num_experts})")
        e = global_e - first_expert
        if not 0 <= e < w1.shape[0]:
            continue  # another rank's expert, or none
        token, slot = torch.where(topk_idx == global_e)
        h = F.linear(_activations(x[token], recipe, 1).to(compute_dtype),
                     expert_weight(w1, w1_scale, recipe, e).to(compute_dtype))
        gate, up = h.chunk(2, dim=-1)
        if swiglu_limit is not None:
            gate = gate.clamp(max=swiglu_limit)
            up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        h = F.silu(gate) * up
        y = F.linear(_activations(h, recipe, 2).to(compute_dtype),
                     expert_weight(w2, w2_scale, recipe, e).to(compute_dtype))
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out


class ReferenceKernel(Kernel):
    """Plain torch on any device, every recipe (emulated); no layout, buffers or warm-up."""

    def run(self, *args, **kwargs) -> torch.Tensor:
        return reference_fused_moe(*args, **kwargs)


register(ReferenceKernel("reference", tuple(recipes.RECIPES)))
