"""Post-training throughput: our SFT and RLVR steps vs Hugging Face TRL's SFTTrainer and GRPOTrainer.

Same tiny model (one checkpoint exported by `ernie.checkpoint.save_pretrained`: ours loads it with
`load_pretrained`, TRL gets HF transformers' model from `AutoModelForCausalLM.from_pretrained`), same
tokenizer, same examples in the same order, same batch size, steps, lr, fp32, CPU, same torch threads,
one process, in the same run. Everything is built locally and deterministically (no downloads): a
byte-level BPE trained as the data stage trains it (`stages.data.tokenizer.train_tokenizer`) on the
bundled arithmetic generators' text (`stages.data.arithmetic`), chats rendered with `ernie.chat_template`.

  1. SFT: ours is `stages.posttrain.loop.WorkerLoop.train_step` itself (SFTObjective collate -> masked
     loss -> backward -> grad clip -> AdamW step, lr from our schedule) on a local loop without Ray,
     with the stage's default padding (`pack=false`) and with packing (`pack=true`); TRL's SFTTrainer
     gets the same tokenised chats (`input_ids` + `assistant_masks`, so the loss is on assistant tokens
     only) and pads each batch. tokens/s = non-padding tokens fed / wall seconds of the timed steps.
  2. RLVR: ours is the same `train_step` with `RLVRObjective` (GRPO, k3 KL to the input model), its
     rollouts sampled in-process by a `RolloutWorker` (`rollout.complete`, KV-cache decoding, all prompts
     of a round in one batch) instead of a Ray actor; TRL's GRPOTrainer gets the same rendered prompts,
     num_generations = group size, the same completion length, temperature, KL coefficient and reward
     (`stages.posttrain.rewards.exact_match`), no vLLM. tokens/s = completion tokens sampled / wall
     seconds of the timed steps; generation_tokens_per_s divides by the generation time alone.

The first `--warmup` steps of each run are excluded from the timings. Every record says what it
measures ("measures"); the SFT records also carry the step-1 loss and the supervised token count,
which agree between ours and TRL when the comparison is like for like.

    python bench/posttrain_throughput.py --smoke                 # tiny_dense, a few tiny steps (tests)
    python bench/posttrain_throughput.py                         # tiny_dense + tiny_moe, 40 SFT / 12 RLVR steps
    python bench/posttrain_throughput.py --preset tiny_dense --threads 2 --sft-steps 40

Writes JSON (one record per measurement, preset and implementation) to --out.
"""

from __future__ import annotations

import os

# TRL / transformers / datasets must never reach a hub or a logger service: set before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import package_version  # noqa: E402  (bench/, the script's own directory)

from ernie import ErnieForCausalLM, get_preset  # noqa: E402
from ernie.chat_template import BOS, EOS, SPECIAL_TOKENS, render  # noqa: E402
from ernie.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from pipeline.formats import write_jsonl  # noqa: E402
from stages.data import arithmetic  # noqa: E402
from stages.data.tokenizer import train_tokenizer  # noqa: E402
from stages.posttrain import rlvr, sft  # noqa: E402
from stages.posttrain.loop import Job, WorkerLoop  # noqa: E402
from stages.posttrain.rewards import exact_match  # noqa: E402
from stages.posttrain.rollout import RolloutWorker, request_seed  # noqa: E402
from stages.training.optim import build_optimizer  # noqa: E402
from stages.training.parallel import Layout  # noqa: E402

PRESETS = ("tiny_dense", "tiny_moe")
MIN_LR_RATIO = 0.1
"""Our schedule's floor (TrainConfig default); TRL gets the same through `cosine_with_min_lr`."""

