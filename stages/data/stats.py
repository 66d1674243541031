"""Token-balance and packing statistics (`stats.json`), their flat metrics, and one plot.

Token counts include each document's bos and eos, so per-source tokens add up to the
non-padding slots of the shards.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from .corpus import Document
from .packing import PAD_DOCUMENT_ID


def packing_stats(rows: list[dict[str, np.ndarray]]) -> dict:
    """Rows, slots, real tokens, efficiency and documents per row of one split's rows."""
    if not rows:
        return {"rows": 0, "tokens": 0, "packing_efficiency": 0.0, "avg_documents_per_row": 0.0}
    document_ids = np.stack([r["document_ids"] for r in rows])
    real = document_ids != PAD_DOCUMENT_ID
    per_row = [len(np.unique(row[mask])) for row, mask in zip(document_ids, real, strict=True)]
    return {
        "rows": len(rows),
        "tokens": int(real.sum()),
        "packing_efficiency": float(real.mean()),
        "avg_documents_per_row": float(np.mean(per_row)),
    }


def dataset_stats(documents: list[Document], rows_by_split: dict[str, list[dict]], seq_len: int, vocab: int) -> dict:
    """The `stats.json` content (see the keys); record counts are added by the caller."""
    by_source: dict[str, Counter] = defaultdict(Counter)
    by_modality: dict[str, Counter] = defaultdict(Counter)
    for doc in documents:
        for table, key in ((by_source, doc.source), (by_modality, doc.modality)):
            table[key]["documents"] += 1
            table[key]["tokens"] += len(doc.tokens)
            table[key][f"{doc.split}_documents"] += 1
    splits = {}
    for split, rows in rows_by_split.items():
        in_split = [d for d in documents if d.split == split]
        splits[split] = {"documents": len(in_split), **packing_stats(rows)}
    all_rows = [r for rows in rows_by_split.values() for r in rows]
    lengths = np.array([len(d.tokens) for d in documents])
    return {
        "seq_len": seq_len,
        "tokenizer_vocab_size": vocab,
        "documents": len(documents),
        "tokens": int(lengths.sum()),
        "sources": {k: dict(v) for k, v in sorted(by_source.items())},
        "modalities": {k: dict(v) for k, v in sorted(by_modality.items())},
        "splits": splits,
        **packing_stats(all_rows),
        "document_length": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "longer_than_seq_len": int((lengths > seq_len).sum()),
        },
    }


def flat_metrics(stats: dict) -> dict[str, float]:
    """The numbers a user compares across runs, as MLflow metric names."""
    metrics = {
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "rows": stats["rows"],
        "packing_efficiency": stats["packing_efficiency"],
        "avg_documents_per_row": stats["avg_documents_per_row"],
        "tokenizer_vocab_size": stats["tokenizer_vocab_size"],
        "seq_len": stats["seq_len"],
        "mean_document_tokens": stats["document_length"]["mean"],
    }
    for group, prefix in (("sources", "source"), ("modalities", "modality")):
        for name, counts in stats[group].items():
            metrics[f"tokens/{prefix}/{name}"] = counts["tokens"]
            metrics[f"documents/{prefix}/{name}"] = counts["documents"]
    for split, counts in stats["splits"].items():
        metrics[f"rows/{split}"] = counts["rows"]
        metrics[f"tokens/{split}"] = counts["tokens"]
        metrics[f"packing_efficiency/{split}"] = counts["packing_efficiency"]
    for name, count in stats.get("records", {}).items():
        metrics[f"records/{name}"] = count
    return {k: float(v) for k, v in metrics.items()}


def stats_figure(documents: list[Document]):
    """Tokens per source (bars) and document length per source (histogram)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state inside a Ray actor

    lengths: dict[str, list[int]] = defaultdict(list)
    for doc in documents:
        lengths[doc.source].append(len(doc.tokens))
    sources = sorted(lengths)
    fig = Figure(figsize=(10, 4), layout="constrained")
    bars, hist = fig.subplots(1, 2)
    bars.bar(sources, [sum(lengths[s]) for s in sources], color=["C0", "C1", "C2"][: len(sources)])
    bars.set_title("tokens per source")
    bars.set_ylabel("tokens (incl. bos/eos)")
    top = max(max(v) for v in lengths.values())
    bins = np.unique(np.geomspace(2, max(top, 3), 40).astype(int))
    for i, source in enumerate(sources):
        hist.hist(lengths[source], bins=bins, alpha=0.6, label=source, color=f"C{i}")
    hist.set_xscale("log")
    hist.set_title("document length")
    hist.set_xlabel("tokens per document")
    hist.set_ylabel("documents")
    hist.legend()
    return fig
