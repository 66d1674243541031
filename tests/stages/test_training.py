"""pretrain, sft and dpo stages: real Ray Train runs (2 gloo workers, or local mode where distribution is
not the subject) on a small synthetic dataset.

The slow tests share one local Ray and one pretraining run (the reference for exact resume
and the input of SFT, whose output feeds DPO).
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stage_runs import local_ray, make_ctx
from tokenizers import Tokenizer
from training_data import build_dataset

from ernie import ErnieForCausalLM, get_preset
from ernie.batching import collate
from ernie.chat_template import EOS
from ernie.checkpoint import load_pretrained
from pipeline.contract import MemoryLogger, StageContext, UserError
from pipeline.shards import IMAGE_LAYOUT, TEXT_LAYOUT, ShardIndex, iter_rows, write_row_shards
from stages import pretrain
from stages.posttrain import dpo, rewards, rlvr, sft, upo
from stages.posttrain.chat import pad_batch, tokenise_chat
from stages.posttrain.rollout import complete, request_seed
from stages.pretrain.data import TrainReader, unit_rows_for
from stages.training.optim import lr_at

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = dict(
    steps=60,
    batch_size=8,
    lr=3e-3,
    warmup_steps=5,
    eval_every=20,
    checkpoint_every=10,
    router_stats_every=15,
    eval_rows=16,
)
PRETRAIN_WORKERS = pretrain.Config(**PRETRAIN).num_workers
VL_PRETRAIN = {**PRETRAIN, "steps": 20, "lr": 5e-3, "warmup_steps": 3, "eval_every": 10, "router_stats_every": 10}
VL_VOCAB = 400
LOCAL = dict(num_workers=0)
"""Ray Train's local mode (one rank in this process) for the runs whose subject is not distribution."""
STEP_LOG_KEYS = {
    *("loss", "lm", "aux", "z", "orthogonal", "lr", "tokens_per_s", "grad_norm", "router/max_over_mean"),
    *("tflops_per_device", "memory_gb"),
}


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def model_config(dataset):
    vocab = Tokenizer.from_file(str(dataset / "tokenizer" / "tokenizer.json")).get_vocab_size()
    return get_preset("tiny_moe").replace(vocab_size=vocab)


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray()


@pytest.fixture(scope="module")
def vl_dataset(ray_local, tmp_path_factory) -> Path:
    """A small VL dataset written by the real data stage: stdlib text and generated scenes (images)."""
    from stages import data

    sources = [
        data.config.SourceConfig(name="stdlib-docs", kind="stdlib", weight=0.5),
        data.config.SourceConfig(name="scenes", kind="scenes", weight=0.5),
    ]
    config = data.Config(
        sources=sources,
        vocab_size=VL_VOCAB,
        seq_len=64,
        max_documents=80,
        arithmetic_documents=0,
        scenes=60,
        rows_per_shard=8,
        window_rows=64,
        sft_examples=10,
        preference_pairs=10,
        eval_tasks=10,
        val_fraction=0.1,
    )
    out = tmp_path_factory.mktemp("vl-dataset")
    data.run(StageContext("data", config, get_preset("tiny_vl").replace(vocab_size=VL_VOCAB), {}, out))
    return out


@pytest.fixture(scope="module")
def vl_pretrained(vl_dataset, tmp_path_factory):
    model = get_preset("tiny_vl").replace(vocab_size=VL_VOCAB)
    root = tmp_path_factory.mktemp("vl-pretrain")
    ctx = make_ctx("pretrain", pretrain.Config(**VL_PRETRAIN), model, {"dataset": vl_dataset}, root)
    started = time.perf_counter()
    result = pretrain.run(ctx)
    return ctx, result, time.perf_counter() - started


@pytest.fixture(scope="module")
def pretrained(ray_local, dataset, model_config, tmp_path_factory):
    ctx = make_ctx(
        "pretrain", pretrain.Config(**PRETRAIN), model_config, {"dataset": dataset}, tmp_path_factory.mktemp("pretrain")
    )
    started = time.perf_counter()
    result = pretrain.run(ctx)
    return ctx, result, time.perf_counter() - started


@pytest.fixture(scope="module")
def sft_run(pretrained, dataset, tmp_path_factory):
    config = sft.Config(steps=40, batch_size=16, lr=2e-3, eval_every=20, checkpoint_every=20, **LOCAL)
    ctx = make_ctx(
        "sft", config, None, {"ckpt": pretrained[0].output_dir, "dataset": dataset}, tmp_path_factory.mktemp("sft")
    )
    return ctx, sft.run(ctx)


@pytest.fixture(scope="module")
def dpo_run(sft_run, dataset, tmp_path_factory):
    config = dpo.Config(steps=40, batch_size=16, lr=1e-3, beta=0.5, eval_every=20, checkpoint_every=20, **LOCAL)
    ctx = make_ctx(
        "dpo", config, None, {"ckpt": sft_run[0].output_dir, "dataset": dataset}, tmp_path_factory.mktemp("dpo")
    )
    return ctx, dpo.run(ctx)


