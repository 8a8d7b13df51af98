"""Each user's blob store and SQL database on PostgreSQL: `StorageBackend` for several nodes
that share one PostgreSQL (docs/storage.md §5).

    blob    two tables of the store's database, written through the service's connection
    SQL     one database and one login role per user, reached over that role's own
            connection: what a tenant may do is decided by PostgreSQL's privileges, not by
            parsing, with `runtime.pgsql`'s statement check on top

A tenant's role is a login role with a password derived from a random key the service keeps
in the store's database (`valrun_sql_secret`, which no tenant can read), so
`SET ROLE`, `RESET ROLE` and `SET SESSION AUTHORIZATION` lead nowhere: the session user is
the tenant, a member of no other role. Its database is a copy of a template in which the
service revoked, once, what a tenant must not call (`set_config`, large objects,
`pg_notify`, procedural languages, the cluster-wide catalogs); PUBLIC has no CONNECT on it.
Role and database names are random (kept in `valrun_sql_tenants`), so the names a tenant can
see in the shared catalogs say nothing about who the others are. Every tenant role is a
member of the NOLOGIN role `valrun_tenants`, which has no privileges: it is the name
pg_hba.conf can match them by (`+valrun_tenants`) to demand their passwords.

Bounds, as SqliteStorage's (per call, per user, in all):
- every call is one transaction, started by the service (`BEGIN`, its settings `SET LOCAL`,
  a transaction-level advisory lock: one call per user at a time across every node);
  a val's statement is sent alone with the extended protocol, so it is one statement;
- `statement_timeout` = min(`sql_timeout_s`, the val's remaining time); `lock_timeout`,
  `work_mem`, `temp_file_limit`, `idle_in_transaction_session_timeout` and the role's
  CONNECTION LIMIT are the role's; the val cannot change them (no SET, no `set_config`);
- the database's size (the user's schema's relations) is checked before COMMIT against
  `max_sql_bytes`; over it, the call is rolled back;
- rows are read one at a time (single-row mode) into the answer, refused past the cap;
- at most MAX_OPEN_CONNECTIONS tenant connections per process, least recently used closed
  first; `sql_threads` calls at once; `max_waiting_per_user` waiting per user.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import psycopg
import trio
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runtime.config import StorageConfig
from runtime.errors import StorageRefusedError
from runtime.pgsql import number_placeholders, refusal
from runtime.storage import (
    MAX_SQL_TEXT_BYTES,
    BlobCalls,
    ResultWriter,
    Turns,
    Usage,
    blob_write_delta,
)
from sandbox.messages import SqlValue, Statement, encode_sql_results

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Rows of the service's own queries: values of the types it asked for.
Conn: TypeAlias = "psycopg.Connection[tuple[Any, ...]]"

#: Open tenant connections per process; each is a PostgreSQL backend (a few MiB).
MAX_OPEN_CONNECTIONS = 16
#: A tenant role's connections, all nodes and processes together.
CONNECTIONS_PER_TENANT = 8
#: Connections for blob calls and provisioning (the service's role).
BLOB_CONNECTIONS = 4
TEMPLATE = "valrun_tenant_template"
#: The group of every tenant role, for pg_hba.conf; it is granted nothing.
TENANTS_GROUP = "valrun_tenants"
#: Bumped when the template's hardening changes: an older template is rebuilt.
TEMPLATE_VERSION = "valrun tenant template 1"
#: Any constant: the key of the transaction-level lock that serializes one user's calls.
CALL_LOCK = 7_411_011
#: A session-level advisory lock of the service's database around provisioning.
PROVISION_LOCK = 7_411_012
#: The tenant's schema: SQLite's name for a database's own tables, so `main.t` works on both.
SCHEMA = "main"

#: The role settings a tenant gets (PostgreSQL reads them at each connection); the call's
#: transaction sets statement_timeout itself.
ROLE_SETTINGS = {
    "search_path": SCHEMA,
    "work_mem": "4MB",
    "maintenance_work_mem": "16MB",
    "temp_file_limit": "64MB",
    "lock_timeout": "2s",
    "idle_in_transaction_session_timeout": "10s",
    "max_parallel_workers_per_gather": "0",
    "jit": "off",
    "bytea_output": "hex",
    "standard_conforming_strings": "on",
}

BLOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS valrun_blobs (
    owner text NOT NULL,
    key text NOT NULL,
    value bytea NOT NULL,
    updated_at double precision NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE TABLE IF NOT EXISTS valrun_blob_usage (
    owner text PRIMARY KEY,
    bytes bigint NOT NULL,
    keys bigint NOT NULL
);
-- Each user's SQL role and database: a random name, so that nothing a tenant can see in the
-- cluster's shared catalogs (role and database names) says who the others are.
CREATE TABLE IF NOT EXISTS valrun_sql_tenants (
    owner text PRIMARY KEY,
    name text NOT NULL UNIQUE
);
-- The key the tenants' passwords are derived from: made once, the same for every node.
CREATE TABLE IF NOT EXISTS valrun_sql_secret (
    id integer PRIMARY KEY CHECK (id = 1),
    key text NOT NULL
)
"""

