"""What GRPO and PPO share: prompts, a frozen reference, the reward source, sampling,
scoring, response log-probs and the held-out evaluation."""

from __future__ import annotations

import torch

from rlhf_exp.data.collate import TokenizedSFT, collate_sft
from rlhf_exp.factory import build
from rlhf_exp.losses.policy import kl_penalty
from rlhf_exp.ops.logprobs import response_logprobs
from rlhf_exp.rewards import score_completions
from rlhf_exp.rollout import generate
from rlhf_exp.stages.base import Trainer, chunks


class OnlineRLTrainer(Trainer):
    curve_metrics = ("train/reward_mean", "eval/reward_mean")

    def setup_policy(self):
        """Prompts (from the data's SFT examples), the policy, its frozen reference and the reward source.

        Returns the policy; the stage decides what `self.model` (the optimized module) holds.
        """
        self.prepare_data("sft")
        policy = self.load_policy()
        self.reference = self.frozen_reference(policy)  # LoRA: the policy with adapters disabled
        self.reward_fn = build(self.cfg.reward.fn, "reward.fn")
        return policy

    @property
    def policy(self):
        return self.model

    @property
    def eval_policy(self):
        """The model evaluation samples from (PPO: the EMA of the actor when kept)."""
        return self.policy

    def sample(self, prompt_ids: list[list[int]], samples: int, model=None) -> list[list[int]]:
        gen = self.stage.generation
        repeated = [ids for ids in prompt_ids for _ in range(samples)]  # a prompt's samples are adjacent
        return generate(model or self.policy, self.tokenizer, repeated, max_new_tokens=gen.max_new_tokens,
                        temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                        autocast=self.runtime.autocast())

    def score(self, prompts: list[str], responses: list[list[int]]):
        eos = self.tokenizer.eos_token_id
        has_eos = [bool(r) and r[-1] == eos for r in responses]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        rewards, raw = score_completions(self.reward_fn, prompts, texts, responses, has_eos,
                                         self.cfg.reward.missing_eos_score)
        return rewards, raw, has_eos, texts

    def logprobs(self, model, items: list[TokenizedSFT], with_entropy: bool = False):
        batch = collate_sft(items, self.tokenizer.pad_token_id)
        prompt_lengths = torch.tensor([len(x.prompt_ids) for x in items])
        response_lengths = torch.tensor([len(x.response_ids) for x in items])
        with self.runtime.autocast():
            return response_logprobs(model, batch["input_ids"].to(self.device), prompt_lengths, response_lengths,
                                     self.stage.generation.temperature, with_entropy)

    @torch.no_grad()
    def score_rollout(self, model, items: list[TokenizedSFT]) -> list[torch.Tensor]:
        """Per-sequence response log-probs (1-D tensors) under `model`, without gradients."""
        out = []
        for chunk in chunks(items, self.micro_batch_size()):
            logps, mask, _ = self.logprobs(model, list(chunk))
            out += [row[: int(m.sum())].float() for row, m in zip(logps, mask)]
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward of one sample per held-out prompt (seeded, not moving the training RNG)."""
        prompt_ids = [x.prompt_ids for x in self.val_set]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)  # the same draws at every evaluation
            responses = self.sample(prompt_ids, 1, self.eval_policy)
        prompts = [ex.prompt for ex in self.val_examples]
        rewards, raw, has_eos, texts = self.score(prompts, responses)
        ref_logps = self.score_rollout(self.reference, [TokenizedSFT(p, r) for p, r in zip(prompt_ids, responses) if r])
        pol_logps = self.score_rollout(self.eval_policy, [TokenizedSFT(p, r) for p, r in zip(prompt_ids, responses) if r])
        kl = torch.cat([kl_penalty(a, b, "k3") for a, b in zip(pol_logps, ref_logps)]) if pol_logps else torch.zeros(1)
        n = min(self.stage.get("num_samples") or 0, len(texts))
        if n:
            self.tracker.log_table([{"step": self.step, "prompt": prompts[i][-600:], "generation": texts[i],
                                     "reward": float(rewards[i]), "ends_with_eos": has_eos[i],
                                     "length": len(responses[i])} for i in range(n)],
                                   f"samples/step_{self.step:06d}.json")
        return {"eval/reward_mean": float(rewards.mean()), "eval/score_mean": float(raw.mean()),
                "eval/eos_rate": sum(has_eos) / len(has_eos),
                "eval/response_length": sum(len(r) for r in responses) / len(responses),
                "eval/kl_to_reference": float(kl.mean())}



def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, device=rows[0].device if rows else "cpu")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
