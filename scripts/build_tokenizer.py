"""Build the bundled tokenizer (lightning_moe/assets/tokenizer/) from the bundled conversations.

A byte-level BPE (any UTF-8 text encodes; nothing maps to <unk>) trained on data/therapeutic_sample.jsonl,
with ChatML special tokens and a ChatML chat template whose assistant turns are wrapped in
{% generation %} tags (so transformers' return_assistant_tokens_mask can cross-check our loss masks).

    python scripts/build_tokenizer.py                       # rewrites lightning_moe/assets/tokenizer/
    python scripts/build_tokenizer.py --out /tmp/tok        # elsewhere (tests check it reproduces the bundled one)
"""

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML. The assistant's content and its <|im_end|> terminator are the trained tokens; the newline after
# the terminator is formatting, outside the generation tags.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def texts(files: list[Path]):
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                for message in json.loads(line)["messages"]:
                    yield f"{message['role']}\n{message['content']}"


def build(files: list[Path], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts(files), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=[str(REPO / "data" / "therapeutic_sample.jsonl")])
    parser.add_argument("--out", default=str(REPO / "lightning_moe" / "assets" / "tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    tokenizer = build([Path(f) for f in args.data], args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {len(tokenizer)} tokens, chat template ChatML")
    return 0


if __name__ == "__main__":
    sys.exit(main())
