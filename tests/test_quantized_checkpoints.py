"""Quantized DeepSeek-V4 checkpoints as transformers 5.23 loads them: FP8 (128x128 block) dense
weights with FP8 or MXFP4 experts, used as they are.

What transformers does (read in `quantizers/quantizer_finegrained_fp8.py` and
`integrations/finegrained_fp8.py`): `quantization_config = {"quant_method": "fp8", ...}` plus
`expert_dtype` ("fp8" | "fp4", moved into the quantization config by DeepseekV4Config) swap every
`nn.Linear` for `FP8Linear` and each `DeepseekV4Experts` for `FP8Experts`, whose `gate_up_proj` /
`down_proj` hold the checkpoint's FP8 (or int8-packed E2M1) values with `*_scale_inv` scales.
Checkpoint scales named `*.scale` (as the released V4 checkpoints ship them) are renamed to
`*.weight_scale_inv`; per-expert `w1`/`w3`/`w2` are merged into the stacked tensors.

On a machine without a GPU, `validate_environment` refuses FP8 (it needs accelerate, then sets
`dequantize=True` and loads plain bf16 `DeepseekV4Experts`). The tests patch it to load the module
structure a GPU gets. That structure cannot run on CPU: FP8Linear and FP8Experts call the
`finegrained-fp8` Triton kernel from the hub (or DeepGEMM). A CPU stand-in for that kernel (in
tests/fp8_checkpoints.py) registers ops with the same names and arguments as the published kernel,
so the loaded model runs eagerly and traces as it would on a GPU.
"""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch
from fp8_checkpoints import OTHER_OPS, STANDIN_OPS, fp8_blocks, standin_kernel
from helpers import eager_backend, input_ids, tiny_model
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4ForCausalLM
from transformers.integrations import finegrained_fp8 as tf8
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

import megamoe_compile as mc
from megamoe_compile import layer_state, models
from megamoe_compile.ops import quant

prep = importlib.import_module("megamoe_compile.prepare")  # the package's `prepare` is the function
E8M0 = torch.float8_e8m0fnu
SIZES = dict(hidden=256, intermediate=128, experts=8, top_k=2)  # multiples of 128: FP8 blocks


@pytest.fixture
def finegrained_kernel(monkeypatch):
    monkeypatch.setattr(tf8, "_FINEGRAINED_FP8", standin_kernel(STANDIN_OPS))


# -- quantized checkpoints ----------------------------------------------------------------------

def _as_e8m0(s: torch.Tensor) -> torch.Tensor:
    return (torch.log2(s).round() + 127).to(torch.uint8).view(E8M0)


def quantized_checkpoint(path, model, *, expert_dtype: str = "fp4", scale_fmt: str = "ue8m0") -> dict:
    """Save `model` as a V4-style quantized checkpoint in `path`; returns the tensors written.

    Dense linears: FP8 e4m3, 128x128 blocks, scales under `<name>.scale`. Experts (`experts.E.w1/w3/w2`):
    MXFP4 (int8, two E2M1 codes per byte, low nibble first, UE8M0 scale per 1x32) or FP8 blocks.
    Embeddings, head, norms and the router stay in the model's dtype.
    """
    model.save_pretrained(path)
    tensors, ue8m0 = {}, scale_fmt == "ue8m0"
    for key, v in load_file(path / "model.safetensors").items():
        stem = key[: -len("weight")]
        if re.search(r"\.experts\.\d+\.w[123]\.weight$", key) and expert_dtype == "fp4":
            q, s = quant.quantize_mxfp4(v.float())
            tensors[key], tensors[stem + "scale"] = q, s.view(E8M0)
        elif key.endswith(".weight") and v.dim() == 2 and not re.search(r"(embed|head|gate\.weight|norm)", key):
            q, s = fp8_blocks(v, ue8m0)
            tensors[key], tensors[stem + "scale"] = q, (_as_e8m0(s) if ue8m0 else s)
        else:
            tensors[key] = v
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "scale_fmt": scale_fmt, "weight_block_size": [128, 128]}
    config["expert_dtype"] = expert_dtype  # where V4 checkpoints put it
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def load_quantized(path, dtype=torch.bfloat16, *, dequantize: bool = False):
    """`from_pretrained` as on a GPU machine (FP8 modules kept), or with transformers' CPU fallback
    (`dequantize=True`, what `validate_environment` chooses when no GPU is present)."""
    def validate_environment(self, *args, **kwargs):
        if dequantize:
            self.quantization_config.dequantize = True

    original = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = validate_environment
    try:
        return DeepseekV4ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = original


