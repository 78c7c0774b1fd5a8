"""Each command's result said in a sentence or a few lines, for output without `--json`."""

from __future__ import annotations

from typing import Any

from app.commands.common import WARN_AT_MOST, count
from app.export import BATTLES
from ingest.readers import spelled_time_keys

# Periods `trend` prints: rows of its totals, columns of its topics (--json carries all).
TREND_ROWS, TREND_COLUMNS = 36, 6


def describe(command: str, result: dict[str, Any]) -> str:
    """A short human summary of a command's result (the JSON has everything)."""
    if command == "ingest":
        return _describe_ingest(result)
    if command == "export" and not result["rows"]:
        return f"no rows exported to {result['path']}"
    if command == "export" and result["format"] == BATTLES:
        line = f"wrote {result['rows']} battles to {result['path']} (battles JSONL)"
        if result["not_round_trip"]:
            line += f"; {result['not_round_trip']} will not ingest back under their own ids"
        return line
    if command == "export":
        return (
            f"wrote {result['rows']} rows to {result['path']} ({result['format']}; "
            f"{_clustering(result['clustering'])})"
        )
    if command == "cluster":
        return (
            f"{result['rows']} exchanges → {count(result['clusters'], 'topic')} in "
            f"{count(result['parents'], 'group')}, {result['unassigned_share']:.1%} unassigned "
            f"(run {result['run_id']}); "
            "ids: " + ", ".join(f"{n} {event}" for event, n in result["events"].items())
        )
    if command == "clusters":
        return _describe_clusters(result)
    if command == "trend":
        return _describe_trend(result)
    if command == "embed" and "already_stored" in result:  # vectors imported from a file
        return (
            f"imported {result['stored']} {result['model']} vectors ({result['dim']} numbers "
            f"each), {result['already_stored']} already stored, {result['rejected']} rejected; "
            f"cluster with `--model {result['model']}`"
        )
    if command == "embed":
        return (
            f"{result['exchanges']} exchanges ({result['texts']} distinct {result['on']} texts): "
            f"embedded {result['embedded']} with {result['model']}, {result['cached']} cached"
        )
    if command == "replay" and "judged" in result:
        return _describe_judge(result)
    if command == "replay" and "pairs" in result:
        return _describe_replay_report(result)
    if command == "replay" and "status" in result:
        from ingest.replay import selection_text  # imported with the run it describes

        line = (
            f"replay {result['run_id']} ({result['model']}, "
            f"{selection_text(result.get('selection'), short=True)}): {result['done']} done, "
            f"{result['failed']} failed in {result['seconds']:.1f}s — status {result['status']}"
        )
        if result["pending"]:
            line += (
                f"; {count(result['pending'], 'input')} still unanswered: "
                f"`{result['resume_command']}` sends them again"
            )
        if result.get("errors"):
            line += f"\nfailures: {'; '.join(result['errors'])}"
        return line
    if command in ("demo", "run"):
        counts = result["stored_in_db"]
        lines = [
            _describe_ingest({"db": result["db"], **result["ingest"]})
            if "ingest" in result
            else f"nothing to ingest; working on {result['db']}",
            describe("embed", result["embed"]),
            describe("cluster", result["cluster"]),
        ]
        if "score" in result:
            lines.append(describe("score", result["score"]))
        lines.append(
            f"database now holds {counts['conversations']} conversations, "
            f"{counts['exchanges']} exchanges, {counts['battles']} battles"
        )
        return "\n".join(lines)
    if command == "score" and "scorer" in result:
        return (
            f"scored {result['exchanges']} exchanges with stored {result['kind']} "
            f"{result['reward_model']} (mean reward {result['mean_reward']:.3f}); "
            + _report_counts(result)
        )
    if command == "score":
        metrics = _reward_figures(result["reward_metrics"])
        reports = f"; {_report_counts(result)}" if "clusters" in result else ""
        if result.get("no_clustering"):
            reports += f" ({result['no_clustering']}, then `score` again)"
        return (
            f"scored {result['exchanges']} exchanges with reward model {result['reward_model']}"
            f" ({result['mode']}; {metrics or 'no held-out labels'}){reports}"
        )
    if command == "reward":
        return _describe_rewards(result)
    if command == "route" and "routes" in result:
        return "\n".join(
            (f"line {r['line']}: " if "line" in r else "")  # `--file`: which line, as rejects
            + f"route to {r['recommended']}; predicted chance to beat the average expert: "
            + ", ".join(f"{e['model']} {e['win_probability']:.2f}" for e in r["experts"][:5])
            + (f" (+{len(r['experts']) - 5} more)" if len(r["experts"]) > 5 else "")
            for r in result["routes"]
        )
    if command == "ui":
        return f"UI stopped (exit code {result['exit_code']})"
    if command == "route":
        skipped = result["instructions_left_out"]
        return (
            f"routing table written to {result['path']} ({result['clusters']} clusters, "
            f"{result['instructions']} with an instruction that beat the original answers; "
            f"instruction versions left out: {skipped['not_scored']} never scored (run "
            "`convoscope score`, then `convoscope replay report RUN`), "
            f"{skipped['not_better_than_original']} no better than the original answers, "
            f"{skipped['cluster_not_in_table']} of clusters the table does not route to)"
            + (
                f"; its fast encoder copied to {result['encoder_folder']}"
                if result.get("encoder_folder")
                else ""
            )
        )
    if command == "rename":
        if result["name"] is None:
            return (
                f"cluster {result['cluster_id']} has its automatic name again "
                f"({result['auto_name']!r})"
            )
        return f"cluster {result['cluster_id']} renamed to {result['name']!r}"
    if command == "tag":
        if result["removed"]:
            return f"tag {result['tag']!r} removed from cluster {result['cluster_id']}"
        if result["already_tagged"]:
            return f"cluster {result['cluster_id']} was already tagged {result['tag']!r}"
        return f"cluster {result['cluster_id']} tagged {result['tag']!r}"
    if command == "prune":
        return _describe_prune(result)
    if command == "status":
        return _describe_status(result)
    if command == "assign":
        return (
            f"{result['assigned']} new exchanges assigned to the clusters of run "
            f"{result['run_id']}, {result['unassigned']} left unassigned"
        )
    return str(result)


