"""Reinforcement learning with verifiable rewards (RLVR): GRPO on prompts whose answers can be checked.

    python -m pipeline run conf=tiny stages=[rlvr] posttrain.rlvr.group_size=8

Inputs: `ckpt` (policy init and KL reference) and `dataset` (`rlvr/{train,val}.jsonl`:
{"prompt": [...messages], "answer": str, "task": str}). Every `updates_per_rollout` steps a
rollout round starts: the learner's weights go to the `rollout_workers` Ray actors
(`rollout.RolloutWorker`, KV-cache decoding), which sample `group_size` completions of each
prompt the round's steps will train on. Each completion is scored by the configured reward
functions (`rewards`, dotted paths; weighted sum), advantages are group-relative, and the
learner (Ray Train workers, FSDP2 or DDP) minimises GRPO's clipped surrogate plus `kl_coef`
times the k3 KL estimate to the frozen input model (`grpo`). Log-probs are taken at the
sampling temperature throughout. Validation: sampled and greedy answers to rlvr/val.jsonl,
decoded by the rollout actors with the learner's current weights and scored by the same
rewards (`val_reward`, and `val_reward/<function>` each). Output (ckpt): HF layout +
tokenizer/ + train_state/.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ernie.chat_template import image_refs, render
from ernie.losses import weighted_router_loss
from pipeline.contract import StageContext, StageResult, UserError
from stages.training.parallel import reshard

from . import common, rewards
from .chat import PAD_ID, ChatImages, Tokenised, read_records, vision_inputs, widen_images
from .config import RLVRConfig as Config
from .grpo import group_advantages, policy_loss, token_logprobs
from .rollout import RolloutRequest, RolloutWorker, request_seed

INPUTS = {"ckpt": "ckpt", "dataset": "dataset"}
OUTPUT_KIND = "ckpt"


@dataclass
class Prompt:
    """One verifiable prompt: its rendered, tokenised chat prompt and its record (answer, task...)."""

    index: int
    ids: list[int]
    record: dict
    patches: list[np.ndarray] = field(default_factory=list)
    """The prompt's images (uint8 patches) and their (t, h, w) grids, in placeholder order."""
    grids: list[tuple[int, int, int]] = field(default_factory=list)


def tokenise_prompts(
    tokenizer, path, max_prompt_tokens: int, enable_thinking: bool, images: ChatImages | None = None
) -> list[Prompt]:
    """Every prompt of the jsonl file that fits in `max_prompt_tokens`, with the generation prompt appended
    (encoded whole, as serving and eval encode a prompt); images widened as in SFT (`images` for a VL model)."""
    prompts = []
    for line, record in enumerate(read_records(path, "verifiable prompts"), start=1):
        try:
            if "answer" not in record:
                raise KeyError("answer")
            text = render(record["prompt"], add_generation_prompt=True, enable_thinking=enable_thinking)
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            chat = widen_images(Tokenised(ids, [0] * len(ids)), image_refs(record["prompt"]), images, 2**31)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{path} line {line}: not a verifiable prompt record ({err!r})") from None
        if len(chat.ids) <= max_prompt_tokens:
            prompts.append(Prompt(len(prompts), chat.ids, record, chat.patches, chat.grids))
    if not prompts:
        raise UserError(f"{path}: no prompt fits in {max_prompt_tokens} tokens (max_length - max_new_tokens)")
    return prompts


