"""Pick the domain adapter for a conversation: the router of a per-domain export (copied into <export>/router/).

Standalone on purpose (torch, transformers and peft only, not lightning-moe), so a serving process can import it:

    from route import Router
    router = Router("EXPORT_DIR", base="BASE_MODEL_DIR_OR_HUB_ID")     # the base the adapters were trained on
    router.pick([{"role": "user", "content": "I can't sleep before exams"}])   # -> "mental_health"

    python EXPORT_DIR/router/route.py --base BASE --messages conversation.json   # prints the adapter name

The rule is training's (router.json says which): the router reads the input of the first MoE layer's MLP, computed
by the base with the global LoRA (the `global` adapter; the layers below have no experts), averages it over the
prompt tokens its routing pools (sequence level: those before the first assistant turn; turn level: the whole
prompt, or since the last assistant turn with pooling=last_turn), in float32, and takes the top-scoring expert.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def _render(tokenizer, messages, generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def pooled_span(tokenizer, messages: list[dict], level: str, pooling: str) -> tuple[list[int], int, int]:
    """The prompt's token ids and the [start, end) of the tokens the router averages, located as training does:
    by character offsets of the assistant turns in the rendered conversation."""
    text = _render(tokenizer, messages, True)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def first_token_at(char: int) -> int:
        return next((t for t, s in enumerate(starts) if s >= char), len(starts))

    end, begin = len(starts), 0
    if level == "sequence" and turns:
        end = first_token_at(len(_render(tokenizer, messages[:turns[0]], True)))
    elif level == "turn" and pooling == "last_turn" and turns:
        begin = first_token_at(len(_render(tokenizer, messages[:turns[-1] + 1], False).rstrip()))
    return enc["input_ids"], begin, max(end, begin + 1)


class Router:
    def __init__(self, export_dir: str | Path, base: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        export = Path(export_dir)
        self.spec = json.loads((export / "router" / "router.json").read_text())
        self.weight = load_file(str(export / "router" / "router.safetensors"))["weight"].to(device, torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(export)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
        if (export / "global").is_dir():
            model = PeftModel.from_pretrained(model, export / "global")
        self.model, self.device = model.eval(), device
        layers = model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers
        self._inputs = []
        layers[self.spec["layer"]].mlp.register_forward_pre_hook(lambda module, args: self._inputs.append(args[0]))

    @torch.no_grad()
    def scores(self, messages: list[dict]) -> torch.Tensor:
        ids, begin, end = pooled_span(self.tokenizer, messages, self.spec["routing_level"], self.spec["pooling"])
        self._inputs.clear()
        self.model(input_ids=torch.tensor([ids], device=self.device))
        pooled = self._inputs[0][0, begin:end].float().mean(0)
        if self.spec["moe"].get("router_input_norm"):  # as training scored it (the pick is the same either way)
            pooled = pooled * torch.rsqrt(pooled.pow(2).mean() + 1e-6)
        return self.weight @ pooled

    def pick(self, messages: list[dict]) -> str:
        return self.spec["adapters"][int(self.scores(messages).argmax())]


def main() -> None:
    p = argparse.ArgumentParser(description="Print the domain adapter a conversation routes to.")
    p.add_argument("--base", required=True, help="the base model (a folder or hub id) the export was trained on")
    p.add_argument("--messages", required=True, help='a JSON file: [{"role": "user", "content": "..."}, ...]')
    p.add_argument("--export", default=str(Path(__file__).resolve().parent.parent), help="the export folder")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    print(Router(a.export, a.base, a.device).pick(json.loads(Path(a.messages).read_text())))


if __name__ == "__main__":
    main()
