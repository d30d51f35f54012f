#!/usr/bin/env python
"""What a router sees on a real model (MOE_TRAINING_GUIDE.md section 5): the input of the MLP in 4 layers of
SmolLM2 over the opening prompts of every 100th counsel-chat conversation, its scale, the share of its energy in the
5 largest dimensions and in the mean vector all tokens share, and what a freshly initialised router (std 0.02, 4
experts, 5 draws) makes of it, raw and RMS-normalised: mean routing entropy and the top expert's share of argmaxes.

    python scripts/router_input_stats.py [MODEL_DIR] [CONVERSATIONS_JSONL]
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
model_dir = sys.argv[1] if len(sys.argv) > 1 else REPO / "cache" / "models" / "smollm2-135m-instruct"
data = sys.argv[2] if len(sys.argv) > 2 else REPO / "data" / "generated" / "counsel_chat.jsonl"
torch.manual_seed(0)
tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
rows = [json.loads(line) for line in open(data)][::100]
layers = [0, 10, 19, 29]
caught: dict[int, list] = {}
for i in layers:
    model.model.layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: caught.setdefault(i, []).append(a[0][0]))
with torch.no_grad():
    for r in rows:
        model(tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"][:, :200])


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


for i in layers:
    tokens, pooled = torch.cat(caught[i]), torch.stack([c.mean(0) for c in caught[i]])
    energy = tokens.pow(2).mean(0)
    print(f"layer {i}: {tokens.shape[0]} tokens, RMS {tokens.pow(2).mean().sqrt():.2f}, 5 largest dimensions "
          f"{energy.topk(5).values.sum() / energy.sum():.2f} of the energy, shared mean vector "
          f"{tokens.mean(0).pow(2).sum() / tokens.pow(2).sum(1).mean():.2f}")
    for name, f in (("raw", lambda x: x), ("rms", rms)):
        for what, z in (("tokens", tokens), ("pooled", pooled)):
            ent, top = [], []
            for _ in range(5):
                p = (f(z) @ (torch.randn(4, z.shape[1]) * 0.02).T).softmax(-1)
                ent.append(-(p * p.log()).sum(-1).mean().item())
                top.append(torch.bincount(p.argmax(-1), minlength=4).max().item() / z.shape[0])
            print(f"  {name:4s} {what:6s} entropy {sum(ent) / 5:.3f}  top expert's share {sum(top) / 5:.2f}")
