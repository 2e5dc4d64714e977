"""Arithmetic that works on plain numbers and on sympy expressions alike.

Every cost function in this package is written once and runs in two modes:

- numeric: sizes are `int`/`float`; results are `float` seconds or bytes. This is the fast path
  the solver calls thousands of times, so it never touches sympy.
- symbolic: some size is a sympy expression (say the sequence length `s`); results are sympy
  expressions in those symbols, so a plan can show how its time grows. `expr.subs(s, 131072)`
  gives the number the numeric path gives.

The helpers below pick the builtin or the sympy form by looking at their arguments. Measured
tables (bandwidth vs message size, attention rate vs length) interpolate linearly in log(x) and
are flat beyond their end points; in symbolic mode a lookup is an application of a `sympy.Function`
named after the table, which evaluates itself as soon as its argument is a number.
"""

from __future__ import annotations

import bisect
import functools
import math
import re

import sympy

__all__ = ["Num", "Table", "is_symbolic", "smax", "smin", "sceil_log2", "log_interp", "fmt"]

Num = float | sympy.Expr
"""A size, time or byte count: a number, or a sympy expression in symbolic mode."""

Table = tuple[tuple[float, float], ...]
"""Measured points `((x, y), ...)`, x strictly increasing and positive."""


def is_symbolic(*xs) -> bool:
    """True when any argument is a sympy expression that is not a plain number."""
    return any(isinstance(x, sympy.Basic) and not x.is_Number for x in xs)


def fmt(x, scale: float = 1.0, spec: str = ".3g") -> str:
    """`x · scale` formatted by `spec` for people; a symbolic `x` prints as its expression."""
    if is_symbolic(x):
        return str(x * scale if scale != 1 else x)
    return format(float(x) * scale, spec)


def smax(*xs):
    """`max` on numbers, `sympy.Max` when any argument is symbolic."""
    return sympy.Max(*xs) if is_symbolic(*xs) else max(xs)


def smin(*xs):
    """`min` on numbers, `sympy.Min` when any argument is symbolic."""
    return sympy.Min(*xs) if is_symbolic(*xs) else min(xs)


def sceil_log2(n):
    """ceil(log2(n)): the depth of a binary tree over n ranks."""
    if is_symbolic(n):
        return sympy.ceiling(sympy.log(n, 2))
    return math.ceil(math.log2(n)) if n > 1 else 0


@functools.lru_cache(maxsize=None)
def _log_axis(table: Table) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(math.log(x) for x, _ in table), tuple(y for _, y in table)


def _interp_number(table: Table, x: float) -> float:
    if x <= table[0][0]:
        return table[0][1]
    if x >= table[-1][0]:
        return table[-1][1]
    lx, ys = _log_axis(table)
    t = math.log(x)
    i = bisect.bisect_right(lx, t)  # lx[i-1] <= t < lx[i]
    w = (t - lx[i - 1]) / (lx[i] - lx[i - 1])
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


@functools.lru_cache(maxsize=None)
def _table_function(name: str, table: Table) -> type[sympy.Function]:
    """A sympy Function class that looks `table` up; one class per (name, table)."""

    def _eval(cls, x):
        if x.is_Number:
            return sympy.Float(_interp_number(table, float(x)))
        return None

    ident = re.sub(r"\W", "_", name)
    return type(ident, (sympy.Function,), {
        "eval": classmethod(_eval),
        "_imp_": staticmethod(lambda x: _interp_number(table, float(x))),  # for lambdify
        "_eval_is_positive": lambda self: True,
        "_eval_is_extended_real": lambda self: True,
    })


def log_interp(table: Table, x, name: str):
    """y(x) from `table`, linear in log(x), flat outside the measured range.

    Numeric x gives a float; symbolic x gives `name(x)`, a sympy function application that
    evaluates to the same float once x is substituted by a number.
    """
    if is_symbolic(x):
        return _table_function(name, table)(x)
    return _interp_number(table, float(x))
