#!/usr/bin/env bash
# The layout's one hard rule (docs/ARCHITECTURE.md): nothing under crates/ or
# services/ links a crate from sim/ (the simulated world, its LLM endpoint,
# the simulated users). Checked on each package's normal and build
# dependencies as `cargo tree` resolves them; dev-dependencies may use the
# simulator in tests.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
metadata="$(cargo metadata --no-deps --locked --format-version 1)"
list() { # packages whose manifest lies under $1/
  python3 -c '
import json, sys
meta = json.load(sys.stdin)
prefix = sys.argv[1] + "/" + sys.argv[2] + "/"
for p in meta["packages"]:
    if p["manifest_path"].startswith(prefix):
        print(p["name"])
' "$root" "$1" <<<"$metadata"
}
sim=$(list sim)
[ -n "$sim" ] || { echo "check-layout: no packages under sim/" >&2; exit 1; }
failed=0
checked=0
for package in $(list crates) $(list services); do
  tree="$(cargo tree --locked -p "$package" -e normal,build --prefix none --format '{p}')"
  for s in $sim; do
    if grep -q "^$s v" <<<"$tree"; then
      echo "check-layout: $package depends on $s (sim/); production code must not link the simulator" >&2
      cargo tree --locked -p "$package" -e normal,build -i "$s" >&2 || true
      failed=1
    fi
  done
  checked=$((checked + 1))
done
[ "$failed" = 0 ] || exit 1
echo "check-layout: $checked packages under crates/ and services/ link none of: $(echo $sim | tr '\n' ' ')" >&2
