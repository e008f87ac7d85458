"""The typed rollout GRPO and PPO train on: what was sampled and everything the update needs, aligned to
the responses. Row b, column j is response token j of sequence b; tensors are [B, R] (R: the longest
response), zero past each response's end, on the run's device."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Sequence

import torch

from rlhf_exp.data.collate import TokenizedSFT


@dataclass
class Rollout:
    items: list[TokenizedSFT]             # prompt and response ids; an empty response stays (its group used it)
    mask: torch.Tensor                    # [B, R] 1 on response tokens
    ref_logps: torch.Tensor | None        # [B, R] under the frozen reference; None: no reference (kl_coef=0)
    advantages: torch.Tensor              # [B, R] (GRPO: the sequence's advantage on each of its tokens)
    old_logps: torch.Tensor | None = None   # [B, R] under the sampling policy; None: the update's own first pass
    old_values: torch.Tensor | None = None  # [B, R] critic values at sampling (PPO)
    returns: torch.Tensor | None = None     # [B, R] value targets (PPO)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def tokens(self) -> float:
        return float(self.mask.sum())

    def select(self, rows: Sequence[int]) -> "Rollout":
        """The given rows that have a response, trimmed to their longest response: a minibatch or micro batch."""
        rows = [r for r in rows if self.items[r].response_ids]
        width = max((len(self.items[r].response_ids) for r in rows), default=0)
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        picked = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index, :width])
                  for f in fields(self) if f.name != "items"}
        return Rollout(items=[self.items[r] for r in rows], **picked)

    def chunks(self, size: int) -> Iterator["Rollout"]:
        for start in range(0, len(self), size):
            yield self.select(range(start, min(start + size, len(self))))


def response_mask(items: Sequence[TokenizedSFT], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, R] 1 on each row's response tokens."""
    lengths = torch.tensor([len(x.response_ids) for x in items], device=device)
    width = int(lengths.max()) if len(items) else 0
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


def pad_rows(rows: Sequence[torch.Tensor], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """1-D rows (possibly empty) into [len(rows), width], zero-padded on the right."""
    out = torch.zeros(len(rows), width, device=device)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
