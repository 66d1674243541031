"""The eval stage's settings, without torch: the CLI reads configs without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.contract import Resources


@dataclass
class Config:
    max_rows: int = 64
    """Validation rows for val_loss / val_ppl (0 = all)."""
    max_items: int = 64
    """Task items for accuracy (0 = all), sampled round-robin across tasks."""
    batch_size: int = 8
    """Rows (or prompts) per forward pass."""
    max_new_tokens: int = 8
    """Greedy tokens generated per task answer."""
    num_examples: int = 5
    """Predictions written to eval.json for a human to read."""
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1))
    """What the stage's Ray actor asks for."""