# ---------------------------------------------------------------------- pretrain
@pytest.mark.slow
def test_pretrain_lowers_loss_and_writes_a_loadable_hf_checkpoint(pretrained):
    ctx, result, seconds = pretrained
    m = result.metrics
    print(f"\npretrain {seconds:.1f}s: {result.summary}")
    assert m["steps"] == PRETRAIN["steps"]
    assert m["loss_last10"] < 0.4 * m["loss_first"], m
    assert m["val_loss"] < 0.4 * m["val_loss_initial"], m
    out = ctx.output_dir
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer/tokenizer.json",
        "train_state/history.json",
        f"train_state/step-{PRETRAIN['steps']:08d}/extra.pt",
        f"train_state/step-{PRETRAIN['steps']:08d}/.metadata",  # torch.distributed.checkpoint's index
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "train_state").glob("step-*"))) == 1, "only the last train state is kept"
    shards = list((out / "train_state" / f"step-{PRETRAIN['steps']:08d}").glob("*.distcp"))
    assert len(shards) == PRETRAIN_WORKERS, "each worker writes its own shard of the train state"
    assert pretrain.Config(**PRETRAIN).parallel_for(ctx.model) == "fsdp", "text models train sharded by default"
    model = load_pretrained(out)
    ids = torch.tensor([[1, 20, 30, 40]])
    assert torch.isfinite(model(ids).logits).all()
    assert json.loads((out / "train_state" / "meta.json").read_text())["step"] == PRETRAIN["steps"]
    # aux-free balancing moved the routers' selection biases, and the checkpoint keeps them
    biases = [b for name, b in model.state_dict().items() if name.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    assert m["tflops_per_device"] > 0 and "mfu" not in m  # no MFU without a known peak (CPU)


@pytest.mark.slow
def test_pretrain_logs_every_step_router_balance_figures_and_progress(pretrained):
    ctx, _, _ = pretrained
    log: MemoryLogger = ctx.log
    steps_per_key = {}
    for key, _, step in log.metric_log:
        steps_per_key.setdefault(key, set()).add(step)
    assert STEP_LOG_KEYS <= set(steps_per_key), STEP_LOG_KEYS - set(steps_per_key)
    assert steps_per_key["loss"] == set(range(1, PRETRAIN["steps"] + 1))
    assert steps_per_key["router/layer1/max_over_mean"] == {15, 30, 45, 60}
    assert steps_per_key["val_loss"] == {0, 20, 40, 60}
    assert {"loss_curve.png", "router_load.png"} <= set(log.artifact_log)
    assert ctx.progress.snapshot()["done"] == PRETRAIN["steps"]


def _run_in_subprocess(ray_local, ctx: StageContext, root: Path) -> subprocess.Popen:
    """Start the same pretrain run in another driver process connected to this test's Ray."""
    job = root / "job.pkl"
    job.write_bytes(
        pickle.dumps(
            {
                "address": ray_local.get_runtime_context().gcs_address,
                "config": ctx.config,
                "model": ctx.model,
                "dataset": ctx.inputs["dataset"].uri,
                "root": str(root),
                "seed": ctx.seed,
            }
        )
    )
    code = (
        "import pickle, sys, ray; from pathlib import Path; "
        "from pipeline.contract import Artifact, StageContext; from stages import pretrain; "
        "j = pickle.loads(Path(sys.argv[1]).read_bytes()); ray.init(address=j['address'], log_to_driver=False); "
        "pretrain.run(StageContext(stage='pretrain', config=j['config'], model=j['model'], "
        "inputs={'dataset': Artifact('dataset', j['dataset'], 'key-dataset')}, output_dir=Path(j['root']) / 'out', "
        "seed=j['seed'], work_dir=Path(j['root']) / 'work'))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(job)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill_after_checkpoint(proc: subprocess.Popen, meta: Path, past_step: int, timeout: float = 120) -> int:
    """SIGKILL the driver once the train state holds a step > `past_step`; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        step = json.loads(meta.read_text())["step"] if meta.is_file() else 0
        if step > past_step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return step
        time.sleep(0.02)
    raise AssertionError(f"no train state past step {past_step} within {timeout}s")


def _wait_for_idle_cluster(ray_local, timeout: float = 60) -> None:
    """The killed driver's workers are gone once every CPU is free again."""
    deadline = time.monotonic() + timeout
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "the killed run's workers did not go away"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.faults
def test_pretrain_killed_twice_resumes_to_the_same_weights(pretrained, ray_local, tmp_path):
    reference_ctx, reference, _ = pretrained
    ctx = make_ctx(
        "pretrain",
        pretrain.Config(**PRETRAIN),
        reference_ctx.model,
        {"dataset": Path(reference_ctx.inputs["dataset"].uri)},
        tmp_path,
    )
    meta = ctx.work_dir / "train_state" / "meta.json"
    first = _kill_after_checkpoint(_run_in_subprocess(ray_local, ctx, tmp_path), meta, past_step=0)
    _wait_for_idle_cluster(ray_local)
    second = _kill_after_checkpoint(_run_in_subprocess(ray_local, ctx, tmp_path), meta, past_step=first)
    assert 0 < first < second < PRETRAIN["steps"]
    print(f"\nkilled after the train states of steps {first} and {second}")
    assert not (ctx.output_dir / "model.safetensors").exists()
    _wait_for_idle_cluster(ray_local)

    result = pretrain.run(ctx)

    ours, theirs = (
        load_file(ctx.output_dir / "model.safetensors"),
        load_file(reference_ctx.output_dir / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"
    timing = {"tokens_per_s", "tflops_per_device", "mfu"}
    assert {k: v for k, v in result.metrics.items() if k not in timing} == {
        k: v for k, v in reference.metrics.items() if k not in timing
    }
    history = json.loads((ctx.output_dir / "train_state" / "history.json").read_text())
    assert history["step"] == list(range(1, PRETRAIN["steps"] + 1)), "a step was replayed or skipped"
    reference_history = json.loads((reference_ctx.output_dir / "train_state" / "history.json").read_text())
    for key in ("loss", "val_loss", "router", "tokens"):  # router counts span the interruptions too
        assert history[key] == reference_history[key], key
    assert [v for k, v, _ in ctx.log.metric_log if k == "resumed_from_step"] == [second]
    resumed_steps = {step for key, _, step in ctx.log.metric_log if key == "loss"}
    assert resumed_steps == set(range(second + 1, PRETRAIN["steps"] + 1))


@pytest.mark.slow
def test_pretrain_resumes_on_another_worker_count_with_the_same_batches(pretrained, ray_local, tmp_path):
    """Started on 2 workers (FSDP2), killed after a train state, resumed on 1 worker: the sharded state
    is resharded, the data continues with the rows the 2-worker run would have read next (the same
    global batches: the run's 2 data streams), and the losses follow the uninterrupted 2-worker run's
    up to the order of floating-point reductions."""
    reference_ctx, reference, _ = pretrained
    inputs = {"dataset": Path(reference_ctx.inputs["dataset"].uri)}
    ctx = make_ctx("pretrain", pretrain.Config(**PRETRAIN), reference_ctx.model, inputs, tmp_path)
    meta = ctx.work_dir / "train_state" / "meta.json"
    stopped = _kill_after_checkpoint(_run_in_subprocess(ray_local, ctx, tmp_path), meta, past_step=0)
    _wait_for_idle_cluster(ray_local)
    one_worker = make_ctx("pretrain", pretrain.Config(**PRETRAIN, num_workers=1), reference_ctx.model, inputs, tmp_path)
    result = pretrain.run(one_worker)

    assert [v for k, v, _ in one_worker.log.metric_log if k == "resumed_from_step"] == [stopped]
    assert one_worker.log.param_log["data_streams"] == 2, "the streams the run started with"
    history = json.loads((one_worker.output_dir / "train_state" / "history.json").read_text())
    reference_history = json.loads((reference_ctx.output_dir / "train_state" / "history.json").read_text())
    assert history["step"] == list(range(1, PRETRAIN["steps"] + 1)), "a step was replayed or skipped"
    assert history["loss"][:stopped] == reference_history["loss"][:stopped], "the 2-worker part is the same run"
    gaps = np.abs(np.array(history["loss"]) - np.array(reference_history["loss"]))
    print(f"\nresumed at step {stopped} on 1 worker: largest loss gap {gaps.max():.2e}")
    assert gaps.max() < 0.02 * max(reference_history["loss"][stopped:]), gaps
    assert result.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=0.02)


@pytest.mark.slow
def test_pretrain_with_expert_parallelism_follows_the_replicated_experts_run(pretrained, tmp_path):
    """2 workers, each MoE pool's experts split over both (all-to-all dispatch), dense parameters FSDP2,
    the loss computed chunk by chunk: the same losses as the run where every worker holds every expert
    and the full logits are formed, and a full HF checkpoint."""
    reference_ctx, reference, _ = pretrained
    inputs = {"dataset": Path(reference_ctx.inputs["dataset"].uri)}
    config = pretrain.Config(**PRETRAIN, expert_parallel=2, loss_impl="chunked")
    ctx = make_ctx("pretrain", config, reference_ctx.model, inputs, tmp_path)
    result = pretrain.run(ctx)

    history = json.loads((ctx.output_dir / "train_state" / "history.json").read_text())
    reference_history = json.loads((reference_ctx.output_dir / "train_state" / "history.json").read_text())
    gaps = np.abs(np.array(history["loss"]) - np.array(reference_history["loss"]))
    print(f"\nexpert parallel vs replicated experts: largest loss gap {gaps.max():.2e} over {len(gaps)} steps")
    assert gaps.max() < 1e-4, gaps
    assert np.allclose(history["router"], reference_history["router"], rtol=0.01), "the same routing"
    ours, theirs = (load_file(d / "model.safetensors") for d in (ctx.output_dir, reference_ctx.output_dir))
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours), "experts gathered"
    experts = [k for k in ours if "experts" in k]
    assert experts and max((ours[k] - theirs[k]).abs().max().item() for k in experts) < 1e-2
    assert result.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=1e-3)


@pytest.mark.slow
def test_pretrain_in_micro_batches_follows_the_whole_batch_run(pretrained, tmp_path):
    """micro_batch_size=1: each worker's 4 rows a step run one at a time, gradients accumulated, one
    optimizer step. The LM loss of step 1 is the whole batch's; later steps follow the reference up to
    the load-balance loss, which is a product of per-batch means and so taken per micro-batch."""
    reference_ctx, reference, _ = pretrained
    inputs = {"dataset": Path(reference_ctx.inputs["dataset"].uri)}
    ctx = make_ctx("pretrain", pretrain.Config(**PRETRAIN, micro_batch_size=1), reference_ctx.model, inputs, tmp_path)
    result = pretrain.run(ctx)

    history = json.loads((ctx.output_dir / "train_state" / "history.json").read_text())
    reference_history = json.loads((reference_ctx.output_dir / "train_state" / "history.json").read_text())
    assert history["step"] == reference_history["step"] and history["tokens"] == reference_history["tokens"]
    assert history["lm"][0] == pytest.approx(reference_history["lm"][0], rel=1e-5)
    assert history["val_loss"][0] == pytest.approx(reference_history["val_loss"][0], rel=1e-5), "eval in micro-batches"
    assert np.sum(history["router"]) == np.sum(reference_history["router"]), "every micro-batch's routing counted"
    gaps = np.abs(np.array(history["loss"]) - np.array(reference_history["loss"]))
    print(f"\nmicro-batches of 1 row vs the whole batch: largest loss gap {gaps.max():.2e} over {len(gaps)} steps")
    assert gaps.max() < 0.02 * max(reference_history["loss"]), gaps
    assert result.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=0.02)


