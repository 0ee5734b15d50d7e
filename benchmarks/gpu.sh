#!/usr/bin/env bash
# The GPU check, run as one script on a lent GPU machine (its python3 has torch, timm, safetensors,
# huggingface_hub and pyyaml; nothing is downloaded). Prints JSON lines to paste into BENCHMARKS.md:
# ResNet-50 training at 224 px per batch size, AMP + channels_last, then channels_last off for contrast.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu tests/test_train.py -p no:cacheprovider || true
python3 benchmarks/throughput.py --model resnet50 --size 224 --batches 64,128,256 --amp --channels-last
python3 benchmarks/throughput.py --model resnet50 --size 224 --batches 128 --amp --no-channels-last
