#!/usr/bin/env python3
"""qcow2 images and backing chains as `diskferry convert` sources, judged by qemu-img.

Every output (raw, qcow2, vhdx) is compared with `qemu-img compare` against `qemu-img convert
-O raw` of the source chain; hostile images must give one-line errors, exit 1 and no output.

Run: test_qcow2_source.py PATH/TO/diskferry   (ctest passes the binary)
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

DF = None  # path of the diskferry binary
KiB, MiB, GiB = 1024, 1024**2, 1024**3

OUTPUTS = [("raw", ["-O", "raw"]), ("qcow2", ["-O", "qcow2"]), ("vhdx", ["-O", "vhdx"])]


def run(*args, stdin=None, stdout=None, check=True, **kw):
    p = subprocess.run([str(a) for a in args], stdin=stdin, stdout=stdout or subprocess.PIPE,
                       stderr=subprocess.PIPE, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}: "
                             f"{p.stderr.decode(errors='replace')}")
    return p


def create(path, size, *, cluster=None, compat=None, refcount_bits=None, backing=None,
           backing_fmt=None, cwd=None, extra=()):
    opts = []
    if cluster:
        opts.append(f"cluster_size={cluster}")
    if compat:
        opts.append(f"compat={compat}")
    if refcount_bits:
        opts.append(f"refcount_bits={refcount_bits}")
    opts.extend(extra)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    cmd += [path] + ([str(size)] if size is not None else [])
    run(*cmd, cwd=cwd)


def io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, path)


def virtual_size(path, fmt):
    info = json.loads(run("qemu-img", "info", "-f", fmt, "--output=json", path).stdout)
    return info["virtual-size"]


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def text(n, seed):
    r = random.Random(seed)
    words = [b"disk", b"ferry", b"qcow2", b"chain", b"backing", b"zero", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])


class Qcow2Sources(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-q2-", dir="/var/tmp")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def p(self, *names):
        return os.path.join(self.dir, *names)

    def check_all_outputs(self, src, label, outputs=OUTPUTS, cwd=None):
        """Converts src to every output format and compares each with qemu-img's raw view."""
        ref = self.p(f"{label}.ref.raw")
        run("qemu-img", "convert", "-O", "raw", src, ref)
        size = virtual_size(ref, "raw")
        self.assertEqual(size, virtual_size(src, "qcow2"))
        for fmt, args in outputs:
            with self.subTest(source=label, output=fmt):
                out = self.p(f"{label}.out.{fmt}")
                run(DF, "convert", src, *args, "--no-progress", "-o", out, cwd=cwd)
                self.assertFalse(os.path.exists(out + ".partial"))
                if fmt != "raw":
                    p = run("qemu-img", "check", "-f", fmt, out, check=False)
                    self.assertEqual(p.returncode, 0, f"{label}/{fmt}: {p.stdout.decode()}")
                self.assertEqual(virtual_size(out, fmt), size, f"{label}/{fmt}: virtual size")
                p = run("qemu-img", "compare", "-f", "raw", "-F", fmt, ref, out, check=False)
                self.assertEqual(p.returncode, 0, f"{label}/{fmt}: qemu-img compare: "
                                 f"{p.stdout.decode()}{p.stderr.decode()}")
                os.unlink(out)
        os.unlink(ref)

    def fill_patterns(self, img, size, cluster):
        """Data, zero writes over data, discards and the last sector: each kind of L2 entry."""
        io(img, "write -P 0xab 0 1M",
           f"write -P 0xcd {3 * MiB - 700} 300k",
           f"write -z {3 * MiB} 64k",
           f"discard {512 * KiB} {max(cluster, 64 * KiB)}",
           f"write -P 0x11 {size - 512} 512")

    def test_cluster_sizes_versions_refcount_widths(self):
        size = 12 * MiB + 512 * KiB
        cases = [(512, "1.1", 16), (4096, "0.10", None), (65536, "1.1", 1),
                 (65536, "0.10", None), (65536, "1.1", 64), (2 * MiB, "1.1", 8),
                 (2 * MiB, "0.10", None)]
        for cluster, compat, rb in cases:
            label = f"c{cluster}-v{compat}-r{rb}"
            img = self.p(label + ".qcow2")
            create(img, size, cluster=cluster, compat=compat, refcount_bits=rb)
            self.fill_patterns(img, size, cluster)
            self.check_all_outputs(img, label)

    def test_compressed_clusters_both_types(self):
        raw = self.p("plain.raw")
        with open(raw, "wb") as f:
            f.truncate(9 * MiB)
            f.write(text(2 * MiB, 1))
            f.seek(4 * MiB)
            f.write(random.Random(2).randbytes(MiB))  # incompressible: stored plain
            f.seek(7 * MiB + 333)
            f.write(text(300 * KiB, 3))
        for ctype in ("zlib", "zstd"):
            for cluster in ("4K", "64K", "2M"):
                label = f"comp-{ctype}-{cluster}"
                img = self.p(label + ".qcow2")
                opts = f"cluster_size={cluster},compression_type={ctype}"
                run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, raw, img)
                self.check_all_outputs(img, label)

    def test_chain_of_three_with_raw_base_and_relative_names(self):
        d = self.p("chain-raw")
        os.makedirs(d)
        base = os.path.join(d, "base.img")
        with open(base, "wb") as f:
            f.truncate(16 * MiB)
            f.write(text(3 * MiB, 4))
            f.seek(10 * MiB)
            f.write(text(MiB, 5))
        # Relative names, resolved against each image's directory (not the cwd).
        os.makedirs(os.path.join(d, "snaps"))
        create("snaps/mid.qcow2", None, backing="../base.img", backing_fmt="raw", cwd=d,
               cluster="4K")
        create("snaps/top.qcow2", 20 * MiB, backing="mid.qcow2", backing_fmt="qcow2",
               cwd=d)
        mid, top = os.path.join(d, "snaps/mid.qcow2"), os.path.join(d, "snaps/top.qcow2")
        io(mid, "write -P 0x22 1M 1M", f"write -z {10 * MiB + 4096} 8k")
        io(top, "write -P 0x33 1536k 64k", "write -z 0 64k", f"discard {2 * MiB} 64k",
           f"write -P 0x44 {17 * MiB} 4k")
        self.check_all_outputs(top, "chain-raw", cwd="/")
        # The image named by a relative path: its backing names resolve against that path's
        # directory, as qemu-img resolves them.
        out = os.path.join(d, "rel.out.raw")
        run(DF, "convert", "snaps/top.qcow2", "-O", "raw", "-o", out, cwd=d)
        self.assertEqual(run("qemu-img", "compare", "-F", "raw", top, out,
                             check=False).returncode, 0)

    def test_chain_of_three_qcow2_compressed_base_different_sizes(self):
        d = self.p("chain-q")
        os.makedirs(d)
        raw = os.path.join(d, "seed.raw")
        with open(raw, "wb") as f:
            f.truncate(24 * MiB)
            f.write(text(5 * MiB, 6))
            f.seek(20 * MiB)
            f.write(text(4 * MiB, 7))
        base = os.path.join(d, "base.qcow2")
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, base)
        # The middle layer is smaller than the base (the base's tail is hidden) and the top
        # larger than the middle (reads past the middle's end are zeros).
        create(os.path.join(d, "mid.qcow2"), 16 * MiB, backing="base.qcow2", backing_fmt="qcow2",
               cluster="512", compat="0.10")
        create(os.path.join(d, "top.qcow2"), 28 * MiB, backing="mid.qcow2", backing_fmt="qcow2",
               cluster="2M")
        io(os.path.join(d, "mid.qcow2"), "write -P 0x55 100k 30k", f"write -P 0x56 {15 * MiB} 1M")
        io(os.path.join(d, "top.qcow2"), f"write -z {4 * MiB} 2M", f"write -P 0x66 {25 * MiB} 1k")
        self.check_all_outputs(os.path.join(d, "top.qcow2"), "chain-q")

    def test_pipe_output_measure_and_reruns_agree(self):
        img = self.p("agree.qcow2")
        create(img, 40 * MiB, cluster="64K")
        self.fill_patterns(img, 40 * MiB, 65536)
        for fmt, args in OUTPUTS[1:]:
            with self.subTest(output=fmt):
                a, b = self.p("agree.a"), self.p("agree.b")
                run(DF, "convert", img, *args, "-o", a)
                with open(b, "wb") as f:
                    run(DF, "convert", img, *args, "-o", "-", stdout=f)  # planned: two passes
                self.assertTrue(files_equal(a, b), f"{fmt}: -o - differs from -o file")
                m = json.loads(run(DF, "measure", img, *args, "--json").stdout)
                self.assertEqual(m["size"], os.path.getsize(a))
                os.unlink(a)
                os.unlink(b)

    def test_only_allocated_data_is_copied(self):
        img = self.p("sparse.qcow2")
        create(img, 64 * GiB)
        io(img, "write -P 0x77 0 1M", f"write -P 0x78 {40 * GiB} 1M")
        out = self.p("sparse.out.qcow2")
        run(DF, "convert", img, "-O", "qcow2", "-o", out)
        self.assertLess(os.path.getsize(out), 4 * MiB)
        self.assertEqual(run("qemu-img", "compare", img, out, check=False).returncode, 0)
        os.unlink(out)

    def test_source_format_option(self):
        img = self.p("forced.qcow2")
        create(img, 2 * MiB)
        io(img, "write -P 0x99 0 64k")
        out = self.p("forced.out.raw")
        # Forced raw: the qcow2 file's own bytes, as qemu-img -f raw sees them.
        run(DF, "convert", img, "--source-format", "raw", "-O", "raw", "-o", out)
        self.assertEqual(run("qemu-img", "compare", "-f", "raw", "-F", "raw", img, out,
                             check=False).returncode, 0)
        os.unlink(out)
        run(DF, "convert", img, "--source-format", "qcow2", "-O", "raw", "-o", out)
        self.assertEqual(run("qemu-img", "compare", "-F", "raw", img, out,
                             check=False).returncode, 0)
        os.unlink(out)
        m = json.loads(run(DF, "measure", img, "--source-format", "qcow2", "-O", "raw",
                           "--json").stdout)
        self.assertEqual(m["virtual_size"], 2 * MiB)

    def test_asis_copies_the_file_itself(self):
        img = self.p("asis.qcow2")
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4K",
            self.make_text_raw("asis.raw", 3 * MiB + 777), img)  # ends off a sector boundary
        out = self.p("asis.out")
        for how in ("file", "stdout", "stdin"):
            with self.subTest(how=how):
                if how == "file":
                    run(DF, "convert", img, "-O", "asis", "-o", out)
                elif how == "stdout":
                    with open(out, "wb") as f:
                        run(DF, "convert", img, "-O", "asis", "-o", "-", stdout=f)
                else:
                    with open(img, "rb") as i:
                        run(DF, "convert", "-", "-O", "asis", "-o", out, stdin=i)
                self.assertTrue(files_equal(img, out), f"asis via {how} changed the bytes")
                os.unlink(out)
        run(DF, "convert", img, "-O", "asis", "--compress", "zstd", "-o", out + ".zst")
        run("zstd", "-q", "-d", out + ".zst", "-o", out)
        self.assertTrue(files_equal(img, out))
        m = json.loads(run(DF, "measure", img, "-O", "asis", "--json").stdout)
        self.assertEqual(m["size"], os.path.getsize(img))
        # A compressed file stays compressed: its bytes, not its contents.
        gz = self.p("asis.raw.zst")
        run("zstd", "-q", self.p("asis.raw"), "-o", gz)
        run(DF, "convert", gz, "-O", "asis", "-o", out + ".2")
        self.assertTrue(files_equal(gz, out + ".2"))
        p = run(DF, "convert", img, "-O", "asis", "--source-format", "raw", "-o", out + ".3",
                check=False)
        self.assertEqual(p.returncode, 2)

    def make_text_raw(self, name, size):
        path = self.p(name)
        with open(path, "wb") as f:
            f.write(text(size, 42))
        return path

    def test_dirty_image_is_read_with_a_warning(self):
        img = self.p("dirty.qcow2")
        create(img, 4 * MiB)
        io(img, "write -P 0x12 0 1M")
        with open(img, "rb") as f:
            f.seek(72)
            incompat = struct.unpack(">Q", f.read(8))[0]
        patch(img, 72, struct.pack(">Q", incompat | 1))
        out = self.p("dirty.out.raw")
        p = run(DF, "convert", img, "-O", "raw", "--no-progress", "-o", out)
        self.assertIn(b"warning", p.stderr)
        self.assertIn(b"dirty", p.stderr)
        ref = self.p("dirty.ref")
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, ref)
        self.assertTrue(files_equal(ref, out))


