"""Our quantized formats against DeepGEMM's own pure-tensor helpers (needs `deep_gemm` importable,
which on our machines means a GPU with the kit; the helpers themselves run on any arch).

What is compared, and why it matters without a Blackwell GPU:
* MXFP4 weights: DeepGEMM's decoder (`cast_back_from_fp4`) reads our packed codes and UE8M0 bytes
  as the same numbers our decoder gives (nibble order, code table, scale grouping), and DeepGEMM's
  UE8M0 packer (`pack_ue8m0_to_int`) turns our float scales into exactly our bytes.
* w4a4 activations: our emulation of the FP4 pre-dispatch is bit-identical to DeepGEMM's host
  quantizer `per_token_cast_to_fp4(use_ue8m0=True, gran_k=32)`, which its kernel matches.
* FP8 activations (SM100 1x32 UE8M0, SM90 1x128) and FP8 weight blocks against
  `per_token_cast_to_fp8` / `per_block_cast_to_fp8`.
* The SM100 weight transform (`transform_weights_for_mega_moe`, pure torch): inverting the gate/up
  interleave and the UTCCP scale transpose recovers our weights and bytes, so the kernel reads
  gate rows as gate and up rows as up.
Run: ``pytest -m gpu tests/gpu/test_deepgemm_formats_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from megamoe_compile.ops import deepgemm, quant

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dg():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (deep_gemm's host glue needs one)")
    module, why = deepgemm._deep_gemm()
    if module is None:
        pytest.skip(why)
    return module


def _weights(*shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # Rows spanning six decades, so scales cover a wide range of exponents.
    w = torch.randn(*shape, device="cuda", generator=g)
    return w * torch.logspace(-3, 3, shape[-2], device="cuda")[:, None]


def test_deepgemm_decodes_our_mxfp4_weights_as_we_do(dg):
    w = _weights(512, 1024)
    packed, e = quant.quantize_mxfp4(w)
    ours = quant.dequantize_mxfp4(packed, e)
    sf = deepgemm.e8m0_to_float32(e)
    theirs = dg.utils.math.cast_back_from_fp4(packed, sf, gran_k=32)
    assert torch.equal(theirs, ours)
    packed_sf = dg.utils.math.pack_ue8m0_to_int(sf)  # 4 UE8M0 bytes per int32, K order
    assert packed_sf.dtype == torch.int32 and torch.equal(packed_sf.view(torch.uint8), e)
    theirs_packed = dg.utils.math.cast_back_from_fp4(packed, packed_sf, gran_k=32, use_packed_ue8m0=True)
    assert torch.equal(theirs_packed, ours)


def test_w4a4_activation_emulation_is_deepgemms_quantizer(dg):
    x = (_weights(256, 4096, seed=1) * 0.01).to(torch.bfloat16)
    x[3, :32] = 0  # an all-zero group: the 1e-4 amax floor
    x[5, 64:96] = 6 * 2.0**-4  # amax / 6 exactly a power of two
    packed, e = quant.quantize_mxfp4_activations(x, ties="down")
    their_packed, their_sf = dg.utils.math.per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=32)
    assert torch.equal(packed, their_packed)
    assert torch.equal(deepgemm.e8m0_to_float32(e), their_sf)
    # Ties to even (the L1 epilogue's conversion) differs only where a value sits on a midpoint.
    even, _ = quant.quantize_mxfp4_activations(x, ties="even")
    differ = (even != packed).float().mean().item()
    print(f"[formats] w4a4 staging: bit-identical to per_token_cast_to_fp4; ties-to-even differs in {differ:.2%} of bytes")
    assert differ < 0.05


@pytest.mark.parametrize("group, pow2", [(32, True), (128, False)])
def test_fp8_activation_emulation_against_deepgemm(dg, group, pow2):
    x = _weights(256, 4096, seed=2).to(torch.bfloat16)  # every group amax above DeepGEMM's 1e-4 floor
    q, scale = quant.quantize_fp8_groups(x, group, power_of_two_scale=pow2)
    their_q, their_scale = dg.utils.math.per_token_cast_to_fp8(x, use_ue8m0=pow2, gran_k=group)
    assert torch.equal(scale, their_scale)
    same = (q.view(torch.uint8) == their_q.view(torch.uint8)).float().mean().item()
    # They multiply by 1/scale, we divide: with power-of-two scales that is exact, otherwise a
    # value within half an ulp of a rounding boundary may land one code apart.
    ulp = (q.view(torch.uint8).int() - their_q.view(torch.uint8).int()).abs().max().item()
    print(f"[formats] FP8 activations 1x{group} (pow2 {pow2}): scales equal, codes equal in {same:.6%}")
    assert (same == 1.0) if pow2 else (same > 0.9999 and ulp <= 1)


def test_fp8_weight_blocks_against_deepgemm(dg):
    w = _weights(1024, 2048, seed=3)
    q, scale = quant.quantize_fp8_blocks(w)
    their_q, their_scale = dg.utils.math.per_block_cast_to_fp8(w, use_ue8m0=False)
    assert torch.equal(scale, their_scale)
    same = (q.view(torch.uint8) == their_q.view(torch.uint8)).float().mean().item()
    ulp = (q.view(torch.uint8).int() - their_q.view(torch.uint8).int()).abs().max().item()
    print(f"[formats] FP8 weight blocks: scales equal, codes equal in {same:.6%}")
    assert same > 0.9999 and ulp <= 1


def _undo_interleave(t: torch.Tensor, gran: int = 8) -> torch.Tensor:
    """[g0..g7, u0..u7, g8..] -> [gate | up] (our own inverse of DeepGEMM's L1 layout)."""
    e, n, *rest = t.shape
    pairs = t.reshape(e, n // (2 * gran), 2, gran, *rest)
    return torch.cat([pairs[:, :, 0].reshape(e, n // 2, *rest), pairs[:, :, 1].reshape(e, n // 2, *rest)], dim=1)


def _undo_utccp(sf: torch.Tensor) -> torch.Tensor:
    """Inverse of the UTCCP scale transpose: within 128 rows, row 4*b + a came from row 32*a + b."""
    e, mn, k = sf.shape
    return sf.reshape(e, mn // 128, 32, 4, k).transpose(2, 3).reshape(e, mn, k)


def test_sm100_weight_transform_keeps_gate_up_and_scales(dg):
    experts, hidden, intermediate = 4, 512, 256
    w1 = _weights(experts, 2 * intermediate, hidden, seed=4)
    w2 = _weights(experts, hidden, intermediate, seed=5)
    (q1, e1), (q2, e2) = quant.quantize_mxfp4(w1), quant.quantize_mxfp4(w2)
    # The scale layout transform (C++) packs UE8M0 on SM100 only; here DeepGEMM's own pure-torch
    # packer builds the same int32 words (4 bytes along K) from our float scales.
    pack = dg.utils.math.pack_ue8m0_to_int
    sf1, sf2 = pack(deepgemm.e8m0_to_float32(e1)), pack(deepgemm.e8m0_to_float32(e2))
    (l1, l1_sf), (l2, l2_sf) = dg.transform_weights_for_mega_moe((q1, sf1), (q2, sf2))
    assert torch.equal(_undo_interleave(l1), q1) and torch.equal(l2, q2)
    assert torch.equal(_undo_interleave(_undo_utccp(l1_sf)).view(torch.uint8), e1)
    assert torch.equal(_undo_utccp(l2_sf).view(torch.uint8), e2)
    # Dequantized through the transformed layout, gate rows are still gate rows.
    gate_first_row = quant.dequantize_mxfp4(l1[0, :8], _undo_utccp(l1_sf)[0, :8].view(torch.uint8))
    assert torch.equal(gate_first_row, quant.dequantize_mxfp4(q1[0, :8], e1[0, :8]))


def test_sm100_scale_layout_transform_where_it_runs(dg):
    """`transform_sf_into_required_layout` is DeepGEMM C++; on SM100 it packs UE8M0 ints. Recorded
    here for whichever GPU runs the suite: on SM90 it may refuse the (1, 32) recipe."""
    experts, mn, k = 2, 256, 512
    e = torch.randint(110, 140, (experts, mn, k // 32), device="cuda", dtype=torch.uint8)
    try:
        out = dg.transform_sf_into_required_layout(deepgemm.e8m0_to_float32(e), mn, k, recipe=(1, 32),
                                                   num_groups=experts)
    except Exception as err:  # noqa: BLE001 - the message is the result on this arch
        major = torch.cuda.get_device_capability()[0]
        if major == 10:
            raise
        pytest.skip(f"sm_{major}0: transform_sf_into_required_layout(recipe=(1, 32)) refused: {err}"[:300])
    print(f"[formats] transform_sf on sm_{torch.cuda.get_device_capability()[0]}0: dtype {out.dtype}, "
          f"shape {tuple(out.shape)}, stride {out.stride()}")
    if out.dtype == torch.int32:  # packed UE8M0 (SM100 form): the same bytes, 4 per word along K
        assert torch.equal(out.contiguous().view(torch.uint8).reshape(experts, mn, -1)[..., : k // 32], e)
    else:  # float scales kept (SM90 form): values unchanged
        assert torch.equal(out.float().contiguous(), deepgemm.e8m0_to_float32(e))
