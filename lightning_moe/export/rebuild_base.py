"""Rebuild the random base of a `model.init=random` run as a plain transformers folder, so that a per_domain
export's adapters have a base to be served over (`vllm serve BASE_DIR`, `route.py --base BASE_DIR`).

Copied by export.py into `EXPORT_DIR/base/` beside the base's `config.json` and `rebuild.json` (the seed and dtype
training drew it with); needs only torch and transformers:

    python EXPORT_DIR/base/rebuild_base.py BASE_DIR

It draws the weights exactly as lightning_moe.models.build did (torch.manual_seed(seed), then
AutoModelForCausalLM.from_config on the CPU), and writes them with the export's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def rebuild(out: str | Path, here: str | Path = Path(__file__).resolve().parent) -> Path:
    here, out = Path(here), Path(out)
    spec = json.loads((here / "rebuild.json").read_text())
    if spec["init_device"] != "cpu":
        raise SystemExit(f"this base was drawn on {spec['init_device']}; run this on a machine with one")
    config = AutoConfig.from_pretrained(here)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # the export's own tokenizer (one folder up), so servers find it beside the weights
        if (here.parent / name).is_file():
            shutil.copy(here.parent / name, out / name)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Rebuild a random-base run's base model as a transformers folder.")
    p.add_argument("out", help="the folder to write (vllm serve OUT, route.py --base OUT)")
    print(f"base model -> {rebuild(p.parse_args().out)}")
