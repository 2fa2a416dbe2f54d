"""`explain(model, *args, config=None, **kwargs)`: what the backend does to each MoE layer, and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import models
from .backend import CompiledGraph, MegaMoEBackend
from .config import MegaMoEConfig
from .layer_state import FusedPlanView, LayerPlan, layer_plans, prepared_config
from .prepare import prepare


@dataclass
class LayerReport(FusedPlanView):
    """One MoE layer: what prepare planned (`plan`) and what the pass did with it; the rest of
    the fields are read from the plan."""

    plan: LayerPlan = field(repr=False)
    fused: bool
    reason: str
    traced_as: str | None
    # Another family's router as the traced graph shows it (`LayerFusion.router_kind`).
    router_kind: str = ""

    @property
    def index(self) -> int | None:
        return self.plan.layer_index

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def router(self) -> str:
        """e.g. "top-k sqrtsoftplus k=6 x1.5" or "hash sqrtsoftplus k=6 x1.5"."""
        spec = self.plan.spec
        if spec is None:
            return "?"
        if spec.router == "graph":  # another family's router: graph code, not part of the fused region
            return f"{spec.family} {self.router_kind or '?'} k={spec.top_k}"
        kind = "top-k" if spec.router == "topk" else "hash"
        return f"{kind} {spec.scoring_func} k={spec.top_k} x{spec.routed_scaling_factor:g}"

    @property
    def experts(self) -> str:
        """"E x H x I"."""
        spec = self.plan.spec
        return f"{spec.num_experts}x{spec.hidden}x{spec.intermediate}" if spec else "?"

    @property
    def activation(self) -> str:
        """"swiglu" or "clamped_swiglu" (DeepSeek-V4's, limit from the model)."""
        return self.plan.spec.activation if self.plan.spec else "?"

    @property
    def original_bytes(self) -> int:
        return self.plan.original_bytes

    @property
    def prepared_bytes(self) -> int:
        return self.plan.prepared_bytes

    @property
    def released(self) -> bool:
        return self.plan.released

    @property
    def notes(self) -> list[str]:
        return list(self.plan.notes)


@dataclass
class MoEReport:
    """Per MoE layer: fused or not, why, router, experts, kernel; plus the rewritten graphs.

    `str(report)` is a table for people; the fields are for programs.
    """

    layers: list[LayerReport]
    graphs: list[CompiledGraph]

    @property
    def fused(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.fused]

    @property
    def graph_codes(self) -> list[str]:
        return [g.code for g in self.graphs]

    def __str__(self) -> str:
        rows = [("layer", "module", "router", "experts ExHxI", "activation", "traced as", "fused", "kernel/recipe",
                 "reason / notes")]
        for r in self.layers:
            rows.append((
                "-" if r.index is None else str(r.index), r.name, r.router, r.experts, r.activation, r.traced_as or "-",
                "yes" if r.fused else "no",
                f"{r.kernel}/{r.recipe}" if r.fused else "-",
                "; ".join([r.reason] if r.reason else r.notes),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"MegaMoE: {len(self.fused)} of {len(self.layers)} MoE layers fused, "
                 f"{len(self.graphs)} graph(s) compiled"]
        if not self.layers:
            lines.append(f"no MoE layer of this model is one megamoe-compile recognises ({models.RECOGNISED_FAMILIES})")
        for j, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        before = sum(r.original_bytes for r in self.layers)
        prepared = sum(r.prepared_bytes for r in self.layers)
        after = before - sum(r.original_bytes for r in self.layers if r.released) + prepared
        lines.append(f"expert weights: {before / 2**20:.1f} MiB as loaded, {prepared / 2**20:.1f} MiB "
                     f"kernel-ready copies, {after / 2**20:.1f} MiB now held")
        return "\n".join(lines)


def explain(model: torch.nn.Module, *args, config: MegaMoEConfig | None = None, **kwargs) -> MoEReport:
    """Prepare `model`, trace it once with the megamoe pass on `args`/`kwargs`, and report.

    The traced graphs are rewritten and recorded but run as traced (eager ops): no inductor code
    generation and no fused kernels are run.
    """
    if config is not None:
        prepare(model, config)
    elif not layer_plans(model):  # never prepared (as a whole or by parts): the default plan
        prepare(model, MegaMoEConfig())
    config = config or prepared_config(model) or MegaMoEConfig()
    be = MegaMoEBackend(config, run_original=True)
    with torch.no_grad():
        torch.compile(model, backend=be)(*args, **kwargs)
    unrecognised = [LayerReport(LayerPlan(name, models.layer_index(name), None, False, reason=why), False, why, None)
                    for name, why in models.unrecognised_moe_modules(model)]
    return MoEReport(_layer_reports(layer_plans(model), be) + unrecognised, be.graphs)


def _layer_reports(plans: list[LayerPlan], be: MegaMoEBackend) -> list[LayerReport]:
    by_name = {f.name: f for f in be.fusions}
    reports = []
    for plan in plans:
        fusion = by_name.get(plan.name)
        if fusion is None:
            reports.append(LayerReport(plan, False, plan.reason or "not in any compiled graph", None))
        else:
            reports.append(LayerReport(plan, fusion.fused, fusion.reason, fusion.traced_as, fusion.router_kind))
    return reports
