"""generate.py's work: every prompt rendered and checked against the context length with the run's tokenizer
before the weights load, then generated in batches, and the output file written atomically at the end."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from lightning_moe.checkpointing.load import LoadPlan, load_trained, plan_tokenizer
from lightning_moe.checkpointing.outputs import write_file_atomic
from lightning_moe.generation.generate import Generator, Sampling
from lightning_moe.generation.prompts import checked_prompt, routing_of
from lightning_moe.reporting.console import progress


def sampling_of(cfg: DictConfig) -> Sampling:
    return Sampling(cfg.max_new_tokens, cfg.greedy, cfg.temperature, cfg.top_p, cfg.seed)


def with_system(messages: list[dict], prompt: str | None) -> list[dict]:
    if not prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": prompt}, *messages]


def generate_file(plan: LoadPlan, rows: list[dict], cfg: DictConfig) -> Path:
    out = Path(cfg.out)  # checked by generate.py before the run was read (checkpointing.outputs.check_output)
    system = cfg.system_prompt or plan.sections.data.system_prompt
    tokenizer = plan_tokenizer(plan)
    context = getattr(plan.hf_config, "max_position_embeddings", None)
    prompts = [checked_prompt(tokenizer, with_system(r["messages"], system), routing_of(plan.sections), context,
                              cfg.max_new_tokens, f"{cfg.prompts}: row {r['_row']}") for r in rows]
    gen = Generator(load_trained(plan, cfg.device, tokenizer))
    sampling = sampling_of(cfg)
    results = []
    starts = range(0, len(prompts), cfg.batch_size)
    for start in progress(starts, len(starts), f"generating ({len(rows)} prompts, {cfg.batch_size} a batch)"):
        replies = gen.generate(prompts[start:start + cfg.batch_size], sampling)
        for row, reply in zip(rows[start:start + cfg.batch_size], replies):
            row = {k: v for k, v in row.items() if k != "_row"}
            results.append(row | {"reply": reply.text, "finish_reason": reply.finish_reason, "routing": reply.routing})
    # nothing written half: the file appears whole or not at all, and no temporary file outlives a failure
    write_file_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    print(f"{len(results)} replies -> {out}")
    if gen.run.device.type == "cuda":
        import torch

        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return out
