#!/usr/bin/env python3
"""Restore: `diskferry convert sftp://... -O raw|qcow2 -o FILE` from a real OpenSSH chroot on
127.0.0.1. Backups are made by diskferry (qcow2, qcow2 with zstd clusters, raw.zst, raw.gz) and
by qemu-img (a qcow2 in QEMU's own layout, copied to the server); every restore is compared with
the source (cmp / qemu-img compare), raw restores must be sparse, a connection cut mid-restore
must not matter, and what cannot be restored yet is refused with one line and no output file.

Run: test_restore.py PATH/TO/diskferry
"""
import json
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
                           "zlibc.qcow2": ["-O", "qcow2", "--qcow2-compression", "zlib"],
                           "disk.raw": ["-O", "raw"],
                           "disk.vhdx.gz": ["-O", "vhdx", "--block-size", "1M", "--compress",
                                            "gzip:1"],
                           "disk.raw.zst": ["-O", "raw", "--compress", "zstd"],
                           "disk.raw.gz": ["-O", "raw", "--compress", "gzip:1"],
                           "disk.qcow2.zst": ["-O", "qcow2", "--compress", "zstd"],
                           "disk.qcow2.gz": ["-O", "qcow2", "--compress", "gzip:1"],
                           "zstdc.qcow2.zst": ["-O", "qcow2", "--qcow2-compression", "zstd",
                                               "--compress", "zstd"],
                           "disk.vhdx": ["-O", "vhdx"],
                           "disk.vhdx.zst": ["-O", "vhdx", "--block-size", "1M", "--compress",
                                             "zstd"]}.items():
            p = run(DF, "convert", cls.src, *args, *cls.opts, "-o",
                    cls.server.url(f"/backups/r/{name}"))
            assert p.returncode == 0, p.stderr
        # QEMU's own layout, and a qcow2 with a backing file, put on the server directly.
        qemu = os.path.join(cls.remote, "qemu.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", cls.src, qemu],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "qemu.qcow2", "-F",
                        "qcow2", os.path.join(cls.remote, "overlay.qcow2")], check=True)
        # QEMU's layout inside zstd (its L2 tables among the data: a second table pass), a
        # truncated .qcow2.zst, and images whose data clusters are out of guest order (written
        # backwards by qemu-io in runs longer than the stream keeps behind it).
        subprocess.run(["zstd", "-q", "-1", qemu, "-o", qemu + ".zst"], check=True)
        with open(os.path.join(cls.remote, "disk.qcow2.zst"), "rb") as f:
            whole = f.read()
        with open(os.path.join(cls.remote, "cut.qcow2.zst"), "wb") as f:
            f.write(whole[:len(whole) * 2 // 3])
        run_mib = 2 * (os.cpu_count() or 1) + 8  # beyond the look-back of (2 x cores + 4) MiB
        for name, runs in (("back3.qcow2", 3), ("back6.qcow2", 6)):
            path = os.path.join(cls.dir, name)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                            f"{runs * run_mib}M"], check=True)
            writes = []
            for i in reversed(range(runs)):
                writes += ["-c", f"write -P {i + 1} {i * run_mib}M {run_mib}M"]
            subprocess.run(["qemu-io", "-f", "qcow2", *writes, path], check=True,
                           capture_output=True)
            subprocess.run(["zstd", "-q", "-1", path, "-o",
                            os.path.join(cls.remote, name + ".zst")], check=True)
        for n in os.listdir(cls.remote):
            os.chown(os.path.join(cls.remote, n), cls.server.uid, cls.server.gid)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def restore(self, name, fmt, out, url=None, extra=()):
        opts = [o for o in self.opts if o != "--no-progress" or "--progress" not in extra]
        return run(DF, "convert", url or self.server.url(f"/backups/r/{name}"), "-O", fmt,
                   *opts, *extra, "-o", out)

    def test_raw_restores_are_identical_and_sparse(self):
        # Every format and compression: qcow2 (plain, zstd and zlib clusters, QEMU's layout),
        # raw, VHDX, each bare or inside zstd/gzip (the .qcow2.* and .vhdx.zst ones below).
        for name in ("plain.qcow2", "zstdc.qcow2", "zlibc.qcow2", "disk.raw", "disk.raw.zst",
                     "disk.raw.gz", "qemu.qcow2", "disk.vhdx", "disk.vhdx.gz"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, name + ".img")
                p = self.restore(name, "raw", out)
                self.assertEqual(p.returncode, 0, p.stderr)
                c = run("cmp", self.src, out)
                self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
                st = os.stat(out)
                self.assertLess(st.st_blocks * 512, st.st_size // 2, "not sparse")
                os.unlink(out)

    def assert_restores_to_qcow2(self, name):
        out = os.path.join(self.dir, name + ".back.qcow2")
        p = self.restore(name, "qcow2", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        c = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", self.src, out)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        os.unlink(out)

    def test_qcow2_inside_zstd_and_gzip_restores_to_raw_and_qcow2(self):
        for name in ("disk.qcow2.zst", "disk.qcow2.gz", "zstdc.qcow2.zst", "qemu.qcow2.zst"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, name + ".img")
                p = self.restore(name, "raw", out, extra=["--progress"])
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn("pass 1, header and L1 table", p.stderr)
                self.assertIn("data pass 1", p.stderr)
                # diskferry keeps its L2 tables just before the L1 table: no second table pass.
                self.assertEqual("pass 2," in p.stderr, name == "qemu.qcow2.zst", p.stderr)
                c = run("cmp", self.src, out)
                self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
                st = os.stat(out)
                self.assertLess(st.st_blocks * 512, st.st_size // 2, "not sparse")
                os.unlink(out)
                self.assert_restores_to_qcow2(name)

    def test_vhdx_inside_zstd_restores(self):
        # diskferry's VHDX (BAT and metadata after the payload) and QEMU's (before it).
        qemu = os.path.join(self.remote, "qemu.vhdx")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o",
                        "subformat=dynamic,block_size=1M", self.src, qemu], check=True)
        subprocess.run(["zstd", "-q", "-1", "--rm", "-f", qemu, "-o", qemu + ".zst"], check=True)
        for name in ("disk.vhdx.zst", "qemu.vhdx.zst"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, name + ".img")
                p = self.restore(name, "raw", out, extra=["--progress"])
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertIn("VHDX in zstd: pass 1", p.stderr)
                self.assertEqual(run("cmp", self.src, out).returncode, 0)
                os.unlink(out)
                self.assert_restores_to_qcow2(name)
        # Cut short: one line, nothing under the name.
        with open(os.path.join(self.remote, "disk.vhdx.zst"), "rb") as f:
            data = f.read()
        with open(os.path.join(self.remote, "short.vhdx.zst"), "wb") as f:
            f.write(data[: len(data) // 2])
        out = os.path.join(self.dir, "short.img")
        p = self.restore("short.vhdx.zst", "raw", out)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("zstd", p.stderr)
        self.assertFalse(os.path.exists(out) or os.path.exists(out + ".partial"))

    def test_local_qcow2_zst_restores(self):
        out = os.path.join(self.dir, "local.img")
        p = run(DF, "convert", os.path.join(self.remote, "zstdc.qcow2.zst"), "-O", "raw",
                "--no-progress", "-o", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(run("cmp", self.src, out).returncode, 0)
        os.unlink(out)

    def test_data_out_of_guest_order(self):
        # A few steps back: one more read of the stream each; many: refused, saying how.
        out = os.path.join(self.dir, "back.img")
        p = self.restore("back3.qcow2.zst", "raw", out, extra=["--progress"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("3 times: clusters out of order", p.stderr)
        c = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out,
                os.path.join(self.dir, "back3.qcow2"))
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        os.unlink(out)
        p = self.restore("back6.qcow2.zst", "raw", out)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("out of guest order", p.stderr)
        self.assertIn("--source-format raw -O raw", p.stderr)
        self.assertFalse(os.path.exists(out) or os.path.exists(out + ".partial"))
        # What the message says to do: the decompressed image to a file, then convert that.
        qc = os.path.join(self.dir, "back6-copy.qcow2")
        p = self.restore("back6.qcow2.zst", "raw", qc, extra=["--source-format", "raw"])
        self.assertEqual(p.returncode, 0, p.stderr)
        c = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", qc,
                os.path.join(self.dir, "back6.qcow2"))
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        os.unlink(qc)

    def test_a_truncated_qcow2_zst_fails_in_one_line(self):
        for fmt in ("raw", "qcow2"):
            with self.subTest(fmt=fmt):
                out = os.path.join(self.dir, "cut." + fmt)
                p = self.restore("cut.qcow2.zst", fmt, out)
                self.assertEqual(p.returncode, 1, p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn("truncated", p.stderr)
                self.assertFalse(os.path.exists(out) or os.path.exists(out + ".partial"))

    def test_daemon_backup_listed_by_source_and_restored(self):
        # The example config's output (qcow2, zstd:3), made by diskferryd; `ls SOURCE` finds it.
        state = tempfile.mkdtemp(dir=self.dir)
        cfg = os.path.join(state, "diskferry.yaml")
        with open(cfg, "w") as f:
            f.write(f"state_dir: {state}\nremotes:\n  box:\n"
                    f"    url: sftp://{self.server.user}@127.0.0.1:{self.server.port}/backups/d\n"
                    f"    identity: {self.server.client_key}\n    known_hosts: {self.kh}\n"
                    f"sources:\n  web01:\n    path: {self.src}\n    snapshot: none\n"
                    f"    format: qcow2\n    compress: zstd:3\n    remote: box\n")
        # Not a backup of web01: ls SOURCE leaves it out.
        d = os.path.join(self.server.backups, "d")
        os.makedirs(os.path.join(d, "web01"), exist_ok=True)
        with open(os.path.join(d, "web01", "notes.txt"), "w") as f:
            f.write("x")
        for p in (d, os.path.join(d, "web01")):
            os.chown(p, self.server.uid, self.server.gid)
        p = run(os.path.join(os.path.dirname(DF), "diskferry"), "enqueue", "web01", "--config",
                cfg)
        self.assertEqual(p.returncode, 0, p.stderr)
        p = run(os.path.join(os.path.dirname(DF), "diskferryd"), "--once", "--config", cfg,
                timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        p = run(DF, "list", "--config", cfg)
        self.assertIn("done", p.stdout, p.stdout + p.stderr)
        p = run(DF, "ls", "web01", "--config", cfg, "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        files = json.loads(p.stdout)
        self.assertEqual(len(files), 1, files)
        self.assertTrue(files[0]["name"].startswith("web01-") and
                        files[0]["name"].endswith(".qcow2.zst"), files)
        self.assertTrue(files[0]["sidecar"], files)
        p = run(DF, "ls", "web01", "--config", cfg)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("sha256", p.stdout)
        self.assertNotIn("notes.txt", p.stdout)
        p = run(DF, "ls", "nosuch", "--config", cfg)
        self.assertEqual(p.returncode, 2, p.stderr)
        out = os.path.join(self.dir, "web01.img")
        p = run(DF, "convert", files[0]["url"], "-O", "raw", *self.opts, "-o", out)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(run("cmp", self.src, out).returncode, 0)
        os.unlink(out)

    def test_restore_to_a_block_device_full_of_old_data(self):
        # The device's zero ranges must end up zero; the kernel zeroes them (BLKZEROOUT), so the
        # process writes only the data: measured by its write() bytes (/proc/PID/io wchar).
        # --discard: deallocated where zeros are guaranteed (a loop device punches holes in its
        # backing file, which shrinks).
        if os.geteuid() != 0:
            self.skipTest("needs root for loop devices")
        backing = os.path.join(self.dir, "device.bin")
        size = os.path.getsize(self.src)
        data = sum(1 for _ in range(0, 40, 5)) * MiB * 2  # make_source: 8 runs of < 2 MiB
        for extra in ([], ["--discard"]):
            with self.subTest(extra=extra):
                with open(backing, "wb") as f:
                    f.write(random.Random(3).randbytes(size))
                p = run("losetup", "-f", "--show", backing)
                if p.returncode != 0:
                    self.skipTest("no loop device: " + p.stderr.strip())
                dev = p.stdout.strip()
                try:
                    cmd = [DF, "convert", self.server.url("/backups/r/disk.qcow2.zst"), "-O",
                           "raw", *self.opts, *extra, "-o", dev]
                    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
                    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                    with open(f"/proc/{proc.pid}/io") as f:
                        io = dict(line.split(": ") for line in f.read().splitlines())
                    err = proc.communicate()[1]
                    self.assertEqual(proc.returncode, 0, err)
                    c = run("cmp", self.src, dev)
                    self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
                    self.assertLess(int(io["wchar"]), data, io)
                finally:
                    run("losetup", "-d", dev)
                blocks = os.stat(backing).st_blocks * 512
                if extra:
                    self.assertLess(blocks, size // 2, "--discard left the zeros allocated")

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

    def damaged_copy(self, name, change=None):
        """NAME with its sidecar in /backups/r/damaged/, a byte in its middle flipped (or its
        bytes replaced by those of `change`); the URL."""
        d = os.path.join(self.remote, "damaged")
        os.makedirs(d, exist_ok=True)
        os.chown(d, self.server.uid, self.server.gid)
        path = os.path.join(d, name)
        shutil.copy(os.path.join(self.remote, change or name), path)
        shutil.copy(os.path.join(self.remote, name + ".sha256"), path + ".sha256")
        if not change:
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                b = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([b[0] ^ 0x40]))
        for p in (path, path + ".sha256"):
            os.chown(p, self.server.uid, self.server.gid)
        return self.server.url(f"/backups/r/damaged/{name}")

    def test_a_backup_that_does_not_match_its_sidecar_is_not_restored(self):
        # Plain images are read by random access (the hash follows the reads and fetches what
        # they skip), raw and compressed ones as streams. A flipped byte inside a .zst is found
        # by zstd itself; a .qcow2.zst replaced by another backup decodes fine.
        for name, change in (("disk.vhdx", None), ("plain.qcow2", None), ("disk.raw", None),
                             ("zstdc.qcow2", None), ("disk.qcow2.zst", "zstdc.qcow2.zst"),
                             ("disk.vhdx.zst", "disk.vhdx.gz")):
            for fmt in ("raw", "qcow2"):
                with self.subTest(name=name, fmt=fmt):
                    url = self.damaged_copy(name, change)
                    out = os.path.join(self.dir, "damaged.out")
                    p = self.restore(name, fmt, out, url=url)
                    self.assertEqual(p.returncode, 1, p.stderr)
                    self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                    self.assertIn("checksum", p.stderr)
                    self.assertIn(url, p.stderr)
                    self.assertFalse(os.path.exists(out))
                    self.assertFalse(os.path.exists(out + ".partial"))
            with self.subTest(name=name, no_verify=True):
                p = self.restore(name, "raw", out, url=url, extra=["--no-verify-checksum"])
                if change:  # another image: restored as it is
                    self.assertEqual(p.returncode, 0, p.stderr)
                    self.assertEqual(p.stderr, "")
                if os.path.exists(out):
                    os.unlink(out)

    def test_a_flipped_byte_inside_zstd_fails_in_one_line(self):
        url = self.damaged_copy("disk.raw.zst")
        out = os.path.join(self.dir, "flipped.img")
        p = self.restore("disk.raw.zst", "raw", out, url=url)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn(url, p.stderr)
        self.assertFalse(os.path.exists(out))
        self.assertFalse(os.path.exists(out + ".partial"))

    def test_a_damaged_backup_is_restored_with_no_verify_checksum(self):
        for name in ("disk.raw", "disk.vhdx", "plain.qcow2"):
            with self.subTest(name=name):
                url = self.damaged_copy(name)
                out = os.path.join(self.dir, "unchecked.img")
                p = self.restore(name, "raw", out, url=url, extra=["--no-verify-checksum"])
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertEqual(p.stderr, "")
                self.assertNotEqual(run("cmp", "-s", self.src, out).returncode, 2)
                os.unlink(out)

    def test_a_backup_without_a_sidecar_is_restored_with_a_warning(self):
        for name in ("qemu.qcow2", "qemu.qcow2.zst"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, "nosidecar.img")
                p = self.restore(name, "raw", out)
                self.assertEqual(p.returncode, 0, p.stderr)
                lines = p.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, p.stderr)
                self.assertIn("warning", lines[0])
                self.assertIn(f"no {name}.sha256", lines[0])
                self.assertEqual(run("cmp", self.src, out).returncode, 0)
                os.unlink(out)

    def test_an_intact_backup_restores_without_a_word(self):
        for name in ("disk.vhdx", "plain.qcow2", "disk.raw", "disk.qcow2.zst"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, "intact.img")
                p = self.restore(name, "raw", out)
                self.assertEqual((p.returncode, p.stderr), (0, ""))
                self.assertEqual(run("cmp", self.src, out).returncode, 0)
                os.unlink(out)

    def test_a_damaged_backup_on_a_block_device_is_reported_suspect(self):
        if os.geteuid() != 0:
            self.skipTest("needs root for loop devices")
        backing = os.path.join(self.dir, "suspect.bin")
        with open(backing, "wb") as f:
            f.truncate(os.path.getsize(self.src))
        p = run("losetup", "-f", "--show", backing)
        if p.returncode != 0:
            self.skipTest("no loop device: " + p.stderr.strip())
        dev = p.stdout.strip()
        try:
            url = self.damaged_copy("disk.raw")
            p = self.restore("disk.raw", "raw", dev, url=url)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn("checksum", p.stderr)
            self.assertIn(f"{dev}: WARNING", p.stderr)
            self.assertIn("suspect", p.stderr)
        finally:
            run("losetup", "-d", dev)

    def test_what_cannot_be_restored_yet_is_refused(self):
        for name, words in (("overlay.qcow2", "has a backing file"),
                            ("missing.qcow2", "no such file")):
            with self.subTest(name=name):
                out = os.path.join(self.dir, "refused.img")
                p = self.restore(name, "raw", out)
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn(words, p.stderr)
                self.assertFalse(os.path.exists(out))
                self.assertFalse(os.path.exists(out + ".partial"))

    def test_the_source_url_as_destination_is_refused(self):
        path = os.path.join(self.remote, "disk.raw")
        with open(path, "rb") as f:
            before = f.read()
        url = self.server.url("/backups/r/disk.raw")
        p = run(DF, "convert", url, "-O", "qcow2", *self.opts, "-o", url)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("is also the source of this run", p.stderr)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before, "the backup changed")
        self.assertFalse(os.path.exists(path + ".partial"))


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
