"""Behaviour of the ERNIE 4.5 model beyond HF parity: cached decoding, the fast MoE path,
modality isolation, packed documents, FlexAttention, the router and a few training steps.

All tiny presets, fp32 on CPU. Models are built with initializer_range 0.1 (instead of 0.02)
so attention, routing and the layers move the logits by O(1), and a wrong position or mask
shows up far above the 1e-5 tolerances used for same-math paths.
"""

from __future__ import annotations

import warnings
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from ernie import ErnieForCausalLM, KVCache, get_preset
from ernie.losses import lm_loss
from ernie.moe import GroupedExperts, MoE, Router

FAMILIES = ["tiny_dense", "tiny_moe", "tiny_vl"]
PATCH_DIM = 3 * 14 * 14
ATOL = 1e-5  # same math, different order of fp32 operations


def make_model(name: str, seed: int = 0, std: float = 0.1) -> ErnieForCausalLM:
    cfg = get_preset(name)
    cfg.initializer_range = std
    model = ErnieForCausalLM(cfg)
    model.init_weights(seed)
    return model.eval()


def random_text(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Token ids that are never special tokens (tiny_vl's vision ids are 5..10)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(11, 400, (batch, n), generator=g)


def image_prompt(cfg, h: int, w: int, before: list[int], after: list[int], seed: int = 0):
    """(ids [S], pixel_values [h*w, 588], grid [1, 3]) for one image of h x w patches."""
    n_tokens = h * w // 4
    ids = before + [cfg.image_start_token_id] + [cfg.image_token_id] * n_tokens + [cfg.image_end_token_id] + after
    pixels = torch.randn(h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(ids), pixels, torch.tensor([[1, h, w]])


def assert_close(actual, expected, atol=ATOL, what=""):
    diff = (actual - expected).abs().max().item()
    assert diff < atol, f"{what}: max |diff| = {diff:.3g} >= {atol}"


# ================================================================ cached decoding
@pytest.mark.parametrize("step", [1, 3], ids=["token_by_token", "chunks_of_3"])
@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(name, step):
    model = make_model(name)
    ids = random_text(14, seed=1)
    full = model(ids).logits
    cache = KVCache(model.config.num_layers)
    prefill = model(ids[:, :6], cache=cache).logits
    assert_close(prefill, full[:, :6], what="prefill")
    for t in range(6, ids.shape[1], step):
        out = model(ids[:, t : t + step], cache=cache).logits
        assert_close(out, full[:, t : t + step], what=f"decode at {t}")
    assert cache.length == ids.shape[1]
    assert cache.next_position.tolist() == [ids.shape[1]]


@torch.no_grad()
def test_cached_decoding_test_has_power():
    """A decode step at the wrong position gives clearly different logits (the 1e-5 test can fail)."""
    model = make_model("tiny_dense")
    ids = random_text(10, seed=1)
    full = model(ids).logits
    cache = KVCache(model.config.num_layers)
    model(ids[:, :9], cache=cache)
    wrong = model(ids[:, 9:], cache=cache, position_ids=torch.tensor([[20]])).logits
    assert (wrong[:, 0] - full[:, 9]).abs().max() > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_left_padded_batch_decoding_equals_each_row_alone(name):
    model = make_model(name)
    a, b = random_text(9, seed=2)[0], random_text(5, seed=3)[0]
    steps = random_text(4, seed=4, batch=2)
    P = len(a)
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, P - len(b) :], mask[1, P - len(b) :] = b, 1
    alone_a = model(torch.cat([a, steps[0]])[None]).logits[0]
    alone_b = model(torch.cat([b, steps[1]])[None]).logits[0]

    cache = KVCache(model.config.num_layers)
    prefill = model(ids, attention_mask=mask, cache=cache).logits
    assert_close(prefill[0], alone_a[:P], what="row 0 prefill")
    assert_close(prefill[1, P - len(b) :], alone_b[: len(b)], what="row 1 prefill (real tokens)")
    for t in range(steps.shape[1]):
        out = model(steps[:, t : t + 1], cache=cache).logits[:, 0]
        assert_close(out[0], alone_a[P + t], what=f"row 0 step {t}")
        assert_close(out[1], alone_b[len(b) + t], what=f"row 1 step {t}")


@pytest.mark.parametrize("prefill_len", [12, 14, 16], ids=["ends_on_image_end", "mid_text", "later"])
@torch.no_grad()
def test_vl_cached_decoding_after_image_prefill(prefill_len):
    """Prefill holds the image (3D positions); decode continues from cache.next_position."""
    model = make_model("tiny_vl")
    cfg = model.config
    ids, pixels, grid = image_prompt(cfg, 4, 6, before=[17, 18, 19, 12], after=list(range(20, 27)))
    ids = ids[None]  # 4 text, start, 6 image, end, 7 text = 19 tokens; image end at index 11
    full = model(ids, pixel_values=pixels, image_grid_thw=grid).logits
    # the 3D positions matter: 1D positions give other logits
    flat = model(ids, pixel_values=pixels, image_grid_thw=grid, position_ids=torch.arange(ids.shape[1])[None])
    assert (flat.logits - full).abs().max() > 1e-2

    cache = KVCache(cfg.num_layers)
    prefill = model(ids[:, :prefill_len], pixel_values=pixels, image_grid_thw=grid, cache=cache).logits
    assert_close(prefill, full[:, :prefill_len], what="prefill")
    for t in range(prefill_len, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache).logits
        assert_close(out[:, 0], full[:, t], what=f"decode at {t}")


@torch.no_grad()
def test_vl_left_padded_batch_with_images_decodes_like_each_row_alone():
    model = make_model("tiny_vl")
    cfg = model.config
    a, pa, ga = image_prompt(cfg, 4, 4, before=[17, 18], after=[19], seed=1)
    b, pb, gb = image_prompt(cfg, 2, 4, before=[], after=[11], seed=2)
    steps = random_text(3, seed=5, batch=2)
    P = len(a)
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, P - len(b) :], mask[1, P - len(b) :] = b, 1
    alone_a = model(torch.cat([a, steps[0]])[None], pixel_values=pa, image_grid_thw=ga).logits[0]
    alone_b = model(torch.cat([b, steps[1]])[None], pixel_values=pb, image_grid_thw=gb).logits[0]

    cache = KVCache(cfg.num_layers)
    prefill = model(
        ids, attention_mask=mask, pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.cat([ga, gb]), cache=cache
    ).logits
    assert_close(prefill[0], alone_a[:P], what="row 0 prefill")
    assert_close(prefill[1, P - len(b) :], alone_b[: len(b)], what="row 1 prefill")
    for t in range(steps.shape[1]):
        out = model(steps[:, t : t + 1], cache=cache).logits[:, 0]
        assert_close(out[0], alone_a[P + t], what=f"row 0 step {t}")
        assert_close(out[1], alone_b[len(b) + t], what=f"row 1 step {t}")


@torch.no_grad()
def test_cached_decoding_after_packed_prefill_continues_the_last_document():
    """Regression: next_position is the last token's position + 1, not the row maximum
    (the last document of a packed row restarts its positions at 0)."""
    model = make_model("tiny_moe")
    ids = random_text(12, seed=6, batch=2)
    docs = torch.tensor([[0] * 7 + [1] * 5, [0] * 3 + [1] * 4 + [2] * 5])
    full = model(ids, document_ids=docs).logits
    cache = KVCache(model.config.num_layers)
    model(ids[:, :8], document_ids=docs[:, :8], cache=cache)
    assert cache.next_position.tolist() == [1, 1]
    for t in range(8, 12):
        out = model(ids[:, t : t + 1], cache=cache).logits
        assert_close(out[:, 0], full[:, t], what=f"decode at {t}")


# ================================================================ grouped vs loop experts
def _vl_batch(cfg, seed=0):
    a, pa, ga = image_prompt(cfg, 4, 4, before=[17, 18, 19], after=[20, 11, 12, 13], seed=seed)
    return dict(input_ids=a[None], pixel_values=pa, image_grid_thw=ga, labels=a[None])


def _grads_for(model, impl, batch):
    model.experts_impl = impl
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_vl"])
def test_grouped_experts_equal_loop_outputs_and_gradients(name):
    model = make_model(name).train()
    if name == "tiny_vl":
        batch = _vl_batch(model.config)
    else:
        ids = random_text(16, seed=7, batch=2)
        batch = dict(input_ids=ids, labels=ids)
    logits_g, loss_g, grads_g = _grads_for(model, "grouped", batch)
    logits_l, loss_l, grads_l = _grads_for(model, "loop", batch)
    assert_close(logits_g, logits_l, what="logits")
    assert_close(loss_g, loss_l, what="loss")
    assert grads_g.keys() == grads_l.keys()
    expert_params = [n for n in grads_g if "experts." in n and "shared" not in n]
    assert expert_params, "no routed-expert gradients"
    if name == "tiny_vl":
        assert any(".mlp.vision." in n for n in expert_params), "the vision pool got no gradient"
    for n in grads_g:
        assert_close(grads_g[n], grads_l[n], what=f"grad of {n}")


def _experts_with_routing(seed=0):
    torch.manual_seed(seed)
    experts = GroupedExperts(num_experts=6, hidden=16, intermediate=8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    T, K = 11, 2
    x = torch.randn(T, 16, requires_grad=True)
    # only experts 1, 3, 4 receive tokens: the first, a middle and the last expert are empty
    used = torch.tensor([1, 3, 4])
    first = torch.randint(0, 3, (T,))
    ids = torch.stack([used[first], used[(first + 1) % 3]], dim=1)
    weights = torch.rand(T, K).softmax(-1).requires_grad_()
    return experts, x, ids, weights


def _expert_run(experts, x, ids, weights, impl):
    for t in (x, weights, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    y = experts(x, ids, weights, impl)
    (y * torch.linspace(-1, 1, y.shape[-1])).pow(2).sum().backward()
    return [y.detach(), x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["torch_grouped_mm", "per_segment_matmul"])
def test_grouped_experts_module_equals_loop_with_empty_experts(grouped_mm, monkeypatch):
    import ernie.moe

    if not grouped_mm:
        monkeypatch.setattr(ernie.moe, "grouped_mm_supported", lambda x: False)
    elif not ernie.moe.grouped_mm_supported(torch.zeros(1)):
        pytest.skip("torch._grouped_mm is not available in this torch build")
    experts, x, ids, weights = _experts_with_routing()
    fast = _expert_run(experts, x, ids, weights, "grouped")
    ref = _expert_run(experts, x, ids, weights, "loop")
    for what, a, b in zip(["output", "d x", "d weights", "d gate_up", "d down"], fast, ref, strict=True):
        assert_close(a, b, what=what)
    # experts without tokens get exactly zero gradient, used ones a non-zero one
    for e in (0, 2, 5):
        assert fast[3][e].abs().max() == 0 and fast[4][e].abs().max() == 0
    for e in (1, 3, 4):
        assert fast[3][e].abs().max() > 0


def test_gathered_experts_equal_loop_with_empty_experts():
    """The compile-friendly path (each slot's expert weights gathered) against the reference, gradients included."""
    experts, x, ids, weights = _experts_with_routing()
    gathered = _expert_run(experts, x, ids, weights, "gather")
    ref = _expert_run(experts, x, ids, weights, "loop")
    for what, a, b in zip(["output", "d x", "d weights", "d gate_up", "d down"], gathered, ref, strict=True):
        assert_close(a, b, what=what)


# ================================================================ modality isolation (VL)
def _moe_block_inputs(seed=0):
    model = make_model("tiny_vl", seed=seed)
    layer = next(layer for layer in model.model.layers if layer.is_moe)
    moe: MoE = layer.mlp
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 10, model.config.hidden_size, generator=g)
    vision_mask = torch.zeros(2, 10, dtype=torch.bool)
    vision_mask[0, 2:7] = True
    vision_mask[1, 5:9] = True
    return moe, x, vision_mask


@torch.no_grad()
def _perturb_routed_expert(pool, routing):
    """Scale the gate/up weights of an expert that some token of this pool was sent to."""
    expert = int(routing.topk_ids_TK[0, 0])
    pool.experts.gate_up_proj[expert].mul_(3.0).add_(0.1)
    return expert


@pytest.mark.parametrize("perturbed", ["text", "vision"])
@torch.no_grad()
def test_moe_block_modality_isolation(perturbed):
    moe, x, vision_mask = _moe_block_inputs()
    before, routings = moe(x, vision_mask)
    by_pool = {r.pool: r for r in routings}
    _perturb_routed_expert(getattr(moe, perturbed), by_pool[perturbed])
    after, _ = moe(x, vision_mask)
    changed = (after - before).abs().amax(-1)  # [B, S]
    untouched = vision_mask if perturbed == "text" else ~vision_mask
    assert changed[untouched].max() == 0, f"a {perturbed} expert changed tokens of the other modality"
    assert changed[~untouched].max() > 1e-3, f"perturbing a used {perturbed} expert changed nothing"


@torch.no_grad()
def test_each_router_sees_only_its_modality():
    moe, x, vision_mask = _moe_block_inputs()
    _, routings = moe(x, vision_mask)
    by_pool = {r.pool: r for r in routings}
    assert set(by_pool) == {"text", "vision"}
    n_vision = int(vision_mask.sum())
    n_text = vision_mask.numel() - n_vision
    assert by_pool["text"].logits_TE.shape == (n_text, moe.text.gate.weight.shape[0])
    assert by_pool["vision"].logits_TE.shape == (n_vision, moe.vision.gate.weight.shape[0])
    # and they are exactly those tokens' scores
    x_TH = x.reshape(-1, x.shape[-1])
    mask_T = vision_mask.reshape(-1)
    assert_close(by_pool["text"].logits_TE, x_TH[~mask_T] @ moe.text.gate.weight.T, 1e-6, "text logits")
    assert_close(by_pool["vision"].logits_TE, x_TH[mask_T] @ moe.vision.gate.weight.T, 1e-6, "vision logits")
    # changing a vision token's input leaves the text routing untouched
    x2 = x.clone()
    x2[vision_mask] += 5.0
    _, routings2 = moe(x2, vision_mask)
    text2 = next(r for r in routings2 if r.pool == "text")
    assert torch.equal(text2.logits_TE, by_pool["text"].logits_TE)


@torch.no_grad()
def test_text_only_input_uses_only_the_text_pool():
    moe, x, _ = _moe_block_inputs()
    _, routings = moe(x, torch.zeros(x.shape[:2], dtype=torch.bool))
    assert [r.pool for r in routings] == ["text"]
    assert routings[0].logits_TE.shape[0] == x.shape[0] * x.shape[1]


@torch.no_grad()
def test_model_routes_image_tokens_and_markers_to_vision_pool():
    model = make_model("tiny_vl")
    batch = _vl_batch(model.config)
    out = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    ids = batch["input_ids"][0]
    n_vision = int(torch.isin(ids, torch.tensor(model.config.vision_token_ids)).sum())
    assert n_vision == 4 + 2  # placeholders plus start / end markers
    for layer in out.routing:
        sizes = {r.pool: r.logits_TE.shape[0] for r in layer}
        assert sizes == {"text": len(ids) - n_vision, "vision": n_vision}


# ================================================================ packed documents
@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_packed_documents_equal_separate_documents(name):
    model = make_model(name)
    doc_a, doc_b = random_text(7, seed=8), random_text(5, seed=9)
    packed = torch.cat([doc_a, doc_b], dim=1)
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    out = model(packed, labels=packed, document_ids=document_ids)
    alone_a = model(doc_a, labels=doc_a)
    alone_b = model(doc_b, labels=doc_b)
    assert_close(out.logits[:, :7], alone_a.logits, what="document A")
    assert_close(out.logits[:, 7:], alone_b.logits, what="document B (positions restart)")
    # targets never cross the boundary: the packed loss is the token-weighted mean of the
    # per-document losses, each document having len - 1 targets
    expected = (6 * alone_a.losses["lm"] + 4 * alone_b.losses["lm"]) / 10
    assert_close(out.losses["lm"], expected, what="lm loss")
    # without document ids the row is one document: other logits for B, other loss
    unpacked = model(packed, labels=packed)
    assert (unpacked.logits[:, 7:] - alone_b.logits).abs().max() > 1e-2


@torch.no_grad()
def test_packed_vl_documents_with_image_equal_separate_documents():
    model = make_model("tiny_vl")
    cfg = model.config
    doc_a, pixels, grid = image_prompt(cfg, 4, 4, before=[17, 18], after=[19, 20], seed=3)
    doc_b = random_text(6, seed=10)[0]
    packed = torch.cat([doc_b, doc_a])[None]  # the image sits in the second document
    document_ids = torch.tensor([[0] * len(doc_b) + [1] * len(doc_a)])
    out = model(packed, document_ids=document_ids, pixel_values=pixels, image_grid_thw=grid).logits
    alone_a = model(doc_a[None], pixel_values=pixels, image_grid_thw=grid).logits
    alone_b = model(doc_b[None]).logits
    assert_close(out[:, : len(doc_b)], alone_b, what="text document")
    assert_close(out[:, len(doc_b) :], alone_a, what="image document (3D positions restart)")


# ================================================================ FlexAttention
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
@torch.no_grad()
def test_flex_attention_equals_sdpa_with_documents(name):
    model = make_model(name)
    ids = random_text(12, seed=11, batch=2)
    docs = torch.tensor([[0] * 7 + [1] * 5, [0] * 3 + [1] * 4 + [2] * 5])
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :2] = 0
    sdpa = model(ids, document_ids=docs).logits
    sdpa_pad = model(ids, attention_mask=padding).logits
    model.attn_impl = "flex"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()" on CPU
        try:
            flex = model(ids, document_ids=docs).logits
        except Exception as err:  # pragma: no cover - depends on the torch build
            pytest.skip(f"FlexAttention does not run on this CPU build: {type(err).__name__}: {err}")
        flex_pad = model(ids, attention_mask=padding).logits
        cache = KVCache(model.config.num_layers)
        flex_prefill = model(ids[:, :8], document_ids=docs[:, :8], cache=cache).logits
        flex_step = model(ids[:, 8:9], cache=cache).logits
    assert_close(flex, sdpa, what="flex vs sdpa, documents")
    assert_close(flex_pad[1, 2:], sdpa_pad[1, 2:], what="flex vs sdpa, left padding")
    assert_close(flex_pad[0], sdpa_pad[0], what="flex vs sdpa, unpadded row")
    assert_close(flex_prefill, sdpa[:, :8], what="flex prefill")
    assert_close(flex_step[:, 0], sdpa[:, 8], what="flex decode step")


# ================================================================ router
def _router(E=6, H=16, K=2, seed=0):
    torch.manual_seed(seed)
    router = Router(H, E, K, norm_min=1e-12)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


@torch.no_grad()
def test_router_bias_selects_but_weights_come_from_unbiased_probs():
    router = _router()
    x = torch.randn(32, 16)
    plain = router(x)
    probs = plain.probs_TE
    # the least likely expert overall; a large bias forces it in for every token
    forced = int(probs.mean(0).argmin())
    router.e_score_correction_bias[forced] = 10.0
    biased = router(x)
    assert torch.equal(biased.probs_TE, probs), "the bias must not change the probabilities"
    assert (biased.topk_ids_TK == forced).any(-1).all(), "the biased expert is not selected everywhere"
    expected_ids = torch.topk(probs + router.e_score_correction_bias, 2, dim=-1).indices
    assert torch.equal(biased.topk_ids_TK, expected_ids)
    # mixing weights: unbiased probabilities of the chosen experts, renormalised
    chosen = probs.gather(-1, biased.topk_ids_TK)
    assert_close(biased.topk_weights_TK, chosen / chosen.sum(-1, keepdim=True), 1e-6, "weights")
    assert_close(biased.topk_weights_TK.sum(-1), torch.ones(32), 1e-6, "weights sum")
    # where the unbiased router would not have chosen it, the forced expert ranks below the
    # token's top-1 expert, so its unbiased weight stays under 1/2 (a biased mix gives ~1)
    newly_forced = ~(plain.topk_ids_TK == forced).any(-1)
    assert newly_forced.sum() >= 10
    forced_weight = biased.topk_weights_TK[newly_forced][biased.topk_ids_TK[newly_forced] == forced]
    assert forced_weight.max() < 0.5
    biased_probs = (probs + router.e_score_correction_bias).gather(-1, biased.topk_ids_TK)
    biased_mix = biased_probs / biased_probs.sum(-1, keepdim=True)
    assert (biased_mix - biased.topk_weights_TK).abs().max() > 0.3


@torch.no_grad()
def test_router_without_bias_picks_top_probabilities_and_weights_sum_to_one():
    router = _router(E=8, K=3)
    x = torch.randn(64, 16)
    out = router(x)
    assert torch.equal(out.topk_ids_TK, torch.topk(out.probs_TE, 3, dim=-1).indices)
    assert_close(out.probs_TE, F.softmax(x @ router.weight.T, dim=-1), 1e-6, "softmax probabilities")
    assert_close(out.topk_weights_TK.sum(-1), torch.ones(64), 1e-6, "weights sum")
    assert (out.topk_weights_TK > 0).all()


@torch.no_grad()
def test_router_computes_in_fp32_for_bf16_input():
    router = _router()
    x = torch.randn(20, 16).to(torch.bfloat16)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = router(x)
        assert out.logits_TE.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
        # exactly the fp32 product of the (upcast) bf16 input with the fp32 weight
        assert torch.equal(out.logits_TE, F.linear(x.float(), router.weight))
        assert out.topk_weights_TK.dtype == torch.bfloat16  # cast back for the combine
    # a bf16 model keeps routing from an fp32 copy of its (now bf16) router weight
    router_bf16 = _router().to(torch.bfloat16)
    out = router_bf16(x)
    assert out.logits_TE.dtype == torch.float32
    assert torch.equal(out.logits_TE, F.linear(x.float(), router_bf16.weight.float()))


def test_expert_load_counts_dispatches_in_train_mode_only():
    router = _router(E=6, K=2)
    x = torch.randn(25, 16)
    router.eval()
    with torch.no_grad():
        router(x)
    assert router.expert_load.sum() == 0
    router.train()
    out = router(x)
    counts = torch.bincount(out.topk_ids_TK.flatten(), minlength=6).float()
    assert torch.equal(router.expert_load, counts)
    assert router.expert_load.sum() == 25 * 2
    router(x[:5])
    assert router.expert_load.sum() == 30 * 2  # accumulates until the balancing step zeroes it


def test_model_expert_load_accumulates_per_pool_in_train_mode_only():
    model = make_model("tiny_vl")
    batch = _vl_batch(model.config)
    n_tokens = batch["input_ids"].numel()
    n_vision = 6
    with torch.no_grad():
        model(**batch)  # eval
    routers = {n: m for n, m in model.named_modules() if isinstance(m, Router)}
    assert all(r.expert_load.sum() == 0 for r in routers.values())
    model.train()
    model(**batch)
    K = model.config.moe.top_k
    for name, router in routers.items():
        n = n_vision if ".vision." in name else n_tokens - n_vision
        assert router.expert_load.sum() == n * K, name


# ================================================================ training
def test_adamw_steps_lower_the_loss_through_router_and_experts():
    torch.manual_seed(0)
    model = make_model("tiny_moe", std=0.02).train()
    ids = random_text(32, seed=12, batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                if ".gate.weight" in name or "experts.gate_up_proj" in name or "experts.down_proj" in name:
                    assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reaches {name}"
        opt.step()
        losses.append(out.losses["lm"].item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in pairwise(losses[:6])), losses


def test_lm_loss_in_model_matches_function():
    model = make_model("tiny_dense")
    ids = random_text(10, seed=13, batch=2)
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    out = model(ids, labels=ids, loss_mask=mask)
    assert_close(out.losses["lm"], lm_loss(out.logits, ids, mask), 1e-6, "lm")
    assert set(out.losses) == {"lm"}  # no router losses in a dense model
