"""One function per CLI command: open the database, run the step, return a JSON-able result.

Kept apart from argument parsing (app/cli.py) so the UI and tests can call the same code
paths. Each module holds the commands of one stage; `describe` says any result in words.
"""

from app.commands.common import Interrupted, NothingDone, UserError, parse_moment
from app.commands.describe import describe
from app.commands.launch import demo, run, ui
from app.commands.logs import export, ingest
from app.commands.prune import DEFAULT_KEEP, prune
from app.commands.replays import replay
from app.commands.scores import reward, route, score
from app.commands.status import status
from app.commands.topics import assign, cluster, clusters, embed, rename, tag
from app.commands.trend import trend

__all__ = [
    "DEFAULT_KEEP",
    "Interrupted",
    "NothingDone",
    "UserError",
    "assign",
    "cluster",
    "clusters",
    "demo",
    "describe",
    "embed",
    "export",
    "ingest",
    "parse_moment",
    "prune",
    "rename",
    "replay",
    "reward",
    "route",
    "run",
    "score",
    "status",
    "tag",
    "trend",
    "ui",
]
