"""Collate rendered conversations into padded or padding-free (packed) micro-batches.

Both forms carry what the rest of the pipeline needs beyond input_ids/labels:
  token_domain  (B, S) domain index of each token's conversation, -1 for unlabelled or padding tokens
  segment_ids   (B, S) index of each token's conversation in the micro-batch, -1 for padding
  unit_ids      (B, S) the routing unit of each token, -1 for padding: a conversation (moe.routing_level=sequence)
                or one assistant turn and the tokens before it (turn); see `routing_units`
  unit_spans    (U, 3) each unit's pooled tokens as (row, start, end): what its router decision averages
  unit_domain, unit_example  (U,) each unit's domain and conversation
  example_domain (num_examples,) domain index of each conversation
  num_tokens    real (non-padding) tokens, for throughput and MFU
  num_examples  conversations in the micro-batch
  attn_sq       sum of squared conversation lengths, for the attention term of the FLOP count
Packed form: the conversations back to back in rows of at most `row_length` tokens (first fit, longest first),
with position_ids restarting at 0 for each; transformers turns that into a block-diagonal causal mask, so
attention never crosses conversations. A row shorter than the widest is filled with padding that forms its own
segment (position_ids from 0, labels ignored, segment -1), so no attention_mask is needed. Rows of max_length,
not one row of the whole micro-batch: SDPA computes the masked scores of a row in full, so 4 conversations of
2048 tokens in one row would cost 4x the attention of 4 rows; and rows that each hold one conversation and no
padding need no mask at all (the causal kernel, as unpacked). Packed batches also carry each conversation's and
padding segment's span over the rows laid end to end (`cu_seq_lens_q` ...: `span_boundaries`), which
model.attn_implementation=varlen runs as FlashAttention spans instead of a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_moe.data.chat import IGNORE_INDEX


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of trained tokens: one per assistant turn (content and terminator)."""
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def routing_units(labels: list[int], level: str, pooling: str = "mean") -> tuple[list[int], list[tuple[int, int]]]:
    """A conversation's routing units: (the unit of each token, each unit's pooled [start, end)), positions relative
    to the conversation. Causal by construction: a unit's span ends where its assistant turn's first trained token
    begins, so no token is routed by anything that comes after the turn it belongs to.

    sequence: one unit, pooling the opening prompt (the tokens before the first assistant turn).
    turn: one unit per assistant turn k, holding the turn and the tokens before it since turn k-1; it pools
      everything before the turn (pooling=mean) or only since the previous assistant turn (pooling=last_turn: the
      last user message and the headers). Generation decides the same way: the reply is the last turn.
    """
    runs = trained_runs(labels) or [(len(labels), len(labels))]
    if level != "turn":
        return [0] * len(labels), [(0, max(runs[0][0], 1))]
    spans, units = [], []
    for k, (start, _) in enumerate(runs):
        begin = runs[k - 1][1] if pooling == "last_turn" and k else 0
        spans.append((begin, max(start, begin + 1)))
    k = 0
    for t in range(len(labels)):
        while k < len(runs) - 1 and t >= runs[k][1]:
            k += 1
        units.append(k)
    return units, spans


