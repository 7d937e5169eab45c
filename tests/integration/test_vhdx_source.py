#!/usr/bin/env python3
"""VHDX images as `diskferry convert` sources, judged by qemu-img, and VHDX backups restored
and verified through a real OpenSSH chroot.

Sources: QEMU's dynamic VHDX written with qemu-io (data, zero writes, discards), `qemu-img
convert -O vhdx` (dynamic with 1M and 32M blocks, fixed), diskferry's own VHDX. Each becomes
raw, qcow2 and vhdx, compared with `qemu-img compare` against the VHDX. Hostile images
(truncated, bad CRCs, BAT entries beyond the end or overlapping, a differencing disk, a log to
replay, absurd sizes) must give one-line errors naming the file, exit 1 and no output.

Run: test_vhdx_source.py PATH/TO/diskferry   (ctest passes the binary)
"""
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_qcow2_source  # noqa: E402
from sftp_servers import OpenSSHServer  # noqa: E402

DF = None
KiB, MiB = 1024, 1024**2
OUTPUTS = [("raw", ["-O", "raw"]), ("qcow2", ["-O", "qcow2"]), ("vhdx", ["-O", "vhdx"])]


def run(*args, check=True, stdout=subprocess.PIPE, **kw):
    p = subprocess.run([str(a) for a in args], stdout=stdout, stderr=subprocess.PIPE, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}: "
                             f"{p.stderr.decode(errors='replace')}")
    return p


def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


CRC_TABLE = _crc_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
META_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
FILE_PARAMS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le


