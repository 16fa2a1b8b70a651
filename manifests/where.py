"""`--where` expressions compiled to Arrow compute: no pandas, and only the named columns are read.

The grammar is the pandas-query subset people type: comparisons (chained too), `and`/`or`/`not`
(or `&`/`|`/`~`), `in`/`not in` lists, arithmetic, `col == None`, `col.isnull()`/`col.notnull()`
and `col.str.contains('...')` / `.startswith` / `.endswith`.
"""
from __future__ import annotations

import ast
import io
import tokenize

import pyarrow as pa
import pyarrow.compute as pc

_COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal",
            ast.Gt: "greater", ast.GtE: "greater_equal"}
_ARITH = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide"}
_STR = {"contains": "match_substring", "startswith": "starts_with", "endswith": "ends_with"}


class WhereError(ValueError):
    """An expression outside the supported grammar or naming an unknown column."""


def columns(expr: str) -> list[str]:
    """Column names an expression reads, in order of appearance (so only those are loaded)."""
    names = [n.id for n in ast.walk(_parse(expr)) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(names))


def compile_where(expr: str, available: list[str]) -> pc.Expression:
    """The Arrow expression for `expr`; unknown columns are named in the error with the known ones."""
    unknown = [c for c in columns(expr) if c not in available]
    if unknown:
        raise WhereError(f"unknown column(s) {unknown}; the manifest has: {', '.join(available)}")
    return _Compiler().visit(_parse(expr).body)


def _parse(expr: str) -> ast.Expression:
    try:
        return ast.parse(_pandas_booleans(expr.strip()), mode="eval")
    except (SyntaxError, tokenize.TokenError) as exc:
        raise WhereError(f"not a valid expression: {exc.args[0]}") from None


def _pandas_booleans(expr: str) -> str:
    """`&`, `|`, `~` bind like `and`, `or`, `not`, as in pandas.query (in Python they bind tighter than `<`)."""
    words = {"&": "and", "|": "or", "~": "not"}
    tokens = tokenize.generate_tokens(io.StringIO(expr).readline)
    return " ".join(words.get(t.string, t.string) if t.type == tokenize.OP else t.string for t in tokens).strip()


class _Compiler(ast.NodeVisitor):
    def generic_visit(self, node):
        raise WhereError(f"unsupported syntax: {ast.unparse(node)!r}")

    def visit_Name(self, node: ast.Name):
        return pc.field(node.id)

    def visit_Constant(self, node: ast.Constant):
        return pc.scalar(node.value)

    def visit_BoolOp(self, node: ast.BoolOp):
        op = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        out = self.visit(node.values[0])
        for value in node.values[1:]:
            out = op(out, self.visit(value))
        return out

    def visit_UnaryOp(self, node: ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return pc.invert(self.visit(node.operand))
        if isinstance(node.op, ast.USub):
            return pc.negate(self.visit(node.operand))
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp):
        if type(node.op) not in _ARITH:
            return self.generic_visit(node)
        return getattr(pc, _ARITH[type(node.op)])(self.visit(node.left), self.visit(node.right))

    def visit_Compare(self, node: ast.Compare):
        out, left = None, node.left
        for op, right in zip(node.ops, node.comparators):
            part = self._compare(left, op, right)
            out = part if out is None else pc.and_kleene(out, part)
            left = right
        return out

    def _compare(self, left: ast.expr, op: ast.cmpop, right: ast.expr):
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                raise WhereError(f"`in` needs a literal list: {ast.unparse(right)!r}")
            values = pa.array([ast.literal_eval(v) for v in right.elts])
            test = pc.is_in(self.visit(left), value_set=values)
            return pc.invert(test) if isinstance(op, ast.NotIn) else test
        if isinstance(right, ast.Constant) and right.value is None and isinstance(op, (ast.Eq, ast.NotEq)):
            return self.visit(left).is_null() if isinstance(op, ast.Eq) else self.visit(left).is_valid()
        if type(op) not in _COMPARE:
            raise WhereError(f"unsupported comparison: {type(op).__name__}")
        return getattr(pc, _COMPARE[type(op)])(self.visit(left), self.visit(right))

    def visit_Call(self, node: ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("isnull", "isna", "notnull", "notna") and not node.args:
            target = self.visit(func.value)
            return target.is_null() if func.attr in ("isnull", "isna") else target.is_valid()
        if (isinstance(func, ast.Attribute) and func.attr in _STR and isinstance(func.value, ast.Attribute)
                and func.value.attr == "str" and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)):
            return getattr(pc, _STR[func.attr])(self.visit(func.value.value), str(node.args[0].value))
        return self.generic_visit(node)
