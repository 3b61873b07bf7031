#!/usr/bin/env bash
# Runs every check and test of Machine Bank: the README's test command, and what CI runs.
# Every test binary runs even when one fails (--no-fail-fast), so a run reports all failures.
# Installs what it needs first (scripts/setup.sh), so it works on a fresh Debian 12 machine.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# The fuzz targets (fuzz/, its own workspace), a short budget each: MBANK_FUZZ_SECONDS
# (default 10; 0 skips). scripts/fuzz.sh runs them longer.
fuzz_seconds=${MBANK_FUZZ_SECONDS:-10}
if ((fuzz_seconds > 0)); then
    echo "== fuzz: every target for ${fuzz_seconds}s" >&2
    scripts/fuzz.sh "$fuzz_seconds" || status=$?
fi
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
