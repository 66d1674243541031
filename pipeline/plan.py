"""`python -m pipeline plan`: the stage graph, cache status, resources and memory per GPU."""

from __future__ import annotations

from .config import PipelineConfig
from .contract import requested
from .graph import Selection
from .memory import GPU_GIB, GiB, count_params, micro_batch_rows, min_gpus, serving_weights_gb, training_memory
from .redact import redact_text
from .runner import make_store, plan_stages


def print_plan(cfg: PipelineConfig, conf: str, selection: Selection, dry_run: bool) -> None:
    store = make_store(cfg)
    planned = plan_stages(cfg, store, selection)
    total, active = _counts(cfg)
    print(f"pipeline conf={conf}{' (dry run)' if dry_run else ''}  model {cfg.model.name} ({cfg.model.family})")
    print(f"  parameters: {_human(total)} total, {_human(active)} active per token (embeddings excluded)")
    print(f"  artifacts:  {redact_text(cfg.artifacts.root)}\n")
    print(" -> ".join(p.node.name for p in planned) + "\n")
    print(f"{'stage':9s} {'status':8s} {'key':16s} {'CPUs':>5s} {'GPUs':>5s}  inputs")
    for p in planned:
        section = cfg.section(p.node.config_path)
        status = "run" if p.run else ("cached" if p.cached else "skip")
        inputs = ", ".join(f"{k}<-{v}" for k, v in p.node.inputs.items())
        need = requested(section)
        print(f"{p.node.name:9s} {status:8s} {p.key[:16]} {need.cpus:5g} {need.gpus:5g}  {inputs}")
    _print_memory(cfg)


def _human(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _counts(cfg: PipelineConfig) -> tuple[int, int]:
    from .memory import count_params

    return count_params(cfg.model)


def _print_memory(cfg: PipelineConfig) -> None:
    """Per-GPU memory of each model stage for its configured workers (estimates)."""
    seq = cfg.data.seq_len
    print(
        "\nmemory per GPU (estimate; fp32 weights, grads and AdamW states, bf16 working copies with the "
        "params; activations under each stage's recompute and loss_impl):"
    )
    print(
        f"  {'stage':9s} {'workers':>7s} {'micro-batch':>11s} {'params':>9s} {'grads':>9s} {'optim':>9s} "
        f"{'activ.':>9s} {'total':>9s}  GiB"
    )
    sections = [("pretrain", cfg.pretrain, seq)]
    for method in cfg.posttrain.recipe:
        section = getattr(cfg.posttrain, method)
        sections.append((method, section, section.max_length))
    for name, section, length in sections:
        workers = max(section.num_workers, 1)
        if name == "pretrain":
            micro = micro_batch_rows(section.batch_size, workers, section.micro_batch_size)
        else:  # rows of one forward: a chat, a pair's two rows, a prompt's group of completions
            micro = section.forward_rows()
        # the workers' own choice (`parallel`, auto resolved per model), as `Layout` makes it
        sharded = section.parallel_for(cfg.model) == "fsdp"
        ep = getattr(section, "expert_parallel", 1)
        loss_impl = getattr(section, "loss_impl", "logits")  # DPO and RL objectives take the whole logits
        recompute, every = section.recompute, section.recompute_every
        plan = training_memory(
            cfg.model, workers, micro, length, sharded, ep, section.precision, recompute, loss_impl, every
        )
        # RLVR / UPO keep the frozen input model (fp32, spread like the policy) for their KL and DPO terms;
        # DPO computes its reference log-probs once before training and keeps only those
        reference = name != "pretrain" and section.keeps_reference()
        extra = plan.total_params * 4 / (workers if sharded else 1) / GiB if reference else 0.0
        total = plan.total_gb + extra
        print(
            f"  {name:9s} {workers:7d} {f'{micro} x {length}':>11s} {plan.params_gb + extra:9.2f} "
            f"{plan.grads_gb:9.2f} {plan.optimizer_gb:9.2f} {plan.activations_gb:9.2f} {total:9.2f}"
        )
    weights = count_params(cfg.model)[0] * 2 / GiB  # bf16
    print(f"  {'quantize':9s} {1:7d} {'-':>11s} {weights:9.2f} {'':9s} {'':9s} {'':9s} {weights:9.2f}  (bf16 in)")
    q = cfg.quantize
    served = serving_weights_gb(cfg.model, q.bits, q.group_size, list(q.skip), dict(q.module_bits))
    widths = "/".join(f"int{b}" for b in [q.bits, *sorted(set(q.module_bits.values()) - {q.bits})])
    sv = cfg.serve
    if sv.backend == "vllm":  # vLLM shards a replica over tensor_parallel_size x pipeline_parallel_size GPUs
        from stages.serve.vllm_backend import engines, gpus_per_engine

        replicas, per_replica = engines(sv.vllm), gpus_per_engine(sv.vllm, sv.vllm.tensor_parallel_size or 1)
        over = f"serve.vllm tensor x pipeline parallel = {per_replica}"
    else:  # our engine runs a replica on one device
        replicas, per_replica, over = (
            sv.num_replicas,
            max(sv.replica_gpus, 1),
            f"serve.replica_gpus={sv.replica_gpus:g}",
        )
    print(
        f"  {'serve':9s} {replicas:7d} {'-':>11s} {served / per_replica:9.2f} {'':9s} {'':9s} {'':9s} "
        f"{served / per_replica:9.2f}  ({widths} g{q.group_size} weights over {over}, before KV cache)"
    )
    need = min_gpus(served)
    short = ""
    if sv.backend == "vllm" and per_replica < need:
        short = f"; serve.vllm's {per_replica} GPU(s) per replica are too few"
    elif sv.backend != "vllm" and need > 1:
        short = (
            "; the engine backend runs a replica on one device: serve this model with serve.backend=vllm and "
            f"serve.vllm.tensor_parallel_size={need if need & (need - 1) == 0 else 1 << need.bit_length()}"
        )
    print(
        f"\nserving: {served:.1f} GiB of {widths} weights a replica need at least {need} x {GPU_GIB} GiB GPU(s) "
        f"(90% of each for weights, the rest for KV cache and runtime){short}"
    )
