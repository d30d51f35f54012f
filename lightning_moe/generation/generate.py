"""Generation from a trained run with transformers' `generate` and its KV cache, routing as in training.

Prompts are rendered with the tokenizer's chat template, batched with left padding, and stopped at the end of
the assistant turn (the template's terminator, lightning_moe.data.chat.end_of_turn_ids). The MoE blocks route
through a GenerationRouting (lightning_moe.moe.layer): token-level routers route each token as it comes (Switch
without its training-time capacity; expert choice by top-k on the same scores); sequence- and turn-level routing
decide at the prefill from the prompt's units, exactly as training pooled them, and keep the reply's decision for
every generated token. A forward pre-hook reads the cache length before each step, so a cached step knows it
must reuse the decision and a full recompute (no cache) decides again from the same tokens, identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteriaList

from lightning_moe.checkpointing.load import TrainedRun
from lightning_moe.data.chat import end_of_turn_ids
from lightning_moe.generation.prompts import Prompt, checked_prompt, routing_of
from lightning_moe.moe.layer import GenerationRouting


@dataclass
class Sampling:
    max_new_tokens: int = 256
    greedy: bool = True  # false: sample with temperature and top_p
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop (end of turn) | length (max_new_tokens)
    routing: dict = field(default_factory=dict)


def _cache_offset(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.2x renamed the argument
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


class Generator:
    def __init__(self, run: TrainedRun):
        self.run, self.tok = run, run.tokenizer
        self.stop_ids = end_of_turn_ids(self.tok)
        self.level, self.pooling = routing_of(run.plan.sections)
        self.hf_model = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
        self.context_length = getattr(run.plan.hf_config, "max_position_embeddings", None)

    def render(self, messages: list[dict], max_new_tokens: int, where: str = "prompt") -> Prompt:
        return checked_prompt(self.tok, messages, (self.level, self.pooling), self.context_length, max_new_tokens,
                              where)

    def _batch(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor, GenerationRouting]:
        width = max(len(p.ids) for p in prompts)
        dev = self.run.device
        ids = torch.full((len(prompts), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        units = torch.full_like(ids, -1)
        spans, finals, first = [], [], 0
        for row, p in enumerate(prompts):
            pad = width - len(p.ids)
            ids[row, pad:], mask[row, pad:] = torch.tensor(p.ids), 1
            units[row, pad:] = torch.tensor(p.units) + first
            spans += [(row, pad + s, pad + e) for s, e in p.spans]
            finals.append(p.final_unit + first)
            first += len(p.spans)
        routing = GenerationRouting(units, torch.tensor(finals), torch.tensor(spans, dtype=torch.long).view(-1, 3))
        return ids.to(dev), mask.to(dev), routing

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sampling: Sampling, streamer=None, use_cache: bool = True,
                 stopping_criteria=None) -> list[Reply]:
        ids, mask, routing = self._batch(prompts)
        ctx = self.run.routing
        ctx.generation = routing
        hook = self.hf_model.register_forward_pre_hook(
            lambda module, args, kwargs: setattr(routing, "offset", _cache_offset(kwargs)), with_kwargs=True)
        torch.manual_seed(sampling.seed)
        options = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        try:
            out = self.run.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens, streamer=streamer,
                eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id, use_cache=use_cache,
                stopping_criteria=StoppingCriteriaList(stopping_criteria or []), **options)
        finally:
            hook.remove()
            ctx.generation = None
        return [self._reply(row, out[row, ids.shape[1]:].tolist(), routing) for row in range(len(prompts))]

    def _reply(self, row: int, new: list[int], routing: GenerationRouting) -> Reply:
        ended = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        tokens = new if ended is None else new[:ended]
        text = self.tok.decode(tokens, skip_special_tokens=True)
        return Reply(text, tokens, "length" if ended is None else "stop", self.routing_report(row, routing))

    def routing_report(self, row: int, routing: GenerationRouting) -> dict:
        """The reply's routing per MoE layer: for sequence/turn levels the experts its one decision chose and their
        weights; for token level each expert's share of the reply tokens' routing weight. `expert` is the expert
        with the most weight over all layers, `domain` the domain it is supervised toward (moe.domain_loss_coef)."""
        if not self.run.blocks:
            return {}
        if self.level == "token":
            per_layer = {layer: g[row] / g[row].sum().clamp(min=1e-12) for layer, g in routing.reply_gates.items()}
            if not per_layer:  # the reply ended at its first token
                return {"level": "token", "layers": {}}
            layers = {f"layer{k}": {"share": [round(float(v), 4) for v in g]} for k, g in sorted(per_layer.items())}
        else:
            unit = int(routing.final_unit[row])
            per_layer = {layer: g[unit].float().cpu() for layer, g in routing.decisions.items()}
            layers = {}
            for layer, g in sorted(per_layer.items()):
                chosen = [int(e) for e in (g > 0).nonzero().flatten()]
                layers[f"layer{layer}"] = {"experts": chosen, "weights": [round(float(g[e]), 4) for e in chosen]}
        total = sum(g.cpu() for g in per_layer.values())
        top = int(total.argmax())
        domains = self.run.plan.sections.domains
        supervised = self.run.plan.sections.moe.domain_loss_coef > 0 and top < len(domains)
        return {"level": self.level, "expert": top, "domain": domains[top] if supervised else None, "layers": layers}
