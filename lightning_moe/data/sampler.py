"""Micro-batches by tokens (`data.batch_tokens`): each micro-batch is filled from the shuffled stream of conversations
up to a token budget, instead of a fixed count of conversations (axolotl's multipack idea, written for this loader).

- Per epoch, the conversations are shuffled (seed + epoch), cut into windows of `window`, and each window is packed
  best-fit, longest first, into micro-batches: with packing, rows of `row_length` tokens (budget // row_length rows
  a micro-batch); padded, a micro-batch costs conversations x its longest. The micro-batches are then shuffled.
  Deterministic: the same seed, epoch and lengths give the same micro-batches on every machine and rank.
- Every data-parallel rank packs the whole epoch the same way and takes every world-th micro-batch; the count is
  padded to a multiple of the world size with copies of the first micro-batches (counted in `padded_batches`), so
  every rank runs the same number of micro-batches and DDP cannot hang at an epoch's end. Under DDP Lightning
  injects a DistributedSampler as `sampler`: only its rank and world size are read.
- Resumable mid-epoch: `state_dict` holds the epoch and the micro-batches already yielded (StatefulDataLoader saves
  it in checkpoints), so a resumed run continues with the next micro-batch.
"""

from __future__ import annotations

import random

from torch.utils.data import BatchSampler, DistributedSampler


class _Epoch:
    """What Lightning calls set_epoch on (dataloader.batch_sampler.sampler) when no DistributedSampler is injected."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TokenBudgetBatchSampler(BatchSampler):
    """A BatchSampler by its API (Lightning re-creates it under DDP with a DistributedSampler as `sampler`), whose
    batches are token budgets, not a count."""

    def __init__(self, sampler=None, lengths: list[int] = (), batch_tokens: int = 8192, row_length: int | None = None,
                 seed: int = 0, shuffle: bool = True, window: int = 4096):
        self.sampler = sampler if sampler is not None else _Epoch()
        self.batch_size, self.drop_last = None, False  # BatchSampler's attributes: no fixed size, nothing dropped
        self.lengths, self.batch_tokens, self.row_length = list(lengths), batch_tokens, row_length
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self._resume: dict | None = None
        self._state = {"epoch": 0, "yielded": 0}
        self._cache: tuple[tuple[int, int], list[list[int]], int] | None = None

    def _world(self) -> tuple[int, int]:
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.num_replicas, self.sampler.rank
        return 1, 0

    def _best(self, packed: list[dict], n: int) -> tuple[dict | None, int | None]:
        """The open micro-batch (and, packed, the row) where `n` tokens fit most tightly: best fit, which wastes
        less of a row than first fit."""
        best, best_row, best_left = None, None, None
        for batch in packed:
            if self.row_length:
                rows = [*batch["rows"], 0] if len(batch["rows"]) < self.batch_tokens // self.row_length else batch["rows"]
                for r, used in enumerate(rows):
                    left = self.row_length - used - n
                    if left >= 0 and (best_left is None or left < best_left):
                        best, best_row, best_left = batch, r, left
            else:
                left = self.batch_tokens - (len(batch["ids"]) + 1) * max(batch["longest"], n)
                if left >= 0 and (best_left is None or left < best_left):
                    best, best_left = batch, left
        return best, best_row

    @staticmethod
    def _place(batch: dict, i: int, n: int, row: int | None) -> None:
        batch["ids"].append(i)
        batch["longest"] = max(batch["longest"], n)
        if row is not None:
            if row == len(batch["rows"]):
                batch["rows"].append(n)
            else:
                batch["rows"][row] += n

    def epoch_batches(self, epoch: int) -> tuple[list[list[int]], int]:
        """(every rank's micro-batches of this epoch, how many were copies added to even them out)."""
        world, _ = self._world()
        if self._cache and self._cache[0] == (epoch, world):  # keyed by world too: Lightning sets the sampler late
            return self._cache[1], self._cache[2]
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            rng.shuffle(order)
        batches: list[list[int]] = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start:start + self.window], key=lambda i: -self.lengths[i])
            packed: list[dict] = []
            for i in window:
                n = self.lengths[i]
                batch, row = self._best(packed, n)
                if batch is None:
                    batch, row = {"ids": [], "rows": [], "longest": 0}, 0 if self.row_length else None
                    packed.append(batch)
                self._place(batch, i, n, row)
            part = [b["ids"] for b in packed]
            if self.shuffle:
                rng.shuffle(part)
            batches += part
        padded = -len(batches) % world
        batches += batches[:padded]
        self._cache = ((epoch, world), batches, padded)
        return batches, padded

    def __iter__(self):
        world, rank = self._world()
        if self._resume is not None:
            epoch, skip = self._resume["epoch"], self._resume["yielded"]
            self._resume = None
        else:
            epoch, skip = getattr(self.sampler, "epoch", 0), 0
        mine = self.epoch_batches(epoch)[0][rank::world]
        for k in range(skip, len(mine)):
            self._state = {"epoch": epoch, "yielded": k + 1}
            yield mine[k]

    def __len__(self) -> int:
        world, _ = self._world()
        return len(self.epoch_batches(getattr(self.sampler, "epoch", 0))[0]) // world

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        self._state = dict(state)

    def fill_rate(self, epoch: int = 0) -> float:
        """Real tokens over the token budget, on average over the epoch's micro-batches."""
        batches, _ = self.epoch_batches(epoch)
        return sum(self.lengths[i] for b in batches for i in b) / max(len(batches) * self.batch_tokens, 1)
