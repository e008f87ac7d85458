"""Which examples a step sees: a resumable shuffled stream, chunks, and length order."""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import torch

from rlhf_exp.errors import ConfigError

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def length_order(items: Sequence[T], length) -> list[int]:
    """Indices of `items` from shortest to longest: chunks of similar length waste less padding.
    Scores computed in this order go back with `unsorted[order] = scores`."""
    return sorted(range(len(items)), key=lambda i: length(items[i]))


def scores_in_length_order(items: Sequence[T], length, score_chunk, size: int, wrap=lambda c: c) -> torch.Tensor:
    """`score_chunk(list of items) -> tensor [n, ...]` over chunks of `size` items of similar length (less
    padding); rows come back in the items' order. `wrap`: around the list of chunks (a progress bar)."""
    order = length_order(items, length)
    parts = [score_chunk([items[i] for i in chunk]).float().cpu() for chunk in wrap(list(chunks(order, size)))]
    if not parts:
        return torch.zeros(0)
    stacked = torch.cat(parts)
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out


class BatchStream:
    """An endless stream of example indices, reshuffled each epoch from (seed, epoch).

    Its position (epoch, cursor) is part of the checkpoint, so a resumed run sees exactly the
    examples the uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError("no training examples")
        self.size, self.seed, self.epoch, self.cursor = size, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int], other_size_allowed: bool = False) -> None:
        """The checkpoint's position; on a training set of another size (other_size_allowed: the user said
        data.allow_changed_on_resume=true) the same epoch goes on from the same share of it."""
        if state["size"] != self.size and not other_size_allowed:
            raise ConfigError("stage.resume_from", f"checkpoint was made on {state['size']} training examples, "
                              f"this run has {self.size}: the data config differs")
        self.epoch, self.cursor = state["epoch"], state["cursor"] * self.size // state["size"]
        self._order = self._permutation()
