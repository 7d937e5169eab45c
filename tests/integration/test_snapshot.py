#!/usr/bin/env python3
"""Reflink snapshots on real filesystems: an XFS made with -m reflink=1 and an ext4, both
loop-mounted by xfs_loop.py.

Run: test_snapshot.py PATH/TO/unit_tests   (ctest passes the binary; needs root)

1. The unit tests of the "snapshot" suite with DISKFERRY_XFS_DIR / DISKFERRY_EXT4_DIR set, so
   their reflink cases run instead of reporting themselves skipped.
2. From outside, through the unit binary's snapshot driver (DISKFERRY_SNAPSHOT_IMAGE): a 200 MiB
   image's snapshot has the same bytes (cmp), shares every extent (filefrag -v) and takes no
   space (df); a second call reuses it (same inode, old bytes, although the image changed);
   ext4 fails with one line naming ext4 and the ways out, leaving nothing behind.
"""
import hashlib
import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xfs_loop  # noqa: E402

UNIT = None  # path of the unit_tests binary
MiB = 1024 * 1024
NO_REFLINK = ("cannot make reflink copies; use snapshot: none, or keep images on XFS "
              "(mkfs.xfs -m reflink=1) or btrfs")


def run(*args, env=None):
    return subprocess.run([str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)


def snapshot(image, tag="it", snapshot_dir=None):
    """take_snapshot() via the driver: {"PATH": ..., "REUSED": "0"|"1"} or {"ERROR": ...}."""
    env = dict(os.environ, DISKFERRY_SNAPSHOT_IMAGE=image, DISKFERRY_SNAPSHOT_TAG=tag)
    if snapshot_dir:
        env["DISKFERRY_SNAPSHOT_DIR"] = snapshot_dir
    p = run(UNIT, "--test-case=snapshot driver*", env=env)
    if p.returncode != 0:
        raise AssertionError(f"driver exited {p.returncode}:\n{p.stdout}")
    out = {}
    for ln in p.stdout.splitlines():
        m = re.match(r"SNAPSHOT_(PATH|REUSED|ERROR)=(.*)", ln)
        if m:
            out[m.group(1)] = m.group(2)
    if not out:
        raise AssertionError(f"driver said nothing:\n{p.stdout}")
    return out


def write_random(path, size, chunk=8 * MiB):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def extents(path):
    """filefrag -v: the flags of each extent."""
    p = run("filefrag", "-v", path)
    if p.returncode != 0:
        raise AssertionError(f"filefrag failed: {p.stdout}")
    return [ln.split()[-1] for ln in p.stdout.splitlines() if re.match(r"^\s*\d+:\s", ln)]


REASON = xfs_loop.unavailable_reason("xfs") or xfs_loop.unavailable_reason("ext4")


@unittest.skipIf(REASON is not None, REASON or "")
class SnapshotOnRealFilesystems(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.xfs = xfs_loop.XfsLoop(size_mib=512).open()
        cls.addClassCleanup(cls.xfs.close)
        cls.ext4 = xfs_loop.Ext4Loop(size_mib=64).open()
        cls.addClassCleanup(cls.ext4.close)

    def dir_on(self, fs, name):
        d = os.path.join(fs.mountpoint, name)
        os.mkdir(d)
        return d

    def test_unit_suite_with_real_filesystems(self):
        env = dict(os.environ, DISKFERRY_XFS_DIR=self.xfs.mountpoint,
                   DISKFERRY_EXT4_DIR=self.ext4.mountpoint)
        p = run(UNIT, "--test-suite=snapshot", env=env)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertNotIn("not set", p.stdout, "the reflink cases did not run")
        # they clean up after themselves
        for fs in (self.xfs, self.ext4):
            self.assertEqual([n for n in os.listdir(fs.mountpoint) if n.startswith("df-snap-")],
                             [])

    def test_200_mib_image(self):
        images = self.dir_on(self.xfs, "images")
        image = os.path.join(images, "vm.img")
        write_random(image, 200 * MiB)
        used_before = self.xfs.used_bytes()

        r = snapshot(image)
        self.assertNotIn("ERROR", r)
        snap_dir = os.path.join(images, ".diskferry-snapshots")
        snap = os.path.join(snap_dir, "vm.img.it.snap")
        self.assertEqual(r, {"PATH": snap, "REUSED": "0"})
        self.assertEqual(run("cmp", image, snap).returncode, 0, "snapshot differs from image")

        flags = extents(snap)
        self.assertTrue(flags, "no extents listed")
        self.assertTrue(all("shared" in f.split(",") for f in flags), flags)
        grown = self.xfs.used_bytes() - used_before
        self.assertLess(grown, 16 * MiB, f"the snapshot took {grown / MiB:.1f} MiB")

        self.assertEqual(os.listdir(snap_dir), ["vm.img.it.snap"])  # no temporary left
        self.assertEqual(os.stat(snap_dir).st_mode & 0o7777, 0o700)
        self.assertEqual(os.stat(snap).st_mode & 0o7777, 0o600)
        inode, digest = os.stat(snap).st_ino, sha256(snap)

        # The VM writes on; a retry (or a restarted daemon) must get the same snapshot back.
        with open(image, "r+b") as f:
            f.seek(100 * MiB)
            f.write(os.urandom(MiB))
        r2 = snapshot(image)
        self.assertEqual(r2, {"PATH": snap, "REUSED": "1"})
        self.assertEqual(os.stat(snap).st_ino, inode)
        self.assertEqual(sha256(snap), digest)
        self.assertEqual(run("cmp", "-s", image, snap).returncode, 1)

        # A new tag is a new point in time.
        r3 = snapshot(image, tag="it2")
        self.assertEqual(r3["REUSED"], "0")
        self.assertEqual(run("cmp", image, r3["PATH"]).returncode, 0)

        # Copy-on-write: only what the VM rewrote costs space, not the image again.
        self.assertLess(self.xfs.used_bytes() - used_before, 24 * MiB)

    def test_ext4_cannot_reflink(self):
        images = self.dir_on(self.ext4, "images")
        image = os.path.join(images, "vm.img")
        write_random(image, 4 * MiB)
        r = snapshot(image)
        self.assertEqual(r, {"ERROR": f"{image}: cannot snapshot: ext4 {NO_REFLINK}"})
        self.assertEqual(os.listdir(os.path.join(images, ".diskferry-snapshots")), [])

    def test_snapshot_dir_on_another_filesystem(self):
        images = self.dir_on(self.xfs, "cross")
        image = os.path.join(images, "vm.img")
        write_random(image, MiB)
        snaps = os.path.join(self.ext4.mountpoint, "snaps")
        r = snapshot(image, snapshot_dir=snaps)
        self.assertIn("ERROR", r)
        self.assertIn(f"cannot snapshot into {snaps}: it is on another filesystem (ext4) than the "
                      f"image (xfs)", r["ERROR"])
        self.assertEqual(os.listdir(snaps), [])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} PATH/TO/unit_tests [unittest args]")
    UNIT = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
