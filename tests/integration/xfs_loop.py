#!/usr/bin/env python3
"""Loop-mounted scratch filesystems for integration tests (Python 3.11 stdlib only): a real XFS
made with reflink, and an ext4, which cannot reflink, for the error paths.

    import xfs_loop
    with xfs_loop.XfsLoop(size_mib=512) as fs:    # mkfs.xfs -m reflink=1
        path = os.path.join(fs.mountpoint, "vm.img")
        fs.used_bytes()                            # what df counts as used
    with xfs_loop.Ext4Loop(size_mib=64) as fs:
        ...

Each filesystem is a sparse backing file on a loop device of its own, mounted (nosuid, nodev)
at BASE_DIR/KIND-XXXXXX/mnt.  BASE_DIR is /srv/diskferry-loopfs (root-owned, 0700), or
$DISKFERRY_TEST_LOOPFS_DIR: not under /tmp, where tmp cleaners may delete a mounted
filesystem's backing file and other users may reach into it.  It is not sftp_servers.py's
directory either, whose stale-directory sweep would unmount these.

Leaving the `with` block (or close()) unmounts (lazily if busy), detaches the loop device and
removes the directory, also when the test failed.  An atexit hook closes what a test forgot, and
every open() first sweeps what killed test runs left behind: mounts, loop devices and
directories whose owner process is gone.

Needs root, losetup/mount/umount (util-linux), mkfs.xfs (xfsprogs) or mkfs.ext4 (e2fsprogs).
unavailable_reason(kind) says why a kind cannot be made here, for unittest.skipIf.
Self-check (makes, checks and removes one of each): python3 xfs_loop.py
"""
import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

BASE_DIR = os.environ.get("DISKFERRY_TEST_LOOPFS_DIR") or "/srv/diskferry-loopfs"
MiB = 1024 * 1024