@dataclass
class ChatCollator:
    pad_token_id: int
    packing: bool = False
    pad_to_multiple_of: int = 1
    row_length: int | None = None  # packing: the most tokens in a row (data.max_length); None: one row
    routing_level: str = "sequence"  # token-level routing ignores the units; sequence / turn (routing_units)
    pooling: str = "mean"
    capacity: int | None = None  # tokens a micro-batch can hold (data.batch_tokens, or batch_size x max_length)

    def _units(self, features: list[dict]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        return [routing_units(f["labels"], self.routing_level, self.pooling) for f in features]

    @staticmethod
    def _unit_tables(features: list[dict], per_example: list, placed: list[tuple[int, int]]) -> dict:
        """(row, offset) of each conversation -> the units' spans, domains and conversations, numbered in order."""
        spans, domains, examples, first = [], [], [], []
        for i, ((_, unit_spans), (row, offset)) in enumerate(zip(per_example, placed)):
            first.append(len(spans))
            for start, end in unit_spans:
                spans.append((row, offset + start, offset + end))
                domains.append(features[i]["domain_id"])
                examples.append(i)
        return {"unit_spans": torch.tensor(spans, dtype=torch.long).view(-1, 3),
                "unit_domain": torch.tensor(domains, dtype=torch.long),
                "unit_example": torch.tensor(examples, dtype=torch.long), "_first_unit": first}

    def _rows(self, lengths: list[int]) -> list[list[int]]:
        """Packing: conversations into rows of at most row_length tokens, first fit, longest first."""
        rows: list[list[int]] = []
        used: list[int] = []
        cap = self.row_length or sum(lengths)
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, n in enumerate(used) if n + lengths[i] <= cap), None)
            if row is None:
                rows.append([])
                used.append(0)
                row = len(rows) - 1
            rows[row].append(i)
            used[row] += lengths[i]
        return [sorted(r) for r in rows]  # the micro-batch's order within a row

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        rows = self._rows(lengths) if self.packing else [[i] for i in range(len(features))]
        used = [sum(lengths[i] for i in r) for r in rows]
        width = -(-max(used) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), width)
        ids, labels = torch.full(shape, self.pad_token_id), torch.full(shape, IGNORE_INDEX)
        dom, seg, unit = torch.full(shape, -1), torch.full(shape, -1), torch.full(shape, -1)
        pos = torch.zeros(shape, dtype=torch.long)
        units = self._units(features)
        placed = [None] * len(features)
        segment_lengths: list[int] = []  # conversations and padding, row after row: varlen attention's spans
        for r, members in enumerate(rows):
            offset = 0
            for i in members:
                f, n = features[i], lengths[i]
                placed[i] = (r, offset)
                cut = slice(offset, offset + n)
                ids[r, cut], labels[r, cut] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
                pos[r, cut], dom[r, cut], seg[r, cut] = torch.arange(n), f["domain_id"], i
                offset += n
            if self.packing and width > offset:  # padding: its own segment, from position 0, trains nothing
                pos[r, offset:] = torch.arange(width - offset)
            segment_lengths += [lengths[i] for i in members] + ([width - offset] if width > offset else [])
        tables = self._unit_tables(features, units, placed)
        for i, (unit_of_token, _) in enumerate(units):
            r, offset = placed[i]
            unit[r, offset:offset + lengths[i]] = torch.tensor(unit_of_token) + tables["_first_unit"][i]
        del tables["_first_unit"]
        batch = {"input_ids": ids, "labels": labels, "token_domain": dom, "segment_ids": seg, "unit_ids": unit,
                 **tables, "num_tokens": sum(lengths), "num_examples": len(features),
                 "attn_sq": sum(n * n for n in lengths), "capacity": self.capacity or width * len(rows),
                 "example_domain": torch.tensor([f["domain_id"] for f in features])}
        if self.packing:
            batch["position_ids"] = pos  # transformers builds the block-diagonal causal mask from these
            batch |= span_boundaries(segment_lengths)
        else:
            batch["attention_mask"] = (seg >= 0).long()
        return batch


def span_boundaries(spans: list[int]) -> dict:
    """A packed micro-batch's spans as transformers' FlashAttention kwargs, over its rows flattened one after
    another (model.attn_implementation=varlen reads them: lightning_moe/models/varlen.py)."""
    starts = torch.tensor([0, *spans], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {"cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": max(spans),
            "max_length_k": max(spans)}


def batch_num_tokens(batch: dict) -> int:
    """Real tokens in a collated batch (ThroughputMonitor's length_fn)."""
    return batch["num_tokens"]


def batch_num_examples(batch: dict) -> int:
    """Conversations in a collated batch (ThroughputMonitor's batch_size_fn)."""
    return batch["num_examples"]
