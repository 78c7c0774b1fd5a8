"""`convoscope replay` from the command line against a real loopback OpenAI-style server."""

from __future__ import annotations

import json
from pathlib import Path

from tests.openai_server import OpenAIServer
from tests.test_ingest_pipeline import convoscope, write_openai_jsonl


def test_replay_from_the_cli_then_report(tmp_path: Path) -> None:
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, 4)
    db = f"duckdb:///{tmp_path / 'replay.duckdb'}"
    assert convoscope("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    instruction = tmp_path / "instruction.txt"
    instruction.write_text("Answer in one word.")
    with OpenAIServer() as server:
        result = convoscope(
            "replay",
            "--model",
            "new-model",
            "--base-url",
            server.base_url,
            "--instruction",
            str(instruction),
            "--filter",
            "model=expert-1",
            "--json",
            db=db,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert (summary["done"], summary["failed"]) == (2, 0)  # conv-1's two turns
        assert server.total_requests() == 2

        report = convoscope("replay", "report", summary["run_id"], "--json", db=db, cwd=tmp_path)
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["pairs"] == 2


def test_replay_without_model_is_a_clear_error(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    result = convoscope("replay", "--base-url", "http://127.0.0.1:9/v1", db=db, cwd=tmp_path)
    assert result.returncode == 2
    assert "--model" in result.stderr and "Traceback" not in result.stderr
