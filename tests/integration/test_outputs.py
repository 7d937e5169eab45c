#!/usr/bin/env python3
"""Several outputs from one read, and the tar/OVA container.

The source is a qcow2 chain (base <- top, with data, zero writes and a discard); every output is
judged with qemu-img compare against `qemu-img convert -O raw` of the chain, and must be the same
bytes as a separate single-output run. A pipe as source proves the read is shared (a pipe cannot
be read twice). A full destination, and a connection cut on an SFTP output through the TCP
proxy, must not stop the other outputs. Archives are read back with GNU tar and Python's tarfile.

Run: test_outputs.py PATH/TO/diskferry
"""
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sftp_servers import OpenSSHServer  # noqa: E402
from tcp_proxy import TcpProxy  # noqa: E402

DF = None
MiB = 1024 * 1024


def run(*args, **kw):
    if "stdout" in kw:
        kw.setdefault("stderr", subprocess.PIPE)
    else:
        kw.setdefault("capture_output", True)
    return subprocess.run([str(a) for a in args], text=True, timeout=300, **kw)


def ok(p):
    assert p.returncode == 0, (p.args, p.stdout, p.stderr)
    return p


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()


class Outputs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-outputs-", dir="/var/tmp")
        d = cls.dir
        cls.base = os.path.join(d, "base.qcow2")
        cls.top = os.path.join(d, "top.qcow2")
        ok(run("qemu-img", "create", "-q", "-f", "qcow2", cls.base, "96M"))
        ok(run("qemu-io", "-c", "write -P 0xab 1M 7M", "-c", "write -P 0x11 60M 3M", cls.base))
        ok(run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
               cls.top))
        ok(run("qemu-io", "-c", "write -P 0xcd 4M 2M", "-c", "write -z 61M 1M",
               "-c", "discard 2M 64k", "-c", "write -P 0x5a 95M 1M", cls.top))
        # Random bytes too, so compression has something to chew on.
        r = random.Random(5)
        with open(os.path.join(d, "rnd"), "wb") as f:
            f.write(r.randbytes(3 * MiB))
        ok(run("qemu-io", "-c", f"write -s {os.path.join(d, 'rnd')} 30M 3M", cls.top))
        cls.raw = os.path.join(d, "chain.raw")
        ok(run("qemu-img", "convert", "-O", "raw", cls.top, cls.raw))
        with open(os.path.join(d, "vm.ovf"), "w") as f:
            f.write('<?xml version="1.0"?>\n<Envelope/>\n')

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def p(self, name):
        return os.path.join(self.dir, name)

    def assert_same_disk(self, image, fmt=None):
        args = ["qemu-img", "compare", "-f", "raw"] + (["-F", fmt] if fmt else []) + [self.raw,
                                                                                       image]
        c = run(*args)
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)

    def single(self, name, *args):
        out = self.p("single-" + name)
        ok(run(DF, "convert", self.top, *args, "--no-progress", "-o", out))
        return out

    def test_four_outputs_from_one_read_equal_four_single_runs(self):
        outs = {"a.qcow2": ["-O", "qcow2"],
                "b.vhdx": ["-O", "vhdx", "--block-size", "1M"],
                "c.img.zst": ["-O", "raw", "--compress", "zstd"],
                "d.qcow2": ["-O", "qcow2", "--qcow2-compression", "zstd", "--cluster-size", "4K"]}
        p = ok(run(DF, "convert", self.top, "--no-progress",
                   "-O", "qcow2", "-o", self.p("a.qcow2"),
                   "--to", "vhdx,block-size=1M:" + self.p("b.vhdx"),
                   "--to", "raw,compress=zstd:" + self.p("c.img.zst"),
                   "--to", "qcow2,qcow2-compression=zstd,cluster-size=4K:" + self.p("d.qcow2")))
        self.assertEqual(len([l for l in p.stderr.splitlines() if l.startswith("wrote ")]), 4,
                         p.stderr)
        for name, args in outs.items():
            with self.subTest(name=name):
                self.assertEqual(sha(self.p(name)), sha(self.single(name, *args)),
                                 "differs from a single-output run")
        self.assert_same_disk(self.p("a.qcow2"), "qcow2")
        self.assert_same_disk(self.p("b.vhdx"), "vhdx")
        self.assert_same_disk(self.p("d.qcow2"), "qcow2")
        with open(self.p("c.img"), "wb") as f:
            ok(run("zstd", "-dc", self.p("c.img.zst"), stdout=f))
        self.assertEqual(run("cmp", self.raw, self.p("c.img")).returncode, 0)
        for q in ("a.qcow2", "d.qcow2"):
            self.assertEqual(run("qemu-img", "check", self.p(q)).returncode, 0)
        self.assertEqual(run("vhdiinfo", self.p("b.vhdx")).returncode, 0)

    def test_a_pipe_is_read_once_for_every_output(self):
        # -O/-o pairs: each -O goes with the -o in the same place.
        with open(self.raw, "rb") as f:
            ok(run(DF, "convert", "-", "--no-progress", "-O", "qcow2", "-o", self.p("p.qcow2"),
                   "-O", "vhdx", "-o", self.p("p.vhdx"), "-O", "raw", "-o", self.p("p.img"),
                   stdin=f))
        self.assert_same_disk(self.p("p.qcow2"), "qcow2")
        self.assert_same_disk(self.p("p.vhdx"), "vhdx")
        self.assertEqual(run("cmp", self.raw, self.p("p.img")).returncode, 0)
        # A file source to files: one pass (no planning pass) shared by both.
        p = ok(run(DF, "convert", self.top, "--progress", "-O", "qcow2", "-o",
                   self.p("q.qcow2"), "-O", "vhdx", "-o", self.p("q.vhdx")))
        self.assertNotIn("planning", p.stderr)
        self.assert_same_disk(self.p("q.vhdx"), "vhdx")

    def test_a_full_destination_fails_alone(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to mount a small tmpfs")
        mnt = self.p("full")
        os.mkdir(mnt)
        ok(run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt))
        try:
            p = run(DF, "convert", self.top, "--no-progress", "-O", "qcow2", "-o",
                    os.path.join(mnt, "x.qcow2"), "-O", "vhdx", "-o", self.p("ok.vhdx"))
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertEqual(os.listdir(mnt), [], "a partial file was left on the full fs")
            self.assertIn(os.path.join(mnt, "x.qcow2"), p.stderr)
            self.assertIn("1 of 2 outputs failed", p.stderr)
            self.assert_same_disk(self.p("ok.vhdx"), "vhdx")
        finally:
            run("umount", mnt)

    def test_usage_errors_name_the_problem(self):
        cases = [
            (["-O", "qcow2", "-O", "vhdx", "-o", "x"], "give one -O per -o"),
            (["--to", "qcow2"], "expected FORMAT[,KEY=VALUE...]:DEST"),
            (["--to", "qcow2,bogus=1:x"], "unknown key 'bogus'"),
            (["-O", "asis", "-o", "x", "-O", "qcow2", "-o", "y"], "cannot share a read"),
            (["-O", "qcow2", "-o", "s", "-O", "vhdx", "-o", "s"], "given as the destination twice"),
            (["-O", "qcow2", "--container", "zip", "-o", "x"], "--container 'zip'"),
            (["-O", "qcow2", "--container-file", "vm.ovf", "-o", "x"], "need --container tar"),
            (["-O", "qcow2", "--container", "tar", "--container-file", "/etc", "-o", "x"],
             "must be a regular file"),
            (["-O", "qcow2", "--container", "tar", "--container-name", "../x", "-o", "x"],
             "without '..'"),
        ]
        for args, words in cases:
            with self.subTest(args=args):
                p = run(DF, "convert", self.top, "--no-progress", *args, cwd=self.dir)
                self.assertNotEqual(p.returncode, 0)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn(words, p.stderr)
                for left in ("x", "x.partial", "s", "s.partial", "y"):
                    self.assertFalse(os.path.exists(self.p(left)), left)

    def test_to_takes_a_compression_level(self):
        # The same bytes as -O/-o at that level, and not those of the default level.
        for comp, name, default in (("zstd:9", "lv.vhdx.zst", "zstd"),
                                    ("gzip:1", "lv.vhdx.gz", "gzip")):
            with self.subTest(comp=comp):
                ok(run(DF, "convert", self.top, "--no-progress",
                       "--to", f"vhdx,compress={comp},block-size=1M:{name}", cwd=self.dir))
                self.assertEqual(
                    sha(self.p(name)),
                    sha(self.single(name, "-O", "vhdx", "--block-size", "1M", "--compress", comp)))
                self.assertNotEqual(
                    sha(self.p(name)),
                    sha(self.single("d-" + name, "-O", "vhdx", "--block-size", "1M",
                                    "--compress", default)))
                self.assertFalse(os.path.exists(self.p(comp.split(":")[1] + ":" + name)))

    def test_to_refuses_a_dest_that_looks_like_a_leftover_option(self):
        for to, dest in (("qcow2:compress=zstd:lo.qcow2", "compress=zstd:lo.qcow2"),
                         ("qcow2,cluster-size=64K:9:lo.qcow2", "9:lo.qcow2"),
                         ("vhdx,block-size=1M:compress=gzip", "compress=gzip")):
            with self.subTest(to=to):
                p = run(DF, "convert", self.top, "--no-progress", "--to", to, cwd=self.dir)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn("looks like a leftover option", p.stderr)
                self.assertIn(dest, p.stderr)
                self.assertFalse(os.path.exists(self.p(dest)))
                self.assertFalse(os.path.exists(self.p(dest + ".partial")))
        # ./NAME: a file of that name after all.
        ok(run(DF, "convert", self.top, "--no-progress", "--to", "raw:./9:odd.img",
               cwd=self.dir))
        self.assertEqual(run("cmp", self.raw, self.p("9:odd.img")).returncode, 0)

    def test_options_that_apply_to_no_output_are_refused(self):
        for args, name in (
                (["-O", "raw", "--cluster-size", "4K", "-o", "x"], "--cluster-size"),
                (["-O", "qcow2", "--block-size", "1M", "-o", "x"], "--block-size"),
                (["-O", "vhdx", "-o", "x", "-O", "raw", "-o", "y", "--cluster-size", "64K"],
                 "--cluster-size"),
                (["-O", "qcow2", "--streams", "2", "-o", "x"], "--streams"),
                (["-O", "qcow2", "--identity", "/dev/null", "-o", "x"], "--identity"),
                (["-O", "qcow2", "--retries", "3", "-o", "x"], "--retries"),
                (["-O", "qcow2", "--no-verify-checksum", "-o", "x"], "--no-verify-checksum"),
                (["-O", "qcow2", "--discard", "-o", "x"], "--discard"),
                (["--to", "qcow2,container=tar:x", "--container-file", "vm.ovf"],
                 "--container-file")):
            with self.subTest(args=args):
                p = run(DF, "convert", self.top, "--no-progress", *args, cwd=self.dir)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn(name + " applies to", p.stderr)
                for left in ("x", "x.partial", "y"):
                    self.assertFalse(os.path.exists(self.p(left)), left)
        p = run(DF, "measure", self.top, "-O", "raw", "--cluster-size", "4K")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("--cluster-size applies to", p.stderr)
        # Given where one output uses it: fine, as is the default value given explicitly for
        # a --to output that takes it.
        ok(run(DF, "convert", self.top, "--no-progress", "--block-size", "1M", "-O", "qcow2",
               "-o", self.p("ap.qcow2"), "--to", "vhdx:" + self.p("ap.vhdx")))
        self.assertEqual(sha(self.p("ap.vhdx")),
                         sha(self.single("ap.vhdx", "-O", "vhdx", "--block-size", "1M")))

    def test_an_output_that_cannot_be_opened_fails_alone(self):
        missing = self.p("no-such-dir/x.qcow2")
        p = run(DF, "convert", self.top, "--no-progress", "-O", "qcow2", "-o", missing,
                "-O", "vhdx", "-o", self.p("opened.vhdx"))
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn(f"diskferry: {missing}.partial: cannot create destination: No such file",
                      p.stderr)
        self.assertIn("1 of 2 outputs failed", p.stderr)
        self.assert_same_disk(self.p("opened.vhdx"), "vhdx")

    def test_a_destination_the_command_gets_wrong_stops_every_output(self):
        for bad, words in ((self.base, "a backing file of the source"),
                           (self.dir, "destination is a directory")):
            with self.subTest(bad=bad):
                p = run(DF, "convert", self.top, "--no-progress", "-O", "vhdx", "-o",
                        self.p("never.vhdx"), "-O", "qcow2", "-o", bad)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertIn(words, p.stderr)
                for left in ("never.vhdx", "never.vhdx.partial"):
                    self.assertFalse(os.path.exists(self.p(left)), left)

    def test_asis_of_an_image_with_a_backing_file_warns(self):
        p = ok(run(DF, "convert", self.top, "--no-progress", "-O", "asis", "-o",
                   self.p("asis.qcow2")))
        warnings = [l for l in p.stderr.splitlines() if "warning" in l]
        self.assertEqual(len(warnings), 1, p.stderr)
        self.assertIn(f"{self.top}: has a backing file (base.qcow2)", warnings[0])
        self.assertIn("not standalone", warnings[0])
        self.assertIn("-O qcow2", warnings[0])
        self.assertEqual(sha(self.p("asis.qcow2")), sha(self.top))
        p = ok(run(DF, "convert", self.base, "--no-progress", "-O", "asis", "-o",
                   self.p("asis-base.qcow2")))
        self.assertNotIn("warning", p.stderr)

    def test_ova_reads_back_with_tar(self):
        ova = self.p("vm.ova")
        ok(run(DF, "convert", self.top, "--no-progress", "-O", "qcow2", "--container", "tar",
               "--container-file", self.p("vm.ovf"), "-o", ova))
        t = ok(run("tar", "-tvf", ova)).stdout.splitlines()
        self.assertEqual([l.split()[-1] for l in t], ["vm.ovf", "vm.qcow2"], t)
        with open(self.p("x.qcow2"), "wb") as f:
            ok(run("tar", "-xOf", ova, "vm.qcow2", stdout=f))
        self.assert_same_disk(self.p("x.qcow2"), "qcow2")
        self.assertEqual(run("qemu-img", "check", self.p("x.qcow2")).returncode, 0)
        # The image inside is the image diskferry writes without a container.
        self.assertEqual(sha(self.p("x.qcow2")), sha(self.single("plain.qcow2", "-O", "qcow2")))
        m = ok(run(DF, "measure", self.top, "-O", "qcow2", "--container", "tar",
                   "--container-file", self.p("vm.ovf"), "--json")).stdout
        self.assertIn(f'"size":{os.path.getsize(ova)}', m)
        # Deterministic: stdout gives the same bytes (named as the file's default name would
        # be); the times are the files', not the clock's.
        with open(self.p("vm2.ova"), "wb") as f:
            ok(run(DF, "convert", self.top, "--no-progress", "-O", "qcow2", "--container", "tar",
                   "--container-file", self.p("vm.ovf"), "--container-name", "vm.qcow2", "-o",
                   "-", stdout=f))
        self.assertEqual(sha(ova), sha(self.p("vm2.ova")))
        with tarfile.open(ova) as tf:
            ovf, img = tf.getmembers()
            self.assertEqual(ovf.size, os.path.getsize(self.p("vm.ovf")))
            self.assertEqual(int(ovf.mtime), int(os.stat(self.p("vm.ovf")).st_mtime))
            self.assertEqual(int(img.mtime), int(os.stat(self.top).st_mtime))

    def test_containers_with_compression_and_other_formats(self):
        ok(run(DF, "convert", self.top, "--no-progress",
               "--to", "vhdx,container=tar,container-name=disk1.vhdx,compress=zstd:"
               + self.p("v.tar.zst"),
               "--to", "raw,container=tar:" + self.p("r.tar")))
        with open(self.p("v.tar"), "wb") as f:
            ok(run("zstd", "-dc", self.p("v.tar.zst"), stdout=f))
        with open(self.p("disk1.vhdx"), "wb") as f:
            ok(run("tar", "-xOf", self.p("v.tar"), "disk1.vhdx", stdout=f))
        self.assert_same_disk(self.p("disk1.vhdx"), "vhdx")
        self.assertEqual(ok(run("tar", "-tf", self.p("r.tar"))).stdout, "r.img\n")
        with open(self.p("r.img"), "wb") as f:
            ok(run("tar", "-xOf", self.p("r.tar"), stdout=f))
        self.assertEqual(run("cmp", self.raw, self.p("r.img")).returncode, 0)
        # A pipe cannot give the size first.
        with open(self.raw, "rb") as f:
            p = run(DF, "convert", "-", "--no-progress", "-O", "raw", "--container", "tar",
                    "-o", self.p("stdin.tar"), stdin=f)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("tar header holds the image's size", p.stderr)
        self.assertFalse(os.path.exists(self.p("stdin.tar")))
        self.assertFalse(os.path.exists(self.p("stdin.tar.partial")))

    def test_no_sync_skips_the_fsync_and_nothing_else(self):
        if not shutil.which("strace"):
            self.skipTest("strace is not installed (scripts/setup.sh installs it)")
        # LeakSanitizer cannot run under ptrace (the ASan build): leaks are checked elsewhere.
        env = dict(os.environ)
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":detect_leaks=0"
        for extra, syncs in (([], True), (["--no-sync"], False)):
            out = self.p("ns.qcow2")
            p = ok(run("strace", "-f", "-e", "trace=fsync,fdatasync,rename", "-o",
                       self.p("strace.log"), DF, "convert", self.top, "--no-progress", "-O",
                       "qcow2", *extra, "-o", out, env=env))
            with open(self.p("strace.log")) as f:
                log = f.read()
            self.assertEqual("fsync(" in log, syncs, log)
            self.assertIn("rename(", log)  # still published atomically
            self.assert_same_disk(out, "qcow2")
            os.unlink(out)

    def test_members_past_8_gib_get_pax_sizes(self):
        big = self.p("big.img")
        with open(big, "wb") as f:
            f.truncate(9 * 1024 * MiB - 5)
            f.seek(9 * 1024 * MiB - 5 - 5)
            f.write(b"hello")
        out = self.p("big.tar")
        ok(run(DF, "convert", big, "--no-progress", "-O", "raw", "--container", "tar", "-o", out))
        line = ok(run("tar", "-tvf", out)).stdout.split()
        self.assertEqual(int(line[2]), 9 * 1024 * MiB)  # rounded up to whole sectors
        with tarfile.open(out) as tf:
            (m,) = tf.getmembers()
            self.assertEqual(m.size, 9 * 1024 * MiB)
            with open(out, "rb") as f:
                f.seek(m.offset_data + 9 * 1024 * MiB - 512)
                tail = f.read(512)
            self.assertEqual(tail[-10:-5], b"hello")
        os.unlink(big)
        os.unlink(out)


