"""The routing state one model's MoE blocks share, and the records they leave: the channel between a caller and
the blocks, since a HuggingFace forward has no argument for per-token metadata or router outputs.

Who writes it, and how (nothing else does):
- training (training/module.py): `start_batch(batch)` before each forward, `stop()` after it for the
  router records (losses, metrics);
- evaluation (evaluation/evaluator.py): the same, plus `experts_enabled = False` around the base model's pass
  (every block then runs its layer's own MLP);
- generation (generation/generate.py): `generation = GenerationRouting(...)` for the length of a `generate`
  call (prompt units; `offset` read from the KV cache before each forward), `None` after it.
The blocks themselves read `metadata()`, append to their `pending` list while `recording`, and (moe.tied_router)
the leading block writes `tied_gates` for the followers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_moe.moe.routers import Router, RouterOutput


@dataclass
class RouterRecord:
    """One block's routing of one forward pass, over its rows (tokens, or routing units when sequence/turn-level)."""

    layer: int
    out: RouterOutput
    mask: torch.Tensor  # (R,) real rows
    domain: torch.Tensor  # (R,) domain index per row, -1 unlabelled
    segments: torch.Tensor  # (R,) conversation index per row (-1 padding), for per-conversation losses
    num_segments: int
    router: Router
    # the token view (= the row view for token-level routing): what each token was dispatched to, for load
    # and domain metrics that count tokens whatever the routing level
    token_gates: torch.Tensor | None = None  # (T, E)
    token_mask: torch.Tensor | None = None
    token_domain: torch.Tensor | None = None


@dataclass
class GenerationRouting:
    """Routing metadata for generation (lightning_moe/generation/generate.py sets it), so that generating routes as
    training did. Positions are within each (left-padded) row of the prompt batch.

    prompt_units (B, P): the routing unit of each prompt token (-1 for padding); final_unit (B,): the unit of the
    reply being generated (every generated token belongs to it); unit_spans (U, 3): each unit's pooled tokens as
    (row, start, end). `offset` is the position of the current forward's first token, read from the KV cache
    before each forward: 0 for the prefill (or every step without a cache), > 0 for a cached decoding step, which
    reuses the decision taken at the prefill (`decisions`, per layer) instead of deciding again from one token.
    """

    prompt_units: torch.Tensor
    final_unit: torch.Tensor
    unit_spans: torch.Tensor
    offset: int = 0
    decisions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (U, E) unit gates
    reply_gates: dict[int, torch.Tensor] = field(default_factory=dict)  # token level: layer -> (B, E) summed gates

    def unit_ids(self, batch: int, seq: int, device) -> torch.Tensor:
        prompt_len = self.prompt_units.shape[1]
        pos = torch.arange(self.offset, self.offset + seq, device=device)
        inside = self.prompt_units.to(device)[:, pos.clamp(max=prompt_len - 1)]
        return torch.where(pos < prompt_len, inside, self.final_unit.to(device).unsqueeze(-1)).reshape(-1)


@dataclass
class RoutingContext:
    """Shared by the LightningModule (or a generator) and every MoE block of one model.

    The HF forward has no channel for per-token metadata or router outputs, so the caller writes the batch's
    token mask, domains, conversation segments and routing units here before the forward, and each block appends
    its router record. `recording` goes off after the forward so that activation-checkpoint recomputation during
    backward appends nothing. Without metadata every token counts as real and each batch row is one conversation
    and one routing unit (pooled whole). `experts_enabled=False` runs every MoE block as the base MLP (with peft's
    adapters disabled too, the base model: what evaluation compares against).
    """

    blocks: list = field(default_factory=list)  # the MoE blocks sharing this context (each adds itself)
    recording: bool = False
    token_mask: torch.Tensor | None = None  # (T,) bool
    token_domain: torch.Tensor | None = None  # (T,) long
    segments: torch.Tensor | None = None  # (T,) long, -1 for padding
    num_segments: int | None = None
    unit_ids: torch.Tensor | None = None  # (T,) long, -1 for padding
    unit_spans: torch.Tensor | None = None  # (U, 3) long: row, start, end
    unit_domain: torch.Tensor | None = None  # (U,) long
    unit_example: torch.Tensor | None = None  # (U,) long: the unit's conversation
    packed: bool = False
    generation: GenerationRouting | None = None
    experts_enabled: bool = True
    tied_gates: torch.Tensor | None = None  # moe.tied_router: the deciding (first) block's unit gates, this forward

    def start_batch(self, batch: dict) -> None:
        """Before a forward pass over a collated batch (lightning_moe.data.collate): its routing metadata."""
        self.start(
            token_mask=batch["segment_ids"].reshape(-1) >= 0,  # real tokens: padding is segment -1 in both forms
            token_domain=batch["token_domain"].reshape(-1),
            segments=batch["segment_ids"].reshape(-1),
            num_segments=batch["num_examples"],
            unit_ids=batch["unit_ids"].reshape(-1),
            unit_spans=batch["unit_spans"],
            unit_domain=batch["unit_domain"],
            unit_example=batch["unit_example"],
            packed="position_ids" in batch,
        )

    def start(self, token_mask=None, token_domain=None, segments=None, num_segments=None, unit_ids=None,
              unit_spans=None, unit_domain=None, unit_example=None, packed=False) -> None:
        for block in self.blocks:
            block.pending.clear()
        self.recording = True
        self.token_mask, self.token_domain, self.segments = token_mask, token_domain, segments
        self.num_segments, self.packed = num_segments, packed
        self.unit_ids, self.unit_spans, self.unit_domain, self.unit_example = unit_ids, unit_spans, unit_domain, unit_example

    def stop(self) -> list[RouterRecord]:
        """This forward's router records, in depth order. Each block keeps its own until here (not one shared
        list): under model.compile a shared list's length would be guarded, one recompile per layer."""
        self.recording = False
        return [RouterRecord(block.layer_idx, out, *rows, num_segments, block.router, *token_view)
                for block in self.blocks for out, rows, num_segments, token_view in block.pending]

    def metadata(self, batch: int, seq: int, device) -> dict:
        """This forward's routing metadata; defaulted where the caller set none (then every token is real, and
        each batch row is one conversation and one unit, pooled whole)."""
        t = batch * seq
        if self.token_mask is not None and self.token_mask.numel() == t:
            return {"mask": self.token_mask, "domain": self.token_domain, "segments": self.segments,
                    "num_segments": self.num_segments, "unit_ids": self.unit_ids, "unit_spans": self.unit_spans,
                    "unit_domain": self.unit_domain, "unit_example": self.unit_example}
        rows = torch.arange(batch, device=device)
        meta = {"mask": torch.ones(t, dtype=torch.bool, device=device), "domain": torch.full((t,), -1, device=device),
                "segments": rows.repeat_interleave(seq), "num_segments": batch}
        if self.generation is not None:
            g = self.generation
            spans, units = g.unit_spans.to(device), g.unit_ids(batch, seq, device)
        else:
            spans = torch.stack([rows, torch.zeros_like(rows), torch.full_like(rows, seq)], dim=-1)
            units = meta["segments"]
        num_units = spans.shape[0]
        return meta | {"unit_ids": units, "unit_spans": spans, "unit_domain": torch.full((num_units,), -1, device=device),
                       "unit_example": spans[:, 0]}
