#!/usr/bin/env bash
# The therapeutic_h100 recipe's real training path on one GPU, without downloading the weights:
# same architecture (Mistral-NeMo-12B), random bf16 weights, bundled tokenizer, converted counsel-chat data.
# Runs a few optimizer steps with MoE on and off and prints each run's summary.json figures.
#   bash scripts/gpu_recipe_check.sh [OUT_DIR] [STEPS]
# PHASES=1 adds scripts/phase_timer.py (no synchronisation during training) and prints where each run's time went.
set -euo pipefail
out=${1:-runs/gpu_check}
steps=${2:-12}
common=(+recipe=therapeutic_h100 model.init=random logger=csv "trainer.max_steps=$steps"
        "trainer.val_check_interval=$((steps * 8))" trainer.limit_val_batches=8 trainer.num_sanity_val_steps=0)
for variant in moe_on moe_off; do
  extra=()
  [ "$variant" = moe_off ] && extra=(moe=none)
  [ "${PHASES:-0}" = 1 ] && extra+=("+callbacks.phases={_target_: phase_timer.PhaseTimer, out: $out/$variant.phases.json}")
  PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" python3 train.py "${common[@]}" "${extra[@]}" "hydra.run.dir=$out/$variant" > "$out.$variant.log" 2>&1 \
    || { tail -40 "$out.$variant.log"; exit 1; }
done
python3 - "$out" <<'PY'
import json, sys
print(f"{'run':8} {'steps':>5} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'train loss':>10} {'val loss':>8}")
for v in ("moe_on", "moe_off"):
    s = json.load(open(f"{sys.argv[1]}/{v}/summary.json"))
    print(f"{v:8} {s['global_step']:>5} {s['tokens_per_s']:>9.0f} {s['mfu'] or 0:>6.3f} {s['peak_memory_gib']:>8.2f} "
          f"{s['train_loss']:>10.3f} {s['val_loss']:>8.3f}")
for v in ("moe_on", "moe_off"):
    try:
        p = json.load(open(f"{sys.argv[1]}/{v}.phases.json"))
    except FileNotFoundError:
        continue
    print(f"{v}: wall {p['wall_s']:.1f} s, validation {p['validation_s']:.1f} s, "
          f"outside micro-batches {p['outside_micro_batches_s']:.1f} s")
    for name, ph in p["phases"].items():
        print(f"  {name:13} {ph['micro_batches']:>4} micro-batches  device {ph['device_s']:8.2f} s  "
              f"waiting for the host {ph['wait_before_s']:6.2f} s  {ph['tokens'] / max(ph['device_s'], 1e-9):9.0f} tokens/s")
PY
