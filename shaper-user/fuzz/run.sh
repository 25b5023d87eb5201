#!/usr/bin/env bash
# Runs one fuzz target, seeded from the captured fixtures.
# Usage: shaper-user/fuzz/run.sh <dnswire|sni> [seconds, default 30]
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked).
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: run.sh <dnswire|sni> [seconds]}
secs=${2:-30}
case "$target" in
    dnswire) fixtures=../../tests/fixtures/dns ;;
    sni) fixtures=../../tests/fixtures/tls ;;
    *) echo "unknown target $target (dnswire, sni)" >&2; exit 2 ;;
esac
mkdir -p "corpus/$target"
cp "$fixtures"/*.bin "corpus/$target/"
# -a: debug assertions and overflow checks on, so an arithmetic overflow is a crash.
exec cargo +nightly fuzz run -a "$target" "corpus/$target" -- -max_total_time="$secs"
