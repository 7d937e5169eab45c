#!/usr/bin/env python3
"""Integration tests of `diskferry convert` / `measure`, judged by qemu-img and libyal readers.

Run: test_convert.py PATH/TO/diskferry   (ctest passes the binary)
"""
import gzip
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import unittest

DF = None  # path of the diskferry binary
KiB, MiB, GiB = 1024, 1024**2, 1024**3


def run(*args, stdin=None, stdout=None, check=True, **kw):
    p = subprocess.run([str(a) for a in args], stdin=stdin, stdout=stdout or subprocess.PIPE,
                       stderr=subprocess.PIPE, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}: "
                             f"{p.stderr.decode(errors='replace')}")
    return p


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make_sparse(path, size, pieces=()):
    with open(path, "wb") as f:
        f.truncate(size)
    for off, data in pieces:
        write_at(path, off, data)


def rnd(n, seed):
    return random.Random(seed).randbytes(n)


def text(n, seed):
    r = random.Random(seed)
    words = [b"disk", b"ferry", b"qcow2", b"cluster", b"backup", b"night", b"stream", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])


def sources(d):
    """The source matrix: name -> raw image path."""
    s = {}

    def mk(name, size, pieces=()):
        p = os.path.join(d, name + ".img")
        make_sparse(p, size, pieces)
        s[name] = p

    mk("empty", 0)
    mk("random", 8 * MiB, [(0, rnd(8 * MiB, 1))])
    mk("first_last_byte", 3 * GiB, [(0, b"\x01"), (3 * GiB - 1, b"\x02")])
    # 64K clusters: one L2 table maps 512 MiB; 512 B clusters: 32 KiB. VHDX 32 MiB blocks and
    # 1 MiB chunks (the pass unit). Data straddles each of those boundaries.
    mk("boundaries", 1 * GiB + 5 * MiB, [
        (64 * KiB - 3, text(10, 2)),            # cluster boundary
        (512 * MiB - 100, text(300, 3)),        # L2 table boundary (64K clusters)
        (32 * MiB - 7, rnd(20, 4)),             # VHDX block boundary
        (1 * MiB - 1, b"\xff\xfe"),             # chunk boundary
        (700 * MiB, text(3 * MiB, 5)),          # several chunks of compressible data
        (1 * GiB + 4 * MiB, rnd(1 * MiB, 6)),   # last chunk
    ])
    mk("odd_size", 5 * MiB + 12345, [(0, text(5 * MiB + 12345, 7))])  # not a multiple of 512
    mk("not_cluster_multiple", 3 * MiB + 1536, [(3 * MiB, rnd(1536, 8))])
    mk("zeros_written", 4 * MiB, [(0, bytes(4 * MiB))])  # allocated but all zero
    mk("mixed", 48 * MiB + 512, [(100, text(5 * MiB, 10)), (9 * MiB - 5, rnd(2 * MiB, 11)),
                                (33 * MiB, text(64 * KiB, 12)), (48 * MiB, rnd(512, 13))])
    mk("big_sparse", 6 * GiB, [(i * 700 * MiB + 4097, rnd(300 * KiB, 9 + i)) for i in range(8)])
    return s


# (label, convert args, qemu format)
CONFIGS = [
    ("qcow2", ["-O", "qcow2"], "qcow2"),
    ("qcow2-512", ["-O", "qcow2", "--cluster-size", "512"], "qcow2"),
    ("qcow2-2M", ["-O", "qcow2", "--cluster-size", "2M"], "qcow2"),
    ("qcow2-zlib", ["-O", "qcow2", "--qcow2-compression", "zlib"], "qcow2"),
    ("qcow2-zstd", ["-O", "qcow2", "--qcow2-compression", "zstd"], "qcow2"),
    ("qcow2-zstd-4K", ["-O", "qcow2", "--cluster-size", "4K", "--qcow2-compression", "zstd"],
     "qcow2"),
    ("vhdx", ["-O", "vhdx"], "vhdx"),
    ("vhdx-1M", ["-O", "vhdx", "--block-size", "1M"], "vhdx"),
    ("vhdx-256M", ["-O", "vhdx", "--block-size", "256M"], "vhdx"),
    ("raw", ["-O", "raw"], "raw"),
]


