"""Per-layer selection, the explain() report, and layers the pass must leave alone."""

from __future__ import annotations

import pytest
import torch
from helpers import eager_backend, input_ids, tiny_model

import megamoe_compile as mc


def _run(model, be, ids=None):
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        expected = model(ids).logits
        mc.prepare(model, be.config)
        got = torch.compile(model, backend=be)(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    return {f.name: f for f in be.fusions}


@pytest.mark.parametrize("fields, unfused", [
    (dict(skip_layers=[0, 2]), {"model.layers.0.mlp", "model.layers.2.mlp"}),
    (dict(include=["model.layers.[12].mlp"]), {"model.layers.0.mlp"}),
    (dict(exclude=["*.layers.1.*"]), {"model.layers.1.mlp"}),
    (dict(filter_fn=lambda module, name: not module.is_hash), {"model.layers.0.mlp"}),
])
def test_layer_selection(fields, unfused):
    fusions = _run(tiny_model(layers=3, hash_layers=1), eager_backend(**fields))
    assert {n for n, f in fusions.items() if not f.fused} == unfused
    assert all(f.reason.startswith("skipped by config") for f in fusions.values() if not f.fused)
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 3 - len(unfused)


def test_skipped_layer_keeps_its_original_code():
    model = tiny_model(layers=2)
    be = eager_backend(skip_layers=[1])
    _run(model, be)
    code = be.graphs[0].layer_code("model.layers.1.mlp")
    assert "grouped_mm_fallback" in code and "fused_moe" not in code
    assert "fused_moe" in be.graphs[0].layer_code("model.layers.0.mlp")


def test_explain_reports_every_layer():
    model = tiny_model(layers=3, hash_layers=2)
    report = mc.explain(model, input_ids(), config=mc.MegaMoEConfig(skip_layers=[1]))
    assert [(r.index, r.fused) for r in report.layers] == [(0, True), (1, False), (2, True)]
    hash_layer, skipped, topk_layer = report.layers
    assert hash_layer.router == "hash sqrtsoftplus k=2 x1.5"
    assert topk_layer.router == "top-k sqrtsoftplus k=2 x1.5"
    assert topk_layer.experts == "4x64x32" and topk_layer.kernel == "reference" and topk_layer.recipe == "none"
    assert skipped.reason == "skipped by config: layer 1 is in skip_layers"
    assert len(report.graphs) == 1 and "megamoe.fused_moe" in report.graphs[0].code
    text = str(report)
    assert text.startswith("MegaMoE: 2 of 3 MoE layers fused, 1 graph(s) compiled")
    assert "model.layers.1.mlp" in text and "skipped by config" in text
    # explain ran no fused kernel: the traced graph ran as it was.
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 2


def test_explain_shows_memory_of_kernel_ready_weights():
    model = tiny_model(layers=1, hash_layers=0, hidden=128, intermediate=128)
    report = mc.explain(model, input_ids(), config=mc.MegaMoEConfig(kernel="reference", recipe="fp8"))
    (layer,) = report.layers
    assert layer.original_bytes == 4 * (256 * 128 + 128 * 128) * 4  # fp32 gate_up + down
    # FP8: one byte per weight plus one float32 scale per 128x128 block.
    assert layer.prepared_bytes == 4 * (256 * 128 + 128 * 128) + 4 * (2 + 1) * 4
    assert "MiB kernel-ready copies" in str(report) and "MiB now held" in str(report)


def test_a_hook_on_the_experts_leaves_the_layer_unfused():
    model = tiny_model(layers=2)
    model.model.layers[1].mlp.experts.register_forward_hook(lambda mod, args, out: out * 2)
    fusions = _run(model, eager_backend())
    assert fusions["model.layers.0.mlp"].fused
    assert not fusions["model.layers.1.mlp"].fused
    assert "experts code" in fusions["model.layers.1.mlp"].reason


def test_a_replaced_activation_is_reported_and_left_alone():
    model = tiny_model(layers=2)
    model.model.layers[0].mlp.experts.act_fn = torch.nn.GELU()
    fusions = _run(model, eager_backend())
    assert not fusions["model.layers.0.mlp"].fused
    assert "not SiLU" in fusions["model.layers.0.mlp"].reason
    assert fusions["model.layers.1.mlp"].fused


def test_a_clamp_limit_changed_after_prepare_is_read_from_the_graph():
    model = tiny_model(layers=1, hash_layers=0)
    mc.prepare(model, mc.MegaMoEConfig(inner_backend="eager"))
    model.model.layers[0].mlp.experts.limit = 3.0  # after prepare: the plan says 10.0
    be = eager_backend()
    with torch.no_grad():
        expected = model(input_ids()).logits
        got = torch.compile(model, backend=be)(input_ids()).logits
    torch.testing.assert_close(got, expected)
    assert be.fusions[0].fused  # the op takes the clamp the traced code has
    assert "swiglu_limit=3.0" in be.graphs[0].layer_code("model.layers.0.mlp")


def test_training_mode_with_gradients_is_not_fused():
    model = tiny_model(layers=1, hash_layers=0)
    be = eager_backend()
    mc.prepare(model, be.config)
    out = torch.compile(model, backend=be)(input_ids()).logits
    out.sum().backward()  # the unfused graph keeps autograd working
    assert not be.fusions[0].fused and "inference-only" in be.fusions[0].reason


def test_models_that_are_not_deepseek_v4_pass_through():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 8)
    be = eager_backend()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="megamoe")(x), model(x))
        torch.compile(model, backend=be)(x)
    assert be.fusions == [] and len(be.graphs) == 1
    assert mc.prepare(model) is model and mc.layer_plans(model) == []


