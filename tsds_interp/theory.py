"""The three-parameter Decision-Sampling toy model: closed forms, exact gradients, simulation.

Parameters ``theta = (theta_s, theta_dC, theta_dW)``; ``p = sigmoid(theta_s)`` is the chance a
candidate is right, ``a = sigmoid(theta_dC)`` = P(ACCEPT | right), ``r = sigmoid(theta_dW)`` =
P(REJECT | wrong). An episode samples a candidate, decides, and stops at the first ACCEPT or after
``budget`` attempts (the last candidate is then final); reward ``discount**(attempts-1)`` if the
final answer is right. With ``c = p(1-a) + (1-p)r`` (chance to go on) and ``x = discount * c``:

    J = p a (1 + x + ... + x^(K-2)) + p x^(K-1)            (K = budget; K = inf: J = p a / (1 - x))

The KL penalty to a reference ``theta0`` is the exact trajectory KL, a sum over the attempts
reached (chance ``c^(i-1)``) of the per-attempt KL: ``L kl(p, p0) + p kl(a, a0) + (1-p) kl(r, r0)``,
where ``kl`` is the Bernoulli KL and ``L = sample_tokens`` stands for the candidate's token count
(every sampling token carries the sampling KL, the decision is one token): ``D = k * (1 + c + ... +
c^(K-1))``. theta_s is pi_sample's only parameter and (theta_dC, theta_dW) are pi_d's, so the
gradient splits by stage exactly: ``g_sample = dJ/dtheta_s``, ``g_decision = (dJ/dtheta_dC,
dJ/dtheta_dW)``.

The gradients below are derived by hand; tests check them against autograd and Monte Carlo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

PAPER_INIT = (0.2, 1.5, 1.0)
PARAMS = ("theta_s", "theta_dC", "theta_dW")


@dataclass(frozen=True)
class Toy:
    """Episode settings: attempt budget (None = unbounded), reward discount per extra attempt,
    tokens per candidate for the KL (``sample_tokens``)."""

    budget: int | None = 3
    discount: float = 1.0
    sample_tokens: int = 6

    def __post_init__(self):
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1 or None, got {self.budget}")
        if not 0 < self.discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if self.sample_tokens < 1:
            raise ValueError(f"sample_tokens must be >= 1, got {self.sample_tokens}")


def _geometric(x: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    """``sum_{i<n} x^i`` and its derivative in x (n = None: the infinite series)."""
    if n is None:
        return 1 / (1 - x), 1 / (1 - x) ** 2
    i = torch.arange(n, dtype=x.dtype)
    return (x**i).sum(), (i[1:] * x ** (i[1:] - 1)).sum() if n > 1 else torch.zeros_like(x)


def _last(x: Tensor, toy: Toy) -> tuple[Tensor, Tensor]:
    """``x^(K-1)`` (reaching the last attempt) and its derivative; 0 for an unbounded budget."""
    if toy.budget is None:
        return torch.zeros_like(x), torch.zeros_like(x)
    k = toy.budget - 1
    return x**k, (k * x ** (k - 1) if k > 0 else torch.zeros_like(x))


def probabilities(theta: Float[Tensor, 3]) -> Float[Tensor, 3]:
    return torch.sigmoid(theta)


def expected_reward(theta: Float[Tensor, 3], toy: Toy = Toy()) -> Tensor:
    """J(theta) in closed form (differentiable)."""
    p, a, r = probabilities(theta)
    x = toy.discount * (p * (1 - a) + (1 - p) * r)
    series, _ = _geometric(x, None if toy.budget is None else toy.budget - 1)
    last, _ = _last(x, toy)
    return p * a * series + p * last


def reward_gradient(theta: Float[Tensor, 3], toy: Toy = Toy()) -> Float[Tensor, 3]:
    """dJ/dtheta, derived by hand."""
    p, a, r = probabilities(theta)
    g = toy.discount
    x = g * (p * (1 - a) + (1 - p) * r)
    series, dseries = _geometric(x, None if toy.budget is None else toy.budget - 1)
    last, dlast = _last(x, toy)
    dj_dx = p * a * dseries + p * dlast
    dj_dp = a * series + last + dj_dx * g * (1 - a - r)
    dj_da = p * series - dj_dx * g * p
    dj_dr = dj_dx * g * (1 - p)
    return torch.stack([dj_dp * p * (1 - p), dj_da * a * (1 - a), dj_dr * r * (1 - r)])


def _bernoulli_kl(q: Tensor, q0: Tensor) -> Tensor:
    return q * torch.log(q / q0) + (1 - q) * torch.log((1 - q) / (1 - q0))


def _attempt_kl(theta, theta0, toy: Toy) -> tuple[Tensor, ...]:
    p, a, r = probabilities(theta)
    p0, a0, r0 = probabilities(theta0)
    kl_s, kl_a, kl_r = _bernoulli_kl(p, p0), _bernoulli_kl(a, a0), _bernoulli_kl(r, r0)
    k = toy.sample_tokens * kl_s + p * kl_a + (1 - p) * kl_r
    return p, a, r, kl_a, kl_r, k


def kl_divergence(theta: Float[Tensor, 3], theta0: Float[Tensor, 3], toy: Toy = Toy()) -> Tensor:
    """KL(pi_theta || pi_theta0) over whole episodes, in closed form (differentiable)."""
    p, a, r, _, _, k = _attempt_kl(theta, theta0, toy)
    series, _ = _geometric(p * (1 - a) + (1 - p) * r, toy.budget)
    return k * series


def kl_gradient(theta: Float[Tensor, 3], theta0: Float[Tensor, 3], toy: Toy = Toy()) -> Float[Tensor, 3]:
    """dD/dtheta, derived by hand (d kl(q, q0)/dq = logit q - logit q0)."""
    p, a, r, kl_a, kl_r, k = _attempt_kl(theta, theta0, toy)
    series, dseries = _geometric(p * (1 - a) + (1 - p) * r, toy.budget)
    d = theta - theta0
    dd_dp = series * (toy.sample_tokens * d[0] + kl_a - kl_r) + k * dseries * (1 - a - r)
    dd_da = series * p * d[1] - k * dseries * p
    dd_dr = series * (1 - p) * d[2] + k * dseries * (1 - p)
    return torch.stack([dd_dp * p * (1 - p), dd_da * a * (1 - a), dd_dr * r * (1 - r)])


# ---------------------------------------------------------------- Monte Carlo

def monte_carlo(theta: Float[Tensor, 3], theta0: Float[Tensor, 3] | None = None, toy: Toy = Toy(),
                n: int = 200_000, seed: int = 0) -> pd.DataFrame:
    """Sampled episodes -> estimates and standard errors of J, dJ/dtheta (score function) and, with
    ``theta0``, of D and dD/dtheta (``E[f score + grad f]`` with f the per-attempt KL sum).

    Rows: ``quantity`` (J, dJ/theta_s, ..., D, dD/theta_s, ...), ``estimate``, ``se``.
    """
    gen = np.random.default_rng(seed)
    p, a, r = probabilities(theta.double()).tolist()
    t = theta.double().numpy()
    budget = toy.budget if toy.budget is not None else 10_000
    score = np.zeros((n, 3))
    grad_f = np.zeros((n, 3))
    f = np.zeros(n)
    reward = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    if theta0 is not None:
        p0, a0, r0 = probabilities(theta0.double()).tolist()
        d = t - theta0.double().numpy()

        def kl(q, q0):
            return q * np.log(q / q0) + (1 - q) * np.log((1 - q) / (1 - q0))
        kl_s, kl_a, kl_r = kl(p, p0), kl(a, a0), kl(r, r0)
    for i in range(budget):
        if not alive.any():
            break
        idx = np.flatnonzero(alive)
        right = gen.random(idx.size) < p
        accept = np.where(right, gen.random(idx.size) < a, gen.random(idx.size) >= r)
        score[idx, 0] += right - p
        score[idx, 1] += np.where(right, accept - a, 0.0)
        score[idx, 2] += np.where(right, 0.0, (~accept) - r)
        if theta0 is not None:
            f[idx] += toy.sample_tokens * kl_s + np.where(right, kl_a, kl_r)
            grad_f[idx, 0] += toy.sample_tokens * d[0] * p * (1 - p)
            grad_f[idx, 1] += np.where(right, d[1] * a * (1 - a), 0.0)
            grad_f[idx, 2] += np.where(right, 0.0, d[2] * r * (1 - r))
        final = accept | (i == budget - 1)
        reward[idx[final]] = right[final] * toy.discount**i
        alive[idx[final]] = False
    samples = {"J": reward, **{f"dJ/{k}": reward * score[:, j] for j, k in enumerate(PARAMS)}}
    if theta0 is not None:
        samples |= {"D": f, **{f"dD/{k}": f * score[:, j] + grad_f[:, j] for j, k in enumerate(PARAMS)}}
    return pd.DataFrame([{"quantity": k, "estimate": v.mean(), "se": v.std(ddof=1) / np.sqrt(n)}
                         for k, v in samples.items()])


# ---------------------------------------------------------------- training simulation

OBJECTIVES = ("surrogate", "kl_penalty")


def simulate(objective: str = "surrogate", steps: int = 10_000, lr: float = 0.1, beta: float = 0.1,
             init: tuple[float, float, float] = PAPER_INIT, toy: Toy = Toy(), record_every: int = 1,
             progress: bool = False) -> pd.DataFrame:
    """Gradient ascent on ``J`` (``surrogate``) or ``J - beta * D`` with the reference at ``init``
    (``kl_penalty``), using the exact gradients.

    One row per recorded step: the parameters, the three probabilities, J, D, and per parameter
    the reward gradient ``gJ_*``, the KL term's gradient ``gKL_* = -beta dD/dtheta`` (0 for the
    surrogate run) and the update direction ``g_*``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    theta0 = torch.tensor(init, dtype=torch.float64)
    theta = theta0.clone()
    no_kl = torch.zeros(3, dtype=theta.dtype)
    rows = []
    for step in tqdm(range(steps + 1), desc=objective, disable=not progress):
        g_j = reward_gradient(theta, toy)
        g_kl = -beta * kl_gradient(theta, theta0, toy) if objective == "kl_penalty" else no_kl
        g = g_j + g_kl
        if step % record_every == 0:
            row = {"objective": objective, "step": step,
                   **dict(zip(PARAMS, theta.tolist())),
                   **dict(zip(("p_s", "p_d_given_c", "p_d_given_w"), probabilities(theta).tolist())),
                   "J": float(expected_reward(theta, toy)), "D": float(kl_divergence(theta, theta0, toy))}
            for name, v in (("gJ", g_j), ("gKL", g_kl), ("g", g)):
                row |= {f"{name}_{k.removeprefix('theta_')}": x for k, x in zip(PARAMS, v.tolist())}
            rows.append(row)
        if step < steps:
            theta = theta + lr * g
    return pd.DataFrame(rows)


def stage_gradient_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over steps of |g_sample| = |g_s| and |g_decision| = ||(g_dC, g_dW)||, for the reward
    gradient, the KL term and the update of each run."""
    rows = []
    for objective, run in runs.groupby("objective", sort=False):
        for part in ("gJ", "gKL", "g"):
            if part == "gKL" and objective == "surrogate":
                continue
            label = {"gJ": "reward", "gKL": "kl_term", "g": "update"}[part]
            rows.append({"objective": objective, "gradient": label,
                         "sample": run[f"{part}_s"].abs().mean(),
                         "decision": np.hypot(run[f"{part}_dC"], run[f"{part}_dW"]).mean()})
    out = pd.DataFrame(rows)
    out["decision_to_sample"] = out["decision"] / out["sample"]
    return out
