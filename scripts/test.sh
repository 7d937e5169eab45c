#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine (as root): installs what it needs, builds
# the normal (-Werror), sanitizer (ASan+UBSan) and fuzzing configurations, and runs every test:
# unit and integration tests in the first two, each libFuzzer target for FUZZ_SECONDS in the last.
set -euo pipefail
cd "$(dirname "$0")/.."

DISKFERRY_SETUP_TESTS=1 scripts/setup.sh

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
export FUZZ_SECONDS=${FUZZ_SECONDS:-30}
for dir in build build-asan build-fuzz; do
  echo "== ctest in $dir =="
  ctest --test-dir "$dir" --output-on-failure --timeout 1500 -j2 || status=1
done
exit $status
