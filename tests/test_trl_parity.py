"""Parity with TRL on identical inputs: for one batch and the tiny model in fp32, the loss each stage computes
(through its own log-prob code) and its gradient equal what TRL's trainer computes (`compute_loss` /
`_compute_loss`, with TRL's own forward) on the same token ids, to 1e-5. TRL is a test-only dependency (the
`dev` extra). Where this project differs on purpose the test names the difference and checks the relation.

What each would catch: a shifted or off-by-one response mask, the end token not scored, temperature not
applied to the log-probs, a loss normalized over the wrong count (per micro batch instead of per batch, per
sequence instead of per token), a sign or clip-side error in the surrogate, the KL term on the wrong side,
IPO's length normalization missing, the reference's log-probs taken from the policy.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import GRPO, PAIRS, trainer_for

trl = pytest.importorskip("trl", reason="TRL is a test-only dependency: pip install -e '.[dev]'")

from datasets import Dataset  # noqa: E402

from rlhf_exp.data.collate import TokenizedSFT, collate_pairs, collate_sft  # noqa: E402
from rlhf_exp.losses.policy import group_advantages  # noqa: E402

TOLERANCE = 1e-5


def common_args(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", per_device_train_batch_size=8,
                gradient_checkpointing=False, bf16=False, logging_steps=1, save_strategy="no", seed=0,
                dataloader_num_workers=0)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): p.grad.detach().clone()
            for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    scale = max(float(g.abs().max()) for g in ours.values())
    assert worst <= TOLERANCE * max(1.0, scale), f"largest gradient difference {worst:.3g} (largest gradient {scale:.3g})"


def on_disk(model, tokenizer, folder):
    """`model` with a folder behind its name (TRL reads the model's config and generation config by name)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.config._name_or_path = model.name_or_path = str(folder)
    return model


def perturbed(model, seed: int = 1, size: float = 0.02):
    """A copy of `model` moved off it (a policy that has trained a little: its log-probs differ from the
    reference's)."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * size)
    return moved


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return ids, torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])


# ----------------------------------------------------------------------------------------------- GRPO

def ragged_responses(ours, group: int) -> tuple[list[TokenizedSFT], torch.Generator]:
    """Two prompts' groups of random responses, ragged (one at the 6-token budget), and the generator drawn from."""
    generator = torch.Generator().manual_seed(0)
    items = [TokenizedSFT(ours.train_set[k // group].prompt_ids, torch.randint(10, 500, (n,), generator=generator).tolist())
             for k, n in enumerate([6, 2, 5, 3, 6, 1, 4, 6])]
    return items, generator


def off_policy_rollout(ours, items, advantages: torch.Tensor, generator: torch.Generator, spread: float):
    """Our rollout of `items` with an older sampling policy (its log-probs moved by noise of `spread`)."""
    rollout = ours.make_rollout(items)
    rollout.old_logps = (rollout.old_logps + torch.randn(rollout.old_logps.shape, generator=generator) * spread) * rollout.mask
    rollout.advantages = advantages[:, None] * rollout.mask
    return rollout


def trl_completions(items, pad: int) -> dict[str, torch.Tensor]:
    """The prompt / completion tensors TRL's GRPO and RLOO trainers compute their loss on."""
    prompt_ids, prompt_mask = left_pad([x.prompt_ids for x in items], pad)
    completion_ids, completion_mask = right_pad([x.response_ids for x in items], pad)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}



# case -> (our stage keys, TRL's GRPOConfig keys) giving the same loss (TRL has no dual clip: it is off on our side)
GRPO_CASES = {
    "grpo": (["stage.loss_type=grpo"], {"loss_type": "grpo"}),          # seq-mean-token-mean
    "bnpo": (["stage.loss_type=grpo", "stage.loss_aggregation=token-mean"], {"loss_type": "bnpo"}),
    "dr_grpo": (["stage.loss_type=dr_grpo"], {"loss_type": "dr_grpo", "scale_rewards": "none"}),  # sum / (B x max)
    # TRL's dapo loss: clip-higher, sum / num_items_in_batch (tokens); dynamic sampling and the overlong penalty
    # act before the loss
    "dapo": (["stage.loss_type=dapo"], {"loss_type": "dapo", "epsilon_high": 0.28}),
    "dapo_aggregation_alone": (["stage.loss_type=grpo", "stage.loss_aggregation=token-mean"], {"loss_type": "dapo"}),
    # GSPO: TRL's importance_sampling_level="sequence" with its grpo aggregation, the paper's clip range
    "gspo": (["stage.loss_type=gspo"], {"loss_type": "grpo", "importance_sampling_level": "sequence",
                                        "epsilon": 3e-4, "epsilon_high": 4e-4}),
}


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_loss_and_gradients_equal_trls(tmp_path, case):
    from trl import GRPOConfig, GRPOTrainer

    group, new_tokens, temperature, beta = 4, 6, 0.7, 0.05
    our_keys, their_keys = GRPO_CASES[case]
    their_keys = {"epsilon": 0.2, "scale_rewards": "group", **their_keys}
    ours = trainer_for(__import__("rlhf_exp.stages.grpo", fromlist=["GRPOTrainer"]).GRPOTrainer, tmp_path,
                       *GRPO, "stage.minibatch_size=8", "stage.dual_clip_c=null", f"stage.kl_coef={beta}",
                       "stage.kl_estimator=k3", f"stage.generation.temperature={temperature}",
                       f"stage.generation.max_new_tokens={new_tokens}", *our_keys)
    reference = copy.deepcopy(ours.model)
    ours.model = perturbed(ours.model)
    ours.reference = reference
    policy_at_start = on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy")

    items, generator = ragged_responses(ours, group)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.9, 0.1, 0.0])
    advantages = group_advantages(rewards, group, scale_by_std=their_keys["scale_rewards"] == "group")
    rollout = off_policy_rollout(ours, items, advantages, generator, 0.3)  # ratios both sides of the clip range
    loss, _ = ours.minibatch_loss(rollout, {"tokens": float(rollout.mask.sum()), "sequences": len(items)})
    loss.backward()

    trainer = GRPOTrainer(
        model=policy_at_start, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        processing_class=ours.tokenizer, train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        args=GRPOConfig(**common_args(tmp_path), num_generations=group, max_completion_length=new_tokens,
                        temperature=temperature, beta=beta, disable_dropout=True, **their_keys,
                        # TRL 1.16's default (True) weights the KL term by the ratio to the sampling policy (the
                        # DeepSeek-V3.2 correction); ours is the plain term: the relation is the next test's
                        use_bias_correction_kl=False))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = {**trl_completions(items, ours.tokenizer.pad_token_id), "advantages": advantages,
              "old_per_token_logps": rollout.old_logps, "ref_per_token_logps": rollout.ref_logps}
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()

    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