def test_prepare_is_idempotent_and_replans_on_a_new_config():
    model = tiny_model(layers=2, hidden=128, intermediate=128)
    cfg = mc.MegaMoEConfig(kernel="reference", recipe="fp8")
    mc.prepare(model, cfg)
    experts = model.model.layers[1].mlp.experts
    w1 = experts.megamoe_w1
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference", recipe="fp8"))
    assert experts.megamoe_w1 is w1  # nothing rebuilt
    mc.prepare(model, cfg.replace(recipe="none"))
    assert not hasattr(experts, "megamoe_w1")
    assert "megamoe_w1" not in model.state_dict()


def test_release_original_weights_frees_them_and_keeps_eager_and_compiled_working():
    model = tiny_model(layers=2, hidden=128, intermediate=128)
    ids = input_ids()
    config = mc.MegaMoEConfig(kernel="reference", recipe="fp8", skip_layers=[0], inner_backend="eager")
    be_keep = mc.backend(config)
    with torch.no_grad():
        mc.prepare(model, config)
        kept = torch.compile(model, backend=be_keep)(ids).logits
    torch._dynamo.reset()
    released_cfg = config.replace(release_original_weights=True)
    model2 = tiny_model(layers=2, hidden=128, intermediate=128)
    mc.prepare(model2, released_cfg)
    experts = model2.model.layers[1].mlp.experts
    assert experts.gate_up_proj.numel() == 0 and experts.down_proj.numel() == 0
    assert model2.model.layers[0].mlp.experts.gate_up_proj.numel() > 0  # skipped layer keeps its own
    be = mc.backend(released_cfg)
    with torch.no_grad():
        eager = model2(ids).logits  # the released layer's eager forward runs the fused op
        compiled = torch.compile(model2, backend=be)(ids).logits
    torch.testing.assert_close(eager, kept, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, kept, atol=1e-5, rtol=1e-5)
    fusion = {f.name: f for f in be.fusions}["model.layers.1.mlp"]
    assert fusion.fused and fusion.traced_as == "megamoe"
    assert be.graphs[0].code.count("megamoe.fused_moe") == 1
    report = mc.explain(model2, ids)
    layer = report.layers[1]
    assert layer.released and layer.prepared_bytes < layer.original_bytes
    with pytest.raises(ValueError, match="original expert weights were released"):
        mc.prepare(model2, released_cfg.replace(recipe="fp8_fp4"))


def test_a_kernel_that_refuses_a_shape_at_load_time(monkeypatch):
    """kernel="auto": the layer stays unfused with the kernel library's words; forced: an error."""
    import importlib

    prep = importlib.import_module("megamoe_compile.prepare")  # the module, not the function

    def refuse(*args, **kwargs):
        raise RuntimeError("Assertion error (mega_moe.cuh:331): num_bytes % 16 == 0")

    monkeypatch.setattr(prep, "_build", refuse)
    model = tiny_model(layers=1, hash_layers=0)
    mc.prepare(model, mc.MegaMoEConfig(kernel="auto"))
    (plan,) = mc.layer_plans(model)
    assert not plan.fuse and "num_bytes % 16 == 0" in plan.reason
    with pytest.raises(mc.UnsupportedLayerError, match=r"model.layers.0.mlp: Assertion error"):
        mc.prepare(tiny_model(layers=1, hash_layers=0), mc.MegaMoEConfig(kernel="reference"))


def test_backend_name_resolves_through_the_entry_point_without_an_import():
    """`backend="megamoe"` in a fresh process that never imports megamoe_compile itself."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "assert 'megamoe_compile' not in sys.modules\n"
        "assert 'megamoe' in torch._dynamo.list_backends()\n"
        "f = torch.compile(lambda x: x * 2, backend='megamoe', options={'inner_backend': 'eager'})\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
        "assert 'megamoe_compile' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_report_and_rewritten_graph_are_structured_trace_artifacts():
    """What TORCH_TRACE records (and tlparse shows) beside dynamo's own graphs."""
    import json
    import logging

    from torch._logging._internal import trace_log

    artifacts = {}

    class Keep(logging.Handler):
        def emit(self, record):
            meta = getattr(record, "metadata", {})
            if "artifact" in meta and meta["artifact"]["name"].startswith("megamoe"):
                artifacts[meta["artifact"]["name"]] = record.payload

    handler = Keep()
    trace_log.addHandler(handler)
    try:
        _run(tiny_model(layers=2), eager_backend(skip_layers=[0]))
    finally:
        trace_log.removeHandler(handler)
    report = json.loads(artifacts["megamoe_fusion_report"])
    assert [(r["name"], r["fused"], r["kernel"]) for r in report] == [
        ("model.layers.0.mlp", False, None), ("model.layers.1.mlp", True, "reference")]
    assert report[0]["reason"] == "skipped by config: layer 0 is in skip_layers"
    assert "torch.ops.megamoe.fused_moe.default(" in artifacts["megamoe_rewritten_graph"]