_FEW_LABELS = 100  # held-out labels (or battles) below which a figure is mostly noise


# A held-out figure → the count it was measured on, and what that count counts.
_MEASURED_ON = {
    "engagement_auc": ("held_out_labels", "held-out labels"),  # an AUC of 0.35 on 20 is noise
    "battle_pairwise_accuracy": ("held_out_battles", "held-out battles"),  # 1.000 on 13: luck
}


def _reward_figures(metrics: dict[str, Any]) -> str:
    """The reward model's held-out figures, each followed by its own caveat when it was
    measured on too few rows (a caveat at the end of the line read as the last figure's)."""
    figures = []
    for name, value in metrics.items():
        if not isinstance(value, float):
            continue
        figure = f"{name} {value:.3f}"
        count, what = _MEASURED_ON.get(name, ("", ""))
        if metrics.get(count) is not None and metrics[count] < _FEW_LABELS:
            figure += f" on only {metrics[count]} {what}: too few to trust"
        figures.append(figure)
    return "; ".join(figures)


def _report_counts(result: dict[str, Any]) -> str:
    """'30 topic reports and 5 group reports' (the groups only where there are some)."""
    topics = count(result["clusters"], "topic report")
    groups = result.get("groups", 0)
    return f"{topics} and {count(groups, 'group report')}" if groups else topics


def _describe_prune(result: dict[str, Any]) -> str:
    """What went (or would go), one line per artefact and clustering up to WARN_AT_MOST, then
    the totals and what the file's size did."""
    removed, runs = result["removed"], result["removed_runs"]
    verb = "would remove" if result["dry_run"] else "removed"
    lines = [_pruned_artefact(a) for a in removed] + [_pruned_run(r) for r in runs]
    if len(lines) > WARN_AT_MOST:
        lines[WARN_AT_MOST:] = [f"(+{len(lines) - WARN_AT_MOST} more; --json lists each)"]
    lines.append(
        f"{verb} {count(len(removed), 'stored artefact')} ({_bytes(result['bytes'])}) and "
        f"{count(result['score_rows'], 'score row')}; kept {len(result['kept'])} (the newest "
        f"{result['keep']} of each kind and what the latest scores and reports use)"
    )
    if runs or result["kept_runs"]:
        lines.append(
            f"{verb} {count(len(runs), 'superseded clustering')} with "
            f"{count(result['run_rows'], 'assignment row')}; kept {len(result['kept_runs'])} "
            f"(the newest {result['keep']} of each field clustered; names, notes and tags "
            "stay with their cluster ids)"
        )
    before, after = result["file_bytes_before"], result["file_bytes_after"]
    if not result["dry_run"] and before is not None and (removed or runs):
        lines.append(
            f"database file {_bytes(before)} → {_bytes(after)} ({_bytes(before - after)} freed)"
        )
    return "\n".join(lines)


