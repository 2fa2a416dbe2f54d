"""The "megamoe" torch.compile backend: fuse the prepared MoE layers -> inner compiler. It never prepares."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import layer_state as state
from . import prepare as prep
from .config import MegaMoEConfig
from .passes import LayerFusion, fuse_moe_layers, prepared_blocks, remove_markers, unprepared_moe_blocks

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
        """The nodes of MoE block `name` (router, fused op, shared expert), one line each. Values are
        named by what made them, numbered within the layer (`linear`, `linear_1`, ...), not by
        dynamo's numbering of the whole graph, so one layer reads the same wherever it is traced."""
        fusion = next((f for f in self.fusions if f.name == name), None)
        if fusion is None:
            raise KeyError(f"no MoE layer {name!r} in this graph; it has {[f.name for f in self.fusions]}")
        nodes = [n for n in self.graph_module.graph.nodes if n.op not in ("placeholder", "get_attr")
                 and fusion.module_key in (n.meta.get("nn_module_stack") or {})]
        return "\n".join(_format_node(n, _layer_names(nodes)) for n in nodes)


def _layer_names(nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """Names for the nodes a layer's lines show: dynamo's name without its graph-wide number, then
    numbered in order of first appearance (placeholders keep their names: they name the tensor)."""
    names: dict[fx.Node, str] = {}
    taken: dict[str, int] = {}
    for node in nodes:
        for value in (*node.all_input_nodes, node):
            if value in names:
                continue
            if value.op in ("placeholder", "get_attr"):
                names[value] = value.name
                continue
            base = re.sub(r"_\d+$", "", value.name)
            count = taken.get(base, 0)
            taken[base] = count + 1
            names[value] = base if count == 0 else f"{base}_{count}"
    return names


def _format_node(node: fx.Node, names: dict[fx.Node, str]) -> str:
    def show(a):
        if isinstance(a, fx.Node):
            name = names.get(a, a.name)
            return name if len(name) <= 40 else "..." + name[-37:]
        if isinstance(a, (tuple, list)):
            return "(" + ", ".join(show(x) for x in a) + ")"
        return repr(a)

    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        target = str(node.target)
    args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
    prefix = "." if node.op == "call_method" else ""
    return f"{names.get(node, node.name)} = {prefix}{target}({', '.join(args)})"


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
        plan_fields = sorted(set(fields) - COMPILE_FIELDS)
        if plan_fields:
            # Refused before anything happens: what is fused, how, and whether weights are released
            # is decided at load time, by prepare; the backend never re-plans or frees weights.
            raise ValueError(f"megamoe: torch.compile options {plan_fields} are MegaMoEConfig fields that prepare "
                             "decides; pass them to mc.prepare(model, mc.MegaMoEConfig(...)) (or use "
                             f"mc.compile(model, config)); options= takes {sorted(COMPILE_FIELDS)} and inductor "
                             "options")
        # Without an explicit config, the one the model was prepared with; options= refine it.
        config = self.config or _prepared_config(gm) or MegaMoEConfig()
        if fields:
            config = config.replace(**fields)
        original = fx.GraphModule(gm, copy.deepcopy(gm.graph)) if self._run_original else None
        fusions = self._fuse(gm)
        self.graphs.append(CompiledGraph(gm, fusions))
        _trace_artifacts(gm, fusions)
        if original is not None:
            remove_markers(original)
            original.recompile()
            return original.forward
        return _inner_compile(gm, example_inputs, config.inner_backend, mode, inner_options)

    def _fuse(self, gm: fx.GraphModule) -> list[LayerFusion]:
        unprepared = unprepared_moe_blocks(gm.graph)
        if self.config is not None:
            for block in prepared_blocks(gm.graph):
                plan = state.plan_of(block)
                if plan.config is not None and plan.config.plan_key() != self.config.plan_key():
                    differ = [f.name for f in dataclasses.fields(MegaMoEConfig) if f.name not in COMPILE_FIELDS
                              and getattr(plan.config, f.name) is not getattr(self.config, f.name)
                              and getattr(plan.config, f.name) != getattr(self.config, f.name)]
                    raise ValueError(f"megamoe: {plan.name} was prepared with another config than this backend's "
                                     f"(they differ in {differ}); prepare with the backend's config first, use "
                                     "mc.compile(model, config), or pass only options={'inner_backend': ...}")
        fusions = fuse_moe_layers(gm)
        for name in unprepared:
            fusions.append(LayerFusion(name, False, reason=NOT_PREPARED))
        if unprepared:
            _warn_once(unprepared, f"{len(unprepared)} MoE layer(s) in this graph were not prepared and "
                       "stay unfused; call mc.prepare(model, config) before torch.compile (or use mc.compile(model, "
                       "config))")
        for f in fusions:
            if f.needs_attention:
                _warn_once([f.name + f.reason], f"megamoe: {f.reason}; the layer is left unfused")
        return fusions

    @property
    def fusions(self) -> list[LayerFusion]:
        return [f for g in self.graphs for f in g.fusions]


def _trace_artifacts(gm: fx.GraphModule, fusions: list[LayerFusion]) -> None:
    """The per-layer report and the rewritten graph as structured-trace artifacts (TORCH_TRACE /
    tlparse show them beside dynamo's own graphs for the same compile id). Costs nothing when
    structured tracing is off."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": "megamoe_fusion_report", "encoding": "json"},
                     payload_fn=lambda: [fusion_record(f) for f in fusions])
    trace_structured("artifact", metadata_fn=lambda: {"name": "megamoe_rewritten_graph", "encoding": "string"},
                     payload_fn=lambda: gm.print_readable(print_output=False))


def fusion_record(f: LayerFusion) -> dict[str, Any]:
    """One layer of the fusion report as plain data (JSON)."""
    return {"name": f.name, "layer": f.layer_index, "fused": f.fused, "reason": f.reason,
            "traced_as": f.traced_as, "kernel": f.kernel, "recipe": f.recipe, "notes": f.notes,
            "router_kind": f.router_kind}


def backend(config: MegaMoEConfig | None = None, **fields: Any) -> MegaMoEBackend:
    """A backend object for `torch.compile(..., backend=...)`; fields override `config`'s."""
    if fields:
        config = (config or MegaMoEConfig()).replace(**fields)
    return MegaMoEBackend(config)


def megamoe_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
                    options: dict[str, Any] | None = None):
    """The registered "megamoe" backend (also the `torch_dynamo_backends` entry point)."""
    return MegaMoEBackend()(gm, example_inputs, mode=mode, options=options)


