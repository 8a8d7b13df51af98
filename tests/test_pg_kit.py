"""The throwaway PostgreSQL server the store's tests run on (tests/pg_kit.py)."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from tests import pg_kit


def test_each_test_gets_an_empty_database_of_its_own(pg_cluster: pg_kit.Cluster) -> None:
    first, second = pg_cluster.create_database(), pg_cluster.create_database()
    assert first != second
    with psycopg.connect(first, autocommit=True) as db:
        db.execute("CREATE TABLE t (x int)")
    with psycopg.connect(second) as db:
        tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchall() == []
    pg_cluster.drop_database(first)
    pg_cluster.drop_database(second)
    with psycopg.connect(pg_cluster.url()) as db:
        names = {row[0] for row in db.execute("SELECT datname FROM pg_database")}
    assert names.isdisjoint({first.rpartition("/")[2], second.rpartition("/")[2]})


def test_the_server_runs_unprivileged_on_loopback(pg_url: str) -> None:
    with psycopg.connect(pg_url) as db:
        (address,) = db.execute("SELECT host(inet_server_addr())").fetchone() or (None,)
        (superuser,) = db.execute("SELECT current_setting('is_superuser')").fetchone() or ("",)
        (directory,) = db.execute("SHOW data_directory").fetchone() or ("",)
    assert address == "127.0.0.1"
    assert superuser == "on"  # the session's role; the server process is not root:
    assert os.stat(directory).st_uid != 0


def test_stop_ends_the_server_and_removes_its_directory() -> None:
    cluster = pg_kit.start_cluster()
    pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, 0)  # running
    cluster.stop()
    assert not cluster.root.exists()
    assert (
        not Path(f"/proc/{pid}").exists()
        or Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    )
