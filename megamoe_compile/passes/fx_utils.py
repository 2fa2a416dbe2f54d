"""Reading FX nodes as dynamo leaves them: op names, constants, module regions, side effects.

Nothing here knows about MoE layers; the matcher and the MoE pass build on these helpers.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

_OPERATORS = {operator.getitem: "getitem", operator.mul: "mul", operator.floordiv: "floordiv",
              operator.truediv: "truediv", operator.add: "add", operator.setitem: "setitem",
              operator.neg: "neg", operator.sub: "sub"}


def op_name(node: fx.Node) -> str:
    """The short name patterns use for a node's operation ("mul", "sort", "grouped_mm_fallback")."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target in _OPERATORS:
            return _OPERATORS[node.target]
        if isinstance(node.target, torch._ops.OpOverload):  # ns::name.overload -> name
            return node.target.overloadpacket.__name__
        name = getattr(node.target, "__name__", None) or str(node.target)
        return name.split(".")[-1]
    return node.op


def op_namespace(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0]
    return ""


def region(graph: fx.Graph, module_key: str) -> list[fx.Node]:
    """The computing nodes traced inside the module call dynamo keyed `module_key` in `nn_module_stack`."""
    return [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")
            and module_key in (n.meta.get("nn_module_stack") or {})]


def module_path(path: str) -> str:
    """dynamo's source path (e.g. "L['self'].model.layers[1].mlp") as a module name ("model.layers.1.mlp")."""
    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    return path.replace("._modules.", ".").strip(".")


def returns_tensor(node: fx.Node) -> bool:
    value = node.meta.get("example_value")
    return any(isinstance(v, torch.Tensor) for v in (value if isinstance(value, (tuple, list)) else (value,)))


def is_shape_arithmetic(node: fx.Node) -> bool:
    """Nodes that compute no tensor: SymInt/SymFloat plumbing that dynamic shapes add (sizes,
    `.item()` of a float attribute) and host-side queries transformers makes while tracing (on
    CUDA, `torch.cuda.get_device_capability()` before each grouped matmul). Patterns speak of
    tensor operations only; in-place `setitem`, which returns None, is one of them."""
    if node.op == "call_function" and node.target is operator.setitem:
        return False
    return not returns_tensor(node) and not has_side_effects(node)


# Calls that return no tensor and are known to change nothing: host queries transformers makes
# while tracing (device capability before a grouped matmul, the finegrained-fp8 kernel loader).
_PURE_HOST_CALLS = ("get_device_capability", "_load_finegrained_fp8_kernel", "is_compiling",
                    "is_torchdynamo_compiling")
_PURE_METHODS = ("size", "stride", "dim", "numel", "item", "get_device", "storage_offset", "__getitem__")
# The marker a prepared layer's experts leave in the trace (ops/fused_moe.py): returns nothing, changes nothing.
MARKER_OP = "megamoe::prepared_weights"


def qualified_name(node: fx.Node) -> str:
    """"namespace::name" of a custom or aten op call, "" for anything else."""
    namespace = op_namespace(node)
    return f"{namespace}::{op_name(node)}" if namespace else ""


def has_side_effects(node: fx.Node) -> bool:
    """A node that returns no tensor and is not known to be pure: a custom op returning nothing
    (it can only act through side effects, e.g. changing its inputs in place), or an unknown
    callable. SymInt arithmetic (operator.*, math.*, torch.sym_*) is pure."""
    if node.op not in ("call_function", "call_method", "call_module") or returns_tensor(node):
        return False
    if node.op == "call_method":
        return node.target not in _PURE_METHODS
    if node.op == "call_module":
        return True
    target = node.target
    if target is operator.setitem:
        return False  # in-place on a tensor: the patterns name it where transformers does it
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return op_namespace(node) not in ("aten", "prims") and qualified_name(node) != MARKER_OP
    module = getattr(target, "__module__", "") or ""
    if module in ("_operator", "operator", "math", "builtins") or module.startswith("torch.fx.experimental"):
        return False
    name = getattr(target, "__name__", "")
    return not (name.startswith("sym_") or name in _PURE_HOST_CALLS)


def real_tensor(node: fx.Node) -> torch.Tensor | None:
    """The tensor a placeholder stands for (a parameter or buffer of the traced module), if any."""
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None)
    return example if isinstance(example, torch.Tensor) else None


def is_tensor(arg, tensor: torch.Tensor) -> bool:
    """Whether `arg` is the graph input that stands for exactly `tensor`."""
    return isinstance(arg, fx.Node) and arg.op == "placeholder" and real_tensor(arg) is tensor


def const(arg):
    """The Python value of a literal, or of a float attribute that dynamic shapes lifted to an input."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg
    if isinstance(arg, fx.Node):
        if arg.op == "call_method" and arg.target == "item" and arg.args[0].op == "placeholder":
            value = real_tensor(arg.args[0])
            return None if value is None else value.item()
        if arg.op == "call_function" and arg.target in (operator.neg, torch.neg):
            inner = const(arg.args[0])
            return None if inner is None else -inner
    return None


def argument(node: fx.Node, position: int, name: str, default=None):
    """A call's argument, given by position or by keyword."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def dim_arg(node: fx.Node, position: int, name: str = "dim", default=None):
    return const(argument(node, position, name, default))


def int_list(arg):
    if isinstance(arg, (list, tuple)):
        values = [const(a) for a in arg]
        return values if all(isinstance(v, int) for v in values) else None
    return None


def clamp_args(node: fx.Node):
    """(min, max) arguments of a clamp as traced: None, a number, or a node."""
    return argument(node, 1, "min"), argument(node, 2, "max")


def is_scalar(arg) -> bool:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return True
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return isinstance(value, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(value, bool)


def same_scalar(a, b) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return is_scalar(a) and is_scalar(b) and float(a) == float(b)


def is_negation(a, b) -> bool:
    """Whether `a` is -`b`: numbers, or a neg node of `b`. With dynamic shapes dynamo may trace `-limit`
    as a graph node even where `limit` is a constant (`operator.neg(10.0)`): that is -`b` too."""
    if isinstance(a, fx.Node) and a.op == "call_function" and a.target in (operator.neg, torch.neg):
        inner = a.args[0]
        if isinstance(b, fx.Node) or isinstance(inner, fx.Node):
            return inner is b
        return is_scalar(inner) and is_scalar(b) and float(inner) == float(b)
    if isinstance(b, fx.Node):
        return False
    return is_scalar(a) and not isinstance(a, fx.Node) and float(a) == -float(b)


def same_size(arg, node: fx.Node) -> bool:
    """Whether `arg` (an int or a SymInt node) is the length of `node`'s 1-D value."""
    value = node.meta.get("example_value")
    if value is None or value.dim() != 1:
        return False
    size = value.shape[0]
    if isinstance(arg, fx.Node):
        arg = arg.meta.get("example_value")
    if isinstance(arg, int) and isinstance(size, int):
        return arg == size
    return isinstance(arg, torch.SymInt) and isinstance(size, torch.SymInt) and str(arg) == str(size)