def test_grpo_advantages_equal_trls_formula():
    """TRL computes advantages inline in `_generate_and_score_completions` (no function to call): its formula,
    (r - group mean) / (group std + 1e-4) with the unbiased std (scale_rewards="group"), and r - group mean
    (scale_rewards="none", Dr. GRPO)."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.9, 0.1, 0.0])
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    std = grouped.std(dim=1).repeat_interleave(4)
    assert torch.allclose(group_advantages(rewards, 4, scale_by_std=True), (rewards - mean) / (std + 1e-4),
                          atol=TOLERANCE)
    assert torch.allclose(group_advantages(rewards, 4, scale_by_std=False), rewards - mean, atol=TOLERANCE)


def test_trls_default_bias_corrected_kl_is_ours_plus_the_ratio_weighted_difference(tmp_path):
    """TRL 1.16 multiplies the per-token k3 by the ratio to the sampling policy by default
    (`use_bias_correction_kl=True`); ours does not (the GRPO paper's and verl's term). On identical inputs TRL's
    loss is ours + beta * aggregate((ratio - 1) * k3), exactly."""
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_exp.losses.policy import kl_penalty
    from rlhf_exp.stages.grpo import GRPOTrainer as OurGRPO

    beta = 1.0  # a KL term large enough that the correction shows
    ours = trainer_for(OurGRPO, tmp_path, *GRPO, "stage.minibatch_size=8", "stage.dual_clip_c=null",
                       f"stage.kl_coef={beta}", "stage.generation.temperature=1.0")
    ours.reference, ours.model = copy.deepcopy(ours.model), perturbed(ours.model)
    policy_at_start = on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy")
    items, generator = ragged_responses(ours, 4)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.9, 0.1, 0.0]), 4)
    rollout = off_policy_rollout(ours, items, advantages, generator, 0.3)
    with torch.no_grad():
        loss, _ = ours.minibatch_loss(rollout, {"tokens": float(rollout.mask.sum()), "sequences": len(items)})
        logps, mask, _ = ours.logprobs(ours.model, items)
        weighted = (torch.exp(logps - rollout.old_logps) - 1) * kl_penalty(logps, rollout.ref_logps, "k3")
        correction = beta * float(((weighted * mask).sum(-1) / mask.sum(-1)).mean())

    trainer = GRPOTrainer(
        model=policy_at_start, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        processing_class=ours.tokenizer, train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        args=GRPOConfig(**common_args(tmp_path), num_generations=4, max_completion_length=6, temperature=1.0,
                        beta=beta, epsilon=0.2, loss_type="grpo", disable_dropout=True))
    assert trainer.args.use_bias_correction_kl  # TRL's default
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, {
            **trl_completions(items, ours.tokenizer.pad_token_id), "advantages": advantages,
            "old_per_token_logps": rollout.old_logps, "ref_per_token_logps": rollout.ref_logps})
    assert abs(correction) > 1e-4  # the inputs make the two differ
    assert float(theirs) == pytest.approx(float(loss) + correction, abs=TOLERANCE)


def test_rloo_loss_and_gradients_equal_trls(tmp_path):
    """stage.loss_type=rloo against TRL's RLOOTrainer: the whole response's likelihood ratio, clipped, a mean over
    responses (the KL is in the reward, not the loss: the next test)."""
    from trl import RLOOConfig, RLOOTrainer

    from rlhf_exp.losses.policy import leave_one_out_advantages
    from rlhf_exp.stages.grpo import GRPOTrainer as OurGRPO

    group, new_tokens, temperature = 4, 6, 0.7
    ours = trainer_for(OurGRPO, tmp_path, *GRPO, "stage.minibatch_size=8", "stage.dual_clip_c=null",
                       "stage.kl_coef=0.05", "stage.loss_type=rloo", f"stage.generation.temperature={temperature}",
                       f"stage.generation.max_new_tokens={new_tokens}")
    ours.reference, ours.model = copy.deepcopy(ours.model), perturbed(ours.model)
    policy_at_start = on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy")
    items, generator = ragged_responses(ours, group)
    advantages = leave_one_out_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2, 0.3, 0.9, 0.1, 0.0]), group)
    # a little off (a whole response's ratio multiplies its tokens' ratios)
    rollout = off_policy_rollout(ours, items, advantages, generator, 0.05)
    loss, _ = ours.minibatch_loss(rollout, {"tokens": float(rollout.mask.sum()), "sequences": len(items)})
    loss.backward()

    trainer = RLOOTrainer(
        model=policy_at_start, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
        processing_class=ours.tokenizer, train_dataset=Dataset.from_list([{"prompt": "x"}] * 8),
        args=RLOOConfig(**common_args(tmp_path), num_generations=group, max_completion_length=new_tokens,
                        temperature=temperature, beta=0.05, epsilon=0.2, disable_dropout=True))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    theirs = trainer._compute_loss(trainer.model, {
        **trl_completions(items, ours.tokenizer.pad_token_id), "advantages": advantages,
        "old_logps": (rollout.old_logps * rollout.mask).sum(1)})
    theirs.backward()
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


def test_rloo_advantages_with_the_kl_in_the_reward_equal_trls_formula():
    """TRL's RLOOTrainer computes them inline in `_generate_and_score_completions`: r - beta x sum_t (log pi_old -
    log ref), then r minus the mean of the group's other rewards. Ours: k1 on every token's reward, the score on
    the last, summed, then the leave-one-out estimator."""
    from rlhf_exp.losses.policy import ADVANTAGE_ESTIMATORS, kl_penalty, per_token_rewards

    generator = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0], [1.0] * 3 + [0.0] * 2])
    old, ref = torch.randn(4, 5, generator=generator) * mask, torch.randn(4, 5, generator=generator) * mask
    scores, beta = torch.tensor([1.0, 0.0, 0.5, 0.25]), 0.1
    rewards = scores - beta * ((old - ref) * mask).sum(-1)
    grouped = rewards.view(-1, 4)
    theirs = rewards - ((grouped.sum(1, keepdim=True) - grouped) / 3).view(-1)
    token_rewards = per_token_rewards(scores, kl_penalty(old, ref, "k1") * mask, mask, beta)
    ours = ADVANTAGE_ESTIMATORS["rloo"](token_rewards, mask, 4)
    assert torch.allclose(ours[:, 0], theirs, atol=TOLERANCE)


# ----------------------------------------------------------------------------------------------- SFT

def test_sft_loss_and_gradients_equal_trls(tmp_path):
    """Completion-only SFT, the mean NLL over every response token of the batch (TRL's default for
    prompt-completion data, num_items_in_batch = the batch's tokens)."""
    from trl import SFTConfig, SFTTrainer as TrlSFT

    from rlhf_exp.losses.sft import sft_loss
    from rlhf_exp.stages.sft import SFTTrainer

    ours = trainer_for(SFTTrainer, tmp_path)
    start = on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy")
    batch = collate_sft(ours.train_set[:4], ours.tokenizer.pad_token_id)
    logps, mask = ours._response_logps(batch)
    loss = sft_loss(logps, mask, mask.sum())
    loss.backward()

    trainer = TrlSFT(model=start, processing_class=ours.tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}] * 8),
                     args=SFTConfig(**common_args(tmp_path), completion_only_loss=True, packing=False))
    trainer.model.train()
    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    theirs = trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"], "labels": labels})
    theirs.backward()
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