# The only config fields that act at compile time; every other field is prepare's.
COMPILE_FIELDS = frozenset({"inner_backend"})
NOT_PREPARED = "not prepared: call mc.prepare(model, config) before compiling (or use mc.compile(model, config))"
_WARNED: set[str] = set()  # what was warned about, once per process


def _warn_once(keys: list[str], message: str) -> None:
    new = [k for k in keys if k not in _WARNED]
    if new:
        _WARNED.update(new)
        warnings.warn(message if message.startswith("megamoe") else f"megamoe: {message} ({', '.join(keys[:4])}"
                      f"{', ...' if len(keys) > 4 else ''})", stacklevel=3)


def _prepared_config(gm: fx.GraphModule) -> MegaMoEConfig | None:
    """The config `prepare` used for the MoE blocks of this graph."""
    for block in prepared_blocks(gm.graph):
        return state.plan_of(block).config
    return None


def compile(model: torch.nn.Module, config: MegaMoEConfig | None = None, **compile_kwargs: Any):
    """`prepare(model, config)`, then `torch.compile(model, backend=backend(config), **compile_kwargs)`.

    The one call that does both: load-time work first (plans, kernel-ready weights), then the
    compiled model, whose MoE layers the backend fuses on first call.
    """
    if "backend" in compile_kwargs:
        raise ValueError("megamoe.compile: the backend is megamoe's; pass compile_kwargs other than backend")
    prep.prepare(model, config)
    return torch.compile(model, backend=MegaMoEBackend(config or state.prepared_config(model)), **compile_kwargs)


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
