"""The database schema, in SQLAlchemy Core so one definition serves DuckDB, SQLite and PostgreSQL.

Ids are content hashes or random hex strings (32 characters), never auto-increment integers:
they are portable across the three engines, they make re-ingesting idempotent, and a batch can
link battles to exchanges without a round trip. JSON lives in Text columns for the same
portability. Unknown signals are NULL. Migrations (storage/migrations) must produce exactly
these tables; a test compares them.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

Id = sa.String(32)
# A float in double precision on every engine: SQLite's REAL and PostgreSQL's FLOAT are 8
# bytes, DuckDB's FLOAT is 4, so DuckDB gets DOUBLE (migration 0004).
Real = sa.Float().with_variant(sa.Double(), "duckdb")

conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("external_id", sa.Text),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime),
    sa.Column("n_messages", sa.Integer, nullable=False),
    sa.Column("thumbs", sa.Integer),
    sa.Column("rating", Real),
    sa.Column("feedback_text", sa.Text),
    sa.Column("metadata", sa.Text),
    sa.Column("ingested_at", sa.DateTime, nullable=False),
)

exchanges = sa.Table(
    "exchanges",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("conversation_id", Id, nullable=False, index=True),
    sa.Column("turn_index", sa.Integer, nullable=False),
    # JSON list of {role, content}: the whole context, or, when context_parent is set, the
    # messages after that earlier exchange's response (storage/contexts.py resolves it).
    sa.Column("context", sa.Text, nullable=False),
    sa.Column("context_parent", Id),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("instruction", sa.Text),
    sa.Column("created_at", sa.DateTime),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("external_id", sa.Text),
    sa.Column("retried", sa.Boolean),
    sa.Column("edited", sa.Boolean),
    sa.Column("deleted", sa.Boolean),
    sa.Column("rating", Real),
    sa.Column("thumbs", sa.Integer),
    sa.Column("user_turns_after", sa.Integer),
    sa.Column("ended_conversation", sa.Boolean),
    sa.Column("seconds_to_next_user_message", Real),
    sa.Column("metadata", sa.Text),
    sa.Column("ingested_at", sa.DateTime, nullable=False),
)

battles = sa.Table(
    "battles",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("exchange_a", Id, nullable=False),
    sa.Column("exchange_b", Id, nullable=False),
    sa.Column("winner", sa.String(4), nullable=False),  # a | b | tie
    sa.Column("judge", sa.Text),
    sa.Column("judge_preference", Real),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("external_id", sa.Text),
    sa.Column("metadata", sa.Text),
    sa.Column("ingested_at", sa.DateTime, nullable=False),
)

# One row per ingest of one file: what was read and what became of it.
ingest_runs = sa.Table(
    "ingest_runs",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("read", sa.Integer, nullable=False),
    sa.Column("stored", sa.Integer, nullable=False),
    sa.Column("duplicates", sa.Integer, nullable=False),
    sa.Column("rejected", sa.Integer, nullable=False),
    sa.Column("truncated", sa.Boolean, nullable=False),
)

# Embeddings cached by (text hash, model): a re-run embeds only new texts.
vectors = sa.Table(
    "vectors",
    metadata,
    sa.Column("text_hash", Id, primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32, little-endian
)

cluster_runs = sa.Table(
    "cluster_runs",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("on_field", sa.String(16), nullable=False),  # prompt | response | exchange
    sa.Column("embedder", sa.String(200), nullable=False),
    sa.Column("params", sa.Text),
    sa.Column("n_rows", sa.Integer, nullable=False),
    sa.Column("n_clusters", sa.Integer, nullable=False),
    sa.Column("unassigned_share", Real, nullable=False),
    sa.Column("events", sa.Text),  # JSON: clusters kept, split, merged, new, gone
)

# Cluster ids are stable across runs (matched to earlier ones), so a run's clusters are keyed
# by (run, id) and the names and notes people give live in cluster_annotations, keyed by id.
clusters = sa.Table(
    "clusters",
    metadata,
    sa.Column("run_id", Id, primary_key=True),
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("parent_id", sa.String(32)),
    sa.Column("level", sa.Integer, nullable=False),  # 0 = topic, 1 = parent group
    sa.Column("auto_name", sa.Text, nullable=False),
    sa.Column("keywords", sa.Text, nullable=False),  # JSON list
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("share", Real, nullable=False),
    sa.Column("centroid", sa.LargeBinary),
    sa.Column("representatives", sa.Text),  # JSON list of exchange ids
    sa.Column("radius", Real),  # farthest cosine distance at which a new row may join
    sa.Column("x", Real),  # where the cluster sits on the 2-D map (mean of its rows)
    sa.Column("y", Real),
)

cluster_annotations = sa.Table(
    "cluster_annotations",
    metadata,
    sa.Column("cluster_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("note", sa.Text),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

# Ids of clusters that no stored run holds since `prune` removed their runs (migration 0009):
# a fresh cluster skips them as it skips the stored runs' ids, or the names, notes, tags and
# instructions kept by id would land on an unrelated topic.
retired_cluster_ids = sa.Table(
    "retired_cluster_ids",
    metadata,
    sa.Column("cluster_id", sa.String(32), primary_key=True),
    sa.Column("retired_at", sa.DateTime, nullable=False),
)

assignments = sa.Table(
    "assignments",
    metadata,
    sa.Column("run_id", Id, primary_key=True),
    sa.Column("exchange_id", Id, primary_key=True),
    sa.Column("cluster_id", sa.String(32)),  # NULL = unassigned
    sa.Column("distance", Real),
    sa.Column("x", Real),
    sa.Column("y", Real),
)

tags = sa.Table(
    "tags",
    metadata,
    sa.Column("target_kind", sa.String(16), primary_key=True),  # cluster | exchange
    sa.Column("target_id", sa.String(64), primary_key=True),
    sa.Column("tag", sa.String(200), primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

scores = sa.Table(
    "scores",
    metadata,
    sa.Column("exchange_id", Id, primary_key=True),
    sa.Column("scorer", sa.String(200), primary_key=True),  # e.g. reward:<model id>
    sa.Column("value", Real, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

# Trained artefacts (reward models, win predictors) with their data, config and metrics.
trained_models = sa.Table(
    "trained_models",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("config", sa.Text),
    sa.Column("metrics", sa.Text),
    sa.Column("data_fingerprint", sa.String(64)),
    sa.Column("path", sa.Text),
    sa.Column("payload", sa.LargeBinary),
)

replay_runs = sa.Table(
    "replay_runs",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("base_url", sa.Text, nullable=False),
    sa.Column("instruction", sa.Text),
    sa.Column("params", sa.Text),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("finished_at", sa.DateTime),
    # The process driving the run holds a lease on it (migration 0007): its random token, when
    # it took the run, and when the lease lapses unless renewed. NULL: no process drives it.
    sa.Column("owner", Id),
    sa.Column("owner_since", sa.DateTime),
    sa.Column("lease_until", sa.DateTime),
)

# One row per (replay run, judge) that judged it: the lease of the process judging the run's
# answers with that judge (migration 0008), as replay_runs' own. Two judges of one run hold
# two rows, so they judge at once; the same judge twice would send every pair twice.
judge_runs = sa.Table(
    "judge_runs",
    metadata,
    sa.Column("run_id", Id, primary_key=True),
    sa.Column("judge", sa.Text, primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # running | done | incomplete
    sa.Column("owner", Id),
    sa.Column("owner_since", sa.DateTime),
    sa.Column("lease_until", sa.DateTime),
)

replay_items = sa.Table(
    "replay_items",
    metadata,
    sa.Column("run_id", Id, primary_key=True),
    sa.Column("exchange_id", Id, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # pending | done | failed
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("response_exchange_id", Id),
    sa.Column("latency_s", Real),
    sa.Column("prompt_tokens", sa.Integer),
    sa.Column("completion_tokens", sa.Integer),
)

# What scoring concluded about each cluster of a run: reward mean and CI, behaviour rates,
# expert leaderboard, routing suggestion, weakness and its reason (JSON: the UI reads it whole).
cluster_reports = sa.Table(
    "cluster_reports",
    metadata,
    sa.Column("run_id", Id, primary_key=True),
    sa.Column("cluster_id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("weakness", Real),
    sa.Column("payload", sa.Text, nullable=False),
)

# Versioned instructions (system prompts) per cluster, written from the replay page.
instructions = sa.Table(
    "instructions",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("cluster_id", sa.String(32), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("replay_run_id", Id),
    sa.Column("mean_reward", Real),  # of its replay's new answers (`replay report`)
    sa.Column("original_mean_reward", Real),  # of the original answers to the same inputs
    # Two saves at once must not both take the next number (migration 0006).
    sa.Index("uq_instructions_cluster_version", "cluster_id", "version", unique=True),
)

# Answers of external models (LLM cluster names) cached by a hash of the request, so a re-run
# sends only what it has not asked before.
llm_cache = sa.Table(
    "llm_cache",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)
