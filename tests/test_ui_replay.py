"""The Replay page through Streamlit's AppTest: a real DuckDB file built by tests/ui_database.py
and a real OpenAI-compatible server on 127.0.0.1 that the page's replay talks to over HTTP."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from streamlit.testing.v1 import AppTest

from storage.clusters import exchanges_in_clusters
from storage.engine import open_database
from storage.replay import list_runs
from storage.reports import load_instructions
from storage.schema import assignments, cluster_reports, cluster_runs, clusters
from tests.openai_server import Fault, OpenAIServer, answer_for
from tests.ui_database import XSS_PROMPT, XSS_PROMPT_SHOWN, BuiltDatabase, build, shown

APP = str(Path(__file__).resolve().parents[1] / "app" / "ui" / "app.py")
PAGE = "screens/replay.py"
INSTRUCTION = "Answer refund questions with the policy link first. <b>Be brief</b>."
KEY_ENV = "CONVOSCOPE_TEST_REPLAY_KEY"
SECRET = "sk-test-secret-never-shown"


@pytest.fixture
def built(tmp_path: Path) -> BuiltDatabase:
    return build(f"duckdb:///{tmp_path / 'replay.duckdb'}", n_exchanges=120, seed=5)


def _run_from_page(at: AppTest, base_url: str, *, sample: int) -> None:
    """Replay `sample` inputs to "test-model" at `base_url` with the page's form."""
    at.text_input(key="replay_model").input("test-model")
    at.text_input(key="replay_base_url").input(base_url)
    at.number_input(key="replay_sample").set_value(sample)
    at.button(key="replay_run").click().run()


