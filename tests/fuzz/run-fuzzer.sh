#!/usr/bin/env bash
# Runs one libFuzzer target for a bounded time (FUZZ_SECONDS, default 30) over its seed corpus.
# New inputs go to a scratch directory, so the checked-in corpus only changes by hand (add a
# reproducer there when a crash is fixed). Any crash, leak or sanitizer report fails the test.
set -euo pipefail
target=$1 seeds=$2
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
exec "$target" -max_total_time="${FUZZ_SECONDS:-30}" -rss_limit_mb=2048 -timeout=20 \
  -print_final_stats=1 "$scratch" "$seeds"
