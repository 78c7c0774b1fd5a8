"""Fine-tuned reward model on the AlpacaEval battles: the GPU half of the scoring benchmark.

Run from the repository root: `python benchmarks/bench_reward_finetune.py` (all stages on this
machine; a GPU is used when present). The fine-tuning itself can run elsewhere:
`--prepare DIR` writes the inputs (answers, battles, folds, structural features, the bundled
MiniLM in fp16) into DIR, `--train DIR --out OUT` fine-tunes from them on the machine with the
GPU and writes the logits of each run and a line per run in runs.jsonl, and `--report OUT`
prints the table here.

The splits are bench_scoring's (prompts in 5 folds, fold k held out), so the figures sit beside
the reward head's and "the longer answer wins" measured on the same battles.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FOLDS = 5


def prepare(directory: Path) -> None:
    """Everything the training stage reads, so it needs neither the data file nor pandas."""
    from bench_scoring import answers_table, load_battles

    from scoring.features import text_features

    directory.mkdir(parents=True, exist_ok=True)
    df = load_battles()
    rows, ia, ib = answers_table(df)
    n_prompts = int(df["prompt_id"].max()) + 1
    fold_of_prompt = np.random.default_rng(0).permutation(n_prompts) % FOLDS
    answers = rows[["prompt", "response", "model"]]
    answers.to_parquet(directory / "answers.parquet", compression="zstd")
    np.savez(
        directory / "battles.npz",
        a=ia,
        b=ib,
        outcome=df["outcome"].to_numpy(dtype=np.float32),
        winner=df["winner"].map({"a": 1, "b": 0, "tie": -1}).to_numpy(dtype=np.int8),
        fold=fold_of_prompt[df["prompt_id"].to_numpy()],
        features=text_features(rows["response"], rows["prompt"]),
    )
    from scoring.reward_model import default_backbone

    _copy_backbone(
        Path(default_backbone()),
        directory / "backbone",
        weights_from="model.safetensors",
        weights_to="model.fp16",
        dtype="float16",
    )


def _copy_backbone(
    source: Path, target: Path, *, weights_from: str, weights_to: str, dtype: str
) -> Path:
    """A model directory copied with its weights cast: to fp16 for the trip to the GPU machine
    (the upload limit), back to fp32 there for training."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in ("model.safetensors", "model.fp16"):
            shutil.copy(item, target / item.name)
    weights = load_file(source / weights_from)
    save_file(
        {k: v.to(getattr(torch, dtype)).contiguous() for k, v in weights.items()},
        target / weights_to,
    )
    return target


def pair_accuracy(score: np.ndarray, a: np.ndarray, b: np.ndarray, winner: np.ndarray) -> float:
    """Share of decided battles where the higher score belongs to the winner."""
    keep = winner >= 0
    return float(np.mean((score[a[keep]] > score[b[keep]]) == (winner[keep] == 1)))


