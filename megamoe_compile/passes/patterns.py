"""The unfused MoE code as dynamo traces it from transformers 5.23, written down as data.

Each pattern is the exact sequence of tensor operations one module's forward produces, in trace
order, with a role name per node. A region of the graph matches only if its tensor operations
are exactly this sequence (shape arithmetic on SymInts aside); the roles then let the checks in
`fuse_moe.py` read the constants (top-k, clamp limits, scaling factor) and the dataflow.
Anything else - a hook, another activation, a new transformers release - does not match, and the
layer is left as it was.
"""

from __future__ import annotations

# An entry is (role, op) or (role, (op, op, ...)) for alternatives. Role "" = not inspected.
GROUPED_MM_OPS = ("grouped_mm_fallback", "_grouped_mm", "grouped_mm")

# Pieces the experts implementations share.
SORTED_DISPATCH = (  # grouped: sort the (token, slot) rows by expert, count rows per expert
    ("weights_flat", "reshape"),
    ("ids_flat", "reshape"),
    ("sort", "sort"),
    ("ids_sorted", "getitem"),
    ("perm", "getitem"),
    ("token_of_row", "floordiv"),
    ("rows", "getitem"),
    ("weights_sorted", "getitem"),
    ("histc_input", ("float", "int")),
    ("counts", "histc"),
    ("offsets", "cumsum"),
)
CLAMPED_SWIGLU = (  # transformers' DeepseekV4Experts._apply_gate
    ("chunk", "chunk"),
    ("gate", "getitem"),
    ("up", "getitem"),
    ("gate_clamp", "clamp"),
    ("up_clamp", "clamp"),
    ("silu", "silu"),
    ("swiglu", "mul"),
)
RESTORED_COMBINE = (  # grouped: rows back in token order, summed over the top-k slots
    ("inv_perm", "empty_like"),
    ("positions", "arange"),
    ("scatter", "setitem"),
    ("unsorted", "getitem"),
    ("per_slot", "view"),
    ("combine", "sum"),
    ("out", "to"),
)

EXPERTS_GROUPED_MM = (
    *SORTED_DISPATCH,
    ("w1_t", "transpose"),
    ("rows_cast", "to"),
    ("mm1", GROUPED_MM_OPS),
    *CLAMPED_SWIGLU,
    ("w2_t", "transpose"),
    ("act_cast", "to"),
    ("mm2", GROUPED_MM_OPS),
    ("weights_col", "unsqueeze"),
    ("weighted", "mul"),
    *RESTORED_COMBINE,
)

EXPERTS_BATCHED_MM = (
    ("rows", "repeat_interleave"),
    ("weights_flat", "reshape"),
    ("ids_flat", "reshape"),
    ("w1_sel", "getitem"),
    ("rows_col", "unsqueeze"),
    ("mm1", "bmm"),
    ("mm1_out", "squeeze"),
    *CLAMPED_SWIGLU,
    ("w2_sel", "getitem"),
    ("act_col", "unsqueeze"),
    ("mm2", "bmm"),
    ("mm2_out", "squeeze"),
    ("weights_col", "unsqueeze"),
    ("weighted", "mul"),
    ("per_slot", "view"),
    ("combine", "sum"),
    ("out", "to"),
)

# transformers' fine-grained FP8 experts (`FP8Experts`, a quantized checkpoint), grouped_mm forward
# (`fp8_grouped_mm_experts_forward`, inference, dynamic activations, no expert parallelism). Each
# grouped matmul calls the finegrained-fp8 kernel's Triton op, chosen by weight dtype: FP8 128x128
# blocks or MXFP4. Both ops quantize the activations inside (FP8 per 1x128 amax/448; FP8 per 1x32
# with UE8M0 scales). Before each, `_load_finegrained_fp8_kernel()` (allow_in_graph) leaves a node
# that takes nothing and returns None: no tensor, so the matcher skips it like shape plumbing.
FINEGRAINED_FP8_NAMESPACE = "_finegrained_fp8"  # the kernel's op namespace starts with this
FINEGRAINED_GROUPED_MATMULS = {
    "fp8": "w8a8_block_dynamic_fp8_matmul_grouped",  # (A, B, Bs, offsets, tokens_per_expert, block_size[, out_dtype])
    "mxfp4": "w4a8_mx_dynamic_fp4_matmul_grouped",  # (A, B, Bs, offsets, tokens_per_expert[, out_dtype])
}

EXPERTS_FP8_GROUPED_MM = (
    *SORTED_DISPATCH,
    ("mm1", tuple(FINEGRAINED_GROUPED_MATMULS.values())),
    *CLAMPED_SWIGLU,
    ("mm2", tuple(FINEGRAINED_GROUPED_MATMULS.values())),
    ("weights_cast", "to"),
    ("weights_col", "unsqueeze"),
    ("weighted", "mul"),
    *RESTORED_COMBINE,
)

EXPERTS = {"grouped_mm": EXPERTS_GROUPED_MM, "batched_mm": EXPERTS_BATCHED_MM,
           "fp8_grouped_mm": EXPERTS_FP8_GROUPED_MM}

# Layers whose original weights prepare released: their experts' forward is the fused op itself
# (megamoe_compile/experts.py), so the graph already holds one megamoe.fused_moe per layer.
EXPERTS_ALREADY_FUSED = (
    ("ids32", "to"),
    ("weights32", "to"),
    ("op", "fused_moe"),
)

# Router score functions (transformers' ACT2FN modules, traced under `gate.score_fn`).
SCORES = {
    "sqrtsoftplus": (("", "softplus"), ("scores", "sqrt")),
    "sigmoid": (("scores", "sigmoid"),),
    "softmax": (("scores", "softmax"),),
}


def router_pattern(kind: str, scoring_func: str) -> tuple:
    head = (("flat", "reshape"), ("logits", "linear"), *SCORES[scoring_func])
    if kind == "topk":
        select = (("biased", "add"), ("topk", "topk"), ("indices", "getitem"))
    else:  # hash: indices = tid2eid[input_ids.reshape(-1)].long()
        select = (("ids_flat", "reshape"), ("lookup", "getitem"), ("indices", "long"))
    tail = (("picked", "gather"), ("total", "sum"), ("denominator", "add"), ("normalized", "truediv"),
            ("scaled", "mul"))
    return head + select + tail
