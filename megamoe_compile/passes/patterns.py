"""The unfused MoE code as dynamo traces it from transformers 5.23/5.24, written down as data.

Each pattern is the exact sequence of tensor operations one module's forward produces, in trace
order. Every step names its node (a role), the operation, and the dataflow: which earlier role
(or which input of the region, `$name`) each tensor argument must be. A region matches only if
its tensor operations are exactly this sequence (shape arithmetic on SymInts aside) and every
edge holds (`matcher.match`); `fuse_moe.py` then checks the constants (top-k, clamp limits,
epsilon, scaling) and which module tensors the `$` inputs are. Anything else - a hook, another
activation, a new transformers release - does not match, and the layer is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One traced operation: `role = op(*args, **keywords)`.

    `args[i]` is the role the i-th positional argument must be (None: not a tensor edge, or one
    the constant checks read). `keywords` are (name, role) for arguments that may come by keyword
    or positionally right after `args`. `commutative`: the positional args may come in any order.
    A role that starts with "$" is an input of the region, bound at its first use; every later
    use must be the same node.
    """

    role: str
    ops: tuple[str, ...]
    args: tuple[str | None, ...] = ()
    keywords: tuple[tuple[str, str], ...] = ()
    commutative: bool = False


def step(role: str, ops: str | tuple[str, ...], *args: str | None, commutative: bool = False,
         **keywords: str) -> Step:
    return Step(role, (ops,) if isinstance(ops, str) else tuple(ops), args, tuple(keywords.items()), commutative)


# Inputs of the experts region (the experts' forward arguments and weights).
HIDDEN, IDS, WEIGHTS, W1, W2, W1_SCALE, W2_SCALE = "$hidden", "$ids", "$weights", "$w1", "$w2", "$w1_scale", "$w2_scale"

GROUPED_MM_OPS = ("grouped_mm_fallback", "_grouped_mm", "grouped_mm")

# Pieces the experts implementations share.
SORTED_DISPATCH = (  # grouped: sort the (token, slot) rows by expert, count rows per expert
    step("weights_flat", "reshape", WEIGHTS),
    step("ids_flat", "reshape", IDS),
    step("sort", "sort", "ids_flat"),
    step("ids_sorted", "getitem", "sort"),
    step("perm", "getitem", "sort"),
    step("token_of_row", "floordiv", "perm"),
    step("rows", "getitem", HIDDEN, "token_of_row"),
    step("weights_sorted", "getitem", "weights_flat", "perm"),
    step("histc_input", ("float", "int"), "ids_sorted"),
    step("counts", "histc", "histc_input"),
    step("offsets", "cumsum", "counts"),
)


def clamped_swiglu(source: str) -> tuple[Step, ...]:
    """transformers' DeepseekV4Experts._apply_gate on `source`: silu(gate.clamp(max=l)) * up.clamp(-l, l)."""
    return (
        step("chunk", "chunk", source),
        step("gate", "getitem", "chunk"),
        step("up", "getitem", "chunk"),
        step("gate_clamp", "clamp", "gate"),
        step("up_clamp", "clamp", "up"),
        step("silu", "silu", "gate_clamp"),
        step("swiglu", "mul", "silu", "up_clamp", commutative=True),
    )


def plain_swiglu(source: str) -> tuple[Step, ...]:
    """transformers' default `_apply_gate` with a SiLU act_fn on `source`: silu(gate) * up."""
    return (
        step("chunk", "chunk", source),
        step("gate", "getitem", "chunk"),
        step("up", "getitem", "chunk"),
        step("silu", "silu", "gate"),
        step("swiglu", "mul", "silu", "up", commutative=True),
    )


ACTIVATIONS = {"clamped_swiglu": clamped_swiglu, "swiglu": plain_swiglu}

RESTORED_COMBINE = (  # grouped: rows back in token order, summed over the top-k slots
    step("inv_perm", "empty_like", "perm"),
    step("positions", "arange"),
    step("scatter", "setitem", "inv_perm", "perm", "positions"),
    step("unsorted", "getitem", "weighted", "inv_perm"),
    step("per_slot", "view", "unsorted"),
    step("combine", "sum", "per_slot"),
    step("out", "to", "combine"),
)


