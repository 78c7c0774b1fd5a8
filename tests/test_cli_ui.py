"""`convoscope ui` as a process: a port Streamlit cannot serve is an error (exit 2), and
SIGTERM stops the Streamlit child too, so nothing is left listening."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.ui.launch import free_port, wait_until_up
from storage.engine import open_database
from tests.test_ingest_pipeline import REPO, convoscope


@pytest.mark.parametrize("port", ["0", "99999", "http"])
def test_a_port_out_of_range_is_refused_when_parsing(port: str, tmp_path: Path) -> None:
    result = convoscope("ui", "--port", port, db=str(tmp_path / "ui.duckdb"), cwd=tmp_path)
    assert result.returncode == 2 and "argument --port" in result.stderr
    assert not (tmp_path / "ui.duckdb").exists()  # refused before anything was opened


def test_a_port_in_use_makes_ui_exit_non_zero(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = convoscope(
            "ui", "--port", port, "--no-browser", db=str(tmp_path / "ui.duckdb"), cwd=tmp_path
        )
        demo = convoscope("demo", "--port", port, db=str(tmp_path / "d.duckdb"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"port {port} already in use" in result.stderr and "Traceback" not in result.stderr
    assert "convoscope UI on" not in result.stderr  # no address that serves nothing
    assert demo.returncode == 2 and f"port {port} already in use" in demo.stderr
    assert not (tmp_path / "d.duckdb").exists()  # refused before minutes of work


def test_sigterm_stops_the_streamlit_child(tmp_path: Path) -> None:
    """Also: with --json, stdout is the JSON summary alone; Streamlit's banner ("You can now
    view your Streamlit app", the URL) went to stdout, before it, so `--json ui` (and `--json
    demo`) printed no valid JSON."""
    open_database(str(tmp_path / "ui.duckdb")).dispose()  # the UI opens an existing database
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--db", str(tmp_path / "ui.duckdb"), "--json", "ui",
         "--port", str(port), "--no-browser"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own group, so cleanup reaches a leftover child
    )  # fmt: skip
    try:
        assert wait_until_up(f"http://127.0.0.1:{port}/", timeout=60.0)
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
        assert not wait_until_up(f"http://127.0.0.1:{port}/", timeout=1.0)
        assert ui.stdout and ui.stderr
        summary = json.loads(ui.stdout.read())
        assert summary["port"] == port and f"{port}" in ui.stderr.read().decode()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when all went well
            os.killpg(ui.pid, signal.SIGKILL)
        ui.wait()
