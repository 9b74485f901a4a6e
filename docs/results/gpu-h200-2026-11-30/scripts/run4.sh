set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu18/whl/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/log.txt
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a $OUT/log.txt
for round in 1 2; do for code in old new; do
  CODE=$code PYTHONPATH=/tmp/site:.gpu18/$code timeout 60 python3 .gpu18/bench.py 2>&1 | grep '^{' | tee -a $OUT/log.txt
done; done
