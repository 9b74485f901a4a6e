#!/bin/bash
# Second device call: the proposed patch applied to a copy of the snapshot (tests), and a repeat
# of the training/benchmark driver on the unpatched snapshot (run-to-run variation).
set -o pipefail
R=$(pwd); S=$R/.devsnap; L=$OUT/log2.txt
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3 | tee $L
sec() { echo "=== $1 ($(date -u +%T))" | tee -a $L; }
sec "patched copy: tests"
cp -r $S/repo /tmp/patched && cd /tmp/patched && patch -p1 < $S/gpu/gpu_fixes.patch 2>&1 | tee -a $L
PYTHONPATH=/tmp/site:/tmp/patched timeout 120 python3 -m pytest -p no:cacheprovider tests/test_target_torch.py tests/test_stage_benchmark.py tests/test_cli.py -rA --junitxml=$OUT/junit_files_patched.xml 2>&1 | grep -v "^\s*$" | grep -E "^(PASSED|FAILED|SKIPPED|ERROR|=|tests/)" | tee -a $L
echo "pytest patched rc=${PIPESTATUS[0]}" | tee -a $L
sec "repeat: training + benchmark stage (unpatched snapshot)"
mkdir -p /tmp/work && cd /tmp/work
PYTHONPATH=/tmp/site:$S/repo timeout 150 python3 $S/gpu/gpu_train_bench.py $OUT 2>&1 | grep -v "^\s*$" | tee -a $L
echo "train+bench rc=${PIPESTATUS[0]}" | tee -a $L
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a $L
sec done
