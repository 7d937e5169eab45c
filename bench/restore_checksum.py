#!/usr/bin/env python3
"""Restore from the loopback sshd with and without the NAME.sha256 check, side by side.

Run (root): bench/restore_checksum.py build/bin/diskferry   (scratch: /var/tmp/ckbench)
A 4 GiB raw with 1 GiB of random data, uploaded as .qcow2 and .qcow2.zst; each restored to raw
3 times with and without --no-verify-checksum (cmp checked); prints every run and the median.
"""
import os, random, subprocess, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from sftp_servers import OpenSSHServer, client_keypair
DF = sys.argv[1]; W = "/var/tmp/ckbench"; os.makedirs(W, exist_ok=True); MiB = 1 << 20
key, _ = client_keypair(W)
srv = OpenSSHServer(client_key=key).start()
kh = os.path.join(W, "kh"); open(kh, "w").write(srv.known_hosts_line() + "\n")
img = os.path.join(W, "disk.img")
if not os.path.exists(img):
    r = random.Random(7)
    with open(img, "wb") as f:
        f.truncate(4096 * MiB)
        for i in range(0, 4096, 4):
            f.seek(i * MiB); f.write(r.randbytes(MiB))
common = ["--identity", key, "--known-hosts", kh, "--no-progress"]
url = lambda n: f"sftp://{srv.user}@127.0.0.1:{srv.port}/backups/{n}"
for fmt, name, extra in (("qcow2", "r.qcow2", []), ("qcow2", "r.qcow2.zst", ["--compress", "zstd"])):
    subprocess.run([DF, "convert", img, "-O", fmt, *extra, *common, "-o", url(name)], check=True)
res = {}
for rep in range(3):
    for name in ("r.qcow2", "r.qcow2.zst"):
        for chk in ([], ["--no-verify-checksum"]):
            out = os.path.join(W, "out.raw")
            if os.path.exists(out): os.unlink(out)
            subprocess.run(["sync"])
            t = time.monotonic()
            subprocess.run([DF, "convert", url(name), "-O", "raw", *common, *chk, "-o", out], check=True)
            res.setdefault((name, bool(chk)), []).append(time.monotonic() - t)
            assert subprocess.run(["cmp", img, out]).returncode == 0
for k, v in sorted(res.items()):
    print(k, " ".join(f"{x:.2f}" for x in v), "median", sorted(v)[1])
srv.stop()
