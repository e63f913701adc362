#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60); exits non-zero if any target crashed.
#
#   fuzz/run.sh            # 60 s per target
#   fuzz/run.sh 20         # the CI smoke run
#   SANITIZER=none fuzz/run.sh 600
#
# Only the stable toolchain is needed. cargo-fuzz builds with `-Zsanitizer=address` by default,
# which stable rustc accepts with RUSTC_BOOTSTRAP=1 (the AddressSanitizer runtime ships with the
# stable toolchain for x86_64-unknown-linux-gnu); SANITIZER=none builds without it.
# Builds with debug assertions and overflow checks (-a), as the relay's dev profile does.
# cargo-fuzz is installed from crates.io if missing. Target dir: $CARGO_TARGET_DIR if set
# (cargo-fuzz passes it through), else fuzz/target. Corpora grow in fuzz/corpus/TARGET,
# crashing inputs land in fuzz/artifacts/TARGET (both git-ignored); inputs kept in
# fuzz/regressions/TARGET-* are replayed first.
set -uo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-60}"
SANITIZER="${SANITIZER:-address}"
TARGETS=(frames ring_consumer)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 2
fi

export RUSTC_BOOTSTRAP=1
FLAGS=(-a --sanitizer "$SANITIZER")

echo "== building ${TARGETS[*]} (sanitizer: $SANITIZER)"
cargo fuzz build "${FLAGS[@]}" || exit 2

failed=()
for t in "${TARGETS[@]}"; do
    # Inputs that once crashed a target (regressions/TARGET-*) must keep passing.
    regressions=(regressions/"$t"-*)
    if [ -e "${regressions[0]}" ]; then
        echo "== $t: replaying ${#regressions[@]} regression input(s)"
        if ! cargo fuzz run "${FLAGS[@]}" "$t" "${regressions[@]}" >/dev/null 2>&1; then
            failed+=("$t (regression)")
            echo "!! $t fails a regression input: cargo fuzz run ${FLAGS[*]} $t ${regressions[*]}"
        fi
    fi
    echo "== $t for ${SECONDS_PER_TARGET}s"
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    # -timeout: one input running longer than 10 s is a hang, reported like a crash.
    cargo fuzz run "${FLAGS[@]}" "$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    grep -E "^Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb" "$log"
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        echo "!! $t failed (exit $rc):"
        grep -E -A30 "^==[0-9]+==ERROR|panicked at|^SUMMARY|Test unit written" "$log" | head -60
    fi
    rm -f "$log"
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "== FAILED: ${failed[*]} (inputs in fuzz/artifacts/; replay: cargo fuzz run ${FLAGS[*]} TARGET ARTIFACT)"
    exit 1
fi
echo "== all targets ran ${SECONDS_PER_TARGET}s without a crash"