# ----------------------------------------------------------------------------------------------- reward model

def test_reward_model_bradley_terry_loss_and_gradients_equal_trls(tmp_path):
    """Our RM (backbone + bias-free linear head, scored at the response's end token) as the
    ForSequenceClassification model TRL's RewardTrainer trains: the same weights, the same pairs."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf_exp.losses import bradley_terry_loss
    from rlhf_exp.stages.rm import RewardModelTrainer

    ours = trainer_for(RewardModelTrainer, tmp_path, "stage=rm", *PAIRS)
    pad = ours.tokenizer.pad_token_id
    config = AutoConfig.for_model(**{**ours.model.backbone.config.to_dict(), "num_labels": 1, "pad_token_id": pad})
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.model.load_state_dict(ours.model.backbone.state_dict())
    with torch.no_grad():
        classifier.score.weight.copy_(ours.model.head.weight)
    classifier = on_disk(classifier, ours.tokenizer, tmp_path / "rm")

    pairs = ours.train_set[:4]
    chosen, rejected = ours.pair_scores(pairs)
    loss = bradley_terry_loss(chosen, rejected).mean()
    loss.backward()

    trainer = RewardTrainer(model=classifier, processing_class=ours.tokenizer,
                            train_dataset=Dataset.from_list([{"chosen": "a", "rejected": "b"}] * 8),
                            args=RewardConfig(**common_args(tmp_path), center_rewards_coefficient=None))
    trainer.model.train()
    batch = collate_pairs(pairs, pad)  # all chosen rows, then all rejected: TRL's order
    theirs = trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]})
    theirs.backward()
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    ours_grads = {name.replace("backbone.", "model.", 1).replace("head.", "score.", 1): g
                  for name, g in gradients(ours.model).items()}
    assert_same_gradients(ours_grads, gradients(trainer.model))


# ----------------------------------------------------------------------------------------------- DPO

def dpo_sides(tmp_path, loss_type: str, label_smoothing: float = 0.0, beta: float = 0.1):
    """Our DPO trainer (a moved policy, the starting model as reference) and TRL's on copies of the same two models."""
    from trl import DPOConfig, DPOTrainer as TrlDPO

    from rlhf_exp.stages.dpo import DPOTrainer

    ours = trainer_for(DPOTrainer, tmp_path, "stage=dpo", *PAIRS, "stage.precompute_ref_logps=false",
                       f"stage.loss_type={loss_type}", f"stage.label_smoothing={label_smoothing}", f"stage.beta={beta}")
    reference = ours.reference
    ours.model = perturbed(ours.model, size=0.05)
    policy = on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy")
    ref_copy = on_disk(copy.deepcopy(reference), ours.tokenizer, tmp_path / "reference")
    trainer = TrlDPO(model=policy, ref_model=ref_copy, processing_class=ours.tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8),
                     args=DPOConfig(**common_args(tmp_path), beta=beta, loss_type=[loss_type if loss_type != "cdpo"
                                                                                    else "sigmoid"],
                                    precompute_ref_log_probs=False))
    trainer.model.train()
    return ours, trainer


