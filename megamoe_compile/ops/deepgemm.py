"""DeepGEMM MegaMoE kernels behind `megamoe.fused_moe` (SM90 `fp8_mega_moe`, SM100 `fp8_fp4_mega_moe`).

Three parts, each small:

* the adapter over the installed `deep_gemm` (`_Api`): finds the functions by name, passes only
  the keyword arguments their signatures take, and names the installed version in every error.
  It serves both API generations: sgl-deep-gemm 0.1.4.post1-0.1.5 (torch 2.11) and 0.2.x /
  upstream DeepGEMM 2.8 (torch >= 2.13), which add `mma_type`, `num_shared_experts`, ...
  On SM100 the recipe picks the MMA type: "fp8_fp4" (FP8 x FP4, default) or the opt-in w4a4
  "fp4_fp4" (MXFP4 x MXFP4), passed alike to buffer, weight transform and pre-dispatch;
* the symmetric buffers (`SymmetricBuffers`, one set per kernel): one per (process group, device,
  experts, top-k, hidden, intermediate, recipe, max tokens), shared by every layer of that shape,
  reserved at load time by `DeepGemmKernel.reserve` (prepare calls it) so that they exist before
  any CUDA-graph capture, and found by the kernel's `run`. Without a process group a private
  world-size-1 group is made that leaves torch.distributed's default group alone;
* the two kernels, classes registered by name (`DeepGemmSM90`, `DeepGemmSM100`): what they
  take, their weight layout, buffers, warm-up, and `run`: stage the activations and routing into
  the buffer with DeepGEMM's pre-dispatch, then one mega kernel call. Capturable in a CUDA graph: no host syncs,
  no allocation but the output (and, on SM100 only when its pre-dispatch cannot fold the routed
  scaling factor, the scaled routing weights).

Importing this module never imports deep_gemm and needs no GPU; availability is probed on use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from . import groups, quant, recipes
from .fused_moe import DEFAULT_MAX_TOKENS_PER_RANK, Kernel, LayerShape, get_kernel, pick, register
from .layouts import KernelWeights

log = logging.getLogger("megamoe_compile")

SM90 = "deepgemm_sm90"
SM90_MAX_INTERMEDIATE = 64 * 64
SM100 = "deepgemm_sm100"
KERNELS = (SM90, SM100)
FAMILY = "deepgemm"  # what MegaMoEConfig.kernel names
# DeepGEMM's recipe tuple of each kernel (the same for every recipe it runs). The recipes each
# kernel runs and its default are its `Kernel` registration (end of this module); what a recipe
# stores, its activation group and SM100 MMA type, the recipe table (`recipes`). The MMA type:
# buffer, weight transform and pre-dispatch must agree on it (the buffer's token slots, the L1
# gate/up interleave and the activation format all depend on it).
DG_RECIPE = {SM90: (128, 128, 128), SM100: (1, 1, 32)}

_TORCH_MATCH = ("sgl-deep-gemm 0.1.4.post1-0.1.5 is built for torch 2.11; "
                "sgl-deep-gemm 0.2.x for torch >= 2.13")

# Per kernel, each role's candidate names in deep_gemm, first found wins (older name first where
# both generations have one).
_FUNCTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    SM90: {
        "kernel": ("fp8_mega_moe",),
        "pre_dispatch": ("mega_moe_pre_dispatch_sm90",),
        "transform_weights": ("transform_weights_for_mega_moe_sm90",),
        "buffer": ("get_symm_buffer_for_sm90_mega_moe", "get_symm_buffer_for_mega_moe"),
    },
    SM100: {
        "kernel": ("fp8_fp4_mega_moe",),
        "pre_dispatch": ("mega_moe_pre_dispatch",),
        "transform_sf": ("transform_sf_into_required_layout",),
        "transform_weights": ("transform_weights_for_mega_moe",),
        "buffer": ("get_symm_buffer_for_mega_moe",),
    },
}


# -- the installed deep_gemm ------------------------------------------------------------------

_INSTALL = ('install it with `pip install "sgl-deep-gemm>=0.2"` for torch >= 2.13 or `pip install '
            '"sgl-deep-gemm>=0.1.4.post1,<0.1.6"` for torch 2.11 (from a clone of megamoe-compile: '
            '`pip install -e ".[deepgemm]"` or `-e ".[deepgemm-torch211]"`)')


def release_problem(torch_version: str, sgl_version: str | None) -> str:
    """Why this sgl-deep-gemm release cannot load on this torch ("" when the pair fits or is
    unknown to us). Its host glue is built against one torch's C++ ABI (notes: 0.1.4.post1-0.1.5 on
    torch 2.11; 0.1.6 and later against torch >= 2.13 headers)."""
    import re

    t = re.match(r"(\d+)\.(\d+)", torch_version)
    g = re.match(r"(\d+)\.(\d+)\.(\d+)", sgl_version or "")
    if t is None or g is None:
        return ""
    torch_minor, release = (int(t.group(1)), int(t.group(2))), tuple(int(x) for x in g.groups())
    if torch_minor == (2, 11) and release >= (0, 1, 6):
        return (f"sgl-deep-gemm {sgl_version} is built for torch >= 2.13 and cannot load on torch {torch_version}; "
                'install `pip install "sgl-deep-gemm>=0.1.4.post1,<0.1.6"` (from a clone: '
                '`pip install -e ".[deepgemm-torch211]"`)')
    if torch_minor >= (2, 13) and release < (0, 1, 6):
        return (f"sgl-deep-gemm {sgl_version} is built for torch 2.11 and cannot load on torch {torch_version}; "
                'install `pip install "sgl-deep-gemm>=0.2"` (from a clone: `pip install -e ".[deepgemm]"`)')
    return ""


def _sgl_version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("sgl-deep-gemm")
    except Exception:
        return None


@functools.cache
def _deep_gemm():
    """(module, "") or (None, reason) for the installed deep_gemm."""
    mismatch = release_problem(torch.__version__, _sgl_version())
    if mismatch:
        return None, mismatch
    try:
        import deep_gemm
    except Exception as e:  # ImportError, or a host-glue ABI mismatch surfacing as OSError/RuntimeError
        return None, (f"deep_gemm ({_installed_version()}) is not importable ({type(e).__name__}: {e}); "
                      f"{_INSTALL}")
    return deep_gemm, ""


def reset_probe() -> None:
    """Forget what was found about deep_gemm (after installing it, or in tests)."""
    _deep_gemm.cache_clear()
    _api.cache_clear()
    for name in KERNELS:
        _kernel(name).launches.clear()


def _installed_version(module: Any = None) -> str:
    version = getattr(module, "__version__", None) if module is not None else None
    for dist in ("sgl-deep-gemm", "deep-gemm", "deepinfer-gemm"):
        try:
            from importlib.metadata import version as dist_version

            return f"{dist} {dist_version(dist)}" + (f", deep_gemm {version}" if version else "")
        except Exception:
            continue
    return f"deep_gemm {version}" if version else "no sgl-deep-gemm distribution found"


@dataclass(frozen=True)
class _Api:
    """The deep_gemm functions one kernel uses, resolved once."""

    kernel: str
    version: str
    fns: dict[str, Any]

    def call(self, role: str, *args, **kwargs):
        """Call `role` with `args` and those `kwargs` its signature takes (both generations)."""
        fn = self.fns[role]
        return fn(*args, **_accepted(fn, kwargs))

    def accepts(self, role: str, name: str) -> bool:
        params = _parameters(self.fns[role])
        return params is None or name in params  # None: it takes **kwargs (or hides its signature)


@functools.cache
def _parameters(fn) -> dict[str, inspect.Parameter] | None:
    """Keyword parameters of `fn`; None when it takes **kwargs or has no Python signature."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return dict(params)


