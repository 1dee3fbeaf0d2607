"""The alignment losses against values worked out by hand on small tensors."""

import math

import pytest
import torch

from gptstack.train.losses import (bradley_terry_loss, dpo_loss, gae, group_advantages, k3_kl, masked_mean,
                                   masked_whiten, ppo_policy_loss, ppo_value_loss, reverse_kl_per_token)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    want = (-math.log(sig(1.0)) - math.log(sig(-0.5))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, rel=1e-6)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_dpo_sigmoid():
    pc, pr, rc, rr = map(torch.tensor, ([-5.0, -3.0], [-6.0, -2.0], [-5.5, -3.0], [-5.5, -2.5]))
    # h = (pc - rc) - (pr - rr) = [0.5 - (-0.5), 0 - 0.5] = [1.0, -0.5]
    loss, crew, rrew = dpo_loss(pc, pr, rc, rr, beta=0.1)
    want = (-math.log(sig(0.1)) - math.log(sig(-0.05))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert crew.tolist() == pytest.approx([0.05, 0.0])
    assert rrew.tolist() == pytest.approx([-0.05, 0.05])


def test_ipo():
    pc, pr, rc, rr = map(torch.tensor, ([-1.0], [-2.0], [-1.5], [-1.5]))
    # h = 0.5 - (-0.5) = 1.0 ; target 1/(2*0.25) = 2 ; loss = (1 - 2)^2 = 1
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge?")


def test_gae_by_hand():
    # one row, 3 response tokens then padding; gamma 0.9, lambda 0.5
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])           # the padded value must be ignored
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0 - 0.4                            # 0.6
    d1 = 0.0 + 0.9 * 0.4 - 0.2                          # 0.16
    d0 = 0.0 + 0.9 * 0.2 - 0.5                          # -0.32
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0], abs=1e-6)
    assert ret[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4], abs=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([6.0, 5.0, 3.0])
    assert adv[0].tolist() == pytest.approx([5.5, 4.5, 2.5])


def test_ppo_clipped_objective():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))    # ratios
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    loss, clipfrac, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # max(-A r, -A clip(r)): A=1,r=1.5 -> max(-1.5,-1.2) = -1.2 (clipped); A=-1,r=.5 -> max(.5,.8) = .8 (clipped)
    # A=2,r=1.1 -> -2.2 (inside); A=1,r=.7 -> max(-.7,-.8) = -.7 (unclipped: pessimistic side)
    assert loss[0].tolist() == pytest.approx([-1.2, 0.8, -2.2, -0.7], abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    # gradient flows only through unclipped tokens
    lp = logp.clone().requires_grad_(True)
    ppo_policy_loss(lp, old, adv, torch.ones(1, 4))[0].sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0 and lp.grad[0, 2] != 0 and lp.grad[0, 3] != 0


def test_value_loss_clipped():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, frac = ppo_value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    # row0: (1-0)^2 = 1 vs (0.7-0)^2 = .49 -> 1 ; row1: (0-1)^2 = 1 both -> 1 ; 0.5 * mean = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert frac.item() == 0.0


def test_k3_kl():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)])
    # d = log(0.25/0.5) = -log 2 ; e^d - d - 1 = 0.5 + log 2 - 1
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-6)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_group_normalisation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv, zero = group_advantages(r, eps=0.0)
    std = math.sqrt(1 / 3)                          # unbiased std of [1, 0, 0, 1]
    assert adv[0].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert zero == 1
    adv2, _ = group_advantages(r, scale=False)
    assert adv2[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_masked_helpers_and_reverse_kl():
    x, m = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == 2.0
    w = masked_whiten(x, m)
    assert w[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # p_s = (.5, .5), p_t = (.75, .25): KL = .5 log(.5/.75) + .5 log(.5/.25)
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2)
    assert reverse_kl_per_token(s, t).item() == pytest.approx(want, rel=1e-5)


def test_fused_token_logprobs_match_log_softmax_with_gradients():
    """model/heads.token_logprobs (a custom autograd Function, chunked) against log_softmax + gather, in
    float64 with gradcheck, and on more rows than one chunk; the logged entropy against its definition."""
    from gptstack.model import heads

    torch.manual_seed(0)
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    assert torch.autograd.gradcheck(lambda z: heads.token_logprobs(z, t), (x,))
    big = torch.randn(600, 50, requires_grad=True)          # three chunks of 256 rows
    tb = torch.randint(0, 50, (600,))
    w = torch.randn(600)
    lp = heads.token_logprobs(big, tb)
    (lp * w).sum().backward()
    g_fused = big.grad.clone()
    big.grad = None
    ref = torch.log_softmax(big, -1).gather(1, tb[:, None]).squeeze(1)
    (ref * w).sum().backward()
    assert torch.allclose(lp, ref, atol=1e-5) and torch.allclose(g_fused, big.grad, atol=1e-5)
    lse = torch.logsumexp(big.detach(), -1)
    la = torch.log_softmax(big.detach(), -1)
    assert torch.allclose(heads._entropy(big.detach(), lse), -(la.exp() * la).sum(-1), atol=1e-5)
