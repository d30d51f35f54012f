"""The peer a user would pick instead of this project: TRL's SFTTrainer, set up as its docs recommend for speed,
on the same data, model shape and tokens a micro-batch as the benchmark's recipe rows. Run by
`scripts/benchmark.py --only trl_sft` (one GPU; needs trl, accelerate and liger-kernel: scripts/gpu_speed_call.sh
carries their wheels):

    python scripts/trl_peer.py --out OUT/trl_sft.json --arch mistral-nemo-12b --seq 2048 --warmup 3 --micro-batches 16

- model: the architecture json with random bf16 weights (as model.init=random). Attention: TRL's docs pair
  padding-free with FlashAttention 2/3, separate packages that do not fit one upload; TRL's collator hands the
  flattened batch's spans to the model (`cu_seq_lens_q`, `max_length_q`), which torch's own varlen FlashAttention
  takes through the attention function lightning_moe/models/varlen.py registers with transformers (`--attn varlen`,
  the default: the same kernel as the recipes). `--attn sdpa`: what a user without those packages gets, a
  block-diagonal mask from the position_ids;
- LoRA: peft's LoraConfig r16 / alpha 32 / dropout 0 on the same 7 projections as the recipes;
- SFTConfig: packing (best-fit decreasing, which turns padding-free on: rows flattened, position_ids restart per
  conversation), max_length = --seq, per_device_train_batch_size 4 (4 x seq tokens a micro-batch: therapeutic_h100's
  data.batch_tokens), use_liger_kernel, gradient_checkpointing (TRL's default, non-reentrant), bf16;
- data: the converted counsel-chat + ESConv conversations (`messages`), through the tokenizer's chat template.
Tokens/s counts the real tokens of each timed micro-batch (a padding-free batch has no padding; an attention mask's
zeros are left out otherwise), between CUDA synchronisations, after --warmup micro-batches; MFU uses
lightning_moe/models/flops.py's formula with each conversation's own attention (sum of squared lengths).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def segment_lengths(position_ids) -> list[int]:
    """Conversation lengths of a flattened row: a new conversation starts where position_ids restart at 0."""
    starts = (position_ids.flatten() == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return [b - a for a, b in zip(starts, starts[1:]) if b > a]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="mistral-nemo-12b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="packed rows a micro-batch (x --seq tokens)")
    p.add_argument("--attn", default="varlen", choices=["varlen", "sdpa"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--data", nargs="+", default=[str(REPO / "data/generated/counsel_chat.jsonl"),
                                                 str(REPO / "data/generated/esconv.jsonl")])
    a = p.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lightning_moe.models.architecture import resolve_model_config
    from lightning_moe.config.schema import ModelConfig
    from lightning_moe.models.flops import count_flops, dense_peak_flops
    from lightning_moe.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(init="random", arch=a.arch, tokenizer="bundled"))
    config = resolve_model_config(ModelConfig(init="random", arch=a.arch))
    config.vocab_size = max(config.vocab_size, -(-len(tokenizer) // 64) * 64)
    if a.attn == "varlen":
        from lightning_moe.models import varlen

        varlen.register()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=a.attn)
    # only the conversations: the sources' metadata differ in schema (counsel-chat's question ids vs ESConv's
    # strategies), which load_dataset("json") cannot merge into one table
    rows = []
    for path in (a.data if isinstance(a.data, list) else [a.data]):
        with open(path, encoding="utf-8") as f:
            rows += [{"messages": json.loads(line)["messages"]} for line in f if line.strip()]
    data = Dataset.from_list(rows).shuffle(seed=0)

    timing = {"tokens": 0, "attn_sq": 0, "seen": 0, "t0": None, "seconds": 0.0}

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            if timing["seen"] == a.warmup:  # the timed window opens after the warm-up micro-batches
                torch.cuda.synchronize()
                timing["t0"] = time.perf_counter()
            if timing["seen"] >= a.warmup:
                mask = inputs.get("attention_mask")
                timing["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
                lengths = segment_lengths(inputs["position_ids"]) if "position_ids" in inputs else \
                    [int(n) for n in (mask.sum(-1) if mask is not None else [inputs["input_ids"].shape[-1]])]
                timing["attn_sq"] += sum(n * n for n in lengths)
            timing["seen"] += 1
            return super().training_step(model, inputs, *args, **kwargs)

    class StopAfterWindow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if timing["seen"] >= a.warmup + a.micro_batches and timing["t0"] is not None:
                torch.cuda.synchronize()
                timing["seconds"] = time.perf_counter() - timing["t0"]
                control.should_training_stop = True

    args = SFTConfig(
        output_dir=str(a.out.parent / "trl_sft_run"), max_length=a.seq, packing=True, packing_strategy="bfd",
        padding_free=True, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        use_liger_kernel=True, gradient_checkpointing=True, bf16=True, learning_rate=3e-4, optim="adamw_torch_fused",
        max_steps=a.warmup + a.micro_batches + 1, logging_steps=1000, save_strategy="no", report_to="none",
        dataloader_num_workers=2, seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    torch.cuda.reset_peak_memory_stats()
    trainer = Timed(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora,
                    callbacks=[StopAfterWindow()])
    trainer.train()

    flops = count_flops(trainer.model, config).per_batch(timing["tokens"], timing["attn_sq"])
    peak = dense_peak_flops(torch.device("cuda"), "bf16-true")
    import trl

    a.out.write_text(json.dumps({
        "tokens_per_s": timing["tokens"] / timing["seconds"], "real_tokens": timing["tokens"],
        "seconds": timing["seconds"], "micro_batches": a.micro_batches, "model_flops": flops,
        "mfu": flops / timing["seconds"] / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "micro_batch_size": a.batch,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "device": torch.cuda.get_device_name(), "trl": trl.__version__, "attn_implementation": a.attn,
    }, indent=2))


if __name__ == "__main__":
    main()
