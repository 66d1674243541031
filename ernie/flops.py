"""Training FLOPs per token and device peaks: the numbers behind MFU.

FLOPs per token = 6 · (active parameters + the output projection) for the matmuls of forward and
backward, plus 6 · layers · hidden · seq for causal attention scores and values (half of the 12·L·H·S
of full attention). Active parameters count the experts a token is routed to, not all of them.
"""

from __future__ import annotations

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}
"""Dense bf16 tensor-core peaks by device name fragment (SXM parts; no sparsity)."""


def training_flops_per_token(model, seq_len: int) -> float:
    """Forward + backward FLOPs per token of `model` (an `ErnieForCausalLM`) at sequence length `seq_len`."""
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    return 6.0 * (model.num_active_params() + head) + 6.0 * cfg.num_layers * cfg.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device we know, else None (no MFU on CPUs or unknown parts)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in PEAK_BF16_FLOPS.items() if part in name), None)
