#!/usr/bin/env bash
# Installs what Kalon's tests need besides Rust and what kalonctl installs
# itself (the tansu broker and ONNX Runtime: `kalonctl tools install`), once,
# into a cache folder outside the repository (KALON_CACHE_DIR, default
# ~/.cache/kalon): the Debian packages the build needs, and the Python venvs
# the tests call, and the browser the console's tests drive. Each step is
# skipped when its tool is already there.
set -euo pipefail
cache="${KALON_CACHE_DIR:-$HOME/.cache/kalon}"

# Debian packages first: the venvs below need pip and venv
missing=()
command -v cc >/dev/null || missing+=(build-essential)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v psql >/dev/null || missing+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
# Debian's chromium and its WebDriver: the console's tests drive real pages
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
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
