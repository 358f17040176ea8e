import pandas as pd
import pytest
import torch

from tsds_interp.theory import (
    OBJECTIVES,
    PAPER_INIT,
    Toy,
    expected_reward,
    kl_divergence,
    kl_gradient,
    monte_carlo,
    reward_gradient,
    simulate,
    stage_gradient_means,
)

THETA = torch.tensor(PAPER_INIT, dtype=torch.float64)
REF = torch.tensor([0.0, 1.0, 1.5], dtype=torch.float64)
TOYS = [Toy(), Toy(budget=1), Toy(budget=None, discount=0.9), Toy(budget=5, discount=0.8, sample_tokens=1)]


@pytest.mark.parametrize("toy", TOYS, ids=str)
def test_closed_form_gradients_equal_autograd(toy):
    x = THETA.clone().requires_grad_(True)
    (g_j,) = torch.autograd.grad(expected_reward(x, toy), x)
    (g_d,) = torch.autograd.grad(kl_divergence(x, REF, toy), x)
    assert torch.allclose(reward_gradient(THETA, toy), g_j, atol=1e-12)
    assert torch.allclose(kl_gradient(THETA, REF, toy), g_d, atol=1e-12)


@pytest.mark.parametrize("toy", TOYS[:3], ids=str)
def test_closed_forms_agree_with_monte_carlo(toy):
    mc = monte_carlo(THETA, REF, toy, n=100_000, seed=1).set_index("quantity")
    exact = {"J": expected_reward(THETA, toy), "D": kl_divergence(THETA, REF, toy),
             **{f"dJ/{k}": v for k, v in zip(("theta_s", "theta_dC", "theta_dW"), reward_gradient(THETA, toy))},
             **{f"dD/{k}": v for k, v in zip(("theta_s", "theta_dC", "theta_dW"), kl_gradient(THETA, REF, toy))}}
    for q, v in exact.items():
        est, se = mc.loc[q, "estimate"], mc.loc[q, "se"]
        assert abs(est - float(v)) <= 4.5 * se + 1e-12, (q, est, float(v), se)


def test_hand_computed_values():
    """One attempt: J = p. Two attempts, a = 1: J = p + (1 - p) r p."""
    theta = torch.tensor([0.3, 40.0, -0.7], dtype=torch.float64)
    p, r = torch.sigmoid(theta[0]), torch.sigmoid(theta[2])
    assert float(expected_reward(theta, Toy(budget=1))) == pytest.approx(float(p))
    assert float(expected_reward(theta, Toy(budget=2))) == pytest.approx(float(p + (1 - p) * r * p))
    assert float(kl_divergence(THETA, THETA, Toy())) == 0.0
    assert torch.equal(kl_gradient(THETA, THETA, Toy()), torch.zeros(3, dtype=torch.float64))


def test_simulation_records_every_step_and_moves_toward_reward():
    runs = {o: simulate(o, steps=300, lr=0.1) for o in OBJECTIVES}
    for run in runs.values():
        assert len(run) == 301 and run.J.iloc[-1] > run.J.iloc[0]
        assert run[["theta_s", "theta_dC", "theta_dW"]].iloc[0].tolist() == list(PAPER_INIT)
    sur, kl = runs["surrogate"], runs["kl_penalty"]
    assert (sur.gKL_s == 0).all() and kl.D.iloc[-1] > 0
    # update = reward gradient + KL term, and parameters follow the update
    assert ((kl.g_s - kl.gJ_s - kl.gKL_s).abs() < 1e-12).all()
    assert kl.theta_s.iloc[1] == pytest.approx(PAPER_INIT[0] + 0.1 * kl.g_s.iloc[0])
    means = stage_gradient_means(pd.concat(runs.values()))
    assert set(means.gradient) == {"reward", "kl_term", "update"}


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="budget"):
        Toy(budget=0)
    with pytest.raises(ValueError, match="objective"):
        simulate("sft")