def our_dpo_loss(ours, pairs) -> torch.Tensor:
    from rlhf_exp.stages.dpo import pair_lengths

    chosen, rejected, _ = ours.pair_logps(ours.model, pairs)
    ref_chosen, ref_rejected = ours.reference_logps(list(range(len(pairs))), pairs)
    losses, _, _ = ours._losses(chosen, rejected, ref_chosen, ref_rejected, pair_lengths(pairs))
    return losses.mean()


def trl_dpo_loss(trainer, pairs, pad: int) -> torch.Tensor:
    batch = collate_pairs(pairs, pad)
    return trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                                "completion_mask": batch["response_mask"]})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_and_gradients_equal_trls(tmp_path, loss_type):
    """sigmoid (Rafailov et al.), hinge (SLiC) and IPO on per-token average log-ratios, TRL's normalization (ours
    is `ipo`; `ipo_sum` is the paper's summed form, which TRL does not have)."""
    ours, trainer = dpo_sides(tmp_path, loss_type, beta=0.5 if loss_type == "hinge" else 0.1)
    pairs = ours.train_set[:4]
    loss = our_dpo_loss(ours, pairs)
    loss.backward()
    theirs = trl_dpo_loss(trainer, pairs, ours.tokenizer.pad_token_id)
    theirs.backward()
    assert float(loss.detach()) != pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-3)  # the policy moved
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


