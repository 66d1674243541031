"""Measured quality of a quantized model: task accuracy before / after and a per-module error plot.

The perplexity (`ernie.evaluation.val_loss`'s definition, which the eval stage reports) is measured in the
streaming pass itself (stages/quantize/stream.py); task accuracy is `ernie.tasks`', the eval stage's too.
"""

from __future__ import annotations

from pathlib import Path

from ernie.tasks import accuracy_by_task, balanced_items, task_predictions
from pipeline.formats import read_jsonl


def plot_layer_errors(names: list[str], errors: list[float], title: str):
    """A bar chart of the relative weight reconstruction error of each quantized module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names)), 4.0))
    ax.bar(range(len(errors)), errors, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("relative error ||W - Q(W)|| / ||W||")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _short(name: str) -> str:
    """model.layers.3.mlp.text.experts -> 3.mlp.text.experts"""
    return name.removeprefix("model.layers.")


class TaskAccuracy:
    """Task accuracy before / after quantizing: greedy answers to the dataset's task items, exact match per task
    (`ernie.tasks`, the eval stage's definition), on whole models loaded only when they fit the memory cap."""

    def __init__(self, items: list[dict], tokenizer, batch_size: int, max_new_tokens: int) -> None:
        self.items, self.tokenizer = items, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.accuracy: dict[str, dict[str, float]] = {}
        """"before" / "after" -> {"": overall, task: accuracy}"""
        self.not_measured: dict[str, str] = {}

    @classmethod
    def from_file(cls, tasks_path: Path, tokenizer_path: Path, cfg) -> TaskAccuracy | None:
        """The items of `tasks_path` (`cfg.eval_items` of them, round-robin over tasks); None without any."""
        items = balanced_items(read_jsonl(tasks_path), cfg.eval_items) if tasks_path.is_file() else []
        if not items:
            return None
        from tokenizers import Tokenizer

        return cls(items, Tokenizer.from_file(str(tokenizer_path)), cfg.batch_size, cfg.max_new_tokens)

    def measure(self, which: str, load, need_bytes: int, cap_bytes: int):
        """Measure `which` ("before" / "after") on the model `load()` returns when the `need_bytes` it takes to load
        fit under `cap_bytes`; else record why not. Returns the model loaded, or None."""
        if need_bytes > cap_bytes:
            self.not_measured[which] = (
                f"loading the {'full-precision' if which == 'before' else 'quantized'} model takes "
                f"{need_bytes / 2**30:.3g} GiB, over the memory cap of {cap_bytes / 2**30:.3g} GiB "
                "(quantize.max_memory_gb; 0 = the machine's memory)"
            )
            return None
        model = load().eval()
        predictions = task_predictions(model, self.tokenizer, self.items, self.batch_size, self.max_new_tokens)
        per_task, counts = accuracy_by_task(self.items, predictions)
        overall = sum(per_task[t] * counts[t] for t in counts) / len(self.items)
        self.accuracy[which] = {"": overall, **per_task}
        return model

    def metrics(self) -> dict[str, float]:
        """task_accuracy_before / _after and, per task, task_accuracy_before/<task>..., for what was measured."""
        return {
            f"task_accuracy_{which}" + (f"/{task}" if task else ""): value
            for which, accuracy in self.accuracy.items()
            for task, value in accuracy.items()
        }

    def report(self) -> dict:
        counts = accuracy_by_task(self.items, [""] * len(self.items))[1]
        report = {"task_items": counts}
        for which in ("before", "after"):
            report[f"task_accuracy_{which}"] = self.accuracy.get(which, {}).get("")
        report |= {k: v for k, v in self.metrics().items() if "/" in k}
        if self.not_measured:
            report["task_accuracy_not_measured"] = self.not_measured
        return report
