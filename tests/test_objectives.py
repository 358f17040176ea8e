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


# ---------------------------------------------------------------- known answers, term by term

def test_role_loss_is_the_roles_own_tokens():
    logp = _logp(False)
    terms = sft_terms(logp, ROLES, "token_sum")
    for role in (S, D):
        expected = (-logp * (ROLES == role)).sum() / len(ROLES)
        assert terms.role_loss(role).item() == pytest.approx(expected.item(), rel=1e-6)
    kl = kl_terms(logp, logp - 0.5, ROLES, weighting="token_sum")
    assert kl.role_loss(D).item() == pytest.approx((0.1 * (0.5 - 1 + 0.6065306597) * (ROLES == D)).sum().item() / 2,
                                                   rel=1e-5)  # k3 at log ratio -0.5, beta 0.1 (the default)


def test_defaults_are_the_documented_ones():
    logp = _logp(False)
    assert torch.equal(sft_terms(logp, ROLES).loss, sft_terms(logp, ROLES, "token_mean").loss)
    ref = logp - 0.3
    assert torch.equal(kl_terms(logp, ref, ROLES).loss, kl_terms(logp, ref, ROLES, beta=0.1, estimator="k3").loss)
    reward, attempts = torch.tensor([1.0, 1.0]), torch.tensor([1, 3])
    assert torch.equal(discounted_reward(reward, attempts), reward)
    assert discounted_reward(reward, attempts, 0.5).tolist() == [1.0, 0.25]


def test_skipped_tokens_count_for_nothing():
    logp = _logp(False)
    skip = torch.zeros_like(ROLES, dtype=torch.bool)
    skip[1, 1:3] = True  # the first candidate of row 1
    terms = sft_terms(logp, ROLES, "token_sum", skip=skip)
    kept = ((ROLES == S) | (ROLES == D)) & ~skip
    assert terms.loss.item() == pytest.approx((-logp * kept).sum().item() / 2, rel=1e-6)
    assert (terms.values[skip] == 0).all()


def test_role_balanced_gives_the_decision_its_share():
    logp = _logp(False)
    for share in (0.2, 0.7):
        terms = sft_terms(logp, ROLES, "role_balanced", decision_share=share)
        dec = (-logp * (ROLES == D)).sum() / (ROLES == D).sum()
        assert terms.role_loss(D).item() == pytest.approx(share * dec.item(), rel=1e-6)


def test_grpo_advantages_of_a_pair_and_a_clip_of_zero():
    adv = advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group=2)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="clip"):
        policy_gradient_terms(_logp(False), _logp(False), ROLES, torch.ones(2), clip=0.0)


def test_objectives_use_the_total_they_are_given():
    """With ``total`` summing counts over two equal processes, each process's loss halves."""
    logp = _logp(False)

    def doubled(x):
        return 2 * x
    adv = torch.tensor([1.0, -0.5])
    for make in (lambda **k: sft_terms(logp, ROLES, "token_mean", **k),
                 lambda **k: policy_gradient_terms(logp, logp.detach(), ROLES, adv, **k),
                 lambda **k: kl_terms(logp, logp - 0.2, ROLES, **k)):
        assert make(total=doubled).loss.item() == pytest.approx(make().loss.item() / 2, rel=1e-6)


def test_weights_of_a_single_counted_token_of_each_role():
    roles = torch.tensor([[P, S, D, E]])
    for mode in ("token_mean", "sequence_mean", "token_sum"):
        assert aggregation_weights(roles, mode).sum().item() == pytest.approx(2.0 if mode == "token_sum" else 1.0)
    balanced = aggregation_weights(roles, "role_balanced", decision_share=0.3)
    assert balanced[0].tolist() == pytest.approx([0.0, 0.7, 0.3, 0.0])


def test_token_entropy_is_the_next_token_distributions():
    class Fixed(torch.nn.Module):
        def forward(self, tokens):
            return torch.log(torch.tensor([0.5, 0.25, 0.25])).expand(*tokens.shape, 3)
    logp, entropy = token_logprobs(Fixed(), torch.tensor([[0, 1, 2]]))
    quarter = float(torch.log(torch.tensor(0.25)))
    assert logp[0].tolist() == pytest.approx([0.0, quarter, quarter])
    assert entropy[0].tolist() == pytest.approx([0.0, 1.0397208, 1.0397208])  # 1.5 ln 2


def test_ppo_clip_bounds_the_ratio_from_both_sides():
    roles = torch.tensor([[P, S, S]])
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.0, 0.5, 1.6]]))  # ratios 0.5 (below 1 - clip) and 1.6 (above 1 + clip)
    neg = policy_gradient_terms(logp, old, roles, torch.tensor([-1.0]), clip=0.2, weighting="token_sum")
    # A < 0: min(r A, clip(r) A) = -max(r, clip(r)): -0.8 for r = 0.5, -1.6 for r = 1.6
    assert neg.values[0].tolist() == pytest.approx([0.0, 0.8, 1.6])
    pos = policy_gradient_terms(logp, old, roles, torch.tensor([2.0]), clip=0.2, weighting="token_sum")
    # A > 0: min(r, clip(r)) A: 0.5 * 2 and 1.2 * 2
    assert pos.values[0].tolist() == pytest.approx([0.0, -1.0, -2.4])
