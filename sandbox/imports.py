"""Vals that import vals: `from vals.USER.VAL import NAME`, run in the importing val's worker.

The worker never reads the store. Each import of a val it has not loaded yet is an ask
(`ImportAsk`): the front end answers with that val's source, or with the refusal the val gets
as its ImportError (runtime/imports.py decides who may import what). The worker compiles the
source under the same policy as any val and runs it once, as a module of its own (its own
globals, the importer's `env`, the worker's `std`), and keeps it for every later import in
this worker, by any val of the import graph. The import forms (docs/imports.md):

    from vals.alice.util import slugify         the latest version's export `slugify`
    import vals.alice.util as util              the val as a namespace of its exports
    from vals.alice.util.v3 import slugify      version 3, for good

What a val exports is its top-level names that do not start with `_` (`ValModule`). Cycles are
refused with the chain; the chain's depth and the source loaded per worker are bounded
(`limits.max_import_depth`, `limits.max_import_bytes`).

Stdlib and RestrictedPython only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import CodeType
from typing import Protocol

from sandbox.errors import ValError
from sandbox.facades import Facade, ValModule
from sandbox.limits import WorkerLimits
from sandbox.messages import LOAD_ASK_ID, ImportAnswer, ImportAsk, M
from sandbox.wire import ProtocolError

#: The names of users and vals (runtime/hosts.py has the same): ASCII only, so a lookalike
#: letter (a Cyrillic a, U+0430) names no val rather than another one.
USER_RE = re.compile(r"[a-z][a-z0-9_]{0,38}")
VAL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
PIN_RE = re.compile(r"v([1-9][0-9]{0,8})")

FORMS = (
    "import another val as 'from vals.USER.VAL import NAME' or 'import vals.USER.VAL as v' "
    "(pinned to a version: 'from vals.USER.VAL.v3 import NAME')"
)


class Asker(Protocol):
    def __call__(self, ask: ImportAsk, answer: type[M], /) -> M: ...


class BatchAsker(Protocol):
    """Sends several asks, then reads their answers in order (`Channel.ask_all`)."""

    def __call__(self, asks: Sequence[ImportAsk], answer: type[M], /) -> list[M]: ...


#: Imports asked for in one batch at most: the asks are small frames sent before any answer
#: is read, and must never fill the socket's buffer while the front end writes an answer.
MAX_BATCH = 16


#: What `import` in one module calls for `vals...` names: (name, fromlist) -> the bound object.
ModuleHook = Callable[[str, Sequence[str] | None], object]
#: Runs a val's module: (source, filename, module name, hook for its own imports, what sees
#: its code before it runs) -> its globals after running it, and those of them the sandbox
#: put there (`policy.run_module`).
Runner = Callable[
    [str, str, str, ModuleHook, Callable[[CodeType], None]],
    tuple[dict[str, object], dict[str, object]],
]


@dataclass(frozen=True, slots=True)
class ValPath:
    """What an import names: a user's val, at its latest version (None) or a pinned one."""

    user: str
    val: str
    version: int | None

    @property
    def key(self) -> tuple[str, str, int | None]:
        # Val names are case-insensitive (users' are lower-case only).
        return (self.user, self.val.lower(), self.version)

    @property
    def label(self) -> str:
        return f"{self.user}/{self.val}" + (f" v{self.version}" if self.version else "")


def is_val_import(name: str) -> bool:
    return name == "vals" or name.startswith("vals.")


def parse_path(name: str) -> ValPath | str:
    """The val that `vals.USER.VAL[.vN]` names, or why the name names none (the refusal)."""
    parts = name.split(".")
    if parts[0] != "vals" or len(parts) not in (3, 4):
        return f"{name!r} names no val: {FORMS}"
    user, val = parts[1], parts[2]
    version = None
    if len(parts) == 4:
        pin = PIN_RE.fullmatch(parts[3])
        if pin is None:
            return f"{name!r} names no version of {user}/{val}: pin one as vals.{user}.{val}.v3"
        version = int(pin[1])
    if not (USER_RE.fullmatch(user) and VAL_RE.fullmatch(val)):
        # As the front end answers for a val that does not exist: no such name can exist.
        return f"no val {user}/{val}" + (f" version {version}" if version else "")
    return ValPath(user, val, version)


def fromlist_refusal(name: str, fromlist: Sequence[str] | None) -> str | None:
    """`from vals.U.V import *` and `_` names: refused before anything is asked for."""
    for item in fromlist or ():
        if item == "*":
            return f"'from {name} import *' is not allowed in a val; import names one by one"
        if item.startswith("_"):
            return f"{item!r} starts with '_': a val exports only names without one"
    return None


def dep_filename(label: str) -> str:
    """The "file" an imported val is compiled as: `<val alice/util>`; the importer's error
    names its lines (sandbox.errors keeps the frames of these files too)."""
    return f"<val {label}>"


