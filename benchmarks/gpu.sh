#!/usr/bin/env bash
# The GPU check, run as one script on a lent GPU machine (its python3 has torch, timm, safetensors,
# huggingface_hub and pyyaml; nothing is downloaded). Prints JSON lines for BENCHMARKS.md's GPU table:
# our training step against a bare PyTorch loop doing the same work (`resnet50-recipe bench step`), ResNet-50
# at 224 px with AMP and channels_last, batch 128 and 256, without and with torch.compile, then once without
# channels_last for contrast.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu tests/test_train.py tests/test_speed.py -p no:cacheprovider || true
bench() { python3 -m resnet50_recipe bench step --model resnet50 --img-size 224 --json "$@"; }
for batch in 128 256; do
  bench --batch-size "$batch"
  bench --batch-size "$batch" --compile
done
bench --batch-size 128 --no-channels-last
