"""A stage for the tracking relay's tests: logs a burst of metrics, a param, a text and a figure, then
returns or raises (`config["fail"]`), after lingering `config["linger_s"]` seconds if asked (so the driver reads the
last burst while the stage still runs)."""

from __future__ import annotations

import time

from pipeline.contract import StageContext, StageResult

BURST = 1500
"""Metrics logged back to back just before the stage ends: more than one MLflow batch, all in the last poll."""


def run(ctx: StageContext) -> StageResult:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx.log.params({"examples": {"train": 7}, "api_token": "s3cr3t-value"})
    ctx.log.text("first line\n", "notes/relay.txt")
    figure = plt.figure()
    figure.gca().plot([0, 1], [1, 0])
    ctx.log.figure(figure, "plots/line.png")
    plt.close(figure)
    for step in range(BURST):
        ctx.log.metrics({"loss": 1.0 / (step + 1)}, step=step)
    time.sleep(ctx.config.get("linger_s", 0.0))
    if ctx.config["fail"]:
        raise ValueError("the relay stage failed on purpose")
    (ctx.output_dir / "out.txt").write_text("done\n")
    return StageResult(metrics={"last_loss": 1.0 / BURST}, summary="relayed")
