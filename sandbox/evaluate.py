"""The Eval API's mode: statements, then a final expression whose value is the result.

`1 + 1`, `x = 2\\nx * 3`, `lambda a, b: a + b` (called with the args the client sent). Code
that ends with a statement (`x = 1`) has the value None, as at a REPL.

The source is parsed once with `ast` and split before its last statement; RestrictedPython
compiles each part (it accepts an `ast.Module` and an `ast.Expression` as they are, so line
numbers stay those of the source, and runs the same checks as on text). Both parts run in one
fresh namespace from `policy.make_globals`, as a val's module does. Besides
`policy.load_val`, this is the only place sandbox code runs user code.

Compiling happens when the worker loads; running happens on the `call`, so the run is held to
the invocation's wall-time and CPU limits and its `print` output reaches the record.
"""

from __future__ import annotations

import ast
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from RestrictedPython.compile import compile_restricted_eval, compile_restricted_exec

from sandbox.errors import ValError
from sandbox.facades import Facade
from sandbox.policy import LogBuffer, ValsHook, compile_refused, make_globals, val_filename

EVAL_NAME = "eval"
EVAL_FILENAME = val_filename(EVAL_NAME)


@dataclass(frozen=True, slots=True)
class CompiledEval:
    statements: types.CodeType
    expression: types.CodeType | None  # None: the code ends with a statement


def _restricted(compile_part: Callable[..., Any], tree: ast.AST) -> types.CodeType:
    result = compile_part(tree, filename=EVAL_FILENAME)
    code = result.code
    if result.errors or not isinstance(code, types.CodeType):
        raise compile_refused(result.errors)
    return code


def compile_eval(source: str) -> CompiledEval:
    """Compile Eval code under RestrictedPython. Raises SyntaxError or ValError."""
    try:
        tree = ast.parse(source, EVAL_FILENAME)
    except (RecursionError, MemoryError) as exc:
        # Deeply nested source blows up the parser rather than failing as a SyntaxError.
        raise ValError(f"the code is too deeply nested to compile ({type(exc).__name__})") from None
    body = tree.body
    final = body[-1] if body and isinstance(body[-1], ast.Expr) else None
    statements = ast.Module(body=body[:-1] if final else body, type_ignores=[])
    return CompiledEval(
        _restricted(compile_restricted_exec, statements),
        _restricted(compile_restricted_eval, ast.Expression(body=final.value)) if final else None,
    )


def evaluate(
    compiled: CompiledEval,
    env: Mapping[str, str],
    log: LogBuffer,
    modules: Mapping[str, Facade] = MappingProxyType({}),
    vals: ValsHook | None = None,
) -> object:
    """Run the statements, then the final expression, in a fresh namespace; its value."""
    namespace = make_globals(EVAL_NAME, env, log, modules, vals)
    # RestrictedPython rewrites `print(...)` into `_print._call_print(...)` and defines
    # `_print` at the top of a module that prints; an expression compiled on its own gets no
    # such line, so `print(1)` as the final expression needs it defined here.
    namespace["_print"] = namespace["_print_"](namespace["_getattr_"])
    exec(compiled.statements, namespace)
    if compiled.expression is None:
        return None
    return eval(compiled.expression, namespace)
