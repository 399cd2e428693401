#!/usr/bin/env bash
# Run the whole chainvault test suite: the one command for a fresh Debian
# machine and for CI.
#
#   1. install the external test tools (scripts/install-test-deps.sh)
#   2. cargo build --workspace --all-targets         (debug)
#   3. cargo nextest run --workspace --no-fail-fast  (unit + integration tests)
#   4. cargo test --workspace --doc                  (doc tests; nextest skips them)
#
# Runnable from any directory. Respects CARGO_TARGET_DIR. Exits non-zero if
# any step fails; every step runs even when an earlier test step failed, and
# a summary at the end says which ones failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Backtraces of the many caught panics in the randomized tests drown the
# messages, which already name file, seed and operation; opt in if needed.
export RUST_BACKTRACE="${CHAINVAULT_RUST_BACKTRACE:-0}"
# CI has 2 cores; do not oversubscribe them.
jobs="${CHAINVAULT_TEST_JOBS:-$(nproc 2>/dev/null || echo 2)}"

step "repository: $ROOT"
step "target dir: ${CARGO_TARGET_DIR:-$ROOT/target}"
cargo --version
rustc --version

step "installing external test tools (scripts/install-test-deps.sh)"
if ! bash "$ROOT/scripts/install-test-deps.sh"; then
    echo "test.sh: FAILED: installing the test dependencies" >&2
    exit 1
fi

step "cargo build --workspace --all-targets"
if ! cargo build --workspace --all-targets -j "$jobs"; then
    echo "test.sh: FAILED: cargo build" >&2
    exit 1
fi

failed=()

logdir="$(mktemp -d)"
trap 'rm -rf "$logdir"' EXIT

step "cargo nextest run --workspace --no-fail-fast"
if ! cargo nextest run --workspace --no-fail-fast --build-jobs "$jobs" \
    --test-threads "$jobs" --failure-output final --status-level slow \
    --final-status-level fail 2>&1 | tee "$logdir/nextest.log"; then
    failed+=("cargo nextest run")
fi

step "cargo test --workspace --doc"
if ! cargo test --workspace --doc -j "$jobs" 2>&1 | tee "$logdir/doc.log"; then
    failed+=("cargo test --doc")
fi

# One plain closing line with the totals of both runners.
sum_of() { # sum_of FILE REGEX: add up the numbers in front of REGEX
    grep -oE "[0-9]+ $2" "$1" 2>/dev/null | awk '{s += $1} END {print s + 0}'
}
summary="$(grep -E '^ *Summary \[' "$logdir/nextest.log" | tail -n1 || true)"
printf '%s\n' "$summary" >"$logdir/summary.log"
n_pass=$(( $(sum_of "$logdir/summary.log" 'passed') ))
n_fail=$(( $(sum_of "$logdir/summary.log" 'failed') + $(sum_of "$logdir/summary.log" 'timed out') ))
grep -E '^test result:' "$logdir/doc.log" >"$logdir/docresult.log" || true
n_pass=$(( n_pass + $(sum_of "$logdir/docresult.log" 'passed') ))
n_fail=$(( n_fail + $(sum_of "$logdir/docresult.log" 'failed') ))

if ((${#failed[@]} > 0)); then
    printf '\ntest.sh: FAILED: %s\n' "${failed[*]}" >&2
    printf 'tests: %d passed, %d failed\n' "$n_pass" "$n_fail"
    exit 1
fi
printf '\ntest.sh: all test steps passed\n'
printf 'tests: %d passed, %d failed\n' "$n_pass" "$n_fail"
