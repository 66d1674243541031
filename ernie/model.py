"""The ERNIE 4.5 causal language model: dense, text MoE and multimodal heterogeneous MoE.

    from ernie import ErnieForCausalLM, get_preset
    model = ErnieForCausalLM(get_preset("tiny_moe"))
    out = model(input_ids, labels=input_ids)      # out.loss, out.losses["lm" | "aux" | ...]

One class covers the three families; the config decides which parts exist. Parallelism
(FSDP, expert parallel) is applied to this model from outside, never inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import Attention, AttentionMask, AttnImpl
from .cache import KVCache
from .chunked_loss import chunked_lm_loss
from .config import RECOMPUTE_POLICIES as POLICIES
from .config import ErnieConfig
from .layers import RMSNorm, SwiGLU
from .losses import lm_loss, router_losses
from .moe import ExpertsImpl, MoE, RouterOutput
from .paged_cache import PagedBatch
from .positions import document_positions, vision_token_mask, vl_position_ids
from .recompute import recompute
from .rope import frequency_axes, inv_frequencies, rope_cos_sin
from .vision import VisionAdapter, VisionEncoder


@dataclass
class ErnieOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    """Weighted sum of the components in `losses` (None without labels)."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Unweighted components: lm, aux, z, orthogonal."""
    routing: list[list[RouterOutput]] = field(default_factory=list)
    """Per MoE layer, the router decision of each modality pool that saw tokens."""
    hidden_states: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(.)) with a dense or MoE FFN."""

    def __init__(self, config: ErnieConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None,
        vision_mask: torch.Tensor | None,
        experts_impl: ExpertsImpl,
        policy: str = "none",
    ) -> tuple[torch.Tensor, list[RouterOutput]]:
        if policy == "layers":
            return recompute(self._forward, x, cos_sin, mask, cache, vision_mask, experts_impl, False)
        return self._forward(x, cos_sin, mask, cache, vision_mask, experts_impl, policy == "mlp")

    def _forward(self, x, cos_sin, mask, cache, vision_mask, experts_impl, recompute_mlp: bool):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            if recompute_mlp:
                y, routing = recompute(self.mlp, h, vision_mask, experts_impl)
            else:
                y, routing = self.mlp(h, vision_mask, experts_impl)
            return x + y, routing
        return x + (recompute(self.mlp, h) if recompute_mlp else self.mlp(h)), []


class ErnieModel(nn.Module):
    """The language-model trunk: token embedding, decoder layers, final norm."""

    def __init__(self, config: ErnieConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class ErnieForCausalLM(nn.Module):
    def __init__(self, config: ErnieConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.model = ErnieModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.vision_encoder = VisionEncoder(config.vision) if config.vision is not None else None
        self.adapter = VisionAdapter(config) if config.vision is not None else None
        self.register_buffer("rope_inv_freq", inv_frequencies(config.head_dim, config.rope_theta), persistent=False)
        mrope = config.mrope_section if config.vision is not None else None
        self.register_buffer("rope_axes", frequency_axes(config.head_dim, mrope), persistent=False)
        self.attn_impl: AttnImpl = "sdpa"
        self.experts_impl: ExpertsImpl = "auto"
        self.recompute: str = "none"
        """Activation recomputation policy in training (`ernie.config.RECOMPUTE_POLICIES`)."""
        self.recompute_every: int = 1
        """The policy applies to the layers whose index is a multiple of this (2: every other layer,
        about half the memory saved for half the extra compute)."""
        self.loss_impl: str = "logits"
        """"logits" | "chunked": chunked never materialises the full logits in training (`ernie.chunked_loss`);
        `out.logits` is then None (with labels, no cache, logits_to_keep 0)."""
        self.every_part_runs = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def every_part_runs(self) -> bool:
        """Every parameter takes part in every training forward, with no effect on outputs or gradients.

        FSDP2 needs it for VL models (`stages.training.parallel.shard_fsdp` sets it): each unit
        reduce-scatters the gradients of its parameters that have one, and the ranks' collectives must
        match, but a rank whose batch has no image would leave the vision encoder, the adapter and the
        vision expert pools without gradients. With it, a forward without an image runs the encoder and
        adapter on one blank image of the smallest grid and adds 0 x their output (`_idle_vision`), and
        every MoE runs a pool with no tokens on an empty batch (`MoE.every_pool_runs`): those gradients
        are exactly zero and the losses unchanged (tests/test_parallel_layout.py).
        """
        return self._every_part_runs

    @every_part_runs.setter
    def every_part_runs(self, on: bool) -> None:
        self._every_part_runs = on
        for module in self.modules():
            if isinstance(module, MoE):
                module.every_pool_runs = on

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms, zero biases and router bias."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, (RMSNorm, nn.LayerNorm)) and name == "weight":
                    param.fill_(1.0)
                elif name == "bias" or param.dim() < 2:
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(std))
            for name, buf in module.named_buffers(recurse=False):
                if name in ("e_score_correction_bias", "expert_load"):
                    buf.zero_()
        self.rope_inv_freq = inv_frequencies(self.config.head_dim, self.config.rope_theta).to(self.rope_inv_freq.device)

    def num_params(self) -> int:
        """Every parameter, a tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one text token flows through, without the vocabulary matrices.

        Per MoE layer only top_k routed experts of the text pool count; the vision pool,
        the ViT and the adapter are not on a text token's path; the embedding (a lookup)
        and the output projection are left out, as in the published A3B / A47B names.
        """
        cfg = self.config
        total = self.num_params() - self.model.embed_tokens.weight.numel()
        if not cfg.tie_word_embeddings:
            total -= self.lm_head.weight.numel()
        for layer in self.model.layers:
            if layer.is_moe:
                experts = layer.mlp.text.experts
                per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
                total -= (cfg.moe.num_experts - cfg.moe.top_k) * per_expert
                if layer.mlp.vision is not None:
                    total -= sum(p.numel() for p in layer.mlp.vision.parameters())
        for part in (self.vision_encoder, self.adapter):
            if part is not None:
                total -= sum(p.numel() for p in part.parameters())
        return total

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        cache: KVCache | PagedBatch | None = None,
        logits_to_keep: int = 0,
    ) -> ErnieOutput:
        """Run the model.

        input_ids [B, S]; labels [B, S] aligned with input_ids (shifted inside, -100 ignored);
        loss_mask [B, S] 0/1 weights of the targets; document_ids [B, S] for packed rows
        (attention and targets stay inside a document, positions restart);
        attention_mask [B, S] 1 for real tokens (left padding); position_ids [B, S] or
        [3, B, S]; pixel_values / image_grid_thw (and the video pair) for VL models;
        vision_mask [B, S] overrides which tokens use the vision experts;
        cache: a `KVCache`, filled by a prefill and extended by each decode step, or a `PagedBatch`
        (requests laid end to end in input [1, T]; logits [1, requests, V], each request's last token);
        logits_to_keep > 0 computes logits for the last positions only.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = x.shape
        x = self._merge_vision(x, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if cfg.vision is not None and vision_mask is None and input_ids is not None:
            vision_mask = vision_token_mask(input_ids, cfg)

        paged = isinstance(cache, PagedBatch)
        if paged:
            # requests laid end to end in one row: the batch knows their positions and does their attention
            if B != 1 or S != cache.tokens:
                raise ValueError(
                    f"a paged batch of {cache.tokens} tokens takes input [1, {cache.tokens}], got [{B}, {S}]"
                )
            position_ids = cache.position_ids if position_ids is None else position_ids
            cache_for_positions, mask = None, None
        else:
            past = cache.length if cache is not None else 0
            key_valid = _append(cache.key_valid if cache else None, attention_mask, past, B, S, x.device, torch.bool)
            documents = _append(cache.document_ids if cache else None, document_ids, past, B, S, x.device, torch.long)
            cache_for_positions = cache
        if position_ids is None:
            position_ids = self._default_positions(
                input_ids,
                B,
                S,
                x.device,
                document_ids,
                attention_mask,
                image_grid_thw,
                video_grid_thw,
                cache_for_positions,
            )
        if not paged:
            mask = AttentionMask(
                past=past, q_len=S, kv_len=past + S, key_valid=key_valid, document_ids=documents, impl=self.attn_impl
            ).prepare(B, x.device)
        cos_sin = rope_cos_sin(position_ids, self.rope_inv_freq, self.rope_axes)
        cos_sin = (cos_sin[0].to(x.device), cos_sin[1].to(x.device))

        routing: list[list[RouterOutput]] = []
        policy = self.recompute if self.training and torch.is_grad_enabled() and cache is None else "none"
        if policy not in POLICIES:
            raise ValueError(f"recompute={policy!r} is not one of {POLICIES}")
        for i, layer in enumerate(self.model.layers):
            layer_policy = policy if i % self.recompute_every == 0 else "none"
            x, layer_routing = layer(x, cos_sin, mask, cache, vision_mask, self.experts_impl, layer_policy)
            if layer_routing:
                routing.append(layer_routing)
        x = self.model.norm(x)
        if paged:
            cache.finish(position_ids)
            x = x[:, cache.logit_index]  # each request's last token
            logits_to_keep = 0
        elif cache is not None:
            cache.key_valid, cache.document_ids = key_valid, documents
            # continue from the last token's position (its largest axis for 3D positions), not the
            # row maximum: in a packed row the last document restarts at 0
            last = position_ids[..., -1] if position_ids.dim() == 2 else position_ids[..., -1].amax(dim=0)
            cache.next_position = last + 1

        chunked = labels is not None and self.loss_impl == "chunked" and logits_to_keep == 0 and cache is None
        logits = None if chunked else self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        out = ErnieOutput(logits=logits, routing=routing, hidden_states=x)
        if labels is not None:
            self._add_losses(out, labels, loss_mask, document_ids, chunked)
        return out

    def _add_losses(self, out: ErnieOutput, labels, loss_mask, document_ids, chunked: bool = False) -> None:
        lc = self.config.loss
        if chunked:
            hidden, weight = out.hidden_states, self.lm_head.weight
            out.losses["lm"] = chunked_lm_loss(hidden, weight, labels, loss_mask, document_ids, lc.token_balanced)
        else:
            out.losses["lm"] = lm_loss(out.logits, labels, loss_mask, document_ids, lc.token_balanced)
        out.losses.update(router_losses([r for layer in out.routing for r in layer]))
        weights = {"lm": 1.0, "aux": lc.aux_loss_weight, "z": lc.z_loss_weight, "orthogonal": lc.orthogonal_loss_weight}
        out.loss = sum(weights[name] * value for name, value in out.losses.items() if weights[name] != 0)

    def _merge_vision(self, x, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Replace image / video placeholder embeddings by the adapter's vision tokens."""
        cfg = self.config
        items = [
            (pixel_values, image_grid_thw, cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, cfg.video_token_id, "video"),
        ]
        if pixel_values is None and pixel_values_videos is None:
            idle = self.every_part_runs and self.vision_encoder is not None and torch.is_grad_enabled()
            return self._idle_vision(x) if idle else x
        for pixels, grid, token_id, kind in items:
            if pixels is None:
                continue
            if self.vision_encoder is None:
                raise ValueError(f"{cfg.name} is a text model; it cannot take {kind} inputs")
            if grid is None or input_ids is None:
                raise ValueError(f"{kind} inputs need input_ids with placeholders and a {kind}_grid_thw")
            features = self.adapter(self.vision_encoder(pixels, grid), grid).to(x.dtype)
            slots = input_ids == token_id
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(slots.sum())} {kind} placeholder tokens (id {token_id}) but the {kind}s give "
                    f"{features.shape[0]} tokens from {kind}_grid_thw={grid.tolist()}"
                )
            x = x.masked_scatter(slots[..., None], features)
        return x

    def _idle_vision(self, x: torch.Tensor) -> torch.Tensor:
        """x + 0 x the vision tokens of a blank image of one LM token (`every_part_runs`): the encoder and
        adapter weights join the graph with exactly zero gradients. Blank pixels keep the features finite
        (0 x inf would be NaN): patch embedding has no bias, so the first LayerNorm sees zeros."""
        vision = self.config.vision
        merge = vision.spatial_merge_size
        grid = torch.tensor([[1, merge, merge]], device=x.device)
        pixels = torch.zeros(merge * merge, vision.patch_dim, device=x.device)
        features = self.adapter(self.vision_encoder(pixels, grid), grid)
        return x + 0 * features.sum().to(x.dtype)

    def _default_positions(
        self, input_ids, B, S, device, document_ids, attention_mask, image_grid_thw, video_grid_thw, cache
    ):
        if cache is not None and cache.next_position is not None:
            return cache.next_position[:, None].to(device) + torch.arange(S, device=device)
        if (
            self.config.vision is not None
            and input_ids is not None
            and (image_grid_thw is not None or video_grid_thw is not None)
        ):
            return vl_position_ids(input_ids, self.config, image_grid_thw, video_grid_thw, document_ids)
        if document_ids is not None:
            return document_positions(document_ids)
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(S, device=device).expand(B, S)


def _append(cached, new, past: int, batch: int, length: int, device, dtype):
    """Extend a per-key-slot tensor (validity or document id) with this step's values.

    Missing values mean "real token" for validity and "same document as the last cached
    token" for document ids; None is returned when neither the cache nor the step has any.
    """
    if cached is None and new is None:
        return None
    if cached is None and past > 0:
        cached = torch.full((batch, past), True if dtype == torch.bool else 0, dtype=dtype, device=device)
    if new is None:
        if dtype == torch.bool:
            new = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            new = cached[:, -1:].expand(batch, length)
    new = new.to(device=device, dtype=dtype)
    return new if cached is None else torch.cat([cached.to(device), new], dim=1)
