"""Unified preference optimisation (UPO): on-policy RL and a DPO preference term in the same updates.

    python -m pipeline run conf=tiny stages=[upo] posttrain.upo.dpo_weight=1.0

ERNIE 4.5 describes UPO as its RL objective plus a DPO pairwise preference loss, with pairs
either fixed in advance (offline) or built online by rejection sampling several answers of
the current policy per prompt (ERNIE_FACTS §5). This stage implements, per step,

    loss = L_GRPO(rollouts) + dpo_weight * mean over pairs of L_DPO(pair)

L_GRPO is RLVR's loss (`rlvr`, `grpo`): verifiable prompts from rlvr/, sampled by the Ray
rollout actors, group-relative advantages, clipped surrogate, k3 KL to the input model.
The pairs are `pairs=offline` (preferences/train.jsonl, `pairs_per_step` of them a step, in
a seeded order), `online` (for each sampled group whose rewards differ: its best completion
chosen, its worst rejected, log-probs at the sampling temperature) or `both`. L_DPO is the
DPO stage's loss (sigmoid / ipo, label smoothing) against the frozen input model. The rows of
a micro-batch (its prompts' rollouts and its share of the offline pairs) go through one
forward. Validation: RLVR's val rewards and DPO's pair metrics on preferences/val.jsonl
(`val_preference_accuracy`, `val_reward_accuracy`, ...).
"""

from __future__ import annotations

import numpy as np
import torch

from ernie.losses import weighted_router_loss
from pipeline.contract import StageContext, StageResult

from . import common, rewards
from .chat import PAD_ID
from .config import UPOConfig as Config
from .dpo import DPO_METRICS, DPOObjective, Pair, preference_loss, sequence_logprobs, tokenise_pairs
from .grpo import token_logprobs
from .rlvr import RLVRObjective, load_prompts, start_actors, stop_actors

INPUTS = {"ckpt": "ckpt", "dataset": "dataset"}
OUTPUT_KIND = "ckpt"


