"""What the driver prints: a progress bar per stage, results, the final summary."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .redact import redact_text

# metrics worth a line in the console (all are in MLflow)
HEADLINE = ("val_loss", "eval/val_ppl", "eval/task_accuracy", "size_ratio", "ppl_delta", "reward_accuracy")


class StageBar:
    def __init__(self, name: str) -> None:
        self.bar = tqdm(
            total=None,
            desc=f"{name:9s}",
            unit="step",
            leave=True,
            file=sys.stderr,
            bar_format="{desc} {bar} {n_fmt}/{total_fmt} {elapsed} {postfix}",
        )

    def update(self, snapshot: dict) -> None:
        if snapshot.get("total") and self.bar.total != snapshot["total"]:
            self.bar.total = snapshot["total"]
        self.bar.n = snapshot.get("done", 0)
        self.bar.set_postfix_str(snapshot.get("message", "")[:40], refresh=False)
        self.bar.refresh()

    def close(self, failed: bool = False) -> None:
        if failed:
            self.bar.set_postfix_str("FAILED")
        self.bar.close()


class ConsoleUI:
    def start(self, name: str) -> StageBar:
        return StageBar(name)

    def cached(self, name: str, artifact) -> None:
        by = artifact.manifest.get("pipeline_run", "?")
        print(f"{name:9s} cached   (produced by run {by})  {redact_text(artifact.uri)}")

    def waiting(self, name: str, holder: dict) -> None:
        who = f"run {holder.get('pipeline_run', '?')} (pid {holder.get('pid', '?')})" if holder else "another run"
        print(
            f"{name:9s} waiting: {who} is running this stage with the same cache key; "
            "this run goes on when it finishes (Ctrl-C stops waiting)",
            file=sys.stderr,
            flush=True,
        )

    def finished(self, name: str, artifact, metrics: dict, summary: str, seconds: float) -> None:
        head = "  ".join(f"{k}={metrics[k]:.4g}" for k in HEADLINE if isinstance(metrics.get(k), (int, float)))
        print(f"{name:9s} done in {seconds:5.1f}s  {summary}  {head}".rstrip())

    def failure(self, failure, resume: str) -> None:
        tail = [line for line in redact_text(failure.tb).strip().splitlines() if line.strip()][-6:]
        message = redact_text(f"{failure.error_type}: {failure.message}")
        print(f"\nstage {failure.stage} failed: {message}", file=sys.stderr)
        print("  " + "\n  ".join(tail), file=sys.stderr)
        resume = redact_text(resume)
        print(f"\nFinished stages are cached. After fixing the cause, resume with:\n  {resume}", file=sys.stderr)

    def summary(self, cfg, outcome) -> None:
        print(f"\npipeline run {outcome.run_id} finished")
        print(f"  artifacts: {redact_text(cfg.artifacts.root)}")
        print(f"  MLflow:    parent run {outcome.parent_run} (make ui, then open http://127.0.0.1:5000)")
        for name, s in outcome.stages.items():
            evals = {k: v for k, v in s.get("metrics", {}).items() if k.startswith("eval/")}
            if evals:
                print(f"  {name:9s} " + "  ".join(f"{k[5:]}={v:.4g}" for k, v in sorted(evals.items())))
        if outcome.endpoint:
            print(f"  endpoint (smoke-tested, then shut down): {outcome.endpoint}")
        print(f"  serve it:  python -m pipeline serve conf={cfg.name}")
