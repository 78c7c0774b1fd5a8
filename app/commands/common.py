"""What every command shares: its errors, its messages on stderr, and small helpers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.clusters import DEFAULT_ON, latest_runs
from storage.engine import resolve_url, with_journals

if TYPE_CHECKING:  # imported lazily at run time: it pulls in torch
    from sqlalchemy.engine import Engine

    from ingest.embed_step import EmbedConfig


class UserError(Exception):
    """A mistake in how the command was called, explained in one line."""


class NothingDone(UserError):
    """The command ran but achieved nothing; its result is still reported (exit status 2)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a command that is finished by something other than running it again."""

    def __init__(self, how_to_finish: str) -> None:
        super().__init__(how_to_finish)
        self.how_to_finish = how_to_finish


def warn(message: str) -> None:
    print(f"convoscope: warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """Something to know about a result that is not wrong as it is: one line on stderr."""
    print(f"convoscope: note: {message}", file=sys.stderr)


def embed_config(args: argparse.Namespace) -> EmbedConfig:
    """The embedder the command's --model, --device, --fast, --on and --batch-size ask for."""
    from ingest.embed_step import EmbedConfig

    return EmbedConfig(
        model=args.model,
        device=args.device,
        fast=args.fast,
        on=args.on,
        batch_size=args.batch_size,
    )


# Bad lines named one by one on stderr; the JSON output lists them all.
WARN_AT_MOST = 20


def check_input_file(path: Path, what: str) -> None:
    """Refuse a path that is no file to read, saying what it is instead: "no such file" for a
    folder sent people looking for a path that is there."""
    if path.is_dir():
        raise UserError(f"{path} is a folder: give the file of {what}")
    if not path.is_file():
        raise UserError(f"no such file: {path}")


def warn_skipped(bad: Sequence[object], more: str) -> None:
    """Bad records of an input file on stderr, the first WARN_AT_MOST by name, then how many
    `more` (e.g. "bad lines") there were."""
    for item in bad[:WARN_AT_MOST]:
        warn(f"skipped {item}")
    if len(bad) > WARN_AT_MOST:
        warn(f"skipped {len(bad) - WARN_AT_MOST} more {more}")


def parse_moment(text: str, *, end: bool) -> datetime:
    """A date (a whole day: from its start, or with `end` up to its end) or an ISO date-time
    (that instant), as stored: naive UTC (an offset is converted, none means UTC)."""
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1) if end else day, time.min)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"expected a date (2026-01-31) or an ISO date-time (2026-01-31T18:00), got {text!r}"
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def checked_window(
    since: datetime | None, until: datetime | None, names: tuple[str, str] = ("--since", "--until")
) -> tuple[datetime | None, datetime | None]:
    """The window, refused when it leaves no time between its ends: the selection would be
    empty whatever is stored. `names` spell the two options as the command takes them."""
    if since is not None and until is not None and since >= until:
        raise UserError(
            f"{names[0]} {since:%Y-%m-%d %H:%M} is not before {names[1]} {until:%Y-%m-%d %H:%M} "
            f"(a day given to {names[1]} counts up to its end)"
        )
    return since, until


def count(n: int, noun: str) -> str:
    """`1 input`, `2 inputs`, `30 topics`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def safe_url(db: str | None) -> str:
    """The database URL to print: its password, if any, hidden."""
    import sqlalchemy as sa

    return sa.make_url(resolve_url(db)).render_as_string(hide_password=True)


def no_clustering(engine: Engine, on: str) -> str:
    """Why `on` has no latest clustering: nothing is clustered on it yet, and where another
    field is, the --on that picks that field's clustering (a command quietly taking it would
    mix one field's topics with another's)."""
    others = [run["on_field"] for run in latest_runs(engine) if run["on_field"] != on]
    cluster = "`convoscope cluster`" if on == DEFAULT_ON else f"`convoscope cluster --on {on}`"
    if not others:
        return f"no clusters on {on} yet: run {cluster}"
    return (
        f"no clusters on {on} yet, only on {' and '.join(others)}: pass --on {others[0]} "
        f"for that clustering, or run {cluster}"
    )


def clustering_used(on: str, run: dict[str, Any] | None) -> dict[str, Any]:
    """Which clustering a command's rows or figures are of, for its summary."""
    return {"on": on, "run_id": run["id"] if run else None}


def file_bytes(path: Path | None) -> int | None:
    """A database file's size with its journals, or None for a server or an in-memory
    database."""
    if path is None:
        return None
    return sum(f.stat().st_size for f in with_journals(path) if f.is_file())