OURS_OBJECTIVE = "+ router losses (aux, z, orthogonal) at the checkpoint config's weights for MoE (none for dense)"
TRL_OBJECTIVE = "+ HF's load-balancing aux loss x router_aux_loss_coef for MoE (TRL turns it on; none for dense)"
SFT_MEASURES = (
    "tokens_per_s = non-padding tokens of the timed steps' batches / wall seconds of those steps (the first "
    "`warmup` steps excluded); supervised_tokens = assistant tokens that are loss targets. One step: ours = "
    "WorkerLoop.train_step (SFTObjective.collate, forward with the assistant-masked loss, backward, grad-norm "
    "clip, AdamW, lr schedule); TRL = one SFTTrainer optimizer step as Trainer.train runs it (dataloader + its "
    "collator, compute_loss with TRL's token-accuracy/entropy metrics, backward, clip, AdamW, scheduler, callbacks)."
)
RL_MEASURES = (
    "tokens_per_s = completion tokens sampled in the timed steps (each up to and including its first end-of-sentence "
    "token) / wall seconds of those steps; step_s = seconds per GRPO step, which covers: ours = WorkerLoop.train_step "
    "with RLVRObjective (weight copy to the rollout RolloutWorker, sampling group_size completions per prompt with "
    "rollout.complete, reward scoring, reference-model log-probs for the KL term, GRPO loss, backward, clip, AdamW); "
    "TRL = one GRPOTrainer step (model.generate on all prompts x num_generations, reward function, reference-model "
    "log-probs, GRPO loss, backward, clip, AdamW). generation_tokens_per_s = the same tokens / seconds spent in "
    "generation only (ours: RolloutWorker.sample; TRL: the model.generate call GRPOTrainer makes, the span its own "
    "'transformers.generate' profiling covers)."
)


# ---------------------------------------------------------------------- workspace: tokenizer, data, checkpoints
@dataclass
class Workspace:
    root: Path
    tokenizer: object  # tokenizers.Tokenizer
    sft_path: Path
    rlvr_path: Path
    seed: int

    def checkpoint(self, preset: str) -> Path:
        """Our freshly initialised model of `preset`, exported in the HF layout (built once per preset)."""
        path = self.root / "ckpt" / preset
        if not (path / "config.json").is_file():
            cfg = get_preset(preset)
            if self.tokenizer.get_vocab_size() > cfg.vocab_size:
                raise RuntimeError(f"tokenizer vocab {self.tokenizer.get_vocab_size()} > {preset} vocab")
            torch.manual_seed(self.seed)
            save_pretrained(ErnieForCausalLM(cfg), path)
        return path


def build_workspace(root: Path, seed: int, sft_chats: int, rl_prompts: int, vocab_size: int) -> Workspace:
    """Arithmetic SFT chats and verifiable prompts (as the data stage generates them) and a BPE trained on them."""
    facts = arithmetic.all_facts(20)
    chats = arithmetic.sft_examples(facts, sft_chats, random.Random(f"{seed}:sft"))
    prompts = arithmetic.verifiable_prompts(facts, rl_prompts, random.Random(f"{seed}:rlvr"))
    texts = arithmetic.arithmetic_documents(facts, 400, random.Random(f"{seed}:docs"))
    texts += [render(c["messages"]) for c in chats] + [render(p["prompt"], add_generation_prompt=True) for p in prompts]
    tokenizer = train_tokenizer(texts, vocab_size)
    write_jsonl(root / "sft.jsonl", chats)
    write_jsonl(root / "rlvr.jsonl", prompts)
    return Workspace(root, tokenizer, root / "sft.jsonl", root / "rlvr.jsonl", seed)


