"""Deterministic batches: a seeded order per epoch and a position that checkpoints can restore."""

from __future__ import annotations

import random
from typing import Any, Iterator, TypeVar

import torch

from lowmem_tune.data.tokenize import IGNORE_INDEX

T = TypeVar("T")


def split_heldout(items: list[T], heldout: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out): `heldout` below 1 is a share, 1 and above a count."""
    count = int(round(heldout * len(items))) if heldout < 1 else int(heldout)
    count = min(count, len(items) - 1)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def collate(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; padding is masked out of attention and of the loss."""
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchStream:
    """Endless micro-batches over `items`, reshuffled each epoch from (seed, epoch).

    A batch never straddles epochs: the tail smaller than a batch is skipped, so every batch has
    the same size. The state is two integers.
    """

    def __init__(self, items: list[dict[str, list[int]]], micro_batch_size: int, seed: int, shuffle: bool,
                 pad_id: int) -> None:
        if len(items) < micro_batch_size:
            raise ValueError(f"{len(items)} training examples are fewer than one micro batch ({micro_batch_size})")
        self.items = items
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.epoch = 0
        self.position = 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.items)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=generator).tolist()

    @property
    def batches_per_epoch(self) -> int:
        return len(self.items) // self.micro_batch_size

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.position / (self.batches_per_epoch * self.micro_batch_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position + self.micro_batch_size > len(self.items):
            self.epoch += 1
            self.position = 0
            self._order = self._order_for(self.epoch)
        indices = self._order[self.position: self.position + self.micro_batch_size]
        self.position += self.micro_batch_size
        return collate([self.items[i] for i in indices], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._order_for(self.epoch)


def eval_batches(items: list[dict[str, list[int]]], batch_size: int, pad_id: int,
                 max_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, min(len(items), batch_size * max_batches), batch_size):
        yield collate(items[start: start + batch_size], pad_id)


def calibration_sequences(items: list[dict[str, list[int]]], n_sequences: int, seq_len: int) -> Iterator[torch.Tensor]:
    """Up to `n_sequences` rows of `seq_len` tokens cut from the concatenated training items."""
    stream = [tok for item in items for tok in item["input_ids"]]
    for i in range(min(n_sequences, len(stream) // seq_len)):
        yield torch.tensor(stream[i * seq_len: (i + 1) * seq_len]).unsqueeze(0)
