#!/usr/bin/env bash
# Kalon's tests: install what is missing, bring the local stack up (Postgres
# and a tansu broker, started only if none answers), run the whole suite
# against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-tools.sh
cargo build --workspace --bins --locked
# tansu and ONNX Runtime, installed the way the main job installs them
cargo run -q --locked -p kalonctl -- tools install
# the stack's Postgres is where tests make their databases
eval "$(cargo run -q --locked -p kalonctl -- stack up)"
export DATABASE_URL
# each test starts its own in-memory tansu broker (KALON_TEST_BROKERS=host:port
# makes them share one instead): no test can slow or break another's broker
unset KALON_KAFKA_BROKERS
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
