"""Process-group state of the fused op, in one place: which group a `group_name` means, the
private world-size-1 group a single GPU uses, shared-batch slicing, and the opt-in lockstep check.

State kept across calls (per process): groups resolved by name (`_GROUPS`), one private group per
GPU (`_PRIVATE_GROUPS`), and per group the number of fused calls made so far when the lockstep
check is on (`_STEP_CHECKS`). At load time, `ExpertParallel` says which experts this rank holds
and checks that every rank planned alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("megamoe_compile")

# group_name -> process group. The name "" is never stored here: it means "this process alone",
# a private group per device (`_PRIVATE_GROUPS`, device index -> group).
_GROUPS: dict[str, Any] = {}
_PRIVATE_GROUPS: dict[int, Any] = {}


def register(group) -> str:
    """Make an expert-parallel process group known to the kernels; returns the op's `group_name`."""
    name = str(group.group_name)
    if not name:
        raise ValueError("megamoe: a process group without a name cannot be registered")
    _GROUPS[name] = group
    return name


def resolve(group_name: str, device: torch.device | None = None):
    """The process group a `fused_moe` call with `group_name` runs over.

    "" is this process alone: on a GPU `device`, a private world-size-1 NCCL group (DeepGEMM's
    symmetric buffers need one); a name is a group registered here or with torch.distributed."""
    if group_name == "":
        if device is None:
            raise ValueError("megamoe: the private group of group_name '' exists per GPU; pass its device")
        return _private_group(device)
    group = _GROUPS.get(group_name)
    if group is None:  # a torch.distributed group, found by its name
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(group_name)
        except Exception:
            raise RuntimeError(f"megamoe: process group {group_name!r} is not registered with torch.distributed "
                               f"nor here (known here: {sorted(_GROUPS)}); expert parallelism needs "
                               "torch.distributed initialised on every rank (or call "
                               "megamoe_compile.ops.groups.register)") from None
        _GROUPS[group_name] = group
    return group


def device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _private_group(device: torch.device):
    index = device_index(device)
    group = _PRIVATE_GROUPS.get(index)
    if group is None:
        group = _PRIVATE_GROUPS[index] = _make_private_group(index)
    return group


def _make_private_group(device_index: int):
    """A world-size-1 NCCL process group over a private HashStore, for one GPU.

    Built the way c10d builds a group, but registered only under its own name: the default group
    is untouched, so `torch.distributed.init_process_group` still works afterwards. DeepGEMM's
    symmetric buffer rendezvous resolves the group by name and reads its store.
    """
    from torch._C._distributed_c10d import (
        HashStore,
        PrefixStore,
        ProcessGroup,
        ProcessGroupNCCL,
        _register_process_group,
    )

    name = f"megamoe_private_cuda{device_index}_pid{os.getpid()}"
    store = PrefixStore(f"{name}/", HashStore())
    group = ProcessGroup(store, 0, 1)
    options = ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    for attr, value in (("group_name", name), ("global_ranks_in_group", [0])):
        with contextlib.suppress(Exception):
            setattr(options, attr, value)
    backend = ProcessGroupNCCL(PrefixStore("cuda/", store), 0, 1, options)
    with contextlib.suppress(Exception):
        backend._set_sequence_number_for_group()
    group._set_default_backend(ProcessGroup.BackendType.NCCL)
    group._register_backend(torch.device("cuda"), ProcessGroup.BackendType.NCCL, backend)
    with contextlib.suppress(Exception):
        group.bound_device_id = torch.device("cuda", device_index)
    group._set_group_name(name)
    _register_process_group(name, group)
    # Symmetric-memory backends that look the store up by name (older torch) find it here too.
    with contextlib.suppress(Exception):
        torch._C._distributed_c10d._SymmetricMemory.set_group_info(
            name, 0, 1, PrefixStore("symmetric_memory-0", store))
    log.info("megamoe: made private world-size-1 NCCL group %s for cuda:%d", name, device_index)
    return group


# -- shared batch -----------------------------------------------------------------------------

