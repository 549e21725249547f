#!/usr/bin/env bash
# Builds kalonctl and kalon-bench with the `cuda` feature (candle's CUDA kernels) on a machine
# that has no CUDA toolkit and no GPU: CUDA's compiler, headers and libraries
# come from PyPI's NVIDIA wheels into a cache folder, once; the binary links
# against a stub libcuda.so.1 (the real one comes with the GPU driver where
# the binary runs) and both are copied to $KALON_CACHE_DIR/kalonctl-cuda and
# $KALON_CACHE_DIR/kalon-bench-cuda.
#
#   CUDA_COMPUTE_CAP  the GPU's compute capability for the PTX (default 90:
#                     H100 / H200; 80: A100; 89: L4 / RTX 40xx)
#
# Where it runs it needs an NVIDIA driver for CUDA 13 (>= 580) and the CUDA 13
# libraries on LD_LIBRARY_PATH: libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libnvrtc.so.13, libcudart.so.13 (e.g. PyTorch's cu130
# wheels: site-packages/nvidia/cu13/lib).
set -euo pipefail
cache="${KALON_CACHE_DIR:-$HOME/.cache/kalon}"
cuda="$cache/cuda-13.0"
home="$cuda/nvidia/cu13"

if [ ! -x "$home/bin/nvcc" ] || [ ! -f "$home/lib/libcuda.so" ]; then
  echo "fetching CUDA 13.0 (nvcc, headers, cuBLAS, cuRAND, NVRTC, runtime) from PyPI into $cuda (one time, ~1.2 GB)" >&2
  rm -rf "$cuda.tmp"
  # the compiler's parts are pinned to 13.0 too: PTX from a newer nvvm does
  # not load on a 13.0 driver
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$cuda.tmp" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.0.2.14" \
    "nvidia-curand==10.4.5.25" "nvidia-cuda-nvrtc==13.0.88"
  lib="$cuda.tmp/nvidia/cu13/lib"
  # the linker looks for the unversioned names
  for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13; do
    ln -sf "$so" "$lib/${so%%.so.*}.so"
  done
  # a stub of the driver library: every cu* entry point cudarc can call,
  # each returning an error; only its name (soname libcuda.so.1) is kept
  stub="$(mktemp -d)"
  grep -ohE 'load::<_F>\("cu[A-Za-z0-9_]+"\)' \
    "$(cargo metadata --format-version 1 --locked --features kalonctl/cuda |
      python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')/src/driver/sys/mod.rs" |
    sed -E 's/.*"(cu[A-Za-z0-9_]+)".*/\1/' | sort -u |
    awk '{print "int " $1 "(void) { return 999; }"}' >"$stub/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$stub/stub.c"
  rm -rf "$stub" "$cuda"
  mv "$cuda.tmp" "$cuda"
fi

export CUDA_HOME="$home" PATH="$home/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
target="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}"
cargo build --release --locked -p kalonctl -p kalon-bench --features kalonctl/cuda,kalon-bench/cuda
cp "$target/release/kalonctl" "$cache/kalonctl-cuda"
cp "$target/release/kalon-bench" "$cache/kalon-bench-cuda"
echo "built $cache/kalonctl-cuda and $cache/kalon-bench-cuda (PTX for compute capability $CUDA_COMPUTE_CAP)" >&2