def _accepted(fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = _parameters(fn)
    if params is None:
        return kwargs
    out = {}
    for key, value in kwargs.items():
        if key in params:
            out[key] = value
        elif key == "group_size" and "quant_group_size" in params:  # renamed in some builds
            out["quant_group_size"] = value
    return out


@functools.cache
def _api(kernel: str) -> tuple[_Api | None, str]:
    """The resolved API for `kernel`, or (None, why not). Cached: see `reset_probe`."""
    dg, why = _deep_gemm()
    if dg is None:
        return None, why
    version = _installed_version(dg)
    fns, missing = {}, []
    for role, names in _FUNCTIONS[kernel].items():
        found = next((getattr(dg, n) for n in names if callable(getattr(dg, n, None))), None)
        if found is None:
            missing.append(" or ".join(names))
        fns[role] = found
    if missing:
        return None, (f"{version} has no {', '.join(missing)} (needed by {kernel}); sgl-deep-gemm >= 0.1.4.post1 "
                      f"has both mega kernels ({_TORCH_MATCH})")
    return _Api(kernel, version, fns), ""


def _require_api(kernel: str) -> _Api:
    api, why = _api(kernel)
    if api is None:
        raise RuntimeError(f"megamoe: {kernel} cannot run: {why}")
    return api


# -- symmetric buffers ------------------------------------------------------------------------

@dataclass(frozen=True)
class BufferKey:
    group_name: str
    device_index: int
    kernel: str
    num_experts: int  # over the whole group (local experts x world size)
    top_k: int
    hidden: int
    intermediate: int
    max_tokens: int  # per rank, as asked (DeepGEMM may align its buffer up)
    recipe: str  # SM100: FP8 or FP4 activation slots

    def shape(self) -> tuple:
        """Everything but max_tokens: buffers of one shape serve the same layers."""
        return (self.group_name, self.device_index, self.kernel, self.num_experts, self.top_k, self.hidden,
                self.intermediate, self.recipe)


class SymmetricBuffers:
    """One kernel's symmetric buffers in this process, keyed by `BufferKey`: reserved at load time
    (`DeepGemmKernel.reserve`, which prepare calls) and read by every call (`DeepGemmKernel.run`).

    A buffer holds no weights, only a call's staged activations and routing, and is a collective
    allocation over a process group (like the group's communicator): process state, not model
    state, shared by every layer and every model of its shape. `version` changes whenever the set
    changes, so that launch plans made over an older set are made again."""

    def __init__(self):
        self._table: dict[BufferKey, Any] = {}
        self.version = 0

    def get(self, key: BufferKey):
        return self._table.get(key)

    def add(self, key: BufferKey, buffer: Any) -> None:
        self._table[key] = buffer
        self.version += 1

    def of_shape(self, wanted: BufferKey) -> list[tuple[int, Any]]:
        """(max tokens, buffer) of every buffer of `wanted`'s shape, ascending."""
        return sorted(((k.max_tokens, b) for k, b in self._table.items() if k.shape() == wanted.shape()),
                      key=lambda kb: kb[0])

    def items(self):
        return self._table.items()

    def release(self) -> None:
        for buffer in self._table.values():
            destroy = getattr(buffer, "destroy", None)
            if callable(destroy):
                destroy()
        self._table.clear()
        self.version += 1


def _buffer_bytes(buffer) -> int:
    raw = getattr(buffer, "buffer", None)
    return raw.numel() * raw.element_size() if isinstance(raw, torch.Tensor) else 0


def _on_device(device_index: int):
    return torch.cuda.device(device_index) if device_index >= 0 else contextlib.nullcontext()


# -- the kernels ------------------------------------------------------------------------------

@dataclass
class _Launch:
    """Everything a call of one layer shape needs, resolved once (the per-call Python is then a
    few attribute reads: at 1 token without CUDA graphs, host time is the whole cost)."""

    version: int  # of the kernel's buffers when made
    kernel: str
    buffers: list[tuple[int, Any]]  # (max tokens, buffer), ascending
    pre_dispatch: Any
    pre_kwargs: dict[str, Any]  # without num_tokens
    scale_weights: float | None  # multiply the routing weights first (pre-dispatch cannot)
    mega: Any
    mega_kwargs: dict[str, Any]

    def buffer(self, tokens: int):
        for max_tokens, buffer in self.buffers:
            if tokens <= max_tokens:
                return buffer
        largest = self.buffers[-1][0]
        raise RuntimeError(
            f"megamoe: {self.kernel}: {tokens} tokens in one MoE call exceed the symmetric buffer reserved for "
            f"{largest} tokens per rank (MegaMoEConfig.max_tokens_per_rank={largest}). Raise "
            f"MegaMoEConfig.max_tokens_per_rank and prepare the model again, or split the batch.")


# Said when a recipe with FP4 weights is asked of the Hopper kernel.
_NO_FP4_ON_HOPPER = ("; Hopper has no FP4 tensor cores (its kernel expands FP4 weights to 'fp8'); "
                     "kernel='reference' emulates this recipe on any device")


@dataclass(frozen=True, eq=False)
class DeepGemmKernel(Kernel):
    """A DeepGEMM mega kernel: pre-dispatch (stage activations and routing into the symmetric
    buffer) + one mega kernel call. What SM90 and SM100 share is here; `DeepGemmSM90` and
    `DeepGemmSM100` add their shape limits, weight layout and pre-dispatch arguments. Each kernel
    owns its symmetric buffers and launch plans (process state, see `SymmetricBuffers`)."""

    family: str = FAMILY
    auto_on: tuple[str, ...] = ("cuda",)
    activation_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    capability: int = 0  # the GPU major version it runs on
    buffers: SymmetricBuffers = field(default_factory=SymmetricBuffers, repr=False)
    launches: dict[tuple, _Launch] = field(default_factory=dict, repr=False)

    # -- what it can take (load time) -------------------------------------------------------------

    def api(self) -> _Api:
        return _require_api(self.name)

    def device_problem(self, device: torch.device) -> str:
        if device.type != "cuda":
            return f"DeepGEMM kernels need a CUDA GPU; the experts are on {device}"
        if not torch.cuda.is_available():
            return "DeepGEMM kernels need a CUDA GPU; torch.cuda.is_available() is False"
        major, minor = torch.cuda.get_device_capability(device)
        if major != self.capability:
            return (f"DeepGEMM MegaMoE needs sm_90 (Hopper) or sm_100 (Blackwell); "
                    f"this GPU is sm_{major}{minor}")
        return ""

    def shape_problem(self, shape: LayerShape) -> str:
        """On a device it runs on and in bfloat16: the sizes DeepGEMM takes, then the library."""
        for dim, size in (("hidden", shape.hidden), ("moe_intermediate", shape.intermediate)):
            if size % 128:
                return f"{self.name} needs {dim} size a multiple of 128, got {size}"
        return self.size_limit_problem(shape) or _api(self.name)[1]

    def size_limit_problem(self, shape: LayerShape) -> str:
        """This kernel's own limits on the sizes (multiples of 128 already)."""
        return ""

    def library_problem(self, recipe: str) -> str:
        """Why the installed deep_gemm cannot run `recipe` (one this kernel runs) ("" when it can)."""
        return ""

    def checked_recipe(self, recipe: str | None) -> str:
        """`recipe` (None: the default), refused unless this kernel runs it."""
        recipe = recipe or self.default
        why = self.refuses_recipe(recipe)
        if why:
            raise ValueError(f"megamoe: {why}")
        return recipe

    # -- what it needs before the first call (load time) -----------------------------------------------

    def layout(self, weights: KernelWeights, recipe: str | None) -> KernelWeights:
        """Lay recipe-format weights (plain [gate; up]) out for this kernel. Once per layer, at load
        time; the result stays on the weights' device."""
        recipe = self.checked_recipe(recipe)
        api = self.api()
        if weights.w1_scale is None or weights.w2_scale is None:
            raise ValueError(f"megamoe: {self.name} needs scaled weights (recipe {self.default!r}); got no scales")
        return self._layout(api, weights, recipe)

    def _layout(self, api: _Api, weights: KernelWeights, recipe: str) -> KernelWeights:
        raise NotImplementedError

    def reserve(self, shape: LayerShape, max_tokens_per_rank: int, group: Any = None, recipe: str | None = None):
        """Allocate (once) the symmetric buffer for layers of `shape`.

        Load-time step (`prepare` calls it for every DeepGEMM layer): a collective over `group`
        (default: a private world-size-1 group on the experts' GPU), so it must happen before any
        CUDA-graph capture and on every rank alike. Layers of the same shape (and recipe) share one
        buffer. Returns the buffer.
        """
        recipe = self.checked_recipe(recipe)
        if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
            raise ValueError(f"megamoe: max_tokens_per_rank must be a positive int, got {max_tokens_per_rank!r}")
        group_name = "" if group is None else groups.register(group)
        group = groups.resolve(group_name, shape.device)
        key = BufferKey(group_name, groups.device_index(shape.device), self.name, shape.num_experts * group.size(),
                        shape.top_k, shape.hidden, shape.intermediate, max_tokens_per_rank, recipe)
        return self._allocate(key, group)

    def _buffer_kwargs(self, recipe: str) -> dict[str, Any]:
        return {}

    def _allocate(self, key: BufferKey, group):
        buffer = self.buffers.get(key)
        if buffer is not None:
            return buffer
        api = self.api()
        args = (group, key.num_experts, key.max_tokens, key.top_k, key.hidden, key.intermediate)
        with _on_device(key.device_index):
            try:
                buffer = api.call("buffer", *args, **self._buffer_kwargs(key.recipe))
            except Exception as e:
                raise RuntimeError(f"megamoe: {key.kernel}: allocating the symmetric buffer for {key} failed with "
                                   f"{api.version}: {type(e).__name__}: {e}") from e
        self.buffers.add(key, buffer)  # a new version: launch plans made before are made again
        log.info("megamoe: reserved %s symmetric buffer %s (%.1f MiB)", key.kernel, key, _buffer_bytes(buffer) / 2**20)
        return buffer

    def warm_up(self, weights: KernelWeights, shape: LayerShape, recipe: str, swiglu_limit: float | None,
                group_name: str) -> None:
        """One 1-token launch with a layer's kernel-ready weights, at load time (prepare calls it
        after reserving the buffer; with expert parallelism every rank does, in the same order).
        DeepGEMM compiles its kernels on first use and may allocate there: done inside a CUDA-graph
        capture (transformers' first decode step under reduce-overhead), such an allocation lands
        in the graph's memory pool and cudagraph trees refuse the capture."""
        device = weights.w1.device
        x = torch.zeros(1, shape.hidden, dtype=torch.bfloat16, device=device)
        topk_idx = torch.arange(shape.top_k, dtype=torch.int32, device=device).view(1, -1)
        topk_weights = torch.full((1, shape.top_k), 1.0 / shape.top_k, dtype=torch.float32, device=device)
        self.run(x, topk_idx, topk_weights, weights.w1, weights.w1_scale, weights.w2, weights.w2_scale, recipe=recipe,
                 routed_scaling_factor=1.0, swiglu_limit=swiglu_limit, group_name=group_name)
        torch.cuda.synchronize(device)

    # -- what it computes -----------------------------------------------------------------------------

    def run(self, x, topk_idx, topk_weights, w1, w1_scale, w2, w2_scale, *,
            recipe, routed_scaling_factor, swiglu_limit, group_name):
        if x.dtype != torch.bfloat16:
            raise TypeError(f"megamoe: {self.name} takes bfloat16 activations, got {x.dtype}")
        if w1_scale is None or w2_scale is None:
            raise ValueError(f"megamoe: {self.name} needs weight scales (recipe {recipe!r})")
        tokens, hidden = x.shape
        if tokens == 0 and not group_name:
            return x.new_empty((0, hidden))
        # With expert parallelism a rank without tokens still launches: the other ranks' tokens may
        # be routed to its experts, and every rank synchronises through the buffer.
        launch = self._launch_for(recipe, x, w1.shape[0], topk_idx.shape[1], w1.shape[1] // 2,
                                  routed_scaling_factor, swiglu_limit, group_name)
        buffer = launch.buffer(tokens)  # raises before any launch when the tokens do not fit
        x = x.contiguous()
        topk_idx = topk_idx.contiguous()
        topk_weights = topk_weights.contiguous()
        if launch.scale_weights is not None:
            topk_weights = topk_weights * launch.scale_weights
        launch.pre_dispatch(x, topk_idx, topk_weights, buffer.x, buffer.x_sf, buffer.topk_idx, buffer.topk_weights,
                            num_tokens=tokens, **launch.pre_kwargs)
        y = torch.empty((tokens, hidden), dtype=torch.bfloat16, device=x.device)
        launch.mega(y, (w1, w1_scale), (w2, w2_scale), buffer, **launch.mega_kwargs)
        return y

    def _pre_dispatch_kwargs(self, api: _Api, recipe: str) -> dict[str, Any]:
        return {"group_size": recipes.recipe(recipe).act_group}

    def _launch_for(self, recipe: str, x: torch.Tensor, num_local_experts: int, top_k: int, intermediate: int,
                    routed_scaling_factor: float, swiglu_limit: float | None, group_name: str) -> _Launch:
        key = (recipe, group_name, x.device, num_local_experts, top_k, x.shape[1], intermediate,
               routed_scaling_factor, swiglu_limit)
        launch = self.launches.get(key)
        if launch is not None and launch.version == self.buffers.version:
            return launch
        api = self.api()
        group = groups.resolve(group_name, x.device)
        buffers = self._buffers_for_call(group_name, group, x, num_local_experts, top_k, intermediate, recipe)
        pre_kwargs = self._pre_dispatch_kwargs(api, recipe)
        scale_weights = None
        if api.accepts("pre_dispatch", "routed_scaling_factor"):
            pre_kwargs["routed_scaling_factor"] = float(routed_scaling_factor)
        elif routed_scaling_factor != 1.0:
            scale_weights = float(routed_scaling_factor)
        pre_kwargs = _accepted(api.fns["pre_dispatch"], pre_kwargs)
        mega_kwargs = _accepted(api.fns["kernel"], {
            "recipe": DG_RECIPE[self.name], "activation": "swiglu",
            "activation_clamp": None if swiglu_limit is None else float(swiglu_limit), "fast_math": True})
        launch = _Launch(self.buffers.version, self.name, buffers, api.fns["pre_dispatch"], pre_kwargs, scale_weights,
                         api.fns["kernel"], mega_kwargs)
        self.launches[key] = launch
        return launch

    def _buffers_for_call(self, group_name: str, group, x: torch.Tensor, num_local_experts: int, top_k: int,
                          intermediate: int, recipe: str) -> list[tuple[int, Any]]:
        """(max tokens, buffer) of every buffer reserved for this layer shape, ascending; reserves one
        now (with a warning) if prepare reserved none, which cannot happen during CUDA-graph capture."""
        tokens, hidden = x.shape
        wanted = BufferKey(group_name, groups.device_index(x.device), self.name, num_local_experts * group.size(),
                           top_k, hidden, intermediate, 0, recipe)
        fitting = self.buffers.of_shape(wanted)
        if fitting:
            return fitting
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"megamoe: {self.name}: no symmetric buffer was reserved for experts={wanted.num_experts} "
                f"top_k={top_k} hidden={hidden} intermediate={intermediate} recipe={recipe}, and one cannot be "
                f"allocated during CUDA-graph capture; run megamoe_compile.prepare(model) (or "
                f"ops.deepgemm.reserve_buffer) first")
        max_tokens = max(tokens, DEFAULT_MAX_TOKENS_PER_RANK)
        log.warning("megamoe: %s: no symmetric buffer reserved for this shape; allocating one for %d tokens "
                    "now. prepare() should reserve it at load time.", self.name, max_tokens)
        key = dataclasses.replace(wanted, max_tokens=max_tokens)
        return [(max_tokens, self._allocate(key, group))]


