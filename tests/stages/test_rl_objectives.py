"""RLVR / UPO arithmetic pinned by hand: GRPO advantages, the clipped surrogate, the KL estimate,
rollout masks, rewards and their configuration errors (no Ray), and a step's token mean over 2 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import ErnieForCausalLM, get_preset
from ernie.chat_template import EOS, SPECIAL_TOKENS
from pipeline.contract import UserError
from stages.data.tokenizer import train_bpe
from stages.posttrain import rewards, rlvr, upo
from stages.posttrain.grpo import group_advantages, kl_k3, policy_loss, token_logprobs
from stages.posttrain.rollout import RolloutWorker, complete, request_seed


# ---------------------------------------------------------------------- GRPO math
def test_group_advantages_are_centred_and_scaled_per_group():
    rewards_ = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards_)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4)), "a group that scores alike carries no signal"
    std = math.sqrt(0.5)  # population std of (3, 1, 2, 2)
    assert torch.allclose(adv[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / std, atol=1e-5)
    assert torch.allclose(group_advantages(rewards_, scale=False)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_k3_is_zero_at_equality_never_negative_and_estimates_kl_by_sampling():
    logp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    ref = torch.log(torch.tensor([0.2, 0.2, 0.6]))
    assert torch.equal(kl_k3(logp, logp), torch.zeros(3))
    assert (kl_k3(logp, ref) >= 0).all()
    # E_{x ~ pi}[k3] = KL(pi || ref): exact expectation over the three outcomes
    expected = float((logp.exp() * kl_k3(logp, ref)).sum())
    kl = float((logp.exp() * (logp - ref)).sum())
    assert expected == pytest.approx(kl, rel=1e-5)


def test_clipped_surrogate_stops_the_gradient_beyond_the_clip_range():
    old = torch.zeros(2, 1)
    mask = torch.ones(2, 1)
    advantages = torch.tensor([1.0, -1.0])
    # row 0: ratio 1.5 with A > 0 (clipped at 1.2); row 1: ratio 0.5 with A < 0 (clipped at 0.8)
    logp = torch.log(torch.tensor([[1.5], [0.5]])).requires_grad_()
    loss, metrics = policy_loss(logp, old, advantages, mask, clip_eps=0.2)
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8) / 2)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 1))
    assert float(metrics["clip_fraction"]) == 1.0
    # inside the range the gradient is A * ratio / tokens
    logp = torch.log(torch.tensor([[1.1], [0.9]])).requires_grad_()
    policy_loss(logp, old, advantages, mask, clip_eps=0.2)[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.1 / 2], [0.9 / 2]]))


def test_policy_loss_is_a_token_mean_that_ignores_masked_tokens():
    torch.manual_seed(0)
    logp, ref = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.float)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, metrics = policy_loss(logp, logp, adv, mask, 0.2, kl_coef=0.1, ref_logp=ref)
    expected = ((-adv[:, None] + 0.1 * kl_k3(logp, ref)) * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    noisy = torch.where(mask.bool(), logp, logp + 100.0)  # changing prompt / padding tokens changes nothing
    assert float(policy_loss(noisy, noisy, adv, mask, 0.2, 0.1, torch.where(mask.bool(), ref, ref - 7))[0]) == (
        pytest.approx(float(loss), rel=1e-6)
    )
    assert float(metrics["kl"]) == pytest.approx(float((kl_k3(logp, ref) * mask).sum() / mask.sum()), rel=1e-6)


def test_token_logprobs_are_the_log_softmax_of_the_next_token():
    torch.manual_seed(1)
    logits, ids = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    got = token_logprobs(logits, ids, temperature=2.0)
    want = torch.log_softmax(logits / 2.0, -1)[0, 1, ids[0, 2]]
    assert got.shape == (2, 3) and float(got[0, 1]) == pytest.approx(float(want), rel=1e-6)


# ---------------------------------------------------------------------- rewards
@pytest.mark.parametrize(
    ("completion", "exact", "close", "formed"),
    [
        (f"12{EOS}", 1.0, 1.0, 1.0),
        (f"  12 {EOS}", 1.0, 1.0, 1.0),
        (f"thinking: 5 + 7 = 12\n</think>\n12{EOS}", 1.0, 1.0, 1.0),
        (f"14{EOS}", 0.0, 1 / 3, 1.0),
        ("12", 1.0, 1.0, 0.0),  # right answer, but never ended
        (f"<think>\nhmm 12{EOS}", 0.0, 0.0, 0.0),  # an unclosed think block
        (f"twelve{EOS}", 0.0, 0.0, 1.0),
        (EOS, 0.0, 0.0, 0.0),
    ],
)
def test_rewards_score_the_final_answer(completion, exact, close, formed):
    record = {"answer": "12"}
    assert rewards.exact_match(completion, record) == exact
    assert rewards.numeric_closeness(completion, record) == pytest.approx(close)
    assert rewards.well_formed(completion, record) == formed


def test_reward_paths_that_do_not_resolve_are_named():
    assert rewards.resolve(["exact_match", "stages.posttrain.rewards.well_formed"], "k") == [
        rewards.exact_match,
        rewards.well_formed,
    ]
    with pytest.raises(UserError, match=r"posttrain.rlvr.rewards\[1\]='no_such_pkg.fn': cannot import"):
        rewards.resolve(["exact_match", "no_such_pkg.fn"], "posttrain.rlvr.rewards")
    with pytest.raises(UserError, match=r"rewards\[0\]='stages.posttrain.rewards.nope'.*no function 'nope'"):
        rewards.resolve(["stages.posttrain.rewards.nope"], "posttrain.rlvr.rewards")
    with pytest.raises(UserError, match="posttrain.upo.rewards is empty"):
        rewards.resolve([], "posttrain.upo.rewards")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"group_size": 1}, "posttrain.rlvr.group_size=1"),
        ({"temperature": 0.0}, "posttrain.rlvr.temperature=0.0"),
        ({"reward_weights": [1.0, 2.0]}, "posttrain.rlvr.reward_weights has 2 weights for 1 rewards"),
        ({"updates_per_rollout": 3, "steps": 10}, "posttrain.rlvr.steps=10 must be a multiple of updates_per_rollout"),
        ({"max_new_tokens": 300}, "posttrain.rlvr.max_new_tokens=300"),
        ({"eval_samples": -1}, "posttrain.rlvr.eval_samples=-1"),
    ],
)
def test_rlvr_rejects_bad_config(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        rlvr.Config(**overrides).validate("rlvr")


def test_upo_rejects_bad_config():
    with pytest.raises(UserError, match="posttrain.upo.pairs='mixed'"):
        upo.Config(pairs="mixed").validate("upo")
    with pytest.raises(UserError, match="posttrain.upo.pairs_per_step=3"):
        upo.Config(pairs_per_step=3).validate("upo")


# ---------------------------------------------------------------------- rollouts and batches
@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)]
    return train_bpe(texts, 300, min_frequency=0)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return ErnieForCausalLM(get_preset("tiny_moe").replace(vocab_size=tokenizer.get_vocab_size())).eval()


def prompt_record(a: int, b: int) -> dict:
    return {"task": "add", "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}


def test_prompt_records_tokenise_with_the_generation_prompt_and_bad_ones_are_named(tokenizer, tmp_path):
    from pipeline.formats import write_jsonl

    good = tmp_path / "good.jsonl"
    write_jsonl(good, [prompt_record(1, 2), prompt_record(3, 4)])
    prompts = rlvr.tokenise_prompts(tokenizer, good, 200, enable_thinking=False)
    assert [p.index for p in prompts] == [0, 1] and prompts[1].record["answer"] == "7"
    assert tokenizer.decode(prompts[0].ids, skip_special_tokens=False).endswith("Assistant: <think>\n\n</think>\n\n")
    thinking = rlvr.tokenise_prompts(tokenizer, good, 200, enable_thinking=True)
    assert tokenizer.decode(thinking[0].ids, skip_special_tokens=False).endswith("Assistant: <think>\n")
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [prompt_record(1, 2), {"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"}])
    with pytest.raises(UserError, match=r"bad.jsonl line 2: not a verifiable prompt record.*robot"):
        rlvr.tokenise_prompts(tokenizer, bad, 200, False)
    write_jsonl(bad, [{"prompt": [{"role": "user", "content": "1 + 1?"}]}])
    with pytest.raises(UserError, match=r"line 1: not a verifiable prompt record.*answer"):
        rlvr.tokenise_prompts(tokenizer, bad, 200, False)
    with pytest.raises(UserError, match="no prompt fits in 3 tokens"):
        rlvr.tokenise_prompts(tokenizer, good, 3, False)


def test_rollout_batches_mask_only_the_completion_and_score_each_group(tokenizer):
    cfg = rlvr.Config(group_size=2, rewards=["exact_match", "numeric_closeness"], reward_weights=[1.0, 0.5])
    objective = rlvr.RLVRObjective(cfg, tokenizer.to_str(), actors=[])
    objective.tokenizer = tokenizer
    objective.reward_fns = rewards.resolve(cfg.rewards, "k")
    objective.reward_names = ["exact_match", "numeric_closeness"]
    eos = tokenizer.token_to_id(EOS)
    prompts = [rlvr.Prompt(0, [5, 6, 7], {"answer": "3"}), rlvr.Prompt(1, [8, 9], {"answer": "4"})]
    three, five = tokenizer.encode("3").ids, tokenizer.encode("5").ids
    groups = [[three + [eos], five + [eos]], [five, five + [eos]]]
    batch = objective.collate_rollouts(prompts, groups, torch.device("cpu"))
    ids, mask = batch["input_ids"], batch["mask"]
    for row, (prompt, completion) in enumerate([(p, c) for p, g in zip(prompts, groups, strict=True) for c in g]):
        n, m = len(prompt.ids), len(completion)
        assert ids[row, :n].tolist() == prompt.ids and ids[row, n : n + m].tolist() == completion
        # target t predicts token t + 1: exactly the completion's tokens are supervised
        assert mask[row].tolist() == [0.0] * (n - 1) + [1.0] * m + [0.0] * (mask.shape[1] - n - m + 1)
    assert batch["reward"].tolist() == pytest.approx([1.5, 1 / 3 * 0.5, 1 / 2 * 0.5, 1 / 2 * 0.5])
    assert batch["advantages"][2:].tolist() == [0.0, 0.0]  # the second group scored alike
    assert batch["advantages"][0] > 0 > batch["advantages"][1]
    assert float(batch["stats"]["truncated"]) == 0.25  # one completion never ended


def test_upo_online_pairs_take_each_groups_best_and_worst_completion(tokenizer):
    cfg = upo.Config(group_size=3, beta=0.5)
    objective = upo.UPOObjective(cfg, tokenizer.to_str(), actors=[], pairs={})
    logits = torch.zeros(6, 4, 5)  # uniform policy: log p = -log 5 for every token
    batch = {
        "groups": torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.2, 0.2]]),  # the second group has no preference
        "input_ids": torch.zeros(6, 4, dtype=torch.long),
        "mask": torch.tensor([[0, 1, 1]] * 6, dtype=torch.float),
        "ref_logp": torch.full((6, 3), -math.log(5)),
    }
    batch["ref_logp"][0] -= 1.0  # the reference liked the worst completion (row 0) less than the policy does
    losses, count = objective._online_pairs(logits, batch)
    assert float(count) == 1 and losses.shape == (1,)
    # h = (pi_best - ref_best) - (pi_worst - ref_worst) = 0 - 2 (two supervised tokens, each 1 lower in ref)
    assert float(losses[0]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * -2.0))), rel=1e-6)


def test_rollout_samples_depend_on_the_request_seed_not_the_batching(model, tokenizer, tmp_path):
    from ernie.checkpoint import save_pretrained

    save_pretrained(model, tmp_path)
    worker = RolloutWorker(str(tmp_path))
    worker.load_weights(model.state_dict(), version=3)
    prompt = tokenizer.encode("What is 1 + 2?").ids
    seed = request_seed(0, 1, 5)
    version, (group,) = worker.sample([(prompt, seed)], group=4, max_new_tokens=6, temperature=1.0, top_p=1.0)
    assert version == 3 and len(group) == 4
    again = worker.sample([(prompt, 11), (prompt, seed)], group=4, max_new_tokens=6, temperature=1.0, top_p=1.0)
    assert again[1][1] == group, "the same seed samples the same completions, whatever else the actor serves"
    assert complete(model, [prompt] * 4, 6, 1.0, 1.0, seed) == group
    # one left-padded batch for every request: a longer prompt beside it changes nothing either
    longer = tokenizer.encode("What is 13 + 2? What is 4 + 4?").ids
    _, (with_longer, _) = worker.sample([(prompt, seed), (longer, 7)], 4, 6, 1.0, 1.0)
    assert with_longer == group
    assert request_seed(0, 1, 5) != request_seed(0, 2, 5) != request_seed(1, 1, 5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=8))
def test_advantages_sum_to_zero_in_every_group(values):
    adv = group_advantages(torch.tensor([values], dtype=torch.float64))
    assert abs(float(adv.sum())) < 1e-6 * max(1.0, len(values))


def test_special_tokens_keep_their_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[:3]] == [0, 1, 2]


# ---------------------------------------------------------------------- a step over ranks
COMPLETION_TOKENS = (4, 8)
"""Completion tokens of the one prompt (a group of 2) each of 2 ranks holds in a step."""


def _rank_step_loss(rank: int, port: int, out: str) -> None:
    """One rank's GRPO loss for its rollouts: ratio 1 everywhere, so every completion token costs -advantage."""
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    from stages.training.parallel import Layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tokens = COMPLETION_TOKENS[rank]
    mask = torch.zeros(2, 10)
    mask[:, :tokens] = 1.0
    batch = {
        "input_ids": torch.zeros(2, 11, dtype=torch.long),
        "mask": mask,
        "advantages": torch.tensor([1.0, -1.0]) * (rank + 1),
        "reward": torch.zeros(2),
        "row_prompts": [rlvr.Prompt(rank, [1], {"answer": "1"})] * 2,
        "groups": torch.tensor([[1.0, 0.0]]),
        "stats": {},
    }
    objective = rlvr.RLVRObjective(rlvr.Config(group_size=2), "{}", actors=[])
    loop = SimpleNamespace(layout=Layout("ddp", 2, 1, torch.device("cpu")), world=2, micro_batch=0, device="cpu")
    (part,) = objective.micro_batches(batch, loop)
    advantages = torch.tensor([0.5, 0.25]) * (rank + 1)  # unequal per-token costs on the two rows
    logp = torch.zeros(2, 10)
    loss, _ = policy_loss(logp, logp, advantages, mask, 0.2, tokens=part["whole"]["tokens"])
    dist.all_reduce(loss)  # what DDP does to the gradients: the ranks' mean
    if rank == 0:
        torch.save({"step_loss": float(loss) / 2, "tokens": float(part["whole"]["tokens"])}, out)
    dist.destroy_process_group()


def test_a_steps_token_mean_counts_the_completion_tokens_of_every_rank(tmp_path):
    """Rank 0's completions are half as long as rank 1's: averaging the ranks' losses (as DDP averages their
    gradients) gives the mean over the step's 24 completion tokens, not the mean of two per-rank means."""
    from gloo_workers import free_port, spawn

    out = tmp_path / "step.pt"
    spawn(_rank_step_loss, free_port(), str(out), nprocs=2)
    step = torch.load(out, weights_only=True)
    costs = [-a * (r + 1) * n for r, n in enumerate(COMPLETION_TOKENS) for a in (0.5, 0.25)]  # per row
    assert step["tokens"] == 2 * sum(COMPLETION_TOKENS) / 2
    assert step["step_loss"] == pytest.approx(sum(costs) / (2 * sum(COMPLETION_TOKENS)), rel=1e-6)
