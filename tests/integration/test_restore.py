#!/usr/bin/env python3
"""Restore: `diskferry convert sftp://... -O raw|qcow2 -o FILE` from a real OpenSSH chroot on
127.0.0.1. Backups are made by diskferry (qcow2, qcow2 with zstd clusters, raw.zst, raw.gz) and
by qemu-img (a qcow2 in QEMU's own layout, copied to the server); every restore is compared with
the source (cmp / qemu-img compare), raw restores must be sparse, a connection cut mid-restore
must not matter, and what cannot be restored yet is refused with one line and no output file.

Run: test_restore.py PATH/TO/diskferry
"""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import OpenSSHServer  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

DF = None
MiB = 1024 * 1024


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


def make_source(path, mib=40):
    r = random.Random(21)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        for i in range(0, mib, 5):
            f.seek(i * MiB + 4096 * i)
            f.write(r.randbytes(MiB) + b"restore " * 50000)


@unittest.skipIf(OpenSSHServer.unavailable_reason(), OpenSSHServer.unavailable_reason() or "")
class Restore(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-restore-", dir="/var/tmp")
        cls.src = os.path.join(cls.dir, "src.img")
        make_source(cls.src)
        cls.server = OpenSSHServer()
        cls.server.start()
        cls.kh = os.path.join(cls.dir, "known_hosts")
        cls.server.write_known_hosts(cls.kh)
        cls.opts = ["--identity", cls.server.client_key, "--known-hosts", cls.kh, "--no-progress"]
        cls.remote = os.path.join(cls.server.backups, "r")
        for name, args in {"plain.qcow2": ["-O", "qcow2"],
                           "zstdc.qcow2": ["-O", "qcow2", "--qcow2-compression", "zstd"],
                           "disk.raw.zst": ["-O", "raw", "--compress", "zstd"],
                           "disk.raw.gz": ["-O", "raw", "--compress", "gzip:1"],
                           "disk.qcow2.zst": ["-O", "qcow2", "--compress", "zstd"],
                           "disk.vhdx": ["-O", "vhdx"]}.items():
            p = run(DF, "convert", cls.src, *args, *cls.opts, "-o",
                    cls.server.url(f"/backups/r/{name}"))
            assert p.returncode == 0, p.stderr
        # QEMU's own layout, and a qcow2 with a backing file, put on the server directly.
        qemu = os.path.join(cls.remote, "qemu.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", cls.src, qemu],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "qemu.qcow2", "-F",
                        "qcow2", os.path.join(cls.remote, "overlay.qcow2")], check=True)
        for n in os.listdir(cls.remote):
            os.chown(os.path.join(cls.remote, n), cls.server.uid, cls.server.gid)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def restore(self, name, fmt, out, url=None, extra=()):
        return run(DF, "convert", url or self.server.url(f"/backups/r/{name}"), "-O", fmt,
                   *self.opts, *extra, "-o", out)

    def test_raw_restores_are_identical_and_sparse(self):
        for name in ("plain.qcow2", "zstdc.qcow2", "disk.raw.zst", "disk.raw.gz", "qemu.qcow2",
                     "disk.vhdx"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, name + ".img")
                p = self.restore(name, "raw", out)
                self.assertEqual(p.returncode, 0, p.stderr)
                c = run("cmp", self.src, out)
                self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
                st = os.stat(out)
                self.assertLess(st.st_blocks * 512, st.st_size // 2, "not sparse")
                os.unlink(out)

    def test_restore_to_qcow2(self):
        out = os.path.join(self.dir, "back.qcow2")
        p = self.restore("zstdc.qcow2", "qcow2", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        c = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", self.src, out)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        c = run("qemu-img", "check", out)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)

    def test_a_cut_connection_mid_restore_is_resumed(self):
        with TcpProxy(("127.0.0.1", self.server.port), cut_down=4 * MiB, cut_first=1) as px:
            kh = self.server.write_known_hosts(os.path.join(self.dir, "kh-proxy"), port=px.port)
            for name in ("plain.qcow2", "disk.raw.zst"):
                with self.subTest(name=name):
                    out = os.path.join(self.dir, "cut-" + name + ".img")
                    url = f"sftp://{self.server.user}@127.0.0.1:{px.port}/backups/r/{name}"
                    p = run(DF, "convert", url, "-O", "raw", "--identity",
                            self.server.client_key, "--known-hosts", kh, "--no-progress",
                            "--stall-timeout", "5", "-o", out)
                    self.assertEqual(p.returncode, 0, p.stderr)
                    self.assertEqual(run("cmp", self.src, out).returncode, 0)
                    os.unlink(out)
            self.assertTrue(any(c.cut for c in px.connections), "the proxy cut nothing")

    def test_what_cannot_be_restored_yet_is_refused(self):
        for name, words in (("disk.qcow2.zst", "inside a compressed file"),
                            ("overlay.qcow2", "has a backing file"),
                            ("missing.qcow2", "no such file")):
            with self.subTest(name=name):
                out = os.path.join(self.dir, "refused.img")
                p = self.restore(name, "raw", out)
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn(words, p.stderr)
                self.assertFalse(os.path.exists(out))
                self.assertFalse(os.path.exists(out + ".partial"))


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
