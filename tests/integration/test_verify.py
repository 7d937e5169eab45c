#!/usr/bin/env python3
"""`diskferry verify` and `diskferry ls` against a real OpenSSH chroot server on 127.0.0.1.

Backups are made with `diskferry convert -o sftp://` (every format and compression), then
damaged on the server side the way disks and networks damage files: a flipped byte in the data,
a truncated file, a corrupted L2 entry, a cut-off zstd stream, a missing sidecar. Each must give
its documented exit code (0 intact, 4 checksum, 5 structure, 6 unreachable, 7 missing) and a
one-line reason.

Run: test_verify.py PATH/TO/diskferry
"""
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import OpenSSHServer  # noqa: E402

DF = None
MiB = 1024 * 1024


def run(*args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


def make_source(path):
    r = random.Random(11)
    with open(path, "wb") as f:
        f.truncate(48 * MiB)
        for i in range(0, 48, 4):
            f.seek(i * MiB)
            f.write(r.randbytes(MiB // 2) + b"compressible " * 40000)


def qcow2_first_data(path, compressed=False):
    """(offset of the first non-zero L2 entry, the data offset it points to); with compressed,
    of the first compressed cluster."""
    with open(path, "rb") as f:
        h = f.read(104)
        cluster_bits = struct.unpack(">I", h[20:24])[0]
        l1_size, l1_off = struct.unpack(">IQ", h[36:48])
        f.seek(l1_off)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        for e in l1:
            l2_off = e & 0x00fffffffffffe00
            if not l2_off:
                continue
            f.seek(l2_off)
            n = (1 << cluster_bits) // 8
            for j, x in enumerate(struct.unpack(f">{n}Q", f.read(8 * n))):
                if x and compressed and x & (1 << 62):
                    return l2_off + 8 * j, x & ((1 << (62 - (cluster_bits - 8))) - 1)
                if x and not compressed:
                    return l2_off + 8 * j, x & 0x00fffffffffffe00
    raise AssertionError("no data cluster")


@unittest.skipIf(OpenSSHServer.unavailable_reason(), OpenSSHServer.unavailable_reason() or "")
class Verify(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-verify-", dir="/var/tmp")
        cls.src = os.path.join(cls.dir, "src.img")
        make_source(cls.src)
        cls.server = OpenSSHServer()
        cls.server.start()
        cls.kh = os.path.join(cls.dir, "known_hosts")
        cls.server.write_known_hosts(cls.kh)
        cls.opts = ["--identity", cls.server.client_key, "--known-hosts", cls.kh]
        cls.remote = os.path.join(cls.server.backups, "v")
        # name -> convert options
        cls.variants = {
            "plain.qcow2": ["-O", "qcow2"],
            "zstdc.qcow2": ["-O", "qcow2", "--qcow2-compression", "zstd"],
            "zlibc.qcow2": ["-O", "qcow2", "--qcow2-compression", "zlib"],
            "outer.qcow2.zst": ["-O", "qcow2", "--compress", "zstd"],
            "disk.vhdx": ["-O", "vhdx"],
            "disk.raw.gz": ["-O", "raw", "--compress", "gzip:1"],
        }
        for name, args in cls.variants.items():
            p = run(DF, "convert", cls.src, *args, *cls.opts, "--no-progress", "-o",
                    cls.server.url(f"/backups/v/{name}"))
            assert p.returncode == 0, p.stderr

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def url(self, name):
        return self.server.url(f"/backups/v/{name}")

    def verify(self, name, *extra):
        return run(DF, "verify", *self.opts, *extra, self.url(name))

    def damaged_copy(self, name, new, edit):
        src = os.path.join(self.remote, name)
        dst = os.path.join(self.remote, new)
        shutil.copyfile(src, dst)
        with open(src + ".sha256") as f:
            side = f.read().replace(name, new)
        with open(dst + ".sha256", "w") as f:
            f.write(side)
        edit(dst)
        return new

    def assert_fails(self, p, code, *words):
        self.assertEqual(p.returncode, code, p.stdout + p.stderr)
        self.assertEqual(p.stdout, "")
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        for w in words:
            self.assertIn(w, p.stderr)

    def test_every_backup_verifies(self):
        for name in self.variants:
            with self.subTest(name=name):
                p = self.verify(name)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn(": OK (", p.stdout)
                with open(os.path.join(self.remote, name + ".sha256")) as f:
                    self.assertIn(f.read().split()[0], p.stdout)
        p = self.verify("zstdc.qcow2", "--json")
        r = json.loads(p.stdout)
        self.assertEqual((r["status"], r["format"], r["outer_compression"]),
                         ("ok", "qcow2", "none"))
        self.assertEqual(r["virtual_size"], 48 * MiB)
        p = self.verify("outer.qcow2.zst", "--json")
        r = json.loads(p.stdout)
        self.assertEqual((r["status"], r["format"], r["outer_compression"]),
                         ("ok", "qcow2", "zstd"))

    def test_a_flipped_data_byte_is_a_checksum_mismatch(self):
        def flip(path):
            _, data = qcow2_first_data(path)
            with open(path, "r+b") as f:
                f.seek(data + 100)
                b = f.read(1)
                f.seek(data + 100)
                f.write(bytes([b[0] ^ 0x01]))
        name = self.damaged_copy("plain.qcow2", "flipped.qcow2", flip)
        self.assert_fails(self.verify(name), 4, "CHECKSUM MISMATCH", "flipped.qcow2.sha256")

    def test_a_damaged_compressed_cluster_is_invalid_structure(self):
        for src in ("zstdc.qcow2", "zlibc.qcow2"):
            with self.subTest(src=src):
                def smash(path):
                    _, data = qcow2_first_data(path, compressed=True)
                    with open(path, "r+b") as f:
                        f.seek(data)
                        f.write(b"\xff" * 16)  # the zstd frame header / the deflate block header
                name = self.damaged_copy(src, "smashed-" + src, smash)
                self.assert_fails(self.verify(name), 5, "STRUCTURE INVALID", "cluster at")

    def test_a_truncated_file_is_invalid_structure(self):
        for src in ("plain.qcow2", "zstdc.qcow2"):
            with self.subTest(src=src):
                def cut(path):
                    with open(path, "r+b") as f:
                        f.truncate(os.path.getsize(path) // 2)
                name = self.damaged_copy(src, "cut-" + src, cut)
                self.assert_fails(self.verify(name), 5, "STRUCTURE INVALID", "qcow2")

    def test_a_corrupted_l2_entry_is_invalid_structure(self):
        def corrupt(path):
            entry, _ = qcow2_first_data(path)
            with open(path, "r+b") as f:
                f.seek(entry)
                f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))  # data far beyond the end
        name = self.damaged_copy("plain.qcow2", "badl2.qcow2", corrupt)
        self.assert_fails(self.verify(name), 5, "STRUCTURE INVALID", "beyond the end")

    def test_a_corrupted_compressed_entry_is_invalid_structure(self):
        def corrupt(path):
            entry, _ = qcow2_first_data(path, compressed=True)
            with open(path, "r+b") as f:
                f.seek(entry)
                x = struct.unpack(">Q", f.read(8))[0]
                # The entry points 100 bytes further: the stream no longer starts where it says,
                # and the refcounts no longer match either.
                f.seek(entry)
                f.write(struct.pack(">Q", x + 100))
        name = self.damaged_copy("zlibc.qcow2", "badc.qcow2", corrupt)
        self.assert_fails(self.verify(name), 5, "STRUCTURE INVALID")

    def test_a_cut_off_zstd_stream_is_invalid_structure(self):
        def cut(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) - 1000)
        name = self.damaged_copy("outer.qcow2.zst", "cut.qcow2.zst", cut)
        self.assert_fails(self.verify(name), 5, "STRUCTURE INVALID", "zstd")

    def test_missing_sidecar_and_unreachable(self):
        shutil.copyfile(os.path.join(self.remote, "disk.vhdx"),
                        os.path.join(self.remote, "nosidecar.vhdx"))
        self.assert_fails(self.verify("nosidecar.vhdx"), 4, "no nosidecar.vhdx.sha256")
        # The server answered: the backup is missing, which is not the same as unreachable.
        self.assert_fails(self.verify("does-not-exist.qcow2"), 7, "MISSING", "no such file")
        p = run(DF, "verify", *self.opts, "--json", self.url("does-not-exist.qcow2"))
        self.assertEqual(p.returncode, 7, p.stderr)
        self.assertEqual(json.loads(p.stdout)["status"], "missing")
        p = run(DF, "verify", *self.opts,
                f"sftp://{self.server.user}@127.0.0.1:1/backups/v/plain.qcow2")
        self.assert_fails(p, 6, "UNREACHABLE")
        p = run(DF, "verify", "--known-hosts", os.devnull, "--identity", self.server.client_key,
                self.url("plain.qcow2"))
        self.assert_fails(p, 6, "UNREACHABLE", "host key")

    def test_ls_lists_backups_with_their_sidecars(self):
        p = run(DF, "ls", *self.opts, self.server.url("/backups/v"))
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = {l.split()[-1]: l for l in p.stdout.splitlines()}
        for name in self.variants:
            self.assertIn(name, lines)
            self.assertIn(" sha256 ", lines[name])
        self.assertNotIn("plain.qcow2.sha256", lines)  # shown with its file
        lock = os.path.join(self.remote, "writing.qcow2.lock")
        with open(lock, "w") as f:
            f.write("diskferry upload lock\n")
        try:
            p = run(DF, "ls", *self.opts, self.server.url("/backups/v"))
        finally:
            os.unlink(lock)
        lines = {l.split()[-1]: l for l in p.stdout.splitlines()}
        self.assertIn(" lock ", lines["writing.qcow2.lock"])
        p = run(DF, "ls", *self.opts, "--json", self.server.url("/backups/v"))
        entries = {e["name"]: e for e in json.loads(p.stdout)}
        size = os.path.getsize(os.path.join(self.remote, "plain.qcow2"))
        self.assertEqual(entries["plain.qcow2"]["size"], size)
        self.assertTrue(entries["plain.qcow2"]["sidecar"])
        p = run(DF, "ls", *self.opts, self.server.url("/backups/nope"))
        self.assertEqual(p.returncode, 1)
        self.assertIn("no such directory", p.stderr)


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
