"""PPO with a critic, InstructGPT-style (Ouyang et al. 2022; Huang et al. 2024, "The N+
implementation details of RLHF with PPO").

One step = one rollout of `stage.batch_size` prompts (one sample each). Per-token reward:
-kl_coef x k1 KL(policy || reference) on every response token, plus the sequence score on
the last response token (the EOS when there is one; trl#3750 put it on the pad after it).
GAE (gamma 1, lambda 0.95), advantages whitened (not rewards), clipped value loss, several
epochs of minibatches, one optimizer over policy and critic (N+'s PolicyAndValueWrapper).
Options: PPO-ptx (`stage.ptx_coef`, the SFT loss on reference responses mixed in), and an
EMA of the actor (`stage.ema_decay`) that evaluation samples from and the checkpoint keeps.
The critic starts from the trained reward model when `reward=reward_model`, else from the
policy's backbone with a fresh scalar head.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from rlhf_exp.data.collate import TokenizedSFT, collate_sft
from rlhf_exp.losses import sft_loss
from rlhf_exp.losses.policy import (clipped_policy_loss, clipped_value_loss, gae, kl_penalty, masked_mean,
                                    per_token_rewards, whiten)
from rlhf_exp.errors import ConfigError
from rlhf_exp.models import load_causal_lm
from rlhf_exp.models.peft import add_reward_adapters
from rlhf_exp.models.reward import load_reward_model, reward_model_from_causal_lm
from rlhf_exp.ops.logprobs import masked_next_token_logprobs
from rlhf_exp.stages.base import chunks
from rlhf_exp.stages.online import OnlineRLTrainer, pad_rows


class PolicyAndValue(nn.Module):
    """Actor and critic under one optimizer; the checkpoint folder loads as the actor."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.policy.gradient_checkpointing_enable(**kwargs)
        self.critic.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, folder, **kwargs) -> None:
        self.policy.save_pretrained(folder, safe_serialization=True)
        self.critic.save_pretrained(Path(folder) / "critic")


