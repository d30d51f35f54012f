#!/usr/bin/env bash
# Domain routing within and across sources (MOE_TRAINING_GUIDE.md section 5, "Measured: routing across sources"):
# the tiny CPU model trained on counsel-chat or on ESConv, routed at prompt level (sequence), per turn (turn, with
# pooling mean or last_turn) or per token, each evaluated by evaluate.py on both sources. Prints one table.
#   python scripts/convert_counsel_chat.py && python scripts/convert_esconv.py    # once: data/generated/
#   bash scripts/routing_transfer.sh [OUT_DIR] [STEPS]                             # ~25 min on 2 CPU cores
set -euo pipefail
out=${1:-runs/routing_transfer}
steps=${2:-200}
cc=data/generated/counsel_chat.jsonl
es=data/generated/esconv.jsonl
for f in $cc $es; do [ -f "$f" ] || { echo "$f missing: run scripts/convert_*.py first" >&2; exit 2; }; done
levels=(sequence turn turn_last token)
for src in counsel_chat esconv; do
  data=$([ $src = counsel_chat ] && echo $cc || echo $es)
  for level in "${levels[@]}"; do
    run=$out/$src-$level
    case $level in
      turn_last) routing=(moe.routing_level=turn moe.pooling=last_turn) ;;
      *) routing=(moe.routing_level=$level) ;;
    esac
    [ -f "$run/summary.json" ] || python train.py +recipe=counsel_chat_tiny "data.train_files=[$data]" \
      "${routing[@]}" data.max_length=1024 data.packing=true "trainer.max_steps=$steps" logger=csv "hydra.run.dir=$run" > "$run.log" 2>&1 \
      || { tail -20 "$run.log"; exit 1; }
    for test in counsel_chat esconv; do
      files=$([ $test = counsel_chat ] && echo $cc || echo $es)
      # in-source: the run's own validation split; across sources: every conversation of the other source
      if [ $test = $src ]; then args=(); else args=("files=[$files]"); fi
      [ -f "$run/eval-$test/eval.json" ] || python evaluate.py "run=$run" "${args[@]}" base=false \
        data.max_length=1024 "out=$run/eval-$test" > "$run.eval-$test.log" 2>&1 || { tail -20 "$run.eval-$test.log"; exit 1; }
    done
  done
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| trained on | routing | evaluated on | own-expert share per domain (psy, mh, bias, gen) | NMI | val loss |")
print("|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    for test in ("counsel_chat", "esconv"):
        r = json.loads((run / f"eval-{test}" / "eval.json").read_text())
        m = r["routing"]["domain_expert_matrix"]
        present = [d for d in m["domains"] if r["per_domain"].get(d, {}).get("conversations", 0) >= 5]
        own = ", ".join(f"{m['all_layers'][m['domains'].index(d)][m['domains'].index(d)]:.2f}" if d in present else "-"
                        for d in m["domains"])
        src, level = run.name.split("-", 1)
        print(f"| {src} | {level} | {test} | {own} | {m['nmi']:.3f} | {r['overall']['trained']['loss']:.3f} |")
PY