def _kill_a_train_worker_after_checkpoint(meta: Path, killed: list) -> None:
    """SIGKILL one Ray Train worker process once the first train state is written (Linux /proc)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not meta.is_file():
        time.sleep(0.02)
    for proc in Path("/proc").iterdir():
        try:
            is_worker = proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if is_worker:
            killed.append(json.loads(meta.read_text())["step"])
            os.kill(int(proc.name), signal.SIGKILL)
            return


@pytest.mark.slow
@pytest.mark.faults
def test_pretrain_restarts_a_crashed_worker_group_from_the_train_state(pretrained, ray_local, tmp_path):
    reference_ctx, reference, _ = pretrained
    ctx = make_ctx(
        "pretrain",
        pretrain.Config(**PRETRAIN),
        reference_ctx.model,
        {"dataset": Path(reference_ctx.inputs["dataset"].uri)},
        tmp_path,
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_train_worker_after_checkpoint, args=(ctx.work_dir / "train_state" / "meta.json", killed)
    )
    killer.start()
    pretrain.run(ctx)
    killer.join()

    assert killed and killed[0] < PRETRAIN["steps"], "no worker was killed mid-run"
    resumed = [value for key, value, _ in ctx.log.metric_log if key == "resumed_from_step"]
    assert resumed and killed[0] <= resumed[0] < PRETRAIN["steps"], "Ray Train did not restart from the train state"
    ours, theirs = (
        load_file(ctx.output_dir / "model.safetensors"),
        load_file(reference_ctx.output_dir / "model.safetensors"),
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    history = json.loads((ctx.output_dir / "train_state" / "history.json").read_text())
    assert history["step"] == list(range(1, PRETRAIN["steps"] + 1))


def numbered_split(directory: Path, rows: int, rows_per_shard: int) -> str:
    """A text split whose row i holds token i everywhere (row_ids reads it back)."""
    seq_len = 4
    write_row_shards(
        (
            {
                "input_ids": np.full(seq_len, i),
                "labels": np.full(seq_len, i),
                "document_ids": np.zeros(seq_len),
                "position_ids": np.arange(seq_len),
                "modality_ids": np.zeros(seq_len),
            }
            for i in range(rows)
        ),
        directory,
        rows_per_shard,
    )
    return str(directory)


def row_ids(batch: list[dict]) -> list[int]:
    return [int(row["input_ids"][0]) for row in batch]


def test_train_reader_visits_each_row_once_per_epoch_across_ranks_and_resumes_at_any_step(tmp_path):
    split = numbered_split(tmp_path / "train", rows=30, rows_per_shard=4)  # 8 shards, the last of 2 rows
    world, micro, epochs = 2, 3, 3
    readers = [TrainReader(split, r, world, seed=5, shuffle_buffer=6, micro_batch=micro) for r in range(world)]
    steps = [readers[0].steps_in_epoch(e) for e in range(epochs)]
    assert all(readers[1].steps_in_epoch(e) == steps[e] for e in range(epochs)), "every rank takes the same steps"
    batches = [list(itertools.islice(reader.batches(0), sum(steps))) for reader in readers]
    assert all(len(b) == micro for rank in batches for b in rank)
    starts = [0, *itertools.accumulate(steps)]
    epoch_rows = []
    for e in range(epochs):
        per_rank = [[i for b in rank[starts[e] : starts[e + 1]] for i in row_ids(b)] for rank in batches]
        seen = per_rank[0] + per_rank[1]
        assert len(set(seen)) == len(seen) and set(seen) <= set(range(30)), "no row twice in an epoch"
        stream = readers[0].stream(e)
        uneven = sum(stream.worker_rows(r) - stream.rows_per_epoch() for r in range(world))
        assert 30 - len(seen) == uneven + world * (stream.rows_per_epoch() % micro), "only the remainder is left out"
        for rank, ids in enumerate(per_rank):  # each rank reads whole shards of its own
            assert {i // 4 for i in ids} <= {int(s.name[6:11]) for s in readers[rank].stream(e).shards}
        epoch_rows.append(seen)
    assert epoch_rows[0] != epoch_rows[1], "each epoch has its own order"

    for step in range(sum(steps) + 1):  # resume at every step, across epoch boundaries too
        resumed = TrainReader(split, 1, world, seed=5, shuffle_buffer=6, micro_batch=micro)
        epoch = bisect.bisect_right(starts, step) - 1
        assert resumed.cursor(step) == (epoch, (step - starts[epoch]) * micro)
        tail = list(itertools.islice(resumed.batches(step), sum(steps) - step))
        assert [row_ids(b) for b in tail] == [row_ids(b) for b in batches[1][step:]]


def test_train_reader_steps_depend_on_the_streams_not_the_worker_count(tmp_path):
    """4 streams over 1, 2 or 4 workers: the same rows every step, and a resume under another worker
    count continues with exactly the rows the uninterrupted run reads next."""
    split = numbered_split(tmp_path / "train", rows=40, rows_per_shard=4)
    streams, batch = 4, 8
    steps = sum(TrainReader(split, 0, 1, 3, 5, batch, streams=streams).steps_in_epoch(e) for e in range(2))

    def global_batches(world: int, start: int = 0) -> list[list[int]]:
        readers = [TrainReader(split, r, world, 3, 5, batch // world, streams=streams) for r in range(world)]
        per_rank = [list(itertools.islice(reader.batches(start), steps - start)) for reader in readers]
        return [[i for rank in range(world) for i in row_ids(per_rank[rank][s])] for s in range(steps - start)]

    one = global_batches(1)
    assert all(len(b) == batch for b in one)
    assert global_batches(2) == one and global_batches(4) == one
    cursors = {TrainReader(split, 0, w, 3, 5, batch // w, streams=streams).cursor(steps - 1) for w in (1, 2, 4)}
    assert len(cursors) == 1, "the data cursor is the same whatever the worker count"
    for world, start in ((2, 3), (4, 7), (1, 5)):  # a run that stopped at `start` and resumes on `world` workers
        assert global_batches(world, start) == one[start:], (world, start)
    with pytest.raises(ValueError, match="4 data streams cannot be split over 3 workers"):
        TrainReader(split, 0, 3, 3, 5, 3, streams=4)


def test_train_reader_keeps_balance_groups_together(tmp_path):
    split = numbered_split(tmp_path / "train", rows=36, rows_per_shard=6)
    reader = TrainReader(split, 0, 2, seed=1, shuffle_buffer=6, micro_batch=3, unit_rows=3)
    ids = [row_ids(b) for b in itertools.islice(reader.batches(0), 3 * reader.steps_in_epoch(0))]
    assert all(b[0] % 3 == 0 and b == list(range(b[0], b[0] + 3)) for b in ids), ids
    assert [b[0] for b in ids] != sorted(b[0] for b in ids), "the groups are shuffled"


def test_balance_groups_are_kept_only_for_image_splits_whose_micro_batch_holds_whole_groups(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"splits": {"train": {"micro_batches": {"group_rows": 4}}}}))
    image, text = (ShardIndex(str(tmp_path / "train"), fields, 8, ()) for fields in (IMAGE_LAYOUT, TEXT_LAYOUT))
    assert unit_rows_for(tmp_path, image, micro_batch=8) == (4, None)
    assert unit_rows_for(tmp_path, text, micro_batch=8) == (1, None)
    rows, note = unit_rows_for(tmp_path, image, micro_batch=6)
    assert rows == 1 and "not a multiple of the dataset's balance groups of 4 rows" in note


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)


def test_wsd_schedule_holds_the_peak_then_decays_linearly_over_its_last_fraction():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1, schedule="wsd", decay_fraction=0.2) for s in range(1, 101)]
    assert lrs[9] == pytest.approx(1.0) and all(lr == 1.0 for lr in lrs[10:80])  # stable phase
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] == pytest.approx(0.1)
    steps = [b - a for a, b in zip(decay, decay[1:], strict=False)]
    assert max(steps) == pytest.approx(min(steps))  # linear


@pytest.mark.slow
def test_pretrain_trains_a_vl_model_on_image_rows(vl_pretrained, vl_dataset):
    ctx, result, seconds = vl_pretrained
    model = ctx.model
    m = result.metrics
    print(f"\nVL pretrain {seconds:.1f}s: {result.summary}")
    assert m["steps"] == VL_PRETRAIN["steps"]
    assert m["loss_last10"] < 0.85 * m["loss_first"] and m["val_loss"] < 0.85 * m["val_loss_initial"], m
    assert ctx.log.param_log["unit_rows"] == 4, "micro-batches of 4 rows keep the data stage's balance groups"

    trained = load_pretrained(ctx.output_dir)
    torch.manual_seed(0)  # the workers' initialisation (seed 0)
    initial = ErnieForCausalLM(model)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(trained.vision_encoder.parameters(), initial.vision_encoder.parameters(), strict=True)
    ), "the vision encoder was trained, so the image patches reached the model"
    with_images = [row for row in iter_rows(vl_dataset / "val") if len(row["image_grid_thw"])][:2]
    assert with_images, "the val split has image rows"
    with torch.no_grad():
        assert torch.isfinite(trained(**collate(with_images)).loss)


@pytest.mark.slow
def test_sft_trains_a_vl_model_on_chats_with_images_inline(vl_pretrained, vl_dataset, tmp_path):
    """The data stage's scene chats carry the image inline; SFT feeds its patches to the vision encoder."""
    chats = [json.loads(line) for line in (vl_dataset / "sft" / "train.jsonl").read_text().splitlines()]
    with_images = [c for c in chats if isinstance(c["messages"][0]["content"], list)]
    assert (
        len(with_images) > len(chats) // 2
        and (vl_dataset / with_images[0]["messages"][0]["content"][0]["image"]).is_file()
    )
    config = sft.Config(steps=20, batch_size=8, lr=2e-3, eval_every=20, checkpoint_every=20, max_length=128, **LOCAL)
    ctx = make_ctx("sft", config, None, {"ckpt": vl_pretrained[0].output_dir, "dataset": vl_dataset}, tmp_path)
    m = sft.run(ctx).metrics
    print(f"\nVL SFT: val assistant-token loss {m['val_loss_initial']:.3f} -> {m['val_loss']:.3f}")
    assert m["val_loss"] < 0.8 * m["val_loss_initial"], m
    before, after = load_pretrained(vl_pretrained[0].output_dir), load_pretrained(ctx.output_dir)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before.vision_encoder.parameters(), after.vision_encoder.parameters(), strict=True)
    ), "the images reached the vision encoder"