def _describe_status(result: dict[str, Any]) -> str:
    """One aligned block: a labelled line per part of the database (a part with several
    items goes on over lines of its own), then the commands to run next, each with why."""
    db, logs = result["database"], result["logs"]
    size = "" if db["file_bytes"] is None else f", {_bytes(db['file_bytes'])}"
    latest = logs["latest_ingest"]
    steps = result["next"]
    width = max((len(step["command"]) for step in steps), default=0)
    parts = {
        "database": [f"{db['url']} ({db['backend']}, schema {db['schema_revision']}{size})"],
        "logs": [
            f"{count(logs['conversations'], 'conversation')}, "
            f"{count(logs['exchanges'], 'exchange')}, {count(logs['battles'], 'battle')}, "
            f"{count(logs['models'], 'model')} named",
            f"{count(logs['ingest_runs'], 'ingest')}"
            + (f", the latest {latest:%Y-%m-%d %H:%M}" if latest else ""),
            *_status_times(logs),
        ],
        "embeddings": [f"{n} vectors of {model}" for model, n in result["embeddings"].items()],
        "clustering": [line for run in result["clusterings"] for line in _status_run(run)],
        "reward": _status_reward(result["scoring"]),
        "routing": _status_routing(result["scoring"]),
        "replay": _status_replay(result["replay"]),
        "next": [f"{step['command']:<{width}}  {step['why']}" for step in steps],
    }
    label = max(len(name) for name in parts) + 2
    return "\n".join(
        f"{name if n == 0 else '':<{label}}{line}"
        for name, lines in parts.items()
        for n, line in enumerate(
            lines or ["nothing: the database is up to date" if name == "next" else "none"]
        )
    )


def _status_times(logs: dict[str, Any]) -> list[str]:
    """When the logged exchanges were logged, as far as the logs say (what `trend` follows)."""
    if not logs["exchanges"]:
        return []
    if not logs["dated"]:
        return ["no logged times (`trend` needs them)"]
    return [
        f"logged {logs['first_logged']:%Y-%m-%d} to {logs['last_logged']:%Y-%m-%d} "
        f"({logs['dated']} of {logs['exchanges']} exchanges have a time: `convoscope trend`)"
    ]


def _status_run(run: dict[str, Any]) -> list[str]:
    """One field's latest clustering: the run and its topics, then the exchanges it covers."""
    reports = (
        "reports stale" if run["reports_stale"] else "scored" if run["reports"] else "not scored"
    )
    return [
        f"{run['on']}: run {run['run_id']} of {run['created_at']:%Y-%m-%d %H:%M}, "
        f"{count(run['topics'], 'topic')} in {count(run['groups'], 'group')}",
        f"  {run['placed']} placed, {run['unassigned']} unassigned, "
        f"{run['not_placed']} not yet placed; {reports}",
    ]


def _status_reward(scoring: dict[str, Any]) -> list[str]:
    """The reward model whose scores are read, what it has not scored, and its held-out
    figures; nothing when no exchange is scored."""
    if scoring["reward_scorer"] is None:
        return []
    model, unscored = scoring["reward_model"], f"{scoring['unscored']} exchanges unscored"
    if model is None:  # scores whose model is not stored (written by hand, or pruned)
        return [f"scores {scoring['reward_scorer']}, {unscored}"]
    figures = _reward_figures(model["metrics"]) or "no held-out labels"
    created = f"{model['created_at']:%Y-%m-%d %H:%M}"
    return [f"{model['kind']} {model['id']} of {created}, {unscored}", f"  held out: {figures}"]


def _status_routing(scoring: dict[str, Any]) -> list[str]:
    """The ids `route` and `route --export` read, so a user can tell a re-score happened."""
    stored = {"win predictor": scoring["win_predictor"], "routing table": scoring["routing_table"]}
    return [f"{what} {id_}" for what, id_ in stored.items() if id_]


def _status_replay(replay: dict[str, Any]) -> list[str]:
    """How many replay and judge runs there are, then each one not done."""
    if not replay["runs"]:
        return []
    runs = [f"{count(replay['runs'], 'replay run')}, {count(replay['judge_runs'], 'judge run')}"]
    runs += [
        f"  run {r['run_id']} ({r['model']}): {r['status']}, {r['pending']} pending, "
        f"{r['failed']} failed"
        for r in replay["open"]
    ]
    runs += [
        f"  judge {j['judge']} of run {j['run_id']}: {j['status']}" for j in replay["open_judges"]
    ]
    return runs