def reference_free_sides(tmp_path, loss_type: str, beta: float):
    """Our DPO stage with a reference-free loss (a moved policy, no reference) and the model on disk for TRL."""
    from rlhf_exp.stages.dpo import DPOTrainer

    ours = trainer_for(DPOTrainer, tmp_path, "stage=dpo", *PAIRS, f"stage.loss_type={loss_type}", f"stage.beta={beta}",
                       "stage.simpo_gamma=0.5")
    assert ours.reference is None and not ours.ref_train  # nothing held or scored for a reference
    ours.model = perturbed(ours.model, size=0.05)
    return ours, on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy")


def trl_pair_batch(pairs, pad: int) -> dict[str, torch.Tensor]:
    """The tokenized batch TRL's CPO and ORPO trainers train on (their `tokenize_row` output, collated): prompt +
    response ids, labels -100 on the prompt, for the chosen and the rejected side."""
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [p.prompt_ids + getattr(p, f"{side}_ids") for p in pairs]
        ids, attention = right_pad(rows, pad)
        labels, _ = right_pad([[-100] * len(p.prompt_ids) + getattr(p, f"{side}_ids") for p in pairs], -100)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return batch


def test_simpo_loss_and_gradients_equal_trls_cpo_trainer(tmp_path):
    """SimPO against TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (TRL's CPO adds a chosen NLL by
    default; SimPO has none)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta = 2.0
    ours, policy = reference_free_sides(tmp_path, "simpo", beta)
    pairs = ours.train_set[:4]
    loss = our_dpo_loss(ours, pairs)
    loss.backward()
    trainer = CPOTrainer(model=policy, processing_class=ours.tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8),
                         args=CPOConfig(**common_args(tmp_path), beta=beta, loss_type="simpo", simpo_gamma=0.5,
                                        cpo_alpha=0.0))
    trainer.model.train()
    theirs, _ = trainer.get_batch_loss_metrics(trainer.model, trl_pair_batch(pairs, ours.tokenizer.pad_token_id))
    theirs.backward()
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


def test_orpo_loss_and_gradients_equal_trls_with_the_nll_on_the_response(tmp_path):
    """ORPO against TRL's ORPOTrainer: TRL's own forward (per-token average log-probs) and its `odds_ratio_loss`.
    One difference on purpose: TRL's NLL term runs over the prompt's tokens too, ours over the chosen response's
    only (the paper's L_SFT = -log P(y_w | x), and this project's SFT): TRL's loss is taken with its NLL replaced by
    the response tokens' mean NLL, computed from TRL's own log-probs."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    beta = 0.1
    ours, policy = reference_free_sides(tmp_path, "orpo", beta)
    pairs = ours.train_set[:4]
    loss = our_dpo_loss(ours, pairs)
    loss.backward()
    trainer = ORPOTrainer(model=policy, processing_class=ours.tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8),
                          args=ORPOConfig(**common_args(tmp_path), beta=beta))
    trainer.model.train()
    batch = trl_pair_batch(pairs, ours.tokenizer.pad_token_id)
    chosen, rejected, _, _, nll_with_prompt = trainer.concatenated_forward(trainer.model, batch)[:5]
    odds_terms = trainer.odds_ratio_loss(chosen, rejected)[0]
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float32)
    nll = -(chosen * lengths).sum() / lengths.sum()
    theirs = nll - odds_terms.mean()
    theirs.backward()
    assert float(nll_with_prompt.detach()) != pytest.approx(float(nll.detach()), abs=1e-3)  # the scopes differ on these pairs
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


