"""The data stage's typed config and the checks that turn bad values into a `UserError`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie.chat_template import SPECIAL_TOKENS
from pipeline.contract import Resources, UserError

BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET
"""A byte-level BPE needs every byte as a token, plus the fixed special tokens."""


SOURCE_KINDS = ("stdlib", "arithmetic", "scenes", "jsonl", "parquet", "image-text", "interleaved", "webdataset")
"""The first three are the bundled corpus (built on the machine); the rest read files, local or s3://."""
IMAGE_KINDS = ("scenes", "image-text", "interleaved")
"""Kinds whose documents always carry images (webdataset samples may or may not)."""
ON_ERROR = ("skip", "fail")


@dataclass
class SourceConfig:
    """One input of the mixture. File kinds and their records:

    jsonl / parquet: one document per line / row, its text in `text_field`.
    image-text: jsonl lines or parquet rows with `image_field` (a path relative to the file, or the
        image bytes in parquet) and the caption in `text_field`; the document is image then caption.
    interleaved: jsonl lines with `segments`: [{"type": "text", "text": ...}, {"type": "image",
        "image": path}, ...] in reading order.
    webdataset: tar shards; a sample's `txt` member is the text and an optional jpg/jpeg/png/webp
        member an image placed before it.
    """

    name: str = ""
    """Shown in stats and metrics; unique within `data.sources`."""
    kind: str = "jsonl"
    """One of SOURCE_KINDS."""
    path: str = ""
    """A file, a directory (all files below it) or a glob; local or s3://. Unused by bundled kinds."""
    weight: float = 1.0
    """Share of the mixture's tokens (weights are normalised); a source with too few tokens repeats."""
    text_field: str = "text"
    """Record field holding the text (jsonl, parquet, image-text)."""
    image_field: str = "image"
    """Record field holding the image path or bytes (image-text)."""


def bundled_sources() -> list[SourceConfig]:
    """The on-machine corpus: real text, arithmetic and generated scenes."""
    return [
        SourceConfig(name="stdlib-docs", kind="stdlib", weight=0.6),
        SourceConfig(name="arithmetic", kind="arithmetic", weight=0.25),
        SourceConfig(name="scenes", kind="scenes", weight=0.15),
    ]


@dataclass
class ImageConfig:
    """How images become patches (the vision encoder's variable-resolution grid)."""

    min_pixels: int = 56 * 56
    """Smaller images are upscaled to at least this many pixels."""
    max_pixels: int = 112 * 112
    """Larger images are downscaled to at most this many pixels (bounds tokens per image)."""


@dataclass
class BalanceConfig:
    """Text:vision token balance per training micro-batch (what the token-balanced loss relies on)."""

    group_rows: int = 4
    """Rows per micro-batch whose vision-token share is balanced; consecutive rows in the shards."""
    band: float = 0.1
    """Allowed distance of a micro-batch's vision-token share from the split's overall share."""


@dataclass
class Config:
    """What the `data` stage builds: corpus, tokenizer, packed shards, post-training sets."""

    resources: Resources = field(default_factory=Resources)
    """What the stage's Ray actor asks for (reading and encoding run as Ray Data tasks besides)."""
    sources: list[SourceConfig] = field(default_factory=lambda: bundled_sources())
    """The mixture: bundled kinds and/or files (see SourceConfig)."""
    on_error: str = "skip"
    """skip: count and drop unreadable records (corrupt image, bad UTF-8, missing file, empty source); fail: stop."""
    tokenizer: str = ""
    """A local directory with ERNIE 4.5's tokenizer (tokenizer.model or tokenizer.json); empty = train the BPE."""
    total_tokens: int = 0
    """Tokens in the mixture; 0 = as many as the sources hold in total."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image resizing bounds."""
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    """Micro-batch text:vision balance."""
    window_rows: int = 256
    """Rows' worth of documents packed together (best-fit decreasing); also the resume granularity."""
    scenes: int = 600
    """Generated scenes in the bundled image corpus (each gives a caption and a question document)."""
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
    rlvr_prompts: int = 400
    """Questions with their exact answers for RLVR / UPO rollouts (rlvr/), from the training facts."""
    scene_chats: int = 200
    """With a scenes source: questions about the generated scenes with the image inline in the chat,
    this many as SFT chats (sft/) and as many again as RLVR prompts (rlvr/, task "vqa"); the images
    go under images/."""
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
        for name in (
            "max_documents",
            "arithmetic_documents",
            "sft_examples",
            "preference_pairs",
            "rlvr_prompts",
            "scene_chats",
            "eval_tasks",
        ):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must not be negative")
        _require(
            self.max_documents + self.arithmetic_documents >= 2,
            "max_documents",
            self.max_documents,
            "together with arithmetic_documents must give at least 2 documents (one per split)",
        )
        _require(self.max_operand >= 5, "max_operand", self.max_operand, "must be at least 5")
        _require(self.on_error in ON_ERROR, "on_error", self.on_error, f"must be one of {ON_ERROR}")
        _require(self.total_tokens >= 0, "total_tokens", self.total_tokens, "must not be negative")
        _require(self.window_rows >= 1, "window_rows", self.window_rows, "must be at least 1")
        _require(self.scenes >= 0, "scenes", self.scenes, "must not be negative")
        _require(self.balance.group_rows >= 1, "balance.group_rows", self.balance.group_rows, "must be at least 1")
        _require(0 < self.balance.band <= 1, "balance.band", self.balance.band, "must lie in (0, 1]")
        _require(
            self.rows_per_shard % self.balance.group_rows == 0,
            "rows_per_shard",
            self.rows_per_shard,
            f"must be a multiple of data.balance.group_rows={self.balance.group_rows} (a micro-batch stays in a shard)",
        )
        _require(
            0 < self.image.min_pixels <= self.image.max_pixels,
            "image.min_pixels",
            self.image.min_pixels,
            f"must be positive and at most image.max_pixels={self.image.max_pixels}",
        )
        _require(bool(self.sources), "sources", self.sources, "must name at least one source")
        names = [s.name for s in self.sources]
        for i, source in enumerate(self.sources):
            key = f"sources[{i}]"
            _require(bool(source.name), f"{key}.name", source.name, "must not be empty")
            _require(names.count(source.name) == 1, f"{key}.name", source.name, "is used by two sources")
            _require(source.kind in SOURCE_KINDS, f"{key}.kind", source.kind, f"must be one of {SOURCE_KINDS}")
            _require(source.weight > 0, f"{key}.weight", source.weight, "must be positive")
            bundled = source.kind in SOURCE_KINDS[:3]
            _require(bundled or bool(source.path), f"{key}.path", source.path, f"is needed by kind {source.kind}")

    def check_model(self, model) -> None:
        """Image sources need a model with a vision encoder (`UserError` otherwise)."""
        if self.has_images and (model is None or model.vision is None):
            kinds = sorted({s.kind for s in self.sources if s.kind in IMAGE_KINDS})
            raise UserError(
                f"data.sources has image sources ({', '.join(kinds)}) but model {getattr(model, 'name', None)} "
                "has no vision encoder; use a VL model (e.g. model=tiny_vl) or text-only sources"
            )

    @property
    def has_images(self) -> bool:
        """Whether a source always carries images (webdataset shards may or may not)."""
        return any(s.kind in IMAGE_KINDS for s in self.sources)


def _require(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise UserError(f"data.{name}={value!r} {why}")