# kind -> (mkfs command without the device, smallest size in MiB it accepts)
_MKFS = {
    # xfsprogs 5.19+ refuses filesystems under 300 MiB.
    "xfs": (["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-L", "dftest"], 300),
    "ext4": (["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "dftest"], 4),
}
_PACKAGE = {"mkfs.xfs": "xfsprogs", "mkfs.ext4": "e2fsprogs", "losetup": "util-linux",
            "mount": "mount", "umount": "mount"}


class LoopFsUnavailable(RuntimeError):
    pass


def _which(tool):
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _run(cmd, check=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def unavailable_reason(kind="xfs"):
    """Why a `kind` filesystem cannot be loop-mounted here, or None."""
    if kind not in _MKFS:
        return f"unknown filesystem kind {kind!r}"
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    for tool in ("losetup", "mount", "umount", _MKFS[kind][0][0]):
        if not _which(tool):
            return f"{tool} missing (apt-get install {_PACKAGE[tool]})"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (is the loop module loaded?)"
    return None


def _mounts_under(path):
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mounts") as f:
        for ln in f:
            mp = ln.split()[1].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def _umount(mp):
    for _ in range(3):
        if _run(["umount", mp], check=False).returncode == 0:
            return
        time.sleep(0.3)
    _run(["umount", "-l", mp], check=False)  # a straggler has it open: detach, free on close


def _loop_devices_under(path):
    """Loop devices whose backing file is at or under `path`."""
    p = _run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    path = os.path.realpath(path)
    devs = []
    for d in json.loads(p.stdout).get("loopdevices", []):
        back = (d.get("back-file") or "").removesuffix(" (deleted)")
        if back == path or back.startswith(path + "/"):
            devs.append(d["name"])
    return devs


def _release(d):
    """Unmount and detach everything under directory `d`, then remove it if that worked."""
    for mp in _mounts_under(d):
        _umount(mp)
    for dev in _loop_devices_under(d):
        _run(["losetup", "-d", dev], check=False)
    if not _mounts_under(d):
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _sweep_stale():
    try:
        names = os.listdir(BASE_DIR)
    except OSError:
        return
    for n in names:
        d = os.path.join(BASE_DIR, n)
        try:
            with open(os.path.join(d, "owner")) as f:
                if _alive(int(f.read().split()[0])):
                    continue
        except (OSError, ValueError, IndexError):
            # no owner file yet: being created right now, unless it is old
            try:
                if time.time() - os.stat(d).st_mtime < 3600:
                    continue
            except OSError:
                continue
        _release(d)


def _base_dir():
    os.makedirs(BASE_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(BASE_DIR)
    if st.st_uid != 0 or not os.path.isdir(BASE_DIR) or os.path.islink(BASE_DIR):
        raise LoopFsUnavailable(f"{BASE_DIR}: must be a directory owned by root")
    os.chmod(BASE_DIR, 0o700)
    return BASE_DIR


_LIVE = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_leftovers():
    with _LIVE_LOCK:
        live = list(_LIVE)
    for fs in live:
        try:
            fs.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class LoopFs:
    """A filesystem of `kind` on a loop device; see the module docstring."""
    kind = None
    default_size_mib = None

    def __init__(self, size_mib=None, mkfs_args=()):
        self.size_mib = int(size_mib or self.default_size_mib)
        minimum = _MKFS[self.kind][1]
        if self.size_mib < minimum:
            raise ValueError(f"{self.kind} needs at least {minimum} MiB")
        self.mkfs_args = list(mkfs_args)
        self.dir = self.image = self.mountpoint = self.device = None

    def open(self):
        reason = unavailable_reason(self.kind)
        if reason:
            raise LoopFsUnavailable(f"{self.kind} loop filesystem: {reason}")
        _sweep_stale()
        self.dir = tempfile.mkdtemp(prefix=f"{self.kind}-", dir=_base_dir())
        with open(os.path.join(self.dir, "owner"), "w") as f:
            f.write(f"{os.getpid()}\n")
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self.image = os.path.join(self.dir, "backing.img")
            with open(self.image, "wb") as f:
                f.truncate(self.size_mib * MiB)
            self.mountpoint = os.path.join(self.dir, "mnt")
            os.mkdir(self.mountpoint, 0o755)
            self.device = _run(["losetup", "--find", "--show", self.image]).stdout.strip()
            _run(_MKFS[self.kind][0] + self.mkfs_args + [self.device])
            _run(["mount", "-t", self.kind, "-o", "nosuid,nodev", self.device, self.mountpoint])
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self.dir:
            _release(self.dir)
            self.dir = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def _statvfs(self):
        os.sync()  # delayed allocation would hide blocks a test just wrote
        return os.statvfs(self.mountpoint)

    def used_bytes(self):
        st = self._statvfs()
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def free_bytes(self):
        st = self._statvfs()
        return st.f_bavail * st.f_frsize


class XfsLoop(LoopFs):
    """XFS with reflink (mkfs.xfs -m reflink=1)."""
    kind = "xfs"
    default_size_mib = 512


class Ext4Loop(LoopFs):
    """ext4: no reflink, FICLONE fails with EOPNOTSUPP."""
    kind = "ext4"
    default_size_mib = 64


def _self_check():
    for cls in (XfsLoop, Ext4Loop):
        reason = unavailable_reason(cls.kind)
        if reason:
            print(f"{cls.kind}: unavailable: {reason}")
            continue
        with cls() as fs:
            src = os.path.join(fs.mountpoint, "a")
            with open(src, "wb") as f:
                f.write(os.urandom(MiB))
            cp = _run(["cp", "--reflink=always", src, src + ".clone"], check=False)
            print(f"{cls.kind}: {fs.device} on {fs.mountpoint}, {fs.free_bytes() // MiB} MiB "
                  f"free, reflink {'works' if cp.returncode == 0 else 'fails'}")
            mountpoint, image = fs.mountpoint, fs.image
        assert not _mounts_under(mountpoint), "still mounted"
        assert not _loop_devices_under(image), "loop device still attached"
        assert not os.path.exists(mountpoint), "directory left behind"
    print("ok")


if __name__ == "__main__":
    _self_check()
