#!/usr/bin/env bash
# The trainer's figures on an NVIDIA GPU, in one run: `kalon-bench align`
# on the machine's CPU and on its GPU, each beside the JAX peer on the same
# device; then, per world seed, `kalonctl eval align` end to end with the
# whole image tower and a beauty head trained on the GPU (a fresh world,
# pretraining, D_po, Ranked DPO, held-out evaluation), and each trained
# model's recorded time and pairs/s.
#
#   bench/gpu_check.sh KALONCTL OUT_DIR
#
# KALONCTL is a `cuda` build (scripts/build-cuda.sh); the benchmark binary is
# BENCH (default: kalon-bench-cuda beside KALONCTL). Needs ORT_DYLIB_PATH
# (ONNX Runtime's CPU library: the evaluation encodes on the CPU), a CUDA 13
# driver, and the CUDA 13 libraries: CUDA_LIBS, else PyTorch's cu130 wheels
# found through python3. A Python with JAX runs the peer (PEER_PYTHON,
# default python3). SEEDS (default "5"), STATE (default a new temp folder:
# worlds and models, reused by a later run given the same one).
# Writes OUT_DIR/eval-align-seed-S.json and align-log-seed-S.jsonl; the rest
# goes to stdout.
set -uo pipefail
bin="$1"
bench="${BENCH:-$(dirname "$bin")/kalon-bench-cuda}"
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
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ldd "$bin" | grep "not found"; then
  echo "missing libraries (CUDA_LIBS=$CUDA_LIBS)" >&2
  exit 1
fi

echo "== bench align on this machine's CPU (Kalon and the JAX peer)"
KALON_TRAIN_DEVICE=cpu JAX_PLATFORMS=cpu timeout 120 "$bench" align --steps 200 \
  --peer-python "${PEER_PYTHON:-python3}" 2>&1
export KALON_TRAIN_DEVICE=cuda
echo "== bench align on the GPU (Kalon on CUDA, the JAX peer on its default backend)"
timeout 120 "$bench" align --steps 1000 --peer-python "${PEER_PYTHON:-python3}" 2>&1

state="${STATE:-$(mktemp -d)}"
for seed in ${SEEDS:-5}; do
  echo "== eval align, world seed $seed: tower + beauty head, trained on CUDA"
  timeout "${EVAL_TIMEOUT:-330}" "$bin" --state-dir "$state" eval align --seed "$seed" \
    --pooling mean-std --tower --adapter beauty --dpo-u 1 --dpo-v 12 --steps 600 \
    --json "$out/eval-align-seed-$seed.json" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -40
  cp "$state/models/aligned-tower-beauty-mean-std-lmm-seed-$seed-10000/align-log.jsonl" \
    "$out/align-log-seed-$seed.jsonl" 2>/dev/null
done
for manifest in "$state"/models/*/kalon-model.json; do
  echo "$manifest"
  python3 -c 'import json,sys; n=json.load(open(sys.argv[1])).get("notes",{}); print({k: n.get(k) for k in ("trainer","seconds","pairs_per_s","pairs","first_loss","final_loss","last_step")})' "$manifest"
done