def hf_tokenizer(tokenizer):
    """Our tokenizer as the `PreTrainedTokenizerFast` TRL needs (pad/bos/eos = our special tokens 0/1/2)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=SPECIAL_TOKENS[0])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    return tok


def hf_model(ckpt: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").train()


# ---------------------------------------------------------------------- our side: the stage's loop without Ray
class LocalLoop(WorkerLoop):
    """`WorkerLoop` on one process without Ray Train: the same model loading, objective setup, optimizer and
    `train_step`; no data-parallel wrapper, no train-state restore, and the cross-rank sum is the identity."""

    def __init__(self, job: Job) -> None:  # WorkerLoop.__init__ minus Ray, the wrapper and the train-state restore
        self.rank, self.world = 0, 1
        self.device = torch.device("cpu")
        self.job, self.cfg, self.objective = job, job.config, job.objective
        torch.manual_seed(job.seed)
        self.train_examples, self.val_examples = job.train, job.val
        self.layout = Layout("ddp", 1, 1, self.device)  # one process: nothing to reduce
        self.ckpt_dir = job.ckpt_dir  # a local directory here (the frozen reference loads it again)
        self.model = load_pretrained(self.ckpt_dir, device=self.device)
        self.model.train()
        if hasattr(self.objective, "prepare_model"):
            self.objective.prepare_model(self)
        self.train_model = self.model
        self.micro_batch = self.cfg.micro_batch_size or self.cfg.batch_size
        self.step = 0
        self.history = {"train": [], "val": []}
        self.objective.setup(self)
        self.optimizer = build_optimizer(
            self.model, self.cfg.lr, self.cfg.weight_decay, (self.cfg.beta1, self.cfg.beta2)
        )

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.detach().float().clone()


def local_job(cfg, objective, ckpt: Path, seed: int, train: list) -> Job:
    return Job(cfg, objective, str(ckpt), seed, train, train[:1], state_dir="", fingerprint={})


class LocalRLVR(rlvr.RLVRObjective):
    """RLVRObjective with its rollout actor in-process: the round's weights go to a `RolloutWorker` by a direct
    call instead of the Ray object store, and the requests (prompt ids, per-prompt seeds) are the stage's."""

    def __init__(self, cfg, tokenizer_json: str, worker: RolloutWorker) -> None:
        super().__init__(cfg, tokenizer_json, actors=[])
        self.worker = worker
        self.rollouts: list[tuple[float, int]] = []
        """(seconds sampling, completion tokens) per rollout round."""

    def _sync_weights(self, loop, version: int) -> None:
        self.worker.load_weights({k: v.detach().cpu() for k, v in loop.model.state_dict().items()}, version)

    def _sample(self, loop, start: int, prompts: list) -> tuple[list, float]:
        cfg, began = self.cfg, time.perf_counter()
        requests = [(p.ids, request_seed(loop.job.seed, start, p.index)) for p in prompts]
        version, groups = self.worker.sample(requests, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        seconds = time.perf_counter() - began
        if version != start:
            raise RuntimeError(f"the rollout worker sampled with weights of step {version}, not {start}")
        self.rollouts.append((seconds, sum(len(c) for group in groups for c in group)))
        return groups, seconds


# ---------------------------------------------------------------------- timing helpers
class StepClock:
    """Wall-clock ends of each step, from `start()`; the steady state is the steps after `warmup`."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.ends: list[float] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def timed_seconds(self, warmup: int) -> float:
        begin = self.ends[warmup - 1] if warmup > 0 else self.t0
        return self.ends[-1] - begin


def summarise(clock: StepClock, per_step_tokens: list[int], warmup: int) -> dict:
    steps = len(clock.ends)
    if len(per_step_tokens) != steps:
        raise RuntimeError(f"{len(per_step_tokens)} token counts for {steps} steps")
    seconds = clock.timed_seconds(warmup)
    tokens = sum(per_step_tokens[warmup:])
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "timed_steps": steps - warmup,
        "tokens": tokens,
        "tokens_all_steps": sum(per_step_tokens),
        "seconds": round(seconds, 4),
        "step_s": round(seconds / (steps - warmup), 5),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def trl_args(cls, out_dir: Path, args, steps: int, batch: int, lr: float, **extra):
    """TrainingArguments shared by both TRL trainers: CPU, fp32, offline, no saving, no reporting."""
    return cls(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO},
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=steps,
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        **extra,
    )


def quiet(trainer):
    """No per-log printing (disable_tqdm makes the Trainer print each log dict instead)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def step_callback(clock: StepClock):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Clock()


# ---------------------------------------------------------------------- SFT
def sft_config(args) -> sft.Config:
    cfg = sft.Config(
        steps=args.sft_steps,
        batch_size=args.sft_batch,
        lr=1e-3,
        max_length=args.max_length,
        warmup_steps=0,
        min_lr_ratio=MIN_LR_RATIO,
        num_workers=1,
    )
    cfg.validate("sft")
    return cfg


def sft_ours(ws: Workspace, preset: str, args, pack: bool) -> dict:
    cfg = sft_config(args)
    cfg.pack = pack
    train = sft.tokenise_file(ws.tokenizer, ws.sft_path, cfg.max_length)
    objective = sft.SFTObjective(pack_length=cfg.max_length if pack else 0)
    loop = LocalLoop(local_job(cfg, objective, ws.checkpoint(preset), args.seed, train))
    per_step = [[train[i] for i in loop.batch_indices(step)] for step in range(1, cfg.steps + 1)]
    tokens = [sum(len(e.ids) for e in batch) for batch in per_step]
    supervised = [sum(sum(e.mask[1:]) for e in batch) for batch in per_step]
    with torch.no_grad():  # the LM loss alone (HF's loss has no router terms unless output_router_logits)
        first = objective.loss(loop.model, objective.micro_batches(per_step[0], loop)[0], loop)[1]["lm"].item()
    clock, losses = StepClock(), []
    clock.start()
    while loop.step < cfg.steps:
        losses.append(loop.train_step()["loss"])
        clock.tick()
    record = summarise(clock, tokens, args.warmup)
    record.update(
        supervised_tokens=sum(supervised[args.warmup :]),
        loss_step1=first,
        train_loss_mean=sum(losses) / len(losses),
        padding="packed rows of max_length (pack=true, document-masked attention)" if pack else "right-padded rows",
        objective=OURS_OBJECTIVE,
        optimizer="torch AdamW(foreach=True), build_optimizer",
    )
    return record


def sft_trl(ws: Workspace, preset: str, args, out_dir: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = sft_config(args)
    train = sft.tokenise_file(ws.tokenizer, ws.sft_path, cfg.max_length)
    order = LocalLoop.batch_indices  # the stage's example order, so TRL sees the same batches step for step
    probe = _OrderProbe(cfg, args.seed, len(train))
    rows = [train[i] for step in range(1, cfg.steps + 1) for i in order(probe, step)]
    dataset = Dataset.from_list([{"input_ids": e.ids, "assistant_masks": e.mask} for e in rows])
    torch.manual_seed(args.seed)
    model = hf_model(ws.checkpoint(preset))
    sft_args = trl_args(
        SFTConfig,
        out_dir,
        args,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        max_length=cfg.max_length,
        packing=False,
        padding_free=False,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        completion_only_loss=False,
        assistant_only_loss=False,  # the assistant_masks column already carries the mask
        dataset_num_proc=None,
    )
    clock = StepClock()
    trainer = quiet(
        SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=dataset,
            processing_class=hf_tokenizer(ws.tokenizer),
            callbacks=[step_callback(clock)],
        )
    )
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    with torch.no_grad():  # the LM loss alone: TRL turns on an MoE model's router aux loss, ours has its own terms
        batch = trainer.data_collator.inner([trainer.train_dataset[i] for i in range(cfg.batch_size)])
        lm_only = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
        first = model(**batch, **lm_only).loss.item()
    result = trainer.train()
    record = summarise(clock, counter.tokens[: len(clock.ends)], args.warmup)
    record.update(
        supervised_tokens=sum(counter.supervised[args.warmup : len(clock.ends)]),
        loss_step1=first,
        train_loss_mean=result.training_loss,
        padding="right-padded rows (TRL DataCollatorForLanguageModeling, padding_free=False, packing=False)",
        objective=TRL_OBJECTIVE,
        optimizer=f"torch AdamW ({sft_args.optim})",
    )
    del trainer, model
    return record


class _OrderProbe:
    """What `WorkerLoop.batch_indices` reads: the config, rank/world, the examples' count and the seed."""

    def __init__(self, cfg, seed: int, n: int) -> None:
        self.cfg, self.rank, self.world = cfg, 0, 1
        self.train_examples = range(n)
        self.job = Job(cfg, None, "", seed, None, None, "", {})

    _epoch = WorkerLoop._epoch


class _CountingCollator:
    """TRL's own collator, counting what each batch feeds: non-padding tokens and loss targets."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.tokens: list[int] = []
        self.supervised: list[int] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.supervised.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch


# ---------------------------------------------------------------------- RLVR
def rl_config(args) -> rlvr.Config:
    cfg = rlvr.Config(
        steps=args.rl_steps,
        batch_size=args.rl_prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        lr=2e-3,
        warmup_steps=0,
        min_lr_ratio=MIN_LR_RATIO,
        kl_coef=0.01,
        max_length=args.max_length,
        rewards=["exact_match"],
        eval_samples=0,
        num_workers=1,
        checkpoint_every=args.rl_steps,
    )
    cfg.validate("rlvr")
    return cfg


def rl_prompts(ws: Workspace, cfg) -> list:
    return rlvr.tokenise_prompts(ws.tokenizer, ws.rlvr_path, cfg.max_length - cfg.max_new_tokens, False)


def rl_ours(ws: Workspace, preset: str, args) -> dict:
    cfg = rl_config(args)
    ckpt = ws.checkpoint(preset)
    worker = RolloutWorker(str(ckpt), threads=args.threads)  # sets torch threads to args.threads, as ours runs
    objective = LocalRLVR(cfg, ws.tokenizer.to_str(), worker)
    loop = LocalLoop(local_job(cfg, objective, ckpt, args.seed, rl_prompts(ws, cfg)))
    clock = StepClock()
    clock.start()
    while loop.step < cfg.steps:
        loop.train_step()
        clock.tick()
    tokens = [t for _, t in objective.rollouts]
    record = summarise(clock, tokens, args.warmup)
    gen_seconds = sum(s for s, _ in objective.rollouts[args.warmup :])
    record.update(
        generation_s=round(gen_seconds, 4),
        generation_tokens_per_s=round(record["tokens"] / gen_seconds, 1),
        completions=cfg.steps * cfg.batch_size * cfg.group_size,
        batching="one complete() call per round of every prompt x group_size rows (RolloutWorker.sample), "
        "each prompt's rows from its own seeded generator, as the stage's actors",
        objective=OURS_OBJECTIVE,
    )
    return record


def rl_trl(ws: Workspace, preset: str, args, out_dir: Path) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = rl_config(args)
    prompts = rl_prompts(ws, cfg)
    tok = hf_tokenizer(ws.tokenizer)
    order = LocalLoop.batch_indices
    probe = _OrderProbe(cfg, args.seed, len(prompts))
    rows = []
    for step in range(1, cfg.steps + 1):
        for i in order(probe, step):
            p = prompts[i]
            text = render(p.record["prompt"], add_generation_prompt=True)
            if tok(text)["input_ids"] != p.ids:
                raise RuntimeError("the HF wrapper tokenises a prompt differently from ours")
            rows.append({"prompt": text, "answer": p.record["answer"]})
    counts: list[int] = []

    def exact_match_reward(completions, answer, completion_ids, **kwargs) -> list[float]:
        counts.append(sum(len(ids) for ids in completion_ids))
        return [exact_match(c, {"answer": a}) for c, a in zip(completions, answer, strict=True)]

    torch.manual_seed(args.seed)
    model = hf_model(ws.checkpoint(preset))
    gen_seconds: list[float] = []
    generate = model.generate

    def timed_generate(*a, **k):
        began = time.perf_counter()
        out = generate(*a, **k)
        gen_seconds.append(time.perf_counter() - began)
        return out

    model.generate = timed_generate
    grpo_args = trl_args(
        GRPOConfig,
        out_dir,
        args,
        cfg.steps,
        cfg.batch_size * cfg.group_size,  # TRL's batch counts completions
        cfg.lr,
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.kl_coef,
        epsilon=cfg.clip_eps,
        num_iterations=1,
        steps_per_generation=1,
        scale_rewards="group",
        loss_type="dapo",  # token-level mean over the batch, as ours
        shuffle_dataset=False,
        use_vllm=False,
        log_completions=False,
    )
    clock = StepClock()
    trainer = quiet(
        GRPOTrainer(
            model=model,
            reward_funcs=[exact_match_reward],
            args=grpo_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[step_callback(clock)],
        )
    )
    trainer.train()
    steps = len(clock.ends)
    if len(gen_seconds) != steps or len(counts) != steps:
        raise RuntimeError(f"{len(gen_seconds)} generate calls and {len(counts)} reward calls for {steps} steps")
    record = summarise(clock, counts, args.warmup)
    generation = sum(gen_seconds[args.warmup :])
    record.update(
        generation_s=round(generation, 4),
        generation_tokens_per_s=round(record["tokens"] / generation, 1),
        completions=cfg.steps * cfg.batch_size * cfg.group_size,
        batching="one model.generate call of prompts x num_generations rows per step (GRPOTrainer)",
        objective=TRL_OBJECTIVE,
    )
    del trainer, model
    return record


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=PRESETS, help="repeatable; default both (smoke: dense)")
    parser.add_argument("--smoke", action="store_true", help="tiny_dense, a few small steps (tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the timings")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--sft-batch", type=int, default=16, help="chats per step (tiny conf: 16)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rl-steps", type=int, default=12)
    parser.add_argument("--rl-prompts", type=int, default=8, help="prompts per step (tiny conf: 8)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-packed", action="store_true", help="skip ours with pack=true")
    parser.add_argument("--out", default="bench/results/posttrain_throughput.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup, args.sft_steps, args.sft_batch = 1, 3, 4
        args.rl_steps, args.rl_prompts, args.group_size, args.max_new_tokens = 2, 2, 2, 4
    for name in ("sft_steps", "rl_steps"):
        if getattr(args, name) <= args.warmup:
            parser.error(f"--{name.replace('_', '-')} must exceed --warmup={args.warmup}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    presets = args.preset or (["tiny_dense"] if args.smoke else list(PRESETS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="posttrain_bench_") as tmp:
        root = Path(tmp)
        ws = build_workspace(root, args.seed, sft_chats=400 if args.smoke else 600, rl_prompts=64, vocab_size=512)
        for preset in presets:
            runs = [("sft", "ours", sft_ours, {"pack": False})]
            if not args.no_packed:
                runs.append(("sft", "ours-packed", sft_ours, {"pack": True}))
            runs += [
                ("sft", "trl", sft_trl, {"out_dir": root / "trl_sft"}),
                ("rlvr", "ours", rl_ours, {}),
                ("rlvr", "trl", rl_trl, {"out_dir": root / "trl_grpo"}),
            ]
            for measurement, impl, run, kwargs in runs:
                torch.set_num_threads(args.threads)
                record = {"measurement": measurement, "case": preset, "impl": impl, **run(ws, preset, args, **kwargs)}
                record["threads"] = torch.get_num_threads()
                if record["threads"] != args.threads:
                    raise RuntimeError(f"{impl} changed torch threads to {record['threads']}")
                record["measures"] = SFT_MEASURES if measurement == "sft" else RL_MEASURES
                print(json.dumps({k: v for k, v in record.items() if k != "measures"}), flush=True)
                records.append(record)
                gc.collect()
        vocab = ws.tokenizer.get_vocab_size()
    _print_table(records)
    report = {
        "bench": "posttrain_throughput",
        "device": platform.processor() or platform.machine() or "cpu",
        "dtype": "float32",
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "trl": package_version("trl"),
        "accelerate": package_version("accelerate"),
        "datasets": package_version("datasets"),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "ray_imported": "ray" in sys.modules,
        "config": {
            "seed": args.seed,
            "tokenizer_vocab": vocab,
            "sft": {
                "steps": args.sft_steps,
                "batch_chats": args.sft_batch,
                "max_length": args.max_length,
                "lr": 1e-3,
                "schedule": f"cosine to {MIN_LR_RATIO} x lr, no warmup",
            },
            "rlvr": {
                "steps": args.rl_steps,
                "prompts_per_step": args.rl_prompts,
                "group_size": args.group_size,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "lr": 2e-3,
                "kl_coef": 0.01,
                "clip_eps": 0.2,
                "reward": "stages.posttrain.rewards.exact_match",
            },
            "warmup_steps_excluded": args.warmup,
        },
        "records": records,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _print_table(records: list[dict]) -> None:
    print(f"\n{'measurement':12s} {'case':11s} {'impl':12s} {'tokens/s':>10s} {'gen tok/s':>10s} {'step s':>9s}")
    for r in records:
        gen = r.get("generation_tokens_per_s")
        gen_text = "-" if gen is None else f"{gen:10.1f}"
        print(
            f"{r['measurement']:12s} {r['case']:11s} {r['impl']:12s} {r['tokens_per_s']:10.1f} {gen_text:>10s} "
            f"{r['step_s']:9.4f}"
        )


if __name__ == "__main__":
    main()
