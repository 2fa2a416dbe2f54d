"""The "megamoe" torch.compile backend: prepare (if needed) -> fuse MoE layers -> inner compiler."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import hf
from . import prepare as prep
from .config import MegaMoEConfig
from .passes import LayerFusion, fuse_moe_layers, prepared_blocks, unprepared_moe_weights

log = logging.getLogger("megamoe_compile")


@dataclass
class CompiledGraph:
    """One FX graph the backend received: what it fused, and the graph after the rewrite."""

    graph_module: fx.GraphModule
    fusions: list[LayerFusion] = field(default_factory=list)

    @property
    def code(self) -> str:
        return self.graph_module.code

    def layer_code(self, name: str) -> str:
        """The nodes of MoE block `name` (router, fused op, shared expert), one line each."""
        fusion = next((f for f in self.fusions if f.name == name), None)
        if fusion is None:
            raise KeyError(f"no MoE layer {name!r} in this graph; it has {[f.name for f in self.fusions]}")
        nodes = [n for n in self.graph_module.graph.nodes if n.op not in ("placeholder", "get_attr")
                 and fusion.module_key in (n.meta.get("nn_module_stack") or {})]
        return "\n".join(_format_node(n) for n in nodes)


def _format_node(node: fx.Node) -> str:
    def show(a):
        if isinstance(a, fx.Node):
            return a.name if len(a.name) <= 40 else "..." + a.name[-37:]
        if isinstance(a, (tuple, list)):
            return "(" + ", ".join(show(x) for x in a) + ")"
        return repr(a)

    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        target = str(node.target)
    args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
    prefix = "." if node.op == "call_method" else ""
    return f"{node.name} = {prefix}{target}({', '.join(args)})"


class MegaMoEBackend:
    """A torch.compile backend with its own config; `graphs` records every graph it compiled.

    `torch.compile(model, backend=megamoe_compile.backend(config))`. The registered name
    "megamoe" builds one from `options=` (config fields; the rest go to inductor) or, without
    options, from the config the model was prepared with.
    """

    def __init__(self, config: MegaMoEConfig | None = None, *, run_original: bool = False):
        self.config = config
        self.graphs: list[CompiledGraph] = []
        # explain() sets this: compile and record, but run the graph as traced (no kernels).
        self._run_original = run_original

    def __call__(self, gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
                 options: dict[str, Any] | None = None):
        fields, inner_options = MegaMoEConfig.split_options(options)
        # Without an explicit config, the one the model was prepared with; options= refine it.
        config = self.config or _prepared_config(gm) or MegaMoEConfig()
        if fields:
            config = config.replace(**fields)
        original = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if self._run_original else None
        fusions = self._fuse(gm, config)
        self.graphs.append(CompiledGraph(gm, fusions))
        if original is not None:
            return original.forward
        return _inner_compile(gm, example_inputs, config.inner_backend, mode, inner_options)

    def _fuse(self, gm: fx.GraphModule, config: MegaMoEConfig) -> list[LayerFusion]:
        if hf.v4_classes() is None:
            return []
        _ensure_prepared(gm, config)
        return fuse_moe_layers(gm)

    @property
    def fusions(self) -> list[LayerFusion]:
        return [f for g in self.graphs for f in g.fusions]


def backend(config: MegaMoEConfig | None = None, **fields: Any) -> MegaMoEBackend:
    """A backend object for `torch.compile(..., backend=...)`; fields override `config`'s."""
    if fields:
        config = (config or MegaMoEConfig()).replace(**fields)
    return MegaMoEBackend(config)


def megamoe_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
                    options: dict[str, Any] | None = None):
    """The registered "megamoe" backend (also the `torch_dynamo_backends` entry point)."""
    return MegaMoEBackend()(gm, example_inputs, mode=mode, options=options)


def _ensure_prepared(gm: fx.GraphModule, config: MegaMoEConfig) -> None:
    """Prepare what the graph needs: prepare an unprepared model, re-plan blocks planned for another config."""
    if unprepared_moe_weights(gm.graph):
        root = _module_being_compiled()
        if root is None:
            log.warning("megamoe: the graph holds DeepSeek-V4 MoE layers that prepare() has not seen and "
                        "the model being compiled is not reachable; call megamoe_compile.prepare(model) "
                        "before compiling. Those layers are left unfused.")
        else:
            prep.prepare(root, config)
    for block in prepared_blocks(gm.graph):
        prep.replan_block(block, config)


def _prepared_config(gm: fx.GraphModule) -> MegaMoEConfig | None:
    """The config `prepare` used for the MoE blocks of this graph (or of the model being compiled)."""
    for block in prepared_blocks(gm.graph):
        return block.experts._megamoe_plan.config
    root = _module_being_compiled()
    return getattr(root, "_megamoe_config", None) if root is not None else None


def _module_being_compiled() -> torch.nn.Module | None:
    """The nn.Module whose forward dynamo is tracing (backend calls happen inside the trace)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return None
    if tx is None:
        return None
    for value in tx.f_locals.values():
        if isinstance(value, torch.nn.Module) and hf.find_moe_blocks(value):
            return value
    return None


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str, mode: str | None,
                   options: dict[str, Any]) -> Callable:
    if inner == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**list_mode_options(mode), **options} if mode else dict(options)
        return compile_fx(gm, example_inputs, config_patches=patches)
    if options:
        raise ValueError(f"megamoe: options {sorted(options)} are neither MegaMoEConfig fields nor "
                         f"meaningful for inner_backend={inner!r}")
    if mode in (None, "default"):
        if inner == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(inner)(gm, example_inputs)
    if mode == "reduce-overhead":  # CUDA graphs without inductor's code generation
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("cudagraphs")(gm, example_inputs)
    raise ValueError(f"megamoe: mode={mode!r} needs inner_backend='inductor' (got {inner!r})")