def shared_batch(run, x, topk_idx, topk_weights, group_name: str):
    """Every rank holds the same T tokens: rank r fuses rows [r*S, (r+1)*S), S = ceil(T / W), and
    the slices are gathered so that every rank gets all T rows."""
    import torch.distributed as dist

    group = resolve(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tokens = x.shape[0]
    per_rank = -(-tokens // world)
    lo, hi = min(rank * per_rank, tokens), min((rank + 1) * per_rank, tokens)
    mine = run(x[lo:hi], topk_idx[lo:hi], topk_weights[lo:hi])
    padded = mine.new_zeros(per_rank, x.shape[1])
    padded[: hi - lo] = mine
    gathered = padded.new_empty(world * per_rank, x.shape[1])
    dist.all_gather_into_tensor(gathered, padded, group=group)
    return gathered[:tokens]


# -- lockstep check (MegaMoEConfig.ep_check_calls) -------------------------------------------------

# group name -> fused calls made so far, for the groups the check is on for.
_STEP_CHECKS: dict[str, int] = {}


def check_calls(group_name: str, enabled: bool) -> None:
    """Turn the per-call lockstep check on or off for an expert-parallel group."""
    if enabled:
        _STEP_CHECKS.setdefault(group_name, 0)
    else:
        _STEP_CHECKS.pop(group_name, None)


def checks_calls(group_name: str) -> bool:
    return bool(group_name) and group_name in _STEP_CHECKS


def check_in_step(group_name: str, layer_id: int, device: torch.device) -> None:
    """Before a fused call, all ranks compare (layer, call number): a rank that skipped or added a
    call makes every rank raise here, instead of all of them waiting forever inside a kernel that
    synchronises the group. `layer_id` is the layer's number, the same on every rank (prepare
    gives it to the op). Costs one small all-gather and a host sync per call; skipped while a
    CUDA graph is being captured (replays run no Python). A rank that stopped calling altogether
    cannot be detected this way: the others wait in the all-gather until the group's timeout."""
    import torch.distributed as dist

    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    group = resolve(group_name)
    call = _STEP_CHECKS[group_name]
    _STEP_CHECKS[group_name] = call + 1
    mine = torch.tensor([layer_id, call], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    stamps = [tuple(t.tolist()) for t in every]
    if len(set(stamps)) > 1:
        where = ", ".join(f"rank {r}: layer {layer} call {n}" for r, (layer, n) in enumerate(stamps))
        raise RuntimeError(f"megamoe: expert-parallel ranks are out of step before a fused MoE call ({where}); "
                           "every rank must make the same MoE calls in the same order (generate with "
                           "synced_gpus=True; give every rank the same number of forward passes)")


# -- this rank's place in an expert-parallel group (load time) ----------------------------------

@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in the expert-parallel group a config names (`MegaMoEConfig.ep_mode`,
    `ep_group`), for planning: each rank's experts, and whether ranks planned alike."""

    group: object
    group_name: str
    world: int
    rank: int
    shared_batch: bool
    ranks: tuple[int, ...] = ()  # global ranks of the group, in group-rank order

    @classmethod
    def of(cls, ep_mode: str, ep_group=None) -> ExpertParallel | None:
        """None for ep_mode "none"; else the group (default: torch.distributed's world)."""
        if ep_mode == "none":
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"MegaMoEConfig.ep_mode={ep_mode!r} needs torch.distributed initialised "
                             "on every rank (e.g. under torchrun: dist.init_process_group())")
        group = ep_group or dist.group.WORLD
        return cls(group, register(group), dist.get_world_size(group), dist.get_rank(group),
                   ep_mode == "shared_batch", tuple(dist.get_process_group_ranks(group)))

    def local_range(self, name: str, num_experts: int) -> tuple[int, int]:
        """[first, last) global expert ids this rank holds of a layer's `num_experts` experts.

        Only for experts every rank holds whole: experts that transformers' expert parallelism
        already sharded keep the range its mesh gave them.
        """
        if num_experts % self.world:
            raise ValueError(f"{name}: {num_experts} experts cannot be split evenly over "
                             f"an expert-parallel group of {self.world} ranks")
        local = num_experts // self.world
        return self.rank * local, (self.rank + 1) * local

    def check_consistent(self, layers: list[tuple], *, one_host: bool, device: torch.device | None) -> None:
        """Fail on every rank, not hang in a kernel, when ranks planned differently (`layers`: one
        comparable tuple per layer) or, when `one_host`, when the group spans hosts."""
        import socket

        import torch.distributed as dist

        mine = {"host": socket.gethostname(), "layers": list(layers)}
        every = [None] * self.world
        # NCCL's object gather stages through the *current* CUDA device; pin it to the experts' GPU
        # (other libraries may have moved it, e.g. a device mesh built without LOCAL_RANK).
        cuda = device if device is not None and device.type == "cuda" else None
        with torch.cuda.device(cuda) if cuda is not None else contextlib.nullcontext():
            dist.all_gather_object(every, mine, group=self.group)
        for r, theirs in enumerate(every):
            if theirs["layers"] != mine["layers"]:
                diff = next((a, b) for a, b in zip(mine["layers"] + [None], theirs["layers"] + [None]) if a != b)
                raise ValueError(f"megamoe: expert-parallel ranks planned differently (rank {self.rank} vs rank {r}): "
                                 f"{diff[0]} != {diff[1]}; give every rank the same model and MegaMoEConfig")
        hosts = {theirs["host"] for theirs in every}
        if len(hosts) > 1 and one_host:
            raise ValueError(f"megamoe: the expert-parallel group spans hosts {sorted(hosts)}; DeepGEMM MegaMoE "
                             "exchanges tokens through NVLink symmetric memory within one node")