#: Run once in the template, as a superuser: what no tenant may call or read. A tenant's
#: database is a copy, so these hold there too (per-database catalogs carry the ACLs).
TEMPLATE_HARDENING = f"""
REVOKE ALL ON SCHEMA public FROM PUBLIC;
REVOKE USAGE ON LANGUAGE sql, plpgsql FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION
    pg_catalog.set_config(text, text, boolean),
    pg_catalog.pg_notify(text, text),
    pg_catalog.pg_listening_channels(),
    pg_catalog.pg_database_size(name), pg_catalog.pg_database_size(oid),
    pg_catalog.pg_tablespace_size(name), pg_catalog.pg_tablespace_size(oid),
    pg_catalog.pg_get_userbyid(oid),
    pg_catalog.pg_stat_get_activity(integer),
    pg_catalog.pg_advisory_lock(bigint), pg_catalog.pg_advisory_lock_shared(bigint),
    pg_catalog.pg_try_advisory_lock(bigint), pg_catalog.pg_advisory_unlock_all(),
    pg_catalog.lo_create(oid), pg_catalog.lo_creat(integer),
    pg_catalog.lo_from_bytea(oid, bytea), pg_catalog.lo_import(text),
    pg_catalog.lo_import(text, oid), pg_catalog.lo_export(oid, text),
    pg_catalog.lo_open(oid, integer), pg_catalog.lo_put(oid, bigint, bytea),
    pg_catalog.lowrite(integer, bytea), pg_catalog.lo_unlink(oid)
FROM PUBLIC;
REVOKE SELECT ON
    pg_catalog.pg_database, pg_catalog.pg_roles, pg_catalog.pg_user,
    pg_catalog.pg_auth_members, pg_catalog.pg_db_role_setting,
    pg_catalog.pg_shdescription, pg_catalog.pg_stat_activity,
    pg_catalog.pg_stat_database, pg_catalog.pg_stat_database_conflicts,
    pg_catalog.pg_locks, pg_catalog.pg_prepared_xacts, pg_catalog.pg_tablespace,
    pg_catalog.pg_shseclabel, pg_catalog.pg_group, pg_catalog.pg_largeobject_metadata
FROM PUBLIC;
COMMENT ON DATABASE {TEMPLATE} IS '{TEMPLATE_VERSION}'
"""

#: The bytes the quota counts: the tenant's schema's tables, their TOAST and indexes,
#: materialized views and sequences. The tenant can create nothing elsewhere.
SIZE_QUERY = (
    "SELECT coalesce(sum(pg_catalog.pg_total_relation_size(c.oid)), 0)::bigint "
    "FROM pg_catalog.pg_class c WHERE c.relnamespace = 'main'::pg_catalog.regnamespace "
    "AND c.relkind IN ('r', 'm', 'S')"
)

