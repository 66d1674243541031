"""The `data` stage: sources -> tokenizer -> encoded documents -> mixture -> packed shards + stats.

Run it with the rest of the pipeline, or alone:

    python -m pipeline run conf=tiny stages=[data]
    python -m stages.data out/dataset                      # default config, seed 0
    python -m stages.data out/dataset seq_len=64 seed=1    # overrides as key=value

It writes the `dataset` artifact described in `pipeline.formats`: tokenizer/, train/ and val/
shards (each with index.json), sft/, preferences/, rlvr/, tasks/val.jsonl and stats.json.

Flow: every source is read, parsed and encoded by Ray Data tasks (`dataflow`); the stage's own
process interleaves the sources by their weights (`mixture`), packs each window of documents
best-fit-decreasing (`packing`), orders the rows so every micro-batch keeps the text:vision
balance, and hands each window's full shards to a Ray task on its node, which writes them
atomically while the next window packs. Once a window's shards are on disk its progress is
saved, so a stage that stops (crash, preemption) continues where it was without writing any row
twice. The same seed, config and inputs give byte-identical shards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

import pipeline.shards as shards
from ernie.chat_template import SPECIAL_TOKENS, render
from pipeline.contract import StageContext, StageResult, UserError, contained
from pipeline.formats import write_jsonl

from . import arithmetic, dataflow
from .bundled import bundled_corpus
from .config import Config
from .encode import EncodeSpec
from .mixture import MixtureState, interleave, realised, token_targets
from .packing import RowFormat, balance_order, pack_window
from .stats import StatsAccumulator, flat_metrics, stats_figures
from .stdlib_corpus import python_version
from .tokenizer import PAD_ID, save_tokenizer, train_tokenizer
from .wire import carry_from_bytes, carry_to_bytes

INPUTS: dict[str, str] = {}
OUTPUT_KIND = "dataset"
SPLITS = ("train", "val")
PROGRESS_FILE = "progress.json"
CARRY_FILE = "carry-{}.bin"
STEPS = ("corpus", "tokenizer", "read + encode", "mix + pack + write", "stats")
TOKENIZER_SAMPLE_CHARS = 4_000_000
"""Characters of text per file source the BPE trains on when no tokenizer directory is given."""


def run(ctx: StageContext) -> StageResult:
    config: Config = ctx.config
    config.validate()
    _check_model(config, ctx.model)
    out = Path(ctx.output_dir)
    work = Path(ctx.work_dir) / "data" if ctx.work_dir else out / ".progress"
    ctx.progress.set_total(len(STEPS), STEPS[0])
    warm = dataflow.warm_up()

    corpus = bundled_corpus(config, ctx.seed)
    records = {
        path.removesuffix(".jsonl").replace("/", "_"): write_jsonl(out / path, r) for path, r in corpus.sets.items()
    }
    for path, data in corpus.files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    bundled = {s.name: corpus.records.get(s.name) for s in config.sources}
    raws = {s.name: dataflow.raw_dataset(s, i, bundled[s.name]) for i, s in enumerate(config.sources)}
    ctx.progress.update(1, STEPS[1])

    tokenizer_json = _tokenizer(config, ctx.model, corpus, bundled, out)
    ctx.progress.update(1, STEPS[2])

    spec = EncodeSpec.build(
        tokenizer_json, ctx.model, config.image.min_pixels, config.image.max_pixels, config.val_fraction
    )
    warm.result()
    encoded = {name: dataflow.encoded_dataset(raw, spec) if raw is not None else None for name, raw in raws.items()}
    scans = {name: dataflow.scan(name, ds, config.on_error) for name, ds in encoded.items()}
    for name, found in scans.items():
        if found.documents == 0:
            if config.on_error == "fail":
                raise UserError(f"data source {name!r} has no usable documents (data.on_error=fail)")
            found.errors["empty_source"] += 1
    weights = {s.name: s.weight for s in config.sources}
    targets = token_targets({n: s.tokens for n, s in scans.items()}, weights, config.total_tokens)
    if not targets:
        raise UserError("no data.sources entry has any usable document")
    ctx.progress.update(1, STEPS[3])

    vl = ctx.model is not None and ctx.model.vision is not None
    state = _Progress.load(work, config, ctx.seed)
    stream = interleave({name: _source_stream(encoded[name]) for name in targets}, targets, state.mixture)
    packer = _WindowPacker(config, vl, _patch_dim(ctx.model), work, state)
    try:
        for count, (_, (split, doc)) in enumerate(stream):
            packer.add(split, doc)
            if count % 1000 == 0:
                ctx.progress.update(0, f"{STEPS[3]}: {sum(state.mixture.tokens.values()):,} tokens")
        packer.finish()
    finally:
        packer.close()  # windows already handed over are written and saved, whatever stopped the loop
    ctx.progress.update(1, STEPS[4])

    for split in SPLITS:
        if not state.shards[split]:
            raise UserError(
                f"the {split} split is empty: too few documents for data.val_fraction={config.val_fraction}"
            )
        (out / split).mkdir(parents=True, exist_ok=True)
        for info in state.shards[split]:
            shutil.move(str(work / split / info["name"]), out / split / info["name"])
        shards.write_index(str(out / split), state.shards[split], config.seq_len)

    stats = state.stats.to_dict(config, scans, realised(state.mixture, weights), targets)
    stats["records"] = records
    stats["eval_tasks_by_op"] = {op: sum(f.op == op for f in corpus.held_out) for op in arithmetic.SYMBOLS}
    stats["corpus"] = {"python_version": python_version(), "max_operand": config.max_operand}
    stats["tokenizer_vocab_size"] = _vocab_size(tokenizer_json)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    metrics = flat_metrics(stats)
    ctx.log.metrics(metrics)
    for name, figure in stats_figures(stats, state.stats).items():
        ctx.log.figure(figure, f"data/{name}.png")
    ctx.progress.update(1, "done")
    return StageResult(metrics=metrics, summary=_summary(stats))


def _check_model(config: Config, model) -> None:
    model_vocab = getattr(model, "vocab_size", None)
    if not config.tokenizer and model_vocab is not None and model_vocab != config.vocab_size:
        raise UserError(
            f"data.vocab_size={config.vocab_size} differs from the model's vocab_size={model_vocab}; "
            "the tokenizer must fill the model's embedding table, so set them equal"
        )
    config.check_model(model)


def _patch_dim(model) -> int:
    return model.vision.patch_dim if model is not None and model.vision is not None else 0


def _vocab_size(tokenizer_json: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).get_vocab_size()


def _tokenizer(config: Config, model, corpus, bundled: dict, out: Path) -> str:
    """The tokenizer as JSON (shipped to Ray Data tasks); saved into the artifact."""
    if config.tokenizer:
        from .tokenizer_dir import check_special_tokens, load_tokenizer_dir, save_tokenizer_dir, special_token_roles

        try:
            tokenizer = load_tokenizer_dir(config.tokenizer)
            if model is not None:
                check_special_tokens(tokenizer, model, special_token_roles(config.tokenizer))
        except ValueError as error:
            raise UserError(f"data.tokenizer={config.tokenizer!r}: {error}") from error
        save_tokenizer_dir(tokenizer, config.tokenizer, out)
        return tokenizer.to_str()
    texts = [t for records in bundled.values() if records for r in records for kind, t in r.segments if kind == "text"]
    files = {i: s for i, s in enumerate(config.sources) if bundled[s.name] is None}
    if files:
        texts += dataflow.sample_texts(files, TOKENIZER_SAMPLE_CHARS)
    texts += [_strip_special(render(r["messages"])) for r in corpus.sets.get("sft/train.jsonl", [])]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    save_tokenizer(tokenizer, out)
    return tokenizer.to_str()


def _strip_special(text: str) -> str:
    """Chat text for tokenizer training: the special tokens are added, not learned."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return text


