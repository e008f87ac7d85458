"""PPO with a critic, InstructGPT-style (Ouyang et al. 2022; Huang et al. 2024, "The N+
implementation details of RLHF with PPO").

One step = one rollout of `stage.batch_size` prompts (one sample each). Per-token reward:
-kl_coef x k1 KL(policy || reference) on every response token, plus the sequence score on
the last response token (the EOS when there is one; trl#3750 put it on the pad after it).
GAE (gamma 1, lambda 0.95), advantages whitened (not rewards), clipped value loss, several
epochs of minibatches, one optimizer over policy and critic (N+'s PolicyAndValueWrapper).
Options: PPO-ptx (`stage.ptx_coef`, the SFT loss on reference responses mixed in), and an
EMA of the actor (`stage.ema_decay`, kept in fp32) that evaluation samples from and the checkpoint
keeps (`ema/`); a resumed run continues both. The critic starts from the trained reward model when
the reward is one (`stage.critic_init`), else from the policy's backbone with a fresh scalar head.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from rlhf_exp.data.batching import BatchStream
from rlhf_exp.data.collate import TokenizedSFT, collate_sft
from rlhf_exp.data.formats import data_label
from rlhf_exp.errors import ConfigError
from rlhf_exp.losses import sft_loss
from rlhf_exp.losses.policy import clipped_policy_loss, clipped_value_loss, gae, whiten
from rlhf_exp.models import enable_activation_checkpointing, load_causal_lm
from rlhf_exp.models.peft import is_peft, load_adapter_weights, quantization_config
from rlhf_exp.models.reward import add_reward_adapters, load_reward_model, reward_model_from_causal_lm
from rlhf_exp.ops.logprobs import masked_next_token_logprobs
from rlhf_exp.rollout import Rollout
from rlhf_exp.rollout.batch import pad_rows
from rlhf_exp.runtime import dtype_of
from rlhf_exp.schema import OnlineRLConfig, in_range, key, non_negative, one_of, optional, positive
from rlhf_exp.stages.online import OnlineRLTrainer, Stats, online_memory, policy_stats, uses_reward_model
from rlhf_exp.stages.spec import Activations, HeldModel, compute_bytes, micro_batch, sequence_tokens, StageSpec

EMA = "ema"
CRITIC_INITS = ("auto", "reward_model", "policy")


@dataclass
class PPOConfig(OnlineRLConfig):
    ppo_epochs: int = key(positive())
    gamma: float = key(in_range(0, 1, "(]"))
    lam: float = key(in_range(0, 1))
    whiten_advantages: bool = key()
    vf_coef: float = key(non_negative())
    cliprange_value: float = key(positive())
    ptx_coef: float = key(non_negative())      # > 0: PPO-ptx
    ema_decay: Optional[float] = key(optional(in_range(0, 1, "()"), "no EMA"))
    critic_init: str = key(one_of(CRITIC_INITS))


def critic_source(cfg: DictConfig) -> str:
    """Where the critic starts: "reward_model" (the RM at reward.fn.path) or "policy" (its backbone)."""
    return "reward_model" if uses_reward_model(cfg) and cfg.stage.critic_init in ("auto", "reward_model") else "policy"


class PolicyAndValue(nn.Module):
    """Actor and critic under one optimizer; the checkpoint folder loads as the actor."""

    def __init__(self, policy: nn.Module, critic: nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def activation_checkpointing_enable(self) -> None:
        enable_activation_checkpointing(self.policy)
        enable_activation_checkpointing(self.critic)

    def save_pretrained(self, folder, **kwargs) -> None:
        self.policy.save_pretrained(folder, safe_serialization=True)
        self.critic.save_pretrained(Path(folder) / "critic")


class PPOTrainer(OnlineRLTrainer):
    curve_metrics = ("train/reward_mean", "eval/reward_mean", "train/value_loss")

    def setup_data_and_model(self) -> None:
        policy = self.setup_policy()
        self.model = PolicyAndValue(policy, self.setup_critic(policy))
        self.ema = self.setup_ema(policy) if self.stage.ema_decay else None
        self.ptx_stream = BatchStream(len(self.train_set), self.cfg.seed + 7)

    def check_prompt_data(self) -> None:
        """PPO-ptx learns the data's reference responses: a prompt without one (a prompt-only data set) is
        tokenized as the end token alone, and its ptx term would teach the policy to stop at once."""
        if not self.stage.ptx_coef:
            return
        missing = sum(1 for item in self.train_set if len(item.response_ids) <= 1)
        if missing:
            raise ConfigError("stage.ptx_coef", f"{missing} of {len(self.train_set)} training prompts of "
                              f"{data_label(self.cfg.data)} have no reference response (prompt-only rows), and the "
                              "ptx term on them would maximise log p(end | prompt): set stage.ptx_coef=0, or use "
                              "prompt data with references (prompt + completion)")

    def setup_critic(self, policy) -> nn.Module:
        """From the trained RM or the policy's backbone (`critic_source`); with LoRA, adapters on it.

        Trained in full, its weights are fp32 masters (`trainable`). With LoRA its frozen base is held as
        the policy's is: in the compute dtype, or its linear layers in 4-bit with hardware.load_in_4bit
        (QLoRA); adapters and the value head in fp32."""
        resume = self.stage.get("resume_from")
        saved_critic = Path(resume) / "critic" if resume else None
        loaded_as = dtype_of(self.cfg.model.dtype)
        if saved_critic is not None and saved_critic.is_dir() and not self.lora:
            return self.tools.trainable(load_reward_model(saved_critic, dtype=loaded_as, device=self.device)[0]).train()
        if critic_source(self.cfg) == "reward_model":
            frozen = self.runtime.compute_dtype if self.lora else loaded_as
            critic, rm_tokenizer = load_reward_model(self.cfg.reward.fn.path, dtype=frozen, device=self.device,
                                                     quantization=quantization_config(self.cfg.hardware) if self.lora else None)
            if rm_tokenizer is not None:
                check_same_vocabulary(self.tokenizer, rm_tokenizer)
        elif self.lora:  # a separate frozen base for the critic; the policy's base stays the reference
            critic = reward_model_from_causal_lm(load_causal_lm(
                self.cfg.model, self.cfg.paths.cache_dir, self.tokenizer, self.cfg.hardware, adapters=False))
        else:
            critic = reward_model_from_causal_lm(copy.deepcopy(policy))
        if self.lora:
            add_reward_adapters(critic, self.cfg.hardware, saved_critic)
        return self.tools.trainable(critic).train()

    def setup_ema(self, policy) -> nn.Module:
        """An fp32 copy of the actor (a bf16 EMA cannot move: lerp by 1 - 0.992 is below its resolution);
        a resumed run continues the one its checkpoint saved."""
        ema = copy.deepcopy(policy).float().eval().requires_grad_(False)
        saved = Path(self.stage.resume_from) / EMA if self.stage.get("resume_from") else None
        if saved is not None and saved.is_dir():
            if is_peft(ema):
                load_adapter_weights(ema, saved)
            else:
                from transformers import AutoModelForCausalLM

                state = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).state_dict()
                ema.load_state_dict(state)
        return ema

    def merged_model(self) -> nn.Module:
        return self.tools.merge_policy(self.model.policy)

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
        """Critic values [B, R], aligned with the response log-probs."""
        batch = collate_sft(items, self.tokenizer.pad_token_id)
        with self.runtime.autocast():
            return self.model.critic.response_values(
                batch["input_ids"].to(self.device), torch.tensor([len(x.prompt_ids) for x in items]),
                torch.tensor([len(x.response_ids) for x in items]))

    @torch.no_grad()
    def rollout_values(self, items: list[TokenizedSFT]) -> torch.Tensor:
        """[B, R] critic values at sampling time (zero rows for empty responses)."""
        rows = [torch.zeros(0, device=self.device)] * len(items)
        kept = [k for k, item in enumerate(items) if item.response_ids]
        for start in range(0, len(kept), self.tools.micro_batch_size()):
            chunk = kept[start:start + self.tools.micro_batch_size()]
            for k, row in zip(chunk, self.values([items[k] for k in chunk])):
                rows[k] = row[: len(items[k].response_ids)].float()
        return pad_rows(rows, max((len(x.response_ids) for x in items), default=0), self.device)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        stage, times = self.stage, {}
        start = time.perf_counter()
        indices = self.batches.take(stage.batch_size)
        prompt_ids = [self.train_set[i].prompt_ids for i in indices]
        responses = self.sample(prompt_ids, 1)
        times["generation"] = time.perf_counter() - start

        t = time.perf_counter()
        scores = self.score([self.tokenizer.decode(p) for p in prompt_ids], responses,
                            [self.train_examples[i].row for i in indices])
        rewards = scores.rewards
        times["scoring"] = time.perf_counter() - t

        t = time.perf_counter()
        rollout = self.make_rollout([TokenizedSFT(p, r) for p, r in zip(prompt_ids, responses)])
        mask = rollout.mask
        with torch.no_grad():
            rollout.old_values = self.rollout_values(rollout.items) * mask
            kl, token_rewards = self.token_rewards(rollout, rewards)
            advantages, rollout.returns = gae(token_rewards, rollout.old_values, mask, stage.gamma, stage.lam)
            rollout.advantages = whiten(advantages, mask) if stage.whiten_advantages else advantages
        times["reference_and_values"] = time.perf_counter() - t

        t = time.perf_counter()
        stats = self.update(rollout, stage.ppo_epochs)
        times["update"] = time.perf_counter() - t
        return {**self.rollout_metrics(scores, responses), **stats,
                "train/non_score_reward": float((-stage.kl_coef * kl).sum(-1).mean()),
                **{f"time/{k}_s": v for k, v in times.items()}, "time/step_s": time.perf_counter() - start}

    def minibatch_loss(self, micro: Rollout, size: dict[str, float]) -> tuple[torch.Tensor, Stats]:
        stage = self.stage
        logps, mask, entropy = self.logprobs(self.policy, micro.items, with_entropy=True)
        values = self.values(micro.items)
        pg_loss, clipped = clipped_policy_loss(logps, micro.old_logps, micro.advantages, stage.clip_ratio,
                                               stage.dual_clip_c)
        vf_loss = clipped_value_loss(values, micro.old_values, micro.returns, stage.cliprange_value)
        loss = ((pg_loss + stage.vf_coef * vf_loss) * mask).sum() / size["tokens"]
        stats = policy_stats(logps, micro.old_logps, micro.ref_logps, mask, clipped, entropy)
        tokens = float(mask.sum())
        with torch.no_grad():
            value_clipped = ((values - micro.old_values).abs() > stage.cliprange_value).float()
            stats.update(policy_loss=(float((pg_loss * mask).sum()), tokens),
                         value_loss=(float((vf_loss * mask).sum()), tokens),
                         value_clip_fraction=(float((value_clipped * mask).sum()), tokens))
        if stage.ptx_coef:
            ptx = self.ptx_loss(len(micro))
            loss = loss + stage.ptx_coef * ptx * len(micro) / size["sequences"]
            stats["ptx_loss"] = (ptx.item() * len(micro), float(len(micro)))
        return loss, stats

    def ptx_loss(self, count: int) -> torch.Tensor:
        """InstructGPT's PPO-ptx: the SFT loss on `count` reference examples of the prompt data."""
        batch = collate_sft([self.train_set[i] for i in self.ptx_stream.take(count)], self.tokenizer.pad_token_id)
        with self.runtime.autocast():
            logps = masked_next_token_logprobs(self.policy, batch["input_ids"].to(self.device), None,
                                               batch["response_mask"].to(self.device))
        mask = batch["response_mask"][:, 1:].to(self.device, logps.dtype)
        return sft_loss(logps, mask, mask.sum())

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.ema is None:
            return
        for ema_param, param in zip(self.ema.parameters(), self.policy.parameters()):
            ema_param.lerp_(param.detach().float(), 1.0 - self.stage.ema_decay)

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict:
        return {"ptx_stream": self.ptx_stream.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "ptx_stream" in state:
            self.ptx_stream.load_state_dict(state["ptx_stream"])

    def write_extra_files(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.save_pretrained(folder / EMA, safe_serialization=True)


def check_same_vocabulary(policy_tokenizer, rm_tokenizer) -> None:
    """The critic reads the policy's token ids: a critic started from a reward model needs every policy token to
    have the same id in the RM's vocabulary (the RM's own added pad token aside), else it is fed other tokens."""
    rm_vocab = rm_tokenizer.get_vocab()
    differ = [token for token, index in policy_tokenizer.get_vocab().items() if rm_vocab.get(token) != index]
    if differ:
        raise ConfigError("stage.critic_init", f"the reward model at reward.fn.path has another vocabulary than the "
                          f"policy ({len(differ)} of its tokens have other ids, e.g. {differ[0]!r}): a critic started "
                          "from it would read the policy's token ids as other tokens; use stage.critic_init=policy "
                          "(the reward model still scores, with its own tokenizer)")


def checks(cfg: DictConfig) -> None:
    if cfg.stage.ema_decay and cfg.hardware.get("load_in_4bit"):
        raise ConfigError("stage.ema_decay", "an EMA copy of a 4-bit policy is not supported; set it to null")
    if cfg.stage.critic_init == "reward_model" and critic_source(cfg) != "reward_model":
        raise ConfigError("stage.critic_init", "reward_model needs a trained reward model: "
                          "reward=reward_model reward.fn.path=<rm checkpoint>")


def memory(cfg: DictConfig):
    micro = micro_batch(cfg, "ppo")
    prompt, _ = sequence_tokens(cfg)
    tokens = prompt + int(cfg.stage.generation.max_new_tokens)
    from_rm = critic_source(cfg) == "reward_model"
    # as setup_critic loads it: trained in full (fp32 masters), or a frozen base in the compute dtype or 4-bit
    critic = HeldModel("critic", shape="reward" if from_rm else "policy", trains=True, reward_head=True,
                       weight_bytes=compute_bytes(cfg) if from_rm and cfg.hardware.lora.enabled else None)
    extra = [critic] + ([HeldModel("EMA of the actor", weight_bytes=4)] if cfg.stage.ema_decay else [])
    memory = online_memory(cfg, "ppo", cfg.stage.batch_size, extra, [Activations("critic", critic.shape, micro, tokens, 0)])
    memory.notes.append(f"critic: starts from the {'reward model (its shape)' if from_rm else 'policy (its shape)'} "
                        f"(stage.critic_init={cfg.stage.critic_init}) and trains in full, with a value head")
    return memory


STAGE = StageSpec(name="ppo", config=PPOConfig, trainer=PPOTrainer, micro_batch="ppo", memory=memory,
                  micro_batch_default=8, uses_reward=True, batch_key="minibatch_size", checks=checks,
                  resume_fixed=("stage", "model", "data", "seed", "reward"),
                  objective=("eval/reward_mean", "max"),
                  report_metrics=("eval/reward_mean", "eval/kl_k3", "eval/response_length"),
                  tradeoff=("eval/kl_k3", "eval/reward_mean"))