def _pruned_artefact(artefact: dict[str, Any]) -> str:
    rows = artefact["score_rows"]
    return (
        f"{artefact['kind']} {artefact['id']} of {artefact['created_at']:%Y-%m-%d %H:%M}: "
        f"{_bytes(artefact['bytes'])}" + (f", {count(rows, 'score row')}" if rows else "")
    )


def _pruned_run(run: dict[str, Any]) -> str:
    return (
        f"clustering {run['id']} on {run['on']} of {run['created_at']:%Y-%m-%d %H:%M}: "
        f"{count(run['clusters'], 'topic')}, {count(run['rows'], 'assignment row')}"
    )


def _bytes(n: int) -> str:
    """A size as people read it: 812 B, 3.4 kB, 98.1 MB (powers of 1000, as `ls -lh --si`)."""
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if abs(size) < 1000:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _describe_rewards(result: dict[str, Any]) -> str:
    """One line per pair, and per battle when they are few; then the agreement with the judge,
    overall and by expert."""
    lines = [f"{s['line']}: {s['reward']:.3f}" for s in result["scores"]]
    battles = result.get("battles", [])
    if len(battles) > WARN_AT_MOST:
        lines.append(f"{len(battles)} battles scored (--json lists each)")
    else:
        lines += [
            f"{b['line']}: a {b['reward_a']:.3f}, b {b['reward_b']:.3f} → {b['preferred']}"
            + (f" (judge: {b['winner']})" if b["winner"] else "")
            for b in battles
        ]
    if "agreement" in result and not result["agreement"]["battles"]:
        ties = result["agreement"]["ties"]
        lines += [
            "",
            f"no battle the judge decided ({count(ties, 'tie')}): no agreement to measure",
        ]
    elif "agreement" in result:
        header = f"{'agreement with the judge':<40} {'battles':>7} {'reward':>7} {'longer':>7}"
        lines += ["", header]
        rows = [("all battles", result["agreement"]), *result["agreement_by_model"].items()]
        lines += [
            f"{name[:40]:<40} {a['battles']:>7} {a['accuracy']:>7.3f} {a['longer_wins']:>7.3f}"
            for name, a in rows
            if a["battles"]
        ]
        lines.append("(ties left out; reward: the higher reward is the winner's; longer: the")
        lines.append("longer answer is)")
    return "\n".join(lines)


def _describe_judge(result: dict[str, Any]) -> str:
    line = (
        f"judge {result['judge']} on replay {result['run_id']}: {result['judged']} judged, "
        f"{result['already_judged']} judged before, {result['failed']} failed"
    )
    if result["errors"]:
        line += f" (first: {result['errors'][0]})"
    if result.get("without_original"):
        line += (
            f"; {count(result['without_original'], 'saved input')} without an original "
            "answer, not judged"
        )
    if result["result"]:
        line += "\n" + _judge_line("overall", result["result"])
    return line


def _judge_line(label: str, r: dict[str, Any]) -> str:
    return (
        f"{label}: the new answer wins {r['win_rate']:.0%} (95% CI {r['ci_low']:.0%}-"
        f"{r['ci_high']:.0%}) of {r['n']} judged pairs ({r['new_wins']} won, {r['ties']} tied, "
        f"{r['original_wins']} lost)"
    )


def _describe_replay_report(result: dict[str, Any]) -> str:
    from ingest.replay import selection_text  # imported with the report it describes

    counts = result["counts"]
    lines = [
        f"replay {result['run_id']} ({result['model']}, {result['status']}): {result['pairs']} "
        f"answered, {counts.get('failed', 0)} failed, {counts.get('pending', 0)} pending",
        f"replayed: {selection_text(result.get('selection'))}",
    ]
    if result["overall"]:
        o = result["overall"]
        lines.append(
            f"reward: original {o['mean_original']:.3f}, new {o['mean_new']:.3f}, difference "
            f"{o['mean_diff']:+.3f} ({_diff_ci(o, ' to ')}); new wins {o['win_rate']:.0%} of "
            f"{o['n']}"
        )
    elif result.get("reward_advice"):
        lines.append(f"reward: {result['reward_advice']}")
    if result.get("without_original"):
        lines.append(
            f"{count(result['without_original'], 'saved input')} without an original answer: "
            "no reward to compare, left out"
        )
    for judge, verdicts in result.get("judges", {}).items():
        if verdicts["overall"]:
            lines.append(_judge_line(f"judge {judge}", verdicts["overall"]))
    for judge, status in result.get("judge_runs", {}).items():
        if status != "done":  # a judge still at work, or one stopped before every verdict
            lines.append(f"judge {judge}: {status}")
    if against := result.get("against"):
        lines += _against_lines(against)
    if result["per_cluster"]:
        lines.append(f"per cluster ({_clustering(result['clustering'])}):")
    for cluster, d in result["per_cluster"].items():
        lines.append(
            f"  {cluster:<8} n={d['n']:<5} reward diff {d['mean_diff']:+.3f} "
            f"({_diff_ci(d, ', ')}) new wins {d['win_rate']:.0%}"
        )
    return "\n".join(lines)


