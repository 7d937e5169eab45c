#!/usr/bin/env bash
# diskferry benchmark suite: diskferry against qemu-img (and qemu-img + zstd), side by side.
#
#   bench/run.sh                       # every part: qcow2 vhdx compress sparse1t zstd chain
#                                      #   decompress + sftp-loopback sftp-rtt30 sftp-e2e
#   bench/run.sh qcow2 sparse1t        # only some parts
#   bench/run.sh sftp                  # the three sftp-* parts (bench/sftp.py; needs root)
#   bench/run.sh restore               # restore from the loopback sshd: diskferry convert sftp://
#                                      # vs sftp get [+ zstd -d] + qemu-img convert (sftp.py)
#   bench/run.sh chain decompress      # qcow2 backing chains (plain, zlib and zstd bases) to
#                                      # qcow2; inflating compressed clusters, --threads 1 vs 2
#   REPS=5 BENCH_DIR=/mnt/scratch bench/run.sh
#
# Environment:
#   BENCH_DIR   scratch directory for test images and outputs (default /var/tmp/diskferry-bench).
#               Needs ~10 GB free at peak (test images ~1.8 GB, up to 4 outputs of ~1.9 GB at once).
#               Keep it on a real filesystem with SEEK_DATA/SEEK_HOLE (ext4, xfs), not tmpfs.
#   REPS        runs of each command; the median wall time is reported (default 3; the short
#               parts run more: qcow2 and vhdx at least 7, sparse1t at least 5)
#   DISKFERRY   diskferry binary (default <repo>/build/bin/diskferry)
#   QEMU_IMG    qemu-img binary (default qemu-img from PATH)
#   OUT_DIR     where the Markdown results go (default <repo>/bench/out)
#   IDLE_WAIT   before each timed run, wait up to this many seconds for the CPUs to be idle
#               (other builds/tests running skew wall times; default 60, 0 = don't wait)
#   IDLE_BUDGET at most this many seconds of such waiting in the whole run (default 240)
#   IDLE_MAX_BUSY  "idle" means at most this percent of all CPUs busy (default 15)
#   SFTP_LOOPBACK_MIB, SFTP_RTT_MIB, SFTP_RTT_DELAY_MS, SFTP_CIPHER: see bench/sftp.py
#
# The sftp-* parts run bench/sftp.py (diskferry's sftp:// upload against OpenSSH `sftp` and
# `rclone rcat` on a local sshd, and end to end against `qemu-img convert` + `sftp put`); its
# tables are appended to the same results file.
#
# Each timed command runs under /usr/bin/time (peak RSS) with its wall time taken from bash's
# EPOCHREALTIME. Before every timed command: outputs are deleted and `sync` runs (no tool pays for
# another's writeback), the script waits for the CPUs to be idle (see IDLE_WAIT), the source's
# data extents are read so that every tool reads it from the page cache (dropping the caches
# instead is not reliable on a VM).
# Every diskferry output is checked once per run with `qemu-img compare` (and `qemu-img check`);
# a mismatch or a failing command fails the benchmark (exit 1) after the table is written.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
BENCH_DIR=${BENCH_DIR:-/var/tmp/diskferry-bench}
REPS=${REPS:-3}
DISKFERRY=${DISKFERRY:-$ROOT/build/bin/diskferry}
QEMU_IMG=${QEMU_IMG:-qemu-img}
OUT_DIR=${OUT_DIR:-$HERE/out}
ALL_PARTS=(qcow2 vhdx compress sparse1t zstd chain decompress sftp-loopback sftp-rtt30 sftp-e2e)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  echo "Parts: ${ALL_PARTS[*]}"
}

PARTS=()
for a in "$@"; do
  case $a in
    -h | --help) usage; exit 0 ;;
    all) PARTS+=("${ALL_PARTS[@]}") ;;
    qcow2 | vhdx | compress | sparse1t | zstd | chain | decompress | sftp-loopback | sftp-rtt30 | sftp-e2e)
      PARTS+=("$a") ;;
    sftp) PARTS+=(sftp-loopback sftp-rtt30 sftp-e2e) ;;
    restore) PARTS+=(restore) ;;
    *) echo "bench/run.sh: unknown part '$a' (expected: ${ALL_PARTS[*]} or all)" >&2; exit 2 ;;
  esac