def _source_stream(ds):
    return lambda: dataflow.documents(ds)


class _Progress:
    """Resume state, saved after every window: mixture position, next doc id, shards, stats so far."""

    def __init__(self, work: Path, fingerprint: str) -> None:
        self.work, self.fingerprint = work, fingerprint
        self.mixture = MixtureState()
        self.next_doc_id = 0
        self.shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.stats = StatsAccumulator()
        self.saves = 0
        """Generation of the carry file that progress.json refers to (carry-N.bin)."""

    @staticmethod
    def load(work: Path, config: Config, seed: int) -> _Progress:
        fingerprint = json.dumps({"config": asdict(config), "seed": seed}, sort_keys=True, default=str)
        progress = _Progress(work, fingerprint)
        path = work / PROGRESS_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            listed = [
                contained(work / split, info["name"], f"{path} lists shard")
                for split in SPLITS
                for info in saved["shards"][split]
            ]
            # shards already moved into an output that did not survive: start over rather than drop rows
            if saved["fingerprint"] == fingerprint and all(shard.is_file() for shard in listed):
                progress.mixture = MixtureState(**saved["mixture"])
                progress.next_doc_id = saved["next_doc_id"]
                progress.shards = saved["shards"]
                progress.stats = StatsAccumulator.from_dict(saved["stats"])
                progress.saves = saved["saves"]
                progress._drop_unlisted_shards()
                return progress
        shutil.rmtree(work, ignore_errors=True)  # another config's leftovers
        return progress

    def _drop_unlisted_shards(self) -> None:
        """Shards written after the last save belong to a window that will be packed again."""
        for split in SPLITS:
            listed = {info["name"] for info in self.shards[split]}
            for path in (self.work / split).glob("shard-*"):
                if path.name not in listed:
                    path.unlink()

    def load_carry(self) -> dict[str, dict[str, list]]:
        """{"rows": rows waiting for a full shard, "pending": documents not yet packed}, per split."""
        if self.saves:
            return carry_from_bytes((self.work / CARRY_FILE.format(self.saves)).read_bytes())
        return {"rows": {split: [] for split in SPLITS}, "pending": {split: [] for split in SPLITS}}

    def snapshot(self, carry: dict) -> tuple[bytes, dict]:
        """The state right after a window is packed (its shards are listed at `commit`, once written)."""
        state = {
            "fingerprint": self.fingerprint,
            "mixture": asdict(self.mixture),
            "next_doc_id": self.next_doc_id,
            "stats": self.stats.to_state(),
        }
        return carry_to_bytes(carry), state

    def commit(self, snapshot: tuple[bytes, dict], shards_so_far: dict[str, list[dict]]) -> None:
        """Once a window's shards are on disk: its carry file, then progress.json switches to it."""
        carry, state = snapshot
        self.saves += 1
        (self.work / CARRY_FILE.format(self.saves)).write_bytes(carry)
        tmp = self.work / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(state | {"saves": self.saves, "shards": shards_so_far}))
        tmp.replace(self.work / PROGRESS_FILE)
        (self.work / CARRY_FILE.format(self.saves - 1)).unlink(missing_ok=True)