def _page(url: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CONVOSCOPE_DB", url)
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page(PAGE)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


def _markdown_texts(at: AppTest) -> list[str]:
    """Every string the page hands to a Markdown renderer."""
    texts = [e.value for e in (*at.markdown, *at.title, *at.caption, *at.subheader)]
    texts += [e.label for e in at.expander]
    texts += [e.proto.body for e in (*at.warning, *at.info, *at.error, *at.success)]
    return texts


def _everything(at: AppTest) -> str:
    widgets: list[Any] = [*at.text_input, *at.text_area]
    return "\n".join([*_texts(at), *_markdown_texts(at), *(str(w.value) for w in widgets)])


def test_replay_runs_the_edited_instruction_and_shows_answers_side_by_side(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    engine = open_database(built.url, read_only=True)
    members = exchanges_in_clusters(engine, built.run_id, cluster_id=built.weakest_id)
    engine.dispose()
    at = _page(built.url, monkeypatch)
    assert any("No replay runs yet" in body for body in (i.proto.body for i in at.info))

    with OpenAIServer() as server:
        at.selectbox(key="replay_cluster").select(built.weakest_id).run()
        at.text_area(key=f"replay_instruction_{built.weakest_id}").input(INSTRUCTION)
        at.text_input(key="replay_model").input("test-model")
        at.text_input(key="replay_base_url").input(server.base_url)
        at.text_input(key="replay_key_env").input(KEY_ENV)
        at.number_input(key="replay_sample").set_value(len(members))
        at.button(key="replay_run").click().run()
        received = list(server.received)
    assert not at.exception, [e.value for e in at.exception]
    assert at.get("progress")[-1].proto.value == 100  # progress was drawn to the end

    # The server got every input of the cluster once, each with the instruction as system.
    assert len(received) == len(members)
    for request in received:
        messages = request["body"]["messages"]
        assert messages[0] == {"role": "system", "content": INSTRUCTION}
        assert [m["role"] for m in messages].count("system") == 1
        assert request["body"]["model"] == "test-model"
        assert request["authorization"] == f"Bearer {SECRET}"

    # Side by side: the script-tag prompt as plain text, its original and new answer beside it.
    texts = _texts(at)
    assert XSS_PROMPT_SHOWN in texts  # its bidi override spelled out, not obeyed
    new_answer = shown(
        answer_for(
            [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": XSS_PROMPT}]
        )
    )
    assert new_answer in texts
    assert any("not bold" in t and "<b>" in t for t in texts)  # an original answer, unrendered
    injected = [t for t in _markdown_texts(at) if "script" in t or "onerror" in t]
    assert injected  # the prompt's expander label and the cluster's name
    for text in injected:
        unescaped = re.search(r"(?<!\\)[<>\[\]$`*]", text)
        assert unescaped is None, f"unescaped markup {unescaped.group()!r} in {text!r}"
    assert SECRET not in _everything(at)
    # The version the run just saved is listed at once, not after a reload.
    versions_note = "No saved instruction for this cluster yet"
    assert not [t for t in _markdown_texts(at) if t.startswith(versions_note)]
    assert [e.label for e in at.expander if e.label.startswith("Version 1 · ")]

    engine = open_database(built.url, read_only=True)
    runs = list_runs(engine)
    versions = load_instructions(engine, built.weakest_id)
    engine.dispose()
    assert len(runs) == 1 and runs[0]["counts"]["done"] == len(members)
    assert [(v["version"], v["text"], v["replay_run_id"]) for v in versions] == [
        (1, INSTRUCTION, runs[0]["id"])
    ]
    assert SECRET not in str(runs[0])

    # A later visit: the latest version prefills the editor and the run opens side by side.
    at = _page(built.url, monkeypatch)
    at.selectbox(key="replay_cluster").select(built.weakest_id).run()
    assert at.text_area(key=f"replay_instruction_{built.weakest_id}").value == INSTRUCTION
    assert at.selectbox(key="replay_open").value == runs[0]["id"]
    assert XSS_PROMPT_SHOWN in _texts(at) and new_answer in _texts(at)
    assert INSTRUCTION in _texts(at)  # the version list and the run's instruction, as text


def test_a_topic_named_like_its_group_replays_the_topic_with_its_instruction(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group is often named like its weakest topic. The picker then listed both under one
    label, a pick of the topic opened the group, and the instruction typed for the topic was
    dropped: the replay went out without it, to the group's inputs."""
    from storage.clusters import annotate_cluster

    engine = open_database(built.url)
    with engine.connect() as conn:
        group = conn.execute(
            sa.select(clusters.c.parent_id).where(clusters.c.id == built.weakest_id)
        ).scalar_one()
    annotate_cluster(engine, group, name="Refunds")
    annotate_cluster(engine, built.weakest_id, name="Refunds")
    members = exchanges_in_clusters(engine, built.run_id, cluster_id=built.weakest_id)
    engine.dispose()

    at = _page(built.url, monkeypatch)
    at.selectbox(key="replay_cluster").select(built.weakest_id).run()
    assert at.selectbox(key="replay_cluster").value == built.weakest_id
    with OpenAIServer() as server:
        at.text_area(key=f"replay_instruction_{built.weakest_id}").input(INSTRUCTION)
        _run_from_page(at, server.base_url, sample=len(members))
        received = list(server.received)
    assert not at.exception, [e.value for e in at.exception]
    assert len(received) == len(members)
    assert all(r["body"]["messages"][0]["content"] == INSTRUCTION for r in received)
    engine = open_database(built.url, read_only=True)
    assert [v["text"] for v in load_instructions(engine, built.weakest_id)] == [INSTRUCTION]
    engine.dispose()


def test_two_runs_alike_each_open_on_their_own(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one model started in the same minute had the same label in "Open a run",
    and picking the older one showed the newer one's answers."""
    at = _page(built.url, monkeypatch)
    with OpenAIServer() as server:
        _run_from_page(at, server.base_url, sample=2)
        _run_from_page(at, server.base_url, sample=2)
    engine = open_database(built.url, read_only=True)
    newer, older = (run["id"] for run in list_runs(engine))
    engine.dispose()
    for run_id in (older, newer):
        at.selectbox(key="replay_open").select(run_id).run()
        assert at.selectbox(key="replay_open").value == run_id


def test_replay_page_empty_states(built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = open_database(built.url)
    with engine.begin() as conn:
        for table in (cluster_reports, assignments, clusters, cluster_runs):
            conn.execute(sa.delete(table))
    engine.dispose()
    at = _page(built.url, monkeypatch)
    hints = [i.proto.body for i in at.info]
    assert any("convoscope cluster" in h for h in hints), hints
    assert not at.button


def test_replay_page_on_an_empty_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _page(f"duckdb:///{tmp_path / 'empty.duckdb'}", monkeypatch)
    hints = [i.proto.body for i in at.info]
    assert any("convoscope ingest" in h for h in hints), hints


def test_a_refused_replay_says_why_without_the_key(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 is not retried: every input fails, and the page lists the endpoint's reason."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    at = _page(built.url, monkeypatch)
    with OpenAIServer(faults=[Fault(status=401, echo_auth=True)]) as server:
        at.text_input(key="replay_model").input("test-model")
        at.text_input(key="replay_base_url").input(server.base_url)
        at.text_input(key="replay_key_env").input(KEY_ENV)
        at.number_input(key="replay_sample").set_value(3)
        at.button(key="replay_run").click().run()
        assert server.total_requests() == 3
    assert not at.exception, [e.value for e in at.exception]
    failed = next(e for e in at.expander if "failed inputs" in e.label)
    assert failed.label.startswith("3 ")
    assert len([t for t in _texts(at) if "401" in t]) == 3
    assert SECRET not in _everything(at)


def test_judge_from_the_replay_page(built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_replay_judge import prefers_original, prefers_replayed

    at = _page(built.url, monkeypatch)
    with OpenAIServer() as server:
        _run_from_page(at, server.base_url, sample=5)
    with OpenAIServer(responder=prefers_replayed) as judge:
        at.text_input(key="judge_model").input("judge-model")
        at.text_input(key="judge_base_url").input(judge.base_url)
        at.button(key="judge_run").click().run()
        assert judge.total_requests() == 5
    assert not at.exception, [e.value for e in at.exception]
    assert any("5 judged" in s.proto.body for s in at.success)
    with OpenAIServer(responder=prefers_original) as judge:  # a second judge, reported apart
        at.text_input(key="judge_model").input("other*judge")
        at.text_input(key="judge_base_url").input(judge.base_url)
        at.button(key="judge_run").click().run()
    at = _page(built.url, monkeypatch)
    verdicts = {m.label: m.value for m in at.metric if m.label.startswith("LLM judge")}
    assert verdicts == {
        "LLM judge judge\\-model: new answer wins": "100.0 %",
        "LLM judge other\\*judge: new answer wins": "0.0 %",
    }
    captions = [c.value for c in at.caption]
    shown = ("Judge judge\\-model: the new answer", "Judge other\\*judge: the original")
    assert sum(all(s in c for s in shown) for c in captions) == 5, captions  # both, each pair


def test_verdicts_judged_from_the_cli_show_on_each_pair(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`convoscope replay judge` in another process stores battles only, which the database
    version the pages cache under did not count: the page's metric showed the judge's win
    rate while every pair below it still read as unjudged, until something else changed."""
    from scoring.judge import JudgeConfig, judge_replay
    from tests.test_replay_judge import prefers_replayed

    at = _page(built.url, monkeypatch)
    with OpenAIServer() as server:
        _run_from_page(at, server.base_url, sample=5)
    run_id = at.selectbox(key="replay_open").value
    time.sleep(1.2)  # the version is re-read at most once a second
    at.run()  # the pairs as the page shows them after the run, before any verdict
    assert not [c for c in at.caption if c.value.startswith("Judge ")]
    engine = open_database(built.url)
    with OpenAIServer(responder=prefers_replayed) as judge:  # as `replay judge` would
        config = JudgeConfig(model="cli-judge", base_url=judge.base_url, progress=False)
        assert judge_replay(engine, run_id, config=config).judged == 5
    engine.dispose()
    time.sleep(1.2)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    verdicts = {m.label: m.value for m in at.metric if m.label.startswith("LLM judge")}
    assert verdicts == {"LLM judge cli\\-judge: new answer wins": "100.0 %"}
    captions = [c.value for c in at.caption if c.value.startswith("Judge cli\\-judge:")]
    assert captions == ["Judge cli\\-judge: the new answer"] * 5

    # Judges held by other processes, one alive and one killed (its lease lapsed): the
    # page said nothing of either, so partial verdicts read as a finished judgement.
    from storage.replay import Lease, claim_judge_run

    engine = open_database(built.url)
    for judge, seconds in (("busy*judge", 60.0), ("killed-judge", 0.01)):
        assert claim_judge_run(engine, Lease(run_id, judge[:4], seconds, judge=judge)) is None
    engine.dispose()
    time.sleep(1.2)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    said = [c.value for c in at.caption if c.value.startswith("LLM judge")]
    assert said == [
        "LLM judge busy\\*judge: at work in another process: its verdicts show here as they "
        "are stored (if that process is dead, Judge with this model offers to take it over)",
        "LLM judge killed\\-judge: stopped before judging every pair; judge again with this "
        "model to finish",
    ]


def test_the_retry_command_for_failed_inputs_runs_on_the_pages_database(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The page said "Retry them with `convoscope replay --resume RUN`": without `--db` that
    resumes in ./convoscope.duckdb (or $CONVOSCOPE_DB), where there is no such run, whenever
    the UI was opened on another database. The command shown is now the one to run as is."""
    import shlex

    from app.cli import main

    at = _page(built.url, monkeypatch)
    with OpenAIServer(faults=[Fault(status=401, times=3)]) as server:
        _run_from_page(at, server.base_url, sample=3)
        assert not at.exception, [e.value for e in at.exception]
        (command,) = [c.value for c in at.code if "--resume" in c.value]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)  # a shell in another folder
        monkeypatch.delenv("CONVOSCOPE_DB")
        words = shlex.split(command)
        assert words[0] == "convoscope"
        assert main(words[1:]) == 0
        assert server.total_answered() == 3
    assert not (elsewhere / "convoscope.duckdb").exists()
    engine = open_database(built.url, read_only=True)
    (run,) = list_runs(engine)
    engine.dispose()
    assert run["status"] == "done" and run["counts"]["done"] == 3


def test_failure_reasons_follow_a_resume_that_fails_as_many_again(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reasons were cached by run and failure count: a resume from a shell that failed the
    same inputs again, for another reason, left the first reasons on the page."""
    import time

    from app.cli import main

    at = _page(built.url, monkeypatch)
    with OpenAIServer(faults=[Fault(status=401, times=3)]) as server:
        _run_from_page(at, server.base_url, sample=3)
    reasons = [t.value for t in at.text]
    assert sum("401" in r for r in reasons) == 3, reasons
    (command,) = [c.value for c in at.code if "--resume" in c.value]
    run_id = command.split("--resume ")[1].split()[0]
    with OpenAIServer(faults=[Fault(status=403, times=3)]) as server:
        resume = ["--db", built.url, "replay", "--resume", run_id, "--base-url", server.base_url]
        assert main(resume) == 2  # none answered, again
    time.sleep(1.1)  # the page reads runs at most once a second
    at.run()
    reasons = [t.value for t in at.text]
    assert sum("403" in r for r in reasons) == 3 and not any("401" in r for r in reasons)


def test_empty_answers_are_listed_as_failures_named_so(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint answering "" was retried as a malformed body and listed as
    "MalformedResponse": the page now lists each input it answered with nothing as an empty
    answer, and shows no empty new answer beside an original."""
    at = _page(built.url, monkeypatch)
    with OpenAIServer(responder=lambda _messages: "") as server:
        _run_from_page(at, server.base_url, sample=3)
        assert server.total_requests() == 3  # not retried
    assert not at.exception, [e.value for e in at.exception]
    failed = next(e for e in at.expander if "failed inputs" in e.label)
    assert failed.label.startswith("3 ")
    reasons = [t for t in _texts(at) if "empty answer: the endpoint answered with no text" in t]
    assert len(reasons) == 3 and not any("Malformed" in t for t in _texts(at))
    assert "This run has no answered input yet." in [c.value for c in at.caption]


def test_each_run_says_what_it_replayed(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs were told apart by model and time only: which topic each replayed was nowhere on
    the page. The picker and the opened run name it (escaped: topic names come from the
    logs); a run stored before runs recorded it says so, and the page still draws."""
    from storage.schema import replay_runs
    from storage.views import cluster_names

    engine = open_database(built.url, read_only=True)
    name = cluster_names(engine, built.run_id)[built.weakest_id]
    engine.dispose()
    at = _page(built.url, monkeypatch)
    at.selectbox(key="replay_cluster").select(built.weakest_id).run()
    with OpenAIServer() as server:
        _run_from_page(at, server.base_url, sample=2)
        _run_from_page(at, server.base_url, sample=3)
    assert not at.exception, [e.value for e in at.exception]
    engine = open_database(built.url)
    newer, older = (run["id"] for run in list_runs(engine))
    with engine.begin() as conn:  # as a run stored before this change
        conn.execute(
            sa.update(replay_runs).where(replay_runs.c.id == older).values(params='{"seed": 0}')
        )
    engine.dispose()
    time.sleep(1.2)  # the runs are re-read at most once a second
    at.run()
    assert not at.exception, [e.value for e in at.exception]

    picker = at.selectbox(key="replay_open")
    labels = dict(zip([newer, older], picker.options, strict=True))
    assert labels[newer].startswith(f"{labels[newer][:16]} · test-model · cluster “")
    assert labels[newer].endswith(" · 3/3 answered · done")
    assert built.weakest_id not in labels[newer]  # a hash: the name says more in the space
    assert "cluster" not in labels[older]
    facts = next(c.value for c in at.caption if "endpoint" in c.value)
    assert facts.startswith(f"replayed cluster {built.weakest_id} “")
    assert "” · prompt clustering · 3 inputs \\(sample of at most 3\\) · model " in facts
    assert "<img" in name and "\\<img src\\=x onerror" in facts
    assert re.search(r"(?<!\\)[<>\[\]$`*]", facts) is None  # no markup left unescaped
    at.selectbox(key="replay_open").select(older).run()
    assert not at.exception, [e.value for e in at.exception]
    facts = next(c.value for c in at.caption if "endpoint" in c.value)
    assert facts.startswith("selection not recorded · model ")


def test_a_judge_held_by_a_dead_process_is_taken_over_only_when_confirmed(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's only way past a judging held by a killed process was the CLI's
    `replay judge RUN --model J --take-over`. Judge now says who holds it and offers a
    take-over that sends nothing until the user confirms that process is dead; a lapsed
    lease needs no take-over; nothing is offered where nothing is held."""
    from storage.replay import Lease, claim_judge_run, get_judge_run
    from tests.test_replay_judge import prefers_replayed

    at = _page(built.url, monkeypatch)
    with OpenAIServer() as server:
        _run_from_page(at, server.base_url, sample=5)
    run_id = at.selectbox(key="replay_open").value
    engine = open_database(built.url)
    dead = Lease(run_id, "killed-owner", 60.0, judge="judge-model")  # not lapsed for a minute
    assert claim_judge_run(engine, dead) is None
    engine.dispose()

    with OpenAIServer(responder=prefers_replayed) as judge:
        at.text_input(key="judge_model").input("judge-model")
        at.text_input(key="judge_base_url").input(judge.base_url)
        at.button(key="judge_run").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert judge.total_requests() == 0  # refused, not sent
        warning = next(w.proto.body for w in at.warning if "Another process" in w.proto.body)
        assert "judge\\-model since " in warning and "take it over now" in warning
        assert not [e for e in at.error if "--take-over" in e.proto.body]  # not the CLI's way
        assert at.button(key="judge_take_over").disabled  # not before the user confirms

        at.checkbox(key="judge_take_over_sure").check().run()
        assert judge.total_requests() == 0 and not at.button(key="judge_take_over").disabled
        at.button(key="judge_take_over").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert judge.total_requests() == 5
    assert any("5 judged" in s.proto.body for s in at.success)
    assert not [b for b in at.button if b.key == "judge_take_over"]  # nothing held now
    engine = open_database(built.url, read_only=True)
    taken = get_judge_run(engine, run_id, "judge-model")
    engine.dispose()
    assert (taken["status"], taken["owner"]) == ("done", None)

    # A killed judge whose lease lapsed: Judge takes it, with no take-over to confirm.
    engine = open_database(built.url)
    assert claim_judge_run(engine, Lease(run_id, "gone", 0.01, judge="other-judge")) is None
    engine.dispose()
    time.sleep(0.05)
    with OpenAIServer(responder=prefers_replayed) as judge:
        at.text_input(key="judge_model").input("other-judge")
        at.text_input(key="judge_base_url").input(judge.base_url)
        at.button(key="judge_run").click().run()
        assert judge.total_requests() == 5
    assert not at.exception, [e.value for e in at.exception]
    assert not [b for b in at.button if b.key == "judge_take_over"]


def test_a_run_is_compared_with_another_run_on_the_inputs_both_answered(
    built: BuiltDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page set a run's answers against the logged originals only: a second instruction
    or another model could not be read against the last try, as `replay report RUN
    --against OTHER` reads it. The opened run can now be compared with another run that
    replayed some of its inputs: the reward difference with its CI, wins and per-cluster
    figures, and the inputs one run alone answered."""
    from ingest.replay import pairs
    from storage.scores import store_scores
    from storage.views import cluster_names
    from tests.ui_database import SCORER

    engine = open_database(built.url, read_only=True)
    members = exchanges_in_clusters(engine, built.run_id, cluster_id=built.weakest_id)
    name = cluster_names(engine, built.run_id)[built.weakest_id]
    engine.dispose()
    other_cluster = next(cid for cid in built.cluster_ids if cid != built.weakest_id)
    at = _page(built.url, monkeypatch)
    at.selectbox(key="replay_cluster").select(built.weakest_id).run()
    # The first run fails the script-tag prompt (a 401 is not retried): only the second
    # answers it. A third run replays another topic: it shares no input with them.
    with OpenAIServer(faults=[Fault(status=401, prompt="<script>", times=1)]) as server:
        at.text_input(key="replay_model").input("old*model")
        at.text_input(key="replay_base_url").input(server.base_url)
        at.number_input(key="replay_sample").set_value(len(members))
        at.button(key="replay_run").click().run()
    with OpenAIServer() as server:
        _run_from_page(at, server.base_url, sample=len(members))
        at.selectbox(key="replay_cluster").select(other_cluster).run()
        _run_from_page(at, server.base_url, sample=2)
    assert not at.exception, [e.value for e in at.exception]
    engine = open_database(built.url)
    elsewhere, second, first = (run["id"] for run in list_runs(engine))
    rewards: dict[str, float] = {}
    for run_id, reward in ((first, 0.75), (second, 0.25)):  # as `convoscope score` stores them
        rewards |= {pair["new_id"]: reward for pair in pairs(engine, run_id)}
    store_scores(engine, SCORER, rewards)
    engine.dispose()
    time.sleep(1.2)  # the runs and the version are re-read at most once a second

    at.selectbox(key="replay_open").select(second).run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.selectbox(key="replay_against")
    assert picker.value == ""  # none until picked: the page reads as before
    labels = at.selectbox(key="replay_open").options
    opened = dict(zip((elsewhere, second, first), labels, strict=True))
    assert picker.options == ["None", opened[first]]  # labelled alike; not the other topic's
    assert not [c for c in at.caption if c.value.startswith("Against run")]

    picker.select(first).run()
    assert not at.exception, [e.value for e in at.exception]
    n = len(members) - 1
    said = next(c.value for c in at.caption if c.value.startswith("Against run"))
    assert said == (
        f"Against run `{first}` (old\\*model): {n:,} inputs both answered "
        "(1 answered by this run alone: left out)"
    )
    figures = {m.label: m.value for m in at.metric}
    assert figures["That run's reward"] == "0.75" and figures["This run's reward"] == "0.25"
    assert figures["Win rate of this run"] == "0.0 %" and figures["Paired inputs"] == str(n)
    assert any(
        c.value == f"Reward difference (this run − that run) -0.50, 95 % CI -0.50 to -0.50; "
        f"this run wins 0, ties 0 and loses {n} of {n}."
        for c in at.caption
    )
    table = next(d.value for d in at.dataframe if "Difference 95 % CI" in d.value.columns)
    assert len(table) == 1 and table.iloc[0]["Pairs"] == n and "<img" in table.iloc[0]["Cluster"]
    assert table.iloc[0]["Cluster"] == name and table.iloc[0]["Difference"] == -0.5
    alone = next(e for e in at.expander if "alone" in e.label)
    assert alone.label == "1 input answered by this run alone (left out)"
    assert [t.value for t in alone.text] == [XSS_PROMPT_SHOWN]  # as text, never as markup

    # Another run opened: the comparison is dropped, not carried to a run it cannot pair.
    at.selectbox(key="replay_open").select(elsewhere).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not [s for s in at.selectbox if s.key == "replay_against"]
    assert not [c for c in at.caption if c.value.startswith("Against run")]
