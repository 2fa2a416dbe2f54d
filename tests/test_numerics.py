"""The compiled model computes what eager Hugging Face computes, for every supported variant."""

from __future__ import annotations

import pytest
import torch
from helpers import eager_backend, input_ids, tiny_model

import megamoe_compile as mc

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _compare(model, ids, be, *, dynamic=False, fullgraph=True):
    with torch.no_grad():
        expected = model(ids).logits
        mc.prepare(model, be.config)
        got = torch.compile(model, backend=be, dynamic=dynamic, fullgraph=fullgraph)(ids).logits
    torch.testing.assert_close(got, expected, **TOL[expected.dtype])
    return be.fusions


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dynamic", [False, True])
def test_implementations_dtypes_and_shapes(impl, dtype, dynamic):
    model = tiny_model(impl=impl, dtype=dtype, layers=3, hash_layers=1)
    be = eager_backend()
    fusions = _compare(model, input_ids(batch=3, seq=4), be, dynamic=dynamic)
    assert [f.fused for f in fusions] == [True, True, True], [f.reason for f in fusions]
    assert {f.traced_as for f in fusions} == {impl}
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 3
    (graph,) = be.graphs
    assert graph.code.count("torch.ops.megamoe.fused_moe") == 3  # exactly one op per fused layer


@pytest.mark.parametrize("scoring, softmax_router", [("sqrtsoftplus", False), ("sigmoid", False),
                                                     ("sigmoid", True)])
def test_scoring_functions(scoring, softmax_router):
    model = tiny_model(scoring=scoring, softmax_router=softmax_router, layers=2, hash_layers=1)
    fusions = _compare(model, input_ids(), eager_backend())
    assert all(f.fused for f in fusions), [f.reason for f in fusions]
    expected = "softmax" if softmax_router else scoring
    assert {p.spec.scoring_func for p in mc.layer_plans(model)} == {expected}


def test_eager_experts_are_traced_through_grouped_mm():
    model = tiny_model(impl="eager", layers=2)
    fusions = _compare(model, input_ids(), eager_backend())
    assert all(f.fused and f.traced_as == "grouped_mm" for f in fusions)
    assert "graph break" in fusions[0].notes[0]
    # Only the fused layers' experts are switched; the model config is untouched.
    assert model.config._experts_implementation == "eager"


def test_dynamic_shapes_reuse_one_graph_across_batch_sizes():
    model = tiny_model(layers=2)
    be = eager_backend()
    mc.prepare(model, be.config)
    compiled = torch.compile(model, backend=be, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for batch, seq in [(2, 7), (3, 2), (4, 3)]:  # sizes 0/1 would specialise
            ids = input_ids(batch, seq, seed=batch + seq)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, **TOL[torch.float32])
    assert len(be.graphs) == 1


@pytest.mark.parametrize("recipe", ["none", "fp8"])
def test_inductor_end_to_end(recipe):
    """The default inner compiler (inductor) around the fused op, with the model's own weights
    and with kernel-ready copies (graph constants that AOTAutograd lifts to static inputs)."""
    # float32: inductor's bf16 code rounds the attention/hyper-connection math differently from
    # eager, which would hide what this test is about.
    model = tiny_model(layers=2, hidden=128, intermediate=128)
    be = mc.backend(kernel="reference", recipe=recipe)
    if recipe == "none":
        fusions = _compare(model, input_ids(), be)
    else:
        with torch.no_grad():
            expected = model(input_ids()).logits
            mc.prepare(model, be.config)
            got = torch.compile(model, backend=be, fullgraph=True)(input_ids()).logits
            emulated = torch.compile(model, backend=mc.backend(be.config.replace(inner_backend="eager")))(
                input_ids()).logits
        torch.testing.assert_close(got, emulated, atol=1e-4, rtol=1e-4)  # same op, other compiler
        assert ((got - expected).norm() / expected.norm()).item() < 0.25
        fusions = be.fusions
    assert all(f.fused and f.recipe == recipe for f in fusions)


def test_string_backend_fuses_what_prepare_planned():
    model = tiny_model(layers=2)
    ids = input_ids()
    mc.prepare(model)  # the backend never prepares (test_weights_are_state: unprepared models warn)
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, backend="megamoe", options={"inner_backend": "eager"})(ids).logits
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    assert len(mc.layer_plans(model)) == 2
    assert torch._dynamo.utils.counters["megamoe"]["fused_moe"] == 2


def test_generate_gives_the_same_tokens():
    model = tiny_model(layers=2)
    ids = input_ids(batch=2, seq=4)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    be = eager_backend()
    mc.prepare(model, be.config)
    model.forward = torch.compile(model.forward, backend=be, dynamic=True)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert any(f.fused for f in be.fusions)


@pytest.mark.parametrize("recipe, bound", [("fp8", 0.25), ("fp8_fp4", 0.5), ("fp4_fp4", 0.8)])
def test_reference_kernel_emulates_the_gpu_recipes(recipe, bound):
    """kernel="reference" with a quantized recipe: close to, not equal to, the bf16 model."""
    model = tiny_model(layers=2, hidden=128, intermediate=128)
    ids = input_ids()
    be = eager_backend(kernel="reference", recipe=recipe)
    with torch.no_grad():
        expected = model(ids).logits
        mc.prepare(model, be.config)
        got = torch.compile(model, backend=be)(ids).logits
    assert all(f.fused and f.recipe == recipe for f in be.fusions)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert 0 < rel < bound, rel