@unittest.skipIf(OpenSSHServer.unavailable_reason(), OpenSSHServer.unavailable_reason() or "")
class OutputsOverSftp(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="df-outputs-sftp-", dir="/var/tmp")
        cls.src = os.path.join(cls.dir, "src.img")
        r = random.Random(9)
        with open(cls.src, "wb") as f:
            f.truncate(48 * MiB)
            for i in range(0, 48, 6):
                f.seek(i * MiB)
                f.write(r.randbytes(2 * MiB))
        cls.server = OpenSSHServer()
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_a_cut_upload_is_resumed_alone_while_the_file_output_completes(self):
        with TcpProxy(("127.0.0.1", self.server.port), cut_up=6 * MiB, cut_first=1) as px:
            kh = self.server.write_known_hosts(os.path.join(self.dir, "kh"), port=px.port)
            url = f"sftp://{self.server.user}@127.0.0.1:{px.port}/backups/o/vm.ova"
            local = os.path.join(self.dir, "vm.vhdx")
            p = run(DF, "convert", self.src, "--no-progress", "--identity",
                    self.server.client_key, "--known-hosts", kh, "--retry-delay", "0.2",
                    "--to", "qcow2,container=tar:" + url, "-O", "vhdx", "-o", local)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("retrying in", p.stderr)
            self.assertTrue(any(c.cut for c in px.connections), "the proxy cut nothing")
        remote = os.path.join(self.server.backups, "o", "vm.ova")
        c = run("sha256sum", "-c", "vm.ova.sha256", cwd=os.path.dirname(remote))
        self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        img = os.path.join(self.dir, "vm.qcow2")
        with open(img, "wb") as f:
            ok(run("tar", "-xOf", remote, "vm.qcow2", stdout=f))
        for path, fmt in ((img, "qcow2"), (local, "vhdx")):
            c = run("qemu-img", "compare", "-f", "raw", "-F", fmt, self.src, path)
            self.assertEqual(c.returncode, 0, c.stdout + c.stderr)
        self.assertEqual(sorted(os.listdir(os.path.dirname(remote))), ["vm.ova", "vm.ova.sha256"])

    def test_to_with_a_level_uploads_to_sftp(self):
        kh = self.server.write_known_hosts(os.path.join(self.dir, "kh-direct"))
        url = self.server.url("/backups/lv/lv.qcow2.zst")
        p = run(DF, "convert", self.src, "--no-progress", "--identity", self.server.client_key,
                "--known-hosts", os.path.join(self.dir, "kh-direct"),
                "--to", "qcow2,compress=zstd:3:" + url, cwd=self.dir)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(os.listdir(self.dir).count("3:sftp:"), 0)
        local = os.path.join(self.dir, "lv.qcow2.zst")
        ok(run(DF, "convert", self.src, "--no-progress", "-O", "qcow2", "--compress", "zstd:3",
               "-o", local))
        self.assertEqual(sha(os.path.join(self.server.backups, "lv", "lv.qcow2.zst")), sha(local))


if __name__ == "__main__":
    DF = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
