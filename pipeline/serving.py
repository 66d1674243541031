"""`python -m pipeline serve`: serve the newest served-model artifact of a preset and block."""

from __future__ import annotations

from .config import PipelineConfig
from .contract import UserError
from .graph import Selection
from .redact import redact_text
from .runner import make_store, plan_stages


def serve_latest(cfg: PipelineConfig, conf: str) -> int:
    from stages.serve import serve_forever

    from .executor import connect

    store = make_store(cfg)
    planned = {p.node.name: p for p in plan_stages(cfg, store, Selection())}
    model, dataset = planned["quantize"].cached, planned["data"].cached
    if model is None or dataset is None:
        raise UserError(
            f"no quantized model for conf={conf} with this configuration under {cfg.artifacts.root}; "
            f"run `python -m pipeline run conf={conf}` first (it caches every stage)"
        )
    connect(cfg.cluster.address, cfg.cluster.local_num_cpus)
    model, dataset = store.fetch(model), store.fetch(dataset)
    print(f"serving {redact_text(model.uri)} on http://{cfg.serve.host}:{cfg.serve.port}/v1 (Ctrl-C stops)")
    serve_forever(model.local_dir(), dataset.local_dir(), cfg.serve)
    return 0
