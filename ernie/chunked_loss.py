"""Output projection + next-token cross-entropy computed in token chunks.

With ERNIE 4.5's 103k vocabulary the [tokens, vocab] logits (and their fp32 upcast and gradient) are the
largest activations of a training step: 8 x 4096 tokens give 6.8 GB of bf16 logits before the fp32 copies.
`chunked_lm_loss` returns what `lm_loss(hidden @ W.T, ...)` returns, value and gradients, while at most
`chunk_tokens x V` logits exist at a time, in forward and backward: the forward keeps only the per-token
logsumexp, the backward recomputes each chunk's logits (one extra projection matmul, the price of the memory).

Shapes: B batch, S sequence, H hidden, V vocab, N = B * S flattened tokens, C chunk.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .losses import shifted_targets


def chunked_lm_loss(
    hidden_BSH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None = None,
    document_ids_BS: torch.Tensor | None = None,
    token_balanced: bool = False,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """`lm_loss(hidden_BSH @ lm_head_weight_VH.T, labels_BS, ...)` without materialising the full logits.

    Same targets and weights (`shifted_targets`: -100 ignored, loss_mask, no prediction across documents),
    same value (mean CE over supervised tokens, 0 when there are none) and same gradients, including the
    token-balanced rule (value = the mean, gradient as if divided by the number of prediction slots B*(S-1)).
    Under autocast the projection runs in the autocast dtype, as `nn.Linear` would.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    B, S, H = hidden_BSH.shape
    targets_N, weight_N, grad_denominator = _flat_targets(labels_BS, loss_mask_BS, document_ids_BS, token_balanced)
    hidden_BSH, lm_head_weight_VH = _autocast_inputs(hidden_BSH, lm_head_weight_VH)
    with torch.autocast(hidden_BSH.device.type, enabled=False):
        return _ChunkedLMLoss.apply(
            hidden_BSH.reshape(B * S, H), lm_head_weight_VH, targets_N, weight_N, grad_denominator, chunk_tokens
        )


def _flat_targets(
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None,
    document_ids_BS: torch.Tensor | None,
    token_balanced: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets and weights for all B*S positions (the last of each row predicts nothing: weight 0), so the
    hidden states are used as a view, and the denominator the gradient divides by."""
    targets_BS1, weight_BS1 = shifted_targets(labels_BS, loss_mask_BS, document_ids_BS)
    pad = torch.zeros_like(labels_BS[:, :1])
    targets_N = torch.cat([targets_BS1, pad], dim=1).flatten()
    weight_N = torch.cat([weight_BS1, pad.float()], dim=1).flatten()
    if token_balanced:
        # lm_loss divides by weight.numel() (NaN there for S == 1, where there is no slot; 1 here)
        grad_denominator = torch.tensor(float(max(weight_BS1.numel(), 1)), device=weight_N.device)
    else:
        grad_denominator = weight_BS1.sum().clamp(min=1.0)
    return targets_N, weight_N, grad_denominator


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast both matmul inputs to the autocast dtype when autocast is on (what F.linear does under it), so the
    chunked path runs the projection in the same precision as `lm_head(x)`; grads flow back through the casts."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype)


def _chunk_logits(hidden_CH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
    """One chunk's logits: the matmul in the input dtype, then upcast (as lm_loss upcasts `lm_head(x)`)."""
    return (hidden_CH @ weight_VH.T).float()


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


class _ChunkedLMLoss(torch.autograd.Function):
    """Saves hidden, weight, targets, weights and the per-token logsumexp; never a [N, V] tensor."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, weight_N, grad_denominator, chunk_tokens: int):
        N = hidden_NH.shape[0]
        lse_N = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        target_logit_N = torch.empty_like(lse_N)
        for start, end in _spans(N, chunk_tokens):
            logits_CV = _chunk_logits(hidden_NH[start:end], weight_VH)
            lse_N[start:end] = torch.logsumexp(logits_CV, dim=-1)
            target_logit_N[start:end] = logits_CV.gather(1, targets_N[start:end, None]).squeeze(1)
            del logits_CV
        summed = ((lse_N - target_logit_N) * weight_N).sum()
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, weight_N, lse_N, grad_denominator)
        ctx.chunk_tokens = chunk_tokens
        return summed / weight_N.sum().clamp(min=1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden_NH, weight_VH, targets_N, weight_N, lse_N, grad_denominator = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d loss / d logit[t, v] = scale_t * (softmax[t, v] - onehot[t, v]), scale_t = weight_t / denominator
        scale_N = weight_N * (grad_loss.float() / grad_denominator)
        if not (need_hidden or need_weight):
            return None, None, None, None, None, None
        grad_hidden_NH = torch.empty_like(hidden_NH) if need_hidden else None
        grad_weight_VH = (
            torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_weight else None
        )
        for start, end in _spans(hidden_NH.shape[0], ctx.chunk_tokens):
            hidden_CH = hidden_NH[start:end]
            grad_CV = _grad_logits(
                _chunk_logits(hidden_CH, weight_VH), lse_N[start:end], targets_N[start:end], scale_N[start:end]
            ).to(hidden_NH.dtype)
            if need_hidden:
                torch.mm(grad_CV, weight_VH, out=grad_hidden_NH[start:end])
            if need_weight:
                _accumulate_mm(grad_weight_VH, grad_CV.T, hidden_CH)
            del grad_CV
        grad_weight_VH = grad_weight_VH.to(weight_VH.dtype) if need_weight else None
        return grad_hidden_NH, grad_weight_VH, None, None, None, None


def _grad_logits(
    logits_CV: torch.Tensor, lse_C: torch.Tensor, targets_C: torch.Tensor, scale_C: torch.Tensor
) -> torch.Tensor:
    """scale * (softmax - onehot(target)) in fp32, in place on the chunk's fresh logits (no extra [C, V])."""
    grad_CV = logits_CV.sub_(lse_C[:, None]).exp_().mul_(scale_C[:, None])
    return grad_CV.scatter_add_(1, targets_C[:, None], -scale_C[:, None])


def _accumulate_mm(acc_fp32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with an fp32 accumulator across chunks (each chunk's product in the input dtype, itself
    accumulated in fp32 inside the matmul)."""
    if a.dtype == acc_fp32.dtype:
        acc_fp32.addmm_(a, b)
    else:
        acc_fp32.add_(a @ b)