class PPOTrainer(OnlineRLTrainer):
    curve_metrics = ("train/reward_mean", "eval/reward_mean", "train/value_loss")

    def setup_data_and_model(self) -> None:
        if self.stage.ema_decay and self.cfg.hardware.get("load_in_4bit"):
            raise ConfigError("stage.ema_decay", "an EMA copy of a 4-bit policy is not supported; set it to null")
        policy = self.setup_policy()
        self.model = PolicyAndValue(policy, self.setup_critic(policy))
        self.ema = copy.deepcopy(policy).eval().requires_grad_(False) if self.stage.ema_decay else None

    def setup_critic(self, policy) -> nn.Module:
        """From the trained RM (reward=reward_model) or the policy's backbone; with LoRA, adapters on it."""
        resume = self.stage.get("resume_from")
        saved_critic = Path(resume) / "critic" if resume else None
        from_rm = self.cfg.reward.fn.get("path") and self.stage.critic_init in ("auto", "reward_model")
        if saved_critic is not None and saved_critic.is_dir() and not self.lora:
            return load_reward_model(saved_critic, device=self.device)[0].train()
        if from_rm:
            critic = load_reward_model(self.cfg.reward.fn.path, device=self.device)[0]
        elif self.lora:  # a separate frozen base for the critic; the policy's base stays the reference
            critic = reward_model_from_causal_lm(load_causal_lm(
                self.cfg.model, self.cfg.paths.cache_dir, self.tokenizer, self.cfg.hardware, adapters=False))
        else:
            critic = reward_model_from_causal_lm(copy.deepcopy(policy))
        if self.lora:
            add_reward_adapters(critic, self.cfg.hardware, saved_critic)
        return critic.train()

    def merged_model(self) -> nn.Module:
        return self.merge_policy(self.model.policy)

    @property
    def policy(self):
        return self.model.policy

    @property
    def eval_policy(self):
        return self.ema if self.ema is not None else self.model.policy

    def total_optimizer_steps(self) -> int:
        per_rollout = -(-self.stage.batch_size // self.stage.minibatch_size)
        return self.stage.max_steps * self.stage.ppo_epochs * per_rollout

    def values(self, items: list[TokenizedSFT]) -> torch.Tensor:
        batch = collate_sft(items, self.tokenizer.pad_token_id)
        with self.runtime.autocast():
            return self.model.critic.response_values(
                batch["input_ids"].to(self.device), torch.tensor([len(x.prompt_ids) for x in items]),
                torch.tensor([len(x.response_ids) for x in items]))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        stage, times = self.stage, {}
        start = time.perf_counter()
        prompt_ids = [self.train_set[i].prompt_ids for i in self.batches.take(stage.batch_size)]
        responses = self.sample(prompt_ids, 1)
        times["generation"] = time.perf_counter() - start

        t = time.perf_counter()
        rewards, raw, has_eos, _ = self.score([self.tokenizer.decode(p) for p in prompt_ids], responses)
        times["scoring"] = time.perf_counter() - t

        t = time.perf_counter()
        keep = [k for k, r in enumerate(responses) if r]
        items = [TokenizedSFT(prompt_ids[k], responses[k]) for k in keep]
        width = max(len(x.response_ids) for x in items)
        old_logps = pad_rows(self.score_rollout(self.policy, items), width)
        ref_logps = pad_rows(self.score_rollout(self.reference, items), width)
        mask = pad_rows([torch.ones(len(x.response_ids)) for x in items], width).to(old_logps.device)
        with torch.no_grad():
            old_values = pad_rows([row for c in chunks(items, self.micro_batch_size()) for row in self.values(list(c))],
                                  width) * mask
            kl = kl_penalty(old_logps, ref_logps, "k1") * mask
            scores = rewards[keep].to(kl.device)
            token_rewards = per_token_rewards(scores, kl, mask, stage.kl_coef)
            advantages, returns = gae(token_rewards, old_values, mask, stage.gamma, stage.lam)
            if stage.whiten_advantages:
                advantages = whiten(advantages, mask)
        times["reference_and_values"] = time.perf_counter() - t

        t = time.perf_counter()
        stats = self.update(items, old_logps, old_values, advantages, returns, mask)
        times["update"] = time.perf_counter() - t
        lengths = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        return {"train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()),
                "train/score_mean": float(raw.mean()), "train/eos_rate": sum(has_eos) / len(has_eos),
                "train/response_length": float(lengths.mean()),
                "train/kl": float((kl.sum(-1)).mean()), "train/non_score_reward": float(token_rewards.sum(-1).mean()
                                                                                        - scores.mean()),
                **stats, **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": time.perf_counter() - start}

    def update(self, items, old_logps, old_values, advantages, returns, mask) -> dict[str, float]:
        stage = self.stage
        sums = {k: [] for k in ("policy_loss", "value_loss", "ptx_loss", "entropy", "clip_fraction",
                                "value_clip_fraction", "approx_kl", "ratio_mean", "grad_norm")}
        first = {}
        for epoch in range(stage.ppo_epochs):
            for minibatch in chunks(torch.randperm(len(items)).tolist(), stage.minibatch_size):
                tokens = float(mask[minibatch].sum())
                for micro in chunks(minibatch, self.micro_batch_size()):
                    micro = list(micro)
                    logps, m, entropy = self.logprobs(self.policy, [items[k] for k in micro], with_entropy=True)
                    width = logps.shape[1]
                    old, adv, ret = old_logps[micro, :width], advantages[micro, :width], returns[micro, :width]
                    values = self.values([items[k] for k in micro])
                    pg_loss, clipped = clipped_policy_loss(logps, old, adv, stage.clip_ratio, stage.dual_clip_c)
                    vf_loss = clipped_value_loss(values, old_values[micro, :width], ret, stage.cliprange_value)
                    loss = ((pg_loss + stage.vf_coef * vf_loss) * m).sum() / tokens
                    ptx = self.ptx_loss(len(micro)) if stage.ptx_coef else None
                    if ptx is not None:
                        loss = loss + stage.ptx_coef * ptx * len(micro) / len(minibatch)
                    self.backward(loss)
                    with torch.no_grad():
                        log_ratio = (logps - old) * m
                        sums["policy_loss"].append(float(masked_mean(pg_loss, m)))
                        sums["value_loss"].append(float(masked_mean(vf_loss, m)))
                        sums["ptx_loss"].append(float(ptx) if ptx is not None else 0.0)
                        sums["entropy"].append(float(masked_mean(entropy, m)))
                        sums["clip_fraction"].append(float(masked_mean(clipped.float(), m)))
                        value_clipped = (values - old_values[micro, :width]).abs() > stage.cliprange_value
                        sums["value_clip_fraction"].append(float(masked_mean(value_clipped.float(), m)))
                        sums["approx_kl"].append(float(masked_mean(0.5 * log_ratio ** 2, m)))
                        sums["ratio_mean"].append(float(masked_mean(torch.exp(log_ratio), m)))
                    if not first:  # sanity (N+): before any update the ratio is 1 and approx KL 0
                        first = {"train/first_minibatch_ratio": sums["ratio_mean"][-1],
                                 "train/first_minibatch_approx_kl": sums["approx_kl"][-1]}
                sums["grad_norm"].append(self.optimizer_step()["train/grad_norm"])
                self.update_ema()
        out = {f"train/{k}": sum(v) / len(v) for k, v in sums.items() if v}
        out["train/optimizer_steps"] = len(sums["grad_norm"])
        return {**out, **first}

    def ptx_loss(self, count: int) -> torch.Tensor:
        """InstructGPT's PPO-ptx: the SFT loss on `count` reference examples of the prompt data."""
        if not hasattr(self, "_ptx_stream"):
            from rlhf_exp.stages.base import BatchStream

            self._ptx_stream = BatchStream(len(self.train_set), self.cfg.seed + 7)
        batch = collate_sft([self.train_set[i] for i in self._ptx_stream.take(count)], self.tokenizer.pad_token_id)
        with self.runtime.autocast():
            logps = masked_next_token_logprobs(self.policy, batch["input_ids"].to(self.device), None,
                                               batch["response_mask"].to(self.device))
        mask = batch["response_mask"][:, 1:].to(self.device, logps.dtype)
        return sft_loss(logps, mask, mask.sum())

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        for ema_param, param in zip(self.ema.parameters(), self.policy.parameters()):
            ema_param.lerp_(param.detach(), 1.0 - self.stage.ema_decay)

    def save_checkpoint(self, folder: Path) -> Path:
        folder = super().save_checkpoint(folder)
        if self.ema is not None:
            self.ema.save_pretrained(folder / "ema", safe_serialization=True)
        return folder