def _model(dtype=torch.bfloat16, layers=2, seed=0, **overrides):
    return tiny_model(layers=layers, hash_layers=1, dtype=dtype, seed=seed, **{**SIZES, **overrides})


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


FORMATS = [("fp4", "ue8m0"), ("fp8", "ue8m0"), ("fp8", "float")]


# -- loading and describe -----------------------------------------------------------------------

@pytest.mark.parametrize("expert_dtype, scale_fmt", FORMATS)
def test_transformers_loads_fp8_experts_and_describe_reads_them(tmp_path, expert_dtype, scale_fmt):
    quantized_checkpoint(tmp_path, _model(), expert_dtype=expert_dtype, scale_fmt=scale_fmt)
    model = load_quantized(tmp_path)
    H, I_, E = SIZES["hidden"], SIZES["intermediate"], SIZES["experts"]
    for name, block in models.find_moe_blocks(model):
        experts = block.experts
        assert type(experts) is tf8.FP8Experts and models.is_fp8_experts(experts)
        assert type(block.shared_experts.down_proj) is tf8.FP8Linear
        if expert_dtype == "fp4":
            assert experts.gate_up_proj.dtype == torch.int8 and experts.gate_up_proj.shape == (E, 2 * I_, H // 2)
            assert experts.down_proj.shape == (E, H, I_ // 2)
            assert experts.gate_up_proj_scale_inv.dtype == E8M0
            assert experts.gate_up_proj_scale_inv.shape == (E, 2 * I_, H // 32)
        else:
            assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and experts.gate_up_proj.shape == (E, 2 * I_, H)
            assert experts.gate_up_proj_scale_inv.dtype == (E8M0 if scale_fmt == "ue8m0" else torch.float32)
            assert experts.down_proj_scale_inv.shape == (E, H // 128, I_ // 128)
        spec, why = models.describe(name, block)
        assert spec is not None, why
        assert spec.experts_class == "FP8Experts" and spec.traced_implementation == "fp8_grouped_mm"
        assert spec.weight_format == ("mxfp4" if expert_dtype == "fp4" else "fp8")
        assert (spec.hidden, spec.intermediate, spec.num_experts) == (H, I_, E)
        assert spec.dtype == torch.bfloat16 and spec.swiglu_limit == experts.limit
        assert prep.default_recipe("reference", spec) == ("fp8_fp4" if expert_dtype == "fp4" else "fp8")


def test_the_loaded_model_cannot_run_on_cpu_without_the_hub_kernel(tmp_path, monkeypatch):
    from transformers.utils.import_utils import is_kernels_available

    if is_kernels_available() or torch.cuda.is_available():
        pytest.skip("the finegrained-fp8 kernel could be loaded here")
    quantized_checkpoint(tmp_path, _model())
    model = load_quantized(tmp_path)
    monkeypatch.setattr(tf8, "_FINEGRAINED_FP8", None)
    with torch.no_grad(), pytest.raises(ImportError, match="finegrained-fp8"):
        model(input_ids())


@pytest.mark.parametrize("expert_dtype, scale_fmt", FORMATS)
def test_prepare_keeps_the_checkpoint_values_bit_for_bit(tmp_path, expert_dtype, scale_fmt):
    written = quantized_checkpoint(tmp_path, _model(), expert_dtype=expert_dtype, scale_fmt=scale_fmt)
    model = load_quantized(tmp_path)
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference"))
    for plan, (_, block) in zip(mc.layer_plans(model), models.find_moe_blocks(model)):
        assert plan.fuse and plan.recipe == ("fp8_fp4" if expert_dtype == "fp4" else "fp8"), plan.reason
        got = layer_state.kernel_weights(block.experts)
        # The kernel reads the module's own tensors: no copy of the weights was made.
        assert got.w1.data_ptr() == block.experts.gate_up_proj.data_ptr()
        assert got.w2.data_ptr() == block.experts.down_proj.data_ptr()
        stem = f"model.layers.{plan.layer_index}.ffn.experts"
        for e in range(SIZES["experts"]):
            w1, w3, w2 = (f"{stem}.{e}.{w}" for w in ("w1", "w3", "w2"))
            for kernel_w, kernel_s, names in ((got.w1, got.w1_scale, (w1, w3)), (got.w2, got.w2_scale, (w2,))):
                codes = torch.cat([written[n + ".weight"] for n in names]).view(torch.uint8)
                assert torch.equal(kernel_w[e].view(torch.uint8), codes)
                if expert_dtype == "fp4":  # UE8M0 bytes, as stored
                    scales = torch.cat([written[n + ".scale"] for n in names]).view(torch.uint8)
                    assert kernel_s.dtype == torch.uint8 and torch.equal(kernel_s[e], scales)
                else:  # float32 for the kernels; UE8M0 bytes decode exactly
                    scales = torch.cat([written[n + ".scale"].float() for n in names])
                    assert kernel_s.dtype == torch.float32 and torch.equal(kernel_s[e], scales)
        # The report counts only new memory: at most float32 copies of the scales.
        scale_bytes = sum(t.numel() * 4 for t in (got.w1_scale, got.w2_scale))
        assert plan.prepared_bytes <= scale_bytes and (expert_dtype != "fp4" or plan.prepared_bytes == 0)
    # Nothing to release: the quantized experts' own forward keeps its weights.
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference", release_original_weights=True))
    for plan, (_, block) in zip(mc.layer_plans(model), models.find_moe_blocks(model)):
        assert block.experts.gate_up_proj.numel() > 0
        assert any(note.startswith("release_original_weights: not for FP8Experts") for note in plan.notes)


# -- the pass on the loaded model -----------------------------------------------------------------

def _compile_and_compare(model, ids, *, dynamic=False, **config):
    be = eager_backend(**config)
    with torch.no_grad():
        expected = model(ids).logits
        mc.prepare(model, be.config)
        got = torch.compile(model, backend=be, dynamic=dynamic, fullgraph=True)(ids).logits
    return be, got, expected


@pytest.mark.parametrize("expert_dtype, dynamic", [("fp4", False), ("fp8", True)])
def test_compiled_quantized_model_matches_its_eager_output(tmp_path, finegrained_kernel, expert_dtype, dynamic):
    """float32 activations: the only differences left are summation order (and what it does to
    the FP8 rounding of the next layer's activations), so the bound is tight compared with the
    quantization error itself."""
    dense = _model(torch.float32, layers=3)
    quantized_checkpoint(tmp_path, dense, expert_dtype=expert_dtype)
    model = load_quantized(tmp_path, torch.float32)
    ids = input_ids(batch=3, seq=6)
    be, got, expected = _compile_and_compare(model, ids, dynamic=dynamic)
    assert [f.fused for f in be.fusions] == [True] * 3, [f.reason for f in be.fusions]
    assert {(f.traced_as, f.recipe) for f in be.fusions} == {
        ("fp8_grouped_mm", "fp8_fp4" if expert_dtype == "fp4" else "fp8")}
    code = be.graphs[0].code
    assert code.count("megamoe.fused_moe") == 3
    # What is left of the kernel's grouped matmuls belongs to the attention's FP8GroupedLinear.
    grouped_linears = sum(type(m) is tf8.FP8GroupedLinear for m in model.modules())
    assert code.count("_matmul_grouped(") == grouped_linears and "fp4_matmul_grouped" not in code
    with torch.no_grad():
        quantization_error = _rel(expected, dense(ids).logits)
    assert _rel(got, expected) < 1e-2 and _rel(got, expected) < quantization_error / 10, \
        (_rel(got, expected), quantization_error)


def test_bf16_quantized_model_compiles_and_fuses(tmp_path, finegrained_kernel):
    """bf16 smoke test: logits of this tiny random model move by several percent under any
    rounding change (eager bf16 against eager float32 differs as much), so accuracy in bf16 is
    measured on one MoE layer below."""
    quantized_checkpoint(tmp_path, _model(), expert_dtype="fp4")
    model = load_quantized(tmp_path)
    be, got, expected = _compile_and_compare(model, input_ids(batch=3, seq=6), dynamic=True)
    assert all(f.fused for f in be.fusions) and torch.isfinite(got).all()
    assert _rel(got, expected) < 0.25


@pytest.mark.parametrize("expert_dtype", ["fp4", "fp8"])
def test_one_layer_fused_op_against_transformers_fp8_experts(tmp_path, finegrained_kernel, expert_dtype):
    """The fused op on prepare's weights against FP8Experts.forward (grouped_mm) on the same input.

    float32: equal up to summation order. bf16: transformers rounds each matmul's output, the
    SwiGLU, the weighting and the sum to bf16, and then quantizes the rounded intermediate to
    FP8; the reference kernel keeps float32 until its output. Against float32 math on the same
    quantized weights the fused op is within bf16 output rounding, transformers' bf16 path is not.
    """
    quantized_checkpoint(tmp_path, _model(), expert_dtype=expert_dtype)
    model = load_quantized(tmp_path)
    mc.prepare(model, mc.MegaMoEConfig(kernel="reference"))
    block = model.model.layers[1].mlp
    plan, experts = layer_state.plan_of(block), block.experts
    w = layer_state.kernel_weights(experts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, SIZES["hidden"], generator=g).bfloat16().float()  # the same input in both dtypes
    idx = torch.stack([torch.randperm(SIZES["experts"], generator=g)[: SIZES["top_k"]] for _ in range(24)])
    weights = torch.rand(24, SIZES["top_k"], generator=g)

    def fused(x):
        return torch.ops.megamoe.fused_moe(x, idx.int(), weights, w.w1, w.w1_scale, w.w2, w.w2_scale,
                                           kernel="reference", recipe=plan.recipe, routed_scaling_factor=1.0,
                                           swiglu_limit=plan.spec.swiglu_limit)

    with torch.no_grad():
        hf32, ours32 = experts(x, idx, weights), fused(x)
        xb = x.bfloat16()
        hf16, ours16 = experts(xb, idx, weights.bfloat16()), fused(xb)
    assert _rel(ours32, hf32) < 1e-6
    assert _rel(ours16, ours32) < 5e-3
    assert _rel(ours16, ours32) < _rel(hf16, hf32)


def test_eager_fp8_experts_are_traced_through_grouped_mm(tmp_path, finegrained_kernel):
    dense = _model(torch.float32)
    quantized_checkpoint(tmp_path, dense)
    model = load_quantized(tmp_path, torch.float32)
    model.config._experts_implementation = "eager"  # FP8Experts.forward loops over experts
    be, got, expected = _compile_and_compare(model, input_ids())
    assert all(f.fused and f.traced_as == "fp8_grouped_mm" for f in be.fusions)
    assert "graph break" in be.fusions[0].notes[0]
    assert _rel(got, expected) < 1e-2


# -- what is refused, and why ---------------------------------------------------------------------

@pytest.mark.parametrize("change, reason", [
    (lambda e: setattr(e, "activation_scheme", "static"), "activation_scheme"),
    (lambda e: setattr(e, "swiglu_alpha", 1.702), "swiglu_alpha"),
    (lambda e: setattr(e, "gate_softcap", 30.0), "gate_softcap"),
    # transformers 5.25: the clamp after the activation (silu(gate).clamp(max=limit)), not before it.
    (lambda e: setattr(e, "limit_after_act", True), "limit_after_act"),
    (lambda e: setattr(e, "block_size", [64, 64]), "weight_block_size"),
    (lambda e: setattr(e, "_apply_gate", lambda x: x), "gating function"),
    (lambda e: setattr(e.config, "_experts_implementation", "batched_mm"), "batched_mm"),
    (lambda e: setattr(e.config, "_experts_implementation", "deepgemm"), "deepgemm"),
])
def test_describe_refuses_fp8_experts_it_cannot_fuse(tmp_path, change, reason):
    quantized_checkpoint(tmp_path, _model(), expert_dtype="fp8")
    model = load_quantized(tmp_path)
    name, block = models.find_moe_blocks(model)[0]
    assert models.describe(name, block)[0] is not None
    change(block.experts)
    spec, why = models.describe(name, block)
    assert spec is None and reason in why, why


def test_float32_fp4_scales_are_refused(tmp_path):
    """scale_fmt="float" with FP4 experts gives float32 1x32 scales, which transformers' own FP4
    kernels cannot take; the layer is left alone rather than guessed at."""
    quantized_checkpoint(tmp_path, _model(), expert_dtype="fp4", scale_fmt="float")
    model = load_quantized(tmp_path)
    name, block = models.find_moe_blocks(model)[0]
    spec, why = models.describe(name, block)
    assert spec is None and "UE8M0" in why, why
    with pytest.raises(ValueError, match="powers of two"):
        quant.ue8m0_bytes(torch.full((2,), 0.3))


def test_a_grouped_matmul_from_another_library_is_not_fused(tmp_path, monkeypatch):
    """Same op name, other namespace: not the finegrained-fp8 kernel, so not rewritten."""
    monkeypatch.setattr(tf8, "_FINEGRAINED_FP8", standin_kernel(OTHER_OPS))
    quantized_checkpoint(tmp_path, _model(torch.float32))
    model = load_quantized(tmp_path, torch.float32)
    be, got, expected = _compile_and_compare(model, input_ids())
    assert not any(f.fused for f in be.fusions)
    assert all("some_other_kernels::w4a8_mx_dynamic_fp4_matmul_grouped" in f.reason for f in be.fusions)
    torch.testing.assert_close(got, expected)


def test_scale_grid_mismatch_is_an_error():
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.zeros(2, 256, 64, dtype=torch.int8)
    experts.gate_up_proj_scale_inv = torch.zeros(2, 2, 1, dtype=torch.float32)  # FP8 grid, not 1x32
    experts.down_proj = torch.zeros(2, 128, 64, dtype=torch.int8)
    experts.down_proj_scale_inv = torch.zeros(2, 128, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="gate_up_proj .* expected"):
        models.fp8_checkpoints.checkpoint_weights(experts, "mxfp4")


# -- transformers' CPU fallback: dequantized at load -------------------------------------------------

def test_dequantized_load_is_dense_and_requantizes_to_the_same_values(tmp_path):
    """Without a GPU transformers dequantizes FP8/FP4 to bf16 at load (DeepseekV4Experts). The FP4
    values are exact in bf16, so recipe "fp8_fp4" rebuilds MXFP4 weights with the checkpoint's
    values (codes and scales may be spelled differently where a block's maximum is below 4)."""
    written = quantized_checkpoint(tmp_path, _model(), expert_dtype="fp4")
    model = load_quantized(tmp_path, dequantize=True)
    name, block = models.find_moe_blocks(model)[1]
    experts = block.experts
    assert type(experts) is models.deepseek_v4.v4_classes().DeepseekV4Experts and experts.gate_up_proj.dtype == torch.bfloat16
    stem = "model.layers.1.ffn.experts.3"
    checkpoint = torch.cat([quant.dequantize_mxfp4(written[f"{stem}.{w}.weight"], written[f"{stem}.{w}.scale"])
                            for w in ("w1", "w3")])
    assert torch.equal(experts.gate_up_proj[3].float(), checkpoint)

    be, got, expected = _compile_and_compare(model, input_ids())  # auto: recipe "none", the bf16 values
    assert all(f.fused and f.recipe == "none" for f in be.fusions)
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)

    mc.prepare(model, mc.MegaMoEConfig(kernel="reference", recipe="fp8_fp4"))
    w = layer_state.kernel_weights(experts)
    assert torch.equal(quant.dequantize_mxfp4(w.w1[3], w.w1_scale[3]), checkpoint)
