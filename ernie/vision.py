"""The VL vision side: a ViT over variable-resolution patches and the adapter that merges
2x2 patches spatially and 2 frames temporally into language-model tokens.

Input patches arrive flattened, `pixel_values` [n_patches, C*P*P], grouped per image /
video as t frames of h x w patches, each frame laid out *block-major*: the 2x2 patches that
merge into one LM token are consecutive (the HF / ERNIE image processor order). `grid_thw`
[n_items, 3] gives (t, h, w) in patches per item. Images have t = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ErnieConfig, VisionConfig
from .layers import RMSNorm
from .rope import apply_vision_rope, vision_cos_sin


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [n_patches, 2] in the block-major order of `pixel_values`."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(1, 2).flatten()
        ww = ww.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = v.num_heads, v.hidden_size // v.num_heads
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=True)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=True)

    def forward(self, x_NH, cos_sin, frame_lengths: list[int]) -> torch.Tensor:
        N = x_NH.shape[0]
        q, k, v = self.qkv(x_NH).view(N, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_vision_rope(q, *cos_sin), apply_vision_rope(k, *cos_sin)
        # attention stays inside each frame (bidirectional)
        outs = [
            F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1)).transpose(0, 1)
            for qs, ks, vs in zip(q.split(frame_lengths), k.split(frame_lengths), v.split(frame_lengths), strict=True)
        ]
        return self.proj(torch.cat(outs).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.attn = VisionAttention(v)
        self.mlp = VisionMLP(v)

    def forward(self, x, cos_sin, frame_lengths):
        x = x + self.attn(self.norm1(x), cos_sin, frame_lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(v.patch_dim, v.hidden_size, bias=False)

    def forward(self, pixel_values):
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionEncoder(nn.Module):
    """ViT with 2D axial RoPE, LayerNorm blocks and a final LayerNorm (`ln`)."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.config = v
        self.patch_embed = PatchEmbed(v)
        self.blocks = nn.ModuleList([VisionBlock(v) for _ in range(v.depth)])
        self.ln = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        v = self.config
        x = self.patch_embed(pixel_values)
        positions = patch_positions(grid_thw, v.spatial_merge_size)
        cos_sin = vision_cos_sin(positions, v.hidden_size // v.num_heads, v.rope_theta)
        frame_lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos_sin, frame_lengths)
        return self.ln(x)


def _adapter_mlp(in_dim: int, out_dim: int, eps: float) -> nn.Sequential:
    # indices 0/2/3 are the published checkpoint names (spatial_linear.0, .2, .3)
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim, eps=eps)
    )


class VisionAdapter(nn.Module):
    """Spatial 2x2 merge -> MLP, temporal 2-frame merge -> MLP, projection to the LM width, RMSNorm."""

    def __init__(self, config: ErnieConfig) -> None:
        super().__init__()
        v = config.vision
        assert v is not None
        self.merge, self.temporal = v.spatial_merge_size, v.temporal_merge_size
        spatial_dim = v.hidden_size * self.merge**2
        self.spatial_linear = _adapter_mlp(spatial_dim, spatial_dim, v.layer_norm_eps)
        self.temporal_linear = _adapter_mlp(spatial_dim * self.temporal, spatial_dim, v.layer_norm_eps)
        self.mlp = nn.Linear(spatial_dim, config.hidden_size)
        self.after_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, features_NH: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        merged = self.spatial_linear(features_NH.reshape(-1, features_NH.shape[-1] * self.merge**2))
        merged = self.temporal_linear(self._pair_frames(merged, grid_thw))
        return self.after_norm(self.mlp(merged))

    def _pair_frames(self, x_MD: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Concatenate even and odd frames feature-wise; a still image is paired with itself."""
        first, second, offset = [], [], 0
        for t, h, w in grid_thw.tolist():
            per_frame = h * w // self.merge**2
            frames = [torch.arange(offset + f * per_frame, offset + (f + 1) * per_frame) for f in range(t)]
            evens, odds = frames[0::2], frames[1::2] if t > 1 else frames[0::2]
            first += evens
            second += odds
            offset += t * per_frame
        idx_a = torch.cat(first).to(x_MD.device)
        idx_b = torch.cat(second).to(x_MD.device)
        return torch.cat([x_MD[idx_a], x_MD[idx_b]], dim=-1)
