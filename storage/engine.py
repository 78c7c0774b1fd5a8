"""Where the database is and how to connect to it: the one place that knows engine quirks.

`--db` takes a SQLAlchemy URL or a plain file path; without it `$CONVOSCOPE_DB`, else a DuckDB
file in the working directory. An existing file is opened with the engine its header names,
a new one by its suffix. Opening a database brings its schema up to date (Alembic), and
refuses one written by a newer convoscope rather than guessing at its tables.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

DEFAULT_DB_FILE = "convoscope.duckdb"
_SQLITE_SUFFIXES = {".sqlite", ".sqlite3", ".db"}
_SQLITE_HEADER = b"SQLite format 3\x00"
_DUCKDB_MAGIC = b"DUCK"  # at byte 8 of a DuckDB file


class StorageError(RuntimeError):
    """A database problem a user can act on (wrong URL, locked file, newer schema)."""


def resolve_url(db: str | None = None) -> str:
    """The database URL to use: the argument, else $CONVOSCOPE_DB, else ./convoscope.duckdb."""
    raw = db or os.environ.get("CONVOSCOPE_DB") or DEFAULT_DB_FILE
    if raw == ":memory:":  # an in-memory DuckDB database, not a file of that name
        return "duckdb:///:memory:"
    if "://" not in raw:
        # Quoted into the URL: pasted in as it is, `what?.duckdb` opened a file named `what`
        # (the rest read as URL options) and `p%20q.duckdb` one named `p q.duckdb`.
        path = Path(raw).expanduser().resolve()
        url = sa.URL.create(_file_scheme(path), database=str(path))
        return url.render_as_string(hide_password=False)
    try:
        sa.make_url(raw)
    except sa.exc.ArgumentError:  # not echoed: a mistyped URL may still hold a password
        raise StorageError(
            "--db (or $CONVOSCOPE_DB) is neither a file path nor a database URL such as "
            "duckdb:///path, sqlite:///path or postgresql://user@host/db"
        ) from None
    if raw.startswith(("postgresql://", "postgres://")):
        # psycopg 3 is the driver we install; SQLAlchemy would otherwise look for psycopg2.
        return "postgresql+psycopg://" + raw.split("://", 1)[1]
    return raw


def _file_scheme(path: Path) -> str:
    """The engine of a database file: an existing file's header says (DuckDB's own files are
    often named `.db` too), a new file's suffix decides (`.sqlite`, `.sqlite3`, `.db`: SQLite)."""
    header = _header(path)
    if header.startswith(_SQLITE_HEADER):
        return "sqlite"
    if header[8:12] == _DUCKDB_MAGIC:
        return "duckdb"
    return "sqlite" if path.suffix in _SQLITE_SUFFIXES else "duckdb"


def _header(path: Path) -> bytes:
    """The first bytes of a file, which name its engine; empty when there is no such file
    (or it cannot be read: opening it will say why)."""
    try:
        with path.open("rb") as handle:
            return handle.read(16)
    except OSError:
        return b""


def _check_database_file(path: Path, backend: str) -> None:
    """Refuse a folder, and an existing file that is not a DuckDB database for DuckDB.

    A folder was reported as "no database at FOLDER" (or as DuckDB's IO error when writing),
    which sent users looking for a missing file. DuckDB opens a JSON, CSV or Parquet file
    given as its database as an empty in-memory one: an ingest into `--db chats.jsonl`
    reported rows stored and kept none."""
    if path.expanduser().is_dir():
        raise StorageError(
            f"{path} is a folder, not a database file: give --db (or $CONVOSCOPE_DB) a file, "
            f"such as {path / 'convoscope.duckdb'}"
        )
    header = _header(path)
    if backend == "duckdb" and header and header[8:12] != _DUCKDB_MAGIC:
        raise StorageError(
            f"{path} exists and is not a DuckDB database (a log file?): give --db a database "
            "file, or a new path to create one"
        )


