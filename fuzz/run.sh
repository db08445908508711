#!/usr/bin/env bash
# Runs the fuzz targets for SECONDS each (default 60): `fuzz/run.sh [SECONDS] [TARGET...]`.
# Without TARGET, every target of `cargo fuzz list`: decode (the decoder alone), differential
# (the decoder against prost with Google's rules) and block_reader (the log reader).
#
# Works on the stable toolchain: cargo-fuzz passes `-Z` flags (AddressSanitizer, coverage
# instrumentation) to rustc, which stable rustc accepts only with RUSTC_BOOTSTRAP=1.
# A crash stops the run with a non-zero exit and leaves the input in fuzz/artifacts/<target>/.
set -euo pipefail

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "run.sh: SECONDS must be a positive integer, got '$seconds'" >&2
    exit 2
fi
shift || true

cd "$(dirname "$0")"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz is not installed; install it with: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1
# block_reader writes every input to a temp file; on tmpfs that costs a third of what it
# costs on disk, and what is tested (the mapped bytes) is the same.
if [[ -z "${TMPDIR:-}" && -d /dev/shm && -w /dev/shm ]]; then
    export TMPDIR=/dev/shm
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

for target in "${targets[@]}"; do
    echo "== $target: ${seconds}s" >&2
    cargo fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1
done