class _ShardWrites:
    """Each window's full shards are written by a Ray task on this node while the next window packs.

    Windows commit in order: once a window's shards are on disk, its progress (taken when it was
    packed) is saved with the shard list so far. At most `AHEAD` windows are in flight.
    """

    AHEAD = 2

    def __init__(self, config: Config, work: Path, state: _Progress) -> None:
        self.config, self.work, self.state = config, work, state
        self.shards = {split: list(infos) for split, infos in state.shards.items()}
        self.in_flight: list[tuple[str, object, tuple[bytes, dict]]] = []

    def submit(self, split: str, rows: list[dict], first_shard: int, snapshot: tuple[bytes, dict]) -> None:
        directory = str(self.work / split)
        written = dataflow.write_shards(directory, rows, self.config.rows_per_shard, first_shard) if rows else None
        self.in_flight.append((split, written, snapshot))
        self._commit(wait=len(self.in_flight) > self.AHEAD)

    def close(self) -> dict[str, list[dict]]:
        """Wait for every window handed over; the shard list of each split."""
        while self.in_flight:
            self._commit(wait=True)
        return self.shards

    def _commit(self, wait: bool) -> None:
        import ray

        while self.in_flight:
            split, written, snapshot = self.in_flight[0]
            if written is not None:
                if not wait and not ray.wait([written], timeout=0)[0]:
                    return
                self.shards[split] = self.shards[split] + ray.get(written)
            self.in_flight.pop(0)
            self.work.mkdir(parents=True, exist_ok=True)
            self.state.commit(snapshot, self.shards)
            wait = False


