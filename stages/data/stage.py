"""The `data` stage: bundled corpus -> tokenizer -> packed shards + post-training sets.

Run it with the rest of the pipeline, or alone:

    python -m pipeline run conf=tiny stages=[data]
    python -m stages.data out/dataset                      # default config, seed 0
    python -m stages.data out/dataset seq_len=64 seed=1    # overrides as key=value

It writes the `dataset` artifact described in `pipeline.formats`:
tokenizer/, train/ and val/ shards, sft/, preferences/, tasks/val.jsonl and stats.json.
Everything is generated from text already on the machine (stdlib docs) and from seeded
arithmetic generators: the same seed, config and Python version give the same tokenizer,
records and rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ernie.chat_template import SPECIAL_TOKENS, render
from pipeline.contract import StageContext, StageResult, UserError
from pipeline.formats import write_jsonl, write_row_shards

from . import arithmetic
from .config import Config
from .corpus import ARITHMETIC, STDLIB, Document, build_corpus, holdout_split, sample_documents
from .packing import pack_documents
from .stats import dataset_stats, flat_metrics, stats_figure
from .stdlib_corpus import python_version, stdlib_documents
from .tokenizer import PAD_ID, encode_documents, save_tokenizer, train_tokenizer

INPUTS: dict[str, str] = {}
OUTPUT_KIND = "dataset"
STEPS = ("corpus", "post-training sets", "tokenizer", "tokenize", "pack + write shards", "stats")


def run(ctx: StageContext) -> StageResult:
    config: Config = ctx.config
    config.validate()
    _check_model_vocab(config, ctx.model)
    out = Path(ctx.output_dir)
    ctx.progress.set_total(len(STEPS), STEPS[0])

    documents, held_out, train_facts = _corpus(config, ctx.seed)
    ctx.progress.update(1, STEPS[1])

    sets = _post_training_sets(config, train_facts, held_out, ctx.seed)
    records = {path.removesuffix(".jsonl").replace("/", "_"): write_jsonl(out / path, r) for path, r in sets.items()}
    ctx.progress.update(1, STEPS[2])

    sft_text = [_strip_special(render(r["messages"])) for r in sets["sft/train.jsonl"]]
    tokenizer = train_tokenizer([d.text for d in documents if d.split == "train"] + sft_text, config.vocab_size)
    save_tokenizer(tokenizer, out)
    ctx.progress.update(1, STEPS[3])

    for doc, tokens in zip(documents, encode_documents(tokenizer, [d.text for d in documents]), strict=True):
        doc.tokens = tokens
    ctx.progress.update(1, STEPS[4])

    rows_by_split = {split: _pack_and_write(documents, split, config, out) for split in ("train", "val")}
    ctx.progress.update(1, STEPS[5])

    stats = dataset_stats(documents, rows_by_split, config.seq_len, tokenizer.get_vocab_size())
    stats["records"] = records
    stats["eval_tasks_by_op"] = {op: sum(f.op == op for f in held_out) for op in arithmetic.SYMBOLS}
    stats["corpus"] = {"python_version": python_version(), "max_operand": config.max_operand}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    metrics = flat_metrics(stats)
    ctx.log.metrics(metrics)
    ctx.log.figure(stats_figure(documents), "data/tokens_per_source.png")
    ctx.progress.update(1, "done")
    return StageResult(metrics=metrics, summary=_summary(stats))


def _corpus(config: Config, seed: int) -> tuple[list[Document], list[arithmetic.Fact], list[arithmetic.Fact]]:
    """(corpus documents, held-out eval facts, training facts)."""
    stdlib = sample_documents(stdlib_documents(), config.max_documents, _rng(seed, "stdlib"))
    facts = arithmetic.all_facts(config.max_operand)
    seen_in_docs = arithmetic.facts_in_text("\n".join(stdlib))  # such facts can never be held out
    held_out, train_facts = arithmetic.split_facts(facts, config.eval_tasks, seen_in_docs, _rng(seed, "eval"))
    arithmetic_docs = arithmetic.arithmetic_documents(
        train_facts, config.arithmetic_documents, _rng(seed, "arithmetic")
    )
    sources = {STDLIB: stdlib, ARITHMETIC: arithmetic_docs}
    return build_corpus(sources, config.val_fraction, _rng(seed, "corpus")), held_out, train_facts


def _check_model_vocab(config: Config, model) -> None:
    model_vocab = getattr(model, "vocab_size", None)
    if model_vocab is not None and model_vocab != config.vocab_size:
        raise UserError(
            f"data.vocab_size={config.vocab_size} differs from the model's vocab_size={model_vocab}; "
            "the tokenizer must fill the model's embedding table, so set them equal"
        )


def _rng(seed: int, purpose: str) -> random.Random:
    """One independent stream per purpose: changing one count never reshuffles the others."""
    return random.Random(f"{seed}:{purpose}")


def _post_training_sets(config: Config, train_facts, held_out, seed: int) -> dict[str, list[dict]]:
    """{relative path: records} for sft/, preferences/ (training facts) and tasks/ (held-out facts)."""
    sft = arithmetic.sft_examples(train_facts, config.sft_examples, _rng(seed, "sft"))
    preferences = arithmetic.preference_pairs(train_facts, config.preference_pairs, _rng(seed, "preferences"))
    sets = {}
    for name, records in (("sft", sft), ("preferences", preferences)):
        sets[f"{name}/train.jsonl"], sets[f"{name}/val.jsonl"] = holdout_split(records, config.val_fraction)
    sets["tasks/val.jsonl"] = arithmetic.eval_tasks(held_out, _rng(seed, "tasks"))
    return sets


def _strip_special(text: str) -> str:
    """Chat text for tokenizer training: the special tokens are added, not learned."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, " ")
    return text


def _pack_and_write(documents: list[Document], split: str, config: Config, out: Path) -> list[dict]:
    chosen = [d for d in documents if d.split == split]
    rows = list(pack_documents([d.tokens for d in chosen], config.seq_len, [d.id for d in chosen], pad_id=PAD_ID))
    directory = out / split
    for stale in directory.glob("shard-*.tar"):  # a rerun into the same directory
        stale.unlink()
    write_row_shards(rows, directory, config.rows_per_shard)
    return rows


def _summary(stats: dict) -> str:
    sources = ", ".join(f"{v['tokens']:,} {k}" for k, v in stats["sources"].items())
    return (
        f"{stats['documents']:,} documents -> {stats['tokens']:,} tokens ({sources}) in "
        f"{stats['splits']['train']['rows']:,}+{stats['splits']['val']['rows']:,} rows of {stats['seq_len']} "
        f"({stats['packing_efficiency']:.1%} packed), vocab {stats['tokenizer_vocab_size']}, "
        f"{stats['records']['sft_train']} SFT / {stats['records']['preferences_train']} pref / "
        f"{stats['records']['tasks_val']} eval items"
    )
