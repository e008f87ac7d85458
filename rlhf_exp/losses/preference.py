"""Preference losses: the reward model's Bradley-Terry loss, DPO with its variants, the reference-free
SimPO and ORPO, and KTO on responses judged alone.

All take per-sequence quantities of shape [B] and return per-pair losses [B] (the caller
averages), so they compose with any batching or accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_exp.registry import Registry


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), per pair.

    Bradley & Terry 1952 as used for reward models by Ziegler et al. 2019 and Ouyang et al.
    2022 (InstructGPT, eq. 1); the optional margin follows Llama 2 (Touvron et al. 2023, eq. 2).
    chosen_rewards, rejected_rewards [B]; margin scalar or [B] -> [B].
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


# name -> (chosen_logratios [B], rejected_logratios [B], *, beta, ...) -> losses [B], where a log-ratio is
# log pi - log ref summed over a response's tokens
DPO_LOSS_TYPES = Registry("DPO loss_type")


@DPO_LOSS_TYPES.register("sigmoid")
def sigmoid_dpo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
                label_smoothing: float = 0.0, **_) -> torch.Tensor:
    h = chosen_logratios - rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@DPO_LOSS_TYPES.register("ipo")
def ipo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
        chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
        **_) -> torch.Tensor:
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("loss_type ipo averages log-ratios per token: pass chosen_lengths and rejected_lengths")
    per_token = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
    return (per_token - 1 / (2 * beta)) ** 2


@DPO_LOSS_TYPES.register("ipo_sum")
def ipo_sum(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
            **_) -> torch.Tensor:
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


@DPO_LOSS_TYPES.register("hinge")
def hinge(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float,
          **_) -> torch.Tensor:
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


# losses that compare the policy with itself, not with a reference: the stage loads and scores no reference, and
# each receives log pi summed over a response's tokens, with the responses' lengths
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")


@DPO_LOSS_TYPES.register("simpo")
def simpo(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float, simpo_gamma: float = 0.5,
          label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
          rejected_lengths: torch.Tensor | None = None, **_) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta (avg log pi_c - avg log pi_r) - gamma), the average
    per token making the reward length-normalized and gamma a target margin; no reference. [B] -> [B]."""
    h = beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - simpo_gamma
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0 without cancellation (Maechler 2012: log(-expm1(x)) near 0, log1p(-e^x) below -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@DPO_LOSS_TYPES.register("orpo")
def orpo(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float,
         chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
         chosen_tokens_total: float | None = None, **_) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 2-7): the SFT loss on the chosen response plus beta (the paper's lambda) x
    -log sigmoid(log odds_c - log odds_r), where odds = P / (1 - P) of the per-token average probability
    P = exp(avg log pi); no reference. [B] -> [B], whose sum over a batch is the chosen responses' NLL per token
    (`chosen_tokens_total`: the whole batch's chosen tokens, default these pairs') plus their mean odds term."""
    average_chosen, average_rejected = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths
    log_odds = (average_chosen - average_rejected) - (log1mexp(average_chosen) - log1mexp(average_rejected))
    total = chosen_lengths.sum() if chosen_tokens_total is None else chosen_tokens_total
    return -chosen_logps * len(chosen_logps) / total - beta * F.logsigmoid(log_odds)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor | None, reference_rejected_logps: torch.Tensor | None, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             simpo_gamma: float = 0.5, chosen_tokens_total: float | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimization losses and their reference-free kin, per pair (the DPO_LOSS_TYPES registry).

    Inputs [B]: log-probs of the chosen / rejected responses, summed over response tokens,
    under the policy and the frozen reference (None for a reference-free loss), and (for ipo, simpo, orpo) the
    responses' token counts. With h = (pi_c - ref_c) - (pi_r - ref_r):
      sigmoid  -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
               (Rafailov et al. 2023, eq. 7; ls > 0 is conservative DPO, Mitchell 2023)
      ipo      (h' - 1 / (2 beta))^2 with h' on per-token average log-ratios (TRL's IPO): the target
               1 / (2 beta) then means the same per token for a 10- and a 100-token response
      ipo_sum  (h - 1 / (2 beta))^2            (Azar et al. 2023, eq. 17, on summed log-probs)
      hinge    max(0, 1 - beta h)              (SLiC, Zhao et al. 2023)
      simpo    -log sigmoid(beta (avg pi_c - avg pi_r) - gamma), no reference (Meng et al. 2024)
      orpo     NLL of the chosen + beta x -log sigmoid(log odds ratio), no reference (Hong et al. 2024)
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]), detached rewards for logging: the implicit
    rewards beta * (pi - ref) (summed log-ratios), or for a reference-free loss beta * the per-token average log pi.
    """
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        losses = DPO_LOSS_TYPES.lookup(loss_type)(
            policy_chosen_logps, policy_rejected_logps, beta=beta, simpo_gamma=simpo_gamma,
            label_smoothing=label_smoothing, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            chosen_tokens_total=chosen_tokens_total)
        return (losses, beta * (policy_chosen_logps / chosen_lengths).detach(),
                beta * (policy_rejected_logps / rejected_lengths).detach())
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = DPO_LOSS_TYPES.lookup(loss_type)(chosen_logratios, rejected_logratios, beta=beta,
                                              label_smoothing=label_smoothing, chosen_lengths=chosen_lengths,
                                              rejected_lengths=rejected_lengths)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def kto_reference_point(policy_mismatched_logps: torch.Tensor, reference_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 8 as TRL estimates it): the batch mean of
    log pi(y'|x) - log ref(y'|x) over mismatched pairs (each prompt with another example's response), an estimate
    of KL(pi || ref) that carries no gradient, clamped at 0. [B], [B] -> scalar."""
    return (policy_mismatched_logps - reference_mismatched_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor | float, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky optimization (Ethayarajh et al. 2024, eq. 7), per example.

    policy_logps, reference_logps [B]: a response's log-probs summed over its tokens; desirable [B] bool;
    reference_point: z0 (`kto_reference_point`). With r = log pi - log ref:
      desirable    w_d (1 - sigmoid(beta (r - z0)))
      undesirable  w_u (1 - sigmoid(beta (z0 - r)))
    Returns (losses [B], the implicit rewards beta r [B], detached, for logging).
    """
    logratios = policy_logps - reference_logps
    value = torch.where(desirable, torch.sigmoid(beta * (logratios - reference_point)),
                        torch.sigmoid(beta * (reference_point - logratios)))
    weight = torch.where(desirable, torch.full_like(value, desirable_weight), torch.full_like(value, undesirable_weight))
    return weight * (1 - value), beta * logratios.detach()