@dataclass(frozen=True, eq=False)
class DeepGemmSM90(DeepGemmKernel):
    """Hopper: pre-dispatch (FP8 1x128 activations, routed scaling folded) + `fp8_mega_moe` on FP8
    128x128-block weights."""

    capability: int = 9

    def size_limit_problem(self, shape: LayerShape) -> str:
        if shape.intermediate > SM90_MAX_INTERMEDIATE:
            # sgl-deep-gemm 0.1.5 asserts `intermediate_hidden / 64 <= 64` at its first launch (measured
            # on an H200 with Mixtral-8x7B's 14336): refused here, at load time, instead.
            return (f"{self.name} takes moe_intermediate up to {SM90_MAX_INTERMEDIATE} (DeepGEMM's SM90 MegaMoE: "
                    f"intermediate / 64 <= 64), got {shape.intermediate}")
        return ""

    def _layout(self, api: _Api, weights: KernelWeights, recipe: str) -> KernelWeights:
        """FP8 [E, 2I, H] + float32 [E, 2I/128, H/128] and FP8 [E, H, I] + float32 [E, H/128, I/128]
        -> gate/up rows interleaved by DeepGEMM, scales unchanged."""
        _expect_dtype(self, "w1", weights.w1, torch.float8_e4m3fn)
        _expect_dtype(self, "w2", weights.w2, torch.float8_e4m3fn)
        l1 = (weights.w1.contiguous(), weights.w1_scale.float().contiguous())
        l2 = (weights.w2.contiguous(), weights.w2_scale.float().contiguous())
        (w1, s1), (w2, s2) = api.call("transform_weights", l1, l2)
        return KernelWeights(w1, s1, w2, s2)


