"""PPO's pure functions against values computed by hand."""
import math

import pytest
import torch

from train import losses


def test_gae_on_a_three_step_example():
    # rewards r = [0, 0, 1], values v = [0.5, 0.6, 0.7], gamma 0.9, lambda 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    advantages, returns = losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    delta2 = 1.0 - 0.7                       # last step: nothing to bootstrap from
    delta1 = 0.0 + 0.9 * 0.7 - 0.6           # 0.03
    delta0 = 0.0 + 0.9 * 0.6 - 0.5           # 0.04
    a2 = delta2
    a1 = delta1 + 0.72 * a2
    a0 = delta0 + 0.72 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]))


def test_gae_ignores_padding_after_the_end_of_a_response():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.2, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, _ = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0 - 0.2, 1.0 - 0.4, 0.0]]))


def test_kl_penalty_is_on_every_token_and_the_score_on_the_last_one():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = losses.kl_rewards(logprobs, ref_logprobs, torch.tensor([2.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0, 0.0]]))


def test_policy_loss_and_its_gradient_at_ratio_one():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac, approx_kl = losses.policy_loss(logprobs, logprobs.detach(), advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5)           # mean(-A * 1)
    assert clipfrac.item() == 0 and approx_kl.item() == 0
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 1.0]]))  # -A / n


def test_policy_loss_clipped_branches():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0]])
    loss, clipfrac, _ = losses.policy_loss(new, old, advantages, torch.ones(1, 2), clip=0.2)
    # token 0: A>0, ratio 1.5 -> clipped to 1.2: -1.2 (no gradient); token 1: A<0, ratio 0.5 -> 0.8: +0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == 1.0
    loss.backward()
    torch.testing.assert_close(new.grad, torch.zeros(1, 2))
    # inside the clip range nothing is clipped and the gradient flows
    inside = torch.log(torch.tensor([[1.1, 0.9]])).requires_grad_()
    loss, clipfrac, _ = losses.policy_loss(inside, old, advantages, torch.ones(1, 2), clip=0.2)
    assert clipfrac.item() == 0 and loss.item() == pytest.approx((-1.1 + 0.9) / 2)


def test_value_loss_clipping():
    old_values = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, clipfrac = losses.value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped 0, clipped (0.2-1)^2 = 0.64 -> 0.64; token 1: both 0.81 (inside the range)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert clipfrac.item() == 0.5


def test_whitening_uses_only_masked_entries():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    whitened = losses.masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert losses.token_logprobs(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    assert losses.entropy(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


# ---- critic-free RL ------------------------------------------------------------------------------

def test_grpo_advantages_normalise_within_each_group():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    advantages = losses.grpo_advantages(scores, eps=1e-4)
    # group 0: mean 2, unbiased std 1; group 1 scored alike: no signal
    expected = torch.tensor([[-1.0 / (1 + 1e-4), 0.0, 1.0 / (1 + 1e-4)], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)


def test_rloo_advantages_use_the_rest_of_the_group_as_baseline():
    scores = torch.tensor([[1.0, 2.0, 6.0], [0.0, 4.0, 4.0]])
    # baselines: (2+6)/2, (1+6)/2, (1+2)/2 and (4+4)/2, (0+4)/2, (0+4)/2
    expected = torch.tensor([[1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5], [0.0 - 4.0, 4.0 - 2.0, 4.0 - 2.0]])
    torch.testing.assert_close(losses.rloo_advantages(scores), expected)


def test_k3_kl_estimator_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0]])
    ref_logprobs = torch.tensor([[-2.0, -2.0, -0.25, 90.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])   # padding: far apart, ignored
    kl = losses.k3_kl(logprobs, ref_logprobs, mask)
    expected = [math.exp(-1.0) + 1.0 - 1.0, 0.0, math.exp(0.25) - 0.25 - 1.0, 0.0]
    torch.testing.assert_close(kl, torch.tensor([expected]))
    assert (kl >= 0).all() and losses.sequence_kl(logprobs, ref_logprobs, mask).item() == pytest.approx(0.75)


def test_token_and_sequence_aggregation():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert losses.aggregate(values, mask, "token").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert losses.aggregate(values, mask, "sequence").item() == pytest.approx((2.0 + 4.0) / 2)


def test_policy_loss_at_sequence_level_weighs_each_response_the_same():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, _, _ = losses.policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, "sequence")
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2)     # response means -1 and +2
    loss.backward()
    # d/dlogp of -A * ratio at ratio 1, divided by the response's length and the 2 responses
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]]))