def _grouped_mm(activation) -> tuple[Step, ...]:
    return (
        *SORTED_DISPATCH,
        step("w1_t", "transpose", W1),
        step("rows_cast", "to", "rows"),
        step("mm1", GROUPED_MM_OPS, "rows_cast", "w1_t", offs="offsets"),
        *activation("mm1"),
        step("w2_t", "transpose", W2),
        step("act_cast", "to", "swiglu"),
        step("mm2", GROUPED_MM_OPS, "act_cast", "w2_t", offs="offsets"),
        step("weights_col", "unsqueeze", "weights_sorted"),
        step("weighted", "mul", "mm2", "weights_col", commutative=True),
        *RESTORED_COMBINE,
    )


def _batched_mm(activation) -> tuple[Step, ...]:
    return (
        step("rows", "repeat_interleave", HIDDEN),
        step("weights_flat", "reshape", WEIGHTS),
        step("ids_flat", "reshape", IDS),
        step("w1_sel", "getitem", W1, "ids_flat"),
        step("rows_col", "unsqueeze", "rows"),
        step("mm1", "bmm", "w1_sel", "rows_col"),
        step("mm1_out", "squeeze", "mm1"),
        *activation("mm1_out"),
        step("w2_sel", "getitem", W2, "ids_flat"),
        step("act_col", "unsqueeze", "swiglu"),
        step("mm2", "bmm", "w2_sel", "act_col"),
        step("mm2_out", "squeeze", "mm2"),
        step("weights_col", "unsqueeze", "weights_flat"),
        step("weighted", "mul", "mm2_out", "weights_col", commutative=True),
        step("per_slot", "view", "weighted"),
        step("combine", "sum", "per_slot"),
        step("out", "to", "combine"),
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

def _fp8_grouped_mm(activation) -> tuple[Step, ...]:
    return (
        *SORTED_DISPATCH,
        step("mm1", tuple(FINEGRAINED_GROUPED_MATMULS.values()), "rows", W1, W1_SCALE, "offsets", "counts"),
        *activation("mm1"),
        step("mm2", tuple(FINEGRAINED_GROUPED_MATMULS.values()), "swiglu", W2, W2_SCALE, "offsets", "counts"),
        step("weights_cast", "to", "weights_sorted"),
        step("weights_col", "unsqueeze", "weights_cast"),
        step("weighted", "mul", "mm2", "weights_col", commutative=True),
        *RESTORED_COMBINE,
    )


_IMPLEMENTATIONS = {"grouped_mm": _grouped_mm, "batched_mm": _batched_mm, "fp8_grouped_mm": _fp8_grouped_mm}
# (traced implementation, activation) -> the experts' traced code.
EXPERTS = {(impl, act): build(ACTIVATIONS[act]) for impl, build in _IMPLEMENTATIONS.items() for act in ACTIVATIONS}

# Layers whose original weights prepare released: their experts' forward is the fused op itself
# (megamoe_compile/experts.py), so the graph already holds one megamoe.fused_moe per layer.
EXPERTS_ALREADY_FUSED = (
    step("ids32", "to", IDS),
    step("weights32", "to", WEIGHTS),
    step("op", "fused_moe", HIDDEN, "ids32", "weights32", W1, None, W2),
)

# The router (transformers' DeepseekV4TopKRouter / DeepseekV4HashRouter). Inputs of its region.
ROUTER_HIDDEN, GATE_WEIGHT, SCORE_BIAS = "$hidden", "$gate_weight", "$bias"
TID2EID, INPUT_IDS = "$tid2eid", "$input_ids"

# Router score functions (transformers' ACT2FN modules, traced under `gate.score_fn`).
SCORES = {
    "sqrtsoftplus": (step("softplus", "softplus", "logits"), step("scores", "sqrt", "softplus")),
    "sigmoid": (step("scores", "sigmoid", "logits"),),
    "softmax": (step("scores", "softmax", "logits"),),
}


def router_pattern(kind: str, scoring_func: str) -> tuple[Step, ...]:
    head = (step("flat", "reshape", ROUTER_HIDDEN), step("logits", "linear", "flat", GATE_WEIGHT),
            *SCORES[scoring_func])
    if kind == "topk":
        select = (step("biased", "add", "scores", SCORE_BIAS), step("topk", "topk", "biased"),
                  step("indices", "getitem", "topk"))
    else:  # hash: indices = tid2eid[input_ids.reshape(-1)].long()
        select = (step("ids_flat", "reshape", INPUT_IDS), step("lookup", "getitem", TID2EID, "ids_flat"),
                  step("indices", "long", "lookup"))
    tail = (step("picked", "gather", "scores", None, "indices"), step("total", "sum", "picked"),
            step("denominator", "add", "total"), step("normalized", "truediv", "picked", "denominator"),
            step("scaled", "mul", "normalized"))
    return head + select + tail