def train(
    data: Path,
    out: Path,
    *,
    steps: int,
    max_length: int,
    batch_size: int,
    budget: float,
    folds: list[int],
) -> None:
    """Fine-tune with each fold held out in turn, while the budget holds one more; the logits
    of every answer per fold. A fold is skipped when the time left would not hold it."""
    import pandas as pd
    import torch

    from scoring.reward_head import Pairs
    from scoring.reward_model import FineTuneConfig, TransformerReward

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    answers = pd.read_parquet(data / "answers.parquet")
    prompts, responses = list(answers["prompt"]), list(answers["response"].fillna(""))
    battles = dict(np.load(data / "battles.npz"))
    backbone = _copy_backbone(
        data / "backbone",
        Path(tempfile.mkdtemp(prefix="convoscope-backbone-")),
        weights_from="model.fp16",
        weights_to="model.safetensors",
        dtype="float32",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# {len(prompts)} answers, {len(battles['a'])} battles on {device}", flush=True)
    config = FineTuneConfig(
        backbone=str(backbone),
        max_length=max_length,
        steps=steps,
        batch_size=batch_size,
        device=device,
    )
    last = 0.0
    for fold in folds:
        if last and time.time() - start + last * 1.1 > budget:
            print(f"# skipped fold {fold}: {budget - (time.time() - start):.0f}s left")
            continue
        t = time.time()
        held = battles["fold"] == fold
        pairs = Pairs(battles["a"][~held], battles["b"][~held], battles["outcome"][~held])
        model = TransformerReward(config).fit(prompts, responses, pairs=pairs)
        trained = time.time() - t
        scores = model.score(prompts, responses, batch_size=256)
        last = time.time() - t
        tag = f"text_fold{fold}"
        np.save(out / f"{tag}.npy", scores.astype(np.float32))
        acc = pair_accuracy(scores, battles["a"][held], battles["b"][held], battles["winner"][held])
        record = {
            "run": "text",
            "fold": fold,
            "accuracy": acc,
            "train_s": round(trained, 1),
            "score_s": round(last - trained, 1),
            "config": {k: v for k, v in asdict(config).items() if k != "backbone"},
        }
        with open(out / "runs.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def report(data: Path, out: Path) -> None:
    """Each run beside the reward head, the n-gram model, the ensembles `--mode` builds from
    them (each member standardised on the training answers, then summed: `head+lexical`, and
    `ensemble`, all three) and "the longer answer wins", all on the same held-out battles."""
    import pandas as pd

    answers = pd.read_parquet(data / "answers.parquet")
    battles = dict(np.load(data / "battles.npz"))
    length = answers["response"].fillna("").str.len().to_numpy(dtype=float)
    print(
        "| fold | fine-tuned | head | lexical | head+lexical | all three | longer wins "
        "| fine-tune s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for line in (out / "runs.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        fold = record["fold"]
        held = battles["fold"] == fold
        head = reward_head_scores(battles, ~held)
        lexical = lexical_scores(answers, battles, ~held)
        tuned = np.load(out / f"{record['run']}_fold{fold}.npy").astype(np.float64)
        train_rows = np.unique(np.concatenate([battles["a"][~held], battles["b"][~held]]))
        z = [(s - s[train_rows].mean()) / s[train_rows].std() for s in (head, lexical, tuned)]
        a, b, w = battles["a"][held], battles["b"][held], battles["winner"][held]
        scores = (tuned, head, lexical, z[0] + z[1], z[0] + z[1] + z[2], length)
        accuracy = " | ".join(f"{pair_accuracy(s, a, b, w):.3f}" for s in scores)
        print(f"| {fold} | {accuracy} | {record['train_s']:.0f} |")


def lexical_scores(
    answers: pd.DataFrame, battles: dict[str, np.ndarray], train: np.ndarray
) -> np.ndarray:
    """The n-gram reward model (scoring.reward_lexical), trained on the training battles'
    winners as the score step gives them."""
    from scoring.reward_head import Pairs
    from scoring.reward_lexical import LexicalReward

    outcome = np.select([battles["winner"] == 1, battles["winner"] == 0], [1.0, 0.0], 0.5)
    pairs = Pairs(battles["a"][train], battles["b"][train], outcome[train])
    prompts = answers["prompt"].fillna("").tolist()
    responses = answers["response"].fillna("").tolist()
    authors = answers["model"].tolist() if "model" in answers else None  # older inputs: none
    model = LexicalReward().fit(prompts, responses, pairs=pairs, authors=authors)
    return model.score(prompts, responses)


def reward_head_scores(battles: dict[str, np.ndarray], train: np.ndarray) -> np.ndarray:
    """bench_scoring's reward head (structural features), trained on the training battles."""
    from scoring.reward_head import STRUCTURAL_HEAD, Pairs, RewardHead

    pairs = Pairs(battles["a"][train], battles["b"][train], battles["outcome"][train])
    return (
        RewardHead(STRUCTURAL_HEAD).fit(battles["features"], pairs=pairs).score(battles["features"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepare", type=Path, help="write the inputs into this directory")
    parser.add_argument("--train", type=Path, help="fine-tune from the inputs in this directory")
    parser.add_argument("--report", type=Path, help="print the table for the logits here")
    parser.add_argument("--data", type=Path, help="inputs directory (with --report)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/convoscope_bench/finetune"))
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--folds", default="0,1,2,3,4", help="held-out folds, in order")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds for --train")
    args = parser.parse_args()
    everything = not (args.prepare or args.train or args.report)
    data = args.prepare or args.train or args.data or Path("/tmp/convoscope_bench/finetune_data")
    if args.prepare or everything:
        prepare(data)
    if args.train or everything:
        train(
            data,
            args.out,
            steps=args.steps,
            max_length=args.max_length,
            batch_size=args.batch_size,
            budget=args.budget,
            folds=[int(k) for k in args.folds.split(",")],
        )
    if args.report or everything:
        report(data, args.report or args.out)


if __name__ == "__main__":
    main()
