"""The front end's side of vals importing vals: answering a worker's `ImportAsk`.

A worker asks for a val's source when its code runs `from vals.USER.VAL import NAME` (while
its module loads, or later), and while its code is checked at save. Who imports is the user
whose worker it is (`spec.owner`: the val's owner, the token's user for Eval, the saver for a
check), never what the worker says: a worker is hostile, and a public val's worker that could
name another importer could read that importer's private vals. So a val's imports of imports
are resolved as the worker's user too (docs/imports.md).

Who may import what (docs/contract.md §16): public and unlisted vals of anyone, one's own
private vals, never another user's private val. The refusal for another's private val is the
refusal for a val that does not exist, word for word, so that privacy cannot be probed.

Freshness: an import of a latest version is noted on the importer's pool
(`Pool.note_import`), and `Pool.val_changed` retires every such importer when the imported val
changes. The note is made after the store is read; a change that lands in between (the store
read the old version, the change's retirement ran before the note) is caught by
`Pool.val_changes` having moved, and the importers are retired again.
"""

from __future__ import annotations

from runtime.hosts import USER_RE, VAL_RE
from runtime.pool import Pool, ValSpec
from runtime.store import AsyncStore
from sandbox.messages import ImportAnswer, ImportAsk


def missing(ask: ImportAsk) -> str:
    """The refusal for a val that is not there, or not the importer's to import."""
    return f"no val {ask.user}/{ask.val}" + (f" version {ask.version}" if ask.version else "")


class Imports:
    def __init__(self, store: AsyncStore, pool: Pool) -> None:
        self.store = store
        self.pool = pool

    async def answer(self, spec: ValSpec, ask: ImportAsk) -> ImportAnswer:
        refused = ImportAnswer(ask.id, error=missing(ask))
        if not (USER_RE.fullmatch(ask.user) and VAL_RE.fullmatch(ask.val)):
            return refused
        changes = self.pool.val_changes
        resolved = await self.store.resolve(ask.user, ask.val, ask.version)
        if resolved is None:
            return refused
        val = resolved[0]
        if val.privacy == "private" and val.owner != spec.owner:
            return refused  # another user's private val: as if it did not exist
        if ask.version is None:
            self.pool.note_import(spec, val.val_id)
            if self.pool.val_changes != changes:
                self.pool.retire_importers_of(val.val_id)
        return ImportAnswer(
            ask.id,
            owner=val.owner,
            name=val.name,
            version=val.version,
            body=val.code.encode("utf-8", errors="surrogatepass"),
        )
