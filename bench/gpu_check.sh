#!/usr/bin/env bash
# The trainer's figures on an NVIDIA GPU, in one run: `kalonctl bench align`
# on the GPU beside the JAX peer on the same GPU, then `kalonctl eval align`
# end to end with the whole image tower trained on the GPU (a fresh world,
# pretraining, D_po, Ranked DPO, held-out evaluation), and each trained
# model's recorded time and pairs/s.
#
#   bench/gpu_check.sh KALONCTL OUT_DIR
#
# KALONCTL is a `cuda` build (scripts/build-cuda.sh). Needs ORT_DYLIB_PATH
# (ONNX Runtime's CPU library: the evaluation encodes on the CPU), a CUDA 13
# driver, and the CUDA 13 libraries: CUDA_LIBS, else PyTorch's cu130 wheels
# found through python3. A Python with JAX runs the peer (PEER_PYTHON,
# default python3).
set -uo pipefail
bin="$1"
out="$2"
mkdir -p "$out"
if [ -z "${CUDA_LIBS:-}" ]; then
  CUDA_LIBS="$(python3 - <<'PY'
import glob, os, nvidia
for root in nvidia.__path__:
    for lib in glob.glob(os.path.join(root, "*", "lib", "libcublas.so.13")):
        print(os.path.dirname(lib))
        raise SystemExit
PY
)"
fi
export LD_LIBRARY_PATH="${CUDA_LIBS}:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if ldd "$bin" | grep "not found"; then
  echo "missing libraries (CUDA_LIBS=$CUDA_LIBS)" >&2
  exit 1
fi

echo "== bench align on this machine's CPU (Kalon and the JAX peer)"
KALON_TRAIN_DEVICE=cpu JAX_PLATFORMS=cpu timeout 120 "$bin" bench align --steps 200 \
  --peer-python "${PEER_PYTHON:-python3}" 2>&1 | tee "$out/bench-align-cpu.txt"
export KALON_TRAIN_DEVICE=cuda
echo "== bench align on the GPU (Kalon on CUDA, the JAX peer on its default backend)"
timeout 120 "$bin" bench align --steps 1000 --peer-python "${PEER_PYTHON:-python3}" 2>&1 | tee "$out/bench-align.txt"

echo "== eval align, tower + beauty head, trained on CUDA"
state="$(mktemp -d)"
timeout "${EVAL_TIMEOUT:-330}" "$bin" --state-dir "$state" eval align --seed "${SEED:-5}" \
  --pooling mean-std --tower --adapter beauty --dpo-u 1 --dpo-v 12 --steps 600 \
  --json "$out/eval-align.json" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -60 | tee "$out/eval-align.txt"
for manifest in "$state"/models/*/kalon-model.json; do
  echo "$manifest"
  python3 -c 'import json,sys; n=json.load(open(sys.argv[1])).get("notes",{}); print({k: n.get(k) for k in ("trainer","seconds","pairs_per_s","pairs","first_loss","final_loss","last_step")})' "$manifest"
done | tee "$out/models.txt"
cp "$state"/models/aligned-*/align-log.jsonl "$out/" 2>/dev/null
