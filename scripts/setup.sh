#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine (run as root): installs every package the
# build, the tests and the demo need, then builds diskferry into build/ (and build-asan/ and
# build-fuzz/ when DISKFERRY_SETUP_TESTS=1).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # toolchain
  build-essential cmake pkg-config ninja-build clang clang-format libclang-rt-dev
  # libraries (Debian 12 only; nothing vendored)
  libssh-dev zlib1g-dev libzstd-dev libsqlite3-dev libspdlog-dev libfmt-dev libyaml-cpp-dev
  doctest-dev libcli11-dev nlohmann-json3-dev libsystemd-dev libssl-dev
  # reference readers and tools the tests and demo use
  qemu-utils libqcow-utils libvhdi-utils zstd gzip xxd python3 e2fsprogs
  openssh-server openssh-client xfsprogs sqlite3 time util-linux strace
  # SFTP servers the integration tests run on 127.0.0.1
  proftpd-core proftpd-mod-crypto rclone
  # packaging and operations: cpack -G DEB (dpkg-shlibdeps, file), systemd-analyze verify and
  # security on the units, node_exporter reading the textfile metrics
  dpkg-dev file systemd prometheus-node-exporter
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The server packages enable system-wide daemons (ports 21, 22, 9100); tests start their own.
  for s in proftpd ssh prometheus-node-exporter; do
    if [[ -x /etc/init.d/$s ]]; then /etc/init.d/$s stop >/dev/null 2>&1 || true; fi
    update-rc.d "$s" disable >/dev/null 2>&1 || true
    if command -v systemctl >/dev/null; then systemctl disable --now "$s" >/dev/null 2>&1 || true; fi
  done
fi

build() {
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  # Only the compiler's own messages; with pipefail a failed build still fails the script.
  cmake --build "$dir" --parallel "$(nproc)" | { grep -v '^\[' || true; }
}

build build -DDISKFERRY_WERROR=ON
# Extra configurations for the test suite: ASan+UBSan, and libFuzzer targets (clang).
if [[ "${DISKFERRY_SETUP_TESTS:-0}" == 1 ]]; then
  build build-asan -DDISKFERRY_WERROR=ON -DDISKFERRY_SANITIZE=ON
  build build-fuzz -DDISKFERRY_WERROR=ON -DDISKFERRY_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++
fi
