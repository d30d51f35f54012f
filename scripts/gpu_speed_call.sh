#!/usr/bin/env bash
# Issue 28's measurements in ONE call on one GPU (an H100 first): eager bf16, the frozen base in FP8, TRL's
# SFTTrainer as the peer, the recipe at the peer's memory, a compiled run from empty caches, bf16-vs-fp8 loss parity
# and where FP8's time goes (a profile). Raw JSON into $OUT
# (at most 8 files come back): results_main.json, loss_parity.json, results_compile.json, env.txt, call.log,
# failures.log, real_h100_fp8_cached.profile.txt. The table they fill: MOE_TRAINING_GUIDE.md section 8, "one call".
#
# Here, once (the wheels the GPU machine lacks, ~6 MB; versions for its torch 2.11 / transformers 5.17):
#   ../shared/gpu/wheels.sh .whl liger-kernel==0.8.5 torchao==0.17.0 trl==1.16.0 torchdata==0.11.0
# and either the converted data (`python scripts/convert_counsel_chat.py && python scripts/convert_esconv.py`:
# data/generated/, ignored) or the converters' inputs in .gpu_data/ (ignored): counsel_chat/20200325_counsel_chat.csv
# and esconv/{train,valid,test}.json from ../shared/datasets. The call (carry .whl and data/generated or .gpu_data):
#   bash scripts/gpu_speed_call.sh
# Sizes, for ~9.5 minutes on an H100 (override by environment): MICRO=10 timed micro-batches a variant, PARITY_STEPS=200
# optimizer steps of an 8-layer cut of the 12B per precision, COMPILE_MICRO=6; DEADLINE=575 s.
set -uo pipefail
OUT=${OUT:-/tmp/speed_out}
work=/tmp/speed
mkdir -p "$OUT" "$work"
exec > >(tee "$OUT/call.log") 2>&1
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
{ git log -1 --format='commit %H %s' 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, peft, lightning, torchao, trl; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__, '| lightning', lightning.__version__, '| torchao', torchao.__version__,
'| trl', trl.__version__, '| capability', torch.cuda.get_device_capability())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ ! -s data/generated/counsel_chat.jsonl ] || [ ! -s data/generated/esconv.jsonl ]; then
  python3 scripts/convert_counsel_chat.py --csv .gpu_data/counsel_chat/20200325_counsel_chat.csv || exit 1
  python3 scripts/convert_esconv.py --input .gpu_data/esconv || exit 1
fi

micro=${MICRO:-10}
deadline=${DEADLINE:-575}  # seconds from the start: a step that cannot finish by then is left out, and said so
bench=(python3 scripts/benchmark.py --recipe therapeutic_h100 --warmup 3 --scratch "$work/scratch")
collect() {  # $1: the benchmark's out dir, $2: the name under $OUT; the failed variants' log tails to failures.log
  [ -f "$1/results.json" ] && cp "$1/results.json" "$OUT/$2"
  for log in "$1"/*.log; do
    grep -q -E "Traceback|Error" "$log" 2>/dev/null && { echo "=== $log"; tail -30 "$log"; } >> "$OUT/failures.log"
  done
  return 0
}
room() {  # $1: the seconds a step needs; false (and a line saying so) when the deadline leaves less
  (( deadline - SECONDS >= $1 )) && return 0
  echo "left out: $2 (needs ~$1 s, $((deadline - SECONDS)) s left)"; return 1
}
# 1. eager bf16 (the recipe as committed), the frozen base in FP8 (cast per micro-batch, and _cached: each weight
#    held in FP8 alone), the TRL peer, and the recipe at the peer's memory (every layer checkpointed): ~5.5 min
variants=real_h100,real_h100_fp8,real_h100_fp8_cached,trl_sft,real_h100_ckptall
"${bench[@]}" --out "$work/main" --only "$variants" --micro-batches "$micro" --timeout 150
collect "$work/main" results_main.json
# 2. loss parity, bf16 against fp8, same seed and data: ~1 min plus ~0.25 s a step
steps=${PARITY_STEPS:-200}
room $((60 + steps / 4)) "loss parity" && "${bench[@]}" --out "$work/parity" --loss-parity --parity-steps "$steps" \
  --parity-layers 8 --timeout 240 && { [ -f "$work/parity/loss_parity.json" ] && cp "$work/parity/loss_parity.json" "$OUT/"
  collect "$work/parity" /dev/null; }
# 3. compile=all from empty caches (COMPILE_WARM=1: then again from the caches it left): ~2.5 min (5 with warm)
room 140 "compile" && "${bench[@]}" --out "$work/compile" \
  --only "real_h100_compile_cold${COMPILE_WARM:+,real_h100_compile_warm}" --micro-batches "${COMPILE_MICRO:-6}" \
  --timeout $((deadline - SECONDS)) && collect "$work/compile" results_compile.json
# 4. where FP8's time goes: its kernels by device time over 3 micro-batches (profiled apart: the profiler's own cost
#    stays out of the timed rows)
room 60 "fp8 profile" && "${bench[@]}" --out "$work/profile" --only "${PROFILE:-real_h100_fp8_cached}" \
  --micro-batches 3 --profile --timeout $((deadline - SECONDS)) && cp "$work/profile/"*.profile.txt "$OUT/" 2>/dev/null
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'variant':26} {'status':12} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'wall s':>7}  compile cache")
for name in ("results_main.json", "results_compile.json"):
    for v, r in (json.loads((out / name).read_text()) if (out / name).exists() else {}).items():
        tps, mfu, mem = r.get("tokens_per_s"), r.get("mfu"), r.get("peak_memory_gib")
        print(f"{v:26} {r['status'][:12]:12} {tps or 0:>9,.0f} {(mfu or 0):>6.1%} {mem or 0:>8.1f} {r.get('wall_s', 0):>7}"
              f"  {r.get('compile_cache') or ''}")
p = out / "loss_parity.json"
if p.exists():
    r = json.loads(p.read_text())
    print("loss parity:", r["status"], {k: r[k] for k in ("compared_steps", "max_rel_gap", "steps_within_1pct") if k in r})
PY