class _WindowPacker:
    """Collects a window of documents per split, packs it, balances the rows, writes full shards.

    Each split packs when its own window is full, so the small val split gets windows as large
    as train's. Rows that do not fill a shard wait for the next window, so only the last shard
    of a split is short. Waiting rows and not yet packed documents are saved with the progress.
    """

    def __init__(self, config: Config, vl: bool, patch_dim: int, work: Path, state: _Progress) -> None:
        self.config, self.work, self.state = config, work, state
        self.capacity = config.window_rows * config.seq_len
        self.format = RowFormat(config.seq_len, vl, patch_dim, PAD_ID)
        carry = state.load_carry()
        self.rows: dict[str, list[dict]] = carry["rows"]
        self.pending: dict[str, list] = carry["pending"]
        self.pending_tokens = {split: sum(len(d.tokens) for d in docs) for split, docs in self.pending.items()}
        self.shard_count = {split: len(infos) for split, infos in state.shards.items()}
        self.writer = _ShardWrites(config, work, state)

    def add(self, split: str, doc) -> None:
        doc.doc_id = self.state.next_doc_id
        self.state.next_doc_id += 1
        self.pending[split].append(doc)
        self.state.stats.add_document(split, doc)
        self.pending_tokens[split] += len(doc.tokens)
        if self.pending_tokens[split] >= self.capacity:
            self.flush(split, final=False)

    def finish(self) -> None:
        """Pack what is left, wait for the writes; the state's shard lists are then complete."""
        for split in SPLITS:
            self.flush(split, final=True)
        self.state.shards = self.close()

    def close(self) -> dict[str, list[dict]]:
        return self.writer.close()

    def flush(self, split: str, final: bool) -> None:
        config = self.config
        rows = self.rows[split]
        if self.pending[split]:
            packed = pack_window(self.pending[split], self.format)
            if split == "train" and self.format.vl:  # the seed varies per window, fixed by the stream
                vision, text = _row_counts(packed)
                order = balance_order(vision, text, config.balance.group_rows, self.state.next_doc_id)
                packed = [packed[i] for i in order]
            rows = rows + packed
        keep = len(rows) if final else len(rows) - len(rows) % config.rows_per_shard
        rows, self.rows[split] = rows[:keep], rows[keep:]
        self.pending[split], self.pending_tokens[split] = [], 0
        first = self.shard_count[split]
        if rows:
            sizes = [min(config.rows_per_shard, len(rows) - at) for at in range(0, len(rows), config.rows_per_shard)]
            vision, text = _row_counts(rows)
            self.state.stats.add_rows(split, vision, text, config.seq_len, sizes)
            self.shard_count[split] += len(sizes)
        self.writer.submit(split, rows, first, self.state.snapshot({"rows": self.rows, "pending": self.pending}))


def _row_counts(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(vision tokens, text tokens) per row."""
    vision = np.array([int((r["modality_ids"] == 1).sum()) for r in rows], dtype=np.int64)
    real = np.array([int((r["document_ids"] >= 0).sum()) for r in rows], dtype=np.int64)
    return vision, real - vision


def _summary(stats: dict) -> str:
    sources = ", ".join(f"{v['tokens']:,} {k}" for k, v in stats["sources"].items())
    modalities = stats["modalities"]
    return (
        f"{stats['documents']:,} documents -> {stats['tokens']:,} tokens ({sources}; "
        f"{modalities.get('vision', {}).get('tokens', 0):,} vision) in "
        f"{stats['splits']['train']['rows']:,}+{stats['splits']['val']['rows']:,} rows of {stats['seq_len']} "
        f"({stats['packing_efficiency']:.1%} packed), vocab {stats['tokenizer_vocab_size']}, "
        f"{stats['records']['sft_train']} SFT / {stats['records']['preferences_train']} pref / "
        f"{stats['records'].get('rlvr_train', 0)} RLVR prompts / "
        f"{stats['records']['tasks_val']} eval items"
    )
