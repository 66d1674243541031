"""Direct preference optimisation (DPO; sigmoid, label-smoothed or IPO loss) against the frozen input checkpoint.

    python -m pipeline run conf=tiny stages=[dpo] posttrain.dpo.beta=0.1

Inputs: `ckpt` (policy init and reference) and `dataset` (`preferences/{train,val}.jsonl`:
{"prompt": [...messages], "chosen": str, "rejected": str}). A pair's log-probability is
the sum over the answer tokens (answer + end-of-sentence) of prompt + answer rendered with
the chat template. The reference log-probs of every pair are computed once, split over the
ranks, before training. With h = (pi_c - ref_c) - (pi_r - ref_r), the loss per pair is
  sigmoid (Rafailov et al. 2023):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                                   (eps = label_smoothing: the pair's label is wrong with
                                   probability eps, "conservative DPO"; 0 is plain DPO),
  ipo (Azar et al. 2023, eq. 17):  (h - 1 / (2 beta))^2, on the summed answer log-probs,
plus the model's weighted router losses. Logged per step (on the batch) and at every evaluation
on the val pairs (`val_*`) and the train pairs (`train_set_*`): reward accuracy, chosen /
rejected rewards (beta * (pi - ref)) and their margin, and the policy's own preference
accuracy (pi_c > pi_r) next to the reference's. Output (ckpt): HF layout + tokenizer/ +
train_state/.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ernie.losses import shifted_targets, weighted_router_loss
from pipeline.contract import StageContext, StageResult, UserError
from stages.training.accumulate import split_rows

from . import common
from .chat import Tokenised, pad_batch, read_records, tokenise_chat
from .config import DPOConfig as Config

INPUTS = {"ckpt": "ckpt", "dataset": "dataset"}
OUTPUT_KIND = "ckpt"
DPO_METRICS = (
    "dpo_loss",
    "reward_accuracy",
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "preference_accuracy",
)
"""The per-pair metrics `DPOObjective._terms` gives (logged as pair means)."""


@dataclass
class Pair:
    index: int
    chosen: Tokenised
    rejected: Tokenised


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss from the summed answer log-probs of policy and reference (see the module docstring)."""
    h = (chosen - reference_chosen) - (rejected - reference_rejected)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def sequence_logprobs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum of log p(token) over the supervised (answer) tokens of each row [B]."""
    targets, weight = shifted_targets(batch["labels"], batch["loss_mask"], None)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return (logp * weight).sum(-1)


class DPOObjective:
    """Sigmoid DPO; the reference log-probs [N, 2] (chosen, rejected) of train and val pairs live on every rank."""

    def __init__(
        self, beta: float, sft_weight: float = 0.0, loss_type: str = "sigmoid", label_smoothing: float = 0.0
    ) -> None:
        self.beta, self.sft_weight = beta, sft_weight
        self.loss_type, self.label_smoothing = loss_type, label_smoothing
        self.reference: dict[str, torch.Tensor] = {}
        self.pairs: dict[str, list[Pair]] | None = None
        """Train / val pairs when they are not the loop's examples (UPO trains on prompts)."""

    def split(self, loop, name: str) -> list[Pair]:
        if self.pairs is not None:
            return self.pairs[name]
        return loop.train_examples if name == "train" else loop.val_examples

    def collate(self, pairs: list[Pair], device: torch.device) -> dict:
        batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], device)
        batch["index"] = torch.tensor([p.index for p in pairs], device=device)
        return batch

    def _policy(self, model, batch: dict, loop) -> tuple[torch.Tensor, torch.Tensor, object]:
        with loop.autocast():
            out = model(batch["input_ids"])
        logp = sequence_logprobs(out.logits, batch)
        half = len(logp) // 2
        return logp[:half], logp[half:], out

    def setup(self, loop) -> None:
        """Reference log-probs of every pair, from the input checkpoint (before any train state is restored)."""
        loop.model.eval()
        with torch.no_grad():
            for split in ("train", "val"):
                pairs = self.split(loop, split)
                table = torch.zeros(len(pairs), 2, device=loop.device)
                for chunk in loop.my_share(len(pairs)):
                    batch = self.collate(loop.examples(pairs, chunk), loop.device)
                    chosen, rejected, _ = self._policy(loop.model, batch, loop)
                    if len(chunk):
                        table[torch.as_tensor(chunk, device=loop.device)] = torch.stack([chosen, rejected], -1).float()
                self.reference[split] = loop.all_sum(table)
        loop.model.train()

    def _terms(self, chosen, rejected, reference) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reward_c = self.beta * (chosen - reference[:, 0])
        reward_r = self.beta * (rejected - reference[:, 1])
        loss = preference_loss(
            chosen, rejected, reference[:, 0], reference[:, 1], self.beta, self.loss_type, self.label_smoothing
        )
        metrics = {
            "dpo_loss": loss.detach(),
            "reward_accuracy": (reward_c > reward_r).float(),
            "reward_chosen": reward_c.detach(),
            "reward_rejected": reward_r.detach(),
            "reward_margin": (reward_c - reward_r).detach(),
            "preference_accuracy": (chosen > rejected).float(),
        }
        return loss, metrics

    def micro_batches(self, pairs: list[Pair], loop) -> list[dict]:
        """The step's pairs in micro-batches, each with its share of the step's pairs (every term of the
        loss is a mean over pairs, and a pair is two rows)."""
        return [
            self.collate(chunk, loop.device) | {"share": len(chunk) / len(pairs)}
            for chunk in split_rows(pairs, loop.micro_batch)
        ]

    def loss(self, model, batch: dict, loop) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected, out = self._policy(model, batch, loop)
        loss, metrics = self._terms(chosen, rejected, self.reference["train"][batch["index"]])
        total = loss.mean()
        if self.sft_weight > 0:
            half = len(batch["input_ids"]) // 2
            answer_tokens = batch["loss_mask"][:half, 1:].sum(-1).clamp(min=1)
            total = total + self.sft_weight * (-chosen / answer_tokens).mean()
        total = total + weighted_router_loss(out.routing, loop.model.config.loss)
        share = batch.get("share", 1.0)
        return total * share, {k: v.mean() * share for k, v in metrics.items()}

    def evaluate(self, loop) -> dict[str, float]:
        """DPO metrics over the validation pairs (`val_*`) and the train pairs (`train_set_*`)."""
        out = {}
        for split, prefix in (("val", "val_"), ("train", "train_set_")):
            pairs = self.split(loop, split)
            out.update({prefix + k: v for k, v in self._evaluate_pairs(loop, pairs, split).items()})
        return out

    def _evaluate_pairs(self, loop, pairs: list[Pair], split: str) -> dict[str, float]:
        """Pair-weighted means of the DPO metrics, and the reference's own preference accuracy."""
        names = list(DPO_METRICS)
        count = loop.eval_count(pairs)
        sums = torch.zeros(len(names), device=loop.device)
        for chunk in loop.my_share(count):
            batch = self.collate(loop.examples(pairs, chunk), loop.device)
            chosen, rejected, _ = self._policy(loop.model, batch, loop)
            _, metrics = self._terms(chosen, rejected, self.reference[split][batch["index"]])
            if len(chunk):
                sums += torch.stack([metrics[n].float().sum() for n in names])
        values = dict(zip(names, (loop.all_sum(sums) / count).tolist(), strict=True))
        ref = self.reference[split][:count]
        values["reference_preference_accuracy"] = float((ref[:, 0] > ref[:, 1]).float().mean())
        return values


