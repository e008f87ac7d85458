"""Bradley-Terry and DPO losses against values derived by hand (as torchtune's loss tests do)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_exp.losses import bradley_terry_loss, dpo_loss
from rlhf_exp.evaluation.statistics import calibration_bins, expected_calibration_error, wilson_interval


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_bradley_terry_by_hand():
    losses = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    assert losses.tolist() == pytest.approx([softplus(-1.0), softplus(1.0)])


def test_bradley_terry_with_margin_by_hand():
    losses = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=0.5)
    assert losses.item() == pytest.approx(softplus(-0.5))  # -log sigmoid(1 - 0.5)
    per_pair = bradley_terry_loss(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 2.0]))
    assert per_pair.tolist() == pytest.approx([softplus(-1.0), softplus(1.0)])


# policy chosen -10, rejected -12; reference -11 for both: h = (+1) - (-1) = 2
PI_C, PI_R, REF_C, REF_R = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))


def test_dpo_sigmoid_by_hand():
    losses, chosen_rewards, rejected_rewards = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    assert losses.item() == pytest.approx(softplus(-0.2))  # -log sigmoid(0.1 * 2)
    assert chosen_rewards.item() == pytest.approx(0.1) and rejected_rewards.item() == pytest.approx(-0.1)


def test_dpo_sigmoid_with_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2))


def test_ipo_by_hand():
    losses, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo_sum")
    assert losses.item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2)  # (2 - 5)^2 = 9


def test_hinge_by_hand():
    losses, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(1 - 0.2)
    far, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=1.0, loss_type="hinge")
    assert far.item() == 0.0  # beta * h = 2 > 1


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_is_log2_when_policy_equals_reference(label_smoothing):
    logps = torch.tensor([-3.0, -50.0, -7.5])
    other = torch.tensor([-4.0, -20.0, -9.0])
    losses, chosen_rewards, _ = dpo_loss(logps, other, logps, other, beta=0.3, label_smoothing=label_smoothing)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert torch.all(chosen_rewards == 0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, REF_C, REF_R, beta=0.1)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_unknown_dpo_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="kto")


def test_wilson_interval_by_hand():
    low, high = wilson_interval(60, 100)
    # p = 0.6, n = 100, z = 1.96: centre 0.5962, half-width 0.0945
    assert (low, high) == pytest.approx((0.5020, 0.6906), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_calibration_table_and_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong: p = 0.1), 0.6 (right), 0.6 (right)
    table = calibration_bins([0.9, 0.1, 0.6, 0.6], num_bins=5)
    assert [(b["count"], b["accuracy"]) for b in table] == [(2, 1.0), (2, 0.5)]
    # |1.0 - 0.6| * 2/4 + |0.5 - 0.9| * 2/4 = 0.4
    assert expected_calibration_error(table) == pytest.approx(0.4)


def test_ipo_on_per_token_average_log_ratios_by_hand():
    """TRL's IPO: log-ratios averaged over each response's tokens (chosen 5 tokens, rejected 4)."""
    losses, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo",
                            chosen_lengths=torch.tensor([5.0]), rejected_lengths=torch.tensor([4.0]))
    h = 1 / 5 - (-1 / 4)
    assert losses.item() == pytest.approx((h - 1 / (2 * 0.1)) ** 2)
    summed, _, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo_sum")
    assert summed.item() == pytest.approx((2 - 5) ** 2)  # the summed form (Azar et al. on sequence log-probs)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo")


def test_a_dpo_variant_registered_beside_the_others_is_a_loss_type_the_config_accepts(tmp_path):
    """The DPO losses are a registry (rlhf_exp/registry.py): one decorated function is a new stage.loss_type,
    dispatched by dpo_loss and allowed by the schema. Catches a hard-coded list of loss types in either."""
    from helpers import PAIRS, tiny_config

    from rlhf_exp.config import validate
    from rlhf_exp.errors import ConfigError
    from rlhf_exp.losses.preference import DPO_LOSS_TYPES

    @DPO_LOSS_TYPES.register("test_squared")
    def squared(chosen_logratios, rejected_logratios, *, beta, **_):
        return (beta * (chosen_logratios - rejected_logratios) - 1) ** 2

    try:
        logps = [torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])]
        losses, _, _ = dpo_loss(*logps, beta=0.5, loss_type="test_squared")
        assert losses.item() == pytest.approx((0.5 * 1.0 - 1) ** 2)
        validate(tiny_config(tmp_path, "stage=dpo", *PAIRS, "stage.loss_type=test_squared"))
        with pytest.raises(ConfigError, match="stage.loss_type"):
            validate(tiny_config(tmp_path, "stage=dpo", *PAIRS, "stage.loss_type=test_cubed"))
        with pytest.raises(ValueError, match="registered twice"):
            DPO_LOSS_TYPES.register("test_squared")(squared)
    finally:
        del DPO_LOSS_TYPES["test_squared"]


# ----------------------------------------------------------------------------------------------- reference-free

def test_simpo_by_hand():
    # chosen -10 over 5 tokens (-2 a token), rejected -12 over 4 (-3 a token): beta x 1 - gamma
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        PI_C, PI_R, None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
        chosen_lengths=torch.tensor([5.0]), rejected_lengths=torch.tensor([4.0]))
    assert losses.item() == pytest.approx(softplus(-(2.0 * 1 - 0.5)))  # -log sigmoid(1.5)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((-4.0, -6.0))  # beta x per-token average
    # a length-normalized margin: the same per-token log-probs on responses twice as long give the same loss
    longer, _, _ = dpo_loss(2 * PI_C, 2 * PI_R, None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                            chosen_lengths=torch.tensor([10.0]), rejected_lengths=torch.tensor([8.0]))
    assert longer.item() == pytest.approx(losses.item())


def test_orpo_by_hand():
    # per-token averages: chosen log 0.5, rejected log 0.25; odds 1 and 1/3: log odds ratio log 3
    lengths = torch.tensor([2.0]), torch.tensor([3.0])
    chosen, rejected = torch.tensor([2 * math.log(0.5)]), torch.tensor([3 * math.log(0.25)])
    losses, chosen_rewards, _ = dpo_loss(chosen, rejected, None, None, beta=0.1, loss_type="orpo",
                                         chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    nll = -2 * math.log(0.5) / 2  # the chosen response's NLL per token
    assert losses.item() == pytest.approx(nll + 0.1 * softplus(-math.log(3)))
    assert chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5))
    # the NLL is a mean over the whole batch's chosen tokens: two pairs, 2 + 6 tokens, not a mean of means
    pair = dpo_loss(torch.tensor([-2.0, -12.0]), torch.tensor([-3.0, -9.0]), None, None, beta=0.0, loss_type="orpo",
                    chosen_lengths=torch.tensor([2.0, 6.0]), rejected_lengths=torch.tensor([3.0, 9.0]))[0]
    assert pair.mean().item() == pytest.approx(14 / 8)


def test_orpos_log1mexp_is_exact_near_zero_and_far_below():
    from rlhf_exp.losses.preference import log1mexp

    x = torch.tensor([-1e-6, -0.5, -0.7, -30.0], dtype=torch.float64)
    assert log1mexp(x).tolist() == pytest.approx([math.log(-math.expm1(v)) for v in x.tolist()], rel=1e-9)


# ----------------------------------------------------------------------------------------------- KTO

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand():
    from rlhf_exp.losses import kto_loss

    # log-ratios +1 (desirable) and -1 (undesirable), reference point 0.5, beta 0.1, weights 1 and 1.5
    losses, rewards = kto_loss(torch.tensor([-9.0, -12.0]), torch.tensor([-10.0, -11.0]), torch.tensor([True, False]),
                               torch.tensor(0.5), beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.1 * (1 - 0.5)), 1.5 * (1 - sigmoid(0.1 * (0.5 + 1)))])
    assert rewards.tolist() == pytest.approx([0.1, -0.1])


def test_ktos_reference_point_is_the_mismatched_pairs_mean_log_ratio_clamped_at_zero_without_gradient():
    from rlhf_exp.losses.preference import kto_reference_point

    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    point = kto_reference_point(policy, torch.tensor([-3.3, -4.9]))
    assert float(point) == pytest.approx(0.1) and not point.requires_grad  # (0.3 - 0.1) / 2
    assert float(kto_reference_point(torch.tensor([-5.0]), torch.tensor([-4.0]))) == 0.0  # a negative KL estimate


def test_ktos_mismatched_pairs_give_each_prompt_the_previous_examples_response():
    from rlhf_exp.data.collate import TokenizedLabelled
    from rlhf_exp.stages.kto import mismatched

    items = [TokenizedLabelled([1], [10], True), TokenizedLabelled([2], [20], False), TokenizedLabelled([3], [30], True)]
    assert [(m.prompt_ids, m.response_ids) for m in mismatched(items)] == [([1], [30]), ([2], [10]), ([3], [20])]
