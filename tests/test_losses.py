"""Loss and log-prob values derived by hand."""

from __future__ import annotations

import math

import torch

from rlhf_exp.losses import sft_loss
from rlhf_exp.ops.logprobs import token_logprobs
from rlhf_exp.optim import cosine_with_warmup


def test_token_logprobs_by_hand_with_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])  # [B=1, T=2, V=2]
    labels = torch.tensor([[1, 0]])
    # softmax([0, log 3]) = [1/4, 3/4]; softmax([1, 1]) = [1/2, 1/2]
    assert torch.allclose(token_logprobs(logits, labels), torch.tensor([[math.log(0.75), math.log(0.5)]]))
    # at T=2: softmax([0, log(3)/2]) -> p(1) = sqrt(3) / (1 + sqrt(3))
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert math.isclose(token_logprobs(logits, labels, temperature=2.0)[0, 0].item(), expected, rel_tol=1e-6)


def test_sft_loss_by_hand_ignores_masked_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logps, mask, num_tokens=3).item() == (2 + 3 + 4) / 3


def test_accumulated_micro_batches_equal_one_big_batch():
    torch.manual_seed(0)
    logps = torch.randn(4, 6, requires_grad=True)
    mask = (torch.rand(4, 6) > 0.4).float()
    n = int(mask.sum())
    whole = sft_loss(logps, mask, n)
    grad_whole, = torch.autograd.grad(whole, logps)
    parts = sft_loss(logps[:1], mask[:1], n) + sft_loss(logps[1:], mask[1:], n)
    grad_parts, = torch.autograd.grad(parts, logps)
    assert torch.allclose(whole, parts) and torch.allclose(grad_whole, grad_parts)


def test_schedule_warms_up_from_above_zero_and_ends_at_min_lr():
    values = [cosine_with_warmup(s, warmup_steps=3, max_steps=10, min_lr_ratio=0.1) for s in range(10)]
    assert values[:3] == [1 / 3, 2 / 3, 1.0]
    assert math.isclose(values[-1], 0.1)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))


def test_a_warm_up_as_long_as_the_run_is_said(caplog):
    """stage.warmup_steps >= the run's optimizer steps: the learning rate never reaches stage.lr (the quickstart's
    DPO once ran 5 steps of a 5-step warm-up). One warning naming the key; a shorter warm-up none."""
    from omegaconf import OmegaConf

    from rlhf_exp.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    for warmup, said in ((5, True), (4, False)):
        caplog.clear()
        build_scheduler(optimizer, OmegaConf.create({"max_steps": 5, "warmup_steps": warmup, "min_lr_ratio": 0.1,
                                                     "lr": 1e-3}))
        assert any("stage.warmup_steps=5 covers the whole run" in r.getMessage() for r in caplog.records) == said
