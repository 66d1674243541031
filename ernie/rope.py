"""Rotary position embeddings: 1D for text, 3D (time/height/width) for the VL text tower,
and the 2D axial RoPE of the vision encoder.

ERNIE rotates *interleaved* pairs (2j, 2j+1) (GPT-J / GLM style), not the Llama half split,
so published q/k weights are used as stored. The 3D RoPE of the VL models keeps the same
interleaved pairing and only chooses, per frequency, which position axis drives it
(ERNIE_FACTS §1.3): of the head_dim/2 frequencies, the first h+w alternate
height (even) / width (odd) and the last t follow time. A text token carries the same
position on all three axes, so for pure text the 3D RoPE equals the 1D RoPE.

Shapes: B batch, S sequence, D head_dim, F = D/2 frequencies.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """inv_freq_F = theta^(-2i/D), in fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def frequency_axes(head_dim: int, mrope_section: tuple[int, int, int] | None) -> torch.Tensor:
    """Axis (0 time, 1 height, 2 width) that drives each of the F frequencies."""
    n_freq = head_dim // 2
    if mrope_section is None:
        return torch.zeros(n_freq, dtype=torch.long)
    h, w, t = mrope_section
    hw = torch.arange(h + w) % 2 + 1  # even -> height (1), odd -> width (2)
    return torch.cat([hw, torch.zeros(t, dtype=torch.long)])


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq_F: torch.Tensor, axes_F: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, S, D] (fp32) for positions [B, S] or [3, B, S] (t, h, w)."""
    inv_freq_F = inv_freq_F.to(position_ids.device)
    if position_ids.dim() == 2:
        angles_BSF = position_ids[..., None].float() * inv_freq_F
    else:
        pos_FBS = position_ids.float()[axes_F.to(position_ids.device)]  # pick the axis per frequency
        angles_BSF = pos_FBS.permute(1, 2, 0) * inv_freq_F
    angles_BSD = angles_BSF[..., None].expand(*angles_BSF.shape, 2).flatten(-2)  # each frequency twice
    return angles_BSD.cos(), angles_BSD.sin()


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x_BNSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate q or k [B, heads, S, D] in fp32 and return it in its own dtype."""
    cos, sin = cos_BSD[:, None], sin_BSD[:, None]
    xf = x_BNSD.float()
    return (xf * cos + _rotate_interleaved(xf) * sin).to(x_BNSD.dtype)


# ------------------------------------------------------------------ vision encoder (2D)
def vision_cos_sin(hw_positions_N2: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D RoPE of the ViT: D/4 frequencies for height, D/4 for width, half-split pairs."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=hw_positions_N2.device) / spatial)
    )
    freqs_N2F = hw_positions_N2[..., None].float() * inv_freq
    freqs_ND2 = torch.cat([freqs_N2F[:, 0], freqs_N2F[:, 1]], dim=-1)
    freqs_ND = torch.cat([freqs_ND2, freqs_ND2], dim=-1)
    return freqs_ND.cos(), freqs_ND.sin()


def apply_vision_rope(x_NHD: torch.Tensor, cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
    half = x_NHD.shape[-1] // 2
    xf = x_NHD.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos_ND[:, None] + rotated * sin_ND[:, None]).to(x_NHD.dtype)
