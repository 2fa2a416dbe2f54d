"""Experts that transformers' own expert parallelism sharded (DTensor parameters over an EP mesh)."""

from __future__ import annotations

import torch


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(experts: torch.nn.Module) -> bool:
    """Whether the experts' weights are distributed (by transformers' expert parallelism or otherwise)."""
    return getattr(experts, "_is_expert_parallel", False) or is_dtensor(experts.gate_up_proj) \
        or is_dtensor(experts.down_proj)


def transformers_ep_shard(experts: torch.nn.Module, gate: torch.nn.Module
                          ) -> tuple[tuple[tuple[int, int], tuple[int, ...]] | None, str]:
    """((first, last), ep_ranks) of experts that transformers' expert parallelism sharded, or (None, reason).

    Facts (transformers 5.23, `distributed/expert_parallel.py`): `DistributedConfig(ep_size=N)`
    applies the model's `base_model_ep_plan` (`apply_expert_parallelism`). Style "grouped_gemm"
    (`MoEParamShard(Shard(0), shards_expert_dim=True)`) turns `gate_up_proj`/`down_proj` into DTensor
    parameters `Shard(0)` on the 1-D EP mesh, global shape [E, ...], local [E/N, ...]: EP-mesh rank r
    holds experts [r*E/N, (r+1)*E/N); it sets `num_experts = E/N` and `_is_expert_parallel = True`.
    Style "ep_dispatch_experts" installs `ep_forward` as the module's own `forward`: it runs an
    `EPImplementation` (AutoEP -> AllReduceEP at inference on a shared batch: ids of other ranks'
    experts become the sentinel E/N with weight 0, this rank's become local ids, the output is
    all-reduced) around the experts' class forward on the local shard. The router is not sharded:
    its ids are global. Anything else sharded (tensor parallelism's "moe_tp_experts": the expert
    weights split along N or K) is not a layout the fused op takes.
    """
    w1, w2 = experts.gate_up_proj, experts.down_proj
    if not getattr(experts, "_is_expert_parallel", False):
        placements = tuple(getattr(w1, "placements", ())), tuple(getattr(w2, "placements", ()))
        return None, (f"expert weights are DTensors {placements[0]}/{placements[1]} not sharded by transformers' "
                      "expert parallelism (tensor parallelism splits each expert; FSDP gathers them per call); "
                      "the pass does not fuse distributed expert weights")
    if not (is_dtensor(w1) and is_dtensor(w2)):
        return None, "experts are marked expert-parallel but their weights are not transformers' sharded DTensors"
    from torch.distributed.tensor import Shard

    mesh = w1.device_mesh
    if (w2.device_mesh != mesh or mesh.ndim != 1 or tuple(w1.placements) != (Shard(0),)
            or tuple(w2.placements) != (Shard(0),)):
        return None, (f"expert weights sharded as {tuple(w1.placements)}/{tuple(w2.placements)} over mesh "
                      f"{mesh}; transformers' expert parallelism shards dim 0 over one 1-D mesh")
    size, global_experts = mesh.size(), int(w1.shape[0])
    local = int(w1.to_local().shape[0])
    if global_experts != local * size or int(w2.shape[0]) != global_experts \
            or int(w2.to_local().shape[0]) != local or getattr(experts, "num_experts", local) != local:
        return None, (f"expert weights {tuple(w1.shape)} are not split evenly into {size} shards of "
                      f"{getattr(experts, 'num_experts', '?')} experts")
    if int(getattr(gate, "num_experts", global_experts)) != global_experts:
        return None, f"the router picks among {gate.num_experts} experts, the sharded experts hold {global_experts}"
    import torch.distributed as dist

    rank = mesh.get_local_rank()
    return ((rank * local, (rank + 1) * local), tuple(dist.get_process_group_ranks(mesh.get_group()))), ""
