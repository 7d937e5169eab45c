#!/usr/bin/env bash
# The main job, end to end on this machine. First the product as it runs every night
# (scripts/demo_backup.py: a chroot SFTP server, a VM disk on XFS with reflink, a config,
# enqueue, diskferryd --once, qemu-img compare on the server's file); then the streaming
# converter alone: a sample sparse VM disk into qcow2 and VHDX through pipes (what
# `qemu-img convert ... -` cannot do), judged by qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
python3 scripts/demo_backup.py build/bin
DF=$PWD/build/bin/diskferry
WORK=${DEMO_DIR:-/var/tmp/diskferry-demo}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "A 4 GiB sparse disk holding an ext4 filesystem with real files and 64 MiB of random data"
mkdir -p content && cp -r /usr/share/doc content/doc 2>/dev/null || true
head -c 64M /dev/urandom > content/random.bin
truncate -s 4G disk.img
mkfs.ext4 -q -F -d content disk.img
echo "disk.img: $(du -h --apparent-size disk.img | cut -f1) virtual, $(du -h disk.img | cut -f1) allocated"

step "qemu-img cannot write qcow2 to a pipe (it needs to seek in its output):"
echo '$ qemu-img convert -f raw -O qcow2 disk.img /dev/stdout | cat > out.qcow2'
( qemu-img convert -f raw -O qcow2 disk.img /dev/stdout | cat > /dev/null ) 2>&1 || true

step "diskferry streams it: disk.img -> qcow2 -> pipe -> file"
time "$DF" convert disk.img -O qcow2 -o - | cat > piped.qcow2
step "... and VHDX the same way"
time "$DF" convert disk.img -O vhdx -o - | cat > piped.vhdx
step "A gzip-compressed disk arriving on stdin, in one pass, to qcow2 with zstd clusters"
gzip -1 -c disk.img > disk.img.gz
time ( cat disk.img.gz | "$DF" convert - -O qcow2 --qcow2-compression zstd -o from-gz.qcow2 )
ls -l disk.img.gz piped.qcow2 piped.vhdx from-gz.qcow2

step "qemu-img judges the results"
for f in piped.qcow2 from-gz.qcow2; do qemu-img check -f qcow2 "$f"; done
qemu-img check -f vhdx piped.vhdx
qemu-img compare -f raw -F qcow2 disk.img piped.qcow2
qemu-img compare -f raw -F vhdx disk.img piped.vhdx
qemu-img compare -f raw -F qcow2 disk.img from-gz.qcow2
step "Reproducible: a second run gives the same bytes"
"$DF" convert disk.img -O qcow2 -o again.qcow2
cmp piped.qcow2 again.qcow2 && sha256sum piped.qcow2 again.qcow2
step "demo passed (files in $WORK)"
