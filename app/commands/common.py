"""What every command shares: its errors, its messages on stderr, and small helpers."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from storage.engine import resolve_url

if TYPE_CHECKING:  # imported lazily at run time: it pulls in torch
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


def count(n: int, noun: str) -> str:
    """`1 input`, `2 inputs`, `30 topics`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def safe_url(db: str | None) -> str:
    """The database URL to print: its password, if any, hidden."""
    import sqlalchemy as sa

    return sa.make_url(resolve_url(db)).render_as_string(hide_password=True)