def _against_lines(against: dict[str, Any]) -> list[str]:
    """`replay report RUN --against OTHER`: this run's answers against the other run's."""
    other = f"run {against['against']} ({against['against_model']})"
    left = [
        f"{n} answered by {who} alone"
        for n, who in ((against["only_run"], "this run"), (against["only_against"], "that run"))
        if n
    ]
    lines = [
        f"against {other}: {count(against['shared'], 'input')} both answered"
        + (f" ({', '.join(left)}, left out)" if left else "")
    ]
    o = against["overall"]
    if o:
        lines.append(
            f"  reward: that run {o['mean_original']:.3f}, this run {o['mean_new']:.3f}, "
            f"difference {o['mean_diff']:+.3f} ({_diff_ci(o, ' to ')}); this run wins "
            f"{o['win_rate']:.0%} of {o['n']}"
        )
    elif against["shared"]:
        lines.append("  reward: no reward scores yet (run `convoscope score`)")
    for cluster, d in against["per_cluster"].items():
        lines.append(
            f"  {cluster:<8} n={d['n']:<5} reward diff {d['mean_diff']:+.3f} "
            f"({_diff_ci(d, ', ')}) this run wins {d['win_rate']:.0%}"
        )
    return lines


def _diff_ci(diff: dict[str, Any], between: str) -> str:
    """A reward difference's 95 % CI, or why there is none (one pair bounds nothing)."""
    if diff["ci_low"] is None:
        return "no CI from one pair"
    return f"95% CI {diff['ci_low']:+.3f}{between}{diff['ci_high']:+.3f}"


def _clustering(used: dict[str, Any]) -> str:
    """Which clustering a result's clusters are of (`common.clustering_used`)."""
    if used["run_id"] is None:
        return f"no clustering on {used['on']}"
    return f"clusters of the latest clustering on {used['on']}, run {used['run_id']}"


def _describe_clusters(result: dict[str, Any]) -> str:
    """Topics, then the groups under their own heading: a group's line is followed by why it
    ranks where it does and its weakest topics, so a broad area going badly reads at once."""
    if result["run_id"] is None:  # nothing clustered on this --on field
        return result["hint"]
    header = f"{'id':<6} {'size':>7} {'share':>6} {'reward':>7}  name — keywords"
    scored = any(c.get("scored_n") is not None for c in result["clusters"])
    topics = [c for c in result["clusters"] if c["level"] == 0]
    groups = [c for c in result["clusters"] if c["level"] != 0]
    # Weakest first is by weakness (a low reward weighted by traffic), not by reward alone:
    # without the heading the rewards read as a list sorted wrong.
    ranked = "topics, weakest first (low reward × traffic share)" if scored else "topics"
    lines = [ranked, header, *map(_cluster_line, topics)] if topics else []
    if groups:
        lines += [""] if lines else []
        lines += ["groups, weakest first" if scored else "groups", header]
        for group in groups:
            lines.append(_cluster_line(group))
            if group.get("reason"):
                lines.append(f"{'':6}   why: {group['reason']}")
            weakest = [  # ranked by weakness (low reward × traffic), so both are shown
                f"{t['id']} {t['name']} (reward {t['reward_mean']:.2f}, "
                f"weakness {t['weakness']:.3f})"
                for t in group.get("weakest_topics", [])
            ]
            if weakest:
                lines.append(f"{'':6}   weakest topics: {'; '.join(weakest)}")
    if scored:
        lines.append(
            "size, share: the exchanges the latest scores cover (assigned since clustering "
            "included); --json also gives the clustering's own count"
        )
    else:
        lines.append("size, share: the exchanges the clustering assigned")
        lines.append("no rewards for this clustering yet: run `convoscope score`")
    return "\n".join(lines)