def test_kto_loss_and_gradients_equal_trls(tmp_path):
    """KTO against TRL's KTOTrainer (`_compute_loss`, its own forward and reference): the same examples, the same
    mismatched pairs for the reference point (each prompt with the previous example's response), desirable and
    undesirable weights that differ."""
    from trl import KTOConfig, KTOTrainer as TrlKTO

    from rlhf_exp.stages.kto import KTOTrainer

    beta = 0.1
    ours = trainer_for(KTOTrainer, tmp_path, "stage=kto", *PAIRS, f"stage.beta={beta}", "stage.undesirable_weight=1.5")
    reference = ours.reference
    ours.model = perturbed(ours.model, seed=2)  # a move that makes the mismatched pairs likelier: z0 > 0
    items = [ours.train_set[k] for k in range(6)]
    assert {item.label for item in items} == {True, False}
    z0 = ours.reference_point(items)
    losses, _, _ = ours.losses(items, ours.sequence_logps(ours.model, items), z0)
    loss = losses.mean()
    loss.backward()
    assert float(z0) > 0  # the moved policy: a reference point that matters

    trainer = TrlKTO(model=on_disk(copy.deepcopy(ours.model), ours.tokenizer, tmp_path / "policy"),
                     ref_model=on_disk(copy.deepcopy(reference), ours.tokenizer, tmp_path / "reference"),
                     processing_class=ours.tokenizer,
                     train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b", "label": k % 2 == 0}
                                                      for k in range(8)]),
                     args=KTOConfig(**{**common_args(tmp_path), "per_device_train_batch_size": 6}, beta=beta,
                                    undesirable_weight=1.5))
    trainer.model.train()
    pad = ours.tokenizer.pad_token_id
    batch = {}
    completions = [item.response_ids for item in items]
    kl_completions = [completions[-1]] + completions[:-1]  # TRL's add_kl_completion_ids, written out
    for prefix, answers in (("", completions), ("KL_", kl_completions)):
        rows = [(item.prompt_ids, answer) for item, answer in zip(items, answers)]
        ids, attention = right_pad([prompt + answer for prompt, answer in rows], pad)
        completion, _ = right_pad([[0] * len(prompt) + [1] * len(answer) for prompt, answer in rows], 0)
        batch.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention,
                      f"{prefix}completion_mask": completion})
    batch["label"] = torch.tensor([item.label for item in items])
    theirs = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    theirs.backward()
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))


def test_conservative_dpo_is_trls_sigmoid_on_the_pairs_and_on_them_swapped(tmp_path):
    """cDPO (Mitchell 2023; label_smoothing = the share of flipped labels): TRL 1.16 no longer smooths its sigmoid
    loss, so the relation is checked instead: (1 - e) TRL(sigmoid, pairs) + e TRL(sigmoid, chosen and rejected
    swapped), loss and gradients."""
    from rlhf_exp.data.collate import TokenizedPair

    smoothing = 0.1
    ours, trainer = dpo_sides(tmp_path, "sigmoid", label_smoothing=smoothing)
    pairs = ours.train_set[:4]
    loss = our_dpo_loss(ours, pairs)
    loss.backward()
    swapped = [TokenizedPair(p.prompt_ids, p.rejected_ids, p.chosen_ids) for p in pairs]
    pad = ours.tokenizer.pad_token_id
    theirs = (1 - smoothing) * trl_dpo_loss(trainer, pairs, pad) + smoothing * trl_dpo_loss(trainer, swapped, pad)
    theirs.backward()
    assert float(loss.detach()) == pytest.approx(float(theirs.detach()), abs=TOLERANCE)
    assert_same_gradients(gradients(ours.model), gradients(trainer.model))
