# GPU call A: stash the model's first half, rerun the speed rows that failed (TRL peer, loss parity), tests/test_gpu.py
mkdir -p /root/stash && cp .carry/m1/part00 /root/stash/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/pyt/*.whl
tar -xJf .carry/data/generated.tar.xz
export PYTHONUNBUFFERED=1; echo "commit $(cat .carry/COMMIT)"
b=(python3 scripts/benchmark.py --recipe therapeutic_h100 --warmup 3 --scratch /tmp/scratch)
"${b[@]}" --out /tmp/trl --only trl_sft --micro-batches 10 --timeout 150 > $OUT/trl.log 2>&1; tail -15 $OUT/trl.log
cp /tmp/trl/results.json $OUT/results_trl.json 2>/dev/null; tail -40 /tmp/trl/trl_sft.log > $OUT/trl_sft_tail.log 2>/dev/null
"${b[@]}" --out /tmp/parity --loss-parity --parity-steps 100 --parity-layers 8 --timeout 170 > $OUT/parity.log 2>&1; tail -8 $OUT/parity.log
cp /tmp/parity/loss_parity.json $OUT/ 2>/dev/null
timeout 230 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > $OUT/test_gpu.log 2>&1; tail -15 $OUT/test_gpu.log
ls -la /root/stash
