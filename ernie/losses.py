"""Loss components of ERNIE 4.5 pre-training, each returned under its own name.

Definitions follow ERNIEKit (ERNIE_FACTS §4): the load-balance, z- and orthogonal router
losses are computed per MoE layer and modality pool and averaged over them, so their
scale does not grow with depth. Shapes: B batch, S sequence, V vocab, T tokens, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import RouterOutput, count_per_expert

IGNORE_INDEX = -100


def shifted_targets(
    labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor | None, document_ids_BS: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for next-token prediction and their 0/1 weights, aligned with logits[:, :-1].

    A position never predicts across a document boundary inside a packed row.
    """
    targets = labels_BS[:, 1:]
    weight = (targets != IGNORE_INDEX).float()
    if loss_mask_BS is not None:
        weight = weight * loss_mask_BS[:, 1:].float()
    if document_ids_BS is not None:
        weight = weight * (document_ids_BS[:, 1:] == document_ids_BS[:, :-1]).float()
    return targets.clamp(min=0), weight


def lm_loss(
    logits_BSV: torch.Tensor,
    labels_BS: torch.Tensor,
    loss_mask_BS: torch.Tensor | None = None,
    document_ids_BS: torch.Tensor | None = None,
    token_balanced: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised tokens.

    With `token_balanced` (the multimodal token-balanced loss) the forward value is the same
    mean, but the gradient divides by the constant number of prediction slots instead of
    the number of supervised tokens, so every supervised token weighs the same whether its
    micro-batch is mostly text or mostly image tokens (ERNIEKit `token_balance_loss`).
    """
    targets, weight = shifted_targets(labels_BS, loss_mask_BS, document_ids_BS)
    ce = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    summed = (ce * weight.flatten()).sum()
    mean = summed / weight.sum().clamp(min=1.0)
    if not token_balanced:
        return mean
    balanced = summed / weight.numel()
    return balanced - balanced.detach() + mean.detach()


def load_balance_loss(routing: RouterOutput) -> torch.Tensor:
    """E * sum_e mean_prob_e * dispatch_fraction_e (dispatch counts detached); = k at uniform load."""
    probs_TE = routing.probs_TE
    T, E = probs_TE.shape
    mean_prob_E = probs_TE.mean(0)
    with torch.no_grad():
        dispatch_E = count_per_expert(routing.topk_ids_TK, E).float() / T
    return E * (mean_prob_E * dispatch_E).sum()


def z_loss(routing: RouterOutput) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2: keeps router logits small."""
    return torch.logsumexp(routing.logits_TE, dim=-1).pow(2).mean()


def orthogonal_loss(gate_weight_EH: torch.Tensor) -> torch.Tensor:
    """||W_hat W_hat^T - I||_F^2 / E^2 on the row-normalised router: 0 for orthogonal experts."""
    w = gate_weight_EH.float()
    w_hat = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    E = w.shape[0]
    gram = w_hat @ w_hat.T
    return (gram - torch.eye(E, device=w.device)).pow(2).sum() / E**2


def router_losses(routings: list[RouterOutput]) -> dict[str, torch.Tensor]:
    """aux / z / orthogonal losses averaged over every (layer, pool) routing decision (orthogonal only
    where gradients are on)."""
    if not routings:
        return {}
    losses = {
        "aux": torch.stack([load_balance_loss(r) for r in routings]).mean(),
        "z": torch.stack([z_loss(r) for r in routings]).mean(),
    }
    if all(r.orthogonal is not None for r in routings):  # not under no_grad (see RouterOutput)
        losses["orthogonal"] = torch.stack([r.orthogonal for r in routings]).mean()
    return losses


def weighted_router_loss(routing: list[list[RouterOutput]], weights) -> torch.Tensor:
    """The router losses of a forward's `routing` (per layer, per pool) at `weights`' (a `LossConfig`)
    aux / z / orthogonal weights, summed; 0 for a dense model. Post-training objectives add it to theirs."""
    total = torch.zeros(())
    for name, value in router_losses([r for layer in routing for r in layer]).items():
        total = total + getattr(weights, f"{name}_loss_weight") * value
    return total
