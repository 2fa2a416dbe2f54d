"""Weight and activation quantization for the MegaMoE recipes, in plain torch (any device).

Formats:

* FP8 e4m3 ("fp8" recipe, DeepGEMM SM90): weights with one float32 scale per 128x128 block,
  activations with one scale per 1x128 group. scale = amax / 448, q = RNE(x / scale).
* MXFP4 ("fp8_fp4" recipe, DeepGEMM SM100): OCP Microscaling v1.0, E2M1 elements, one E8M0
  (UE8M0, a biased power-of-two exponent byte) scale per 32 consecutive values along K;
  activations FP8 per 1x32 with power-of-two scales.
* MXFP4 activations ("fp4_fp4" recipe, the opt-in w4a4 mode): E2M1 per 1x32 with the scale
  DeepGEMM's kernels pick (`quantize_mxfp4_activations`), weights as in "fp8_fp4".

Layout conventions verified against the published code (2026, sgl-deep-gemm 0.1.5 and
transformers 5.23):

* Nibble order: element 2j in the LOW nibble, element 2j+1 in the HIGH nibble of byte j.
  DeepGEMM: ``deep_gemm/utils/math.py`` ``per_token_cast_to_fp4`` packs
  ``codes[..., 0] | codes[..., 1] << 4`` and ``cast_back_from_fp4`` /
  ``transpose_packed_fp4`` unpack ``[::2] = b & 0xF``, ``[1::2] = b >> 4``.
  transformers: ``integrations/mxfp4.py`` ``_convert_moe_packed_tensors`` (``0::2`` from
  ``blk & 0x0F``, ``1::2`` from ``blk >> 4``) and ``integrations/finegrained_fp8.py``
  ``Fp8Dequantize._unpack_fp4`` (low nibble first).
* Code points: sign in bit 3, magnitude index in bits 0-2 over {0, .5, 1, 1.5, 2, 3, 4, 6}
  (DeepGEMM ``_dequantize_from_fp4_e2m1``, transformers ``FP4_VALUES``).
* UE8M0 byte e means 2^(e - 127) (DeepGEMM ``ceil_to_ue8m0`` / ``pack_ue8m0_to_int`` take the
  float32 exponent field; transformers subtracts 127 and ``ldexp``\\ s).

Differences from DeepGEMM's own test quantizer, on purpose: its ``_quantize_to_fp4_e2m1``
rounds midpoints down (``|x| > boundary``) and picks the scale as ``ceil_pow2(amax / 6)``
(never saturates); here we follow the OCP spec (ties to even, X = 2^(floor(log2 amax) - 2),
saturate to +-6). The kernels only read codes and scale bytes, so both are valid inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

FP8_E4M3_MAX = 448.0
MXFP4_BLOCK = 32  # OCP MX block size: values sharing one E8M0 scale
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of E2M1's largest normal (6 = 1.5 * 2^2)
E8M0_BIAS = 127
E8M0_NAN = 255
# Byte stored for an all-zero MXFP4 block: scale 1.0. Any byte but 255 would decode zeros to
# zero; 127 is chosen over the spec formula's clamp result (0 = 2^-127) because 2^-127 is a
# float32 subnormal, and DeepGEMM's float32 -> UE8M0 packers (`pack_ue8m0_to_int`, the kernel's
# `pack_fp32_into_ue8m0`) assume a zero mantissa and would corrupt neighbouring bytes.
E8M0_FOR_ZERO_BLOCK = E8M0_BIAS

# E2M1 magnitudes by 3-bit index; the index's low bit is the mantissa bit.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring magnitudes, split by where a tie goes under round-half-to-even:
# to the neighbour whose mantissa bit is 0, i.e. whose index is even.
_TIE_TO_LOWER = (0.25, 1.25, 2.5, 5.0)  # lower neighbour index is even (0, 2, 4, 6)
_TIE_TO_UPPER = (0.75, 1.75, 3.5)  # upper neighbour index is even (2, 4, 6)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation


def _check_float_input(fn: str, name: str, t: torch.Tensor, min_dim: int) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{fn}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")


def _check_dtype(fn: str, name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{fn}: {name} must be {allowed}, got {t.dtype}")


def _check_positive(fn: str, name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}")


def _check_multiple(fn: str, what: str, size: int, multiple: int, shape: torch.Size) -> None:
    if size % multiple:
        raise ValueError(
            f"{fn}: {what} = {size} is not a multiple of {multiple} (shape {tuple(shape)})")


def _check_shape(fn: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


# --------------------------------------------------------------------------- chunking


def _expert_chunks(fn: str, t: torch.Tensor, experts_per_chunk: int | None) -> Iterator[slice]:
    """Slices along dim 0 (the expert dim) of a [..., N, K] tensor.

    Weight conversions run chunk by chunk so the float32 temporaries cover `experts_per_chunk`
    matrices, not all experts (256 x 4096 x 4096 in float32 would be 16 GiB). A 2-D tensor, or
    `experts_per_chunk=None`, is one chunk.
    """
    if experts_per_chunk is not None:
        _check_positive(fn, "experts_per_chunk", experts_per_chunk)
    if t.dim() <= 2 or experts_per_chunk is None:
        yield slice(None)
        return
    for start in range(0, t.shape[0], experts_per_chunk):
        yield slice(start, start + experts_per_chunk)


# --------------------------------------------------------------------------- scales


def _ceil_power_of_two(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, for float32 s > 0 (UE8M0 rounding); float32, same shape.

    Works on the bits so it is exact (log2/ceil in floating point can be off by one near powers
    of two): a float32 with a non-zero mantissa lies strictly between 2^(exp) and 2^(exp+1).
    Subnormals round up to 2^-126; the exponent field is kept in [1, 254] like UE8M0 bytes.
    Non-finite inputs pass through unchanged.
    """
    bits = s.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    pow2 = (exponent.clamp(1, 254) << 23).view(torch.float32)
    return torch.where(torch.isfinite(s), pow2, s)