@pytest.mark.slow
def test_rlvr_rolls_out_scene_questions_with_their_images_on_a_vl_model(vl_pretrained, vl_dataset, tmp_path):
    """VQA prompts about the generated scenes: the rollout actors and the learner both see the images."""
    prompts = [json.loads(line) for line in (vl_dataset / "rlvr" / "train.jsonl").read_text().splitlines()]
    scene = [p for p in prompts if p["task"] == "vqa"]
    assert len(scene) > len(prompts) // 4 and all(isinstance(p["prompt"][0]["content"], list) for p in scene)
    config = rlvr.Config(
        steps=4,
        batch_size=4,
        group_size=4,
        lr=5e-3,
        eval_every=4,
        checkpoint_every=4,
        eval_samples=0,
        max_length=128,
        rewards=["exact_match"],
        kl_coef=0.0,
        temperature=1.5,
        **LOCAL,
    )
    ctx = make_ctx("rlvr", config, None, {"ckpt": vl_pretrained[0].output_dir, "dataset": vl_dataset}, tmp_path)
    m = rlvr.run(ctx).metrics
    print(f"\nVL RLVR: {m}")
    assert m["steps"] == 4 and ctx.log.param_log["prompts_train"] == len(prompts)
    assert {k for k, _, step in ctx.log.metric_log if step == 4} >= {"reward", "reward/exact_match", "pg_loss"}
    before, after = load_pretrained(vl_pretrained[0].output_dir), load_pretrained(ctx.output_dir)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(before.vision_encoder.parameters(), after.vision_encoder.parameters(), strict=True)
    ]
    # even where no group's reward varies, the router losses of the image tokens reach the vision encoder
    assert any(changed), "the learner's forward saw the rollouts' images"


