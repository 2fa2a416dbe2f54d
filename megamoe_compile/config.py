"""`MegaMoEConfig`: every choice the library makes, in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops import recipes
from .ops.fused_moe import DEFAULT_MAX_TOKENS_PER_RANK

KERNELS = ("auto", "reference", "deepgemm")
# What each recipe stores and computes: the table in ops/recipes.py ("auto": the kernel's default).
RECIPES = ("auto", *recipes.RECIPES)
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
EP_MODES = ("none", "local_batch", "shared_batch")

FilterFn = Callable[[torch.nn.Module, str], bool]


@dataclass(frozen=True)
class MegaMoEConfig:
    """What to fuse, with which kernel and numerics, and how to compile the rest.

    Layer selection: a MoE layer is fused only if it passes all of `skip_layers` (decoder-layer
    indices to leave alone), `include`/`exclude` (fnmatch patterns on the MoE block's module name,
    e.g. ``"model.layers.1?.mlp"``) and `filter_fn(module, name)` (called with the MoE block).
    """

    kernel: str = "auto"
    recipe: str = "auto"
    skip_layers: Sequence[int] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    filter_fn: FilterFn | None = field(default=None, compare=False)
    inner_backend: str = "inductor"
    # DeepGEMM's symmetric buffer holds this many tokens per rank and call; a larger call fails
    # with a clear error before reaching the kernel.
    max_tokens_per_rank: int = DEFAULT_MAX_TOKENS_PER_RANK
    # Drop the original expert weights once the kernel-ready copy exists (saves memory; the
    # unfused eager path of those layers then runs the fused op instead).
    release_original_weights: bool = False
    # Expert parallelism (several GPUs): "local_batch" = each rank has its own tokens,
    # "shared_batch" = all ranks hold the same batch and each fuses a slice of it.
    ep_mode: str = "none"
    ep_group: Any = field(default=None, compare=False)
    # Debugging aid for expert parallelism: before every fused call the ranks compare which layer
    # and which call they are at, and all raise if they differ, instead of hanging in the kernel.
    # Costs a small all-gather and a host sync per call; not under CUDA graphs.
    ep_check_calls: bool = False

    def __post_init__(self) -> None:
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("recipe", self.recipe, RECIPES)
        _check_choice("inner_backend", self.inner_backend, INNER_BACKENDS)
        _check_choice("ep_mode", self.ep_mode, EP_MODES)
        for name in ("skip_layers", "include", "exclude"):
            value = getattr(self, name)
            # bytes and str are Sequences too, but never lists of indices or patterns.
            if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Sequence):
                raise ValueError(
                    f"MegaMoEConfig.{name} must be a sequence (list, tuple, range), got {type(value).__name__}: "
                    f"{value!r}"
                )
            object.__setattr__(self, name, tuple(value))
        for i in self.skip_layers:
            if not _is_int(i) or i < 0:
                raise ValueError(f"MegaMoEConfig.skip_layers must hold decoder-layer indices >= 0 (ints), got {i!r}")
        for p in (*self.include, *self.exclude):
            if not isinstance(p, str):
                raise ValueError(f"MegaMoEConfig.include/exclude hold fnmatch patterns (str), got {p!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError("MegaMoEConfig.filter_fn must be callable as filter_fn(module, name) -> bool")
        if not _is_int(self.max_tokens_per_rank) or self.max_tokens_per_rank < 1:
            raise ValueError(
                f"MegaMoEConfig.max_tokens_per_rank must be a positive int, got {self.max_tokens_per_rank!r}"
            )
        for name in ("release_original_weights", "ep_check_calls"):
            # Strict: "false", None, 0 or 2 read as a bool would silently pick a side; the first
            # of these frees weights for good.
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MegaMoEConfig.{name} must be True or False, got "
                                 f"{type(getattr(self, name)).__name__}: {getattr(self, name)!r}")
        if self.ep_mode == "none" and (self.ep_group is not None or self.ep_check_calls):
            raise ValueError("MegaMoEConfig.ep_group/ep_check_calls are set but ep_mode is 'none'; "
                             "choose 'local_batch' or 'shared_batch'")

    def check_layers_exist(self, layer_indices: Sequence[int]) -> None:
        """`skip_layers` must name decoder layers that hold a MoE block (prepare calls this)."""
        missing = sorted(set(self.skip_layers) - set(layer_indices))
        if missing:
            raise ValueError(f"MegaMoEConfig.skip_layers names layers {missing} that have no MoE block in this "
                             f"model (its MoE layers: {sorted(set(layer_indices))})")

    # -- layer selection -------------------------------------------------------------------
    def selects(self, module: torch.nn.Module, name: str, layer_index: int | None) -> tuple[bool, str]:
        """Whether the MoE block `name` is to be fused, and if not, why (for the report)."""
        if layer_index is not None and layer_index in self.skip_layers:
            return False, f"skipped by config: layer {layer_index} is in skip_layers"
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False, f"skipped by config: {name!r} matches no include pattern {list(self.include)}"
        for p in self.exclude:
            if fnmatch.fnmatchcase(name, p):
                return False, f"skipped by config: {name!r} matches exclude pattern {p!r}"
        if self.filter_fn is not None and not self.filter_fn(module, name):
            return False, "skipped by config: filter_fn returned False"
        return True, ""

    def plan_key(self) -> tuple:
        """The fields that decide prepare's per-layer plans and weights: not how the rest compiles
        (inner_backend), nor the buffer size (max_tokens_per_rank only reserves a buffer)."""
        return (self.kernel, self.recipe, self.skip_layers, self.include, self.exclude, id(self.filter_fn),
                self.release_original_weights, self.ep_mode, id(self.ep_group))

    def replace(self, **changes: Any) -> MegaMoEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def split_options(cls, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split torch.compile `options=` into our fields and the rest (for the inner compiler)."""
        ours = {f.name for f in dataclasses.fields(cls)}
        options = dict(options or {})
        return {k: options.pop(k) for k in list(options) if k in ours}, options


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"MegaMoEConfig.{name} must be one of {list(allowed)}, got {value!r}")
