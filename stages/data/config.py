"""The data stage's typed config and the checks that turn bad values into a `UserError`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie.chat_template import SPECIAL_TOKENS
from pipeline.contract import Resources, UserError

BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET
"""A byte-level BPE needs every byte as a token, plus the fixed special tokens."""


@dataclass
class Config:
    """What the `data` stage builds: corpus, tokenizer, packed shards, post-training sets."""

    resources: Resources = field(default_factory=Resources)
    """What the stage's Ray actor asks for (the stage is single-process and light)."""
    vocab_size: int = 1024
    """BPE vocabulary including the special tokens; must equal the model's `vocab_size`."""
    seq_len: int = 128
    """Tokens per packed row."""
    max_documents: int = 3000
    """Cap on real-text (stdlib docs) documents in the corpus; arithmetic comes on top."""
    val_fraction: float = 0.05
    """Share of documents (and SFT / preference records) held out for validation."""
    rows_per_shard: int = 128
    """Packed rows per webdataset tar shard."""
    arithmetic_documents: int = 1500
    """Generated arithmetic documents (statements and word problems) in the corpus."""
    sft_examples: int = 600
    """Chat examples for SFT (user asks an arithmetic question, assistant answers)."""
    preference_pairs: int = 400
    """(prompt, chosen, rejected) pairs for DPO / UPO."""
    eval_tasks: int = 100
    """Held-out arithmetic questions: never seen in the corpus, SFT or preference data."""
    max_operand: int = 20
    """Largest operand of generated arithmetic; small so a tiny model can learn it."""

    def validate(self) -> None:
        """Raise `UserError` naming the first bad field (`data.<field>=<value>`)."""
        _require(self.seq_len >= 8, "seq_len", self.seq_len, "must be at least 8")
        _require(
            self.vocab_size >= MIN_VOCAB_SIZE,
            "vocab_size",
            self.vocab_size,
            f"must be at least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET} bytes)",
        )
        _require(0 < self.val_fraction < 0.5, "val_fraction", self.val_fraction, "must lie in (0, 0.5)")
        _require(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "must be at least 1")
        for name in ("max_documents", "arithmetic_documents", "sft_examples", "preference_pairs", "eval_tasks"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must not be negative")
        _require(
            self.max_documents + self.arithmetic_documents >= 2,
            "max_documents",
            self.max_documents,
            "together with arithmetic_documents must give at least 2 documents (one per split)",
        )
        _require(self.max_operand >= 5, "max_operand", self.max_operand, "must be at least 5")


def _require(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise UserError(f"data.{name}={value!r} {why}")
