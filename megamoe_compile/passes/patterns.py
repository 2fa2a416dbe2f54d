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

EXPERTS_GROUPED_MM = (
    ("weights_flat", "reshape"),
    ("ids_flat", "reshape"),
    ("sort", "sort"),
    ("ids_sorted", "getitem"),
    ("perm", "getitem"),
    ("token_of_row", "floordiv"),
    ("rows", "getitem"),
    ("weights_sorted", "getitem"),
    ("", ("float", "int")),
    ("counts", "histc"),
    ("offsets", "cumsum"),
    ("w1_t", "transpose"),
    ("", "to"),
    ("mm1", GROUPED_MM_OPS),
    ("chunk", "chunk"),
    ("gate", "getitem"),
    ("up", "getitem"),
    ("gate_clamp", "clamp"),
    ("up_clamp", "clamp"),
    ("silu", "silu"),
    ("swiglu", "mul"),
    ("w2_t", "transpose"),
    ("", "to"),
    ("mm2", GROUPED_MM_OPS),
    ("", "unsqueeze"),
    ("weighted", "mul"),
    ("", "empty_like"),
    ("", "arange"),
    ("", "setitem"),
    ("unsorted", "getitem"),
    ("per_slot", "view"),
    ("combine", "sum"),
    ("out", "to"),
)

EXPERTS_BATCHED_MM = (
    ("rows", "repeat_interleave"),
    ("weights_flat", "reshape"),
    ("ids_flat", "reshape"),
    ("w1_sel", "getitem"),
    ("", "unsqueeze"),
    ("mm1", "bmm"),
    ("", "squeeze"),
    ("chunk", "chunk"),
    ("gate", "getitem"),
    ("up", "getitem"),
    ("gate_clamp", "clamp"),
    ("up_clamp", "clamp"),
    ("silu", "silu"),
    ("swiglu", "mul"),
    ("w2_sel", "getitem"),
    ("", "unsqueeze"),
    ("mm2", "bmm"),
    ("", "squeeze"),
    ("", "unsqueeze"),
    ("weighted", "mul"),
    ("per_slot", "view"),
    ("combine", "sum"),
    ("out", "to"),
)

EXPERTS = {"grouped_mm": EXPERTS_GROUPED_MM, "batched_mm": EXPERTS_BATCHED_MM}

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
