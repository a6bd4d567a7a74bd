#!/usr/bin/env bash
# The one prepared GPU run (for the device tool, when a GPU is lent): GPU-marked tests, WSI extraction throughput
# against the bare model in bf16, adapter step time and memory at ViT-B scale. Every result goes to $OUT.
#
#   here, once:   bash benchmarks/gpu_wheels.sh          # the packages the device image lacks, as wheels in .whl/
#   device:       run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
#
# The device image has python3 with torch, timm, peft, lightning, h5py, tifffile, scikit-image; the rest comes
# from .whl/ (no network there). Each step has its own time limit so one slow step cannot eat the others.
set -uo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl > "$OUT/install.txt" 2>&1 || echo "wheel install failed (see install.txt)"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -m pathopeft doctor; } > "$OUT/doctor.txt" 2>&1
cat "$OUT/doctor.txt"
echo "== pytest -m gpu"
timeout 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests > "$OUT/pytest_gpu.txt" 2>&1
tail -5 "$OUT/pytest_gpu.txt"
echo "== WSI extraction vs bare model (bf16, ViT-B/16)"
timeout 200 "$PY" benchmarks/wsi_gpu.py --device cuda --model vit_base_patch16_224 --precision bf16 \
  --out "$OUT/wsi_gpu.md" > "$OUT/wsi_gpu.log" 2>&1
tail -8 "$OUT/wsi_gpu.log"
echo "== adapters at ViT-B scale (batch 64, bf16)"
timeout 150 "$PY" benchmarks/adapters.py --model vit_base_patch16_224 --batch 64 --device cuda --bf16 --rounds 5 \
  --out "$OUT/adapters_vitb.md" > "$OUT/adapters_vitb.log" 2>&1
tail -20 "$OUT/adapters_vitb.log"
