"""The `megamoe::fused_moe` custom op: schema, shape function, and dispatch to a kernel.

One call computes a whole routed-experts MoE layer for the tokens of this rank:
dispatch -> FFN1 -> clamped SwiGLU -> FFN2 -> weighted combine. The graph pass emits this op;
which implementation runs is named by its `kernel` argument, fixed when `prepare` built the
weights for that kernel (their layout depends on it). Kernels register themselves here as
`Kernel` objects: what they run, and what prepare asks of them (can it take this layer, which
recipe, its weight layout, its buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import groups, provenance, quant, recipes
from .layouts import KernelWeights

# Tokens per rank and call a kernel's buffers hold unless told otherwise (MegaMoEConfig's default).
DEFAULT_MAX_TOKENS_PER_RANK = 8192


@dataclass(frozen=True)
class LayerShape:
    """What a kernel needs to know of one MoE layer to say whether it can take it."""

    num_experts: int  # held by this process
    hidden: int
    intermediate: int
    top_k: int
    dtype: torch.dtype  # of the activations
    device: torch.device


@dataclass(frozen=True, eq=False)
class Kernel:
    """One implementation behind ``fused_moe(..., kernel=name)``: its facts (fields) and what prepare
    and the op ask of it (methods). A kernel library subclasses it and overrides the methods whose
    default does not hold for it (`ops/reference.py`, `ops/deepgemm.py`)."""

    name: str
    recipes: tuple[str, ...]
    # The recipe it runs unless told; None: the one that keeps the checkpoint's format (`recipes.keeping`).
    default: str | None = None
    family: str = ""  # what MegaMoEConfig.kernel names ("" = the kernel's own name)
    # Device types on which MegaMoEConfig(kernel="auto") picks this kernel's family; () = every
    # type no registered kernel claims.
    auto_on: tuple[str, ...] = ()
    # Whether its weight scales are the recipe's plain grid (else its own layout, unchecked).
    plain_scales: bool = True
    # The activation dtypes it computes on; () = any floating dtype.
    activation_dtypes: tuple[torch.dtype, ...] = ()
    hints: Mapping[str, str] = field(default_factory=dict)  # recipe -> added to "supports recipes"

    # -- what it computes --------------------------------------------------------------------------

    def run(self, x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, *, recipe: str,
            routed_scaling_factor: float, swiglu_limit: float | None, group_name: str) -> torch.Tensor:
        """The routed experts of one layer on checked arguments (see `fused_moe`)."""
        raise NotImplementedError(f"kernel {self.name} has no run()")

    # -- what it can take (prepare asks, at load time) ------------------------------------------------

    def device_problem(self, device: torch.device) -> str:
        """Why it cannot run on `device` (type, GPU capability), "" when it can; the family picks by it."""
        return ""

    def shape_problem(self, shape: LayerShape) -> str:
        """Why it cannot take a layer beyond its device (size multiples, library limits)."""
        return ""

    def library_problem(self, recipe: str) -> str:
        """Why the installed kernel library cannot run `recipe` ("" when it can)."""
        return ""

    # -- what it needs before the first call (load time) ---------------------------------------------

    def layout(self, weights: KernelWeights, recipe: str) -> KernelWeights:
        """The weights in the recipe's plain layout -> the kernel's own."""
        return weights

    def reserve(self, shape: LayerShape, max_tokens_per_rank: int, group: Any, recipe: str) -> Any:
        """Buffers for layers of this shape (None when it needs none)."""
        return None

    def warm_up(self, weights: KernelWeights, shape: LayerShape, recipe: str, swiglu_limit: float | None,
                group_name: str) -> None:
        """One call at load time, so that JIT compilation and first-use allocations happen before any
        CUDA-graph capture."""
        return None

    def __post_init__(self):
        object.__setattr__(self, "recipes", tuple(self.recipes))
        object.__setattr__(self, "family", self.family or self.name)
        for name in (*self.recipes, *([self.default] if self.default else [])):
            recipes.recipe(name)

    def default_recipe(self, weight_format: str) -> str:
        return self.default or recipes.keeping(weight_format)

    def refuses(self, shape: LayerShape) -> str:
        """Why it cannot take a layer of this shape on this device ("" when it can)."""
        return self.device_problem(shape.device) or self.activation_problem(shape.dtype) or self.shape_problem(shape)

    def activation_problem(self, dtype: torch.dtype) -> str:
        """Why it cannot compute on activations of `dtype` ("" when it can)."""
        if not self.activation_dtypes or dtype in self.activation_dtypes:
            return ""
        names = "/".join(str(d).removeprefix("torch.") for d in self.activation_dtypes)
        return f"{self.name} takes {names} activations; this layer runs in {dtype}"

    def refuses_recipe(self, recipe: str) -> str:
        """Why it does not run `recipe` at all ("" when it does); see also `library_problem`."""
        if recipe in self.recipes:
            return ""
        return f"kernel {self.name} supports recipes {list(self.recipes)}, not {recipe!r}{self.hints.get(recipe, '')}"


_KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    """Make `kernel` the implementation behind ``fused_moe(..., kernel=kernel.name)``."""
    _KERNELS[kernel.name] = kernel
    return kernel


@dataclass(frozen=True, eq=False)
class FunctionKernel(Kernel):
    """A kernel that is one function (`register_kernel`): `run` calls it; the rest is the defaults."""

    fn: Callable[..., torch.Tensor] | None = None

    def run(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)


def register_kernel(name: str, recipes: tuple[str, ...], **facts: Any):
    """Decorator: register `fn` as the kernel `name` for `recipes` (other `Kernel` fields by keyword)."""

    def wrap(fn):
        register(FunctionKernel(name, recipes, fn=fn, **facts))
        return fn

    return wrap


def kernel_names() -> tuple[str, ...]:
    return tuple(_KERNELS)


def get_kernel(name: str) -> Kernel:
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"megamoe.fused_moe: unknown kernel {name!r}; registered: {sorted(_KERNELS)}") from None


def auto_family(device: torch.device) -> str:
    """The family MegaMoEConfig(kernel="auto") uses on `device`: the first registered one that
    claims its device type, else the first that claims none."""
    claimed = [k for k in _KERNELS.values() if device.type in k.auto_on]
    return (claimed or [k for k in _KERNELS.values() if not k.auto_on])[0].family


def pick(family: str, shape: LayerShape) -> tuple[Kernel | None, str]:
    """The first registered kernel of `family` that runs on the layer's device, and why it cannot
    take the layer ("" when it can); (None, why) when none runs on that device."""
    members = [k for k in _KERNELS.values() if k.family == family]
    if not members:
        raise ValueError(f"megamoe: no kernel of family {family!r} is registered (kernels: {sorted(_KERNELS)})")
    for k in members:
        if not k.device_problem(shape.device):
            return k, k.activation_problem(shape.dtype) or k.shape_problem(shape)
    return None, members[0].device_problem(shape.device)


@torch.library.custom_op("megamoe::fused_moe", mutates_args=())
def fused_moe(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w1: torch.Tensor,
    w1_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    kernel: str,
    recipe: str,
    routed_scaling_factor: float,
    swiglu_limit: float | None,
    group_name: str = "",
    shared_batch: bool = False,
    layer_id: int = -1,
) -> torch.Tensor:
    """Routed experts of one MoE layer.

    x [T, H] (bf16/fp32); topk_idx [T, K] int32 global expert ids; topk_weights [T, K] float32,
    multiplied by `routed_scaling_factor` inside the op. w1 = gate/up [E, 2I, H] (gate rows first,
    or the kernel's own layout), w2 = down [E, H, I], in the storage of `recipe` with optional
    scales. Returns [T, H] in x.dtype.

    Expert parallelism: `group_name` names a process group ("" = this process alone) over which
    the experts are split evenly and contiguously (w1/w2 hold this rank's E / world_size experts;
    topk_idx holds global ids). Each rank passes its own tokens and gets them back fully combined;
    every rank must make the same calls. With `shared_batch` all ranks hold the same tokens: each
    computes an even slice of them and the slices are gathered, so every rank gets all rows.
    `layer_id` numbers the layer alike on every rank, for the opt-in lockstep check
    (MegaMoEConfig.ep_check_calls; -1 when it is off).
    """
    provenance.check_fresh(w1)  # a kernel-ready copy whose source weights changed since prepare is refused
    w1, w1_scale, w2, w2_scale = checked_arguments(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale,
                                                   kernel, recipe)
    impl = _KERNELS[kernel].run

    if groups.checks_calls(group_name):
        groups.check_in_step(group_name, layer_id, x.device)

    def run(x, topk_idx, topk_weights):
        return impl(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, recipe=recipe,
                    routed_scaling_factor=routed_scaling_factor, swiglu_limit=swiglu_limit,
                    group_name=group_name)

    if shared_batch and group_name:
        return groups.shared_batch(run, x, topk_idx, topk_weights, group_name)
    return run(x, topk_idx, topk_weights)


@fused_moe.register_fake
def _(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, kernel, recipe,
      routed_scaling_factor, swiglu_limit, group_name="", shared_batch=False, layer_id=-1):
    check_arguments(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, kernel, recipe)
    return x.new_empty(x.shape)


@torch.library.custom_op("megamoe::prepared_weights", mutates_args=())
def prepared_weights(w1: torch.Tensor, w1_scale: torch.Tensor | None, w2: torch.Tensor,
                     w2_scale: torch.Tensor | None, kernel: str, recipe: str, group_name: str,
                     shared_batch: bool, generation: str) -> None:
    """Marks, in a traced graph, the kernel-ready weights and op constants of one prepared layer.

    A prepared layer's experts call this (only while being compiled) before their unfused code,
    so that dynamo reads the kernel-ready tensors the way it reads parameters and buffers: as
    graph inputs of *this* model, guarded like any module state; the string and bool arguments
    are guarded too, so a re-planned layer recompiles (`generation` changes when prepare rebuilds a
    layer that a compile found stale, so that graph is not reused). The pass takes the weights and
    constants from here and removes the call; under another backend it does nothing.
    """
    return None


@prepared_weights.register_fake
def _(w1, w1_scale, w2, w2_scale, kernel, recipe, group_name, shared_batch, generation):
    return None


# Argument signatures (shapes, dtypes, devices of every tensor, kernel, recipe) that passed
# `check_arguments`: a real call with one of them skips the checks (at one token the op's host time
# is most of its cost). The fake implementation checks every call (tracing is not hot).
_CHECKED: set[tuple] = set()


def _signature(t) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device)


def checked_arguments(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, kernel: str, recipe: str):
    """`check_arguments`, once per argument signature; returns the weights in the recipe's dtypes."""
    key = (kernel, recipe, _signature(x), _signature(topk_idx), _signature(topk_weights), _signature(w1),
           _signature(w1_scale), _signature(w2), _signature(w2_scale))
    if key not in _CHECKED:
        views = check_arguments(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, kernel, recipe)
        _CHECKED.add(key)
        return views
    return _storage_views(recipes.recipe(recipe), w1, w1_scale, w2, w2_scale)


def _storage_views(r: recipes.Recipe, w1, w1_scale, w2, w2_scale) -> tuple:
    """The weights and scales viewed in the recipe's dtypes (kernel-ready copies are kept as integer bits)."""
    return (recipes.as_storage(w1, r.weight_dtype), recipes.as_storage(w1_scale, r.scale_dtype),
            recipes.as_storage(w2, r.weight_dtype), recipes.as_storage(w2_scale, r.scale_dtype))


def check_arguments(x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, kernel: str, recipe: str):
    """Every argument against the documented shapes and the recipe's storage (the real and the
    fake implementation both call this). Returns the weights viewed in the recipe's dtypes (the
    kernel-ready copies are kept as integer bits, see `recipes`)."""
    k = get_kernel(kernel)
    r = recipes.recipe(recipe)
    for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights), ("w1", w1), ("w1_scale", w1_scale),
                    ("w2", w2), ("w2_scale", w2_scale)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"megamoe.fused_moe: {name} is on {t.device}, x on {x.device}")
    if recipe not in k.recipes:
        raise ValueError(f"megamoe.fused_moe: kernel {kernel} takes recipes {list(k.recipes)}, got {recipe!r}")
    _check_common(x, topk_idx, topk_weights)
    for name, w in (("w1", w1), ("w2", w2)):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"megamoe.fused_moe: {name} must be a 3-D tensor [experts, N, K], got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    w1, w1_scale, w2, w2_scale = _storage_views(r, w1, w1_scale, w2, w2_scale)
    hidden = x.shape[1]
    torch._check(w1.shape[0] == w2.shape[0], lambda: f"megamoe.fused_moe: w1 holds {w1.shape[0]} experts, "
                 f"w2 {w2.shape[0]}")
    intermediate = w1.shape[1] // 2
    per_byte = r.values_per_byte
    torch._check(w1.shape[1] % 2 == 0 and w1.shape[2] * per_byte == hidden, lambda: (
        f"megamoe.fused_moe: w1 {tuple(w1.shape)} must be [experts, 2 * intermediate, hidden"
        f"{' / 2' if per_byte == 2 else ''}] for hidden {hidden} (recipe {recipe!r})"))
    torch._check(w2.shape[1] == hidden and w2.shape[2] * per_byte == intermediate, lambda: (
        f"megamoe.fused_moe: w2 {tuple(w2.shape)} must be [experts, hidden {hidden}, intermediate "
        f"{intermediate}{' / 2' if per_byte == 2 else ''}] (recipe {recipe!r})"))
    if r.weight_dtype is None:
        for name, w in (("w1", w1), ("w2", w2)):
            if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"megamoe.fused_moe: recipe 'none' takes float32/bfloat16/float16 {name}, got "
                                 f"{w.dtype}")
        if w1.dtype != w2.dtype or w1.dtype != x.dtype:
            raise ValueError(f"megamoe.fused_moe: recipe 'none' computes in x's dtype: x is {x.dtype}, "
                             f"w1 {w1.dtype}, w2 {w2.dtype}")
        if w1_scale is not None or w2_scale is not None:
            raise ValueError("megamoe.fused_moe: recipe 'none' takes no weight scales (w1_scale/w2_scale must be None)")
        return w1, w1_scale, w2, w2_scale
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dtype != r.weight_dtype and not (r.weight_dtype == torch.int8 and w.dtype == torch.uint8):
            raise ValueError(f"megamoe.fused_moe: recipe {recipe!r} stores {name} as {r.weight_dtype}, got {w.dtype}")
    for name, s, w in (("w1_scale", w1_scale, w1), ("w2_scale", w2_scale, w2)):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"megamoe.fused_moe: recipe {recipe!r} needs {name}")
        torch._check(s.dim() >= 1 and s.shape[0] == w.shape[0], lambda: (
            f"megamoe.fused_moe: {name} {tuple(s.shape)} must lead with the {w.shape[0]} experts"))
        if k.plain_scales:
            rows, cols = r.scale_block
            grid = (w.shape[0], w.shape[1] // rows, w.shape[2] * per_byte // cols)
            if r.ue8m0_scales and s.dtype not in quant.UE8M0_DTYPES:
                raise ValueError(f"megamoe.fused_moe: recipe {recipe!r} takes UE8M0 {name} (uint8), got {s.dtype}")
            if r.scale_dtype == torch.float32 and s.dtype != torch.float32:
                raise ValueError(f"megamoe.fused_moe: recipe {recipe!r} takes float32 {name}, got {s.dtype}")
            torch._check(s.dim() == 3 and tuple(s.shape) == grid, lambda: (
                f"megamoe.fused_moe: {name} {tuple(s.shape)} must be {grid}: one scale per "
                f"{rows}x{cols} block of {tuple(w.shape)} (recipe {recipe!r})"))
    return w1, w1_scale, w2, w2_scale


def _check_common(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"megamoe.fused_moe: x must be [tokens, hidden], got {tuple(x.shape)}")
    torch._check(
        topk_idx.dim() == 2 and topk_idx.shape == topk_weights.shape,
        lambda: f"megamoe.fused_moe: topk_idx {tuple(topk_idx.shape)} and topk_weights "
        f"{tuple(topk_weights.shape)} must both be [tokens, top_k]",
    )
    torch._check(
        topk_idx.shape[0] == x.shape[0],
        lambda: f"megamoe.fused_moe: {x.shape[0]} tokens in x but {topk_idx.shape[0]} in topk_idx",
    )
    torch._check(topk_idx.dtype == torch.int32,
                 lambda: f"megamoe.fused_moe: topk_idx must be int32, got {topk_idx.dtype}")
    torch._check(
        topk_weights.dtype == torch.float32,
        lambda: f"megamoe.fused_moe: topk_weights must be float32, got {topk_weights.dtype}",
    )
