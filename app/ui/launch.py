"""Start the Streamlit UI in a child process (what `convoscope ui` and `demo` call).

The app has no login: bound to 127.0.0.1 (the default) only this machine can reach it, so
binding anywhere else prints a warning. Usage statistics are switched off, the server runs
headless (no browser is opened unless asked for) and the database URL travels as `--db`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

from storage.engine import resolve_url

APP = Path(__file__).resolve().with_name("app.py")
REPO_ROOT = APP.parents[2]
# The folder `convoscope ui` was run from: the child runs in REPO_ROOT, so the Export page
# resolves a relative "write to a file" path against this instead of the install folder.
LAUNCH_DIR_ENV = "CONVOSCOPE_UI_CWD"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def command(db_url: str, *, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The `streamlit run` command line for the UI on `db_url`."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button: this app is run locally, not on Streamlit Cloud
        "--",
        "--db",
        db_url,
    ]


def launch(
    db_url: str, *, host: str = "127.0.0.1", port: int = 8501, open_browser: bool = False
) -> subprocess.Popen[bytes]:
    """Start the UI and return its process (the caller waits on it or terminates it)."""
    if not is_loopback(host):
        print(
            f"convoscope: warning: the UI has no login; binding to {host} lets anyone who can "
            "reach this machine read, rename, tag and export your logs",
            file=sys.stderr,
        )
    # Resolved here: the child runs in the repository root, where a relative path would move.
    # Streamlit's banner and log are progress, so they go to stderr (fd 2): stdout is the
    # command's result alone, the JSON summary with `--json`.
    process = subprocess.Popen(
        command(resolve_url(db_url), host=host, port=port),
        cwd=REPO_ROOT,
        env=child_environment(),
        stdout=2,
    )
    if open_browser:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
        if wait_until_up(url, timeout=30.0):
            webbrowser.open(url)
    return process


def child_environment() -> dict[str, str]:
    """This process's environment plus the folder it runs in (`LAUNCH_DIR_ENV`), which the
    child, started in REPO_ROOT, needs for paths the user typed relative to it."""
    return {**os.environ, LAUNCH_DIR_ENV: os.getcwd()}


def wait_until_up(url: str, *, timeout: float) -> bool:
    """Poll the server's health endpoint until it answers (True) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    health = url.rstrip("/") + "/_stcore/health"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.25)
    return False


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port already (Streamlit would fail only after the
    UI seemed to start)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and parallel instances)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