def _cluster_line(c: dict[str, Any]) -> str:
    """One cluster: its size and share as scored when it has a report (the figures beside
    them are over those exchanges), else as clustered."""
    reward = c.get("reward_mean")
    shown = f"{reward:7.2f}" if isinstance(reward, float) else f"{'':>7}"
    keywords = ", ".join(c["keywords"][:5])
    scored = c.get("scored_n") is not None
    size, share = (c["scored_n"], c["scored_share"]) if scored else (c["size"], c["share"])
    return f"{c['id']:<6} {size:>7} {share:>6.1%} {shown}  {c['name']} — {keywords}"


def _describe_ingest(s: dict[str, Any]) -> str:
    lines = [
        f"{s['db']}: read {s['read']} exchanges from {s['files']} file(s); "
        f"stored {s['stored']}, {s['duplicates']} already stored, {s['rejected']} rejected"
    ]
    if s["battles"]:  # a new vote on stored answers adds a battle and no exchange
        lines.append(
            f"battles: read {s['battles']}, stored {s['battles_stored']}, "
            f"{s['battles'] - s['battles_stored']} already stored"
        )
    if s["rejects_file"]:
        lines.append(f"rejected records and why: {s['rejects_file']}")
    for cut in s["truncated"]:
        lines.append(
            f"{cut['source']} is truncated at byte {cut['byte_offset']} (record starting at "
            f"{cut['line']}); read the {cut['records_kept']} whole records before the cut "
            "(bad ones among them are rejected)"
        )
    if s["unknown_roles"]:
        roles = ", ".join(f"{k} ({v})" for k, v in s["unknown_roles"].items())
        lines.append(f"skipped messages with unknown roles: {roles}")
    return "\n".join(lines)


def _describe_trend(result: dict[str, Any]) -> str:
    """The totals per period, then one line per topic over the latest periods."""
    if result["run_id"] is None:
        return result["hint"]
    period = result["period"]
    if not result["periods"]:
        return (
            f"no exchange of the latest clustering on {result['on']} (run {result['run_id']}) "
            f"has a time: the logs give none ({spelled_time_keys()}, per message or per "
            "conversation)"
        )
    rewards = f"rewards: {result['scorer']}" if result["scorer"] else "no rewards yet (`score`)"
    lines = [
        f"exchanges per {period} of their logged time (UTC), latest clustering on "
        f"{result['on']}, run {result['run_id']}; {rewards}",
        f"{period + ' of':<12} {'exchanges':>9} {'reward':>7} {'retry':>6} {'ended':>6}",
    ]
    totals = result["total"]["series"]
    if len(totals) > TREND_ROWS:
        lines.insert(1, f"the last {TREND_ROWS} of {len(totals)} {period}s (--json has all):")
    for point in totals[-TREND_ROWS:]:
        lines.append(
            f"{point['start']:<12} {point['exchanges']:>9} {_num(point['reward_mean']):>7} "
            f"{_percent(point['retry_rate']):>6} {_percent(point['end_rate']):>6}"
        )
    shown = result["periods"][-TREND_COLUMNS:]
    width = max([7, *(len(topic["id"] or "-") for topic in result["clusters"])])
    lines += [
        "",
        ("topics, most worsened first" if result["scorer"] else "topics, largest first")
        + f": exchanges per {period}"
        + (
            f" (the last {len(shown)}; --json has all)"
            if len(shown) < len(result["periods"])
            else ""
        )
        + (
            ", then the reward of the latest and its change from the one before"
            if result["scorer"]
            else " (no rewards to rank by yet: `convoscope score`)"
        ),
        f"{'id':<{width}} "
        + " ".join(f"{start[:7] if period == 'month' else start[5:]:>7}" for start in shown)
        + "  reward (change, 95% CI)          name",
    ]
    for topic in result["clusters"]:
        counts = " ".join(f"{p['exchanges']:>7}" for p in topic["series"][-len(shown) :])
        latest = topic["series"][-1]["reward_mean"]
        change = topic["reward_change"]
        ci = topic["reward_change_ci"]
        interval = f", {ci[0]:+.2f} to {ci[1]:+.2f}" if ci else ""
        moved = f"{_num(latest)} ({change:+.2f}{interval})" if change is not None else _num(latest)
        name = topic["name"] if topic["id"] else "(in no topic)"
        lines.append(f"{topic['id'] or '-':<{width}} {counts}  {moved:<31}  {name}")
    if result["undated"]:
        lines.append(f"{result['undated']} exchanges have no logged time and are in no {period}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"
