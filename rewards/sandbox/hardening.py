"""The parent's side of test hardening: rewriting (trusted) test code before it reaches the harness.

Comparisons and assert conditions become calls of the harness's checks (`__r1_compare__`,
`__r1_truth__`, `__r1_not__` in `_harness.py`), which fail a test unless the values are plain builtin
data; and the modules the tests import are listed so the harness can copy them before the untrusted
program runs.
"""

from __future__ import annotations

import ast
import functools


@functools.lru_cache(maxsize=4096)  # GRPO scores G completions against the same tests
def imported_modules(*sources: str) -> tuple[str, ...]:
    """Top-level module names imported by (trusted) test code, with their parent packages."""
    names: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                full = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                full = [node.module]
            else:
                continue
            for name in full:
                parts = name.split(".")
                names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return tuple(sorted(names))


_COMPARISON_NAMES = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
                     ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(ast.Name(name, ast.Load()), list(args), [])


class _AssertTruth(ast.NodeTransformer):
    """Inside an assert: `not x` and the operands of and/or go through the harness's truth check."""

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        return _call("__r1_not__", node.operand) if isinstance(node.op, ast.Not) else node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        node.values = [_call("__r1_truth__", value) for value in node.values]
        return node


class _TrustedComparisons(ast.NodeTransformer):
    """Rewrite test code so comparisons and assert conditions run through the harness.

    `a == b` becomes `__r1_compare__(("==",), a, b)`, which fails the test unless both sides are plain
    builtin data; `assert x` checks that x is plain data before its truth is used. Together with the
    guard on the program's functions this defeats results whose __eq__/__bool__ lie, also when they
    come from a class or a callable object rather than a function.
    """

    def visit_Compare(self, node):
        self.generic_visit(node)
        ops = ast.Tuple([ast.Constant(_COMPARISON_NAMES[type(op)]) for op in node.ops], ast.Load())
        return ast.copy_location(_call("__r1_compare__", ops, node.left, *node.comparators), node)

    def visit_Assert(self, node):
        node.test = _call("__r1_truth__", _AssertTruth().visit(node.test))
        self.generic_visit(node)
        return node


@functools.lru_cache(maxsize=4096)
def harden_test(source: str) -> str:
    """Test source with trusted comparisons (unchanged if it does not parse: it fails by itself)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    return ast.unparse(ast.fix_missing_locations(_TrustedComparisons().visit(tree)))
