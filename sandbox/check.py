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
   every import of another val (sandbox.imports) against what the front end answers for it:
   a val the saver may not import is "no val USER/VAL", a name it does not export is named,
   and its own imports are followed (cycles, the depth and size limits, missing vals);
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
from sandbox.imports import ValImporter, ValPath, fromlist_refusal, is_val_import, parse_path
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
    importer: ValImporter | None = None,
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
        problems = list(_import_problems(tree, modules, importer))
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


def _import_problems(
    tree: ast.Module, modules: Mapping[str, Facade], importer: ValImporter | None = None
) -> Iterator[Problem]:
    # Every import, nested ones too (inside a function it fails only when that runs, which
    # is worse: the first visitor to that path gets the 502), except in the body of a `try`
    # that catches the ImportError: that code expects the refusal (`requests = None`).
    # Iterative: a deep tree must not take this stack either.
    closure = _Closure(importer) if importer is not None else None
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_val_import(alias.name):
                    refusal = val_import_refusal(closure, alias.name, None)
                else:
                    refusal = import_refusal(alias.name, None, 0, modules)
                if refusal:
                    yield Problem(node.lineno, refusal)
        elif isinstance(node, ast.ImportFrom):
            fromlist = tuple(alias.name for alias in node.names)
            if node.level == 0 and is_val_import(node.module or ""):
                refusal = val_import_refusal(closure, node.module or "", fromlist)
            else:
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


# Imports of other vals. The check asks the front end for each val imported (as the load
# does) and reads its source without running it: what it exports, and what it imports in turn.


def val_import_refusal(
    closure: _Closure | None, name: str, fromlist: tuple[str, ...] | None
) -> str | None:
    """Why `import name` (or `from name import fromlist`) of a val would fail, or None."""
    if closure is None:
        return "this code cannot import vals"
    path = parse_path(name)
    if isinstance(path, str):
        return path
    refusal = fromlist_refusal(name, fromlist)
    if refusal is not None:
        return refusal
    importer = closure.importer
    answer = importer.fetch(path)
    if answer.error is not None:
        return answer.error
    found = ValPath(answer.owner, answer.name, path.version)
    tree = closure.parse(found, answer.source)
    if isinstance(tree, str):
        return tree
    exports = sorted(name for name in _top_level_names(tree) if not name.startswith("_"))
    for item in fromlist or ():
        if item not in exports:
            return f"cannot import {item!r} from {found.label}: it exports " + (
                ", ".join(exports) or "nothing"
            )
    return closure.refusal([*importer.chain, found], tree)


class _Closure:
    """The imports of imports of one checked val, each val read and followed once however
    many paths reach it (a diamond of imports must not cost exponential time)."""

    def __init__(self, importer: ValImporter) -> None:
        self.importer = importer
        self.trees: dict[tuple[str, str, int | None], ast.Module | str] = {}
        #: Vals followed to the end without a problem: how many levels of imports they have.
        self.heights: dict[tuple[str, str, int | None], int] = {}

    def parse(self, path: ValPath, source: str) -> ast.Module | str:
        tree = self.trees.get(path.key)
        if tree is None:
            try:
                tree = ast.parse(source, f"<val {path.label}>")
            except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
                tree = f"{path.label} does not compile: {type(exc).__name__}"
            self.trees[path.key] = tree
        return tree

    def refusal(self, chain: list[ValPath], tree: ast.Module) -> str | None:
        """What the imports of the val at the end of `chain` (its parsed `tree`) would fail
        on: a cycle, the depth or size limits, a val missing or not the saver's to import."""
        importer, limits = self.importer, self.importer.limits
        height = 0
        for name in _val_imports(tree):
            path = parse_path(name)
            if isinstance(path, str):
                continue  # its own problem, found when it was saved
            route = " -> ".join(p.label for p in [*chain, path])
            if any((p.user, p.val.lower()) == (path.user, path.val.lower()) for p in chain):
                return f"import cycle: {route}"
            below = self.heights.get(path.key, 0)
            if importer.depth(chain) + 1 + below > limits.max_import_depth:
                depth = limits.max_import_depth
                more = " -> ..." if below else ""
                return f"imports nest deeper than limits.max_import_depth ({depth}): {route}{more}"
            if path.key not in self.heights:
                refusal = self._follow(chain, path, route)
                if refusal is not None:
                    return refusal
            height = max(height, 1 + self.heights[path.key])
        self.heights[chain[-1].key] = height
        return None

    def _follow(self, chain: list[ValPath], path: ValPath, route: str) -> str | None:
        answer = self.importer.fetch(path)
        if answer.error is not None:
            return f"{chain[-1].label} imports {path.label}: {answer.error}"
        limit = self.importer.limits.max_import_bytes
        if self.importer.fetched_bytes > limit:
            return f"the vals imported through {route} pass limits.max_import_bytes ({limit})"
        found = ValPath(answer.owner, answer.name, path.version)
        subtree = self.parse(found, answer.source)
        if isinstance(subtree, str):
            return subtree
        refusal = self.refusal([*chain, found], subtree)
        if refusal is None:
            self.heights[path.key] = self.heights[found.key]
        return refusal


def _val_imports(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        yield from filter(is_val_import, names)


def _top_level_names(tree: ast.Module) -> set[str]:
    """The names a module binds at its top level (also inside if/try/with/for/while), and
    those its functions declare `global`: what it may export."""
    names: set[str] = set()
    pending: list[list[ast.stmt]] = [tree.body]
    while pending:
        for node in pending.pop():
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if isinstance(node, ast.AnnAssign) and node.value is None:
                    continue
                for target in targets:
                    names.update(_target_names(target))
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update(alias.asname or alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.If | ast.For | ast.While | ast.With | ast.Try):
                pending += [node.body, getattr(node, "orelse", [])]
                if isinstance(node, ast.Try):
                    pending += [node.finalbody, *(handler.body for handler in node.handlers)]
                if isinstance(node, ast.For):
                    names.update(_target_names(node.target))
    names.update(
        name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names
    )
    return names


def _target_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)
