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

missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v psql >/dev/null || missing+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