def dialect_name(url: str) -> str:
    """'duckdb', 'sqlite' or 'postgresql' for a URL."""
    return sa.make_url(url).get_backend_name()


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for the URL with the settings each backend needs to behave the same way."""
    backend = dialect_name(url)
    if backend == "duckdb":
        parsed = sa.make_url(url)
        database = parsed.database
        if database and database != ":memory:":
            _make_parent(Path(database))
            _check_database_file(Path(database), backend)
        else:  # a named in-memory database: the engine's connections share it (see below)
            parsed = parsed.set(database=f":memory:{uuid.uuid4().hex}")
        # DuckDB's buffer pool would grow to 80 % of RAM; cap it so long ingests stay small
        # (it spills to disk past the cap; `make_room` adds what its indexes
        # hold). $CONVOSCOPE_DUCKDB_MEMORY overrides.
        # A checkpoint rewrites the changed blocks into the file; at DuckDB's default (every
        # 16 MB of WAL) a long ingest checkpoints hundreds of times and leaves half the file
        # free blocks. One large checkpoint at the end (or when the engine is disposed) gives
        # a file half the size, a little faster; a killed process replays the WAL on open.
        config = {
            "memory_limit": os.environ.get("CONVOSCOPE_DUCKDB_MEMORY", DUCKDB_MEMORY),
            "checkpoint_threshold": "1GB",
        }
        connect_args: dict[str, object] = {"config": config}
        if read_only:
            connect_args["read_only"] = True
        # Pooled connections: opening a DuckDB file replays its WAL, far too slow to do per
        # transaction; `engine.dispose()` releases the file (or drops the in-memory
        # database). Several of them (connections to one database in a process are cheap),
        # so a reader can look things up while another connection streams a result: a
        # DuckDB connection runs one result at a time.
        engine = sa.create_engine(parsed, connect_args=connect_args, poolclass=sa.pool.QueuePool)
        sa.event.listen(engine, "handle_error", _ctrl_c_as_interrupt)
        return engine
    if backend == "sqlite":
        path = database_file(url)
        if path is not None:
            _make_parent(path)
            _check_database_file(path, backend)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        return sa.create_engine(url, pool_pre_ping=True)
    raise StorageError(
        f"unsupported database URL {url!r}: use duckdb://, sqlite:// or postgresql://"
    )


# DuckDB's memory cap by default: 256 MB ingests 1M exchanges in 0.7 GB, 512 MB in about 1 GB
# (the rest of the cap fills with cached blocks), for 6 % more time.
DUCKDB_MEMORY = "256MB"
# Memory the cap keeps beside DuckDB's indexes for a batch's insert, commit and spilling.
_INDEX_RESERVE = 128 * 10**6
_UNITS = {"bytes": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # as DuckDB shows


def _size_bytes(size: str) -> int | None:
    """Bytes in a memory size as DuckDB shows one ("488.2 MiB"); None for one it cannot read."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", size)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def make_room(conn: Connection, *, committing: bool = False) -> None:
    """On DuckDB, raise the memory cap to what its indexes hold plus a reserve, when that is
    more than the cap; called before each bulk insert, and with `committing` before the commit
    of a transaction that inserted many rows. A no-op elsewhere.

    DuckDB keeps the primary-key index entries written since its last checkpoint in memory,
    where the cap cannot evict them: about 100 MB per million exchanges with their
    conversations. When they fill the cap, DuckDB 1.5 fails the insert or the commit, and a
    failed commit invalidates the database ("Corrupted in-memory column"): a 4M-exchange
    ingest did so at 3.4M under a flat 512 MB cap. So the cap grows with the indexes, and is
    never lowered again: a checkpoint lets the index out of memory, but the next inserts
    bring it back, and a cap lowered meanwhile failed that same ingest.

    A commit adds the transaction's index entries to the table's while the transaction's own
    are still held, so it wants the index twice: 1M reward scores in one transaction failed
    their commit under a 256 MB cap that had grown to 289 MB.
    """
    if conn.dialect.name != "duckdb":
        return
    duck = conn.connection.driver_connection
    index, limit = duck.execute(
        "SELECT coalesce(sum(memory_usage_bytes) FILTER (WHERE tag = 'ART_INDEX'), 0), "
        "current_setting('memory_limit') FROM duckdb_memory()"
    ).fetchone()
    current = _size_bytes(limit)
    wanted = int(index) * (2 if committing else 1) + _INDEX_RESERVE
    if current is not None and wanted > current:
        duck.execute(f"SET memory_limit = '{wanted}B'")  # a number, computed here


def _ctrl_c_as_interrupt(context: sa.engine.ExceptionContext) -> BaseException | None:
    """Ctrl-C during a DuckDB statement as the KeyboardInterrupt it is. DuckDB takes the
    SIGINT itself to stop the statement and raises a bare `RuntimeError('Query interrupted')`,
    which no command reads as Ctrl-C: an export or a score stopped so printed a traceback and
    exited 1 instead of saying what was kept and how to finish. Returned, not raised, so
    SQLAlchemy still closes the cursor and rolls back first."""
    error = context.original_exception
    if type(error) is RuntimeError and str(error) == "Query interrupted":
        return KeyboardInterrupt()
    return None


