"""Collate rendered conversations into padded or padding-free (packed) micro-batches.

Both forms carry what the rest of the pipeline needs beyond input_ids/labels:
  token_domain  (B, S) domain index of each token's conversation, -1 for unlabelled or padding tokens
  segment_ids   (B, S) index of each token's conversation in the micro-batch, -1 for padding
  prompt_mask   (B, S) tokens before the conversation's first trained (assistant) token: what sequence-level
                routing pools, because at inference all of it exists before generation starts
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
padding need no mask at all (the causal kernel, as unpacked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_moe.data.chat import IGNORE_INDEX


@dataclass
class ChatCollator:
    pad_token_id: int
    packing: bool = False
    pad_to_multiple_of: int = 1
    row_length: int | None = None  # packing: the most tokens in a row (data.max_length); None: one row

    def _packed(self, features: list[dict], lengths: list[int]) -> dict:
        rows: list[list[int]] = []  # conversation indices per row
        used: list[int] = []  # tokens per row
        cap = self.row_length or sum(lengths)
        for i in sorted(range(len(features)), key=lambda i: -lengths[i]):  # first fit decreasing
            row = next((r for r, n in enumerate(used) if n + lengths[i] <= cap), None)
            if row is None:
                rows.append([])
                used.append(0)
                row = len(rows) - 1
            rows[row].append(i)
            used[row] += lengths[i]
        width = -(-max(used) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        cols: dict[str, list[list[torch.Tensor]]] = {k: [] for k in ("ids", "labels", "pos", "dom", "seg", "prompt")}
        for r, n_used in zip(rows, used):
            parts = {k: [] for k in cols}
            for i in sorted(r):  # the micro-batch's order within a row
                f, n = features[i], lengths[i]
                parts["ids"].append(torch.tensor(f["input_ids"]))
                parts["labels"].append(torch.tensor(f["labels"]))
                parts["pos"].append(torch.arange(n))
                parts["dom"].append(torch.full((n,), f["domain_id"]))
                parts["seg"].append(torch.full((n,), i))
                parts["prompt"].append(torch.arange(n) < _prompt_length(f))
            pad = width - n_used
            if pad:  # its own segment: attends only to itself, trains nothing, routes nowhere
                for k, v in (("ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("dom", -1), ("seg", -1)):
                    parts[k].append(torch.full((pad,), v))
                parts["pos"].append(torch.arange(pad))
                parts["prompt"].append(torch.zeros(pad, dtype=torch.bool))
            for k in cols:
                cols[k].append(torch.cat(parts[k]))
        ids, labels, pos, dom, seg, prompt = (torch.stack(cols[k]) for k in cols)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "token_domain": dom, "segment_ids": seg,
                "prompt_mask": prompt}

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        meta = {
            "num_tokens": sum(lengths),
            "num_examples": len(features),
            "attn_sq": sum(n * n for n in lengths),
            "example_domain": torch.tensor([f["domain_id"] for f in features]),
        }
        if self.packing:
            return self._packed(features, lengths) | meta
        width = -(-max(lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_token_id)
        labels = torch.full((len(features), width), IGNORE_INDEX)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        dom = torch.full((len(features), width), -1)
        seg = torch.full((len(features), width), -1)
        prompt = torch.zeros((len(features), width), dtype=torch.bool)
        for i, (n, f) in enumerate(zip(lengths, features)):
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
            dom[i, :n] = f["domain_id"]
            seg[i, :n] = i
            prompt[i, : _prompt_length(f)] = True
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "token_domain": dom, "segment_ids": seg,
                "prompt_mask": prompt, **meta}


def _prompt_length(feature: dict) -> int:
    """Tokens before the first trained one (the assistant header included)."""
    return next((i for i, lab in enumerate(feature["labels"]) if lab != IGNORE_INDEX), len(feature["labels"]))


def batch_num_tokens(batch: dict) -> int:
    """Real tokens in a collated batch (ThroughputMonitor's length_fn)."""
    return batch["num_tokens"]


def batch_num_examples(batch: dict) -> int:
    """Conversations in a collated batch (ThroughputMonitor's batch_size_fn)."""
    return batch["num_examples"]