@dataclass(frozen=True, eq=False)
class DeepGemmSM100(DeepGemmKernel):
    """Blackwell: pre-dispatch (FP8, or with recipe "fp4_fp4" MXFP4, 1x32 UE8M0 activations) +
    `fp8_fp4_mega_moe` on MXFP4 weights. The recipe's MMA type goes alike to the buffer, the weight
    transform and the pre-dispatch (the buffer's token slots, the L1 gate/up interleave and the
    activation format all depend on it)."""

    capability: int = 10

    def size_limit_problem(self, shape: LayerShape) -> str:
        if shape.hidden % 512:
            return f"{self.name} needs hidden size a multiple of 512 (its pre-dispatch), got {shape.hidden}"
        return ""

    def library_problem(self, recipe: str) -> str:
        """The w4a4 recipe needs a release whose buffer takes `mma_type` and whose pre-dispatch can
        stage FP4 activations (`mma_type`, or 0.1.5's `use_fp4_acts`)."""
        if recipes.recipe(recipe).activation != "mxfp4":
            return ""
        api, why = _api(self.name)
        if api is None:
            return why
        missing = []
        if not api.accepts("buffer", "mma_type"):
            missing.append("get_symm_buffer_for_mega_moe(mma_type=...)")
        if not (api.accepts("pre_dispatch", "mma_type") or api.accepts("pre_dispatch", "use_fp4_acts")):
            missing.append("mega_moe_pre_dispatch(mma_type=... or use_fp4_acts=...)")
        if missing:
            return (f"recipe {recipe!r} (w4a4, mma_type {recipes.recipe(recipe).mma_type!r}) needs "
                    f"{' and '.join(missing)}, which {api.version} lacks; use recipe 'fp8_fp4' or an sgl-deep-gemm "
                    "release with FP4 activations")
        return ""

    def _layout(self, api: _Api, weights: KernelWeights, recipe: str) -> KernelWeights:
        """MXFP4 int8 [E, 2I, H/2] + UE8M0 uint8 [E, 2I, H/32] (and w2 alike) -> scales as float32
        powers of two through `transform_sf_into_required_layout` (packed int32, MN-major), then
        `transform_weights_for_mega_moe` (interleave gate/up, transpose scales for UTCCP) for the
        recipe's `mma_type`: releases that take it interleave gate/up differently for FP4
        activations; 0.1.x has one layout for both modes and takes none."""
        w1, s1, w2, s2 = weights.w1, weights.w1_scale, weights.w2, weights.w2_scale
        _expect_dtype(self, "w1", w1, torch.int8)
        _expect_dtype(self, "w2", w2, torch.int8)
        num_experts, two_i = w1.shape[0], w1.shape[1]
        hidden, intermediate = w1.shape[2] * 2, two_i // 2
        sf1 = api.call("transform_sf", e8m0_to_float32(s1), two_i, hidden, recipe=(1, 32), num_groups=num_experts)
        sf2 = api.call("transform_sf", e8m0_to_float32(s2), hidden, intermediate, recipe=(1, 32),
                       num_groups=num_experts)
        (w1, sf1), (w2, sf2) = api.call("transform_weights", (w1.contiguous(), sf1), (w2.contiguous(), sf2),
                                        mma_type=recipes.recipe(recipe).mma_type)
        return KernelWeights(w1, sf1, w2, sf2)

    def _buffer_kwargs(self, recipe: str) -> dict[str, Any]:
        return {"mma_type": recipes.recipe(recipe).mma_type}

    def _pre_dispatch_kwargs(self, api: _Api, recipe: str) -> dict[str, Any]:
        # Newer releases take the MMA type, 0.1.x a flag for FP4 activations.
        kwargs = super()._pre_dispatch_kwargs(api, recipe)
        r = recipes.recipe(recipe)
        if api.accepts("pre_dispatch", "mma_type"):
            kwargs["mma_type"] = r.mma_type
        elif r.activation == "mxfp4":
            if not api.accepts("pre_dispatch", "use_fp4_acts"):
                raise RuntimeError(f"megamoe: {self.name}: {self.library_problem(recipe)}")
            kwargs["use_fp4_acts"] = True
        return kwargs