class HostileImages(unittest.TestCase):
    """Each refusal: exit 1, one line naming the file and the cause, nothing left behind."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="df-q2bad-", dir="/var/tmp")
        self.dest = os.path.join(self.dir, "out.qcow2")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def p(self, name):
        return os.path.join(self.dir, name)

    def good(self, name, size=8 * MiB, **kw):
        img = self.p(name)
        create(img, size, **kw)
        io(img, "write -P 0xab 0 1M", f"write -P 0xcd {size - MiB} 1M")
        return img

    def fails(self, src, must_mention, stdin=None, extra=(), code=1):
        for fmt in ("qcow2", "raw"):
            p = run(DF, "convert", src, *extra, "-O", fmt, "-o", self.dest, check=False,
                    stdin=stdin)
            err = p.stderr.decode()
            self.assertEqual(p.returncode, code, f"{src}: exit {p.returncode}: {err}")
            self.assertEqual(err.count("\n"), 1, f"not one line: {err!r}")
            self.assertTrue(err.startswith("diskferry: "), err)
            self.assertNotIn("Sanitizer", err)
            for m in must_mention:
                self.assertIn(m, err)
            self.assertFalse(os.path.exists(self.dest), "output left under the final name")
            self.assertFalse(os.path.exists(self.dest + ".partial"), "partial output left")
            if stdin:
                break
        return err

    def test_truncated(self):
        img = self.good("trunc.qcow2")
        os.truncate(img, os.path.getsize(img) // 2)
        self.fails(img, [img, "beyond the end of the file"])
        os.truncate(img, 50)
        self.fails(img, [img, "truncated"])

    def test_bad_l1_offset(self):
        img = self.good("badl1.qcow2")
        patch(img, 40, struct.pack(">Q", 1 << 50))
        self.fails(img, [img, "L1 table"])
        patch(img, 40, struct.pack(">Q", 0x10200))
        self.fails(img, [img, "L1 table offset not cluster-aligned"])

    def test_l1_size_overflow(self):
        img = self.good("bigl1.qcow2")
        patch(img, 36, struct.pack(">I", 0xFFFFFFFF))
        self.fails(img, [img, "L1 table larger"])
        patch(img, 36, struct.pack(">I", 0))
        self.fails(img, [img, "L1 table too small"])

    def test_bad_l2_offset(self):
        img = self.good("badl2.qcow2")
        with open(img, "rb") as f:
            f.seek(40)
            l1 = struct.unpack(">Q", f.read(8))[0]
        patch(img, l1, struct.pack(">Q", (1 << 63) | (1 << 45)))
        self.fails(img, [img, "L2 table", "beyond the end of the file"])

    def test_loop_chain(self):
        a, b = self.p("a.qcow2"), self.p("b.qcow2")
        create(b, 4 * MiB)
        create(a, None, backing="b.qcow2", backing_fmt="qcow2", cwd=self.dir)
        run("qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b, cwd=self.dir)
        self.fails(a, [a, "loops"])

    def test_self_backing(self):
        a = self.p("self.qcow2")
        create(a, 4 * MiB)
        run("qemu-img", "rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", a, cwd=self.dir)
        self.fails(a, [a, "loops"])

    def test_too_deep_chain(self):
        prev = self.p("l0.qcow2")
        create(prev, 1 * MiB)
        for i in range(1, 67):
            cur = self.p(f"l{i}.qcow2")
            create(cur, None, backing=f"l{i - 1}.qcow2", backing_fmt="qcow2", cwd=self.dir)
            prev = cur
        self.fails(prev, [prev, "deeper than 64"])
        # 64 backing files are fine.
        run(DF, "convert", self.p("l64.qcow2"), "-O", "raw", "-o", self.dest)

    def test_missing_backing_file(self):
        base = self.p("gone.img")
        with open(base, "wb") as f:
            f.truncate(MiB)
        top = self.p("orphan.qcow2")
        create(top, None, backing="gone.img", backing_fmt="raw", cwd=self.dir)
        os.unlink(base)
        self.fails(top, [top, base, "No such file"])

    def test_encrypted(self):
        img = self.p("enc.qcow2")
        # QEMU times its PBKDF iterations and can fail on a loaded machine ("Unable to get
        # accurate CPU usage"): a few attempts.
        for _ in range(5):
            p = run("qemu-img", "create", "-q", "--object", "secret,id=s0,data=hunter2", "-f",
                    "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50",
                    img, "4M", check=False)
            if p.returncode == 0:
                break
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        self.fails(img, [img, "encrypted", "LUKS"])
        aes = self.good("aes.qcow2")
        patch(aes, 32, struct.pack(">I", 1))  # crypt_method 1: the old AES-CBC scheme
        self.fails(aes, [aes, "encrypted", "AES"])

    def test_external_data_file(self):
        img = self.p("ext.qcow2")
        create(img, 4 * MiB, extra=[f"data_file={self.p('ext.data')}"])
        self.fails(img, [img, "external data file"])

    def test_unknown_incompatible_bit(self):
        img = self.good("incompat.qcow2")
        with open(img, "rb") as f:
            f.seek(72)
            incompat = struct.unpack(">Q", f.read(8))[0]
        patch(img, 72, struct.pack(">Q", incompat | (1 << 20)))
        self.fails(img, [img, "unknown incompatible features", "bit 20"])

    def test_corrupt_compressed_cluster(self):
        raw = self.p("c.raw")
        with open(raw, "wb") as f:
            f.write(text(MiB, 9))
        img = self.p("c.qcow2")
        run("qemu-img", "convert", "-c", "-O", "qcow2", raw, img)
        size = os.path.getsize(img)
        # Compressed data sits after the metadata clusters; garble the tail of the file.
        with open(img, "r+b") as f:
            f.seek(size - 2000)
            f.write(bytes(2000))
        self.fails(img, [img, "compressed cluster"])

    def test_stdin_refused_and_damage_inside_zstd_found(self):
        img = self.good("stdin.qcow2")
        with open(img, "rb") as f:
            self.fails("-", ["stdin", "qcow2", "random access"], stdin=f)
        # A .qcow2.zst is read in passes over the stream (test_restore.py); inside one, damage
        # is found as in a plain file.
        with open(img, "r+b") as f:
            f.seek(36)  # l1_size
            f.write(struct.pack(">I", 0x7FFFFFFF))
        zst = self.p("bad.qcow2.zst")
        run("zstd", "-q", "-f", img, "-o", zst)
        p = run(DF, "convert", zst, "-O", "raw", "-o", self.dest, check=False)
        err = p.stderr.decode()
        self.assertEqual(p.returncode, 1, err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(zst, err)
        self.assertFalse(os.path.exists(self.dest) or os.path.exists(self.dest + ".partial"))

    def test_forced_qcow2_on_raw(self):
        raw = self.p("plain.img")
        with open(raw, "wb") as f:
            f.write(text(MiB, 10))
        self.fails(raw, [raw, "not a qcow2 image"], extra=["--source-format", "qcow2"])
        p = run(DF, "convert", raw, "--source-format", "vmdk", "-O", "raw", "-o", self.dest,
                check=False)
        self.assertEqual(p.returncode, 2)


def files_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