@pytest.mark.slow
def test_pretrain_refuses_a_dataset_of_the_other_kind(vl_dataset, dataset, model_config, tmp_path):
    text_model = model_config.replace(vocab_size=VL_VOCAB)
    with pytest.raises(UserError, match=r"holds image rows \(a VL dataset\) but model .* is a text model"):
        pretrain.run(make_ctx("pretrain", pretrain.Config(), text_model, {"dataset": vl_dataset}, tmp_path))
    vl_model = get_preset("tiny_vl").replace(vocab_size=model_config.vocab_size)
    with pytest.raises(UserError, match=r"holds text rows but model .* is a VL model"):
        pretrain.run(make_ctx("pretrain", pretrain.Config(), vl_model, {"dataset": dataset}, tmp_path))


# ---------------------------------------------------------------------- sft
def test_chat_tokenisation_masks_everything_but_the_assistant_answer(dataset):
    tokenizer = Tokenizer.from_file(str(dataset / "tokenizer" / "tokenizer.json"))
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    example = tokenise_chat(tokenizer, chat, max_length=256)
    supervised = [t for t, m in zip(example.ids, example.mask, strict=True) if m]
    assert tokenizer.decode(supervised, skip_special_tokens=False) == f"7{EOS}4{EOS}"
    assert tokenizer.decode(example.ids, skip_special_tokens=False).startswith("<|begin_of_sentence|>Be brief.")
    batch = pad_batch([example, tokenise_chat(tokenizer, chat[:3], 256)], torch.device("cpu"))
    short = len(tokenise_chat(tokenizer, chat[:3], 256).ids)
    assert (batch["labels"][1, short:] == -100).all() and (batch["loss_mask"][1, short:] == 0).all()
    assert batch["loss_mask"].sum() == sum(example.mask) + 2


