"""A small random sequence-classification model, saved as a user's own reward model would be:
one layer, so the tests that score with it take seconds, not minutes."""

from __future__ import annotations

from pathlib import Path

from scoring.reward_model import default_backbone


def tiny_classifier(directory: Path, *, positions: int = 512, tokenizer: bool = True) -> Path:
    """A small random sequence-classification model (one layer) with MiniLM's tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    words = AutoTokenizer.from_pretrained(default_backbone())
    config = BertConfig(
        vocab_size=words.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        num_labels=1,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    if tokenizer:
        words.save_pretrained(directory)
    return directory