def e8m0_to_float32(e: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales as the float32 powers of two DeepGEMM's packers read (their exponent field is
    the byte); float32 scales pass through, other floating scales must be exact powers of two
    (`quant.ue8m0_bytes`)."""
    return (e if e.dtype == torch.float32 else quant.e8m0_to_float(e)).contiguous()


def _expect_dtype(kernel: DeepGemmKernel, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"megamoe: {kernel.name} needs {name} in {dtype} (recipe {kernel.default!r}), got {t.dtype}")


# In order of preference: the family's first kernel that runs on a layer's device takes it.
# SM90 keeps the plain scale grid; SM100's scales are DeepGEMM's packed layout.
register(DeepGemmSM90(SM90, ("fp8",), default="fp8", plain_scales=True,
                      hints={r.name: _NO_FP4_ON_HOPPER for r in recipes.RECIPES.values() if r.values_per_byte == 2}))
register(DeepGemmSM100(SM100, ("fp8_fp4", "fp4_fp4"), default="fp8_fp4", plain_scales=False))


# -- the module's small API (tests, benchmarks, users reserving ahead of prepare) ----------------

def _kernel(name: str, caller: str = "deepgemm") -> DeepGemmKernel:
    if name not in KERNELS:
        raise ValueError(f"megamoe: {caller}: unknown DeepGEMM kernel {name!r}; one of {list(KERNELS)}")
    return get_kernel(name)


def kernel_for(shape: LayerShape) -> tuple[str | None, str]:
    """The DeepGEMM kernel for this layer on its device, or (None, why not)."""
    kernel, why = pick(FAMILY, shape)
    return (None, why) if kernel is None or why else (kernel.name, "")


def recipe_problem(kernel: str, recipe: str) -> str:
    """Why the installed deep_gemm cannot run `recipe` on `kernel` ("" when it can)."""
    return _kernel(kernel).library_problem(recipe)


def layout_weights(kernel: str, weights: KernelWeights, recipe: str | None = None) -> KernelWeights:
    """`weights` (the recipe's plain layout) laid out for `kernel` (see its `_layout`)."""
    return _kernel(kernel, "layout_weights").layout(weights, recipe)


def reserve_buffer(kernel: str, shape: LayerShape, max_tokens_per_rank: int, group=None, recipe: str | None = None):
    """`kernel`'s symmetric buffer for layers of `shape` (see `DeepGemmKernel.reserve`); None for
    kernels that need none (the reference kernel)."""
    if kernel not in KERNELS:
        return None
    return _kernel(kernel).reserve(shape, max_tokens_per_rank, group, recipe)


def buffers() -> dict[BufferKey, Any]:
    """The symmetric buffers reserved so far, every DeepGEMM kernel's (for reports and tests)."""
    return {key: buffer for name in KERNELS for key, buffer in _kernel(name).buffers.items()}


def release_buffers() -> None:
    """Drop every symmetric buffer (call on every rank, after the last kernel call, before the
    process groups go). Graphs captured over them must not be replayed afterwards."""
    for name in KERNELS:
        _kernel(name).buffers.release()