def _last_line(exc: BaseException, filename: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    return f" at line {frames[-1].lineno}" if frames else ""


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # a val's exception whose __str__ raises
        text = "<unprintable exception>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ValImporter:
    """One worker's imported vals: the modules loaded so far, the chain being loaded, and
    what that chain may still take (depth, bytes)."""

    def __init__(
        self,
        ask: Asker,
        run: Runner,
        limits: WorkerLimits,
        top: ValPath | None,
        ask_all: BatchAsker | None = None,
    ) -> None:
        self._ask = ask
        self._ask_all = ask_all
        self._run = run
        self.limits = limits
        self._modules: dict[tuple[str, str, int | None], ValModule] = {}
        self._answers: dict[tuple[str, str, int | None], ImportAnswer] = {}
        #: The vals being loaded, outermost first: the worker's own val first (None: Eval).
        self._chain: list[ValPath] = [top] if top is not None else []
        self._top = top
        self.loaded_bytes = 0

    @property
    def chain(self) -> list[ValPath]:
        """The vals being loaded, outermost first (the worker's own val first)."""
        return list(self._chain)

    @property
    def fetched_bytes(self) -> int:
        """The source of every val answered so far, together (the checks at save count it)."""
        return sum(len(answer.body) for answer in self._answers.values())

    def depth(self, chain: list[ValPath]) -> int:
        """How many imported vals `chain` holds (the worker's own val is not one)."""
        return len(chain) - (self._top is not None)

    def fetch(self, path: ValPath) -> ImportAnswer:
        """The front end's answer for `path` (asked once per worker)."""
        answer = self._answers.get(path.key)
        if answer is None:
            answer = self._ask(
                ImportAsk(LOAD_ASK_ID, path.user, path.val, path.version), ImportAnswer
            )
            self._answers[path.key] = answer
        return answer

    def prefetch(self, code: CodeType) -> None:
        """Ask at once for the vals a module imports at its top level, before it runs: one
        wait for the front end instead of one per import (a cold start's main cost). The names
        come from the compiled code (`co_names` holds every dotted name an import statement
        names); the loads, their checks and their order stay those of the imports."""
        if self._ask_all is None:
            return
        wanted: dict[tuple[str, str, int | None], ValPath] = {}
        for name in code.co_names:
            if name.startswith("vals."):
                path = parse_path(name)
                if isinstance(path, ValPath) and path.key not in self._answers:
                    wanted.setdefault(path.key, path)
        paths = list(wanted.values())
        for start in range(0, len(paths) if len(paths) > 1 else 0, MAX_BATCH):
            batch = paths[start : start + MAX_BATCH]
            asks = [ImportAsk(LOAD_ASK_ID, p.user, p.val, p.version) for p in batch]
            for path, answer in zip(batch, self._ask_all(asks, ImportAnswer), strict=True):
                self._answers[path.key] = answer

    def module_hook(self) -> ModuleHook:
        """The `vals` import of one module. `import vals.U.V` binds `vals`, as Python does:
        to a namespace holding every val this module imported that way."""
        tree: dict[str, dict[str, object]] = {}

        def hook(name: str, fromlist: Sequence[str] | None) -> object:
            path = parse_path(name)
            if isinstance(path, str):
                raise ImportError(path, name=name)
            refusal = fromlist_refusal(name, fromlist)
            if refusal is not None:
                raise ImportError(refusal, name=name)
            module = self.load(path)
            if fromlist:
                for item in fromlist:
                    if not module._exported(item):
                        raise ImportError(
                            f"cannot import {item!r} from {module!r}: it exports "
                            + (", ".join(module._exports()) or "nothing"),
                            name=name,
                        )
                return module
            # `import vals.U.V.v3 as m` reads vals -> U -> V -> v3: the pinned module sits
            # one level below a namespace named after the val.
            leaf: object = module
            if path.version is not None:
                leaf = Facade(f"vals.{path.user}.{path.val}", {f"v{path.version}": module})
            tree.setdefault(path.user, {})[path.val] = leaf
            users = {user: Facade(f"vals.{user}", of_user) for user, of_user in tree.items()}
            return Facade("vals", users)

        return hook

    def load(self, path: ValPath) -> ValModule:
        module = self._modules.get(path.key)
        if module is not None:
            return module
        chain = " -> ".join(p.label for p in [*self._chain, path])
        if any((p.user, p.val.lower()) == (path.user, path.val.lower()) for p in self._chain):
            raise ImportError(f"import cycle: {chain}")
        if self.depth(self._chain) >= self.limits.max_import_depth:
            raise ImportError(
                f"imports nest deeper than limits.max_import_depth "
                f"({self.limits.max_import_depth}): {chain}"
            )
        answer = self.fetch(path)
        if answer.error is not None:
            raise ImportError(answer.error)
        size = len(answer.body)
        if self.loaded_bytes + size > self.limits.max_import_bytes:
            raise ImportError(
                f"importing {path.label} ({size} bytes) would take this worker's imported "
                f"source past limits.max_import_bytes ({self.limits.max_import_bytes})"
            )
        self.loaded_bytes += size
        # The names as their owner spelled them; a pinned import keeps its version.
        loaded = ValPath(answer.owner, answer.name, path.version)
        filename = dep_filename(loaded.label)
        self._chain.append(loaded)
        try:
            namespace, hidden = self._run(
                answer.source,
                filename,
                f"vals.{answer.owner}.{answer.name}",
                self.module_hook(),
                self.prefetch,
            )
        except (MemoryError, ProtocolError):
            raise  # the worker's end, not the val's error
        except ValError as exc:  # it does not compile
            raise ImportError(f"{loaded.label} does not load: {exc}") from None
        except Exception as exc:
            raise ImportError(
                f"{loaded.label} raised while loading{_last_line(exc, filename)}: " + _describe(exc)
            ) from None
        finally:
            self._chain.pop()
        module = ValModule(loaded.label, namespace, hidden)
        self._modules[path.key] = module
        return module