class UPOObjective(RLVRObjective):
    """RLVR's objective with DPO pairs added to every batch (one forward over rollouts and pairs)."""

    def __init__(self, cfg: Config, tokenizer_json: str, actors: list, pairs: dict[str, list[Pair]]) -> None:
        super().__init__(cfg, tokenizer_json, actors, stage="upo")
        self.dpo = DPOObjective(cfg.beta, 0.0, cfg.loss_type, cfg.label_smoothing)
        self.dpo.pairs = pairs

    def setup(self, loop) -> None:
        super().setup(loop)
        self.dpo.setup(loop)  # reference log-probs of the offline pairs, from the input model

    # ------------------------------------------------------------------ batches
    def make_batch(self, loop, step: int) -> list[dict]:
        """RLVR's micro-batches with this rank's offline pairs of the step dealt over them; each knows the
        step's pairs (offline + online, over all ranks: the DPO term is their mean) and rows."""
        parts = super().make_batch(loop, step)
        cfg = self.cfg
        offline = [] if cfg.pairs == "online" else list(self._pair_indices(loop, step))
        online = sum(int((p["groups"].max(-1).values > p["groups"].min(-1).values).sum()) for p in parts)
        # the DPO term is a mean over the step's pairs on all ranks (collective), per rank: the ranks'
        # gradients are averaged, and ranks meet different numbers of online pairs
        step_pairs = loop.layout.per_rank_divisor(len(offline) + online)
        chunks = np.array_split(np.array(offline, dtype=np.int64), len(parts))
        rows = sum(len(p["input_ids"]) for p in parts) + 2 * len(offline)
        for part, chunk in zip(parts, chunks, strict=True):
            ids = [part["input_ids"]]
            if len(chunk):
                part["offline"] = self.dpo.collate([self.dpo.pairs["train"][i] for i in chunk], loop.device)
                ids.append(part["offline"]["input_ids"])
            width = max(p.shape[1] for p in ids)
            part["all_ids"] = torch.cat([_pad_right(p, width) for p in ids])
            part["whole"] = part["whole"] | {"rows": rows, "pairs": step_pairs, "offline": len(offline)}
        return parts

    def _pair_indices(self, loop, step: int) -> np.ndarray:
        """This rank's offline pairs of step `step`: a seeded permutation per epoch, consumed in order."""
        total, per_rank = len(self.dpo.pairs["train"]), self.cfg.pairs_per_step // loop.world
        start = (step - 1) * self.cfg.pairs_per_step + loop.rank * per_rank
        positions = np.arange(start, start + per_rank)
        epochs, offsets = np.divmod(positions, total)
        orders = {int(e): np.random.default_rng([loop.job.seed, 7, int(e)]).permutation(total) for e in set(epochs)}
        return np.array([orders[int(e)][o] for e, o in zip(epochs, offsets, strict=True)])

    # ------------------------------------------------------------------ learner
    def loss(self, model, batch: dict, loop) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with loop.autocast():
            out = model(batch["all_ids"], **batch["vision"])  # rollout rows (with their images) come first
        whole = batch["whole"]
        rows = batch["input_ids"].shape[0]
        width = batch["input_ids"].shape[1]
        rollout_logits = out.logits[:rows, :width]
        total, metrics = self.policy_terms(rollout_logits, batch)
        pair_losses, pair_metrics = [], {}
        if self.cfg.pairs != "online":  # offline metrics are means over the step's offline pairs
            zero = total.new_zeros(())
            pair_metrics = {f"offline_{k}": zero for k in DPO_METRICS}
        if "offline" in batch:
            offline = batch["offline"]
            logits = out.logits[rows:, : offline["input_ids"].shape[1]]
            logp = sequence_logprobs(logits, offline)
            half = len(logp) // 2
            loss, terms = self.dpo._terms(logp[:half], logp[half:], self.dpo.reference["train"][offline["index"]])
            pair_losses.append(loss)
            pair_metrics |= {f"offline_{k}": v.sum() / whole["offline"] for k, v in terms.items()}
        if self.cfg.pairs in ("online", "both"):
            loss, count = self._online_pairs(rollout_logits, batch)
            pair_losses.append(loss)
            pair_metrics["online_pairs"] = count
        losses = torch.cat(pair_losses) if pair_losses else total.new_zeros(0)
        dpo_loss = losses.sum() / whole["pairs"] if whole["pairs"] else total * 0
        row_share = len(batch["all_ids"]) / whole["rows"]
        router = weighted_router_loss(out.routing, loop.model.config.loss) * row_share
        total = total + self.cfg.dpo_weight * dpo_loss + router
        metrics = metrics | pair_metrics | {"pair_dpo_loss": dpo_loss.detach()}
        return total, metrics | {k: v.to(total.device) for k, v in batch["stats"].items()}

    def _online_pairs(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO losses of (best, worst) completions of each group whose rewards differ, and their count."""
        rewards_pg = batch["groups"]  # [prompts, G] on the CPU
        group = rewards_pg.shape[1]
        keep = rewards_pg.max(-1).values > rewards_pg.min(-1).values
        firsts = torch.arange(rewards_pg.shape[0]) * group
        best = (firsts + rewards_pg.argmax(-1))[keep].to(logits.device)
        worst = (firsts + rewards_pg.argmin(-1))[keep].to(logits.device)
        if not len(best):
            return logits.new_zeros(0), torch.zeros((), device=logits.device)
        mask = batch["mask"]
        logp = (token_logprobs(logits, batch["input_ids"], self.cfg.temperature) * mask).sum(-1)
        ref = (batch["ref_logp"] * mask).sum(-1)
        losses = preference_loss(
            logp[best], logp[worst], ref[best], ref[worst], self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing
        )
        return losses, torch.tensor(float(len(best)), device=logits.device)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, loop) -> dict[str, float]:
        out = super().evaluate(loop)
        for split, prefix in (("val", "val_"), ("train", "train_set_")):
            pairs = self.dpo.pairs[split]
            metrics = self.dpo._evaluate_pairs(loop, pairs, split)
            out.update({prefix + k: v for k, v in metrics.items()})
        return out


def _pad_right(ids: torch.Tensor, width: int) -> torch.Tensor:
    if ids.shape[1] == width:
        return ids
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=PAD_ID)


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    cfg.validate("upo")
    rewards.resolve(cfg.rewards, "posttrain.upo.rewards")
    ckpt_dir, dataset_dir, tokenizer_dir = common.input_dirs(ctx)
    tokenizer = common.load_tokenizer(tokenizer_dir)
    common.check_vocab(tokenizer, ckpt_dir, ctx.stage)
    train, val = load_prompts(ctx, cfg, tokenizer, dataset_dir, ckpt_dir)
    pairs = {
        split: tokenise_pairs(tokenizer, dataset_dir / "preferences" / f"{split}.jsonl", cfg.max_length)
        for split in ("train", "val")
    }
    ctx.log.params({"prompts_train": len(train), "prompts_val": len(val), "pairs_train": len(pairs["train"])})
    actors = start_actors(cfg, common.worker_checkpoint(ctx, ckpt_dir), ctx.stage)
    try:
        objective = UPOObjective(cfg, tokenizer.to_str(), actors, pairs)
        result = common.train(ctx, objective, ckpt_dir, train, val, cfg.fingerprint())
    finally:
        stop_actors(actors)
    curves = {
        "reward": ["reward", "val_reward"],
        "preferences": ["pair_dpo_loss", "val_reward_accuracy", "val_preference_accuracy"],
    }
    common.finish_outputs(ctx, tokenizer_dir, curves)
    m = dict(result.metrics)
    summary = (
        f"{int(m['steps'])} steps: val reward {m['val_reward_initial']:.3f} -> {m['val_reward']:.3f}; val pairs: "
        f"preference accuracy {m['val_reference_preference_accuracy']:.2f} (reference) -> "
        f"{m['val_preference_accuracy']:.2f}, reward accuracy {m['val_reward_accuracy']:.2f}"
    )
    return StageResult(metrics=m, summary=summary)
