"""Checks at save: what a val's code would fail on when loaded, found without running it.

The front end never compiles untrusted code itself: a nesting or size bomb would take its
stack or its memory. It sends the code to a fresh confined worker in the `check` mode (see
sandbox/messages.py), which runs `check_source` and exits. Nothing of the val runs: the module's
top level could loop or print, and saving is not invoking.

Each problem is a line (or None when the whole source is at fault) and a message that says
what to change. The checks, in order:

1. the size limit (the same `limits.max_source_bytes` the load enforces);
2. RestrictedPython's compile, the one the worker uses (`policy.compile_val`): syntax errors,
   `_` names, frames, `exec`, `async def`;
3. every `import` against the facades (`facades.import_refusal`, the text the load would
   raise, with what to use instead), but those in a `try` that catches the ImportError;
4. the export: a top-level statement that binds the val's name (`def`, `class`, an
   assignment or an import), as `policy.load_val` looks it up after running the module.

Stdlib and RestrictedPython only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType

from RestrictedPython.compile import compile_restricted_exec

from sandbox.facades import Facade, import_refusal
from sandbox.messages import Checked, Problem
from sandbox.policy import explain_refusal, val_filename

MAX_PROBLEMS = Checked.MAX_PROBLEMS

# RestrictedPython's errors are "Line N: message".
_RESTRICTED_LINE_RE = re.compile(r"Line (\d+): (.*)", re.DOTALL)


def check_source(
    source: str,
    name: str,
    max_source_bytes: int,
    modules: Mapping[str, Facade] = MappingProxyType({}),
) -> list[Problem]:
    """Every problem that would stop the val from loading; empty when none is found."""
    size = len(source.encode("utf-8", errors="replace"))
    if size > max_source_bytes:
        limit = f"over the {max_source_bytes}-byte limit"
        return [Problem(None, f"the source is {size} bytes, {limit}")]
    try:
        result = compile_restricted_exec(source, filename=val_filename(name))
        problems = [_restricted_problem(error) for error in result.errors]
        if problems:
            return problems[:MAX_PROBLEMS]
        tree = ast.parse(source, val_filename(name))
        problems = list(_import_problems(tree, modules))
        exported = _binds_at_top_level(tree.body, name)
    except (RecursionError, MemoryError) as exc:
        # Deeply nested source blows up the parser rather than failing as a SyntaxError.
        return [
            Problem(
                None,
                f"the code is too deeply nested to compile ({type(exc).__name__}); "
                "split long expressions and deep nesting into smaller steps",
            )
        ]
    if not exported:
        problems.append(
            Problem(
                None,
                f"the val must export its name: define a top-level {name!r}, for example "
                f"'def {name}(req):' for a web handler or '{name} = ...' for a value",
            )
        )
    return problems[:MAX_PROBLEMS]


def _restricted_problem(error: str) -> Problem:
    found = _RESTRICTED_LINE_RE.fullmatch(error)
    line, message = (int(found[1]), found[2]) if found else (None, error)
    return Problem(line, explain_refusal(message))


def _import_problems(tree: ast.Module, modules: Mapping[str, Facade]) -> Iterator[Problem]:
    # Every import, nested ones too (inside a function it fails only when that runs, which
    # is worse: the first visitor to that path gets the 502), except in the body of a `try`
    # that catches the ImportError: that code expects the refusal (`requests = None`).
    # Iterative: a deep tree must not take this stack either.
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            for alias in node.names:
                refusal = import_refusal(alias.name, None, 0, modules)
                if refusal:
                    yield Problem(node.lineno, refusal)
        elif isinstance(node, ast.ImportFrom):
            fromlist = tuple(alias.name for alias in node.names)
            refusal = import_refusal(node.module or "", fromlist, node.level, modules)
            if refusal:
                yield Problem(node.lineno, refusal)
        if isinstance(node, ast.Try) and any(map(_catches_import_error, node.handlers)):
            pending.extend([*node.handlers, *node.orelse, *node.finalbody])
        else:
            pending.extend(ast.iter_child_nodes(node))


_IMPORT_ERROR_CATCHERS = frozenset({"ImportError", "ModuleNotFoundError", "Exception"})


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return caught is None or any(
        isinstance(name, ast.Name) and name.id in _IMPORT_ERROR_CATCHERS for name in names
    )


def _binds_at_top_level(body: list[ast.stmt], name: str) -> bool:
    """Whether a module-level statement (also inside if/try/with/for/while) binds `name`."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if isinstance(node, ast.AnnAssign) and node.value is None:
                continue  # `x: int` alone binds nothing
            if any(_target_binds(target, name) for target in targets):
                return True
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name.partition(".")[0]
                if bound == name:
                    return True
        elif isinstance(node, ast.If | ast.For | ast.While | ast.With | ast.Try):
            blocks = [node.body, getattr(node, "orelse", [])]
            if isinstance(node, ast.Try):
                blocks += [node.finalbody, *(handler.body for handler in node.handlers)]
            if isinstance(node, ast.For) and _target_binds(node.target, name):
                return True
            if any(_binds_at_top_level(block, name) for block in blocks):
                return True
    return False


def _target_binds(target: ast.expr, name: str) -> bool:
    if isinstance(target, ast.Name):
        return target.id == name
    if isinstance(target, ast.Tuple | ast.List):
        return any(_target_binds(element, name) for element in target.elts)
    if isinstance(target, ast.Starred):
        return _target_binds(target.value, name)
    return False
