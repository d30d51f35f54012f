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
Packed form: one row holding every conversation back to back, with position_ids restarting at 0 for each;
transformers turns that into a block-diagonal causal mask, so attention never crosses conversations.
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

    def __call__(self, features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        meta = {
            "num_tokens": sum(lengths),
            "num_examples": len(features),
            "attn_sq": sum(n * n for n in lengths),
            "example_domain": torch.tensor([f["domain_id"] for f in features]),
        }
        if self.packing:
            ids = torch.tensor([t for f in features for t in f["input_ids"]]).unsqueeze(0)
            labels = torch.tensor([t for f in features for t in f["labels"]]).unsqueeze(0)
            pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
            dom = torch.cat([torch.full((n,), f["domain_id"]) for n, f in zip(lengths, features)]).unsqueeze(0)
            seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
            prompt = torch.cat([torch.arange(n) < _prompt_length(f) for n, f in zip(lengths, features)]).unsqueeze(0)
            return {"input_ids": ids, "labels": labels, "position_ids": pos, "token_domain": dom, "segment_ids": seg,
                    "prompt_mask": prompt, **meta}
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
