import pytest
import torch

from tsds_interp.objectives import (
    advantages,
    aggregation_weights,
    discounted_reward,
    kl_terms,
    policy_gradient_terms,
    sft_terms,
    token_logprobs,
)
from tsds_interp.task import DECISION, END, PADDING, PROMPT, SAMPLE

P, S, D, E, X = PROMPT, SAMPLE, DECISION, END, PADDING
ROLES = torch.tensor([[P, S, S, S, D, E, X], [P, S, S, D, S, S, D]])


def _logp(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return (-torch.rand(ROLES.shape, generator=g) * 3).requires_grad_(requires_grad)


def test_token_mean_value_and_gradient():
    logp = _logp()
    loss = sft_terms(logp, ROLES, "token_mean").loss
    mask = (ROLES == S) | (ROLES == D)
    direct = -(logp[mask]).sum() / mask.sum()
    assert loss.item() == pytest.approx(direct.item())
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -mask.float() / mask.sum())


def test_sequence_mean():
    logp = _logp(False)
    loss = sft_terms(logp, ROLES, "sequence_mean").loss
    row0 = -(logp[0, 1:5]).mean()
    row1 = -(logp[1, 1:7]).mean()
    assert loss.item() == pytest.approx(((row0 + row1) / 2).item())


@pytest.mark.parametrize("share", [0.1, 0.5, 0.8])
def test_role_balanced_gives_the_decision_share(share):
    w = aggregation_weights(ROLES, "role_balanced", share)
    assert w[ROLES == D].sum().item() == pytest.approx(share)
    assert w[ROLES == S].sum().item() == pytest.approx(1 - share)
    assert w[(ROLES == P) | (ROLES == E) | (ROLES == X)].abs().sum() == 0


def test_role_losses_add_up():
    terms = sft_terms(_logp(False), ROLES, "token_mean")
    assert (terms.role_loss(S) + terms.role_loss(D)).item() == pytest.approx(terms.loss.item())


def test_policy_gradient_matches_reinforce_gradient():
    logp = _logp()
    adv = torch.tensor([1.5, -0.5])
    terms = policy_gradient_terms(logp, logp.detach(), ROLES, adv)
    (g,) = torch.autograd.grad(terms.loss, logp)
    mask = ((ROLES == S) | (ROLES == D)).float()
    assert torch.allclose(g, -adv[:, None] * mask / 2)


def test_ppo_clipping():
    logp = torch.zeros(1, 3, requires_grad=True)
    old = torch.log(torch.tensor([[1.0, 0.5, 2.0]]))  # ratio 1, 2, 0.5
    roles = torch.tensor([[S, S, S]])
    terms = policy_gradient_terms(logp, old, roles, torch.tensor([1.0]), clip=0.1)
    # A > 0: min(r, clip(r)) -> 1, 1.1, 0.5
    assert terms.values.detach().tolist()[0] == pytest.approx([-1.0, -1.1, -0.5])
    (g,) = torch.autograd.grad(terms.loss, logp)
    assert g.tolist()[0] == pytest.approx([-1.0, 0.0, -0.5])  # clipped token gets no gradient


def test_grpo_and_reinforce_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    a = advantages(r, group=3)
    assert a[:3].tolist() == pytest.approx([2 ** 0.5, -(2 ** -0.5), -(2 ** -0.5)], rel=1e-4)
    assert torch.allclose(advantages(r, 3, "reinforce"), r - 0.5)
    with pytest.raises(ValueError, match="groups"):
        advantages(r, group=4)


def test_discount():
    assert discounted_reward(torch.tensor([1.0, 1.0]), torch.tensor([1, 3]), 0.5).tolist() == [1.0, 0.25]


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators(estimator):
    logp = _logp()
    ref = _logp(False) - 0.3
    terms = kl_terms(logp, ref, ROLES, beta=0.2, estimator=estimator, weighting="token_sum")
    mask = ((ROLES == S) | (ROLES == D)).float()
    lr = ref - logp
    per = -lr if estimator == "k1" else lr.exp() - 1 - lr
    direct = 0.2 * (per * mask).sum() / 2
    assert terms.loss.item() == pytest.approx(direct.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(terms.loss, logp)
    (g2,) = torch.autograd.grad(direct, logp)
    assert torch.allclose(g1, g2)


def test_kl_aggregations():
    logp, ref = _logp(False), _logp(False) - 0.3
    n_tok = ((ROLES == S) | (ROLES == D)).sum()
    s = kl_terms(logp, ref, ROLES, weighting="token_sum").loss
    m = kl_terms(logp, ref, ROLES, weighting="token_mean").loss
    assert m.item() == pytest.approx(s.item() * 2 / n_tok.item())


def test_token_logprobs_match_log_softmax(random_model):
    tokens = torch.randint(0, 17, (2, 9))
    logp, ent = token_logprobs(random_model, tokens)
    full = random_model(tokens).log_softmax(-1)
    assert torch.allclose(logp[:, 1:], full[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1), atol=1e-6)
    assert (logp[:, 0] == 0).all() and (ent[:, 1:] > 0).all()


def test_unknown_weighting():
    with pytest.raises(ValueError, match="unknown weighting"):
        aggregation_weights(ROLES, "mean")
