#!/bin/bash
# Device check script: run from the repo root of the device copy, with .devsnap and .whl carried.
set -o pipefail
R=$(pwd); S=$R/.devsnap; L=$OUT/log.txt
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3 | tee $L
export PYTHONPATH=/tmp/site:$S/repo
sec() { echo "=== $1 ($(date -u +%T))" | tee -a $L; }
sec env
{ echo "snapshot commit $(cat $S/HEAD_COMMIT)"; nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys,torch,torchvision,onnx,onnxruntime,numpy,pydantic,ruamel.yaml,torch_pruning as tp; print(sys.version); print('torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'available',torch.cuda.is_available(),torch.cuda.device_count(),torch.cuda.get_device_name(0),torch.cuda.get_device_capability(0)); print('torchvision',torchvision.__version__,'onnx',onnx.__version__,'onnxruntime',onnxruntime.__version__,'numpy',numpy.__version__,'pydantic',pydantic.__version__,'ruamel.yaml',ruamel.yaml.__version__,'torch_pruning',tp.__version__)"
  for t in sshd ssh ssh-keygen dvc trtexec; do echo "$t: $(command -v $t || echo absent)"; done
  for m in tensorrt pycuda openvino executorch onnxsim onnxslim; do python3 -c "import $m" >/dev/null 2>&1 && echo "$m: importable" || echo "$m: not importable"; done
  echo "cpus $(nproc)"; uname -r; } 2>&1 | tee -a $L
cd $S/repo
sec "pytest -m gpu tests"
timeout 100 python3 -m pytest -p no:cacheprovider -m gpu tests -rA --junitxml=$OUT/junit_gpu.xml 2>&1 | tee -a $L
echo "pytest -m gpu rc=${PIPESTATUS[0]}" | tee -a $L
sec "training + benchmark stage (gpu_train_bench.py)"
mkdir -p /tmp/work && cd /tmp/work
timeout 180 python3 $S/gpu/gpu_train_bench.py $OUT 2>&1 | tee -a $L
echo "train+bench rc=${PIPESTATUS[0]}" | tee -a $L
cd $S/repo
sec "CLI"
{ timeout 20 python3 -m targets.cli targets; echo "rc=$?"
  timeout 40 python3 -m targets.cli bench /tmp/work/bench/models/teacher.pt --target torch-cuda-graphs --batch 1 64 --min-seconds 0.5; echo "rc=$?"; } 2>&1 | tee -a $L
sec "pytest test_target_torch test_stage_benchmark test_cli"
timeout 140 python3 -m pytest -p no:cacheprovider tests/test_target_torch.py tests/test_stage_benchmark.py tests/test_cli.py -rA --junitxml=$OUT/junit_files.xml 2>&1 | tee -a $L
echo "pytest files rc=${PIPESTATUS[0]}" | tee -a $L
(cd /tmp/work && tar czf $OUT/workspace.tar.gz --exclude='*.npz' --exclude='*.pt' */metrics */plots 2>/dev/null)
sec done