def _fp8_scale_from_amax(amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """FP8 e4m3 scale for groups with float32 absolute maximum `amax`; float32, same shape.

    A zero group (or one so tiny that amax / 448 underflows) gets scale 1: never 0, which
    would turn x / scale into NaN. NaN/inf in a group give a non-finite scale (the `== 0` test
    lets them through), so the group dequantizes to NaN instead of hiding the problem.
    """
    scale = amax / FP8_E4M3_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return _ceil_power_of_two(scale) if power_of_two else scale


def _to_fp8_saturated(scaled: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448.

    The clamp matters: x / (amax / 448) can land a rounding error above 448, and e4m3fn has no
    inf, so an unclamped cast may give NaN depending on the device's conversion.
    """
    return scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def _at_most_float32(t: torch.Tensor) -> torch.Tensor:
    """float64 -> float32; narrower floats unchanged (they promote to float32 when divided by
    the float32 scales). All quantization math is float32, so scales and codes do not depend
    on whether the caller passed float64 or float32."""
    return t.float() if t.dtype == torch.float64 else t


def _abs_max(t: torch.Tensor, dim: tuple[int, ...] | int) -> torch.Tensor:
    """max |t| over `dim` (kept), as float32, without materializing |t| (a full-size temporary)."""
    hi = t.amax(dim=dim, keepdim=True).float()
    lo = t.amin(dim=dim, keepdim=True).float()
    return torch.maximum(hi, -lo)


# --------------------------------------------------------------------------- FP8 blocks


def _split_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    """[..., N, K] -> [..., N/block, block, K/block, block] (a view when t is contiguous)."""
    *lead, n, k = t.shape
    return t.reshape(*lead, n // block, block, k // block, block)


def _quantize_fp8_blocks_chunk(
    w: torch.Tensor, block: int, power_of_two: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchunked core of `quantize_fp8_blocks` (shapes already validated)."""
    tiles = _split_blocks(_at_most_float32(w), block)
    scale = _fp8_scale_from_amax(_abs_max(tiles, dim=(-3, -1)), power_of_two)
    # Out of place: w itself must not change. bf16/fp16 / float32 promotes to float32, so this
    # is the one float32 temporary per chunk.
    q = _to_fp8_saturated(tiles / scale)
    return q.reshape(w.shape), scale.squeeze(-1).squeeze(-2)


def _check_fp8_block_dims(fn: str, t: torch.Tensor, block: int) -> None:
    _check_positive(fn, "block", block)
    n, k = t.shape[-2:]
    _check_multiple(fn, "N (dim -2)", n, block, t.shape)
    _check_multiple(fn, "K (dim -1)", k, block, t.shape)


def _check_fp8_blocks_pair(fn: str, q: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    """Validate FP8 block weights q [..., N, K] float8_e4m3fn + scale [..., N/b, K/b] float32."""
    _check_dtype(fn, "q", q, (torch.float8_e4m3fn,))
    _check_dtype(fn, "scale", scale, (torch.float32,))
    if q.dim() < 2:
        raise ValueError(f"{fn}: q must have at least 2 dims, got shape {tuple(q.shape)}")
    _check_fp8_block_dims(fn, q, block)
    *lead, n, k = q.shape
    _check_shape(fn, "scale", scale, (*lead, n // block, k // block))


@torch.no_grad()
def quantize_fp8_blocks(
    w: torch.Tensor,
    block: int = 128,
    *,
    power_of_two_scale: bool = False,
    experts_per_chunk: int | None = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 block quantization of weights (DeepGEMM SM90 recipe).

    Args:
        w: [..., N, K] float16/bfloat16/float32/float64; N and K multiples of `block`.
        block: tile edge; one scale per block x block tile.
        power_of_two_scale: round each scale up to a power of two (exact for inputs that are
            already low-precision floats, e.g. MXFP4 weights); default is the SM90 recipe.
        experts_per_chunk: leading-dim slices converted at a time (None: all at once); the
            result does not depend on it, only peak memory does.

    Returns:
        q: [..., N, K] float8_e4m3fn, q = RNE(w / scale) saturated to +-448.
        scale: [..., N/block, K/block] float32, scale = amax(|tile|) / 448 (1 for a zero tile).
    """
    fn = "quantize_fp8_blocks"
    _check_float_input(fn, "w", w, min_dim=2)
    _check_fp8_block_dims(fn, w, block)
    *lead, n, k = w.shape
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty((*lead, n // block, k // block), dtype=torch.float32, device=w.device)
    for chunk in _expert_chunks(fn, w, experts_per_chunk):
        q[chunk], scale[chunk] = _quantize_fp8_blocks_chunk(w[chunk], block, power_of_two_scale)
    return q, scale


@torch.no_grad()
def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of `quantize_fp8_blocks`.

    Args:
        q: [..., N, K] float8_e4m3fn.
        scale: [..., N/block, K/block] float32.

    Returns:
        [..., N, K] float32, q * scale of its tile.
    """
    _check_fp8_blocks_pair("dequantize_fp8_blocks", q, scale, block)
    out = _split_blocks(q.to(torch.float32), block)
    out.mul_(scale[..., :, None, :, None])
    return out.reshape(q.shape)


# --------------------------------------------------------------------------- FP8 activation groups


def quantize_fp8_groups(
    x: torch.Tensor, group: int, power_of_two_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 quantization per 1 x `group` along the last dim (activation recipe emulation).

    Args:
        x: [T, K] (any leading dims) float16/bfloat16/float32/float64, K a multiple of `group`.
        group: values sharing one scale (128 for SM90, 32 for SM100).
        power_of_two_scale: scale = 2^ceil(log2(amax / 448)) (UE8M0, the SM100 recipe)
            instead of amax / 448.

    Returns:
        q: [T, K] float8_e4m3fn; scale: [T, K/group] float32 (1 for an all-zero group).
    """
    fn = "quantize_fp8_groups"
    _check_float_input(fn, "x", x, min_dim=1)
    _check_positive(fn, "group", group)
    _check_multiple(fn, "K (dim -1)", x.shape[-1], group, x.shape)
    groups = _at_most_float32(x).reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale = _fp8_scale_from_amax(_abs_max(groups, dim=-1), power_of_two_scale)
    q = _to_fp8_saturated(groups / scale)
    return q.reshape(x.shape), scale.squeeze(-1)


def fake_quantize_fp8_groups(
    x: torch.Tensor, group: int, power_of_two_scale: bool = False
) -> torch.Tensor:
    """`quantize_fp8_groups` then dequantize: x as the FP8 kernel sees it; same shape and dtype."""
    q, scale = quantize_fp8_groups(x, group, power_of_two_scale)
    groups = q.reshape(*x.shape[:-1], x.shape[-1] // group, group).to(torch.float32)
    return (groups * scale.unsqueeze(-1)).reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------- MXFP4


UE8M0_DTYPES = (torch.uint8, torch.int8, torch.float8_e8m0fnu)  # how UE8M0 exponent bytes are stored


def ue8m0_bytes(scale: torch.Tensor, fn: str = "ue8m0_bytes", name: str = "scales") -> torch.Tensor:
    """UE8M0 scales (byte e means 2^(e - 127)) as uint8 exponent bytes: the one place that reads
    how they are stored. uint8, int8 or torch.float8_e8m0fnu storage is viewed as bytes (no copy);
    floating scales that are exact powers of two in the UE8M0 range are converted; anything else
    raises (rounding another value to a power of two would silently change the weights)."""
    if scale.dtype in UE8M0_DTYPES:
        return scale.view(torch.uint8)
    refused = (f"{fn}: {name} must be uint8 (or int8, float8_e8m0fnu) UE8M0 exponent bytes, or floating exact "
               f"powers of two in the UE8M0 range")
    if not scale.is_floating_point():
        raise ValueError(f"{refused}; got {scale.dtype}")
    value = scale.float()
    e = ((value.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)  # the float32 exponent field
    if not torch.equal(e8m0_to_float(e), value):
        raise ValueError(f"{refused}; got {scale.dtype} values that are not")
    return e


def e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 scales (any storage `ue8m0_bytes` reads): 2^(e - 127), 255 -> NaN (OCP MX v1.0),
    through torch.float8_e8m0fnu. float32, same shape. e = 0 decodes to 2^-127, a float32 subnormal,
    per the spec (DeepGEMM's bit-shift decoders read byte 0 as 0.0; its packers read the exponent
    field, 0 for both)."""
    return ue8m0_bytes(e, "e8m0_to_float", "e").view(torch.float8_e8m0fnu).float()


def _mxfp4_exponent_bytes(amax: torch.Tensor) -> torch.Tensor:
    """Shared E8M0 byte per block from its float32 amax (OCP: floor(log2 amax) - emax_elem).

    The float32 exponent field is floor(log2 amax) + 127 for normal amax, exactly; subnormal
    amax has field 0 and clamps to byte 0 just as the spec's formula does. NaN/inf -> 255.
    """
    field = (amax.view(torch.int32) >> 23) & 0xFF
    e = (field - E2M1_EMAX).clamp(0, 254)
    e = torch.where(amax == 0, torch.full_like(e, E8M0_FOR_ZERO_BLOCK), e)
    e = torch.where(torch.isfinite(amax), e, torch.full_like(e, E8M0_NAN))
    return e.to(torch.uint8)


def _e2m1_codes(scaled: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """Round float32 values (already divided by the block scale) to E2M1 codes; uint8.

    Round to nearest, ties to even (`ties="down"`: ties to the smaller magnitude), magnitudes
    above 6 saturate to 6. Counting the midpoints below |v| gives the magnitude index; a
    midpoint itself counts only if its tie goes up. Zero and values rounding to zero get code 0
    (never -0, code 8). NaN gives 0; its block scale byte is already 255 (NaN), which is what
    the decoder propagates.
    """
    magnitude = scaled.abs()
    index = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for midpoint in _TIE_TO_LOWER:
        index += magnitude > midpoint
    for midpoint in _TIE_TO_UPPER:
        index += (magnitude >= midpoint) if ties == "even" else (magnitude > midpoint)
    negative = (scaled < 0) & (index != 0)
    return index | (negative.to(torch.uint8) << 3)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> int8 [..., K/2]; element 2j low nibble, 2j+1 high nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int8)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., K/2] -> uint8 codes [..., K] (inverse of `_pack_nibbles`)."""
    b = packed.view(torch.uint8)
    codes = torch.stack((b & 0x0F, b >> 4), dim=-1)
    return codes.reshape(*b.shape[:-1], b.shape[-1] * 2)


def _quantize_mxfp4_chunk(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchunked core of `quantize_mxfp4` (shapes already validated)."""
    blocks = _at_most_float32(w).reshape(*w.shape[:-1], w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    e = _mxfp4_exponent_bytes(_abs_max(blocks, dim=-1))
    # Dividing by a power of two is exact, so the tie comparisons below see the true ratio.
    codes = _e2m1_codes(blocks / e8m0_to_float(e))
    return _pack_nibbles(codes.reshape(w.shape)), e.squeeze(-1)


@torch.no_grad()
def quantize_mxfp4(
    w: torch.Tensor, *, experts_per_chunk: int | None = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantization (OCP MX v1.0: E2M1 elements, E8M0 scale per 32 values along K).

    Per block: X = 2^(floor(log2 amax) - 2), byte e = floor(log2 amax) - 2 + 127 clamped to
    [0, 254]; an all-zero block gets e = 127 (see E8M0_FOR_ZERO_BLOCK); a block with NaN/inf
    gets e = 255 (NaN). Elements: RNE(w / X) on the E2M1 grid, ties to even, saturated to +-6
    (with this X, |w| / X < 8, so only the top of the block can saturate).

    Args:
        w: [..., N, K] float16/bfloat16/float32/float64, K a multiple of 32.
        experts_per_chunk: leading-dim slices converted at a time (None: all at once).

    Returns:
        packed: [..., N, K/2] int8, code of element 2j in the low nibble of byte j, 2j+1 high.
        scales: [..., N, K/32] uint8 E8M0 exponents.
    """
    fn = "quantize_mxfp4"
    _check_float_input(fn, "w", w, min_dim=2)
    _check_multiple(fn, "K (dim -1)", w.shape[-1], MXFP4_BLOCK, w.shape)
    *lead, n, k = w.shape
    packed = torch.empty((*lead, n, k // 2), dtype=torch.int8, device=w.device)
    scales = torch.empty((*lead, n, k // MXFP4_BLOCK), dtype=torch.uint8, device=w.device)
    for chunk in _expert_chunks(fn, w, experts_per_chunk):
        packed[chunk], scales[chunk] = _quantize_mxfp4_chunk(w[chunk])
    return packed, scales


# DeepGEMM's activation quantizers clamp a group's absolute maximum below at this value.
ACTIVATION_AMAX_FLOOR = 1e-4


@torch.no_grad()
def quantize_mxfp4_activations(x: torch.Tensor, *, ties: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 activations the way DeepGEMM's w4a4 mode makes them (emulation for the reference kernel).

    Not the OCP weight recipe of `quantize_mxfp4`: the scale is the smallest power of two with
    amax / scale <= 6, i.e. 2^ceil(log2(max(amax, 1e-4) / 6)), so nothing saturates. This is
    what sgl-deep-gemm's FP4 pre-dispatch (`per_token_cast_to_fp4` with UE8M0 scales) and its
    L1 epilogue (`get_e2m1_sf_and_sf_inv`) compute. Rounding differs between the two:
    the pre-dispatch encodes by comparing with the midpoints (`ties="down"`, a tie goes to the
    smaller magnitude), the epilogue uses the hardware conversion (`ties="even"`).

    Args:
        x: [..., K] float16/bfloat16/float32/float64, K a multiple of 32.
        ties: "even" or "down".

    Returns:
        packed: [..., K/2] int8 (low nibble first); scales: [..., K/32] uint8 E8M0 bytes.
    """
    fn = "quantize_mxfp4_activations"
    _check_float_input(fn, "x", x, min_dim=1)
    _check_multiple(fn, "K (dim -1)", x.shape[-1], MXFP4_BLOCK, x.shape)
    if ties not in ("even", "down"):
        raise ValueError(f"{fn}: ties must be 'even' or 'down', got {ties!r}")
    groups = _at_most_float32(x).reshape(*x.shape[:-1], x.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = _abs_max(groups, dim=-1).clamp_min(ACTIVATION_AMAX_FLOOR)
    scale = _ceil_power_of_two(amax / E2M1_MAX)  # NaN/inf pass through: exponent byte 255 = NaN
    codes = _e2m1_codes(groups / scale, ties)
    exponent = ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    return _pack_nibbles(codes.reshape(x.shape)), exponent.squeeze(-1)


def fake_quantize_mxfp4_activations(x: torch.Tensor, *, ties: str = "even") -> torch.Tensor:
    """`quantize_mxfp4_activations` then dequantize: x as the w4a4 kernel sees it (same shape, dtype)."""
    packed, scales = quantize_mxfp4_activations(x, ties=ties)
    return dequantize_mxfp4(packed, scales).reshape(x.shape).to(x.dtype)


def _check_mxfp4_pair(fn: str, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Validate packed [..., N, K/2] int8/uint8 + scales [..., N, K/32]; scales as uint8."""
    _check_dtype(fn, "packed", packed, (torch.int8, torch.uint8))
    scales = ue8m0_bytes(scales, fn, "scales")
    if packed.dim() < 1 or packed.shape[-1] % (MXFP4_BLOCK // 2):
        raise ValueError(
            f"{fn}: packed last dim must be a multiple of {MXFP4_BLOCK // 2} bytes "
            f"({MXFP4_BLOCK} values), got shape {tuple(packed.shape)}")
    k = packed.shape[-1] * 2
    _check_shape(fn, "scales", scales, (*packed.shape[:-1], k // MXFP4_BLOCK))
    return scales


@torch.no_grad()
def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_mxfp4`.

    Args:
        packed: [..., N, K/2] int8 (or uint8), two E2M1 codes per byte, low nibble first.
        scales: [..., N, K/32] uint8 (or float8_e8m0fnu) E8M0 exponents.

    Returns:
        [..., N, K] float32.
    """
    scales = _check_mxfp4_pair("dequantize_mxfp4", packed, scales)
    k = packed.shape[-1] * 2
    lut = _e2m1_lut(packed.device)
    values = lut[_unpack_nibbles(packed).long()]
    blocks = values.reshape(*packed.shape[:-1], k // MXFP4_BLOCK, MXFP4_BLOCK)
    blocks.mul_(e8m0_to_float(scales).unsqueeze(-1))
    return blocks.reshape(*packed.shape[:-1], k)


def _e2m1_lut(device: torch.device) -> torch.Tensor:
    """float32 [16]: value of each 4-bit E2M1 code (sign bit 3)."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat((magnitudes, -magnitudes))


# --------------------------------------------------------------------------- conversions


@torch.no_grad()
def mxfp4_to_fp8_blocks(
    packed: torch.Tensor,
    scales: torch.Tensor,
    block: int = 128,
    *,
    experts_per_chunk: int | None = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 expert weights -> FP8 e4m3 with float32 block x block scales (for Hopper).

    The block scales are powers of two: every MXFP4 value is (1 mantissa bit) x 2^k, so with
    a power-of-two scale it is exactly representable in e4m3 (3 mantissa bits) unless it lies
    more than ~16 binades below its tile's maximum, where it rounds to e4m3 subnormals/zero.

    Args:
        packed: [..., N, K/2] int8; scales: [..., N, K/32] uint8 (see `dequantize_mxfp4`).
        N and K must be multiples of `block`.

    Returns:
        q: [..., N, K] float8_e4m3fn; scale: [..., N/block, K/block] float32.
    """
    fn = "mxfp4_to_fp8_blocks"
    scales = _check_mxfp4_pair(fn, packed, scales)
    if packed.dim() < 2:
        raise ValueError(f"{fn}: packed must have at least 2 dims, got shape {tuple(packed.shape)}")
    *lead, n, half_k = packed.shape
    k = half_k * 2
    _check_positive(fn, "block", block)
    _check_multiple(fn, "N (dim -2)", n, block, packed.shape)
    _check_multiple(fn, "K (2 x packed dim -1)", k, block, packed.shape)
    q = torch.empty((*lead, n, k), dtype=torch.float8_e4m3fn, device=packed.device)
    scale = torch.empty((*lead, n // block, k // block), dtype=torch.float32, device=packed.device)
    for chunk in _expert_chunks(fn, packed, experts_per_chunk):
        dense = dequantize_mxfp4(packed[chunk], scales[chunk])
        q[chunk], scale[chunk] = _quantize_fp8_blocks_chunk(dense, block, power_of_two=True)
    return q, scale


@torch.no_grad()
def fp8_blocks_to_mxfp4(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: int = 128,
    *,
    experts_per_chunk: int | None = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 block weights -> MXFP4 (dequantize, then `quantize_mxfp4`), chunk by chunk.

    Args:
        q: [..., N, K] float8_e4m3fn; scale: [..., N/block, K/block] float32.

    Returns:
        packed: [..., N, K/2] int8; scales: [..., N, K/32] uint8 (see `quantize_mxfp4`).
    """
    fn = "fp8_blocks_to_mxfp4"
    _check_fp8_blocks_pair(fn, q, scale, block)
    _check_multiple(fn, "K (dim -1)", q.shape[-1], MXFP4_BLOCK, q.shape)
    *lead, n, k = q.shape
    packed = torch.empty((*lead, n, k // 2), dtype=torch.int8, device=q.device)
    scales = torch.empty((*lead, n, k // MXFP4_BLOCK), dtype=torch.uint8, device=q.device)
    for chunk in _expert_chunks(fn, q, experts_per_chunk):
        dense = dequantize_fp8_blocks(q[chunk], scale[chunk], block)
        packed[chunk], scales[chunk] = _quantize_mxfp4_chunk(dense)
    return packed, scales
