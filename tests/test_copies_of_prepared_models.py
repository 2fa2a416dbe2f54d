"""A copy of a prepared model is a prepared model of its own (issue 17): `copy.deepcopy`, a pickle
or `torch.save` round trip, `share_memory()` and `.to()` keep each layer's kernel-ready weights and
their provenance, so an in-place change of the copy's expert weights is refused as it is for the
original, and re-preparing the copy follows the change. DeepSeek-V4 and Qwen3-MoE; recipe fp8 (a
kernel-ready copy exists, so staleness is possible); inner backends eager, aot_eager, inductor."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import input_ids, tiny_model

import megamoe_compile as mc

FP8 = mc.MegaMoEConfig(kernel="reference", recipe="fp8")


def v4():
    return tiny_model(seed=0, layers=2, hidden=128, intermediate=128)


def qwen():
    from helpers import family_model

    return family_model("qwen3_moe", hidden_size=128, moe_intermediate_size=128)


MODELS = {"deepseek_v4": v4, "qwen3_moe": qwen}


def _pickled(model):
    return pickle.loads(pickle.dumps(model))


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _shared(model):
    return model.share_memory()


def _moved(model):
    return model.to("cpu").to(torch.float32)  # _apply over every tensor (no change of device or dtype)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch.save": _saved, "share_memory": _shared,
          "to": _moved}


def _experts(model):
    return [block.experts for _, block in mc.models.find_moe_blocks(model)]


def _logits(model, inner):
    with torch.no_grad():
        return torch.compile(model, backend="megamoe", options={"inner_backend": inner})(input_ids()).logits


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_an_in_place_change_of_a_copy_is_refused_then_followed(family, how, inner):
    if inner == "inductor" and how not in ("deepcopy", "pickle"):
        pytest.skip("inductor: the copies that make new tensors; the others are covered with eager and aot_eager")
    original = MODELS[family]()
    mc.prepare(original, FP8)
    before = _logits(original, inner)
    model = COPIES[how](original)
    assert mc.layer_plans(model) and all(p.fuse for p in mc.layer_plans(model))
    # The same weights, the same numbers (dynamo may run the original's graph: the copy's tensors are
    # its inputs).
    torch.testing.assert_close(_logits(model, inner), before)
    experts = _experts(model)[-1]
    with torch.no_grad():
        experts.gate_up_proj.mul_(0.5)
        eager_changed = model(input_ids()).logits
    assert (eager_changed - before).abs().max() > 1e-2  # the change matters
    # Refused by the fused op itself: it runs on the copy's kernel-ready weights and checks their sources.
    with pytest.raises(RuntimeError, match="its expert weights changed after prepare.*gate_up_proj"):
        _logits(model, inner)
    mc.prepare(model, FP8)  # rebuilds the changed layer: the compiled copy follows the change
    got = _logits(model, inner)
    assert (got - before).abs().max() > 1e-2
    torch.testing.assert_close(got, eager_changed, atol=0.1, rtol=0.1)  # fp8 emulation vs eager float32
    if how in ("deepcopy", "pickle", "torch.save"):
        torch.testing.assert_close(_logits(original, inner), before)  # the original is untouched, and fresh


@pytest.mark.parametrize("family", list(MODELS))
def test_a_copy_has_kernel_ready_buffers_of_its_own(family):
    original = MODELS[family]()
    mc.prepare(original, FP8)
    model = copy.deepcopy(original)
    for mine, theirs in zip(_experts(model), _experts(original)):
        for name, buffer in mine.named_buffers():
            if name.startswith("megamoe_"):
                other = dict(theirs.named_buffers())[name]
                assert buffer.data_ptr() != other.data_ptr() and torch.equal(buffer.view(torch.uint8),
                                                                             other.view(torch.uint8))
        assert mc.models.find_moe_blocks(model)  # the copy's record points at the copy's block
    copied = mc.layer_state.record_of(_experts(model)[0])
    assert copied.block() is mc.models.find_moe_blocks(model)[0][1]
    assert copied.provenance.owner() is _experts(model)[0]


def test_a_copy_of_a_stale_model_stays_stale():
    original = v4()
    mc.prepare(original, FP8)
    with torch.no_grad():
        _experts(original)[0].down_proj.add_(0.01)
    model = copy.deepcopy(original)
    be = mc.backend(FP8, inner_backend="eager")
    with torch.no_grad(), pytest.warns(UserWarning, match="changed after prepare"):
        torch.compile(model, backend=be)(input_ids())  # met at compile time: that layer stays unfused
    assert [f.fused for f in be.fusions] == [False, True]
    assert "down_proj was changed in place" in be.fusions[0].reason
    mc.prepare(model, FP8)
    torch._dynamo.reset()
    be = mc.backend(FP8, inner_backend="eager")
    with torch.no_grad():
        torch.compile(model, backend=be)(input_ids())
    assert [f.fused for f in be.fusions] == [True, True]


@pytest.mark.parametrize("family", list(MODELS))
def test_a_deepcopy_compiled_on_its_own_is_fused(family):
    original = MODELS[family]()
    mc.prepare(original, FP8)
    model = copy.deepcopy(original)
    del original
    be = mc.backend(FP8, inner_backend="eager")
    with torch.no_grad(), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no "not prepared" warning
        torch.compile(model, backend=be)(input_ids())
    assert be.fusions and all(f.fused for f in be.fusions), [(f.name, f.reason) for f in be.fusions]


# -- inference tensors ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("recipe", ["none", "fp8"])
def test_prepare_takes_a_model_built_under_inference_mode(family, recipe):
    config = mc.MegaMoEConfig(kernel="reference", recipe=recipe, inner_backend="eager")
    reference = MODELS[family]()  # the same weights, built as usual
    mc.prepare(reference, config)
    expected = _logits(reference, "eager")
    torch._dynamo.reset()
    with torch.inference_mode():
        model = MODELS[family]()
    mc.prepare(model, config)
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        got = torch.compile(model, backend="megamoe")(input_ids()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == len(_experts(model))


def test_load_state_dict_with_assign_under_inference_mode_rebuilds():
    model = v4()
    mc.prepare(model, FP8)
    other = tiny_model(seed=5, layers=2, hidden=128, intermediate=128)
    with torch.inference_mode():
        model.load_state_dict(other.state_dict(), assign=True)
    reference = tiny_model(seed=5, layers=2, hidden=128, intermediate=128)
    mc.prepare(reference, FP8)
    with torch.inference_mode():
        torch.testing.assert_close(_logits(model, "eager"), _logits(reference, "eager"), atol=1e-5, rtol=1e-5)


# -- changes after prepare that are not weights -------------------------------------------------------

def _backend(**fields):
    return mc.backend(mc.MegaMoEConfig(kernel="reference", **fields), inner_backend="eager")


def _compile(model, be, ids=None, **kwargs):
    with torch.no_grad():
        return torch.compile(model, backend=be, **kwargs)(input_ids() if ids is None else ids).logits


def test_set_experts_implementation_after_prepare_is_followed_and_said():
    model = v4()
    be = _backend()
    mc.prepare(model, be.config)
    model.set_experts_implementation("batched_mm")
    with torch.no_grad():
        eager = model(input_ids()).logits
    assert all(e.config._experts_implementation == "megamoe" for e in _experts(model))
    calls = []
    original = torch.bmm
    with torch.no_grad():
        torch.bmm = lambda *a, **k: calls.append(1) or original(*a, **k)  # batched_mm runs (eager follows it)
        try:
            model(input_ids())
        finally:
            torch.bmm = original
    assert calls
    with pytest.warns(UserWarning, match="experts implementation is now 'batched_mm'.*planned the layer for "
                                         "'grouped_mm'.*mc.prepare"):
        got = _compile(model, be)
    assert [f.fused for f in be.fusions] == [False, False]
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    mc.prepare(model, be.config)  # planned again for batched_mm: fused
    torch._dynamo.reset()
    be = _backend()
    torch.testing.assert_close(_compile(model, be), eager, atol=1e-5, rtol=1e-5)
    assert [f.fused for f in be.fusions] == [True, True] and be.fusions[0].traced_as == "batched_mm"


def test_a_replaced_expert_parameter_is_reported_unfused_with_a_warning():
    model = v4()
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference", recipe="fp8"))
    experts = _experts(model)[0]
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach() * 0.5, requires_grad=False)
    with torch.no_grad():
        eager = model(input_ids()).logits
    be = _backend(recipe="fp8")
    with pytest.warns(UserWarning, match="model.layers.0.mlp: its expert weights changed after prepare "
                                         r"\(gate_up_proj was replaced\)"):
        got = _compile(model, be)
    assert [(f.name, f.fused) for f in be.fusions] == [("model.layers.0.mlp", False), ("model.layers.1.mlp", True)]
    torch.testing.assert_close(got, eager, atol=0.1, rtol=0.1)
    torch._dynamo.reset()
    report = mc.explain(model, input_ids())
    layer0 = report.layers[0]
    assert not layer0.fused and "gate_up_proj was replaced" in layer0.reason, layer0.reason


def test_release_with_recipe_none_says_it_releases_nothing():
    model = v4()
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference", recipe="none", release_original_weights=True))
    notes = [n for p in mc.layer_plans(model) for n in p.notes]
    assert notes and all("release_original_weights" in n and "recipe 'none'" in n for n in notes), notes
    report = mc.explain(model, input_ids())
    assert "release_original_weights" in str(report)


def test_skip_layers_takes_a_range():
    model = v4()
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference", skip_layers=range(1)))
    assert [p.fuse for p in mc.layer_plans(model)] == [False, True]
    assert mc.MegaMoEConfig(skip_layers=range(2)).skip_layers == (0, 1)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_dynamic_shapes_fuse_after_the_first_recompile(inner):
    """With dynamic=True the SwiGLU clamp traces as up.clamp(min=neg(10.0), max=10.0): fused alike."""
    model = v4()
    be = mc.backend(mc.MegaMoEConfig(kernel="reference"), inner_backend=inner)
    mc.prepare(model, be.config)
    compiled = torch.compile(model, backend=be, dynamic=True)
    for seq in (5, 7, 9):
        with torch.no_grad():
            got = compiled(input_ids(seq=seq)).logits
            expected = model(input_ids(seq=seq)).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert be.fusions and all(f.fused for f in be.fusions), [(f.name, f.reason) for f in be.fusions]


def test_the_report_shows_a_changed_routed_scaling_factor():
    model = v4()
    config = mc.MegaMoEConfig(kernel="reference")
    mc.prepare(model, config)
    for _, block in mc.models.find_moe_blocks(model):
        block.gate.routed_scaling_factor = 3.25
    mc.prepare(model, config)
    assert all(p.spec.routed_scaling_factor == 3.25 for p in mc.layer_plans(model) if p.spec.routed_scaling_factor)
    report = mc.explain(model, input_ids())
    assert "x3.25" in str(report), str(report)


def test_released_layers_with_a_hook_are_reported_fused():
    model = v4()
    config = mc.MegaMoEConfig(kernel="reference", recipe="fp8", release_original_weights=True)
    mc.prepare(model, config)
    seen = []
    for _, block in mc.models.find_moe_blocks(model):
        block.register_forward_hook(lambda module, args, out: seen.append(1))
    be = mc.backend(config, inner_backend="eager")
    with torch.no_grad():
        torch.compile(model, backend=be)(input_ids())
    assert seen and be.fusions and all(f.fused for f in be.fusions), [(f.name, f.reason) for f in be.fusions]


def test_compiling_the_experts_module_alone_of_a_prepared_model():
    model = v4()
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference"))
    experts = _experts(model)[1]
    hidden = torch.randn(6, 128)
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    weights = torch.rand(6, 2)
    be = _backend()
    with torch.no_grad(), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no "call mc.prepare" for a prepared model
        got = torch.compile(experts, backend=be)(hidden, index, weights)
        expected = experts(hidden, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [f.fused for f in be.fusions] == [False]
    assert "only this layer's experts module is in the graph" in be.fusions[0].reason, be.fusions[0].reason
    assert "mc.prepare" not in be.fusions[0].reason


def test_the_unprepared_warning_names_no_family():
    model = qwen()  # never prepared
    with torch.no_grad(), pytest.warns(UserWarning, match=r"2 MoE layer\(s\) in this graph were not prepared") as seen:
        torch.compile(model, backend=mc.backend(mc.MegaMoEConfig(kernel="reference"), inner_backend="eager"))(
            input_ids())
    assert not any("DeepSeek-V4" in str(w.message) for w in seen)
