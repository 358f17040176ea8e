"""Per-token training objectives with role masks.

Every objective returns :class:`Terms`: a per-token value ``values[b, t]`` (the term for token t
given the prefix before it), that token's role, and an aggregation weight. The loss is
``(values * weights).sum()``, so ``(values * weights * (roles == SAMPLE)).sum()`` is exactly the
part of the loss (and, by linearity, of its gradient) that belongs to the sampling tokens.

Weightings (``weights`` over the counted tokens, sample + decision):

- ``token_sum``: 1 / batch (sum over tokens, mean over sequences: the unbiased policy gradient);
- ``token_mean``: 1 / (number of counted tokens in the batch): the usual, length-weighted SFT;
- ``sequence_mean``: 1 / (batch * counted tokens of that sequence);
- ``role_balanced``: decision tokens share ``decision_share`` of the total weight, sample tokens
  ``1 - decision_share``, each spread evenly over its tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tsds_interp.task import DECISION, PROMPT, SAMPLE

Weighting = Literal["token_sum", "token_mean", "sequence_mean", "role_balanced"]
WEIGHTINGS = ("token_sum", "token_mean", "sequence_mean", "role_balanced")


@dataclass
class Terms:
    values: Float[Tensor, "batch pos"]
    roles: Int[Tensor, "batch pos"]
    weights: Float[Tensor, "batch pos"]

    @property
    def loss(self) -> Tensor:
        return (self.values * self.weights).sum()

    def role_loss(self, role: int) -> Tensor:
        return (self.values * self.weights * (self.roles == role)).sum()

    def __add__(self, other: Terms) -> Terms:
        """Sum of two objectives on the same tokens (weights folded into values)."""
        return Terms(self.values * self.weights + other.values * other.weights, self.roles,
                     torch.ones_like(self.weights))


def counted(roles: Int[Tensor, "batch pos"]) -> Tensor:
    """Tokens the model chose and a loss may count: sample and decision tokens."""
    return (roles == SAMPLE) | (roles == DECISION)


def _local(x: Tensor) -> Tensor:
    return x


def aggregation_weights(roles: Int[Tensor, "batch pos"], mode: Weighting, decision_share: float = 0.5,
                        total: Callable[[Tensor], Tensor] = _local, skip: Bool[Tensor, "batch pos"] | None = None
                        ) -> Float[Tensor, "batch pos"]:
    """Per-token weights; ``total`` sums a count over every process holding part of the batch
    (identity for one process), so each process's loss is its exact share of the global loss.
    Tokens in ``skip`` get weight 0 and are not counted (as if their role were the prompt's)."""
    if mode not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {mode!r}; choose one of {', '.join(WEIGHTINGS)}")
    if skip is not None:
        roles = roles.masked_fill(skip, PROMPT)
    mask = counted(roles).float()
    n_seq = total(torch.tensor(float(roles.shape[0]), device=roles.device))
    if mode == "token_sum":
        return mask / n_seq
    if mode == "token_mean":
        return mask / total(mask.sum()).clamp(min=1)
    if mode == "sequence_mean":
        return mask / (n_seq * mask.sum(1, keepdim=True).clamp(min=1))
    if not 0 <= decision_share <= 1:
        raise ValueError(f"decision_share must be in [0, 1], got {decision_share}")
    dec, samp = (roles == DECISION).float(), (roles == SAMPLE).float()
    return (decision_share * dec / total(dec.sum()).clamp(min=1)
            + (1 - decision_share) * samp / total(samp.sum()).clamp(min=1))


def token_logprobs(model, tokens: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
    """log pi(token_t | tokens_<t) at every position (0 at position 0) and the entropy there."""
    logp_all = model(tokens).float().log_softmax(-1)[:, :-1]
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    pad = torch.zeros_like(logp[:, :1])
    return torch.cat([pad, logp], 1), torch.cat([pad, entropy], 1)


def sft_terms(logp: Float[Tensor, "batch pos"], roles, weighting: Weighting = "token_mean",
              decision_share: float = 0.5, total: Callable[[Tensor], Tensor] = _local,
              skip: Bool[Tensor, "batch pos"] | None = None) -> Terms:
    """Negative log-likelihood of the sample and decision tokens, except those in ``skip`` (e.g.
    :func:`tsds_interp.task.rejected_candidate_tokens`: train the REJECT, not the rejected answer)."""
    kept = counted(roles) if skip is None else counted(roles) & ~skip
    return Terms(-logp * kept, roles, aggregation_weights(roles, weighting, decision_share, total, skip))


def advantages(reward: Float[Tensor, " batch"], group: int, mode: Literal["grpo", "reinforce"] = "grpo",
               eps: float = 1e-6) -> Float[Tensor, " batch"]:
    """GRPO: reward standardized within each group of ``group`` consecutive rows. REINFORCE:
    reward minus the batch mean."""
    if mode == "reinforce":
        return reward - reward.mean()
    if mode != "grpo":
        raise ValueError(f"unknown advantage mode {mode!r}; choose grpo or reinforce")
    if group < 2:
        raise ValueError(f"group must be >= 2 for grpo advantages (one rollout per question has no "
                         f"advantage), got {group}")
    if reward.shape[0] % group:
        raise ValueError(f"batch of {reward.shape[0]} is not a whole number of groups of {group}")
    r = reward.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


def discounted_reward(reward: Float[Tensor, " batch"], n_attempts: Int[Tensor, " batch"],
                      discount: float = 1.0) -> Float[Tensor, " batch"]:
    """Outcome reward discounted by ``discount ** (attempts - 1)``."""
    if not 0 < discount <= 1:
        raise ValueError(f"discount must be a finite number in (0, 1], got {discount!r}")
    return reward * discount ** (n_attempts.float() - 1).clamp(min=0)


def policy_gradient_terms(logp: Float[Tensor, "batch pos"], old_logp: Float[Tensor, "batch pos"],
                          roles, adv: Float[Tensor, " batch"], clip: float | None = None,
                          weighting: Weighting = "token_sum", total: Callable[[Tensor], Tensor] = _local) -> Terms:
    """Surrogate ``-A * ratio`` per token, PPO-clipped when ``clip`` is set.

    At ``logp == old_logp`` the gradient is ``-A * grad log pi`` per token, the policy gradient.
    """
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = ratio * a
    if clip is not None:
        if not 0 < clip <= 10:
            raise ValueError(f"clip must be a finite number in (0, 10], got {clip!r}")
        surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip, 1 + clip) * a)
    return Terms(-surrogate * counted(roles), roles, aggregation_weights(roles, weighting, total=total))


def kl_terms(logp: Float[Tensor, "batch pos"], ref_logp: Float[Tensor, "batch pos"], roles,
             beta: float = 0.1, estimator: Literal["k1", "k3"] = "k3",
             weighting: Weighting = "token_sum", total: Callable[[Tensor], Tensor] = _local) -> Terms:
    """``beta`` times a per-token estimate of KL(pi || pi_ref) on tokens sampled from pi.

    k1 = log pi - log pi_ref; k3 = exp(log pi_ref - log pi) - 1 - (log pi_ref - log pi) (>= 0).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k3":
        kl = torch.exp(log_ratio) - 1 - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose k1 or k3")
    return Terms(beta * kl * counted(roles), roles, aggregation_weights(roles, weighting, total=total))