done
((${#PARTS[@]})) || PARTS=("${ALL_PARTS[@]}")
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "REPS must be a positive integer" >&2; exit 2; }

die() { echo "bench/run.sh: $*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- prerequisites
[[ -x $DISKFERRY ]] || die "no diskferry binary at $DISKFERRY (build with: cmake --build build)"
for t in "$QEMU_IMG" zstd python3 mkfs.ext4 tar; do
  command -v "$t" >/dev/null || die "$t not found (scripts/setup.sh installs it)"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found: apt-get install time"
mkdir -p "$BENCH_DIR" "$OUT_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
case $BENCH_DIR/ in "$ROOT"/*) die "BENCH_DIR must not be inside the repository ($ROOT)" ;; esac

# Commands are shown and run with short names: `diskferry`, `qemu-img`, files relative to BENCH_DIR.
BIN_DIR=$BENCH_DIR/.bin
mkdir -p "$BIN_DIR"
ln -sfn "$(readlink -f "$DISKFERRY")" "$BIN_DIR/diskferry"
ln -sfn "$(command -v "$QEMU_IMG")" "$BIN_DIR/qemu-img"
ln -sfn "$HERE/read_data.py" "$BIN_DIR/read-data"
export PATH="$BIN_DIR:$PATH"
cd "$BENCH_DIR"

IMG=disk8g.img      # 8 GiB ext4 image with ~1.6 GB of data
SPARSE=sparse1t.img  # 1 TiB raw image with 100 x 1 MiB of random data

# Reads every data extent of a file (SEEK_DATA/SEEK_HOLE), skipping holes: warms the page cache
# like `cat img > /dev/null` would, without reading gigabytes of holes as zeros. Prints bytes read.
read_data() { read-data "$@"; }

# Bytes that hold data according to the file's own map (what a converter must read).
data_bytes() {
  "$QEMU_IMG" map -f raw --output=json "$1" |
    python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# ---------------------------------------------------------------- test images
# Picks regular files under DIR in path order until BUDGET bytes, copies them below staging/real.
copy_budget() {
  local dir=$1 budget=$2 staging=$3
  find "$dir" -xdev -type f -size -64M -printf '%s %P\n' | LC_ALL=C sort -k2 |
    awk -v b="$budget" 'full { next } t + $1 > b { full = 1; next } { t += $1; sub(/^[0-9]+ /, ""); print }' \
      >"$staging/list"
  mkdir -p "$staging/real${dir}"
  tar -C "$dir" -cf - --no-recursion -T "$staging/list" | tar -C "$staging/real${dir}" -xf -
  rm -f "$staging/list"
}

build_disk8g() {
  [[ -f $IMG && -f $IMG.info ]] && return
  log "building $IMG (8 GiB sparse ext4 image, ~1.6 GB of data; cached for later runs)"
  local staging=$BENCH_DIR/staging
  rm -rf "$staging" "$IMG" "$IMG.info"
  mkdir -p "$staging/random"
  # ~650 MB of real, compressible files: binaries, libraries, text.
  copy_budget /usr/bin $((250 << 20)) "$staging"
  copy_budget /usr/lib $((250 << 20)) "$staging"
  copy_budget /usr/share $((150 << 20)) "$staging"
  # 1 GiB of incompressible files of mixed sizes: 8 x 64 MiB, 32 x 8 MiB, 256 x 1 MiB.
  local i
  for i in $(seq 1 8); do head -c 64M /dev/urandom >"$staging/random/big$i.bin"; done
  for i in $(seq 1 32); do head -c 8M /dev/urandom >"$staging/random/mid$i.bin"; done
  mkdir -p "$staging/random/small"
  for i in $(seq 1 256); do head -c 1M /dev/urandom >"$staging/random/small/s$i.bin"; done
  local real_b rand_b nfiles
  real_b=$(du -sb "$staging/real" | cut -f1)
  rand_b=$(du -sb "$staging/random" | cut -f1)
  nfiles=$(find "$staging" -type f | wc -l)
  truncate -s 8G "$IMG.tmp"
  mkfs.ext4 -q -F -L diskferry-bench -d "$staging" "$IMG.tmp"
  # mke2fs leaves some zeroed metadata as unwritten extents, which SEEK_DATA reports as data or
  # not depending on what is in the page cache: copy once so only real data is allocated.
  cp --sparse=always "$IMG.tmp" "$IMG"
  rm -f "$IMG.tmp"
  rm -rf "$staging"
  {
    echo "files=$nfiles"
    echo "real_bytes=$real_b"
    echo "random_bytes=$rand_b"
    echo "virtual_bytes=$(stat -c %s "$IMG")"
    echo "allocated_bytes=$(($(du -B1 "$IMG" | cut -f1)))"
    echo "data_bytes=$(data_bytes "$IMG")"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"$IMG.info"
}

build_sparse1t() {
  [[ -f $SPARSE && -f $SPARSE.info ]] && return
  log "building $SPARSE (1 TiB sparse, 100 x 1 MiB of random data spread over the whole range)"
  rm -f "$SPARSE" "$SPARSE.info"
  truncate -s 1T "$SPARSE.tmp"
  local i off step=$(((1 << 40) / 100))
  for i in $(seq 0 99); do
    # Spread evenly, 4 KiB aligned but deliberately not cluster-aligned (as a real filesystem's).
    off=$((i * step / 4096 * 4096 + (i * 37 % 251) * 4096))
    head -c 1M /dev/urandom | dd of="$SPARSE.tmp" bs=1M seek="$off" oflag=seek_bytes \
      conv=notrunc status=none
  done
  mv "$SPARSE.tmp" "$SPARSE"
  {
    echo "virtual_bytes=$(stat -c %s "$SPARSE")"
    echo "allocated_bytes=$(($(du -B1 "$SPARSE" | cut -f1)))"
    echo "data_bytes=$(data_bytes "$SPARSE")"
  } >"$SPARSE.info"
}

info() { sed -n "s/^$2=//p" "$1.info"; }

# Backing chains for the chain and decompress parts, in BENCH_DIR/chain/ (kept for later runs;
# the clean-up of ./*.qcow2 at the start of a run does not reach them):
#   base.qcow2 <- snap1.qcow2 <- top.qcow2             base: qemu-img convert -O qcow2 of disk8g.img
#   zlib-base.qcow2 <- zlib-snap1.qcow2 <- zlib-top.qcow2   base: qemu-img convert -c (zlib clusters)
#   zstd-base.qcow2 <- zstd-snap1.qcow2 <- zstd-top.qcow2   base: ... -o compression_type=zstd
# The overlays are the same in all three: snap1 gets 1,024 writes of 64 KiB at random
# cluster-aligned offsets over the whole disk and 64 MiB at 6 GiB (free space of the ext4);
# top 512 writes of 64 KiB, 512 writes of 4 KiB (each copies its 64 KiB cluster up from below),
# 32 MiB of `write -z` over data of the base at 2 GiB, and 16 MiB at 7 GiB.
CHAIN=chain
CHAIN_KINDS=(plain zlib zstd)
chain_prefix() { [[ $1 == plain ]] && echo "$CHAIN/" || echo "$CHAIN/$1-"; }
chain_files() { local p; p=$(chain_prefix "$1"); echo "${p}base.qcow2 ${p}snap1.qcow2 ${p}top.qcow2"; }

# qemu-io -c arguments, one per line: COUNT writes of SIZE at random SIZE-aligned offsets below
# LIMIT, pattern byte from the seed (fixed seeds: every chain gets the same writes).
overlay_writes() { # SEED COUNT SIZE LIMIT
  python3 - "$@" <<'PYEOF'
import random, sys
seed, count, size, limit = (int(a) for a in sys.argv[1:])
r = random.Random(seed)
for _ in range(count):
    print(f"write -P {r.randrange(1, 255):#04x} {r.randrange(limit // size) * size} {size}")
PYEOF
}

build_chains() {
  local kind p
  for kind in "${CHAIN_KINDS[@]}"; do
    p=$(chain_prefix "$kind")
    [[ -f ${p}top.qcow2 && -f ${p}top.qcow2.info ]] && continue
    log "building the $kind chain ${p}base.qcow2 <- snap1 <- top (cached for later runs)"
    mkdir -p "$CHAIN"
    rm -f "${p}base.qcow2" "${p}snap1.qcow2" "${p}top.qcow2" "${p}top.qcow2.info"
    case $kind in
      plain) "$QEMU_IMG" convert -O qcow2 "$IMG" "${p}base.qcow2" ;;
      zlib) "$QEMU_IMG" convert -c -O qcow2 "$IMG" "${p}base.qcow2" ;;
      zstd) "$QEMU_IMG" convert -c -O qcow2 -o compression_type=zstd "$IMG" "${p}base.qcow2" ;;
    esac
    # Backing names relative to the overlay's directory, as a snapshot tool writes them.
    "$QEMU_IMG" create -q -f qcow2 -b "$(basename "${p}base.qcow2")" -F qcow2 "${p}snap1.qcow2"
    "$QEMU_IMG" create -q -f qcow2 -b "$(basename "${p}snap1.qcow2")" -F qcow2 "${p}top.qcow2"
    local -a args=()
    mapfile -t w < <(overlay_writes 1 1024 65536 $((8 << 30)); echo "write -P 0x5a 6G 64M")
    for c in "${w[@]}"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "${p}snap1.qcow2" >/dev/null
    args=()
    mapfile -t w < <(overlay_writes 2 512 65536 $((8 << 30)); overlay_writes 3 512 4096 $((8 << 30))
      echo "write -z 2G 32M"; echo "write -P 0xa5 7G 16M")
    for c in "${w[@]}"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "${p}top.qcow2" >/dev/null
    local f files=()
    read -ra files <<<"$(chain_files "$kind")"
    {
      for f in "${files[@]}"; do echo "$(basename "$f")_bytes=$(stat -c %s "$f")"; done
      # Guest bytes that read as data (not zero, not unallocated) through the whole chain.
      echo "data_bytes=$("$QEMU_IMG" map -f qcow2 --output=json "${p}top.qcow2" |
        python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"] and not e["zero"]))')"
      echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"${p}top.qcow2.info"
  done
}

# ---------------------------------------------------------------- timing groups
# A group is one comparison: a baseline command and the commands compared with it, run
# interleaved (rep 1 of each, rep 2 of each, ...). Rows are collected into ROWS for the table.
ROWS=()       # "part|label|command|median|min|runs|cpu|rss_mib|size|ratio|goal|verdict"
FAILURES=()
DETAILS=()

G_PART="" G_SRC="" G_REPS=$REPS G_LABEL=() G_CMD=() G_OUT=() G_CHECK=() G_GOAL=() G_BASE=()

# group PART SOURCE [REPS]
group() { G_PART=$1; G_SRC=$2; G_REPS=${3:-$REPS}; G_LABEL=() G_CMD=() G_OUT=() G_CHECK=() G_GOAL=() G_BASE=(); }

# variant ROLE LABEL COMMAND OUTPUT CHECK GOAL
#   ROLE    base (the reference the ratio divides by), cand (ratio computed), ref (no ratio),
#           base2 (a second reference: cand rows also show their ratio to it, "vs flushed") or
#           self (no ratio; the command prints its own time as the last word of its output)
#   OUTPUT  files the command writes, space-separated (deleted before each run; the first one's
#           size is reported), or ""
#   CHECK   a function run once after the last rep (may set CHK_SIZE, CHK_NOTE); "" for none
#   GOAL    "ratio<=X", "time<=X,rss<=Y" or ""
variant() {
  G_BASE+=("$1"); G_LABEL+=("$2"); G_CMD+=("$3"); G_OUT+=("$4"); G_CHECK+=("$5"); G_GOAL+=("$6")
}

median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ a[NR] = $1 } END {
  if (NR % 2) printf "%.3f", a[(NR + 1) / 2]; else printf "%.3f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Runs one command once; sets T_SEC (wall), T_CPU (user + system), T_KB (peak RSS).
# Returns the command's exit status.
timed() {
  local cmd=$1 tf=$BENCH_DIR/.time.out ef=$BENCH_DIR/.stderr.out t0 t1 rc=0
  t0=$EPOCHREALTIME
  /usr/bin/time -f '%e %M %U %S' -o "$tf" bash -c "$cmd" >"$BENCH_DIR/.stdout.out" 2>"$ef" || rc=$?
  t1=$EPOCHREALTIME
  T_SEC=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
  T_KB=$(tail -n1 "$tf" | awk '{ print $2 }')
  T_CPU=$(tail -n1 "$tf" | awk '{ printf "%.2f", $3 + $4 }')
  return $rc
}

# Busy share (percent) of all CPUs over 0.5 s, from /proc/stat.
cpu_busy() {
  local u n s i w q sq st t0 i0 t1 i1
  read -r _ u n s i w q sq st _ </proc/stat
  t0=$((u + n + s + i + w + q + sq + st)) i0=$((i + w))
  sleep 0.5
  read -r _ u n s i w q sq st _ </proc/stat
  t1=$((u + n + s + i + w + q + sq + st)) i1=$((i + w))
  echo $(((t1 - t0 - (i1 - i0)) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
}

# Other work on the machine (a build, a test run) skews wall times: before each timed run,
# wait until the CPUs are mostly idle, at most IDLE_WAIT seconds per run and IDLE_BUDGET seconds
# in all (so a busy machine cannot stretch the run for ever). Sets RAN_BUSY=1 when it gave up.
IDLE_WAIT=${IDLE_WAIT:-60}
IDLE_BUDGET=${IDLE_BUDGET:-240}
IDLE_MAX_BUSY=${IDLE_MAX_BUSY:-15}
IDLE_WAITED=0
wait_idle() {
  local start=$SECONDS busy said=0
  RAN_BUSY=0
  while :; do
    busy=$(cpu_busy)
    ((busy <= IDLE_MAX_BUSY)) && break
    if ((SECONDS - start >= IDLE_WAIT || IDLE_WAITED + SECONDS - start >= IDLE_BUDGET)); then
      log "  machine still ${busy}% busy: running anyway (noted in the table)"
      RAN_BUSY=1
      break
    fi
    ((said++)) || log "  machine ${busy}% busy (another process): waiting for it to go idle"
    sleep 2
  done
  IDLE_WAITED=$((IDLE_WAITED + SECONDS - start))
}

rm_outputs() { # "FILE [FILE...]"
  local f
  for f in $1; do rm -f "$f" "$f.partial"; done
}

run_group() {
  local n=${#G_CMD[@]} i r f
  local -a times cpus rss err busy
  for ((i = 0; i < n; i++)); do times[i]=""; cpus[i]=""; rss[i]=0; err[i]=""; busy[i]=0; done
  for ((r = 1; r <= G_REPS; r++)); do
    for ((i = 0; i < n; i++)); do
      [[ -n ${err[i]} ]] && continue
      rm_outputs "${G_OUT[i]}"
      sync
      wait_idle
      ((RAN_BUSY)) && busy[i]=$((busy[i] + 1))
      # This VM evicts page cache unused for ~30 s (DAMON pageout), so re-read the source's
      # data right before every run: each tool starts with the whole source in the page cache.
      for f in $G_SRC; do read_data "$f" >/dev/null; done
      log "$G_PART [$r/$G_REPS] ${G_CMD[i]}"
      if timed "${G_CMD[i]}"; then
        # A self-timed command prints "... SECONDS" as its last line: that is its time.
        [[ ${G_BASE[i]} == self ]] && T_SEC=$(tail -n1 .stdout.out | awk '{ print $NF }')
        times[i]+="$T_SEC "
        cpus[i]+="$T_CPU "
        ((T_KB > rss[i])) && rss[i]=$T_KB
      else
        err[i]="failed: $(tail -n3 "$BENCH_DIR/.stderr.out" | tr '\n' ' ' | cut -c1-160)"
        log "  -> ${err[i]}"
        FAILURES+=("$G_PART: ${G_CMD[i]}: ${err[i]}")
      fi
    done
  done
  # Baseline medians for ratios.
  local base_med="" base2_med=""
  for ((i = 0; i < n; i++)); do
    [[ ${G_BASE[i]} == base && -z ${err[i]} ]] && base_med=$(median <<<"${times[i]}")
    [[ ${G_BASE[i]} == base2 && -z ${err[i]} ]] && base2_med=$(median <<<"${times[i]}")
  done
  for ((i = 0; i < n; i++)); do
    local med="—" min="—" runs="—" cpu="—" rssm="—" size="—" ratio="—" goal=${G_GOAL[i]} verdict="—" note=""
    ((busy[i])) && note+=" ($((busy[i])) run(s) under other load)"
    if [[ -z ${err[i]} ]]; then
      med=$(median <<<"${times[i]}")
      min=$(tr ' ' '\n' <<<"${times[i]}" | sed '/^$/d' | sort -g | head -n1)
      cpu=$(median <<<"${cpus[i]}")
      cpu=${cpu%?}
      runs=$(echo "${times[i]}" | xargs | tr ' ' '/')
      rssm=$(mib $((rss[i] * 1024)))
      CHK_SIZE="" CHK_NOTE=""
      local first=${G_OUT[i]%% *}
      [[ -n $first && -f $first ]] && CHK_SIZE=$(stat -c %s "$first")
      if [[ -n ${G_CHECK[i]} ]]; then
        log "$G_PART check: ${G_CHECK[i]}"
        if ! eval "${G_CHECK[i]}"; then
          FAILURES+=("$G_PART: ${G_CMD[i]}: output check failed: $CHK_NOTE")
          note=" **CHECK FAILED: $CHK_NOTE**"
        fi
      fi
      if [[ -n $CHK_SIZE ]]; then
        size="$(mib "$CHK_SIZE") MiB"
        local alloc=""
        [[ -n $first && -f $first ]] && alloc=", $(($(du -B1 "$first" | cut -f1))) allocated (du)"
        DETAILS+=("$G_PART | ${G_LABEL[i]} | $CHK_SIZE bytes$alloc")
      fi
      if [[ ${G_BASE[i]} == cand && -n $base_med ]]; then
        ratio=$(awk -v a="$med" -v b="$base_med" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
      fi
      verdict=$(judge "$goal" "$ratio" "$med" "$rssm")
      if [[ ${G_BASE[i]} == cand && -n $base2_med ]]; then
        ratio+=" ($(awk -v a="$med" -v b="$base2_med" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }') vs flushed)"
      fi
      verdict+=$note
    else
      verdict="**ERROR** (${err[i]})"
    fi
    rm_outputs "${G_OUT[i]}"
    ROWS+=("$G_PART|${G_LABEL[i]}|${G_CMD[i]}|$med|$min|$runs|$cpu|$rssm|$size|$ratio|${goal:-—}|$verdict")
  done
}

# judge GOAL RATIO MEDIAN RSS_MIB -> "met" / "not met" / "—"
judge() {
  local goal=$1 ratio=$2 med=$3 rssm=$4
  [[ -z $goal ]] && { echo "—"; return; }
  awk -v g="$goal" -v ratio="$ratio" -v t="$med" -v m="$rssm" 'BEGIN {
    ok = 1; n = split(g, parts, ",")
    for (i = 1; i <= n; i++) {
      split(parts[i], kv, "<=")
      v = (kv[1] == "ratio") ? ratio : (kv[1] == "time") ? t : (kv[1] == "rss") ? m : ""
      if (v == "—" || v == "") { print "—"; exit }
      if (v + 0 > kv[2] + 0) ok = 0
    }
    print ok ? "met" : "**not met**"
  }'
}

# ---------------------------------------------------------------- output checks
# Each sets CHK_NOTE on failure and returns non-zero; may set CHK_SIZE.
check_image() { # FORMAT SOURCE OUTPUT
  local fmt=$1 src=$2 out=$3 msg rc=0
  msg=$("$QEMU_IMG" compare -f raw -F "$fmt" "$src" "$out" 2>&1) || rc=$?
  if ((rc != 0)); then CHK_NOTE="qemu-img compare: $(echo "$msg" | head -n2 | tr '\n' ' ')"; return 1; fi
  rc=0
  msg=$("$QEMU_IMG" check -f "$fmt" "$out" 2>&1) || rc=$?
  if ((rc == 63)); then return 0; fi  # format without a consistency check
  if ((rc != 0)); then CHK_NOTE="qemu-img check: $(echo "$msg" | head -n3 | tr '\n' ' ')"; return 1; fi
  return 0
}

# Streamed output (-o /dev/null in the timed run): write it once to a file, size and check it.
check_stream() { # FORMAT SOURCE EXTRA_ARGS...
  local fmt=$1 src=$2; shift 2
  local out=stream-check.$fmt rc=0
  rm -f "$out"
  if ! diskferry convert "$src" -O "$fmt" "$@" -o - >"$out" 2>.stderr.out; then
    CHK_NOTE="stream run failed: $(tail -n2 .stderr.out | tr '\n' ' ')"; rm -f "$out"; return 1
  fi
  CHK_SIZE=$(stat -c %s "$out")
  check_image "$fmt" "$src" "$out" || rc=$?
  rm -f "$out"
  return $rc
}

# Outer-compressed stream: write it once, decompress, check.
check_zstd_stream() { # SOURCE
  local src=$1 rc=0
  rm -f stream-check.qcow2.zst stream-check.qcow2
  if ! diskferry convert "$src" -O qcow2 --compress zstd -o - >stream-check.qcow2.zst 2>.stderr.out; then
    CHK_NOTE="stream run failed: $(tail -n2 .stderr.out | tr '\n' ' ')"; return 1
  fi
  CHK_SIZE=$(stat -c %s stream-check.qcow2.zst)
  zstd -q -d stream-check.qcow2.zst -o stream-check.qcow2 || { CHK_NOTE="zstd -d failed"; rc=1; }
  ((rc == 0)) && { check_image qcow2 "$src" stream-check.qcow2 || rc=$?; }
  rm -f stream-check.qcow2.zst stream-check.qcow2
  return $rc
}

# A qcow2 made from a chain: the same disk as the chain (qemu-img compare), consistent
# (qemu-img check), and the same disk as qemu-img's own conversion of the chain (made here once).
check_chain() { # TOP OUTPUT
  local top=$1 out=$2 msg rc=0
  msg=$("$QEMU_IMG" compare -f qcow2 -F qcow2 "$top" "$out" 2>&1) || rc=$?
  if ((rc != 0)); then CHK_NOTE="qemu-img compare with $top: $(echo "$msg" | head -n2 | tr '\n' ' ')"; return 1; fi
  msg=$("$QEMU_IMG" check -f qcow2 "$out" 2>&1) || rc=$?
  if ((rc != 0)); then CHK_NOTE="qemu-img check: $(echo "$msg" | head -n3 | tr '\n' ' ')"; return 1; fi
  rm -f chain-check-qemu.qcow2
  "$QEMU_IMG" convert -O qcow2 "$top" chain-check-qemu.qcow2
  msg=$("$QEMU_IMG" compare -f qcow2 -F qcow2 chain-check-qemu.qcow2 "$out" 2>&1) || rc=$?
  rm -f chain-check-qemu.qcow2
  if ((rc != 0)); then CHK_NOTE="qemu-img compare with qemu-img's output: $(echo "$msg" | head -n2 | tr '\n' ' ')"; return 1; fi
  return 0
}

# Raw output streamed to /dev/null in the timed runs: once more into a (sparse) file, compared.
check_raw() { # IMAGE EXTRA_ARGS...
  local img=$1 out=raw-check.raw rc=0 msg; shift
  rm -f "$out"
  if ! diskferry convert "$img" -O raw "$@" -o "$out" 2>.stderr.out; then
    CHK_NOTE="run into a file failed: $(tail -n2 .stderr.out | tr '\n' ' ')"; rm -f "$out"; return 1
  fi
  CHK_SIZE=$(stat -c %s "$out")
  msg=$("$QEMU_IMG" compare -f qcow2 -F raw "$img" "$out" 2>&1) || rc=$?
  ((rc == 0)) || CHK_NOTE="qemu-img compare: $(echo "$msg" | head -n2 | tr '\n' ' ')"
  rm -f "$out"
  return $rc
}

# The qemu-img + zstd pipeline keeps its temporary qcow2: report both sizes.
check_pipeline() {
  CHK_SIZE=$(stat -c %s out-pipe.qcow2.zst)
  DETAILS+=("zstd | qemu-img + zstd | temporary out-pipe.qcow2: $(stat -c %s tmp-pipe.qcow2) bytes \
($(mib "$(stat -c %s tmp-pipe.qcow2)") MiB apparent, $(mib $(($(du -B1 tmp-pipe.qcow2 | cut -f1)))) MiB allocated)")
  rm -f tmp-pipe.qcow2
}

warm() { # IMAGE [IMAGE...]
  local t0=$EPOCHREALTIME b=0 f
  for f in "$@"; do b=$((b + $(read_data "$f"))); done
  log "warm-up: read $(mib "$b") MiB of data extents of $* in \
$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }') s"
}

# ---------------------------------------------------------------- parts
part_qcow2() {
  warm "$IMG"
  # Runs take ~1 s, and writing 1.7 GB into the page cache costs 0.4 s or 2-4 s of system time at
  # random on this VM (any writer, dd too; see docs/benchmarks.md): at least 7 reps.
  group qcow2 "$IMG" $((REPS < 7 ? 7 : REPS))
  variant base "qemu-img" "qemu-img convert -O qcow2 $IMG q-qemu.qcow2" q-qemu.qcow2 "" ""
  # qemu-img's default cache mode for the target (unsafe) never flushes; diskferry fsyncs before
  # it renames DEST.partial into place. -t writeback makes qemu-img flush too: the fair pairing.
  variant base2 "qemu-img, flushed (-t writeback)" \
    "qemu-img convert -t writeback -O qcow2 $IMG q-qemu-wb.qcow2" q-qemu-wb.qcow2 "" ""
  variant cand "diskferry, stream (2 reads)" "diskferry convert $IMG -O qcow2 -o /dev/null" "" \
    "check_stream qcow2 $IMG" "ratio<=1.0"
  variant cand "diskferry, file (1 read)" "diskferry convert $IMG -O qcow2 -o q-df.qcow2" q-df.qcow2 \
    "check_image qcow2 $IMG q-df.qcow2" "ratio<=1.0"
  run_group
}

part_vhdx() {
  warm "$IMG"
  group vhdx "$IMG" $((REPS < 7 ? 7 : REPS))
  variant base "qemu-img" "qemu-img convert -O vhdx $IMG v-qemu.vhdx" v-qemu.vhdx "" ""
  variant base2 "qemu-img, flushed (-t writeback)" \
    "qemu-img convert -t writeback -O vhdx $IMG v-qemu-wb.vhdx" v-qemu-wb.vhdx "" ""
  variant cand "diskferry, stream (2 reads)" "diskferry convert $IMG -O vhdx -o /dev/null" "" \
    "check_stream vhdx $IMG" "ratio<=1.0"
  variant cand "diskferry, file (1 read)" "diskferry convert $IMG -O vhdx -o v-df.vhdx" v-df.vhdx \
    "check_image vhdx $IMG v-df.vhdx" "ratio<=1.0"
  run_group
}

part_compress() {
  warm "$IMG"
  group compress-zstd "$IMG"
  variant base "qemu-img -c zstd" \
    "qemu-img convert -c -O qcow2 -o compression_type=zstd $IMG c-qemu-zstd.qcow2" \
    c-qemu-zstd.qcow2 "" ""
  variant cand "diskferry zstd clusters" \
    "diskferry convert $IMG -O qcow2 --qcow2-compression zstd -o c-df-zstd.qcow2" c-df-zstd.qcow2 \
    "check_image qcow2 $IMG c-df-zstd.qcow2" "ratio<=0.5"
  run_group
  group compress-zlib "$IMG"
  variant base "qemu-img -c (zlib)" "qemu-img convert -c -O qcow2 $IMG c-qemu-zlib.qcow2" \
    c-qemu-zlib.qcow2 "" ""
  variant cand "diskferry zlib clusters" \
    "diskferry convert $IMG -O qcow2 --qcow2-compression zlib -o c-df-zlib.qcow2" c-df-zlib.qcow2 \
    "check_image qcow2 $IMG c-df-zlib.qcow2" ""
  run_group
}

part_sparse1t() {
  warm "$SPARSE"
  # Runs take ~0.1 s, so noise matters: at least 5 reps.
  group sparse1t "$SPARSE" $((REPS < 5 ? 5 : REPS))
  variant self "reference: find and read the 100 MiB of data (page cache), timed inside" \
    "read-data --time $SPARSE" "" "" ""
  variant base "qemu-img" "qemu-img convert -O qcow2 $SPARSE s-qemu.qcow2" s-qemu.qcow2 "" ""
  variant cand "diskferry, stream (2 reads)" "diskferry convert $SPARSE -O qcow2 -o /dev/null" "" \
    "check_stream qcow2 $SPARSE" "time<=1.0,rss<=64"
  variant cand "diskferry, file (1 read)" "diskferry convert $SPARSE -O qcow2 -o s-df.qcow2" \
    s-df.qcow2 "check_image qcow2 $SPARSE s-df.qcow2" "time<=1.0,rss<=64"
  run_group
}

part_zstd() {
  warm "$IMG"
  group zstd "$IMG"
  variant base "qemu-img + zstd -T0 (temp file)" \
    "qemu-img convert -O qcow2 $IMG tmp-pipe.qcow2 && zstd -T0 -q tmp-pipe.qcow2 -o out-pipe.qcow2.zst" \
    "out-pipe.qcow2.zst tmp-pipe.qcow2" "check_pipeline" ""
  variant cand "diskferry --compress zstd" \
    "diskferry convert $IMG -O qcow2 --compress zstd -o - >/dev/null" "" "check_zstd_stream $IMG" ""
  run_group
}

# qcow2 -> qcow2 of a backing chain (issue 5: no slower than qemu-img to a file). qemu-img's
# default target cache mode (unsafe) never flushes; diskferry fsyncs DEST.partial before the
# rename (and a stdout that is a regular file at the end), so -t writeback is shown too; and
# diskferry through stdout into a file (planned layout: the chain is read twice).
part_chain() {
  local kind top files p reps
  for kind in "${CHAIN_KINDS[@]}"; do
    p=$(chain_prefix "$kind")
    top=${p}top.qcow2
    files=$(chain_files "$kind")
    # shellcheck disable=SC2086
    warm $files
    reps=$REPS
    [[ $kind == plain ]] && reps=$((REPS < 7 ? 7 : REPS))  # ~1 s runs: see part_qcow2
    group "chain-$kind" "$files" "$reps"
    variant base "qemu-img" "qemu-img convert -O qcow2 $top ch-qemu.qcow2" ch-qemu.qcow2 "" ""
    variant base2 "qemu-img, flushed (-t writeback)" \
      "qemu-img convert -t writeback -O qcow2 $top ch-qemu-wb.qcow2" ch-qemu-wb.qcow2 "" ""
    variant cand "diskferry, file (1 read, fsync)" "diskferry convert $top -O qcow2 -o ch-df.qcow2" \
      ch-df.qcow2 "check_chain $top ch-df.qcow2" "ratio<=1.0"
    variant cand "diskferry --no-sync, file (1 read; no fsync, as qemu-img)" \
      "diskferry convert $top -O qcow2 --no-sync -o ch-df-ns.qcow2" ch-df-ns.qcow2 \
      "check_chain $top ch-df-ns.qcow2" "ratio<=1.0"
    variant cand "diskferry, stdout to a file (2 reads, fsync)" \
      "diskferry convert $top -O qcow2 -o - >ch-df-stdout.qcow2" ch-df-stdout.qcow2 \
      "check_chain $top ch-df-stdout.qcow2" "ratio<=1.0"
    variant cand "diskferry, stream (2 reads, no writes)" \
      "diskferry convert $top -O qcow2 -o /dev/null" "" "" ""
    run_group
  done
}

# Inflating compressed clusters (issue 5: on all cores): the zlib and zstd bases to raw on
# /dev/null (no writes: the reading and inflating alone), --threads 1 against --threads 2.
part_decompress() {
  local kind base
  for kind in zlib zstd; do
    base=$(chain_prefix "$kind")base.qcow2
    warm "$base"
    group "decompress-$kind" "$base"
    variant base "diskferry --threads 1" \
      "diskferry convert $base -O raw --threads 1 -o - >/dev/null" "" "" ""
    variant cand "diskferry --threads 2" \
      "diskferry convert $base -O raw --threads 2 -o - >/dev/null" "" "check_raw $base --threads 2" ""
    run_group
  done
}

# The sftp-* parts: bench/sftp.py runs them (one sshd per part, its own table), once for all of
# the requested ones, after the other parts; its Markdown section goes into the results file.
part_sftp_loopback() { SFTP_PARTS+=(loopback); }
part_sftp_rtt30() { SFTP_PARTS+=(rtt30); }
part_sftp_e2e() { SFTP_PARTS+=(e2e); }
part_restore() { SFTP_PARTS+=(restore); }  # not in `all`: needs root, ~8 GiB of outputs
SFTP_MD=""
run_sftp() {
  SFTP_MD=$BENCH_DIR/.sftp-section.md
  rm -f "$SFTP_MD"
  log "sftp parts: bench/sftp.py ${SFTP_PARTS[*]}"
  local budget=$((IDLE_BUDGET > IDLE_WAITED ? IDLE_BUDGET - IDLE_WAITED : 0))
  if ! BENCH_DIR=$BENCH_DIR REPS=$REPS DISKFERRY=$DISKFERRY QEMU_IMG=$QEMU_IMG IDLE_WAIT=$IDLE_WAIT \
    IDLE_BUDGET=$budget IDLE_MAX_BUSY=$IDLE_MAX_BUSY python3 "$HERE/sftp.py" "${SFTP_PARTS[@]}" \
    --md-out "$SFTP_MD" >/dev/null; then
    FAILURES+=("sftp: bench/sftp.py ${SFTP_PARTS[*]} failed (see its FAILURES section)")
  fi
}

# ---------------------------------------------------------------- main
START=$EPOCHREALTIME
need_img=0 need_sparse=0
for p in "${PARTS[@]}"; do
  case $p in sparse1t) need_sparse=1 ;; sftp-loopback | sftp-rtt30) ;; *) need_img=1 ;; esac
done
((need_img)) && build_disk8g
((need_sparse)) && build_sparse1t
for p in "${PARTS[@]}"; do [[ $p == chain || $p == decompress ]] && { build_chains; break; }; done
rm -f ./*.qcow2 ./*.vhdx ./*.zst ./*.partial

SFTP_PARTS=()
for p in "${PARTS[@]}"; do "part_${p//-/_}"; done
((${#SFTP_PARTS[@]})) && run_sftp

# ---------------------------------------------------------------- report
machine() {
  echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "- RAM: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  # shellcheck disable=SC1091
  echo "- Kernel: $(uname -r); $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "- BENCH_DIR: $BENCH_DIR on $(findmnt -n -o FSTYPE,SOURCE -T "$BENCH_DIR" | xargs)"
  echo "- $("$QEMU_IMG" --version | head -n1)"
  echo "- zstd $(zstd --version | grep -o 'v[0-9.]*' | head -n1)"
  local rev dirty=""
  rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  # Only the code that goes into the binary counts (bench/ and docs/ do not).
  [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no -- lib cli CMakeLists.txt 2>/dev/null) ]] &&
    dirty=" (with uncommitted changes in lib/ or cli/)"
  echo "- $(diskferry --version), commit $rev$dirty"
  echo "- REPS=$REPS (median wall time; CPU = median user+system seconds; peak RSS = maximum over the runs)"
  echo "- Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); each timed run first waited for the CPUs" \
    "to be <= ${IDLE_MAX_BUSY}% busy (at most ${IDLE_WAIT}s each, ${IDLE_BUDGET}s in all; ${IDLE_WAITED}s spent)"
}

images() {
  if [[ -f $IMG.info ]]; then
    echo "- \`$IMG\`: $(mib "$(info "$IMG" virtual_bytes)") MiB virtual, ext4 made by \`mkfs.ext4 -d\`," \
      "$(info "$IMG" files) files: $(mib "$(info "$IMG" real_bytes)") MiB of real files from" \
      "/usr/bin, /usr/lib, /usr/share + $(mib "$(info "$IMG" random_bytes)") MiB of /dev/urandom;" \
      "$(mib "$(info "$IMG" allocated_bytes)") MiB allocated (du), $(mib "$(info "$IMG" data_bytes)") MiB data extents (qemu-img map)"
  fi
  if [[ -f $SPARSE.info ]]; then
    echo "- \`$SPARSE\`: $(mib "$(info "$SPARSE" virtual_bytes)") MiB virtual (1 TiB), 100 x 1 MiB of" \
      "/dev/urandom spread over the range; $(mib "$(info "$SPARSE" data_bytes)") MiB data extents"
  fi
  local kind p f sizes
  for kind in "${CHAIN_KINDS[@]}"; do
    p=$(chain_prefix "$kind")
    [[ -f ${p}top.qcow2.info ]] || continue
    sizes=""
    for f in $(chain_files "$kind"); do
      sizes+="${sizes:+ / }$(mib "$(info "${p}top.qcow2" "$(basename "$f")_bytes")")"
    done
    echo "- chain \`${p}top.qcow2\` ($kind base): base / snap1 / top files $sizes MiB;" \
      "$(mib "$(info "${p}top.qcow2" data_bytes)") MiB of guest data through the chain (qemu-img map)"
  done
}

table() {
  echo "| part | tool | command | median s | min s | runs s | CPU s | peak RSS MiB | output | ratio to qemu-img | goal | verdict |"
  echo "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---|"
  local r
  for r in "${ROWS[@]}"; do
    IFS='|' read -r part label cmd med min runs cpu rss size ratio goal verdict <<<"$r"
    cmd=${cmd//|/\\|}
    echo "| $part | $label | \`$cmd\` | $med | $min | $runs | $cpu | $rss | $size | $ratio | $goal | $verdict |"
  done
}

STAMP=$(date +%Y-%m-%d-%H%M%S)
RESULT=$OUT_DIR/results-$STAMP.md
{
  echo "# diskferry benchmark, $(date -u +'%Y-%m-%d %H:%M UTC')"
  echo
  echo "Parts: ${PARTS[*]}. Ratio = command's median / the qemu-img baseline's median in the same part."
  echo "The source's data was read right before every timed run, so all tools read it from the page cache."
  echo
  machine
  images
  echo
  ((${#ROWS[@]})) && table
  [[ -n $SFTP_MD && -f $SFTP_MD ]] && { echo; cat "$SFTP_MD"; }
  if ((${#DETAILS[@]})); then
    echo
    echo "Output sizes in bytes (apparent size; allocated where the output was a file):"
    echo
    for d in "${DETAILS[@]}"; do echo "- $d"; done
  fi
  if ((${#FAILURES[@]})); then
    echo
    echo "FAILURES:"
    echo
    for f in "${FAILURES[@]}"; do echo "- $f"; done
  fi
  echo
  echo "Total benchmark time: $(awk -v a="$START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"
} >"$RESULT"
cat "$RESULT"
log "results written to $RESULT"
rm -f .time.out .stderr.out .stdout.out .sftp-section.md
((${#FAILURES[@]} == 0)) || { log "${#FAILURES[@]} failure(s)"; exit 1; }
