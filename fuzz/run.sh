#!/usr/bin/env bash
# Run the fuzz targets for longer than CI does (tests/test_fuzz_parsers.py: a few seconds each).
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      default: 60 s, every target
#
# Python targets (fuzz/targets.py, atheris from PyPI): urls sidecar s3_state download_state
# http_headers. Rust targets (fuzz/fuzz_targets, cargo-fuzz from crates.io): mountinfo
# zero_runs; they need `cargo install cargo-fuzz` and run on the stable compiler through
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only sanitizer flags), or on nightly if set.
# Each target keeps its corpus in fuzz/corpus/TARGET (git-ignored) so later runs go on from
# it; a failing input is saved as fuzz/artifacts/TARGET/crash-* and the script exits 1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-60}
shift || true
python_targets=(urls sidecar s3_state download_state http_headers)
rust_targets=(mountinfo zero_runs)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${python_targets[@]}" "${rust_targets[@]}")
python=${PYTHON:-python}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
failed=()
for target in "${selected[@]}"; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    if [[ " ${python_targets[*]} " == *" $target "* ]]; then
        echo "== $target (atheris, ${seconds}s)"
        log="fuzz/artifacts/$target/last-run.log"
        if "$python" fuzz/fuzz_parsers.py "$target" "fuzz/corpus/$target" \
            -max_total_time="$seconds" -artifact_prefix="fuzz/artifacts/$target/" \
            -print_final_stats=1 >"$log" 2>&1; then
            grep -E "^(Done|stat::number_of_executed_units)" "$log"
        else
            grep -v -E "^(#|INFO|WARNING)" "$log" | tail -n 30
            failed+=("$target")
        fi
    elif [[ " ${rust_targets[*]} " == *" $target "* ]]; then
        if ! cargo fuzz --version >/dev/null 2>&1; then
            echo "== $target skipped: cargo-fuzz is not installed (cargo install cargo-fuzz)"
            continue
        fi
        echo "== $target (cargo fuzz, ${seconds}s)"
        log="fuzz/artifacts/$target/last-run.log"
        if RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "fuzz/corpus/$target" -- \
            -max_total_time="$seconds" -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1; then
            grep -E "^Done" "$log"
        else
            tail -n 30 "$log"
            failed+=("$target")
        fi
    else
        echo "unknown target $target; targets: ${python_targets[*]} ${rust_targets[*]}" >&2
        exit 2
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "no failures"