def tokenise_pairs(tokenizer, path, max_length: int) -> list[Pair]:
    """Every (prompt + chosen, prompt + rejected) pair whose answers both survive truncation."""
    pairs = []
    for line, record in enumerate(read_records(path, "preference pairs"), start=1):
        try:
            sides = [
                tokenise_chat(tokenizer, record["prompt"] + [{"role": "assistant", "content": record[key]}], max_length)
                for key in ("chosen", "rejected")
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} line {line}: not a preference record ({err})") from None
        if sides[0].ids == sides[1].ids:
            raise UserError(f"{path} line {line}: the chosen and rejected answers are the same, so no preference")
        if all(side.supervised > 0 for side in sides):
            pairs.append(Pair(len(pairs), *sides))
    if not pairs:
        raise UserError(f"{path}: no pair keeps both answers within max_length={max_length} tokens")
    return pairs


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    cfg.validate("dpo")
    ckpt_dir, dataset_dir, tokenizer_dir = common.input_dirs(ctx)
    tokenizer = common.load_tokenizer(tokenizer_dir)
    common.check_vocab(tokenizer, ckpt_dir, ctx.stage)
    train = tokenise_pairs(tokenizer, dataset_dir / "preferences" / "train.jsonl", cfg.max_length)
    val = tokenise_pairs(tokenizer, dataset_dir / "preferences" / "val.jsonl", cfg.max_length)
    if len(train) < cfg.batch_size:
        raise UserError(f"posttrain.dpo.batch_size={cfg.batch_size} is larger than the {len(train)} preference pairs")
    ctx.log.params({"pairs_train": len(train), "pairs_val": len(val)})
    objective = DPOObjective(cfg.beta, cfg.sft_weight, cfg.loss_type, cfg.label_smoothing)
    result = common.train(ctx, objective, ckpt_dir, train, val, cfg.fingerprint())
    curves = {
        "dpo_loss": ["dpo_loss", "val_dpo_loss", "train_set_dpo_loss"],
        "rewards": [
            "reward_margin",
            "val_reward_margin",
            "reward_accuracy",
            "val_reward_accuracy",
            "train_set_reward_accuracy",
        ],
    }
    common.finish_outputs(ctx, tokenizer_dir, curves)
    m = dict(result.metrics)
    summary = (
        f"{int(m['steps'])} steps; train pairs: reward accuracy {m['train_set_reward_accuracy']:.2f}, "
        f"margin {m['train_set_reward_margin']:.3f}; val pairs: reward accuracy {m['val_reward_accuracy']:.2f}, "
        f"margin {m['val_reward_margin']:.3f}, preference accuracy "
        f"{m['val_reference_preference_accuracy']:.2f} (reference) -> {m['val_preference_accuracy']:.2f}"
    )
    return StageResult(metrics=m, summary=summary)
