"""Supervised fine-tuning on chats, with the loss on the assistant's tokens only.

    python -m pipeline run conf=tiny stages=[sft] posttrain.sft.steps=150

Inputs: `ckpt` (the model to tune) and `dataset` (`sft/train.jsonl`, `sft/val.jsonl`:
{"messages": [...]}). Each chat is rendered with ERNIE's chat template and tokenised piece
by piece; user, system and template tokens get loss weight 0. Ray Train workers (FSDP2 or DDP:
`parallel`), micro-batches (`micro_batch_size`), AdamW + warmup/cosine, resumable train state,
as in pretraining. Validation: mean assistant-token loss on sft/val.jsonl at the start, every
`eval_every` steps and at the end.
With `lora_rank` > 0 only low-rank adapters on `lora_targets` train (`ernie.lora`); they are
merged into the weights of the output checkpoint. Output (ckpt): HF layout + tokenizer/ + train_state/.
"""

from __future__ import annotations

import torch

from ernie.lora import add_lora
from ernie.losses import shifted_targets
from pipeline.contract import StageContext, StageResult, UserError
from stages.training.accumulate import LMShare, lm_shares, split_rows, weighted_lm_loss

from . import common
from .chat import Tokenised, pack_batch, pad_batch, read_records, tokenise_chat
from .config import SFTConfig as Config

INPUTS = {"ckpt": "ckpt", "dataset": "dataset"}
OUTPUT_KIND = "ckpt"


class SFTObjective:
    """Masked next-token loss (the model's own LM + router losses, with the assistant mask)."""

    def __init__(
        self,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_targets: tuple[str, ...] = (),
        pack_length: int = 0,
        loss_impl: str = "logits",
    ) -> None:
        self.lora_rank, self.lora_alpha, self.lora_targets = lora_rank, lora_alpha, tuple(lora_targets)
        self.pack_length = pack_length
        """0: one padded row per chat; else chats packed into rows of this many tokens."""
        self.loss_impl = loss_impl

    def prepare_model(self, loop) -> None:
        """Adapters go on before the model is spread over the workers (under fsdp they are sharded with
        the weights they adapt), the optimizer is built and any train state is restored."""
        loop.model.loss_impl = self.loss_impl
        if self.lora_rank:
            try:
                add_lora(loop.model, self.lora_rank, self.lora_alpha, self.lora_targets, seed=loop.job.seed)
            except ValueError as err:
                raise UserError(f"posttrain.sft LoRA: {err}") from None

    def setup(self, loop) -> None:
        """Nothing to compute from the input model once it is spread."""

    def collate(self, examples: list[Tokenised], device: torch.device) -> dict[str, torch.Tensor]:
        if self.pack_length:
            return pack_batch(examples, self.pack_length, device)
        return pad_batch(examples, device)

    def micro_batches(self, examples: list[Tokenised], loop) -> list[tuple[dict, LMShare]]:
        """The step's chats in micro-batches (each packed or padded on its own), with their shares of the
        step's assistant tokens and rows over all ranks (`stages.training.accumulate.lm_shares`)."""
        batches = [self.collate(chunk, loop.device) for chunk in split_rows(examples, loop.micro_batch)]
        shares = lm_shares(batches, loop.model.config.loss.token_balanced, loop.layout)  # collective
        return list(zip(batches, shares, strict=True))

    def loss(self, model, part: tuple[dict, LMShare], loop) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, share = part
        with loop.autocast():
            out = model(**batch)
        backward, values = weighted_lm_loss(out, share)
        return backward, {"loss": values[0], "lm": values[1]}

    def evaluate(self, loop) -> dict[str, float]:
        """Token-weighted assistant-token loss over the validation chats."""
        totals = torch.zeros(2, device=loop.device)
        for chunk in loop.my_share(loop.eval_count(loop.val_examples)):
            batch = self.collate(loop.examples(loop.val_examples, chunk), loop.device)
            with loop.autocast():
                out = loop.model(**batch)
            _, weight = shifted_targets(batch["labels"], batch["loss_mask"], batch.get("document_ids"))
            if len(chunk):  # an empty chunk's forward only keeps a sharded model's ranks in step
                totals += torch.stack([out.losses["lm"].float() * weight.sum(), weight.sum()])
        totals = loop.all_sum(totals)
        return {"val_loss": float(totals[0] / totals[1].clamp(min=1))}


def tokenise_file(tokenizer, path, max_length: int, images=None) -> list[Tokenised]:
    """Every chat of the jsonl file with at least one assistant token left after truncation
    (`images`: a `ChatImages` for a VL model's chats with images)."""
    examples = []
    for line, record in enumerate(read_records(path, "SFT chats"), start=1):
        try:
            example = tokenise_chat(tokenizer, record["messages"], max_length, images)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} line {line}: not a chat record ({err})") from None
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in record["messages"]):
            raise UserError(f"{path} line {line}: the chat has no assistant turn, so nothing to learn from")
        if example.supervised > 1:  # the first token is never a target
            examples.append(example)
    if not examples:
        raise UserError(f"{path}: no chat keeps an assistant answer within max_length={max_length} tokens")
    return examples


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    cfg.validate("sft")
    ckpt_dir, dataset_dir, tokenizer_dir = common.input_dirs(ctx)
    tokenizer = common.load_tokenizer(tokenizer_dir)
    common.check_vocab(tokenizer, ckpt_dir, ctx.stage)
    images = common.chat_images(ckpt_dir, dataset_dir)
    train = tokenise_file(tokenizer, dataset_dir / "sft" / "train.jsonl", cfg.max_length, images)
    val = tokenise_file(tokenizer, dataset_dir / "sft" / "val.jsonl", cfg.max_length, images)
    if len(train) < cfg.batch_size:
        raise UserError(f"posttrain.sft.batch_size={cfg.batch_size} is larger than the {len(train)} SFT chats")
    ctx.log.params({"examples_train": len(train), "examples_val": len(val)})
    pack_length = cfg.max_length if cfg.pack else 0
    objective = SFTObjective(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, pack_length, cfg.loss_impl)
    result = common.train(ctx, objective, ckpt_dir, train, val, cfg.fingerprint())
    common.finish_outputs(ctx, tokenizer_dir, {"loss_curve": ["loss", "lm", "val_loss"]})
    m = dict(result.metrics)
    summary = f"{int(m['steps'])} steps: val assistant-token loss {m['val_loss_initial']:.3f} -> {m['val_loss']:.3f}"
    return StageResult(metrics=m, summary=summary)
