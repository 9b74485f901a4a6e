#!/bin/bash
# Third device call (second run): the pruning chain on CUDA through the stages' own run()
# functions (gpu_prune_chain.py). Run from the repo root of the device copy, with .devsnap
# (the `git archive HEAD` copy in .devsnap/repo, this script in .devsnap/gpu) and .whl carried.
set -o pipefail
R=$(pwd); S=$R/.devsnap; L=$OUT/log3.txt
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3 | tee $L
export PYTHONPATH=/tmp/site:$S/repo
sec() { echo "=== $1 ($(date -u +%T))" | tee -a $L; }
sec env
{ echo "snapshot commit $(cat $S/HEAD_COMMIT)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys,torch,onnxruntime,torch_pruning as tp; print(sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'bf16',torch.cuda.is_bf16_supported(),'ort',onnxruntime.__version__,'tp',tp.__version__)"
} 2>&1 | tee -a $L
sec "pruning chain (gpu_prune_chain.py)"
mkdir -p /tmp/chain && cd /tmp/chain
timeout 170 python3 $S/gpu/gpu_prune_chain.py $OUT 2>&1 | grep -v "^\s*$" | tee -a $L
echo "chain rc=${PIPESTATUS[0]}" | tee -a $L
tar czf $OUT/chain_workspace.tar.gz metrics plots 2>/dev/null; ls -la models | tee -a $L
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw,memory.used --format=csv | tee -a $L
sec done