class RLVRObjective:
    """GRPO with rollouts from Ray actors; the KL reference is the frozen input model, spread like the policy."""

    def __init__(self, cfg: Config, tokenizer_json: str, actors: list, stage: str = "rlvr") -> None:
        self.cfg, self.tokenizer_json, self.actors, self.stage = cfg, tokenizer_json, actors, stage
        self.round: dict[int, list[dict]] = {}
        self.synced: int | None = None
        """The weights version the actors hold (the step whose rollouts they sample), once this learner sent it."""

    # ------------------------------------------------------------------ setup
    def setup(self, loop) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(self.tokenizer_json)
        self.reward_fns = rewards.resolve(self.cfg.rewards, f"posttrain.{self.stage}.rewards")
        self.reward_names = [getattr(f, "__name__", f"reward{i}") for i, f in enumerate(self.reward_fns)]
        self.reference = loop.frozen_input_model() if self.cfg.keeps_reference() else None

    # ------------------------------------------------------------------ rollouts
    def make_batch(self, loop, step: int) -> list[dict]:
        """This rank's micro-batches of step `step` (1-based): sampled at the start of its rollout round."""
        u = self.cfg.updates_per_rollout
        start = step - (step - 1) % u
        if step not in self.round:
            if step != start:
                raise RuntimeError(f"step {step} is inside a rollout round that was not sampled (round start {start})")
            self.round = self._rollout_round(loop, start)
        return self.round.pop(step)

    def _sync_weights(self, loop, version: int) -> None:
        """Collective: the learner's weights, gathered from the shards at rank 0, to every actor, tagged
        `version` (the step whose rollouts they will sample); nothing when the actors hold them already."""
        import ray
        import torch.distributed as dist

        if self.synced == version:
            return
        state = loop.layout.full_state_dict(loop.model, loop.rank)
        if loop.rank == 0:
            ref = ray.put(state)
            ray.get([actor.load_weights.remote(ref, version) for actor in self.actors])
        del state
        dist.barrier()
        self.synced = version

    def _sample(self, loop, start: int, prompts: list[Prompt]) -> tuple[list[list[list[int]]], float]:
        """`group_size` completions of each prompt from the actors, and the seconds it took."""
        import ray

        cfg, began = self.cfg, time.perf_counter()
        n = len(self.actors)
        shares: list[list[int]] = [[] for _ in range(n)]
        for i in range(len(prompts)):  # spread this rank's prompts over the actors, ranks offset
            shares[(loop.rank + i) % n].append(i)
        futures = {}
        for a, share in enumerate(shares):
            if share:
                requests = [
                    RolloutRequest(p.ids, request_seed(loop.job.seed, start, p.index), p.patches, p.grids)
                    for p in (prompts[i] for i in share)
                ]
                futures[a] = self.actors[a].sample.remote(
                    requests, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p
                )
        completions: list = [None] * len(prompts)
        for a, future in futures.items():
            version, groups = ray.get(future)
            if version != start:
                raise RuntimeError(f"rollout actor {a} sampled with weights of step {version}, not {start}")
            for i, group in zip(shares[a], groups, strict=True):
                completions[i] = group
        return completions, time.perf_counter() - began

    def _rollout_round(self, loop, start: int) -> dict[int, list[dict]]:
        self._sync_weights(loop, start)
        steps = range(start, start + self.cfg.updates_per_rollout)
        per_step = [[loop.train_examples[i] for i in loop.batch_indices(s)] for s in steps]
        flat = [p for prompts in per_step for p in prompts]
        completions, seconds = self._sample(loop, start, flat)
        batches, at = {}, 0
        for s, prompts in zip(steps, per_step, strict=True):
            batch = self.collate_rollouts(prompts, completions[at : at + len(prompts)], loop.device)
            at += len(prompts)
            batch["stats"]["rollout_seconds"] = torch.tensor(seconds / len(steps))
            batches[s] = self.micro_batches(batch, loop)
            for part in batches[s]:
                self._add_old_logprobs(loop, part, needed=len(steps) > 1)
        return batches

    def micro_batches(self, batch: dict, loop) -> list[dict]:
        """A step's rollout batch in micro-batches of `loop.micro_batch` prompts (each with its whole group),
        each knowing the step's completion tokens (over all ranks: collective) and rows (the loss is a token
        mean, router losses by rows); the step's stats ride on the first. A micro-batch keeps the batch's
        padded width."""
        group = self.cfg.group_size
        prompts = len(batch["groups"])
        size = loop.micro_batch or prompts
        # the token mean's divisor: the step's completion tokens over all ranks, per rank (the ranks' gradients
        # are averaged), so a rank with shorter completions does not weigh each of its tokens more
        tokens = max(loop.layout.per_rank_divisor(batch["mask"].sum()), 1 / loop.world)
        whole = {"tokens": tokens, "rows": len(batch["input_ids"])}
        parts = []
        for first in range(0, prompts, size):
            rows = slice(first * group, (first + size) * group)
            part = {k: batch[k][rows] for k in ("input_ids", "mask", "advantages", "reward")}
            part["vision"] = {k: v.to(loop.device) for k, v in vision_inputs(batch["row_prompts"][rows]).items()}
            part["groups"] = batch["groups"][first : first + size]
            part["whole"] = whole
            part["stats"] = batch["stats"] if first == 0 else {}
            parts.append(part)
        return parts

    def collate_rollouts(self, prompts: list[Prompt], groups: list[list[list[int]]], device) -> dict:
        """Right-padded prompt + completion rows, the completion mask over targets, rewards and advantages."""
        cfg = self.cfg
        rows, mask_rows, scores = [], [], []
        for prompt, group in zip(prompts, groups, strict=True):
            for completion in group:
                rows.append(prompt.ids + completion)
                mask_rows.append([0] * (len(prompt.ids) - 1) + [1] * len(completion))
                scores.append(self._score(completion, prompt)[1:])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), width - 1))
        for i, (row, m) in enumerate(zip(rows, mask_rows, strict=True)):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
        per_reward = torch.tensor(scores)  # [rows, rewards]
        reward = per_reward @ torch.tensor(cfg.weights())
        grouped = reward.view(len(prompts), cfg.group_size)
        advantages = group_advantages(grouped, cfg.scale_advantages).flatten()
        lengths = mask.sum(-1)
        stats = {
            "reward": reward.mean(),
            "reward_std_in_group": grouped.std(-1, unbiased=False).mean(),
            "groups_without_signal": (grouped.std(-1) == 0).float().mean(),
            "completion_tokens": lengths.mean(),
            "truncated": (torch.tensor([r[-1] for r in rows]) != self._eos).float().mean(),
        }
        stats.update({f"reward/{name}": per_reward[:, k].mean() for k, name in enumerate(self.reward_names)})
        batch = {"input_ids": input_ids, "mask": mask, "advantages": advantages, "reward": reward}
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["row_prompts"] = [prompt for prompt in prompts for _ in range(cfg.group_size)]
        batch["stats"] = stats
        batch["groups"] = grouped
        return batch

    @property
    def _eos(self) -> int:
        return self.tokenizer.token_to_id("<|end_of_sentence|>")

    @torch.no_grad()
    def _add_old_logprobs(self, loop, batch: dict, needed: bool) -> None:
        """Log-probs of the sampled tokens under the round's weights (for the ratio) and the reference (for KL)."""
        temperature = self.cfg.temperature
        if needed:
            with loop.autocast():
                logits = loop.model(batch["input_ids"], **batch["vision"]).logits
            batch["old_logp"] = token_logprobs(logits, batch["input_ids"], temperature)
        if self.reference is not None:
            with loop.autocast():
                logits = self.reference(batch["input_ids"], **batch["vision"]).logits
            batch["ref_logp"] = token_logprobs(logits, batch["input_ids"], temperature)
            reshard(self.reference)  # a frozen model has no backward to free its gathered units

    # ------------------------------------------------------------------ learner
    def policy_terms(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GRPO loss and metrics from the policy's logits over the rollout rows (token sums over the step's
        completion tokens when the batch is a micro-batch of the step)."""
        logp = token_logprobs(logits, batch["input_ids"], self.cfg.temperature)
        old = batch.get("old_logp", logp.detach())
        tokens = batch["whole"]["tokens"] if "whole" in batch else None
        return policy_loss(
            logp,
            old,
            batch["advantages"],
            batch["mask"],
            self.cfg.clip_eps,
            self.cfg.kl_coef,
            batch.get("ref_logp"),
            tokens=tokens,
        )

    def loss(self, model, batch: dict, loop) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with loop.autocast():
            out = model(batch["input_ids"], **batch["vision"])
        total, metrics = self.policy_terms(out.logits, batch)
        row_share = len(batch["input_ids"]) / batch["whole"]["rows"]
        total = total + weighted_router_loss(out.routing, loop.model.config.loss) * row_share
        return total, metrics | {k: v.to(total.device) for k, v in batch["stats"].items()}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, loop) -> dict[str, float]:
        """Validation prompts scored by the rewards: `eval_samples` completions each at the rollout
        temperature (`val_reward`, `val_reward/<name>`; the same seeds at every evaluation, so
        evaluations differ only by the weights) and the greedy answer (`val_greedy_reward`).

        The rollout actors decode them, with the learner's current weights: a sharded learner cannot
        generate (each decode step would gather every layer, on every worker, in step)."""
        import ray

        cfg, count = self.cfg, loop.eval_count(loop.val_examples)
        self._sync_weights(loop, loop.step + 1)  # the weights the next round samples with, too
        names = ["greedy_reward", "reward", *(f"reward/{n}" for n in self.reward_names)]
        sums = torch.zeros(len(names), device=loop.device)
        chunks = [chunk for chunk in loop.my_share(count) if len(chunk)]
        futures = []
        for c, chunk in enumerate(chunks):  # spread this rank's chunks over the actors, ranks offset
            requests = [
                RolloutRequest(p.ids, request_seed(loop.job.seed, 0, p.index), p.patches, p.grids)
                for p in (loop.val_examples[i] for i in chunk)
            ]
            actor = self.actors[(loop.rank + c) % len(self.actors)]
            futures.append(
                actor.evaluate.remote(requests, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.eval_samples)
            )
        for chunk, future in zip(chunks, futures, strict=True):
            version, greedy, samples = ray.get(future)
            if version != loop.step + 1:
                raise RuntimeError(f"a rollout actor evaluated weights of step {version}, not {loop.step + 1}")
            for prompt, answer, sampled in zip((loop.val_examples[i] for i in chunk), greedy, samples, strict=True):
                greedy_scores = self._score(answer, prompt)
                row = [greedy_scores[0], *greedy_scores]  # eval_samples=0: the greedy answer is the sample
                if sampled:
                    row = [greedy_scores[0], *torch.tensor([self._score(s, prompt) for s in sampled]).mean(0).tolist()]
                sums += torch.tensor(row, device=loop.device)
        means = (loop.all_sum(sums) / count).tolist()
        return {f"val_{n}": v for n, v in zip(names, means, strict=True)}

    def _score(self, completion: list[int], prompt: Prompt) -> list[float]:
        """[weighted reward, each reward] of one completion."""
        text = self.tokenizer.decode(completion, skip_special_tokens=False)
        values = [float(f(text, prompt.record)) for f in self.reward_fns]
        return [sum(w * v for w, v in zip(self.cfg.weights(), values, strict=True)), *values]


def start_actors(cfg: Config, ckpt_dir, stage: str) -> list:
    """The rollout actors, each loading the input checkpoint (the learner sends newer weights every round)."""
    import ray

    from stages.training import launch

    launch.check_cluster(cfg.requested(), f"posttrain.{stage}")
    actor = ray.remote(num_cpus=cfg.rollout_cpus, num_gpus=cfg.resources.num_gpus)(RolloutWorker)
    return [actor.remote(str(ckpt_dir), int(np.ceil(cfg.rollout_cpus))) for _ in range(cfg.rollout_workers)]


def stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def load_prompts(ctx: StageContext, cfg: Config, tokenizer, dataset_dir, ckpt_dir) -> tuple[list[Prompt], list[Prompt]]:
    limit, images = cfg.max_length - cfg.max_new_tokens, common.chat_images(ckpt_dir, dataset_dir)
    train = tokenise_prompts(tokenizer, dataset_dir / "rlvr" / "train.jsonl", limit, cfg.enable_thinking, images)
    val = tokenise_prompts(tokenizer, dataset_dir / "rlvr" / "val.jsonl", limit, cfg.enable_thinking, images)
    if len(train) < cfg.batch_size:
        raise UserError(f"posttrain.{ctx.stage}.batch_size={cfg.batch_size} is larger than the {len(train)} prompts")
    return train, val


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    cfg.validate("rlvr")
    rewards.resolve(cfg.rewards, "posttrain.rlvr.rewards")  # fail before anything starts
    ckpt_dir, dataset_dir, tokenizer_dir = common.input_dirs(ctx)
    tokenizer = common.load_tokenizer(tokenizer_dir)
    common.check_vocab(tokenizer, ckpt_dir, ctx.stage)
    train, val = load_prompts(ctx, cfg, tokenizer, dataset_dir, ckpt_dir)
    ctx.log.params({"prompts_train": len(train), "prompts_val": len(val)})
    actors = start_actors(cfg, common.worker_checkpoint(ctx, ckpt_dir), ctx.stage)
    try:
        objective = RLVRObjective(cfg, tokenizer.to_str(), actors)
        result = common.train(ctx, objective, ckpt_dir, train, val, cfg.fingerprint())
    finally:
        stop_actors(actors)
    common.finish_outputs(ctx, tokenizer_dir, {"reward": ["reward", "val_reward"], "kl": ["kl", "pg_loss"]})
    m = dict(result.metrics)
    summary = (
        f"{int(m['steps'])} steps: val reward {m['val_reward_initial']:.3f} -> {m['val_reward']:.3f}, "
        f"train reward (last 10 steps) {m['train_reward_last10']:.3f}"
    )
    return StageResult(metrics=m, summary=summary)