#: After the call's statements: the size, or 0 when they wrote nothing (no transaction id was
#: assigned: any write, DDL included, takes one), which spares reads the catalog scan.
GROWN_SIZE_QUERY = (
    "SELECT CASE WHEN pg_catalog.pg_current_xact_id_if_assigned() IS NULL THEN 0 "
    f"ELSE ({SIZE_QUERY}) END"
)

# Type oids (pg_type.dat) and how their text form becomes a wire value.
_INTS = frozenset({20, 21, 23, 26})  # int8, int2, int4, oid
_FLOATS = frozenset({700, 701})  # float4, float8
_BOOL, _BYTEA, _NUMERIC = 16, 17, 1700
_PARAM_TYPES: dict[type, int] = {int: 20, float: 701, bytes: 17}


@dataclass(frozen=True, slots=True)
class Tenant:
    """A user's role and database (one random name for both, kept in `valrun_sql_tenants`
    so that nothing in it names the user), and the role's password, derived from the name
    and the service's key (`valrun_sql_secret`): every node computes it, none stores it."""

    role: str
    password: str

    @property
    def database(self) -> str:
        return self.role

    @classmethod
    def named(cls, name: str, key: str) -> Tenant:
        mac = hmac.new(key.encode(), f"valrun pg password\0{name}".encode(), "sha256")
        return cls(name, mac.hexdigest())


@dataclass(eq=False)
class _TenantConn:
    conn: Conn