class Vhdx:
    """Offsets of a VHDX file's structures (from region table 1), for patching it."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            f.seek(192 * KiB)
            rt = f.read(64 * KiB)
            for i in range(struct.unpack_from("<I", rt, 8)[0]):
                g, off, length = struct.unpack_from("<16sQI", rt, 16 + 32 * i)
                if g == BAT_GUID:
                    self.bat = off
                elif g == META_GUID:
                    self.meta, self.meta_len = off, length
            f.seek(self.meta)
            mt = f.read(64 * KiB)
            self.items = {}
            for i in range(struct.unpack_from("<H", mt, 10)[0]):
                g, off = struct.unpack_from("<16sI", mt, 32 + 32 * i)
                self.items[g] = self.meta + off
            f.seek(self.items[FILE_PARAMS])
            self.block_size = struct.unpack("<I", f.read(4))[0]

    def read(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def write(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def bat_entry(self, i):
        return struct.unpack("<Q", self.read(self.bat + 8 * i, 8))[0]

    def set_bat_entry(self, i, value):
        self.write(self.bat + 8 * i, struct.pack("<Q", value))

    def first_present(self):
        i = 0
        while self.bat_entry(i) & 7 != 6:
            i += 1
        return i

    def rewrite_header(self, slot, fn):
        """fn(bytearray of the 4 KiB header) edits it; the CRC is recomputed."""
        off = (64, 128)[slot] * KiB
        h = bytearray(self.read(off, 4096))
        fn(h)
        h[4:8] = b"\0\0\0\0"
        h[4:8] = struct.pack("<I", crc32c(h))
        self.write(off, bytes(h))


def make_raw(path, mib, seed):
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        for i in range(0, mib, 5):
            f.seek(i * MiB + 4096 * i)
            f.write(r.randbytes(600 * KiB) + b"vhdx " * 20000)


class VhdxSources(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-vhdx-", dir="/var/tmp")
        cls.raw = os.path.join(cls.dir, "src.raw")
        make_raw(cls.raw, 40, 5)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def p(self, name):
        return os.path.join(self.dir, name)

    def check_all_outputs(self, src, label):
        for fmt, args in OUTPUTS:
            with self.subTest(source=label, output=fmt):
                out = self.p(f"{label}.out.{fmt}")
                run(DF, "convert", src, *args, "--no-progress", "-o", out)
                self.assertFalse(os.path.exists(out + ".partial"))
                if fmt != "raw":
                    p = run("qemu-img", "check", "-f", fmt, out, check=False)
                    self.assertEqual(p.returncode, 0, f"{label}/{fmt}: {p.stdout.decode()}")
                p = run("qemu-img", "compare", "-f", "vhdx", "-F", fmt, src, out, check=False)
                self.assertEqual(p.returncode, 0, f"{label}/{fmt}: qemu-img compare: "
                                 f"{p.stdout.decode()}{p.stderr.decode()}")
                os.unlink(out)

    def test_qemu_io_patterns(self):
        img = self.p("io.vhdx")
        run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M,subformat=dynamic",
            img, "24M")
        run("qemu-io", "-f", "vhdx", "-c", "write -P 0xab 1M 3M", "-c", "write -z 2M 512k",
            "-c", "discard 3M 1M", "-c", f"write -P 0xcd {9 * MiB - 700} 300k",
            "-c", "write -z 12M 2M", "-c", f"write -P 0x11 {24 * MiB - 512} 512", img)
        self.check_all_outputs(img, "io")

    def test_qemu_convert_block_sizes_and_fixed(self):
        for label, opts in (("dyn1m", "subformat=dynamic,block_size=1M"),
                            ("dyn32m", "subformat=dynamic,block_size=32M"),
                            ("fixed", "subformat=fixed")):
            img = self.p(f"{label}.vhdx")
            run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", opts, self.raw, img)
            out = self.p(f"{label}.raw")
            run(DF, "convert", img, "-O", "raw", "--no-progress", "-o", out)
            self.assertEqual(run("cmp", self.raw, out, check=False).returncode, 0, label)
            st = os.stat(out)
            self.assertLess(st.st_blocks * 512, st.st_size, f"{label}: raw output not sparse")
            os.unlink(out)
            if label == "dyn1m":
                self.check_all_outputs(img, label)
            os.unlink(img)

    def test_own_vhdx_round_trips_byte_identical(self):
        for bs in ("1M", "32M"):
            with self.subTest(block_size=bs):
                ours = self.p(f"ours-{bs}.vhdx")
                run(DF, "convert", self.raw, "-O", "vhdx", "--block-size", bs, "--no-progress",
                    "-o", ours)
                back = self.p("back.raw")
                run(DF, "convert", ours, "-O", "raw", "--no-progress", "-o", back)
                self.assertEqual(run("cmp", self.raw, back, check=False).returncode, 0)
                # Same allocation, same options: the same file again, also through a pipe
                # (two passes over the VHDX source).
                again = self.p("again.vhdx")
                run(DF, "convert", ours, "-O", "vhdx", "--block-size", bs, "--no-progress",
                    "-o", again)
                self.assertEqual(run("cmp", ours, again, check=False).returncode, 0)
                with open(again, "wb") as f:
                    run(DF, "convert", "--source-format", "vhdx", ours, "-O", "vhdx",
                        "--block-size", bs, "--no-progress", "-o", "-", stdout=f)
                self.assertEqual(run("cmp", ours, again, check=False).returncode, 0)
                if bs == "1M":
                    self.check_all_outputs(ours, "ours")
                for f in (ours, back, again):
                    os.unlink(f)


    def test_an_empty_disk_opens_in_qemu_at_every_block_size(self):
        # QEMU needs a BAT region of 8 MiB per MiB of block size for an empty VHDX (its entry
        # count wraps); an empty disk is written with 1 MiB blocks: 11 MiB in a file and through
        # a pipe, at every block size (with 256M QEMU could not read the 2 GiB BAT at all).
        empty = self.p("empty.raw")
        open(empty, "wb").close()
        for bs in ("1M", "2M", "4M", "8M", "16M", "32M", "64M", "128M", "256M"):
            with self.subTest(block_size=bs):
                out, piped = self.p("empty.vhdx"), self.p("empty-pipe.vhdx")
                run(DF, "convert", empty, "-O", "vhdx", "--block-size", bs, "--no-progress",
                    "-o", out)
                with open(piped, "wb") as f:
                    run(DF, "convert", empty, "-O", "vhdx", "--block-size", bs,
                        "--no-progress", "-o", "-", stdout=f)
                self.assertEqual(run("cmp", out, piped, check=False).returncode, 0)
                self.assertLessEqual(os.path.getsize(piped), 11 * MiB)
                for cmd in (["qemu-img", "info", "-f", "vhdx", out],
                            ["qemu-img", "check", "-f", "vhdx", out],
                            ["qemu-img", "compare", "-f", "raw", "-F", "vhdx", empty, out]):
                    p = run(*cmd, check=False)
                    self.assertEqual(p.returncode, 0,
                                     f"{cmd[1]}: {p.stdout.decode()}{p.stderr.decode()}")
                back = self.p("empty-back.raw")
                run(DF, "convert", out, "-O", "raw", "--no-progress", "-o", back)
                self.assertEqual(os.path.getsize(back), 0)
                for f in (out, piped, back):
                    os.unlink(f)


class HostileVhdx(unittest.TestCase):
    """Each refusal: exit 1, one line naming the file and the cause, nothing left behind."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-vhdxbad-", dir="/var/tmp")
        self.dest = os.path.join(self.dir, "out.img")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def good(self, name="bad.vhdx"):
        img = os.path.join(self.dir, name)
        run("qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
        run("qemu-io", "-f", "vhdx", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 7M 1M",
            img)
        return Vhdx(img)

    # exit 1, one line starting "diskferry: " and naming each of must_mention, no DEST left
    fails = test_qcow2_source.HostileImages.fails

    def test_truncated(self):
        v = self.good()
        os.truncate(v.path, os.path.getsize(v.path) - 512 * KiB)
        self.fails(v.path, [v.path, "beyond the end of the file"])
        os.truncate(v.path, 200 * KiB)
        self.fails(v.path, [v.path, "truncated"])

    def test_bad_crcs(self):
        v = self.good()
        # One header damaged: the other one is used.
        v.write(128 * KiB + 100, b"\x01")
        run(DF, "convert", v.path, "-O", "raw", "--no-progress", "-o", self.dest)
        os.unlink(self.dest)
        v.write(64 * KiB + 100, b"\x01")
        self.fails(v.path, [v.path, "no valid header"])
        v = self.good("rt.vhdx")
        v.write(192 * KiB + 100, b"\x01")
        v.write(256 * KiB + 100, b"\x01")
        self.fails(v.path, [v.path, "no valid region table"])

    def test_bat_entry_beyond_eof_or_overlapping(self):
        v = self.good()
        b = v.first_present()
        v.set_bat_entry(b, (os.path.getsize(v.path) + 64 * MiB) | 6)
        self.fails(v.path, [v.path, f"block {b}", "beyond the end of the file"])
        v.set_bat_entry(b, v.meta | 6)
        self.fails(v.path, [v.path, "overlaps", "metadata"])
        v = self.good("two.vhdx")
        v.set_bat_entry(1, v.bat_entry(v.first_present()))
        self.fails(v.path, [v.path, "overlaps", "block"])
        v.set_bat_entry(1, 7)  # PARTIALLY_PRESENT
        self.fails(v.path, [v.path, "PARTIALLY_PRESENT"])

    def test_differencing_disk(self):
        v = self.good()
        v.write(v.items[FILE_PARAMS] + 4, struct.pack("<I", 2))  # HasParent
        self.fails(v.path, [v.path, "differencing disk"])

    def test_log_needing_replay(self):
        v = self.good()
        log_guid = uuid.UUID("12345678-1234-4234-8234-123456789abc").bytes_le

        def set_log(h):
            h[48:64] = log_guid

        for slot in (0, 1):
            v.rewrite_header(slot, set_log)
        log_offset = struct.unpack("<Q", v.read(64 * KiB + 72, 8))[0]
        entry = bytearray(4096)
        entry[0:4] = b"loge"
        struct.pack_into("<II", entry, 8, 4096, 0)
        entry[32:48] = log_guid
        v.write(log_offset, bytes(entry))
        self.fails(v.path, [v.path, "needs log replay", "qemu-img check -r all"])

    def test_absurd_virtual_size(self):
        v = self.good()
        v.write(v.items[DISK_SIZE], struct.pack("<Q", 1 << 62))
        self.fails(v.path, [v.path, "exceeds the format's limit"])
        v.write(v.items[DISK_SIZE], struct.pack("<Q", 1 << 40))  # BAT far too small for it
        self.fails(v.path, [v.path, "cannot hold"])

    def test_forced_on_raw_stdin_refused_damage_in_zst_found(self):
        raw = os.path.join(self.dir, "plain.raw")
        make_raw(raw, 2, 1)
        self.fails(raw, [raw, "vhdxfile"], extra=("--source-format", "vhdx"))
        # Inside .zst it is read in passes over the stream: damage is found the same way.
        v = self.good()
        v.write(v.items[DISK_SIZE], struct.pack("<Q", 1 << 62))
        zst = v.path + ".zst"
        run("zstd", "-q", "-f", v.path, "-o", zst)
        self.fails(zst, [zst, "exceeds the format's limit"])
        v = self.good()
        with open(v.path, "rb") as f:
            self.fails("-", ["stdin", "VHDX image cannot be read as a stream"], stdin=f)


@unittest.skipIf(OpenSSHServer.unavailable_reason(), OpenSSHServer.unavailable_reason() or "")
class RemoteVhdx(unittest.TestCase):
    """Restore and verify of VHDX backups on a real OpenSSH chroot."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-vhdx-remote-", dir="/var/tmp")
        cls.raw = os.path.join(cls.dir, "src.raw")
        make_raw(cls.raw, 24, 9)
        cls.server = OpenSSHServer()
        cls.server.start()
        cls.kh = os.path.join(cls.dir, "known_hosts")
        cls.server.write_known_hosts(cls.kh)
        cls.opts = ["--identity", cls.server.client_key, "--known-hosts", cls.kh, "--no-progress"]
        cls.remote = os.path.join(cls.server.backups, "v")
        for name, args in (("ours.vhdx", ["--block-size", "1M"]), ("bad.vhdx", []),
                           ("ours.vhdx.zst", ["--compress", "zstd"])):
            run(DF, "convert", cls.raw, "-O", "vhdx", *args, *cls.opts, "-o",
                cls.server.url(f"/backups/v/{name}"))
        qemu = os.path.join(cls.remote, "qemu.vhdx")
        run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", cls.raw,
            qemu)
        # A BAT entry pointing past the end of the file, made on the server (sidecar kept).
        v = Vhdx(os.path.join(cls.remote, "bad.vhdx"))
        v.set_bat_entry(v.first_present(), (256 * 1024 * MiB) | 6)
        for n in os.listdir(cls.remote):
            os.chown(os.path.join(cls.remote, n), cls.server.uid, cls.server.gid)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_restore_to_raw(self):
        for name in ("ours.vhdx", "qemu.vhdx"):
            with self.subTest(name=name):
                out = os.path.join(self.dir, name + ".img")
                p = run(DF, "convert", self.server.url(f"/backups/v/{name}"), "-O", "raw",
                        *self.opts, "-o", out, check=False)
                self.assertEqual(p.returncode, 0, p.stderr.decode())
                self.assertEqual(run("cmp", self.raw, out, check=False).returncode, 0, name)
                p = run("qemu-img", "compare", "-f", "vhdx", "-F", "raw",
                        os.path.join(self.remote, name), out, check=False)
                self.assertEqual(p.returncode, 0, p.stdout.decode())
                os.unlink(out)

    def test_bad_remote_refused(self):
        out = os.path.join(self.dir, "bad.img")
        p = run(DF, "convert", self.server.url("/backups/v/bad.vhdx"), "-O", "raw", *self.opts,
                "-o", out, check=False)
        err = p.stderr.decode()
        self.assertEqual(p.returncode, 1, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("bad.vhdx", err)
        self.assertIn("beyond the end of the file", err)
        self.assertFalse(os.path.exists(out) or os.path.exists(out + ".partial"))

    def test_verify(self):
        for name in ("ours.vhdx", "ours.vhdx.zst"):
            with self.subTest(name=name):
                p = run(DF, "verify", self.server.url(f"/backups/v/{name}"), *self.opts[:4],
                        check=False)
                self.assertEqual(p.returncode, 0, p.stdout.decode() + p.stderr.decode())
        p = run(DF, "verify", self.server.url("/backups/v/bad.vhdx"), *self.opts[:4],
                check=False)
        out = p.stdout.decode() + p.stderr.decode()
        self.assertEqual(p.returncode, 5, out)
        self.assertIn("beyond the end of the file", out)


if __name__ == "__main__":
    DF = test_qcow2_source.DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
