#!/usr/bin/env bash
# Installs the tools Kalon's stack and tests need, once, into a cache folder
# outside the repository (KALON_CACHE_DIR, default ~/.cache/kalon). Each step
# is skipped when its tool is already there.
set -euo pipefail
cache="${KALON_CACHE_DIR:-$HOME/.cache/kalon}"
tansu_version=0.6.0
tansu_root="$cache/tools/tansu-$tansu_version"

if [ ! -x "$tansu_root/bin/tansu" ]; then
  echo "installing tansu $tansu_version into $tansu_root (one time, ~12 minutes on 2 cores)" >&2
  # dynostore gives memory:// storage, libsql gives sqlite:// (survives restarts)
  CARGO_TARGET_DIR="$cache/tansu-build" cargo install tansu --version "$tansu_version" --locked \
    --features dynostore,libsql --root "$tansu_root"
  rm -rf "$cache/tansu-build"
fi

# ONNX Runtime's shared library for the `ort` crate (load-dynamic), taken out
# of PyPI's CPU wheel; the encoder crate finds it here or at ORT_DYLIB_PATH
ort_version=1.31.1
ort_dir="$cache/onnxruntime-$ort_version"
if [ ! -f "$ort_dir/libonnxruntime.so.$ort_version" ]; then
  echo "fetching libonnxruntime.so.$ort_version from PyPI's onnxruntime==$ort_version wheel" >&2
  wheel_dir="$(mktemp -d)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 "onnxruntime==$ort_version" -d "$wheel_dir"
  mkdir -p "$ort_dir.tmp"
  python3 - "$wheel_dir" "$ort_dir.tmp" "$ort_version" <<'PY'
import glob, sys, zipfile
wheel_dir, out, version = sys.argv[1:]
(wheel,) = glob.glob(f"{wheel_dir}/onnxruntime-*.whl")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            with z.open(name) as src, open(f"{out}/{name.rsplit('/', 1)[1]}", "wb") as dst:
                dst.write(src.read())
PY
  rm -rf "$wheel_dir" "$ort_dir"
  mv "$ort_dir.tmp" "$ort_dir"
fi

# Python with the `onnx` package: tests check Kalon's exported models with
# onnx.checker, and tests/fixtures/make_fixtures.py builds foreign models
py_env="$cache/py-onnx"
if [ ! -x "$py_env/bin/python" ] || ! "$py_env/bin/python" -c 'import onnx' 2>/dev/null; then
  echo "installing the onnx Python package into $py_env" >&2
  python3 -m venv "$py_env"
  "$py_env/bin/pip" install -q "onnx==1.23.2" "numpy<3"
fi

# schemathesis: the search API test fuzzes the service against its own
# /openapi.json (its own venv: it pins many packages)
st_env="$cache/py-schemathesis"
st_version=4.32.5
if [ ! -x "$st_env/bin/schemathesis" ] || ! "$st_env/bin/schemathesis" --version 2>/dev/null | grep -q "$st_version"; then
  echo "installing schemathesis $st_version into $st_env" >&2
  python3 -m venv "$st_env"
  "$st_env/bin/pip" install -q "schemathesis==$st_version"
fi

missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v psql >/dev/null || missing+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
