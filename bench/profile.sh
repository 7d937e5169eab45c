#!/usr/bin/env bash
# Variants behind the analysis in docs/benchmarks.md: where diskferry's time goes when a goal of
# bench/run.sh is not met. Uses the test images bench/run.sh builds (run it first).
#
#   bench/profile.sh              # all sections
#   bench/profile.sh compress     # per-cluster zstd: threads, allocator, compression floor
#   bench/profile.sh file         # qcow2 to a file: write vs fsync
#
# Same environment as bench/run.sh (BENCH_DIR, REPS, DISKFERRY, QEMU_IMG). Prints one line per
# variant: median wall s (and the fastest), user s, system s, minor page faults, CPUs used
# (= (user+sys)/wall).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH_DIR=${BENCH_DIR:-/var/tmp/diskferry-bench}
REPS=${REPS:-3}
DISKFERRY=${DISKFERRY:-$ROOT/build/bin/diskferry}
QEMU_IMG=${QEMU_IMG:-qemu-img}
IMG=disk8g.img

if ! cd "$BENCH_DIR" 2>/dev/null || [[ ! -f $IMG ]]; then
  echo "run bench/run.sh qcow2 first (it builds $BENCH_DIR/$IMG)" >&2
  exit 1
fi
PARTS=("$@")
((${#PARTS[@]})) || PARTS=(compress file)

# run LABEL COMMAND...: REPS runs, each with the source's data cached first (as bench/run.sh
# does); prints medians (and the fastest wall time).
run() {
  local label=$1; shift
  local r line all=""
  for ((r = 1; r <= REPS; r++)); do
    rm -f p-out.* p-out.*.partial
    sync
    python3 "$HERE/read_data.py" "$IMG" >/dev/null
    line=$(/usr/bin/time -f '%e %U %S %R' "$@" 2>&1 >/dev/null | tail -n1)
    all+="$line"$'\n'
  done
  rm -f p-out.* p-out.*.partial
  awk -v label="$label" '
    NF == 4 { n++; w[n] = $1; u[n] = $2; s[n] = $3; f[n] = $4 }
    function med(a,   i, j, t, m) {
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    END {
      mw = med(w); lo = w[1]; mu = med(u); ms = med(s); mf = med(f)
      printf "%-52s wall %6.2f (min %5.2f)  user %5.2f  sys %5.2f  faults %7d  CPUs %.2f\n", label, mw, lo, mu, ms, mf, (mu + ms) / mw
    }' <<<"$all"
}

section_compress() {
  echo "== per-cluster zstd (qcow2 --qcow2-compression zstd), $IMG"
  run "qemu-img convert -c -O qcow2 -o compression_type=zstd" \
    "$QEMU_IMG" convert -c -O qcow2 -o compression_type=zstd "$IMG" p-out.qcow2
  run "diskferry --qcow2-compression zstd (default threads)" \
    "$DISKFERRY" convert "$IMG" -O qcow2 --qcow2-compression zstd -o p-out.qcow2
  run "diskferry ... --threads 1" \
    "$DISKFERRY" convert "$IMG" -O qcow2 --qcow2-compression zstd --threads 1 -o p-out.qcow2
  run "diskferry ... --threads 2" \
    "$DISKFERRY" convert "$IMG" -O qcow2 --qcow2-compression zstd --threads 2 -o p-out.qcow2
  # glibc returns freed per-unit buffers to the kernel and faults them back in: keep them.
  run "diskferry ... with malloc kept (GLIBC_TUNABLES)" \
    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=1073741824 \
    "$DISKFERRY" convert "$IMG" -O qcow2 --qcow2-compression zstd -o p-out.qcow2
  echo "-- compression floor: zstd -3 on 64 KiB blocks of the image's data, one core"
  # The image's data extents, concatenated (what any converter must compress).
  python3 - "$IMG" <<'EOF' >p-out.data
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(fd).st_size; pos = 0
while pos < size:
    try: d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError: break
    h = os.lseek(fd, d, os.SEEK_HOLE); off = d
    while off < h:
        b = os.pread(fd, min(8 << 20, h - off), off); sys.stdout.buffer.write(b); off += len(b)
    pos = h
EOF
  zstd -b3 -B64K -i3 p-out.data 2>&1 | tr '\r' '\n' | grep 'MB/s' | tail -n1
  rm -f p-out.data
}

section_file() {
  echo "== qcow2 to a file: page-cache writes and the final fsync, $IMG"
  run "qemu-img convert -O qcow2 (no flush)" "$QEMU_IMG" convert -O qcow2 "$IMG" p-out.qcow2
  run "qemu-img convert -t writeback -O qcow2 (flushes)" \
    "$QEMU_IMG" convert -t writeback -O qcow2 "$IMG" p-out.qcow2
  run "diskferry -o FILE (1 read, fsync)" "$DISKFERRY" convert "$IMG" -O qcow2 -o p-out.qcow2
  run "diskferry -o /dev/null (2 reads, no writes)" "$DISKFERRY" convert "$IMG" -O qcow2 -o /dev/null
  run "dd bs=1M of the same bytes, no fsync" \
    dd if="$IMG" of=p-out.raw bs=1M count=1671 status=none
  run "dd bs=1M of the same bytes, conv=fsync" \
    dd if="$IMG" of=p-out.raw bs=1M count=1671 conv=fsync status=none
}

for p in "${PARTS[@]}"; do "section_$p"; done
