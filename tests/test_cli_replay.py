"""`convoscope replay` from the command line against a real loopback OpenAI-style server."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.request import Request, urlopen

import pytest

from app.cli import main
from storage.logs import iter_exchanges
from tests.openai_server import Fault, OpenAIServer, answer_for
from tests.test_ingest_pipeline import REPO, convoscope, convoscope_here, write_openai_jsonl
from tests.tiny_reward_model import tiny_classifier


def _ingested(tmp_path: Path, conversations: int = 4) -> str:
    """A DuckDB database holding a small OpenAI chat log (two turns a conversation)."""
    log = tmp_path / "chat.jsonl"
    write_openai_jsonl(log, conversations)
    db = f"duckdb:///{tmp_path / 'replay.duckdb'}"
    assert convoscope_here("ingest", str(log), db=db, cwd=tmp_path).returncode == 0
    return db


def test_replay_from_the_cli_then_report(tmp_path: Path) -> None:
    db = _ingested(tmp_path)
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


def test_a_source_filter_finds_the_file_by_its_absolute_path_from_another_folder(
    tmp_path: Path,
) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    write_openai_jsonl(tmp_path / "logs" / "chat.jsonl", 2)
    db = f"duckdb:///{tmp_path / 'replay.duckdb'}"
    ingest = convoscope_here("ingest", "logs/chat.jsonl", "--json", db=db, cwd=tmp_path)
    stored = json.loads(ingest.stdout)["stored"]  # under the source "logs/chat.jsonl"
    with OpenAIServer() as server:
        result = convoscope_here(
            "replay", "--model", "m", "--base-url", server.base_url, "--json",
            "--filter", f"source={tmp_path / 'logs' / 'chat.jsonl'}",
            db=db, cwd=tmp_path / "elsewhere",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["done"] == stored == server.total_requests() > 0


def test_failed_replay_says_why_and_how_to_resume(tmp_path: Path) -> None:
    db = _ingested(tmp_path)
    with OpenAIServer(faults=[Fault(status=401)]) as server:
        args = ("--model", "m", "--base-url", server.base_url, "--filter", "model=expert-1")
        result = convoscope_here("replay", *args, db=db, cwd=tmp_path)
    assert result.returncode == 2, result.stderr  # nothing answered: a failure, still reported
    assert "none of the 2 inputs sent was answered" in result.stderr
    said = result.stdout
    assert "0 done, 2 failed" in said and "2 inputs still unanswered" in said
    run_id = said.split()[1]
    assert f"replay --resume {run_id}" in said
    assert "failures: " in said and "401" in said  # the reason, not only a count


def _stopped_once_sending(
    server: OpenAIServer, args: list[str], db: str, cwd: Path, stop: signal.Signals
) -> subprocess.Popen[str]:
    """`convoscope --db DB ARGS` in a process of its own, sent `stop` once its first request
    reached `server` (faulthandler on: SIGABRT prints where each thread is)."""
    process = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "app.cli", "--db", db, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while server.total_requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(stop)
    return process


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupted_replay_names_the_run_to_resume(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """SIGTERM (`kill`, a container stopping) ended a replay silently, its run left
    "running": it is handled as Ctrl-C."""
    db = _ingested(tmp_path)
    # The server never answers within the test: the replay can only end through the interrupt.
    with OpenAIServer(delay_s=900) as server:
        args = ("replay", "--model", "m", "--base-url", server.base_url, "--timeout", "900")
        process = _stopped_once_sending(server, [*args], db, tmp_path, stop)
        # It exits in about a second; the margin is for a machine loaded by other test runs.
        try:
            _, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints where each thread is
            _, err = process.communicate(timeout=60)
            pytest.fail(f"replay still running 300 s after {stop.name}; its threads:\n{err}")
        answered = server.total_answered()
    assert process.returncode == 130, err
    assert answered == 0  # it stopped on the interrupt, not because its requests finished
    resume = re.search(r"finish with `convoscope --db \S+ replay --resume ([0-9a-f]{32})`", err)
    assert resume, err
    report = convoscope_here("replay", "report", resume.group(1), "--json", db=db, cwd=tmp_path)
    assert report.returncode == 0, report.stderr  # the run it names exists
    assert json.loads(report.stdout)["status"] == "incomplete"  # not "running" forever


def test_ctrl_c_ends_a_run_whose_unwinding_is_stuck(tmp_path: Path) -> None:
    """A cancelled request's cleanup can wait on a server that holds its reply: an interrupted
    replay once kept running for minutes. Past the grace period after Ctrl-C the run ends
    anyway, with KeyboardInterrupt, and what is still unwinding is not awaited."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import asyncio, sys\n"
        "from ingest.chat_client import run_interruptible\n"
        "async def stuck():\n"
        "    print('ready', flush=True)\n"
        "    try:\n"
        "        await asyncio.sleep(600)\n"
        "    except asyncio.CancelledError:\n"
        "        await asyncio.shield(asyncio.sleep(600))  # cleanup that never finishes\n"
        "try:\n"
        "    run_interruptible(stuck(), grace_s=1.0)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)  # about a second; without the grace: never
    assert process.returncode == 130 and out == "interrupted\n", err
    assert "Traceback" not in err and "destroyed but it is pending" not in err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_the_readme_server_serves_in_the_background_until_killed(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """`python tests/openai_server.py &` in a script: no stdin, served until kill or Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "openai_server.py")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        time.sleep(0.5)  # it once exited here, its stdin read to the end
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        request = Request(f"{base_url}/chat/completions", body.encode(), method="POST")
        with urlopen(request, timeout=30) as reply:
            answer = json.load(reply)["choices"][0]["message"]["content"]
        assert answer.endswith(": ih")
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_a_replay_no_endpoint_answers_exits_2_with_its_summary(tmp_path: Path) -> None:
    db = _ingested(tmp_path)
    args = ("--model", "m", "--base-url", "http://127.0.0.1:1/v1", "--max-attempts", "1")
    result = convoscope_here("replay", *args, "--filter", "model=expert-1", db=db, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "convoscope: error: none of the 2 inputs sent was answered"
    )
    assert "0 done, 2 failed" in result.stdout and "status incomplete" in result.stdout
    assert re.search(r"`convoscope --db \S+ replay --resume [0-9a-f]{32}` sends", result.stdout)


@pytest.mark.parametrize(
    "filters",
    [
        ("--filter", "model=expert-1,model=expert-2"),
        ("--filter", "model=expert-1", "--filter", "model=expert-2"),
    ],
)
def test_a_filter_key_given_twice_selects_either_value(
    tmp_path: Path, filters: tuple[str, ...]
) -> None:
    """Each of expert-1 and expert-2 served one two-turn conversation: the second model used to
    replace the first, and 2 inputs were sent where 4 match."""
    db = _ingested(tmp_path)
    args = ("--model", "m", "--base-url", "http://127.0.0.1:1/v1", "--max-attempts", "1")
    result = convoscope_here("replay", *args, *filters, db=db, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "none of the 4 inputs sent was answered" in result.stderr.splitlines()[-1]


def test_a_bad_filter_names_the_filter_option(tmp_path: Path) -> None:
    args = ("replay", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--filter", "model")
    result = convoscope_here(*args, db=str(tmp_path / "never.duckdb"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--filter expects key=value pairs, got 'model'" in result.stderr.splitlines()[-1]


def test_a_filter_naming_no_stored_model_or_source_says_which_and_what_is_stored(
    tmp_path: Path,
) -> None:
    """A mistyped `--filter model=` used to end in "the selection matches no saved input to
    replay", with a hint about earlier replays' answers: which name matched nothing, and the
    names there are, were left to guess (as `export --model` says them)."""
    db = _ingested(tmp_path)
    with OpenAIServer() as server:
        args = ("replay", "--model", "m", "--base-url", server.base_url)
        for given, said in [
            ("model=expert-9", "--filter model=expert-9 matches no stored model (stored: expert-0"),
            ("source=chats.jsonl", "--filter source=chats.jsonl matches no stored source (stored:"),
        ]:
            result = convoscope_here(*args, "--filter", given, db=db, cwd=tmp_path)
            assert result.returncode == 2
            assert said in result.stderr, result.stderr
        assert server.total_requests() == 0


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--base-url", "127.0.0.1:8000/v1", "--base-url: expected an http(s) URL"),
        ("--base-url", "ftp://127.0.0.1/v1", "--base-url: expected an http(s) URL"),
        ("--timeout", "0", "--timeout: must be more than 0"),
        ("--timeout", "-5", "--timeout: must be more than 0, got -5"),
        ("--rate-limit", "0", "--rate-limit: must be more than 0"),
        ("--concurrency", "0", "--concurrency: must be at least 1"),
        ("--max-attempts", "0", "--max-attempts: must be at least 1"),
        ("--sample", "0", "--sample: must be at least 1"),
    ],
)
def test_replay_options_are_checked_up_front_and_named(
    tmp_path: Path, option: str, value: str, said: str
) -> None:
    db = tmp_path / "never.duckdb"
    args = ("replay", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", option, value)
    result = convoscope_here(*args, db=str(db), cwd=tmp_path)
    assert result.returncode == 2 and said in result.stderr.splitlines()[-1], result.stderr
    assert "goes after --" not in result.stderr  # a negative number is a value, not an option
    assert not db.exists()  # refused before anything was opened


def test_replay_without_model_is_a_clear_error(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'x.duckdb'}"
    result = convoscope_here("replay", "--base-url", "http://127.0.0.1:9/v1", db=db, cwd=tmp_path)
    assert result.returncode == 2
    assert "--model" in result.stderr and "Traceback" not in result.stderr


def _clustered(tmp_path: Path) -> str:
    """12 logged exchanges in two topics, t0 and t1."""
    from clustering.stages import kmeans_clusterer, pca_reducer
    from clustering.step import ClusterStepConfig, cluster_exchanges
    from clustering.topics import ClusterConfig
    from ingest.embed_step import EmbedConfig
    from storage.engine import open_database

    db = _ingested(tmp_path, 12)
    engine = open_database(db)
    config = ClusterStepConfig(
        embed=EmbedConfig(device="cpu", progress=False), topics=ClusterConfig(layout=False)
    )
    cluster_exchanges(engine, config=config, reducer=pca_reducer(5), clusterer=kmeans_clusterer(2))
    engine.dispose()
    return db


def test_an_instruction_replayed_on_a_cluster_is_versioned(tmp_path: Path) -> None:
    from storage.engine import open_database
    from storage.reports import load_instructions

    db = _clustered(tmp_path)

    instruction = tmp_path / "instruction.txt"
    runs = []
    with OpenAIServer() as server:
        # The second as Windows Notepad saves it, after a byte-order mark: not instruction text.
        for text, encoding in (
            ("Answer briefly.", "utf-8"),
            ("Answer with a number only.", "utf-8-sig"),
        ):
            instruction.write_text(text, encoding=encoding)
            result = convoscope_here(
                "replay", "--model", "m2", "--base-url", server.base_url, "--cluster", "t0",
                "--instruction", str(instruction), "--json", db=db, cwd=tmp_path,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            runs.append(json.loads(result.stdout)["run_id"])
    engine = open_database(db)
    versions = load_instructions(engine, "t0")
    assert [(v["version"], v["text"]) for v in versions] == [
        (2, "Answer with a number only."),
        (1, "Answer briefly."),
    ]
    assert [v["replay_run_id"] for v in versions] == runs[::-1]

    # `replay report` scores each version beside the original answers to the same inputs
    # (rewards as `convoscope score` would store them): the first beat them, the second not.
    from ingest.replay import pairs
    from storage.scores import store_scores

    rewards: dict[str, float] = {}
    for run_id, new in zip(runs, (0.75, 0.25), strict=True):
        for pair in pairs(engine, run_id):
            rewards |= {pair["original_id"]: 0.5, pair["new_id"]: new}
    store_scores(engine, "reward:test", rewards)
    engine.dispose()
    for run_id in runs:
        report = convoscope_here("replay", "report", run_id, "--json", db=db, cwd=tmp_path)
        assert report.returncode == 0, report.stderr
    engine = open_database(db)
    versions = load_instructions(engine, "t0")
    engine.dispose()
    scored = [(v["version"], v["mean_reward"], v["original_mean_reward"]) for v in versions]
    assert scored == [(2, 0.25, 0.5), (1, 0.75, 0.5)]

    # The second version against the first, on the same inputs: it lost every one.
    against = ("replay", "report", runs[1], "--against", runs[0])
    report = convoscope_here(*against, "--json", db=db, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    compared = json.loads(report.stdout)["against"]
    n = compared["shared"]
    assert n > 0 and (compared["only_run"], compared["only_against"]) == (0, 0)
    o = compared["overall"]
    assert (o["n"], o["mean_original"], o["mean_new"], o["win_rate"]) == (n, 0.75, 0.25, 0.0)
    assert set(compared["per_cluster"]) == {"t0"} and compared["per_cluster"]["t0"]["n"] == n
    text = convoscope_here(*against, db=db, cwd=tmp_path).stdout
    assert f"against run {runs[0]} (m2): {n} inputs both answered" in text
    assert "that run 0.750, this run 0.250, difference -0.500" in text
    for args, said in (
        (("replay", "report", runs[1], "--against", "nonexist"), "no such replay run"),
        (("replay", "report", runs[1], "--against", runs[1]), "names the run itself"),
        (("replay", "judge", runs[1], "--against", runs[0]), "--against"),
        (("replay", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--against", runs[0]),
         "give it to `replay report RUN`"),
    ):  # fmt: skip
        refused = convoscope_here(*args, db=db, cwd=tmp_path)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr

    # --filter with --cluster: both apply (the filter was ignored, the whole cluster sent).
    from storage.clusters import exchanges_in_clusters, latest_run

    engine = open_database(db)
    members = set(exchanges_in_clusters(engine, latest_run(engine)["id"], cluster_id="t0"))
    models = Counter(
        row["model"] for batch in iter_exchanges(engine) for row in batch if row["id"] in members
    )
    engine.dispose()
    model, expected = models.most_common()[-1]
    assert 0 < expected < len(members)
    with OpenAIServer() as server:
        both = convoscope_here(
            "replay", "--model", "m3", "--base-url", server.base_url, "--cluster", "t0",
            "--filter", f"model={model}", "--json", db=db, cwd=tmp_path,
        )  # fmt: skip
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["sent"] == expected == server.total_requests()

    # A mistyped cluster id or tag is named as such ("no exchanges match" did not say why).
    for option, value, said in (
        ("--cluster", "t99", "no cluster 't99' in the latest clustering"),
        (
            "--tag",
            "nope",
            "no exchange or cluster of the latest clustering on prompt is tagged 'nope'",
        ),
    ):
        wrong = convoscope_here(
            "replay", "--model", "m3", "--base-url", "http://127.0.0.1:1/v1", option, value,
            db=db, cwd=tmp_path,
        )  # fmt: skip
        assert wrong.returncode == 2 and said in wrong.stderr, wrong.stderr


def test_the_printed_resume_command_alone_finishes_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run stores its model, endpoint, instruction and key variable: the command it prints
    needs none of them again, and sends only what is unanswered, as the run sent it."""
    db = _ingested(tmp_path)
    instruction = tmp_path / "instruction.txt"
    instruction.write_text("Answer in one word.")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    fails_once = Fault(prompt="What is 1 + 1?", status=500, times=1)
    with OpenAIServer(faults=[fails_once]) as server:
        first = convoscope_here(
            "replay", "--model", "m", "--base-url", server.base_url, "--filter", "model=expert-1",
            "--instruction", str(instruction), "--api-key-env", "MY_KEY", "--max-attempts", "1",
            db=db, cwd=tmp_path,
        )  # fmt: skip
        assert first.returncode == 0 and "1 done, 1 failed" in first.stdout, first.stderr
        printed = re.search(r"`(convoscope [^`]*)` sends them again", first.stdout)
        assert printed, first.stdout
        command = [sys.executable, "-m", "app.cli", *shlex.split(printed.group(1))[1:]]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        assert "1 done, 0 failed" in resumed.stdout and "status done" in resumed.stdout
        assert server.requests == {"What is 1 + 1?": 2, "And doubled?": 1}
        last = server.received[-1]
        assert last["authorization"] == "Bearer sk-mine"
        assert last["body"]["model"] == "m"
        assert last["body"]["messages"][0] == {"role": "system", "content": "Answer in one word."}
        run_id = printed.group(1).split()[-1]
        other = convoscope_here(
            "replay", "--resume", run_id, "--model", "other", db=db, cwd=tmp_path
        )
    assert other.returncode == 2
    said = f"run {run_id} was started with model 'm', not 'other': resume it with what it was"
    assert said in other.stderr


def test_resume_of_an_unknown_run_is_an_error_and_sends_nothing(tmp_path: Path) -> None:
    db = _ingested(tmp_path)
    with OpenAIServer() as server:
        result = convoscope_here(
            "replay", "--resume", "nonexist", "--model", "m", "--base-url", server.base_url,
            db=db, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2
        assert "no replay run 'nonexist'" in result.stderr and "Traceback" not in result.stderr
        assert server.total_requests() == 0
    report = convoscope_here("replay", "report", "nonexist", db=db, cwd=tmp_path)
    assert report.returncode == 2  # no run was created either


def test_wrong_key_variables_and_instruction_files_are_refused_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unset --api-key-env sent every request without a key; a non-UTF-8 instruction file
    failed with a bare codec error, and an empty one replaced every system message with
    nothing."""
    db = _ingested(tmp_path)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    base = ["--db", db, "replay", "--model", "m", "--base-url", "http://127.0.0.1:1/v1"]
    assert main([*base, "--api-key-env", "NO_SUCH_KEY_VAR"]) == 2
    assert "--api-key-env NO_SUCH_KEY_VAR: that variable is not set" in capsys.readouterr().err
    for name, content, said in (
        ("latin1.txt", "Réponds en français.".encode("latin-1"), "not UTF-8 text"),
        ("empty.txt", b"  \n", "the file is empty"),
    ):
        path = tmp_path / name
        path.write_bytes(content)
        assert main([*base, "--instruction", str(path)]) == 2
        assert f"--instruction {path}: {said}" in capsys.readouterr().err

    # One input, nobody answering: said in the singular.
    assert main([*base, "--sample", "1", "--max-attempts", "1"]) == 2
    out, err = capsys.readouterr()
    assert "1 input still unanswered" in out
    assert err.splitlines()[-1] == "convoscope: error: none of the 1 input sent was answered"

    # A resumed run sends what it left pending: a selection given with it was silently ignored.
    resume = ["--db", db, "replay", "--resume", "somerun"]
    assert main([*resume, "--cluster", "t0", "--sample", "3"]) == 2
    said = "--cluster, --sample cannot change what a resumed run sends"
    assert said in capsys.readouterr().err


def test_an_interrupted_instruction_replay_on_a_cluster_still_saves_its_version(
    tmp_path: Path,
) -> None:
    """The version was saved only when the run ended: Ctrl-C (or SIGTERM) mid-run skipped it,
    and `replay --resume` (which names no cluster) never saves one, so the instruction tried
    on the cluster was lost from its versions, and `replay report` had no version to score."""
    from storage.engine import open_database
    from storage.reports import load_instructions

    db = _clustered(tmp_path)
    instruction = tmp_path / "instruction.txt"
    instruction.write_text("Answer briefly.")
    with OpenAIServer(delay_s=900) as server:  # answers nothing: only the interrupt ends it
        args = ("replay", "--model", "m", "--base-url", server.base_url, "--cluster", "t0")
        args = (*args, "--instruction", str(instruction))
        process = _stopped_once_sending(server, [*args], db, tmp_path, signal.SIGINT)
        _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    resume = re.search(r"replay --resume ([0-9a-f]{32})`", err)
    assert resume, err
    engine = open_database(db)
    versions = load_instructions(engine, "t0")
    engine.dispose()
    assert [(v["version"], v["text"]) for v in versions] == [(1, "Answer briefly.")]
    assert versions[0]["replay_run_id"] == resume.group(1)

    with OpenAIServer() as server:  # finishing the run saves no second version
        done = convoscope_here("replay", "--resume", resume.group(1), "--base-url", server.base_url,
                          db=db, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    engine = open_database(db)
    assert len(load_instructions(engine, "t0")) == 1
    engine.dispose()


def _replaying(db: str, cwd: Path, *args: str) -> subprocess.Popen[str]:
    """`convoscope --db DB replay ARGS` running in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--db", db, "replay", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _the_run_once_sent(db: str, server: OpenAIServer, sent: int) -> str:
    """The id of the one replay run in `db`, once `sent` requests of it reached `server`."""
    from storage.engine import open_database
    from storage.replay import list_runs

    deadline = time.monotonic() + 120
    while server.total_requests() < sent and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.total_requests() == sent
    engine = open_database(db)
    (run,) = list_runs(engine)
    engine.dispose()
    return run["id"]


def test_resuming_a_run_another_process_drives_is_refused_until_taken_over(
    db_url: str, tmp_path: Path
) -> None:
    """Two `replay --resume RUN` at once (or one beside the process still running the run)
    each sent every unanswered input, so inputs went out twice. A second process now leaves a
    live run alone, saying how to take it over; a killed process's run is taken with
    --take-over, which sends each input once more and finishes the run."""
    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file opens in one process at a time: no second one can resume")
    write_openai_jsonl(tmp_path / "chat.jsonl", 4)
    assert convoscope_here("ingest", "chat.jsonl", db=db_url, cwd=tmp_path).returncode == 0
    with OpenAIServer(delay_s=900) as held, OpenAIServer() as fast:
        first = _replaying(
            db_url, tmp_path, "--model", "m", "--base-url", held.base_url, "--timeout", "900",
            "--filter", "model=expert-1",
        )  # fmt: skip
        try:
            run_id = _the_run_once_sent(db_url, held, 2)
            again = ("replay", "--resume", run_id, "--base-url", fast.base_url)
            second = convoscope_here(*again, db=db_url, cwd=tmp_path)
            assert second.returncode == 2, second.stderr
            said = f"run {run_id} is being replayed by another process since "
            assert said in second.stderr and f"--resume {run_id} --take-over`" in second.stderr
            assert fast.total_requests() == 0 and held.total_requests() == 2
        finally:
            first.kill()
            first.communicate(timeout=60)
        # Killed: its lease has not lapsed, so the run stays refused until taken over.
        assert convoscope_here(*again, db=db_url, cwd=tmp_path).returncode == 2
        taken = convoscope_here(*again, "--take-over", "--json", db=db_url, cwd=tmp_path)
        assert taken.returncode == 0, taken.stderr
        assert json.loads(taken.stdout)["status"] == "done"
        assert fast.requests == {"What is 1 + 1?": 1, "And doubled?": 1}


def test_a_killed_replays_run_is_incomplete_and_resumes_once_its_lease_lapses(
    db_url: str, tmp_path: Path
) -> None:
    """A run whose process was killed stayed "running" like a live one; it blocks a plain
    `--resume` only until its lease lapses (a second here, a minute by default)."""
    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file opens in one process at a time: the lease is the same")
    write_openai_jsonl(tmp_path / "chat.jsonl", 4)
    assert convoscope_here("ingest", "chat.jsonl", db=db_url, cwd=tmp_path).returncode == 0
    driver = (
        "import sys\n"
        "from ingest.replay import ReplayConfig, replay\n"
        "from storage.engine import open_database\n"
        "from storage.logs import ExchangeFilter\n"
        "config = ReplayConfig(model='m', base_url=sys.argv[2], lease_s=1.0, timeout_s=900)\n"
        "replay(open_database(sys.argv[1]), config=config, "
        "select=ExchangeFilter(models=('expert-1',)))\n"
    )
    with OpenAIServer(delay_s=900) as held, OpenAIServer() as fast:
        first = subprocess.Popen(
            [sys.executable, "-c", driver, db_url, held.base_url],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            run_id = _the_run_once_sent(db_url, held, 2)
        finally:
            first.kill()
            first.wait(timeout=60)
        time.sleep(1.5)  # the lease lapses
        report = convoscope_here("replay", "report", run_id, "--json", db=db_url, cwd=tmp_path)
        assert json.loads(report.stdout)["status"] == "incomplete", report.stderr
        again = ("replay", "--resume", run_id, "--base-url", fast.base_url, "--json")
        resumed = convoscope_here(*again, db=db_url, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["done"] == 2 == fast.total_requests()


def test_take_over_needs_resume(tmp_path: Path) -> None:
    db = f"duckdb:///{tmp_path / 'replay.duckdb'}"
    args = ("replay", "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--take-over")
    result = convoscope_here(*args, db=db, cwd=tmp_path)
    assert result.returncode == 2
    assert "--take-over takes a run from a dead process: give it with --resume RUN" in (
        result.stderr
    )


def test_on_without_cluster_or_tag_is_refused_naming_them(tmp_path: Path) -> None:
    """`--on` only picks the clustering `--cluster`/`--tag` select from: `replay --on
    response` without either replayed every saved input, the --on silently unused (as it is
    by a resumed run or a judge). `replay report RUN --on F` reads it: not refused there."""
    write_openai_jsonl(tmp_path / "chat.jsonl", 2)
    db = f"duckdb:///{tmp_path / 'on.duckdb'}"
    assert convoscope_here("ingest", "chat.jsonl", db=db, cwd=tmp_path).returncode == 0
    said = "--on picks the clustering --cluster or --tag select from"
    with OpenAIServer() as server:
        endpoint = ("--model", "m", "--base-url", server.base_url)
        for args in (
            (*endpoint, "--on", "response"),
            (*endpoint, "--on", "prompt", "--filter", "model=expert-1"),
            ("--resume", "some-run", "--on", "response"),
            ("judge", "some-run", *endpoint, "--on", "response"),
        ):
            refused = convoscope_here("replay", *args, db=db, cwd=tmp_path)
            assert refused.returncode == 2, refused.stdout
            assert said in refused.stderr and "leave --on out" in refused.stderr, args
        assert server.total_requests() == 0
        sent = convoscope_here("replay", *endpoint, "--json", db=db, cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    run_id = json.loads(sent.stdout)["run_id"]
    report = convoscope_here("replay", "report", run_id, "--on", "response", "--json", db=db,
                             cwd=tmp_path)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["clustering"]["on"] == "response"

    # A judge judges every answer of its run, a report compares them all: a selection, an
    # instruction or an endpoint given to either went silently unused.
    with OpenAIServer() as server:
        endpoint = ("--model", "judge", "--base-url", server.base_url)
        for args, unread in (
            (("judge", run_id, *endpoint, "--cluster", "t1"), "--cluster"),
            (("judge", run_id, *endpoint, "--filter", "model=m", "--instruction", "x"),
             "--filter, --instruction"),
            (("report", run_id, "--model", "m", "--sample", "1"), "--model, --sample"),
        ):  # fmt: skip
            refused = convoscope_here("replay", *args, db=db, cwd=tmp_path)
            assert refused.returncode == 2, refused.stdout
            assert f"so {unread} would go unused" in refused.stderr, refused.stderr
        assert server.total_requests() == 0


def test_a_live_replay_taken_over_stops_and_stores_nothing_more(
    db_url: str, tmp_path: Path
) -> None:
    """--take-over of a process that was alive after all: that process finds its lease gone at
    its next renewal (a heartbeat, or the commit of its late answers) and stops, storing none
    of them, so each input keeps the one answer the process that took over stored."""
    from storage.engine import open_database

    if db_url.startswith("duckdb"):
        pytest.skip("a DuckDB file opens in one process at a time: no second one can resume")
    write_openai_jsonl(tmp_path / "chat.jsonl", 4)
    assert convoscope_here("ingest", "chat.jsonl", db=db_url, cwd=tmp_path).returncode == 0
    with OpenAIServer(delay_s=20) as slow, OpenAIServer() as fast:
        first = _replaying(
            db_url, tmp_path, "--model", "m", "--base-url", slow.base_url,
            "--filter", "model=expert-1",
        )  # fmt: skip
        run_id = _the_run_once_sent(db_url, slow, 2)
        again = ("replay", "--resume", run_id, "--base-url", fast.base_url, "--take-over")
        taken = convoscope_here(*again, db=db_url, cwd=tmp_path)
        assert taken.returncode == 0, taken.stderr
        _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    assert f"run {run_id} was taken over by another process" in err
    engine = open_database(db_url)
    stored = [r for b in iter_exchanges(engine) for r in b if r["source"] == f"replay:{run_id}"]
    engine.dispose()
    assert sorted(r["prompt"] for r in stored) == ["And doubled?", "What is 1 + 1?"]


def test_the_report_advises_score_only_where_it_can_train(tmp_path: Path) -> None:
    """On a log of saved inputs alone (prompts without answers) and replays of them, the
    report of a run compared against earlier replayed answers said "run `convoscope score`",
    which stops there with "nothing to train on": no logged feedback, no battle."""
    db = f"duckdb:///{tmp_path / 'saved.duckdb'}"
    (tmp_path / "inputs.csv").write_text("prompt\nSaved question 1?\nSaved question 2?\n")
    assert convoscope_here("ingest", "inputs.csv", db=db, cwd=tmp_path).returncode == 0
    with OpenAIServer() as server:
        replay = ("replay", "--model", "m", "--base-url", server.base_url, "--json")
        first = json.loads(convoscope_here(*replay, db=db, cwd=tmp_path).stdout)["run_id"]
        of_answers = ("--filter", f"source=replay:{first}")
        second = json.loads(convoscope_here(*replay, *of_answers, db=db, cwd=tmp_path).stdout)
    with OpenAIServer(faults=[Fault(status=401)]) as refusing:
        replay = ("replay", "--model", "m", "--base-url", refusing.base_url, "--json")
        unanswered = json.loads(convoscope_here(*replay, db=db, cwd=tmp_path).stdout)

    def report(run_id: str) -> str:
        result = convoscope_here("replay", "report", run_id, db=db, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout

    said = report(second["run_id"])
    assert "run `convoscope score`" not in said
    assert "`convoscope score` has nothing to train on here" in said
    assert f"`convoscope replay judge {second['run_id']} --model JUDGE" in said
    assert "--reward-model DIR" in said
    assert "reward: nothing answered yet to score" in report(unanswered["run_id"])
    # A user's own reward model, stored: it scores the answers that come after it.
    own = tiny_classifier(tmp_path / "own-reward-model", positions=64)
    scored = ("score", "reward", "train", "--reward-model", str(own))  # cut at its 64 positions
    assert convoscope_here(*scored, db=db, cwd=tmp_path).returncode == 0
    with OpenAIServer() as server:
        replay = ("replay", "--model", "m2", "--base-url", server.base_url, "--json")
        later = json.loads(convoscope_here(*replay, *of_answers, db=db, cwd=tmp_path).stdout)
    apply = "reward: not scored yet (run `convoscope score reward apply`: the stored reward model)"
    assert apply in report(later["run_id"])
    # A logged chat (its last answers ended their conversations: feedback) can train.
    write_openai_jsonl(tmp_path / "chat.jsonl", 2)
    assert convoscope_here("ingest", "chat.jsonl", db=db, cwd=tmp_path).returncode == 0
    assert "reward: not scored yet (run `convoscope score`)" in report(later["run_id"])


def test_an_empty_answer_is_a_failure_the_summary_names(tmp_path: Path) -> None:
    """The endpoint's empty answer read as "MalformedResponse: the completion's first choice
    has no text", after every retry: an endpoint fault, where the model had said nothing."""
    db = f"duckdb:///{tmp_path / 'replay.duckdb'}"
    write_openai_jsonl(tmp_path / "chat.jsonl", 4)
    assert convoscope_here("ingest", "chat.jsonl", db=db, cwd=tmp_path).returncode == 0

    def silent_on_sums(messages: list[dict[str, object]]) -> str:
        return "" if messages[-1]["content"] == "What is 1 + 1?" else answer_for(messages)

    with OpenAIServer(responder=silent_on_sums) as server:
        args = ("--model", "m", "--base-url", server.base_url, "--filter", "model=expert-1")
        result = convoscope_here("replay", *args, db=db, cwd=tmp_path)
        assert server.requests["What is 1 + 1?"] == 1
    assert result.returncode == 0, result.stderr
    assert "1 done, 1 failed" in result.stdout
    said = "failures: empty answer: the endpoint answered with no text (finish_reason 'stop')"
    assert said in result.stdout and "Malformed" not in result.stdout


def test_a_run_records_what_it_replayed_and_the_report_says_it(tmp_path: Path) -> None:
    """A run stored its exchange ids only: `replay report` (and the UI) could not say which
    cluster, tag or filter it replayed. The selection is stored with the run, cluster names
    as they were then (a rename later does not rewrite history), and a run stored before
    this says so rather than failing."""
    import sqlalchemy as sa

    from storage.clusters import add_tag, annotate_cluster
    from storage.engine import open_database
    from storage.schema import replay_runs

    db = _clustered(tmp_path)
    engine = open_database(db)
    annotate_cluster(engine, "t0", name="Sums <b>bold</b>")
    add_tag(engine, "cluster", "t1", "billing")
    engine.dispose()
    runs: dict[str, dict] = {}
    with OpenAIServer() as server:
        endpoint = ("--model", "m2", "--base-url", server.base_url, "--json")
        for name, selection in (
            ("cluster", ("--cluster", "t0", "--filter", "model=expert-1")),
            ("tag", ("--tag", "billing", "--sample", "2")),
            ("filter", ("--filter", "model=expert-2")),
        ):
            result = convoscope_here("replay", *endpoint, *selection, db=db, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            runs[name] = json.loads(result.stdout)
    engine = open_database(db)
    annotate_cluster(engine, "t0", name="Renamed since")
    engine.dispose()

    def report(run: dict, *flags: str) -> subprocess.CompletedProcess[str]:
        done = convoscope_here("replay", "report", run["run_id"], *flags, db=db, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done

    # The run's own summary says what it replayed, as its report does.
    assert runs["cluster"]["selection"]["clusters"] == [{"id": "t0", "label": "Sums <b>bold</b>"}]
    with OpenAIServer() as server:
        again = ("replay", "--model", "m2", "--base-url", server.base_url, "--tag", "billing")
        said = convoscope_here(*again, db=db, cwd=tmp_path).stdout
    assert said.startswith("replay ") and " (m2, tag billing (“" in said, said

    chosen = json.loads(report(runs["cluster"], "--json").stdout)["selection"]
    assert chosen["clusters"] == [{"id": "t0", "label": "Sums <b>bold</b>"}]
    assert (chosen["tag"], chosen["on"], chosen["filters"]) == (
        None,
        "prompt",
        {"model": ["expert-1"]},
    )
    assert chosen["inputs"] == runs["cluster"]["items"] and chosen["clustering_run"]
    said = report(runs["cluster"]).stdout
    assert "replayed: cluster t0 “Sums <b>bold</b>” · prompt clustering · model=expert-1 · " in said

    tagged = json.loads(report(runs["tag"], "--json").stdout)["selection"]
    assert tagged["tag"] == "billing" and [c["id"] for c in tagged["clusters"]] == ["t1"]
    assert (tagged["sample"], tagged["inputs"]) == (2, 2)
    assert "replayed: tag billing (t1 “" in report(runs["tag"]).stdout

    filtered = json.loads(report(runs["filter"], "--json").stdout)["selection"]
    assert filtered["clusters"] == [] and filtered["filters"] == {"model": ["expert-2"]}
    inputs = runs["filter"]["items"]
    assert f"replayed: model=expert-2 · {inputs} inputs\n" in report(runs["filter"]).stdout

    # A run stored before runs recorded their selection.
    engine = open_database(db)
    with engine.begin() as conn:
        conn.execute(
            sa.update(replay_runs)
            .where(replay_runs.c.id == runs["filter"]["run_id"])
            .values(params=json.dumps({"sample": None, "seed": 0}))
        )
    engine.dispose()
    assert json.loads(report(runs["filter"], "--json").stdout)["selection"] is None
    assert "replayed: selection not recorded" in report(runs["filter"]).stdout
