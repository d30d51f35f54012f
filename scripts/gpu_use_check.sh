#!/usr/bin/env bash
# After training, on one GPU at the 12B shape: therapeutic_h100 (model.init=random, converted counsel-chat + the
# sample) trained for a few optimizer steps with MoE on and off (scripts/gpu_recipe_check.sh: whole-run summary.json
# figures), then evaluate.py and generate.py on the MoE run, each timed (wall clock; peak GPU memory in eval.json and
# printed by generate.py). Results in OUT: the two summaries, eval.json, eval.md, replies.jsonl, timings.txt.
#   bash scripts/gpu_use_check.sh OUT [STEPS]
set -euo pipefail
out=${1:?usage: gpu_use_check.sh OUT [STEPS]}
steps=${2:-6}
mkdir -p "$out"
bash scripts/gpu_recipe_check.sh "$out/runs" "$steps"
run="$out/runs/moe_on"
python3 - "$out/prompts.jsonl" <<'PY'
import json, sys
asks = ["I can't sleep before exams and my heart races.", "My partner and I argue about everything lately.",
        "Is it normal to feel nothing after a loss?", "My boss keeps calling people from my country lazy.",
        "How do I know if I need therapy?", "I keep checking the stove ten times before I leave.",
        "My teenager won't talk to me anymore.", "I feel like a burden to my friends."]
with open(sys.argv[1], "w") as f:
    for a in asks:
        f.write(json.dumps({"messages": [{"role": "user", "content": a}]}) + "\n")
PY
t0=$(date +%s.%N)
python3 evaluate.py "run=$run" "out=$out/eval" > "$out/evaluate.log" 2>&1 || { tail -30 "$out/evaluate.log"; exit 1; }
t1=$(date +%s.%N)
python3 generate.py "run=$run" "prompts=$out/prompts.jsonl" "out=$out/replies.jsonl" max_new_tokens=64 batch_size=8 \
  > "$out/generate.log" 2>&1 || { tail -30 "$out/generate.log"; exit 1; }
t2=$(date +%s.%N)
{
  echo "evaluate.py wall $(python3 -c "print(round($t1 - $t0, 1))") s; generate.py (8 prompts x 64 tokens) wall $(python3 -c "print(round($t2 - $t1, 1))") s"
  grep -h "peak GPU memory" "$out/generate.log" || true
  python3 -c "import json; r=json.load(open('$out/eval/eval.json')); print('evaluate:', r['seconds'], 's in Trainer.validate,', r['peak_memory_gib'], 'GiB peak,', r['overall']['conversations'], 'conversations')"
} | tee "$out/timings.txt"
