"""Tests for megamoe_compile.ops.quant (CPU, a few seconds).

The MXFP4 checks compare against a reference written here in plain Python numbers (exact
fractions, enumeration of the eight E2M1 magnitudes), independent of the tensor code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from megamoe_compile.ops import quant

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP8_REL = 2.0**-4  # e4m3 has 3 mantissa bits: half an ulp is 2^-4 of the value


# --------------------------------------------------------------------------- reference (Python)


def ref_scale_byte(block: list[float]) -> int:
    """OCP: floor(log2 amax) - 2 + 127, clamped to [0, 254]; 127 for an all-zero block."""
    amax = max(abs(v) for v in block)
    if amax == 0:
        return 127
    _, exp = math.frexp(amax)  # amax = m * 2^exp, m in [0.5, 1) => floor(log2 amax) = exp - 1
    return min(max(exp - 1 - 2 + 127, 0), 254)


def ref_code(value: Fraction) -> int:
    """Nearest E2M1 code to `value` (already divided by the scale): enumerate, ties to even."""
    target = min(abs(value), Fraction(6))
    # Sort key: distance, then the mantissa bit (index parity), so a tie picks the even code.
    index = min(range(8), key=lambda i: (abs(target - Fraction(E2M1[i])), i % 2))
    negative = value < 0 and index != 0
    return (8 if negative else 0) | index


def ref_decode(code: int, byte: int) -> float:
    magnitude = E2M1[code & 7]
    return (-magnitude if code & 8 else magnitude) * math.ldexp(1.0, byte - 127)


def ref_quantize_row(row: list[float]) -> tuple[list[int], list[int]]:
    """One row of K values -> (K codes, K/32 scale bytes)."""
    codes, bytes_ = [], []
    for start in range(0, len(row), 32):
        block = row[start:start + 32]
        byte = ref_scale_byte(block)
        scale = Fraction(2) ** (byte - 127)
        codes += [ref_code(Fraction(v) / scale) for v in block]
        bytes_.append(byte)
    return codes, bytes_


def unpack_codes(packed: torch.Tensor) -> list[int]:
    """Bytes -> codes, low nibble first, with Python ints (not the module's unpacker)."""
    codes = []
    for b in packed.contiguous().view(torch.uint8).flatten().tolist():
        codes += [b & 0x0F, b >> 4]
    return codes


def mx_round_trip(values: list[float]) -> tuple[list[int], int, list[float]]:
    """Quantize one 32-value block; return (codes, scale byte, dequantized values)."""
    assert len(values) == 32
    w = torch.tensor([values], dtype=torch.float32)
    packed, scales = quant.quantize_mxfp4(w)
    assert packed.shape == (1, 16) and packed.dtype == torch.int8
    assert scales.shape == (1, 1) and scales.dtype == torch.uint8
    return unpack_codes(packed), int(scales.item()), quant.dequantize_mxfp4(packed, scales)[0].tolist()


def next_up(x: float) -> float:
    return torch.nextafter(torch.tensor(x), torch.tensor(math.inf)).item()


def next_down(x: float) -> float:
    return torch.nextafter(torch.tensor(x), torch.tensor(-math.inf)).item()


# --------------------------------------------------------------------------- MXFP4


@pytest.mark.parametrize("byte", [1, 60, 127, 200, 252])
def test_mxfp4_every_code_point_round_trips_exactly(byte):
    x = math.ldexp(1.0, byte - 127)
    signed = [m * x for m in E2M1] + [-m * x for m in E2M1]  # codes 0..15 in order
    block = signed + [6 * x] * 16  # 6x pins the scale byte to `byte`
    codes, got_byte, decoded = mx_round_trip(block)
    assert got_byte == byte
    assert decoded == block
    expected_codes = list(range(16))
    expected_codes[8] = 0  # -0.0 is stored as +0 (code 0)
    assert codes[:16] == expected_codes
    assert codes[16:] == [7] * 16


def test_mxfp4_midpoints_round_half_to_even():
    x = 2.0**-3
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    block = [m * x for m in ties] + [-m * x for m in ties]
    block += [6 * x] * (32 - len(block))
    codes, byte, decoded = mx_round_trip(block)
    assert byte == 127 - 3
    expected = [v * x for v in ties.values()] + [-v * x for v in ties.values()]
    assert decoded[:14] == expected
    assert codes == ref_quantize_row(block)[0]


def test_mxfp4_just_off_midpoints_round_to_nearer_neighbour():
    midpoints = [(0.25, 0.0, 0.5), (0.75, 0.5, 1.0), (1.25, 1.0, 1.5), (1.75, 1.5, 2.0),
                 (2.5, 2.0, 3.0), (3.5, 3.0, 4.0), (5.0, 4.0, 6.0)]
    block, expected = [], []
    for mid, lower, upper in midpoints:
        block += [next_down(mid), next_up(mid)]
        expected += [lower, upper]
    block += [6.0] * (32 - len(block))
    codes, byte, decoded = mx_round_trip(block)
    assert byte == 127
    assert decoded[:14] == expected
    assert codes == ref_quantize_row(block)[0]


def test_mxfp4_zero_block_and_negative_zero():
    codes, byte, decoded = mx_round_trip([0.0] * 16 + [-0.0] * 16)
    assert byte == quant.E8M0_FOR_ZERO_BLOCK == 127
    assert codes == [0] * 32
    assert decoded == [0.0] * 32

    # -0 and negatives that round to zero get code 0, not the -0 code 8.
    block = [-0.0, -0.1, -0.25, 0.1] + [6.0] * 28
    codes, byte, decoded = mx_round_trip(block)
    assert codes[:4] == [0, 0, 0, 0]
    assert decoded[:4] == [0.0] * 4

    # A hand-made -0 code still decodes to zero.
    minus_zero = torch.tensor([[0x08] + [0] * 15], dtype=torch.uint8).view(torch.int8)
    assert quant.dequantize_mxfp4(minus_zero, torch.tensor([[127]], dtype=torch.uint8))[0, 0] == 0


def test_mxfp4_largest_values_and_saturation():
    x = 2.0**5
    top = [7.99, 7.0, 6.5, 6.0, 5.5, 5.01]
    block = [v * x for v in top] + [-v * x for v in top]
    block += [0.5 * x] * (32 - len(block))
    codes, byte, decoded = mx_round_trip(block)
    assert byte == 127 + 5  # amax in [4x, 8x) => scale x
    assert decoded[:12] == [6 * x] * 6 + [-6 * x] * 6
    assert codes[:12] == [7] * 6 + [15] * 6


@pytest.mark.parametrize("k", [-120, -3, 0, 1, 5, 100, 127])
def test_mxfp4_scale_byte_at_and_around_powers_of_two(k):
    power = math.ldexp(1.0, k)
    for amax, floor_log2 in [(power, k), (next_down(power), k - 1), (next_up(power), k)]:
        _, byte, _ = mx_round_trip([amax] + [0.0] * 31)
        assert byte == min(max(floor_log2 - 2 + 127, 0), 254)
        assert byte == ref_scale_byte([amax])


def test_mxfp4_scale_byte_clamps_at_zero_for_tiny_blocks():
    for amax in [2.0**-126, 2.0**-140]:  # normal and subnormal float32, both below 2^-125
        codes, byte, decoded = mx_round_trip([amax] + [0.0] * 31)
        assert byte == 0
        assert byte == ref_scale_byte([amax])
        # 2^-126 = 2 * 2^-127 is still exact; 2^-140 is far below half of 0.5 * 2^-127.
        assert decoded[0] == (amax if amax == 2.0**-126 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_random_tensors_match_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-6, 6, 8).repeat_interleave(2)  # rows from 1e-6 to 1e6
    w = (torch.randn(2, 16, 64, generator=gen) * magnitudes[:, None]).to(dtype)
    packed, scales = quant.quantize_mxfp4(w)
    decoded = quant.dequantize_mxfp4(packed, scales)
    assert packed.shape == (2, 16, 32) and scales.shape == (2, 16, 2)
    for e in range(2):
        for n in range(16):
            row = w[e, n].float().tolist()
            codes, bytes_ = ref_quantize_row(row)
            assert unpack_codes(packed[e, n]) == codes
            assert scales[e, n].tolist() == bytes_
            expected = [ref_decode(c, bytes_[i // 32]) for i, c in enumerate(codes)]
            assert decoded[e, n].tolist() == expected


def test_mxfp4_nibble_order_low_nibble_is_even_element():
    row = [1.0, -6.0, 0.5, 3.0] + [0.0] * 28  # amax 6 -> scale 1 -> codes 2, 15, 1, 5
    packed, scales = quant.quantize_mxfp4(torch.tensor([row]))
    assert scales.tolist() == [[127]]
    raw = packed.view(torch.uint8)[0].tolist()
    assert raw[:2] == [0x2 | 0xF << 4, 0x1 | 0x5 << 4]
    assert packed[0, :2].tolist() == [-14, 81]  # same bytes as int8

    hand_made = torch.tensor([[0x71, 0x8F] + [0] * 14], dtype=torch.uint8)
    decoded = quant.dequantize_mxfp4(hand_made.view(torch.int8), torch.tensor([[128]], dtype=torch.uint8))
    assert decoded[0, :4].tolist() == [1.0, 12.0, -12.0, -0.0]
    # uint8 storage decodes the same as int8
    assert torch.equal(quant.dequantize_mxfp4(hand_made, torch.tensor([[128]], dtype=torch.uint8)), decoded)


def test_mxfp4_chunking_and_leading_dims_do_not_change_results():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, 8, 64, generator=gen)
    whole = quant.quantize_mxfp4(w, experts_per_chunk=None)
    for per_chunk in (1, 2):
        chunked = quant.quantize_mxfp4(w, experts_per_chunk=per_chunk)
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    single = quant.quantize_mxfp4(w[2, 1])
    assert torch.equal(single[0], whole[0][2, 1]) and torch.equal(single[1], whole[1][2, 1])


def test_mxfp4_nan_block_decodes_to_nan():
    packed, scales = quant.quantize_mxfp4(torch.tensor([[float("nan")] + [1.0] * 31 + [1.0] * 32]))
    assert scales.tolist() == [[255, 125]]  # second block: amax 1 -> 2^(0 - 2)
    decoded = quant.dequantize_mxfp4(packed, scales)
    assert decoded[0, :32].isnan().all() and decoded[0, 32:].eq(1.0).all()


def test_mxfp4_validation():
    with pytest.raises(ValueError, match=r"K \(dim -1\) = 48 is not a multiple of 32"):
        quant.quantize_mxfp4(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="must be float16/bfloat16/float32/float64"):
        quant.quantize_mxfp4(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="scales has shape"):
        quant.dequantize_mxfp4(torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales must be uint8"):
        quant.dequantize_mxfp4(torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, 1))


def test_e8m0_to_float_every_byte():
    e = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = quant.e8m0_to_float(e)
    assert decoded.dtype == torch.float32
    assert decoded[:255].tolist() == [math.ldexp(1.0, b - 127) for b in range(255)]
    assert decoded[255].isnan()
    assert torch.equal(quant.e8m0_to_float(e[:255].view(torch.float8_e8m0fnu)), decoded[:255])


# --------------------------------------------------------------------------- FP8 blocks


def tile_amax(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    *lead, n, k = w.shape
    tiles = w.float().reshape(*lead, n // block, block, k // block, block)
    return tiles.abs().amax(dim=(-3, -1))


def expand_tiles(t: torch.Tensor, block: int = 128) -> torch.Tensor:
    return t.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def varied_weights(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random weights whose 128x128 tiles have very different magnitudes (1e-4 .. 1e4)."""
    gen = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    tile_scale = 10 ** (torch.rand(*lead, n // 128, k // 128, generator=gen) * 8 - 4)
    return torch.randn(*shape, generator=gen) * expand_tiles(tile_scale)


@pytest.mark.parametrize("shape", [(256, 128), (2, 256, 256), (2, 1, 128, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_blocks_shapes_dtypes_and_error_bound(shape, dtype):
    w = varied_weights(*shape).to(dtype)
    q, scale = quant.quantize_fp8_blocks(w)
    assert q.shape == w.shape and q.dtype == torch.float8_e4m3fn
    assert scale.shape == (*shape[:-2], shape[-2] // 128, shape[-1] // 128)
    assert scale.dtype == torch.float32
    amax = tile_amax(w)
    assert torch.equal(scale, amax / 448)
    # The tile maximum lands on +-448 (the whole e4m3 range is used).
    assert torch.equal(tile_amax(q.float()), torch.full_like(amax, 448.0))
    error = (quant.dequantize_fp8_blocks(q, scale) - w.float()).abs()
    assert (tile_amax(error) <= FP8_REL * amax).all()


def test_fp8_blocks_zero_tile_gets_scale_one():
    w = varied_weights(256, 256)
    w[128:, :128] = 0
    q, scale = quant.quantize_fp8_blocks(w)
    assert scale[1, 0] == 1.0
    assert (scale > 0).all() and scale.isfinite().all()
    assert (q[128:, :128].float() == 0).all()
    assert torch.equal(quant.dequantize_fp8_blocks(q, scale)[128:, :128], torch.zeros(128, 128))


def test_fp8_blocks_non_finite_tile_dequantizes_to_nan_and_spares_others():
    w = varied_weights(256, 128, seed=2)
    w[5, 7] = float("nan")
    q, scale = quant.quantize_fp8_blocks(w)
    restored = quant.dequantize_fp8_blocks(q, scale)
    assert scale[0, 0].isnan() and restored[5, 7].isnan()
    assert restored[128:].isfinite().all()


def test_fp8_blocks_reject_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"N \(dim -2\) = 100 is not a multiple of 128"):
        quant.quantize_fp8_blocks(torch.zeros(2, 100, 128))
    with pytest.raises(ValueError, match=r"K \(dim -1\) = 200 is not a multiple of 128"):
        quant.quantize_fp8_blocks(torch.zeros(128, 200))
    with pytest.raises(ValueError, match="w must be float16/bfloat16/float32/float64, got torch.int64"):
        quant.quantize_fp8_blocks(torch.zeros(128, 128, dtype=torch.int64))
    with pytest.raises(ValueError, match="block must be a positive int"):
        quant.quantize_fp8_blocks(torch.zeros(128, 128), block=0)
    q = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale has shape"):
        quant.dequantize_fp8_blocks(q, torch.ones(1, 1))
    with pytest.raises(ValueError, match="q must be float8_e4m3fn"):
        quant.dequantize_fp8_blocks(q.float(), torch.ones(2, 1))


def test_fp8_blocks_chunking_layout_and_input_untouched():
    w = varied_weights(3, 256, 128, seed=3)
    original = w.clone()
    q_all, s_all = quant.quantize_fp8_blocks(w, experts_per_chunk=None)
    for per_chunk in (1, 2):
        q, s = quant.quantize_fp8_blocks(w, experts_per_chunk=per_chunk)
        assert torch.equal(q.view(torch.uint8), q_all.view(torch.uint8)) and torch.equal(s, s_all)
    assert torch.equal(w, original)
    # A non-contiguous view quantizes like its contiguous copy.
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)
    q_t, s_t = quant.quantize_fp8_blocks(w_t)
    assert torch.equal(q_t.view(torch.uint8), q_all.view(torch.uint8)) and torch.equal(s_t, s_all)


def test_fp8_blocks_power_of_two_option():
    w = varied_weights(256, 256, seed=4)
    q, scale = quant.quantize_fp8_blocks(w, power_of_two_scale=True)
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()
    amax = tile_amax(w)
    assert (scale >= amax / 448).all() and (scale < 2 * amax / 448).all()
    error = (quant.dequantize_fp8_blocks(q, scale) - w).abs()
    assert (tile_amax(error) <= FP8_REL * amax).all()


# --------------------------------------------------------------------------- FP8 activation groups


def group_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], -1, group).abs().amax(-1)


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_fp8_groups_scales_and_error_bound(group, power_of_two):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 256, generator=gen) * torch.logspace(-5, 5, 6)[:, None]
    x[0, :group] = 0  # one all-zero group
    q, scale = quant.quantize_fp8_groups(x, group, power_of_two_scale=power_of_two)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
    assert scale.shape == (6, 256 // group) and scale.dtype == torch.float32
    amax = group_amax(x, group)
    nonzero = amax > 0
    assert scale[0, 0] == 1.0
    if power_of_two:
        assert (torch.frexp(scale)[0] == 0.5).all()  # exact powers of two
        assert (scale[nonzero] >= amax[nonzero] / 448).all()
        assert (scale[nonzero] < 2 * amax[nonzero] / 448).all()
    else:
        assert torch.equal(scale[nonzero], amax[nonzero] / 448)
    assert q.float().abs().max() <= 448
    restored = q.float().reshape(6, -1, group) * scale.unsqueeze(-1)
    error = (restored.reshape(x.shape) - x).abs()
    assert (group_amax(error, group) <= FP8_REL * amax).all()


def test_fp8_groups_power_of_two_scale_is_exact_at_powers_of_two():
    x = torch.zeros(3, 32)
    x[0, 0] = 448 * 2.0**-3  # amax / 448 is exactly 2^-3: stays 2^-3
    x[1, 0] = next_up(448 * 2.0**-3)  # just above: rounds up to 2^-2
    x[2, 0] = next_down(448 * 2.0**-3)  # just below: still 2^-3
    _, scale = quant.quantize_fp8_groups(x, 32, power_of_two_scale=True)
    assert scale[:, 0].tolist() == [2.0**-3, 2.0**-2, 2.0**-3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_keeps_dtype_and_matches_quantize(dtype):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 256, generator=gen).to(dtype)
    fake = quant.fake_quantize_fp8_groups(x, 128)
    assert fake.dtype == dtype and fake.shape == x.shape
    q, scale = quant.quantize_fp8_groups(x, 128)
    expected = (q.float().reshape(4, 2, 128) * scale.unsqueeze(-1)).reshape(4, 256).to(dtype)
    assert torch.equal(fake, expected)
    assert not torch.equal(fake, x)  # it really quantized


def test_fp8_groups_validation():
    with pytest.raises(ValueError, match=r"K \(dim -1\) = 100 is not a multiple of 32"):
        quant.quantize_fp8_groups(torch.zeros(2, 100), 32)
    with pytest.raises(ValueError, match="group must be a positive int"):
        quant.quantize_fp8_groups(torch.zeros(2, 128), 0)
    with pytest.raises(ValueError, match="x must be float16/bfloat16/float32/float64"):
        quant.fake_quantize_fp8_groups(torch.zeros(2, 128, dtype=torch.int32), 32)


# --------------------------------------------------------------------------- conversions


def grouped_weights(*shape: int, decades: float, seed: int) -> torch.Tensor:
    """Random weights whose 1x32 groups span `decades` orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    group_scale = 10 ** (-decades * torch.rand(*lead, n, k // 32, generator=gen))
    return torch.randn(*shape, generator=gen) * group_scale.repeat_interleave(32, dim=-1)


def test_mxfp4_to_fp8_blocks_matches_dequantized_mxfp4():
    w = grouped_weights(3, 256, 256, decades=3, seed=7)
    packed, scales = quant.quantize_mxfp4(w)
    dense = quant.dequantize_mxfp4(packed, scales)
    q, scale = quant.mxfp4_to_fp8_blocks(packed, scales)
    assert q.shape == (3, 256, 256) and q.dtype == torch.float8_e4m3fn
    assert scale.shape == (3, 2, 2) and scale.dtype == torch.float32
    assert (torch.frexp(scale)[0] == 0.5).all()
    # Power-of-two block scales make typical MXFP4 values exact in e4m3.
    assert torch.equal(quant.dequantize_fp8_blocks(q, scale), dense)
    q1, s1 = quant.mxfp4_to_fp8_blocks(packed, scales, experts_per_chunk=None)
    assert torch.equal(q1.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s1, scale)
    # FP8 -> MXFP4 gives the original codes and scales back.
    back_packed, back_scales = quant.fp8_blocks_to_mxfp4(q, scale)
    assert torch.equal(back_packed, packed) and torch.equal(back_scales, scales)


def test_mxfp4_to_fp8_blocks_wide_range_within_fp8_rounding():
    w = grouped_weights(2, 128, 256, decades=12, seed=8)  # far beyond e4m3's range per tile
    packed, scales = quant.quantize_mxfp4(w)
    dense = quant.dequantize_mxfp4(packed, scales)
    q, scale = quant.mxfp4_to_fp8_blocks(packed, scales)
    error = (quant.dequantize_fp8_blocks(q, scale) - dense).abs()
    assert (tile_amax(error) <= FP8_REL * tile_amax(dense)).all()
    assert not torch.equal(error, torch.zeros_like(error))  # the tiny groups did round


def test_fp8_blocks_to_mxfp4_is_dequantize_then_quantize():
    w = varied_weights(3, 128, 256, seed=9)
    q, scale = quant.quantize_fp8_blocks(w)
    expected = quant.quantize_mxfp4(quant.dequantize_fp8_blocks(q, scale))
    for per_chunk in (1, None):
        packed, scales = quant.fp8_blocks_to_mxfp4(q, scale, experts_per_chunk=per_chunk)
        assert packed.shape == (3, 128, 128) and packed.dtype == torch.int8
        assert scales.shape == (3, 128, 8) and scales.dtype == torch.uint8
        assert torch.equal(packed, expected[0]) and torch.equal(scales, expected[1])


def test_conversions_validate_inputs():
    with pytest.raises(ValueError, match=r"N \(dim -2\) = 64 is not a multiple of 128"):
        quant.mxfp4_to_fp8_blocks(torch.zeros(64, 64, dtype=torch.int8), torch.zeros(64, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales has shape"):
        quant.mxfp4_to_fp8_blocks(torch.zeros(2, 128, 64, dtype=torch.int8),
                                  torch.zeros(3, 128, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale has shape"):
        quant.fp8_blocks_to_mxfp4(torch.zeros(2, 128, 128, dtype=torch.float8_e4m3fn), torch.ones(3, 1, 1))


# --------------------------------------------------------------------------- MXFP4 activations (w4a4)


def ref_activation_byte(block: list[float]) -> int:
    """DeepGEMM's activation scale: the smallest power of two s with max(amax, 1e-4) / s <= 6."""
    amax = Fraction(max(max(abs(v) for v in block), 1e-4))
    e = 0
    while amax / Fraction(2) ** e > 6:
        e += 1
    while amax / Fraction(2) ** (e - 1) <= 6:
        e -= 1
    return e + 127


def ref_activation_code(value: Fraction, ties: str) -> int:
    """Nearest E2M1 code; a tie goes to the even code ("even") or the smaller magnitude ("down")."""
    tie_break = (lambda i: i % 2) if ties == "even" else (lambda i: i)
    index = min(range(8), key=lambda i: (abs(abs(value) - Fraction(E2M1[i])), tie_break(i)))
    return (8 if value < 0 and index != 0 else 0) | index


def act_round_trip(values: list[float], ties: str) -> tuple[list[int], int]:
    packed, scales = quant.quantize_mxfp4_activations(torch.tensor([values], dtype=torch.float32), ties=ties)
    assert packed.shape == (1, 16) and packed.dtype == torch.int8 and scales.shape == (1, 1)
    return unpack_codes(packed), int(scales.item())


@pytest.mark.parametrize("k", [-12, -3, 0, 2, 7])
def test_mxfp4_activations_code_points_midpoints_and_scale(k):
    x = math.ldexp(1.0, k)
    # Every code point and every midpoint, with amax / 6 exactly 2^k: the scale is 2^k.
    midpoints = [(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])]
    values = [m * x for m in E2M1] + [-m * x for m in midpoints] + [m * x for m in midpoints]
    values = (values + [6 * x] * 32)[:32]
    got = {}
    for ties in ("even", "down"):
        codes, byte = act_round_trip(values, ties)
        assert byte == ref_activation_byte(values) == k + 127
        assert codes == [ref_activation_code(Fraction(v) / Fraction(x), ties) for v in values]
        got[ties] = codes
    # The modes differ exactly at the midpoints whose even neighbour is the larger one.
    differ = [i for i in range(32) if got["even"][i] != got["down"][i]]
    assert differ == [i for i, v in enumerate(values) if abs(v) / x in (0.75, 1.75, 3.5)] and len(differ) == 6


def test_mxfp4_activations_never_saturate_and_scale_rounds_up():
    # amax just above 6 * 2^k needs the next power of two; OCP weights would keep 2^k and clamp.
    values = [6.0 * 1.01] + [0.3] * 31
    codes, byte = act_round_trip(values, "even")
    assert byte == 128 and codes[0] == 5  # 6.06 / 2 = 3.03 -> 3.0 (index 5)
    w_packed, w_scales = quant.quantize_mxfp4(torch.tensor([values]))
    assert int(w_scales.item()) == 127 and unpack_codes(w_packed)[0] == 7  # the weight recipe saturates


def test_mxfp4_activations_amax_floor_zero_and_nan():
    codes, byte = act_round_trip([0.0] * 32, "down")
    assert codes == [0] * 32 and byte == ref_activation_byte([0.0]) == 127 - 15  # 2^ceil(log2(1e-4 / 6)) = 2^-15
    x = torch.randn(2, 64)
    x[1, 40] = float("nan")
    packed, scales = quant.quantize_mxfp4_activations(x)
    out = quant.dequantize_mxfp4(packed, scales)
    assert scales[1, 1] == 255 and out[1, 32:].isnan().all() and out[1, :32].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_activations_random_rows_match_reference(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 96, generator=g) * torch.logspace(-3, 3, 96)).to(dtype)
    for ties in ("even", "down"):
        packed, scales = quant.quantize_mxfp4_activations(x, ties=ties)
        got = unpack_codes(packed)
        rows = x.float().tolist()
        expected, expected_bytes = [], []
        for row in rows:
            for start in range(0, 96, 32):
                block = row[start:start + 32]
                byte = ref_activation_byte(block)
                expected_bytes.append(byte)
                expected += [ref_activation_code(Fraction(v) / Fraction(2) ** (byte - 127), ties) for v in block]
        assert got == expected and scales.flatten().tolist() == expected_bytes
        fake = quant.fake_quantize_mxfp4_activations(x, ties=ties)
        assert fake.dtype == dtype and fake.shape == x.shape
        assert torch.equal(fake, quant.dequantize_mxfp4(packed, scales).to(dtype))


def test_mxfp4_activations_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_mxfp4_activations(torch.randn(2, 48))
    with pytest.raises(ValueError, match="ties must be"):
        quant.quantize_mxfp4_activations(torch.randn(2, 32), ties="up")
    with pytest.raises(ValueError):
        quant.quantize_mxfp4_activations(torch.zeros(2, 32, dtype=torch.int32))