class PgStorage(BlobCalls[Conn, _TenantConn]):
    def __init__(self, config: StorageConfig, url: str, max_result_bytes: int) -> None:
        self.config = config
        self.url = url
        self.max_result_bytes = max_result_bytes
        self._idle: list[Conn] = []
        self._idle_lock = threading.Lock()
        self._blob_threads = trio.CapacityLimiter(BLOB_CONNECTIONS)
        self._sql_threads = trio.CapacityLimiter(config.sql_threads)
        self._turns: Turns[_TenantConn] = Turns(config.max_waiting_per_user)
        self._template_ready = False
        with self._service() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PROVISION_LOCK,))
            for statement in BLOB_SCHEMA.split(";"):
                conn.execute(statement.encode())
            conn.execute(
                "INSERT INTO valrun_sql_secret (id, key) VALUES (1, %s) ON CONFLICT DO NOTHING",
                (secrets.token_hex(32),),
            )
            row = conn.execute("SELECT key FROM valrun_sql_secret").fetchone()
        self._key = str(row[0]) if row else ""

    def close(self) -> None:
        for slot in self._turns.users.values():
            if slot.db is not None:
                slot.db.conn.close()
                slot.db = None
        with self._idle_lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()

    # The service's connections (blob, provisioning)

    @contextmanager
    def _service(self) -> Iterator[Conn]:
        with self._idle_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = psycopg.connect(self.url, autocommit=True)
        try:
            yield conn
        except BaseException:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE or conn.broken:
                conn.close()
            raise
        finally:
            if not conn.closed:
                with self._idle_lock:
                    self._idle.append(conn)

    async def _blob_call(self, fn: Callable[[Conn], T], *, write: bool) -> T:
        # Reads and writes alike on the service's connections (PostgreSQL has no one writer).
        def run() -> T:
            try:
                with self._service() as conn:
                    return fn(conn)
            except psycopg.DataError as exc:  # a key or value PostgreSQL cannot hold
                raise StorageRefusedError(f"{exc}", "bad_key") from None
            except psycopg.Error as exc:
                logger.error("the blob store failed: %s", exc)
                raise StorageRefusedError(
                    "the storage failed; retry later", "storage_failed"
                ) from None

        return await trio.to_thread.run_sync(run, limiter=self._blob_threads)

    # Blob

    def _get(self, db: Conn, user: str, key: str) -> bytes | None:
        row = db.execute(
            "SELECT value FROM valrun_blobs WHERE owner = %s AND key = %s", (user, key)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _set(self, db: Conn, user: str, key: str, value: bytes) -> None:
        with db.transaction():
            # The usage row, locked: one user's writes are serialized across every node.
            db.execute(
                "INSERT INTO valrun_blob_usage (owner, bytes, keys) VALUES (%s, 0, 0) "
                "ON CONFLICT (owner) DO NOTHING",
                (user,),
            )
            usage = db.execute(
                "SELECT bytes FROM valrun_blob_usage WHERE owner = %s FOR UPDATE", (user,)
            ).fetchone()
            used = int(usage[0]) if usage else 0
            old = db.execute(
                "SELECT octet_length(value) FROM valrun_blobs WHERE owner = %s AND key = %s",
                (user, key),
            ).fetchone()
            old_size = None if old is None else int(old[0])
            delta = blob_write_delta(key, value, old_size, used, self.config.max_user_bytes)
            db.execute(
                "INSERT INTO valrun_blobs (owner, key, value, updated_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (owner, key) DO UPDATE "
                "SET value = excluded.value, updated_at = excluded.updated_at",
                (user, key, value, time.time()),
            )
            db.execute(
                "UPDATE valrun_blob_usage SET bytes = bytes + %s, keys = keys + %s "
                "WHERE owner = %s",
                (delta, 0 if old else 1, user),
            )

    def _delete(self, db: Conn, user: str, key: str) -> bool:
        with db.transaction():
            old = db.execute(
                "DELETE FROM valrun_blobs WHERE owner = %s AND key = %s "
                "RETURNING octet_length(value)",
                (user, key),
            ).fetchone()
            if old is None:
                return False
            db.execute(
                "UPDATE valrun_blob_usage SET bytes = bytes - %s, keys = keys - 1 WHERE owner = %s",
                (int(old[0]) + len(key.encode()), user),
            )
            return True

    def _list(
        self, db: Conn, user: str, prefix: str, after: str, limit: int
    ) -> list[tuple[str, int, float]]:
        return db.execute(
            # COLLATE "C": keys sort by code point, as SQLite's do.
            "SELECT key, octet_length(value), updated_at FROM valrun_blobs "
            'WHERE owner = %(user)s AND key COLLATE "C" > %(after)s '
            "AND left(key, char_length(%(prefix)s)) = %(prefix)s "
            'ORDER BY key COLLATE "C" LIMIT %(limit)s',
            {"user": user, "after": after, "prefix": prefix, "limit": limit},
        ).fetchall()

    # SQL

    async def sql(self, user: str, statements: Sequence[Statement], *, batch: bool) -> bytes:
        if not batch and len(statements) != 1:
            raise StorageRefusedError("execute runs exactly one statement", "bad_value")
        if not statements:
            return encode_sql_results([])
        for text, _ in statements:
            if len(text.encode("utf-8", errors="surrogatepass")) > MAX_SQL_TEXT_BYTES:
                raise StorageRefusedError(
                    f"a statement is over {MAX_SQL_TEXT_BYTES} bytes long", "sql_error"
                )
            if "\0" in text:
                raise StorageRefusedError("a statement may not contain NUL", "sql_error")
            refused = refusal(text)
            if refused is not None:
                raise StorageRefusedError(refused[1], refused[0])
        async with self._turns.turn(user, sql=True) as slot:
            remaining = trio.current_effective_deadline() - trio.current_time()
            run_for = max(0.0, min(self.config.sql_timeout_s, remaining))
            if slot.db is None:
                await self._close_idle_connections()
                slot.db = await trio.to_thread.run_sync(
                    lambda: self._connect_tenant(user), limiter=self._sql_threads
                )
            tenant = slot.db
            try:
                return await trio.to_thread.run_sync(
                    lambda: self._run_sql(tenant.conn, statements, run_for),
                    limiter=self._sql_threads,
                )
            finally:
                if tenant.conn.closed or tenant.conn.broken:
                    tenant.conn.close()
                    slot.db = None

    async def _close_idle_connections(self) -> None:
        closing = self._turns.evict_idle(MAX_OPEN_CONNECTIONS)
        if closing:

            def close_all() -> None:
                for tenant in closing:
                    tenant.conn.close()

            await trio.to_thread.run_sync(close_all, limiter=self._sql_threads)

    def _tenant_conninfo(self, tenant: Tenant) -> str:
        params = conninfo_to_dict(self.url)
        params.update(user=tenant.role, password=tenant.password, dbname=tenant.database)
        params.pop("options", None)
        return make_conninfo("", **params)

    def tenant(self, user: str) -> Tenant | None:
        """The user's role and database, if they have been made (blocking)."""
        with self._service() as conn:
            row = conn.execute(
                "SELECT name FROM valrun_sql_tenants WHERE owner = %s", (user,)
            ).fetchone()
        return None if row is None else Tenant.named(str(row[0]), self._key)

    def _connect_tenant(self, user: str) -> _TenantConn:
        tenant = self.tenant(user)
        if tenant is not None:
            try:
                return _TenantConn(self._open_tenant(tenant))
            except psycopg.OperationalError as exc:
                if "too many connections" in str(exc):  # the role's CONNECTION LIMIT
                    raise StorageRefusedError(
                        "your database has all the connections it may have; retry shortly",
                        "busy",
                    ) from None
        # No role or database yet (the first call), one half made (a node died while making
        # it), or a password changed by hand: (re)make what is missing.
        try:
            tenant = self._provision(user)
            return _TenantConn(self._open_tenant(tenant))
        except psycopg.Error as exc:
            logger.error("could not provision a user's SQL database: %s", exc)
            raise StorageRefusedError(
                "your SQL database could not be opened; retry later", "storage_failed"
            ) from None

    def _open_tenant(self, tenant: Tenant) -> Conn:
        return psycopg.connect(self._tenant_conninfo(tenant), autocommit=True, connect_timeout=10)

    def _provision(self, user: str) -> Tenant:
        """Create (or repair) the user's role and database. Idempotent, and serialized
        across nodes by an advisory lock of the service's database."""
        with self._service() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (PROVISION_LOCK,))
            try:
                self._ensure_template(conn)
                conn.execute(
                    "INSERT INTO valrun_sql_tenants (owner, name) VALUES (%s, %s) "
                    "ON CONFLICT (owner) DO NOTHING",
                    (user, "valrun_t_" + secrets.token_hex(12)),
                )
                tenant = self.tenant(user)
                if tenant is None:  # pragma: no cover - inserted above, under the lock
                    raise RuntimeError(f"no SQL tenant row for {user}")
                role = sql.Identifier(tenant.role)
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (tenant.role,)
                ).fetchone()
                attributes = sql.SQL(
                    "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION "
                    "NOBYPASSRLS CONNECTION LIMIT {} PASSWORD {}"
                ).format(sql.Literal(CONNECTIONS_PER_TENANT), sql.Literal(tenant.password))
                verb = "ALTER" if exists else "CREATE"
                conn.execute(sql.SQL(verb + " ROLE {} ").format(role) + attributes)
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(TENANTS_GROUP), role))
                for name, value in ROLE_SETTINGS.items():
                    conn.execute(
                        sql.SQL("ALTER ROLE {} SET {} = {}").format(
                            role, sql.Identifier(name), sql.Literal(value)
                        )
                    )
                if not conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (tenant.database,)
                ).fetchone():
                    self._create_database(conn, tenant)
                return tenant
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (PROVISION_LOCK,))

    def _create_database(self, conn: Conn, t: Tenant) -> None:
        database, role = sql.Identifier(t.database), sql.Identifier(t.role)
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(database, sql.Identifier(TEMPLATE))
        )
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, role))
        with psycopg.connect(self._admin_conninfo(t.database), autocommit=True) as inside:
            inside.execute(
                sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(SCHEMA), role)
            )

    def _admin_conninfo(self, database: str) -> str:
        params = conninfo_to_dict(self.url)
        params["dbname"] = database
        return make_conninfo("", **params)

    def _ensure_template(self, conn: Conn) -> None:
        if self._template_ready:
            return
        if not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (TENANTS_GROUP,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(TENANTS_GROUP)))
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (TEMPLATE,),
        ).fetchone()
        if row is None or row[0] != TEMPLATE_VERSION:
            if row is not None:
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(TEMPLATE)))
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(TEMPLATE))
            )
            with psycopg.connect(self._admin_conninfo(TEMPLATE), autocommit=True) as inside:
                for statement in TEMPLATE_HARDENING.split(";"):
                    inside.execute(statement.encode())
            conn.execute(
                sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(TEMPLATE))
            )
        self._template_ready = True

    def _run_sql(
        self,
        conn: Conn,
        statements: Sequence[Statement],
        run_for: float,
    ) -> bytes:
        pgconn = conn.pgconn
        timeout_ms = max(1, math.ceil(run_for * 1000))
        vacuum = False
        try:
            # One round trip, the simple protocol: the call's transaction and its settings.
            # The lock waits at most the statement timeout (set above it in the same string).
            before = _check(
                pgconn,
                f"BEGIN; SET LOCAL statement_timeout = {timeout_ms}; "
                f"SELECT pg_advisory_xact_lock({CALL_LOCK}); {SIZE_QUERY}".encode(),
                multiple=True,
            )
            size_before = int(before.get_value(0, 0) or b"0")
            deadline = time.monotonic() + run_for
            answer = ResultWriter(self.max_result_bytes, self._too_large)
            for i, (text, args) in enumerate(statements):
                if i:  # the first runs under the BEGIN's timeout; the others, what is left
                    left_ms = max(1, math.ceil((deadline - time.monotonic()) * 1000))
                    _check(pgconn, f"SET LOCAL statement_timeout = {left_ms}".encode())
                self._statement(pgconn, text, args, answer)
            body = answer.finish()
            size_row = _check(pgconn, GROWN_SIZE_QUERY.encode())
            size = int(size_row.get_value(0, 0) or b"0")
            # Only growth is refused: space left by rolled-back writes (until VACUUM) and
            # writes that reuse it do not make the database unusable.
            if size > self.config.max_sql_bytes and size > size_before:
                raise StorageRefusedError(
                    f"this would grow your SQL database to {size} bytes, past its "
                    f"{self.config.max_sql_bytes}-byte quota (storage.max_sql_bytes); "
                    "nothing was changed",
                    "quota_exceeded",
                )
            _check(pgconn, b"COMMIT")
            return body
        except _PgError as exc:
            raise self._refusal(exc, run_for) from None
        except psycopg.Error as exc:  # the connection broke (libpq's own errors)
            logger.error("a user's SQL connection failed: %s", exc)
            conn.close()
            raise StorageRefusedError(
                "the database failed; retry later", "storage_failed"
            ) from None
        except StorageRefusedError as exc:
            if exc.type == "quota_exceeded":
                vacuum = True
            raise
        finally:
            _end_call(conn, reclaim_ms=timeout_ms if vacuum else 0)

    def _statement(
        self, pgconn: pq.abc.PGconn, text: str, args: tuple[SqlValue, ...], answer: ResultWriter
    ) -> None:
        query, count = number_placeholders(text)
        if count and count != len(args):
            raise StorageRefusedError(
                f"the statement has {count} placeholders and {len(args)} arguments was given",
                "sql_error",
            )
        values: list[bytes | None] = []
        types: list[int] = []
        formats: list[int] = []
        for value in args:
            if value is None:
                values.append(None)
            elif isinstance(value, bytes):
                values.append(value)
            elif isinstance(value, float) and not math.isfinite(value):
                values.append(
                    b"NaN" if math.isnan(value) else b"Infinity" if value > 0 else b"-Infinity"
                )
            else:
                values.append(str(value).encode())
            types.append(_PARAM_TYPES.get(type(value), 0))  # text: inferred by the server
            formats.append(1 if isinstance(value, bytes) else 0)
        pgconn.send_query_params(query.encode(), values, types, formats, 0)
        pgconn.set_single_row_mode()
        _flush(pgconn)
        columns: list[str] | None = None
        rows_affected = 0
        tag = b""
        while (res := _next_result(pgconn)) is not None:
            status = res.status
            if status == pq.ExecStatus.SINGLE_TUPLE:
                if columns is None:
                    columns = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
                    answer.begin(columns)
                answer.add_rows([_row(res)])
            elif status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                if columns is None:
                    columns = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
                    answer.begin(columns)
                tuples = res.command_tuples
                rows_affected = tuples if tuples is not None else 0
                tag = res.command_status or b""
            elif status in (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH):
                raise _PgError(
                    "", "COPY is not available here"
                )  # the statement check stops it first
            else:
                raise _PgError.of(res)
        if columns is None:
            answer.begin([])
        # SQLite's rowcount counts changed rows only; PostgreSQL's tag counts a SELECT's too.
        answer.end(0 if tag.startswith(b"SELECT") else rows_affected, 0)

    def _too_large(self) -> StorageRefusedError:
        return StorageRefusedError(
            f"the result is over the {self.max_result_bytes}-byte limit; select fewer rows "
            "(LIMIT) or columns. Nothing was changed",
            "result_too_large",
        )

    def _refusal(self, exc: _PgError, run_for: float) -> StorageRefusedError:
        code = exc.sqlstate
        if code == "57014":  # query_canceled: the statement timeout
            return StorageRefusedError(
                f"the SQL ran for {run_for:.3g} s and was interrupted (the limit is "
                f"storage.sql_timeout_s = {self.config.sql_timeout_s:g} s, or the val's "
                "remaining time); nothing was changed",
                "sql_timeout",
            )
        if code == "55P03":  # lock_not_available: lock_timeout
            return StorageRefusedError(
                f"a lock was not granted in time: {exc.message}; nothing was changed",
                "sql_timeout",
            )
        if code in ("53100", "53400"):  # disk_full, configuration_limit_exceeded (temp files)
            return StorageRefusedError(
                f"{exc.message}: the statement used more temporary space than allowed; "
                "nothing was changed",
                "quota_exceeded",
            )
        if code == "42501":  # insufficient_privilege
            return StorageRefusedError(
                f"{exc.message}: your SQL reaches only your own database's tables", "sql_refused"
            )
        if code == "25001":  # active_sql_transaction: CREATE DATABASE, VACUUM, ...
            return StorageRefusedError(
                f"{exc.message}: every call is one transaction", "sql_refused"
            )
        if code == "42601" and "multiple commands" in exc.message:
            return StorageRefusedError(
                "one statement per string: send several as a batch", "sql_refused"
            )
        if code.startswith("08") or not code:
            logger.error("a user's SQL database failed: %s", exc.message)
            return StorageRefusedError("the database failed; retry later", "storage_failed")
        return StorageRefusedError(f"{exc.message} (nothing was changed)", "sql_error")

    # Usage

    async def usage(self, user: str) -> Usage:
        async with self._turns.turn(user, sql=False):
            row = await self._blob_call(
                lambda db: db.execute(
                    "SELECT bytes, keys FROM valrun_blob_usage WHERE owner = %s", (user,)
                ).fetchone(),
                write=False,
            )
        blob_bytes, blob_keys = (0, 0) if row is None else (int(row[0]), int(row[1]))
        sql_bytes = 0
        async with self._turns.turn(user, sql=True):
            tenant = await trio.to_thread.run_sync(self.tenant, user, limiter=self._blob_threads)
            if tenant is not None and await self._blob_call(
                lambda db: _database_exists(db, tenant.database), write=False
            ):
                sql_bytes = await trio.to_thread.run_sync(
                    lambda: self._size_of(tenant), limiter=self._sql_threads
                )
        return Usage(blob_bytes, blob_keys, sql_bytes)

    def _size_of(self, tenant: Tenant) -> int:
        with psycopg.connect(self._admin_conninfo(tenant.database), autocommit=True) as conn:
            row = conn.execute(SIZE_QUERY.encode()).fetchone()
        return int(row[0]) if row else 0


