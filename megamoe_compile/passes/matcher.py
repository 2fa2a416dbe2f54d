"""Match a region of an FX graph against a pattern of `patterns.py`: the sequence of operations
and the dataflow between them. One checker for every pattern; its reasons name the step."""

from __future__ import annotations

import torch.fx as fx

from .fx_utils import is_shape_arithmetic, op_name
from .patterns import Step


class NoMatch(Exception):
    """A layer that is not fused, and why (the report shows the message)."""


class PatternMismatch(NoMatch):
    """The traced code is not the sequence of operations (or the dataflow) a pattern writes down."""


def match(region: list[fx.Node], pattern: tuple[Step, ...], what: str) -> dict[str, fx.Node]:
    """Roles -> nodes of `region` (and "$inputs" -> the nodes they were bound to).

    Raises PatternMismatch when the region's tensor operations are not exactly `pattern`'s, or an
    argument is not the node the pattern says feeds it."""
    ops = [n for n in region if not is_shape_arithmetic(n)]
    names = [op_name(n) for n in ops]
    for i, s in enumerate(pattern):
        if i >= len(names) or names[i] not in s.ops:
            got = names[i] if i < len(names) else "end of region"
            raise PatternMismatch(f"{what} code differs from the known pattern at op {i}: traced {got!r}, "
                                  f"expected {'|'.join(s.ops)!r}")
    if len(names) > len(pattern):
        raise PatternMismatch(f"{what} code has extra ops after the known pattern: {names[len(pattern):][:4]}")
    roles: dict[str, fx.Node] = {}
    for s, node in zip(pattern, ops):
        _check_edges(s, node, roles, what)
        roles[s.role] = node
    return roles


def _check_edges(s: Step, node: fx.Node, roles: dict[str, fx.Node], what: str) -> None:
    expected = list(s.args)
    given = list(node.args[: len(expected)])
    if s.commutative:
        wanted = [_resolve(r, roles) for r in expected]
        if len(given) != len(expected) or sorted(map(id, given)) != sorted(map(id, wanted)) \
                or any(w is None for w in wanted):
            raise PatternMismatch(f"{what}: {s.role} ({node.name}) is not {s.ops[0]} of {' and '.join(expected)}")
        return
    edges = list(enumerate(expected))
    for j, (name, role) in enumerate(s.keywords):
        position = len(expected) + j
        edges.append((name if name in node.kwargs or len(node.args) <= position else position, role))
    for where, role in edges:
        if role is None:
            continue
        actual = node.kwargs.get(where) if isinstance(where, str) else (
            node.args[where] if where < len(node.args) else None)
        if role.startswith("$") and role not in roles:
            if not isinstance(actual, fx.Node):
                raise PatternMismatch(f"{what}: {s.role} ({node.name}) takes no tensor as argument {where}")
            roles[role] = actual  # an input of the region: bound at its first use
            continue
        if actual is not roles.get(role):
            shown = actual.name if isinstance(actual, fx.Node) else repr(actual)
            raise PatternMismatch(f"{what}: {s.role} ({node.name}) takes {shown} as argument {where}, "
                                  f"not {role} ({roles[role].name if role in roles else 'unbound'})")


def _resolve(role: str | None, roles: dict[str, fx.Node]):
    return roles.get(role) if role is not None else None
