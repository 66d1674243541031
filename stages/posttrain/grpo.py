"""GRPO's arithmetic: group-relative advantages, the clipped surrogate, the KL estimate.

For a prompt sampled G times with rewards r_1..r_G, each completion's advantage is
(r_i - mean r) / (std r + eps) (Shao et al. 2024, "outcome supervision"), the same for
every token of the completion. The per-token loss is PPO's clipped surrogate,
    -min(rho * A, clip(rho, 1 - eps_clip, 1 + eps_clip) * A),  rho = pi(token) / pi_old(token),
plus kl_coef times Schulman's k3 estimate of KL(pi || pi_ref),
    exp(ref - logp) - (ref - logp) - 1   (unbiased, never negative),
averaged over every completion token of the batch (token-level mean, as DAPO recommends:
long and short completions weigh by their tokens, not per sequence). Prompt and padding
tokens carry mask 0 and never enter the loss.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[prompts, G] rewards -> advantages: centred per group, and divided by the group's std when `scale`.

    A group whose completions all score the same gets advantage 0: it carries no signal.
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T-1]: log p(input_ids[:, t + 1] | ...) under softmax(logits / temperature)."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(token-mean loss, metrics) for [B, T] token log-probs, [B] advantages and a [B, T] 0/1 mask.

    `tokens`: the mean's denominator when these rows are one micro-batch of a step (the step's
    completion tokens, over all ranks divided by their number when the ranks' gradients are averaged,
    so the micro-batches' results add up to the step's); default the mask's."""
    mask = mask.float()
    tokens = mask.sum().clamp(min=1) if tokens is None else tokens
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    metrics = {
        "clip_fraction": (((ratio - 1).abs() > clip_eps).float() * mask).sum() / tokens,
        "ratio_mean": (ratio.detach() * mask).sum() / tokens,
    }
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        metrics["kl"] = (kl.detach() * mask).sum() / tokens
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / tokens
    metrics["pg_loss"] = ((-surrogate).detach() * mask).sum() / tokens
    return loss, metrics
