#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz + libFuzzer) for SECONDS each (default 60).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Seeds come from fuzz/corpus/<target>/ (kept in the repository); what the fuzzer finds
# on top goes to fuzz/target/corpus/<target>/ (not committed; a later run starts from
# it), crashes to fuzz/artifacts/<target>/. Installs cargo-fuzz if it is missing (once,
# a few minutes). Uses the nightly toolchain when rustup has one, else the stable one
# with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags for the sanitizer). Set
# FUZZ_SANITIZER=none to build without AddressSanitizer (faster, finds fewer bugs).
# Exits 1 if any target crashed, naming it and the input to replay.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
all=(nbd_options nbd_requests chunk_decode index_decode dirty_map commit_body batch_upload batch_get)
targets=("$@")
((${#targets[@]})) || targets=("${all[@]}")

# Longest input per target: enough to reach every limit the parser checks.
declare -A max_len=(
    [nbd_options]=66000 # one option of MAX_OPTION_LEN (64 KiB) with its header
    [nbd_requests]=65536
    [chunk_decode]=65536
    [index_decode]=65536
    [dirty_map]=16384
    [commit_body]=131072
    [batch_upload]=131072
    [batch_get]=65536
)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (once)" >&2
    cargo install cargo-fuzz --locked
fi
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
sanitizer=(--sanitizer "${FUZZ_SANITIZER:-address}")

echo "== fuzz: building (${toolchain[*]:-stable with RUSTC_BOOTSTRAP=1}, ${sanitizer[*]})" >&2
buildlog=$(mktemp)
trap 'rm -f "$buildlog"' EXIT
start=$SECONDS
if ! cargo "${toolchain[@]}" fuzz build "${sanitizer[@]}" >"$buildlog" 2>&1; then
    tail -n 40 "$buildlog" >&2
    echo "fuzz: the build failed" >&2
    exit 1
fi
echo "fuzz: built in $((SECONDS - start))s" >&2

mkdir -p target/corpus target/logs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t"
    log=target/logs/$t.log
    if cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len="${max_len[$t]}" -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
        echo "fuzz: $t: ${runs:-?} inputs in ${seconds}s, no crash" >&2
    else
        echo "fuzz: $t FAILED; the end of its log ($log):" >&2
        tail -n 40 "$log" >&2
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: crashes in ${failed[*]}; replay one with" \
        "cd fuzz && cargo ${toolchain[*]} fuzz run TARGET artifacts/TARGET/crash-..." >&2
    exit 1
fi