def _make_parent(path: Path) -> None:
    """Create a database file's folder (as DuckDB and SQLite files alike need), or say why not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        in_the_way = isinstance(error, FileExistsError | NotADirectoryError)
        why = "is a file, not a folder" if in_the_way else (error.strerror or str(error))
        raise StorageError(
            f"cannot create database {path}: {error.filename or path.parent}: {why}; "
            "choose another --db path"
        ) from error


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """Per-connection settings; foreign keys are off by design. WAL is set by `open_database`
    once the file is known to be ours (it is stored in the file, so it changes the file)."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _use_wal(engine: Engine) -> None:
    """WAL lets readers (the UI) work while an ingest writes to a SQLite file."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")


def open_database(
    db: str | None = None, *, read_only: bool = False, existing: bool = False
) -> Engine:
    """Connect, migrate to the current schema and return the engine. A read-only open (export,
    the UI's reads) migrates an older database first, as every other command does on opening:
    no read-only command could bring it up to date otherwise. A read-only open, and one for a
    step that works on stored data (`existing`), refuses a database file that does not exist:
    a mistyped --db would otherwise create an empty one and report that it holds nothing."""
    from storage.migrate import check_version, is_older, upgrade

    url = resolve_url(db)
    if read_only or existing:
        _require_file(url)
    engine = make_engine(url, read_only=read_only)
    try:
        if read_only:
            if is_older(engine):
                engine.dispose()
                writer = make_engine(url)
                try:
                    upgrade(writer)
                finally:
                    writer.dispose()
                engine = make_engine(url, read_only=True)
            check_version(engine)
        else:
            upgrade(engine)
            _use_wal(engine)
    except sa.exc.DatabaseError as error:  # OperationalError included; also "not a database"
        engine.dispose()
        raise StorageError(_explain(url, error)) from error
    except Exception:
        engine.dispose()
        raise
    return engine


def checkpoint(engine: Engine) -> None:
    """Write what a step stored into a DuckDB file (a no-op elsewhere).

    With one checkpoint per GB of log (`make_engine`), DuckDB keeps the rows a long step just
    committed in its memory-capped buffer pool: the next step in the same process (`run`:
    ingest then embed) then sorts 1M exchanges in what is left, and runs out of memory.
    """
    if engine.dialect.name == "duckdb":
        with engine.connect() as conn:
            conn.exec_driver_sql("CHECKPOINT")


def database_file(url: str) -> Path | None:
    """The file a DuckDB or SQLite URL names; None for an in-memory database or a server."""
    parsed = sa.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() not in {"duckdb", "sqlite"} or not database:
        return None
    if database.startswith((":memory:", "file:")):
        return None
    return Path(database)


def with_journals(file: Path) -> list[Path]:
    """A database file and the journals beside it that hold part of it (DuckDB's `.wal`,
    SQLite's `-wal`, `-journal` and `-shm`), whether they exist now or not."""
    journals = (".wal", "-wal", "-journal", "-shm")
    return [file, *(file.with_name(file.name + end) for end in journals)]


def _require_file(url: str) -> None:
    """A read-only open never creates a database: a missing file is an error, not an empty one."""
    path = database_file(url)
    if path is not None:
        _check_database_file(path, dialect_name(url))
    if path is not None and not path.is_file():
        raise StorageError(
            f"no database at {path}: check --db (or $CONVOSCOPE_DB), or make one with "
            "`convoscope ingest LOGS`"
        )


def explain_failure(error: BaseException) -> str | None:
    """One line for a database failure in the middle of a step (a full disk, an I/O error, a
    lost server, a lock held too long), or None for any other error. Those printed
    SQLAlchemy's traceback, with the batch's rows (the user's log text) in it."""
    invalidated = type(getattr(error, "orig", None)).__name__ == "FatalException"
    if not isinstance(error, sa.exc.OperationalError) and not invalidated:
        return None
    text = (str(error.orig) if error.orig is not None else str(error)).strip()
    if invalidated:  # DuckDB refuses every statement after a failed write: say what failed
        text = text.rpartition("Original error:")[2].strip().strip('"') or text
    text = text.splitlines()[0] if text else type(error.orig).__name__
    lowered = text.lower()
    if any(word in lowered for word in _FULL_DISK):
        return (
            f"the database could not be written ({text}): free disk space where --db is "
            "(or raise the file-size limit), then run the command again; what was stored "
            "before is kept"
        )
    return f"the database failed ({text}); what was stored before is kept"


# How a full disk reads in each engine's errors (a file-size limit, `ulimit -f`, alike).
_FULL_DISK = ("no space left", "disk is full", "disk i/o error", "file too large")


def _explain(url: str, error: Exception) -> str:
    text = str(error).splitlines()[0]
    safe_url = sa.make_url(url).render_as_string(hide_password=True)
    if "memory" in text.lower() and "CONVOSCOPE_DUCKDB_MEMORY" in os.environ:
        return (
            f"$CONVOSCOPE_DUCKDB_MEMORY={os.environ['CONVOSCOPE_DUCKDB_MEMORY']!r} is not a "
            f"size DuckDB takes ({text}): give one such as 512MB or 4GB"
        )
    if "lock" in text.lower():
        return (
            f"database {safe_url} is in use by another process ({text}). "
            "DuckDB allows one writer at a time: wait for it to finish, or use a "
            "PostgreSQL URL for concurrent writers."
        )
    if isinstance(error, sa.exc.DatabaseError) and "not a database" in text.lower():
        return (
            f"cannot open database {safe_url}: the file is not a "
            f"{sa.make_url(url).get_backend_name()} database ({text}); check the --db path"
        )
    return f"cannot open database {safe_url}: {text}"
