"""Micro-batches by tokens (lightning_moe/data/sampler.py): within budget, every conversation once an epoch,
deterministic per seed and epoch, equal counts on every rank, and resumable mid-epoch through StatefulDataLoader."""

from __future__ import annotations

import random

import pytest
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_moe.data.sampler import TokenBudgetBatchSampler

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(20, 512) for _ in range(300)]


@pytest.mark.parametrize("row_length", [512, None], ids=["packed", "padded"])
def test_every_conversation_once_within_the_budget_and_deterministic(row_length):
    s = TokenBudgetBatchSampler(None, LENGTHS, batch_tokens=2048, row_length=row_length, seed=3)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))  # nothing dropped, nothing twice
    for b in batches:
        if row_length:
            assert sum(LENGTHS[i] for i in b) <= 2048
        else:
            assert len(b) * max(LENGTHS[i] for i in b) <= 2048
    assert batches == list(TokenBudgetBatchSampler(None, LENGTHS, 2048, row_length, seed=3))  # same seed, same
    s.sampler.set_epoch(1)
    assert list(s) != batches  # another epoch, another order
    assert len(s) == len(batches)
    one_row = TokenBudgetBatchSampler(None, LENGTHS, batch_tokens=2048, row_length=2048, seed=3)
    assert one_row.fill_rate() > 0.95  # one packed row a micro-batch (document-masked attention): nearly full


def test_ranks_get_the_same_number_of_micro_batches_and_together_all_of_them():
    per_rank = []
    for rank in range(2):
        dist = DistributedSampler(range(len(LENGTHS)), num_replicas=2, rank=rank, shuffle=False)
        per_rank.append(list(TokenBudgetBatchSampler(dist, LENGTHS[:-7], 1500, 512, seed=1)))
    assert len(per_rank[0]) == len(per_rank[1])  # DDP cannot hang at the epoch's end
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(len(LENGTHS) - 7))  # every conversation (a few twice: the padding copies)
    everything, padded = TokenBudgetBatchSampler(None, LENGTHS[:-7], 1500, 512, seed=1).epoch_batches(0)
    assert len(per_rank[0]) + len(per_rank[1]) == len(everything) + (len(everything) % 2)


def test_a_resumed_loader_continues_with_the_next_micro_batch():
    def loader():
        s = TokenBudgetBatchSampler(None, LENGTHS, 2048, 512, seed=5)
        return StatefulDataLoader(list(range(len(LENGTHS))), batch_sampler=s, collate_fn=list)

    full = list(loader())
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
