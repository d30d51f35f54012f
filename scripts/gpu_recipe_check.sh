#!/usr/bin/env bash
# The therapeutic_h100 recipe's real training path on one GPU, without downloading the weights:
# same architecture (Mistral-NeMo-12B), random bf16 weights, bundled tokenizer, converted counsel-chat data.
# Runs a few optimizer steps with MoE on and off and prints each run's summary.json figures.
#   bash scripts/gpu_recipe_check.sh [OUT_DIR] [STEPS]
set -euo pipefail
out=${1:-runs/gpu_check}
steps=${2:-12}
common=(+recipe=therapeutic_h100 model.init=random logger=csv "trainer.max_steps=$steps"
        "trainer.val_check_interval=$((steps * 8))" trainer.limit_val_batches=8 trainer.num_sanity_val_steps=0)
for variant in moe_on moe_off; do
  extra=()
  [ "$variant" = moe_off ] && extra=(moe=none)
  PYTHONUNBUFFERED=1 python3 train.py "${common[@]}" "${extra[@]}" "hydra.run.dir=$out/$variant" > "$out.$variant.log" 2>&1 \
    || { tail -40 "$out.$variant.log"; exit 1; }
done
python3 - "$out" <<'PY'
import json, sys
print(f"{'run':8} {'steps':>5} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'train loss':>10} {'val loss':>8}")
for v in ("moe_on", "moe_off"):
    s = json.load(open(f"{sys.argv[1]}/{v}/summary.json"))
    print(f"{v:8} {s['global_step']:>5} {s['tokens_per_s']:>9.0f} {s['mfu'] or 0:>6.3f} {s['peak_memory_gib']:>8.2f} "
          f"{s['train_loss']:>10.3f} {s['val_loss']:>8.3f}")
PY