class Matrix(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-it-", dir="/var/tmp")
        cls.src = sources(cls.dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def out(self, name):
        return os.path.join(self.dir, name)

    def check_image(self, src, img, fmt, label):
        empty = os.path.getsize(src) == 0
        # An empty VHDX is written with 1 MiB blocks whatever --block-size says (QEMU miscounts
        # the BAT of an empty VHDX and would need 2 GiB of it with 256 MiB blocks): every block
        # size is checked, 256M included.
        if fmt != "raw":
            p = run("qemu-img", "check", "-f", fmt, img, check=False)
            self.assertEqual(p.returncode, 0, f"{label}: qemu-img check: {p.stdout.decode()}"
                             f"{p.stderr.decode()}")
            self.assertIn(b"No errors were found", p.stdout)
        p = run("qemu-img", "compare", "-f", "raw", "-F", fmt, src, img, check=False)
        self.assertEqual(p.returncode, 0, f"{label}: qemu-img compare: {p.stdout.decode()}"
                         f"{p.stderr.decode()}")
        if empty:
            # libyal refuses every empty image (qcow2: L1 size 0; VHDX: 0 BAT entries), QEMU's
            # own included: check that this is still so, rather than skipping silently.
            ref = img + ".qemu-empty"
            run("qemu-img", "create", "-q", "-f", fmt, ref, "0") if fmt != "raw" else None
            tool = {"qcow2": "qcowinfo", "vhdx": "vhdiinfo"}.get(fmt)
            if tool:
                self.assertNotEqual(run(tool, ref, check=False).returncode, 0)
                os.unlink(ref)
            return
        if fmt == "qcow2" and "zstd" not in label:
            # libqcow (Debian 12) knows no zstd compression type; it reads the rest.
            run("qcowinfo", img)
        if fmt == "vhdx":
            run("vhdiinfo", img)

    def test_matrix(self):
        for sname, src in self.src.items():
            for label, args, fmt in CONFIGS:
                with self.subTest(source=sname, config=label):
                    a = self.out(f"{sname}.{label}.a")
                    b = self.out(f"{sname}.{label}.b")
                    run(DF, "convert", src, *args, "-o", a)
                    self.assertFalse(os.path.exists(a + ".partial"))
                    self.check_image(src, a, fmt, f"{sname}/{label}")
                    # Streaming to a pipe gives the same bytes as the single-pass file write.
                    # (Raw output of multi-GiB sparse sources would only push GiBs of zeros
                    # through the pipe; the smaller sources cover raw to a pipe.)
                    if fmt != "raw" or os.path.getsize(src) < GiB:
                        with open(b, "wb") as f:
                            run(DF, "convert", src, *args, "-o", "-", stdout=f)
                        self.assertTrue(filecmp(a, b), f"{sname}/{label}: -o - differs from -o file")
                        os.unlink(b)
                    # measure tells the exact size.
                    m = json.loads(run(DF, "measure", src, *args, "--json").stdout)
                    self.assertEqual(m["size"], os.path.getsize(a), f"{sname}/{label}: measure")
                    # Two runs are byte-identical.
                    run(DF, "convert", src, *args, "-o", b)
                    self.assertTrue(filecmp(a, b), f"{sname}/{label}: two runs differ")
                    os.unlink(a)
                    os.unlink(b)

    def test_compressed_sources_give_the_same_image(self):
        src = self.src["mixed"]
        gz, zst = self.out("b.img.gz"), self.out("b.img.zst")
        with open(src, "rb") as f, gzip.open(gz, "wb", compresslevel=1) as g:
            shutil.copyfileobj(f, g, 4 * MiB)
        run("zstd", "-q", "-f", src, "-o", zst)
        for label, args, fmt in [c for c in CONFIGS if c[0] in ("qcow2", "qcow2-zstd", "vhdx", "raw")]:
            with self.subTest(config=label):
                ref = self.out(f"ref.{label}")
                run(DF, "convert", src, *args, "-o", ref)
                for comp in (gz, zst):
                    o = self.out(f"c.{label}")
                    run(DF, "convert", comp, *args, "-o", o)  # file: two decompressions
                    self.assertTrue(filecmp(ref, o), f"{comp} → {label} differs (file)")
                    with open(comp, "rb") as i:                  # stdin: single pass
                        run(DF, "convert", "-", *args, "-o", o, stdin=i)
                    self.assertTrue(filecmp(ref, o), f"{comp} → {label} differs (stdin)")
                    os.unlink(o)
                os.unlink(ref)

    def test_outer_compression(self):
        src = self.src["mixed"]
        for label, args, fmt in [c for c in CONFIGS if c[0] in ("qcow2", "vhdx", "raw")]:
            for comp, decomp in (("zstd", ["zstd", "-q", "-d", "-c"]),
                                 ("zstd:9", ["zstd", "-q", "-d", "-c"]),
                                 ("gzip", ["gzip", "-d", "-c"])):
                with self.subTest(config=label, compress=comp):
                    plain, packed = self.out("plain"), self.out("packed")
                    run(DF, "convert", src, *args, "-o", plain)
                    run(DF, "convert", src, *args, "--compress", comp, "-o", packed)
                    with open(packed, "rb") as i:
                        unpacked = run(*decomp, stdin=i).stdout
                    with open(plain, "rb") as f:
                        self.assertEqual(unpacked, f.read(), f"{label}/{comp}: decompressed "
                                         "output differs from the uncompressed image")
                    m = json.loads(run(DF, "measure", src, *args, "--compress", comp,
                                       "--json").stdout)
                    self.assertEqual(m["size"], os.path.getsize(packed))
                    # Reproducible whatever the number of zstd workers.
                    again = self.out("again")
                    run(DF, "convert", src, *args, "--compress", comp, "--threads", "1", "-o",
                        again)
                    self.assertTrue(filecmp(packed, again), f"{label}/{comp}: not reproducible")

    def test_raw_output_is_sparse(self):
        src = self.src["big_sparse"]
        o = self.out("sparse.raw")
        run(DF, "convert", src, "-O", "raw", "-o", o)
        self.assertEqual(os.path.getsize(o), 6 * GiB)
        self.assertLess(os.stat(o).st_blocks * 512, 64 * MiB)
        self.assertTrue(filecmp(src, o))

    def test_layout_file(self):
        src = self.src["random"]
        layout = [{"offset": 0, "length": 1 * MiB, "exists": "true"},
                  {"offset": 2 * MiB, "length": 4 * MiB, "exists": "false"},
                  {"offset": 3 * MiB + 512, "length": 100 * KiB, "exists": "true"},
                  {"offset": 7 * MiB, "length": 1 * MiB, "exists": "true"}]
        lf = self.out("layout.json")
        with open(lf, "w") as f:
            json.dump(layout, f)
        expect = self.out("expect.raw")
        make_sparse(expect, 8 * MiB)
        with open(src, "rb") as f:
            data = f.read()
        for e in layout:
            if e["exists"] == "true":
                write_at(expect, e["offset"], data[e["offset"]:e["offset"] + e["length"]])
        for label, args, fmt in [c for c in CONFIGS if c[0] in ("qcow2", "vhdx", "raw")]:
            with self.subTest(config=label):
                o = self.out("layout." + label)
                run(DF, "convert", src, *args, "--layout", lf, "-o", o)
                self.check_image(expect, o, fmt, "layout/" + label)

    def test_odd_size_is_rounded_like_qemu_img(self):
        # qemu-img reports a raw file's size rounded up to 512 bytes; so do we.
        src = self.src["odd_size"]
        o = self.out("odd.qcow2")
        run(DF, "convert", src, "-O", "qcow2", "-o", o)
        info = json.loads(run("qemu-img", "info", "--output=json", o).stdout)
        self.assertEqual(info["virtual-size"], 5 * MiB + 12800)
        q = self.out("odd.ref.qcow2")
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, q)
        self.assertEqual(json.loads(run("qemu-img", "info", "--output=json", q).stdout)
                         ["virtual-size"], info["virtual-size"])


class BlockDevices(unittest.TestCase):
    """A loop device as the source (no hole map: every unit is read) and as the destination
    (positioned: single pass with the header rewrite; zeros written, never left as holes)."""

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("needs root for loop devices")
        self.dir = tempfile.mkdtemp(prefix="df-blk-", dir="/var/tmp")
        self.loops = []

    def tearDown(self):
        for dev in self.loops:
            run("losetup", "-d", dev, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def loop(self, path):
        p = run("losetup", "--find", "--show", path, check=False)
        if p.returncode != 0:
            self.skipTest("no loop device: " + p.stderr.decode().strip())
        dev = p.stdout.decode().strip()
        self.loops.append(dev)
        return dev

    def test_loop_device_source_and_destination(self):
        img = os.path.join(self.dir, "src.img")
        make_sparse(img, 64 * MiB, [(0, text(3 * MiB, 1)), (40 * MiB + 7, rnd(MiB, 2))])
        src_dev = self.loop(img)
        ref = os.path.join(self.dir, "ref.qcow2")
        run(DF, "convert", img, "-O", "qcow2", "-o", ref)
        for fmt in ("qcow2", "vhdx"):
            with self.subTest(fmt):
                # Destination device filled with junk: zeros must be written, not skipped.
                target = os.path.join(self.dir, "target." + fmt)
                with open(target, "wb") as f:
                    f.write(b"\xee" * (80 * MiB))
                dst_dev = self.loop(target)
                run(DF, "convert", src_dev, "-O", fmt, "-o", dst_dev)
                run("qemu-img", "check", "-f", fmt, dst_dev)
                run("qemu-img", "compare", "-f", "raw", "-F", fmt, img, dst_dev)
                if fmt == "qcow2":
                    size = os.path.getsize(ref)
                    with open(ref, "rb") as a, open(dst_dev, "rb") as b:
                        self.assertEqual(a.read(), b.read(size), "device copy differs from file")
        raw_target = os.path.join(self.dir, "target.raw")
        with open(raw_target, "wb") as f:
            f.write(b"\xee" * (64 * MiB))
        dst_dev = self.loop(raw_target)
        run(DF, "convert", img, "-O", "raw", "-o", dst_dev)
        run("cmp", img, dst_dev)

    def fill(self, path, size):
        with open(path, "wb") as f:
            f.write(b"\xee" * size)
        return path

    def digest(self, path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def test_device_smaller_than_the_output_is_refused_before_writing(self):
        target = self.fill(os.path.join(self.dir, "small.dev"), 16 * MiB)
        dev = self.loop(target)
        before = self.digest(target)
        img = os.path.join(self.dir, "big.img")
        make_sparse(img, 20 * MiB, [(0, rnd(20 * MiB, 3))])
        for fmt in ("raw", "qcow2", "vhdx"):
            with self.subTest(fmt):
                p = run(DF, "convert", img, "-O", fmt, "-o", dev, check=False)
                err = p.stderr.decode()
                self.assertEqual(p.returncode, 1, err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn(f"{dev}: block device too small: it holds 16777216 (16.0 MiB), "
                              "the output needs ", err)
                self.assertEqual(self.digest(target), before, "the device was written")
        # A stream's size is known only at its end: still one line saying why.
        with open(img, "rb") as f:
            p = run(DF, "convert", "-", "-O", "raw", "-o", dev, stdin=f, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn(f"{dev}: block device too small", p.stderr.decode())
        # A qcow2 larger than the device only if every cluster held data fits when its plan
        # says so.
        sparse = os.path.join(self.dir, "sparse.img")
        make_sparse(sparse, 64 * MiB, [(5 * MiB, rnd(MiB, 4))])
        run(DF, "convert", sparse, "-O", "qcow2", "-o", dev)
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", sparse, dev)

    def test_mounted_device_is_refused(self):
        target = self.fill(os.path.join(self.dir, "fs.dev"), 16 * MiB)
        dev = self.loop(target)
        run("mkfs.ext4", "-q", dev)
        mnt = os.path.join(self.dir, "mnt")
        os.mkdir(mnt)
        run("mount", dev, mnt)
        try:
            inside = os.path.join(mnt, "vm.img")
            make_sparse(inside, 4 * MiB, [(0, rnd(MiB, 5))])
            other = os.path.join(self.dir, "other.img")
            make_sparse(other, 4 * MiB, [(0, rnd(MiB, 6))])
            for src, why in ((inside, "holding the source " + inside), (other, "in use")):
                with self.subTest(src):
                    p = run(DF, "convert", src, "-O", "raw", "-o", dev, check=False)
                    err = p.stderr.decode()
                    self.assertNotEqual(p.returncode, 0, err)
                    self.assertEqual(err.count("\n"), 1, err)
                    self.assertIn(why, err)
            with open(inside, "rb") as f:
                self.assertEqual(f.read(), rnd(MiB, 5) + bytes(3 * MiB), "the source changed")
        finally:
            run("umount", mnt)


def data_ranges(path):
    """The file's data extents (SEEK_DATA/SEEK_HOLE); holes read as zeros."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


def filecmp(a, b):
    """Byte equality without reading GiBs of holes: compares the union of both data maps."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    ranges = sorted(data_ranges(a) + data_ranges(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            fa.seek(start)
            fb.seek(start)
            while start < end:
                n = min(4 * MiB, end - start)
                if fa.read(n) != fb.read(n):
                    return False
                start += n
    return True


class BadInput(unittest.TestCase):
    """Each failure: one line naming the thing and the cause, non-zero exit, nothing left behind."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-bad-", dir="/var/tmp")
        self.img = os.path.join(self.dir, "src.img")
        make_sparse(self.img, 4 * MiB, [(0, text(2 * MiB, 1))])
        self.dest = os.path.join(self.dir, "out.qcow2")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def fails(self, args, must_mention, stdin=None, dest=None, user=None):
        dest = dest or self.dest
        cmd = [DF, *args]
        if user:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        p = run(*cmd, check=False, stdin=stdin)
        err = p.stderr.decode()
        self.assertNotEqual(p.returncode, 0, f"{args} should fail")
        self.assertEqual(err.count("\n"), 1, f"not one line: {err!r}")
        self.assertTrue(err.startswith("diskferry: "), err)
        for m in must_mention:
            self.assertIn(m, err)
        self.assertFalse(os.path.exists(dest), f"{dest} exists after a failure")
        self.assertFalse(os.path.exists(dest + ".partial"), "partial output left behind")
        self.assertNotIn("Sanitizer", err)
        return err

    def test_missing_source(self):
        self.fails(["convert", "/nonexistent/x.img", "-O", "qcow2", "-o", self.dest],
                   ["/nonexistent/x.img", "No such file"])

    def test_unreadable_source(self):
        os.chmod(self.img, 0o600)
        os.chmod(self.dir, 0o777)
        self.fails(["convert", self.img, "-O", "qcow2", "-o", "/var/tmp/never-" + str(os.getpid())],
                   [self.img, "Permission denied"], user=65534,
                   dest="/var/tmp/never-" + str(os.getpid()))

    def test_source_is_directory(self):
        self.fails(["convert", self.dir, "-O", "qcow2", "-o", self.dest], [self.dir, "directory"])

    def test_truncated_and_corrupt_streams(self):
        with open(self.img, "rb") as f:
            data = f.read()
        gz = gzip.compress(data)
        zst = run("zstd", "-q", "-c", self.img).stdout
        cases = {
            "trunc.gz": (gz[: len(gz) // 2], "truncated gzip"),
            "corrupt.gz": (gz[:20] + bytes(b ^ 0x55 for b in gz[20:200]) + gz[200:], "gzip"),
            "trunc.zst": (zst[: len(zst) // 2], "truncated zstd"),
            "corrupt.zst": (zst[:20] + bytes(b ^ 0x55 for b in zst[20:200]) + zst[200:], "zstd"),
        }
        for name, (blob, why) in cases.items():
            with self.subTest(name):
                p = os.path.join(self.dir, name)
                with open(p, "wb") as f:
                    f.write(blob)
                for fmt in ("qcow2", "raw"):
                    self.fails(["convert", p, "-O", fmt, "-o", self.dest], [name, why])
                    with open(p, "rb") as i:
                        self.fails(["convert", "-", "-O", fmt, "-o", self.dest], ["stdin", why],
                                   stdin=i)

    def test_bad_layout(self):
        cases = {
            "notjson.json": ("[{\"offset\": 0,", "not valid JSON"),
            "notarray.json": ("{\"offset\": 0}", "array"),
            "negative.json": ("[{\"offset\": -5, \"length\": 10}]", "entry 0"),
            "missing.json": ("[{\"offset\": 0}]", "length"),
            "range.json": (json.dumps([{"offset": 3 * MiB, "length": 2 * MiB,
                                        "exists": "true"}]), "only"),
        }
        for name, (content, why) in cases.items():
            with self.subTest(name):
                lf = os.path.join(self.dir, name)
                with open(lf, "w") as f:
                    f.write(content)
                self.fails(["convert", self.img, "-O", "qcow2", "--layout", lf, "-o", self.dest],
                           [name, why])
        self.fails(["convert", self.img, "-O", "qcow2", "--layout", "/nonexistent.json", "-o",
                    self.dest], ["/nonexistent.json"])

    def test_bad_options(self):
        for args, why in [
            (["-O", "qcow3"], "qcow3"),
            (["-O", "qcow2", "--cluster-size", "3K"], "--cluster-size"),
            (["-O", "qcow2", "--cluster-size", "4M"], "--cluster-size"),
            (["-O", "qcow2", "--cluster-size", "lots"], "--cluster-size"),
            (["-O", "vhdx", "--block-size", "512K"], "--block-size"),
            (["-O", "qcow2", "--qcow2-compression", "lz4"], "--qcow2-compression"),
            (["-O", "vhdx", "--qcow2-compression", "zstd"], "--qcow2-compression"),
            (["-O", "qcow2", "--compress", "zstd:99"], "--compress"),
            (["-O", "qcow2", "--compress", "brotli"], "--compress"),
        ]:
            with self.subTest(args):
                self.fails(["convert", self.img, *args, "-o", self.dest], [why])

    def test_stdin_to_pipe_refused_with_reason(self):
        with open(self.img, "rb") as i:
            err = self.fails(["convert", "-", "-O", "qcow2", "-o", "-"], ["stdin", "file"],
                             stdin=i)
        self.assertIn("qcow2", err)

    def test_unwritable_destination(self):
        self.fails(["convert", self.img, "-O", "qcow2", "-o", "/nonexistent-dir/out.qcow2"],
                   ["/nonexistent-dir/out.qcow2", "No such file"], dest="/nonexistent-dir/out.qcow2")
        ro = os.path.join(self.dir, "ro")
        os.mkdir(ro, 0o555)
        os.chmod(self.dir, 0o755)
        self.fails(["convert", self.img, "-O", "qcow2", "-o", os.path.join(ro, "x.qcow2")],
                   ["Permission denied"], user=65534, dest=os.path.join(ro, "x.qcow2"))

    def test_disk_full(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to mount a small tmpfs")
        mnt = os.path.join(self.dir, "small")
        os.mkdir(mnt)
        run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt)
        try:
            big = os.path.join(self.dir, "big.img")
            make_sparse(big, 8 * MiB, [(0, rnd(4 * MiB, 3))])
            dest = os.path.join(mnt, "out.qcow2")
            self.fails(["convert", big, "-O", "qcow2", "-o", dest],
                       [dest, "No space left on device"], dest=dest)
            self.assertEqual(os.listdir(mnt), [])
        finally:
            run("umount", mnt)

    def test_existing_destination_kept_on_failure(self):
        with open(self.dest, "wb") as f:
            f.write(b"previous backup")
        p = run(DF, "convert", "/nonexistent.img", "-O", "qcow2", "-o", self.dest, check=False)
        self.assertNotEqual(p.returncode, 0)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous backup")


class DestinationIsAnInput(unittest.TestCase):
    """A destination that is a file the run reads (by any name) is refused before anything is
    written: one line, non-zero exit, every input unchanged, nothing created."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-self-", dir="/var/tmp")
        self.src = self.p("s2.raw")
        make_sparse(self.src, 4 * MiB, [(0, rnd(3 * MiB, 1))])
        run("qemu-img", "create", "-q", "-f", "qcow2", self.p("base.qcow2"), "8M")
        run("qemu-io", "-c", "write -P 0xab 0 2M", self.p("base.qcow2"))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
            self.p("top.qcow2"))
        run("qemu-io", "-c", "write -P 0xcd 1M 1M", self.p("top.qcow2"))
        with open(self.p("vm.ovf"), "w") as f:
            f.write("<Envelope/>\n")
        with open(self.p("layout.json"), "w") as f:
            json.dump([{"offset": 0, "length": MiB, "exists": "true"}], f)

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def p(self, name):
        return os.path.join(self.dir, name)

    def digests(self):
        out = {}
        for n in sorted(os.listdir(self.dir)):
            path = self.p(n)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[n] = hashlib.sha256(f.read()).hexdigest()
        return out

    def refused(self, *args, why, stdin=None):
        before, names = self.digests(), sorted(os.listdir(self.dir))
        p = run(DF, "convert", *args, check=False, stdin=stdin, cwd=self.dir)
        err = p.stderr.decode()
        self.assertNotEqual(p.returncode, 0, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("diskferry: "), err)
        self.assertIn(why, err)
        self.assertEqual(self.digests(), before, "an input changed")
        self.assertEqual(sorted(os.listdir(self.dir)), names, "something was created")
        return err

    def test_same_path(self):
        for fmt in ("qcow2", "vhdx", "raw"):
            self.refused(self.src, "-O", fmt, "-o", self.src,
                         why=f"{self.src}: is the same file as the source {self.src}")
        self.refused("s2.raw", "-O", "qcow2", "-o", "./s2.raw", why="same file")

    def test_symlink(self):
        os.symlink("s2.raw", self.p("link.raw"))
        self.refused(self.p("link.raw"), "-O", "vhdx", "-o", self.src, why="same file")
        self.refused(self.src, "-O", "vhdx", "-o", self.p("link.raw"), why="same file")

    def test_hard_link(self):
        os.link(self.src, self.p("hard.raw"))
        self.refused(self.src, "-O", "qcow2", "-o", self.p("hard.raw"), why="same file")

    def test_backing_file_of_the_chain(self):
        self.refused(self.p("top.qcow2"), "-O", "qcow2", "-o", self.p("base.qcow2"),
                     why="a backing file of the source")

    def test_container_file(self):
        self.refused(self.src, "-O", "qcow2", "--container", "tar", "--container-file",
                     self.p("vm.ovf"), "-o", self.p("vm.ovf"), why="--container-file")

    def test_layout_file(self):
        self.refused(self.src, "-O", "raw", "--layout", self.p("layout.json"), "-o",
                     self.p("layout.json"), why="--layout file")

    def test_source_is_the_partial_file_of_dest(self):
        os.rename(self.src, self.p("x.partial"))
        self.refused(self.p("x.partial"), "-O", "raw", "-o", self.p("x"), why="x.partial")

    def test_stdin_redirected_from_dest(self):
        with open(self.src, "rb") as f:
            self.refused("-", "-O", "qcow2", "-o", self.src, stdin=f, why="the source (stdin)")

    def test_one_such_output_stops_every_output(self):
        self.refused(self.src, "-O", "raw", "-o", self.p("fine.raw"), "-O", "qcow2", "-o",
                     self.src, why="same file")

    def test_loop_device_by_two_names(self):
        if os.geteuid() != 0:
            self.skipTest("needs root for loop devices")
        p = run("losetup", "--find", "--show", self.src, check=False)
        if p.returncode != 0:
            self.skipTest("no loop device")
        dev = p.stdout.decode().strip()
        try:
            node = self.p("second-node")
            os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(dev).st_rdev)
            self.refused(dev, "-O", "raw", "-o", node, why="same device")
            self.refused(node, "-O", "qcow2", "-o", dev, why="same device")
        finally:
            run("losetup", "-d", dev, check=False)


class ConcurrentRuns(unittest.TestCase):
    """Two runs writing one DEST: each owns its DEST.partial (flock); the second is refused, and
    what is published is exactly what the run that exits 0 wrote."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-conc-", dir="/var/tmp")
        self.dest = os.path.join(self.dir, "lc.raw")
        self.small = os.path.join(self.dir, "small.raw")
        make_sparse(self.small, 2 * MiB, [(0, rnd(2 * MiB, 21))])
        self.slow_data = rnd(8 * MiB, 22)
        self.slow_file = os.path.join(self.dir, "slow.raw")
        with open(self.slow_file, "wb") as f:
            f.write(self.slow_data)

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def start_slow(self):
        """A run reading a pipe fed from here: it stays in the middle of its write."""
        a = subprocess.Popen([DF, "convert", "-", "-O", "raw", "-o", self.dest],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        a.stdin.write(self.slow_data[:4 * MiB])
        a.stdin.flush()
        for _ in range(100):
            if os.path.exists(self.dest + ".partial"):
                break
            time.sleep(0.05)
        time.sleep(0.3)
        return a

    def reference(self, source):
        ref = os.path.join(self.dir, "ref-" + os.path.basename(source))
        run(DF, "convert", source, "-O", "raw", "-o", ref)
        return ref

    def test_second_run_refused_and_the_first_publishes_its_own_bytes(self):
        a = self.start_slow()
        b = run(DF, "convert", self.small, "-O", "raw", "-o", self.dest, check=False)
        a.stdin.write(self.slow_data[4 * MiB:])
        a.stdin.close()
        a_err = a.stderr.read().decode()
        a.stderr.close()
        a.wait(timeout=60)
        codes = {"slow": a.returncode, "small": b.returncode}
        self.assertEqual(sorted(codes.values()).count(0), 1, (codes, a_err, b.stderr))
        winner = "slow" if a.returncode == 0 else "small"
        loser_err = b.stderr.decode() if winner == "slow" else a_err
        self.assertEqual(loser_err.count("\n"), 1, loser_err)
        self.assertIn("being written by another diskferry run", loser_err)
        ref = self.reference(self.slow_file if winner == "slow" else self.small)
        self.assertEqual(run("cmp", ref, self.dest, check=False).returncode, 0,
                         f"{self.dest} is not what the run that exited 0 ({winner}) wrote")
        self.assertFalse(os.path.exists(self.dest + ".partial"))

    def test_partial_left_by_a_killed_run_is_taken_over(self):
        a = self.start_slow()
        a.kill()
        a.wait()
        a.stdin.close()
        a.stderr.close()
        self.assertTrue(os.path.exists(self.dest + ".partial"))
        run(DF, "convert", self.small, "-O", "raw", "-o", self.dest)
        self.assertEqual(run("cmp", self.reference(self.small), self.dest,
                             check=False).returncode, 0)
        self.assertFalse(os.path.exists(self.dest + ".partial"))

    def test_partial_name_that_is_a_symlink_is_refused(self):
        victim = os.path.join(self.dir, "victim")
        with open(victim, "wb") as f:
            f.write(b"not yours")
        os.symlink(victim, self.dest + ".partial")
        p = run(DF, "convert", self.small, "-O", "raw", "-o", self.dest, check=False)
        err = p.stderr.decode()
        self.assertNotEqual(p.returncode, 0, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("symbolic link", err)
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"not yours")
        self.assertFalse(os.path.exists(self.dest))

    def test_partial_name_with_other_links_is_refused(self):
        victim = os.path.join(self.dir, "victim")
        with open(victim, "wb") as f:
            f.write(b"not yours")
        os.link(victim, self.dest + ".partial")
        p = run(DF, "convert", self.small, "-O", "raw", "-o", self.dest, check=False)
        err = p.stderr.decode()
        self.assertNotEqual(p.returncode, 0, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("hard links", err)
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"not yours")
        self.assertFalse(os.path.exists(self.dest))

    def test_dest_that_is_a_symlink_is_written_where_it_points(self):
        os.mkdir(os.path.join(self.dir, "volume"))
        real = os.path.join(self.dir, "volume", "vm.raw")
        with open(real, "wb") as f:
            f.write(b"old")
        os.symlink(real, self.dest)
        run(DF, "convert", self.small, "-O", "raw", "-o", self.dest)
        self.assertTrue(os.path.islink(self.dest), "the link was replaced by a file")
        self.assertEqual(run("cmp", self.small, real, check=False).returncode, 0)
        self.assertEqual(sorted(os.listdir(os.path.join(self.dir, "volume"))), ["vm.raw"])
        os.unlink(real)
        p = run(DF, "convert", self.small, "-O", "raw", "-o", self.dest, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("symbolic link", p.stderr.decode())


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
