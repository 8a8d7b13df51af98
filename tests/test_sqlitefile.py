"""runtime.sqlitefile: front-end processes that open the same new SQLite files at one moment
all get them (the store, the blob store, a user's SQL database), where SQLite refuses some
of the locks on the way at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

#: Each opener process: at each of the start times it is given, open that round's file.
OPENER = """
import os, sys, time
from pathlib import Path
from runtime.config import StorageConfig
from runtime.storage import SqliteStorage, _open_blob_db
from runtime.store import Store

kind, folder, first, rounds, gap = sys.argv[1], Path(sys.argv[2]), *map(float, sys.argv[3:])
# The user's databases: this process's storage (its own blob store), the shared files.
storage = SqliteStorage(StorageConfig(), folder / f"own-{os.getpid()}", 1 << 20)
failed = 0
for n in range(int(rounds)):
    time.sleep(max(first + n * gap - time.time(), 0))
    where = folder / str(n)
    try:
        if kind == "store":
            Store(where / "valrun.db").close()
        elif kind == "blob":
            _open_blob_db(where / "blob.sqlite").close()
        else:
            storage._open_user_db(where / "alice.sqlite").conn.close()
    except Exception as exc:
        failed += 1
        print(n, repr(exc), file=sys.stderr)
storage.close()
print(failed)
"""

REPO = Path(__file__).resolve().parent.parent
PROCESSES = 4
ROUNDS = 25


@pytest.mark.parametrize("kind", ["store", "blob", "user_sql"])
def test_processes_opening_a_new_file_at_once_all_get_it(tmp_path: Path, kind: str) -> None:
    # Without runtime.sqlitefile's tries, about one round in ten failed for the blob store.
    for n in range(ROUNDS):
        (tmp_path / str(n)).mkdir()
    first = time.time() + 1.5  # every process started and importing done by then
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, kind, str(tmp_path), str(first), str(ROUNDS), "0.15"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    results = [opener.communicate(timeout=120) for opener in openers]
    assert [out.strip() for out, _ in results] == ["0"] * PROCESSES, results
