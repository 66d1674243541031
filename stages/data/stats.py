"""Token-balance and packing statistics (`stats.json`), their flat metrics, and the plots.

Counts come from the rows actually written, so per-source tokens add up to the shards'
non-padding slots. "vision" tokens are image placeholder tokens (modality 1); everything
else that is not padding (text, bos/eos, image start/end markers) is "text". The stats are
accumulated window by window and saved with the stage's progress, so a resumed stage reports
the same numbers as one that never stopped.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .packing import group_vision_fractions

LENGTH_BINS = 24
"""Document-length histogram bins: [2^k, 2^(k+1)) tokens."""


class StatsAccumulator:
    def __init__(self) -> None:
        self.sources: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.splits: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.length_histogram = [0] * LENGTH_BINS
        self.row_vision: dict[str, list[int]] = defaultdict(list)
        self.row_text: dict[str, list[int]] = defaultdict(list)
        self.shards: dict[str, list[dict]] = defaultdict(list)
        self.lengths: list[int] = []  # exact lengths of the first documents, for the plot
        self.max_length = 0

    # ------------------------------------------------------------------ accumulate
    def add_document(self, split: str, doc) -> None:
        n = len(doc.tokens)
        vision = int((doc.modality == 1).sum()) if doc.modality is not None else 0
        source = self.sources[doc.source]
        source["documents"] += 1
        source["tokens"] += n
        source["vision_tokens"] += vision
        source["images"] += len(doc.images)
        source[f"documents_{split}"] += 1
        self.splits[split]["documents"] += 1
        self.length_histogram[min(int(np.log2(max(n, 1))), LENGTH_BINS - 1)] += 1
        self.max_length = max(self.max_length, n)
        if len(self.lengths) < 100_000:
            self.lengths.append(n)

    def add_rows(self, split: str, vision: np.ndarray, text: np.ndarray, seq_len: int, shard_rows: list[int]) -> None:
        self.row_vision[split] += vision.tolist()
        self.row_text[split] += text.tolist()
        self.splits[split]["rows"] += len(vision)
        self.splits[split]["slots"] += len(vision) * seq_len
        at = 0
        for rows in shard_rows:
            self.shards[split].append(
                {
                    "rows": rows,
                    "text_tokens": int(text[at : at + rows].sum()),
                    "vision_tokens": int(vision[at : at + rows].sum()),
                }
            )
            at += rows

    # ------------------------------------------------------------------ persist (resume)
    def to_state(self) -> dict:
        """The counts as they are now, sharing nothing with the accumulator: a window's saved progress is
        taken when it is packed and written once its shards are on disk, after later windows added theirs."""
        return {
            "sources": {k: dict(v) for k, v in self.sources.items()},
            "splits": {k: dict(v) for k, v in self.splits.items()},
            "length_histogram": list(self.length_histogram),
            "row_vision": {k: list(v) for k, v in self.row_vision.items()},
            "row_text": {k: list(v) for k, v in self.row_text.items()},
            "shards": {k: list(v) for k, v in self.shards.items()},
            "lengths": list(self.lengths),
            "max_length": self.max_length,
        }

    @staticmethod
    def from_dict(state: dict) -> StatsAccumulator:
        acc = StatsAccumulator()
        for name, counts in state["sources"].items():
            acc.sources[name].update(counts)
        for name, counts in state["splits"].items():
            acc.splits[name].update(counts)
        acc.length_histogram = state["length_histogram"]
        acc.row_vision.update(state["row_vision"])
        acc.row_text.update(state["row_text"])
        acc.shards.update(state["shards"])
        acc.lengths, acc.max_length = state["lengths"], state["max_length"]
        return acc

    # ------------------------------------------------------------------ report
    def to_dict(self, config, scans: dict, mixture: dict, targets: dict) -> dict:
        """The `stats.json` content; record counts and corpus facts are added by the caller."""
        seq_len = config.seq_len
        splits = {}
        for split in ("train", "val"):
            vision = np.asarray(self.row_vision.get(split, []), dtype=np.int64)
            text = np.asarray(self.row_text.get(split, []), dtype=np.int64)
            slots = max(len(vision) * seq_len, 1)
            splits[split] = {
                "documents": self.splits[split]["documents"],
                "rows": len(vision),
                "tokens": int(vision.sum() + text.sum()),
                "text_tokens": int(text.sum()),
                "vision_tokens": int(vision.sum()),
                "packing_efficiency": float((vision.sum() + text.sum()) / slots),
                "shards": self.shards.get(split, []),
                "rows_balance": _row_balance(vision, text),
                "micro_batches": _group_balance(vision, text, config.balance.group_rows, config.balance.band),
            }
        total_rows = sum(s["rows"] for s in splits.values())
        total_tokens = sum(s["tokens"] for s in splits.values())
        vision_total = sum(s["vision_tokens"] for s in splits.values())
        return {
            "seq_len": seq_len,
            "documents": sum(s["documents"] for s in splits.values()),
            "tokens": total_tokens,
            "rows": total_rows,
            "packing_efficiency": total_tokens / max(total_rows * seq_len, 1),
            "sources": {
                name: {
                    "documents": counts["documents"],
                    "tokens": counts["tokens"],
                    "text_tokens": counts["tokens"] - counts["vision_tokens"],
                    "vision_tokens": counts["vision_tokens"],
                    "images": counts["images"],
                    "target_tokens": targets.get(name, 0),
                    "epochs": counts["documents"] / max(scans[name].documents, 1),
                }
                for name, counts in sorted(self.sources.items())
            },
            "modalities": {
                "text": {"tokens": total_tokens - vision_total},
                "vision": {
                    "tokens": vision_total,
                    "images": sum(c["images"] for c in self.sources.values()),
                },
            },
            "text_vision_ratio": (total_tokens - vision_total) / vision_total if vision_total else None,
            "mixture": mixture,
            "errors": {
                name: {"counts": dict(scan.errors), "examples": scan.examples}
                for name, scan in sorted(scans.items())
                if scan.errors
            },
            "splits": splits,
            "document_length": {
                "histogram_log2": {f"{2**k}-{2 ** (k + 1) - 1}": c for k, c in enumerate(self.length_histogram) if c},
                "mean": float(np.mean(self.lengths)) if self.lengths else 0.0,
                "median": float(np.median(self.lengths)) if self.lengths else 0.0,
                "p90": float(np.percentile(self.lengths, 90)) if self.lengths else 0.0,
                "max": self.max_length,
                "longer_than_seq_len": sum(n > seq_len for n in self.lengths),
            },
        }


def _row_balance(vision: np.ndarray, text: np.ndarray) -> dict:
    """Per-row vision share: how unevenly single rows mix the modalities."""
    real = vision + text
    if not len(real):
        return {}
    share = vision / np.maximum(real, 1)
    return {
        "image_tokens_per_row_mean": float(vision.mean()),
        "image_tokens_per_row_max": int(vision.max()),
        "rows_with_images": int((vision > 0).sum()),
        "vision_share_mean": float(share.mean()),
        "vision_share_std": float(share.std()),
        "vision_share_p10": float(np.percentile(share, 10)),
        "vision_share_p90": float(np.percentile(share, 90)),
    }


def group_shares(vision: np.ndarray, text: np.ndarray, group_rows: int) -> np.ndarray:
    """Vision-token share of each micro-batch: consecutive `group_rows` rows as written (a short last group counts)."""
    return group_vision_fractions(np.arange(len(vision)), vision, text, group_rows)


def _group_balance(vision: np.ndarray, text: np.ndarray, group_rows: int, band: float) -> dict:
    if not len(vision):
        return {}
    shares = group_shares(vision, text, group_rows)
    target = float(vision.sum() / max(vision.sum() + text.sum(), 1))
    within = np.abs(shares - target) <= band
    return {
        "group_rows": group_rows,
        "count": len(shares),
        "target_vision_share": target,
        "band": band,
        "within_band": float(within.mean()),
        "vision_share_min": float(shares.min()),
        "vision_share_max": float(shares.max()),
        "vision_share_std": float(shares.std()),
    }


def flat_metrics(stats: dict) -> dict[str, float]:
    """The numbers a user compares across runs, as MLflow metric names."""
    metrics = {
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "rows": stats["rows"],
        "packing_efficiency": stats["packing_efficiency"],
        "tokenizer_vocab_size": stats["tokenizer_vocab_size"],
        "seq_len": stats["seq_len"],
        "mean_document_tokens": stats["document_length"]["mean"],
        "tokens/modality/text": stats["modalities"]["text"]["tokens"],
        "tokens/modality/vision": stats["modalities"]["vision"]["tokens"],
        "images": stats["modalities"]["vision"]["images"],
    }
    for name, counts in stats["sources"].items():
        metrics[f"tokens/source/{name}"] = counts["tokens"]
        metrics[f"documents/source/{name}"] = counts["documents"]
        metrics[f"mixture/realised/{name}"] = stats["mixture"][name]["realised"]
        metrics[f"mixture/asked/{name}"] = stats["mixture"][name]["asked"]
    for name, errors in stats["errors"].items():
        for kind, count in errors["counts"].items():
            metrics[f"errors/{name}/{kind}"] = count
    for split, counts in stats["splits"].items():
        metrics[f"rows/{split}"] = counts["rows"]
        metrics[f"tokens/{split}"] = counts["tokens"]
        metrics[f"packing_efficiency/{split}"] = counts["packing_efficiency"]
        if counts["micro_batches"]:
            metrics[f"balance/{split}/within_band"] = counts["micro_batches"]["within_band"]
            metrics[f"balance/{split}/vision_share_std"] = counts["micro_batches"]["vision_share_std"]
    for name, count in stats.get("records", {}).items():
        metrics[f"records/{name}"] = count
    return {k: float(v) for k, v in metrics.items()}


def stats_figures(stats: dict, acc: StatsAccumulator) -> dict:
    """Plots for MLflow: tokens per source and modality with the mixture, lengths, token balance."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state inside a Ray actor

    sources = sorted(stats["sources"])
    mix = Figure(figsize=(11, 4), layout="constrained")
    bars, shares = mix.subplots(1, 2)
    text = [stats["sources"][s]["text_tokens"] for s in sources]
    vision = [stats["sources"][s]["vision_tokens"] for s in sources]
    bars.bar(sources, text, label="text", color="C0")
    bars.bar(sources, vision, bottom=text, label="vision", color="C1")
    bars.set_title("tokens per source and modality")
    bars.legend()
    x = np.arange(len(sources))
    shares.bar(x - 0.2, [stats["mixture"][s]["asked"] for s in sources], 0.4, label="asked")
    shares.bar(x + 0.2, [stats["mixture"][s]["realised"] for s in sources], 0.4, label="realised")
    shares.set_xticks(x, sources)
    shares.set_title("mixture: token share per source")
    shares.legend()

    lengths = Figure(figsize=(6, 4), layout="constrained")
    hist = lengths.subplots()
    top = max(acc.lengths or [2])
    hist.hist(acc.lengths, bins=np.unique(np.geomspace(1, max(top, 2), 40).astype(int)))
    hist.set_xscale("log")
    hist.set_title("document length")
    hist.set_xlabel("tokens per document")
    hist.set_ylabel("documents")

    balance = Figure(figsize=(11, 4), layout="constrained")
    rows_ax, groups_ax = balance.subplots(1, 2)
    train_v = np.asarray(acc.row_vision.get("train", []))
    train_t = np.asarray(acc.row_text.get("train", []))
    row_share = train_v / np.maximum(train_v + train_t, 1)
    rows_ax.hist(row_share, bins=40, color="C0")
    rows_ax.set_title("vision share per packed row (train)")
    groups = stats["splits"]["train"]["micro_batches"]
    if groups:
        group_share = group_shares(train_v, train_t, groups["group_rows"])
        groups_ax.hist(group_share, bins=40, color="C1")
        for edge in (groups["target_vision_share"] - groups["band"], groups["target_vision_share"] + groups["band"]):
            groups_ax.axvline(edge, color="k", linestyle="--")
        groups_ax.set_title(f"vision share per micro-batch of {groups['group_rows']} rows (band dashed)")
    return {"tokens_per_source": mix, "document_length": lengths, "token_balance": balance}
