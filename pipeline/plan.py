"""`python -m pipeline plan`: the stage graph, cache status, resources and memory per GPU."""

from __future__ import annotations

from .config import PipelineConfig, gpus_requested
from .graph import Selection
from .memory import training_memory
from .runner import make_store, plan_stages


def print_plan(cfg: PipelineConfig, conf: str, selection: Selection, dry_run: bool) -> None:
    store = make_store(cfg)
    planned = plan_stages(cfg, store, selection)
    total, active = _counts(cfg)
    print(f"pipeline conf={conf}{' (dry run)' if dry_run else ''}  model {cfg.model.name} ({cfg.model.family})")
    print(f"  parameters: {_human(total)} total, {_human(active)} active per token (embeddings excluded)")
    print(f"  artifacts:  {cfg.artifacts.root}\n")
    print(" -> ".join(p.node.name for p in planned) + "\n")
    print(f"{'stage':9s} {'status':8s} {'key':16s} {'CPUs':>5s} {'GPUs':>5s}  inputs")
    for p in planned:
        section = cfg.section(p.node.config_path)
        status = "run" if p.run else ("cached" if p.cached else "skip")
        inputs = ", ".join(f"{k}<-{v}" for k, v in p.node.inputs.items())
        cpus = section.resources.num_cpus + getattr(section, "cpus_per_worker", 0) * getattr(section, "num_workers", 0)
        print(
            f"{p.node.name:9s} {status:8s} {p.key[:16]} {cpus:5g} {gpus_requested(cfg, p.node.config_path):5g}"
            f"  {inputs}"
        )
    _print_memory(cfg)


def _human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _counts(cfg: PipelineConfig) -> tuple[int, int]:
    from .memory import count_params

    return count_params(cfg.model)


def _print_memory(cfg: PipelineConfig) -> None:
    pt = cfg.pretrain
    workers = max(pt.num_workers, 1)
    micro = max(pt.batch_size // workers, 1)
    shard = getattr(pt, "fsdp", False)
    ep = getattr(pt, "expert_parallel", 1)
    plan = training_memory(cfg.model, workers, micro, cfg.data.seq_len, shard, ep)
    print(
        f"\nmemory per GPU, pretrain (estimate: {workers} worker(s), micro-batch {micro} x {cfg.data.seq_len}, "
        f"{'FSDP-sharded' if shard else 'replicated'} states, expert parallel {ep}):"
    )
    rows = [
        ("parameters (bf16 + fp32 master)", plan.params_gb),
        ("gradients (fp32)", plan.grads_gb),
        ("optimizer states (AdamW, fp32)", plan.optimizer_gb),
        ("activations (no recompute)", plan.activations_gb),
        ("total", plan.total_gb),
    ]
    for label, gb in rows:
        print(f"  {label:34s} {gb:10.2f} GiB")