@pytest.mark.slow
def test_sft_lowers_the_assistant_token_loss_on_val(sft_run):
    ctx, result = sft_run
    m = result.metrics
    print(f"\nsft: {result.summary}")
    assert m["val_loss"] < 0.5 * m["val_loss_initial"], m
    assert load_pretrained(ctx.output_dir) is not None
    assert (ctx.output_dir / "tokenizer" / "tokenizer.json").is_file()
    assert "loss_curve.png" in ctx.log.artifact_log


@pytest.mark.slow
def test_sft_with_lora_trains_adapters_only_and_exports_them_merged(pretrained, dataset, tmp_path):
    """LoRA on attention and experts, chats packed several to a row: the val loss falls, and the exported
    checkpoint differs from the input only in the adapted weights, under the base model's names."""
    config = sft.Config(
        steps=40,
        batch_size=16,
        lr=5e-3,
        eval_every=20,
        checkpoint_every=20,
        lora_rank=8,
        lora_alpha=16,
        pack=True,
        **LOCAL,
    )
    ctx = make_ctx("sft", config, None, {"ckpt": pretrained[0].output_dir, "dataset": dataset}, tmp_path)
    m = sft.run(ctx).metrics
    print(f"\nsft with LoRA: val loss {m['val_loss_initial']:.3f} -> {m['val_loss']:.3f}")
    assert m["val_loss"] < 0.8 * m["val_loss_initial"], m
    ours, base = (load_file(d / "model.safetensors") for d in (ctx.output_dir, pretrained[0].output_dir))
    assert ours.keys() == base.keys()
    changed = {k for k in base if not torch.equal(ours[k], base[k])}
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "experts")
    assert changed and all(any(a in k for a in adapted) for k in changed), sorted(changed)[:5]
    assert any("experts" in k for k in changed) and any("q_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k or "gate.weight" in k for k in changed)


@pytest.mark.slow
def test_sft_sharded_in_micro_batches_trains_and_exports_a_loadable_checkpoint(pretrained, dataset, tmp_path):
    """parallel=fsdp (FSDP2 over the 2 workers) with 2 chats a forward: the val loss falls, the train
    state is the sharded one (a shard per worker), and the exported checkpoint, gathered from the
    shards, loads under the input's names with trained weights."""
    config = sft.Config(
        steps=10, batch_size=16, lr=2e-3, eval_every=10, checkpoint_every=5, parallel="fsdp", micro_batch_size=2
    )
    ctx = make_ctx("sft", config, None, {"ckpt": pretrained[0].output_dir, "dataset": dataset}, tmp_path)
    m = sft.run(ctx).metrics
    print(f"\nsft under fsdp, micro-batches of 2: val loss {m['val_loss_initial']:.3f} -> {m['val_loss']:.3f}")
    assert m["val_loss"] < 0.9 * m["val_loss_initial"], m
    meta = json.loads((ctx.output_dir / "train_state" / "meta.json").read_text())
    assert meta["step"] == 10 and len(list((ctx.output_dir / "train_state" / meta["dir"]).glob("*.distcp"))) == 2
    ours, base = (load_pretrained(d).state_dict() for d in (ctx.output_dir, pretrained[0].output_dir))
    assert ours.keys() == base.keys()
    assert not torch.equal(ours["model.embed_tokens.weight"], base["model.embed_tokens.weight"]), "it trained"


# ---------------------------------------------------------------------- dpo
@pytest.mark.slow
def test_dpo_raises_reward_accuracy_and_margin_over_the_reference(dpo_run):
    ctx, result = dpo_run
    m = result.metrics
    print(f"\ndpo: {result.summary}")
    first_step = {k: v for k, v, step in ctx.log.metric_log if step == 1}
    assert first_step["reward_margin"] == pytest.approx(0.0, abs=1e-5), "step 1 policy = reference"
    assert m["train_set_reward_accuracy_initial"] == 0 and m["train_set_reward_margin_initial"] == 0
    # a tiny model learns arithmetic slowly: 40 steps move it clearly but not far
    assert m["train_set_dpo_loss"] < np.log(2) - 0.03, m
    assert m["train_set_reward_accuracy"] > 0.55 and m["train_set_reward_margin"] > 0.1, m
    assert m["train_set_preference_accuracy"] > m["train_set_reference_preference_accuracy"], m
    assert m["val_reward_margin"] > 0, m
    assert load_pretrained(ctx.output_dir) is not None
    assert {"dpo_loss.png", "rewards.png"} <= set(ctx.log.artifact_log)


# ---------------------------------------------------------------------- rlvr and upo
ARITHMETIC_REWARDS = ["exact_match", "numeric_closeness"]
RL = dict(steps=40, batch_size=8, lr=2e-3, kl_coef=0.01, eval_every=20, checkpoint_every=10)


def sampled_val_reward(ckpt_dir: Path, dataset: Path, samples: int = 4) -> float:
    """Mean exact-match + closeness reward of `samples` completions per rlvr/val prompt, drawn with the
    seeds the rlvr stage's validation uses (seed 0), from a checkpoint loaded afresh."""
    tokenizer = Tokenizer.from_file(str(dataset / "tokenizer" / "tokenizer.json"))
    prompts = rlvr.tokenise_prompts(tokenizer, dataset / "rlvr" / "val.jsonl", 200, False)
    model = load_pretrained(ckpt_dir).eval()
    fns = rewards.resolve(ARITHMETIC_REWARDS, "test")
    total = 0.0
    for prompt in prompts:
        for completion in complete(model, [prompt.ids] * samples, 16, 1.0, 1.0, request_seed(0, 0, prompt.index)):
            text = tokenizer.decode(completion, skip_special_tokens=False)
            total += rewards.score(fns, [1.0, 1.0], text, prompt.record)
    return total / (len(prompts) * samples)


@pytest.mark.slow
def test_rlvr_raises_the_held_out_reward_beyond_a_scrambled_reward(sft_run, dataset, tmp_path):
    """GRPO on exact-match + closeness rewards raises the val prompts' reward over the SFT model, and beyond
    what the same run reaches when rewarded for matching a random number per prompt (the reward shuffled)."""
    runs = {}
    for name, reward_paths in (("real", ARITHMETIC_REWARDS), ("shuffled", ["control_rewards.shuffled_exact_match"])):
        config = rlvr.Config(**RL, rewards=reward_paths)
        ctx = make_ctx("rlvr", config, None, {"ckpt": sft_run[0].output_dir, "dataset": dataset}, tmp_path / name)
        runs[name] = (ctx, rlvr.run(ctx))
    ctx, result = runs["real"]
    m = result.metrics
    print(f"\nrlvr: {result.summary}")
    base = sampled_val_reward(sft_run[0].output_dir, dataset)
    assert m["val_reward_initial"] == pytest.approx(base, abs=1e-6), "the stage measures what this test measures"
    assert sampled_val_reward(ctx.output_dir, dataset) == pytest.approx(m["val_reward"], abs=1e-6)
    # compared on 32 samples a prompt (1,536 completions: a mean's standard error about 0.01, a third of the
    # 4-sample figure's). The control learns too: the answers' format and range (0..18), which the closeness
    # reward pays for; what only the real reward teaches, the right answers, is its margin over the control.
    sft, real, shuffled = (
        sampled_val_reward(ckpt, dataset, samples=32)
        for ckpt in (sft_run[0].output_dir, ctx.output_dir, runs["shuffled"][0].output_dir)
    )
    print(f"val reward (32 samples a prompt): sft {sft:.3f}, rlvr {real:.3f}, rlvr on a shuffled reward {shuffled:.3f}")
    assert m["val_reward"] > base + 0.08 and real > sft + 0.08, (base, m["val_reward"], sft, real)
    assert real - shuffled > 0.05, (sft, real, shuffled)
    steps = {k for k, _, step in ctx.log.metric_log if step == 5}
    assert {"reward", "kl", "pg_loss", "clip_fraction", "reward/exact_match", "rollout_seconds"} <= steps
    assert {"reward.png", "kl.png"} <= set(ctx.log.artifact_log)
    assert load_pretrained(ctx.output_dir) is not None


@pytest.mark.slow
def test_upo_prefers_as_well_as_dpo_and_raises_the_reward(sft_run, dpo_run, dataset, tmp_path):
    """UPO (GRPO + DPO on offline and online pairs, same steps as the DPO fixture) reaches at least DPO's
    val preference accuracy and raises the verifiable reward too."""
    config = upo.Config(**RL, **LOCAL, beta=0.5, rewards=ARITHMETIC_REWARDS)
    ctx = make_ctx("upo", config, None, {"ckpt": sft_run[0].output_dir, "dataset": dataset}, tmp_path)
    result = upo.run(ctx)
    m, d = result.metrics, dpo_run[1].metrics
    print(f"\nupo: {result.summary}\ndpo: val preference accuracy {d['val_preference_accuracy']:.3f}")
    assert m["val_preference_accuracy"] >= d["val_preference_accuracy"], (m, d)
    assert m["val_preference_accuracy"] > m["val_reference_preference_accuracy"], m
    assert m["val_reward"] > m["val_reward_initial"] + 0.05, m
    assert m["train_online_pairs_last10"] > 0 and m["train_offline_reward_accuracy_last10"] > 0.5, m
    assert {"reward.png", "preferences.png"} <= set(ctx.log.artifact_log)


@pytest.mark.slow
@pytest.mark.faults
def test_upo_restarts_a_crashed_worker_group_to_the_same_weights(sft_run, dataset, tmp_path):
    """A learner killed after the first train state: Ray Train restarts the group, the rollout actors get
    the restored weights, the seeded rollouts repeat, and the weights end equal to an uninterrupted run's."""
    config = dict(RL, steps=8, checkpoint_every=4, eval_every=8, eval_samples=0, updates_per_rollout=2)
    inputs = {"ckpt": sft_run[0].output_dir, "dataset": dataset}
    reference = make_ctx("upo", upo.Config(**config, rewards=ARITHMETIC_REWARDS), None, inputs, tmp_path / "reference")
    upo.run(reference)
    ctx = make_ctx("upo", upo.Config(**config, rewards=ARITHMETIC_REWARDS), None, inputs, tmp_path / "killed")
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_train_worker_after_checkpoint, args=(ctx.work_dir / "train_state" / "meta.json", killed)
    )
    killer.start()
    upo.run(ctx)
    killer.join()

    assert killed == [4], "no worker was killed between the train states"
    assert [v for k, v, _ in ctx.log.metric_log if k == "resumed_from_step"] == [4]
    ours, theirs = (load_file(c.output_dir / "model.safetensors") for c in (ctx, reference))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    rewards_of = [{s: v for k, v, s in c.log.metric_log if k == "reward"} for c in (ctx, reference)]
    assert rewards_of[0] == rewards_of[1], "the resumed steps sampled other rollouts"


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "pretrain.steps=0"),
        ({"batch_size": 9}, "pretrain.batch_size=9"),
        ({"precision": "fp8"}, "pretrain.precision='fp8'"),
        ({"recompute": "all"}, "pretrain.recompute='all'"),
        ({"fp8": True}, "pretrain.fp8=true runs FP8 matmuls inside bf16 training; set pretrain.precision=bf16"),
        ({"schedule": "linear"}, "pretrain.schedule='linear'"),
        ({"router_bias_rate": -0.1}, "pretrain.router_bias_rate=-0.1"),
        ({"micro_batch_size": -1}, "pretrain.micro_batch_size=-1 must not be negative"),
        ({"micro_batch_size": 3}, "pretrain.micro_batch_size=3 must divide the 8 rows each worker takes a step"),
    ],
)
def test_pretrain_rejects_bad_config(overrides, message, dataset, model_config, tmp_path):
    ctx = make_ctx("pretrain", pretrain.Config(**overrides), model_config, {"dataset": dataset}, tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        pretrain.run(ctx)


def test_pretrain_names_a_missing_or_mismatched_dataset(dataset, model_config, tmp_path):
    empty = tmp_path / "empty"
    (empty / "tokenizer").mkdir(parents=True)
    (empty / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="train/shard"):
        pretrain.run(make_ctx("pretrain", pretrain.Config(), model_config, {"dataset": empty}, tmp_path))
    with pytest.raises(UserError, match="input artifact 'dataset'"):
        pretrain.run(make_ctx("pretrain", pretrain.Config(), model_config, {}, tmp_path))
    small = model_config.replace(vocab_size=100)
    with pytest.raises(UserError, match="model.vocab_size=100"):
        pretrain.run(make_ctx("pretrain", pretrain.Config(), small, {"dataset": dataset}, tmp_path))


def test_posttrain_names_missing_inputs_and_bad_config(dataset, tmp_path):
    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    with pytest.raises(UserError, match="config.json"):
        sft.run(make_ctx("sft", sft.Config(), None, {"ckpt": no_ckpt, "dataset": dataset}, tmp_path))
    with pytest.raises(UserError, match="posttrain.dpo.beta=0"):
        dpo.run(make_ctx("dpo", dpo.Config(beta=0.0), None, {"ckpt": no_ckpt, "dataset": dataset}, tmp_path))
    with pytest.raises(UserError, match="posttrain.sft.batch_size=3"):
        sft.run(make_ctx("sft", sft.Config(batch_size=3), None, {"ckpt": no_ckpt, "dataset": dataset}, tmp_path))


def test_posttrain_names_a_missing_jsonl(dataset, model_config, tmp_path):
    from ernie import ErnieForCausalLM
    from ernie.checkpoint import save_pretrained

    ckpt = tmp_path / "ckpt"
    save_pretrained(ErnieForCausalLM(model_config), ckpt)
    bare = tmp_path / "bare-dataset"
    (bare / "tokenizer").mkdir(parents=True)
    (bare / "tokenizer" / "tokenizer.json").write_bytes((dataset / "tokenizer" / "tokenizer.json").read_bytes())
    with pytest.raises(UserError, match="sft/train.jsonl"):
        sft.run(make_ctx("sft", sft.Config(), None, {"ckpt": ckpt, "dataset": bare}, tmp_path))
    with pytest.raises(UserError, match="preferences/train.jsonl"):
        dpo.run(make_ctx("dpo", dpo.Config(), None, {"ckpt": ckpt, "dataset": bare}, tmp_path))