def _database_exists(db: Conn, name: str) -> bool:
    return (
        db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None
    )


class _PgError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message

    @classmethod
    def of(cls, res: pq.abc.PGresult) -> _PgError:
        state = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        text = (res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(errors="replace")
        return cls(state, text or (res.error_message or b"").decode(errors="replace").strip())


def _check(pgconn: pq.abc.PGconn, query: bytes, *, multiple: bool = False) -> pq.abc.PGresult:
    """Run the service's own statement(s); the last result, or _PgError."""
    if multiple:
        pgconn.send_query(query)
    else:
        pgconn.send_query_params(query, None)
    _flush(pgconn)
    last: pq.abc.PGresult | None = None
    error: _PgError | None = None
    while (res := _next_result(pgconn)) is not None:
        if res.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
            last = res
        elif error is None:
            error = _PgError.of(res)
    if error is not None:
        raise error
    if last is None:
        if pgconn.status != pq.ConnStatus.OK:
            raise _PgError("08006", (pgconn.error_message or b"").decode(errors="replace"))
        raise _PgError("", "no result")
    return last


def _end_call(conn: Conn, reclaim_ms: int) -> None:
    """Leave the tenant's connection idle, outside any transaction, or close it."""
    pgconn = conn.pgconn
    try:
        status = pgconn.transaction_status
        if status == pq.TransactionStatus.ACTIVE:
            _cancel(pgconn)
            status = pgconn.transaction_status
        if status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
            _check(pgconn, b"ROLLBACK")
        elif status != pq.TransactionStatus.IDLE:
            conn.close()
        if reclaim_ms and not conn.closed:
            _reclaim(pgconn, reclaim_ms)
    except (_PgError, psycopg.Error):
        conn.close()


# libpq's calls hold the GIL while they block: wait for the socket here instead (poll
# releases it), so that a long statement never freezes trio's thread. The connection is
# non-blocking (psycopg makes it so): sending returns at once, and flush finishes it.


def _wait(pgconn: pq.abc.PGconn, events: int) -> None:
    poller = select.poll()
    poller.register(pgconn.socket, events)
    poller.poll()


def _flush(pgconn: pq.abc.PGconn) -> None:
    while pgconn.flush() == 1:
        _wait(pgconn, select.POLLIN | select.POLLOUT)
        pgconn.consume_input()


def _next_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult | None:
    pgconn.consume_input()
    while pgconn.is_busy():
        _wait(pgconn, select.POLLIN)
        pgconn.consume_input()
    return pgconn.get_result()


def _reclaim(pgconn: pq.abc.PGconn, timeout_ms: int) -> None:
    """After a write refused for the quota: VACUUM the tenant's tables (the only ones its
    role owns), so that the space the rolled-back rows took counts no more."""
    try:
        _check(pgconn, f"SET statement_timeout = {timeout_ms}".encode())
        _check(pgconn, b"VACUUM")
    except _PgError as exc:
        logger.info("VACUUM after a refused write: %s", exc.message)
    finally:
        with contextlib.suppress(_PgError):
            _check(pgconn, b"RESET statement_timeout")


def _cancel(pgconn: pq.abc.PGconn) -> None:
    """Stop a statement left running (a result over the cap) and read what remains."""
    pgconn.get_cancel().cancel()
    while _next_result(pgconn) is not None:
        pass


def _row(res: pq.abc.PGresult) -> tuple[SqlValue, ...]:
    return tuple(_value(res.ftype(i), res.get_value(0, i)) for i in range(res.nfields))


def _value(oid: int, text: bytes | None) -> SqlValue:
    """A text-format value as the wire's: SQLite's five types. Booleans are 1 and 0 (as in
    SQLite); numeric is an int when whole, else a float; every other type is its text."""
    if text is None:
        return None
    if oid in _INTS:
        return int(text)
    if oid in _FLOATS:
        return float(text)
    if oid == _BOOL:
        return 1 if text == b"t" else 0
    if oid == _BYTEA:
        return bytes.fromhex(text[2:].decode())
    if oid == _NUMERIC:
        if text.isdigit() or (text[:1] == b"-" and text[1:].isdigit()):
            return int(text)
        return float(text)
    return text.decode()
