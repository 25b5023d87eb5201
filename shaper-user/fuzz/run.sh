#!/usr/bin/env bash
# Runs one fuzz target, seeded from the captured fixtures.
# Usage: shaper-user/fuzz/run.sh <dnswire|sni|quic|hosts> [seconds, default 30]
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz --locked).
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: run.sh <dnswire|sni|quic|hosts> [seconds]}
secs=${2:-30}
case "$target" in
    dnswire) fixtures=../../tests/fixtures/dns ;;
    sni) fixtures=../../tests/fixtures/tls ;;
    quic) fixtures=../../tests/fixtures/quic ;;
    # Event programs, not captures: seeded with the DNS answers (read as programs
    # they are a mix of steps) and grown by the fuzzer.
    hosts) fixtures=../../tests/fixtures/dns ;;
    *) echo "unknown target $target (dnswire, sni, quic, hosts)" >&2; exit 2 ;;
esac
mkdir -p "corpus/$target"
cp "$fixtures"/*.bin "corpus/$target/"
if [ "$target" = quic ]; then
    # Also the TLS captures: the target reads TLS records as a ClientHello to send
    # through QUIC Initials (and the first QUIC capture lives with them).
    cp ../../tests/fixtures/tls/*.bin "corpus/$target/"
fi
# -a: debug assertions and overflow checks on, so an arithmetic overflow is a crash.
exec cargo +nightly fuzz run -a "$target" "corpus/$target" -- -max_total_time="$secs"
