#!/usr/bin/env python3
"""A small SFTP v3 server on stdin/stdout that misbehaves on purpose (Python 3 stdlib only).

Run by OpenSSH sshd as the sftp subsystem (`Subsystem sftp /usr/bin/python3 hostile_sftp.py
CONFIG.json`, see HostileServer in test_sftp_hostile.py).  Every session reads CONFIG.json when
it starts, so a test switches modes between uploads without restarting sshd:

    {"root": DIR,             SFTP "/" is this directory (paths never leave it)
     "state": DIR,            writable: stats per session, markers, errors-GEN-PID.log
     "mode": "normal",        see below
     "extensions": null,      names announced in VERSION (null: the default set below)
     "after_bytes": 262144,   WRITE payload bytes a session takes before a mode misbehaves
     "once": true,            misbehave in the first session that gets there only (a marker
                              file in `state`); false: in every session
     "seed": 1,
     "generation": 0}         names the files in `state` (so a test ignores late writes of
                              sessions from before its set_mode)

Modes (each misbehaves on the WRITE that takes the session past `after_bytes`):
  normal              a correct minimal server (OPEN/CLOSE/READ/WRITE/[L|F]STAT/[F]SETSTAT/
                      OPENDIR/READDIR/REMOVE/MKDIR/RMDIR/REALPATH/RENAME, EXTENDED
                      posix-rename, fsync, statvfs, limits @openssh.com as announced)
  no-extensions       normal, but VERSION carries no extension at all
  close-mid-transfer  exits without answering that WRITE (sshd closes the channel)
  oversized-reply     answers with a packet whose length field says 100 MiB, then is mute
  unknown-id          answers that WRITE with a STATUS for an id never sent (the highest id
                      seen + 1000, or "bogus_id"); "on": "close" (an op name): the first
                      request of that kind instead
  out-of-order        legal: holds WRITE replies back and sends them reversed or shuffled,
                      answering other requests first
  garbage             sends random bytes instead of the reply (after_bytes 0: right after
                      VERSION), then is mute
  write-fails-once    that WRITE gets SSH_FX_FAILURE, every other one succeeds
  flip-written-byte   that WRITE's first byte is stored flipped, and answered OK (a server
                      disk or RAM that corrupts data silently: what verify after upload is for)
  slow-then-silent    answers slowly (20 ms a reply), then reads on but never answers again

stats-GENERATION-PID.json: {"mode", "max_write", "write_bytes", "writes", "ops": {name: count},
"extended": {name: count}, "misbehaved": what it did or null, "reordered": batches of WRITE
replies sent out of order}.
"""
import errno
import json
import os
import posixpath
import random
import select
import stat
import struct
import sys
import time
import traceback

# packet types
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = range(1, 11)
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME = range(11, 19)
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201
OP_NAMES = {OPEN: "open", CLOSE: "close", READ: "read", WRITE: "write", LSTAT: "lstat",
            FSTAT: "fstat", SETSTAT: "setstat", FSETSTAT: "fsetstat", OPENDIR: "opendir",
            READDIR: "readdir", REMOVE: "remove", MKDIR: "mkdir", RMDIR: "rmdir",
            REALPATH: "realpath", STAT: "stat", RENAME: "rename", EXTENDED: "extended"}
# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
# attribute flags
A_SIZE, A_UIDGID, A_PERM, A_TIME, A_EXT = 1, 2, 4, 8, 0x80000000

DEFAULT_EXTENSIONS = ["posix-rename@openssh.com", "statvfs@openssh.com", "fsync@openssh.com",
                      "limits@openssh.com"]
EXT_VERSION = {"posix-rename@openssh.com": "1", "statvfs@openssh.com": "2",
               "fsync@openssh.com": "1", "limits@openssh.com": "1"}
MAX_PACKET = 262144 + 1024      # what we accept; OpenSSH's limit, like limits@openssh.com says
MAX_WRITE = 261120


class Bad(Exception):
    """Malformed request: the session ends (like OpenSSH does)."""


class Reader:
    """Fields of one request body."""

    def __init__(self, b):
        self.b, self.o = b, 0

    def take(self, n):
        if self.o + n > len(self.b):
            raise Bad("truncated request")
        v = self.b[self.o:self.o + n]
        self.o += n
        return v

    def u8(self):
        return self.take(1)[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def string(self):
        return self.take(self.u32())

    def text(self):
        return self.string().decode("utf-8", "surrogateescape")

    def attrs(self):
        a, flags = {}, self.u32()
        if flags & A_SIZE:
            a["size"] = self.u64()
        if flags & A_UIDGID:
            a["uid"], a["gid"] = self.u32(), self.u32()
        if flags & A_PERM:
            a["perm"] = self.u32()
        if flags & A_TIME:
            a["atime"], a["mtime"] = self.u32(), self.u32()
        if flags & A_EXT:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return a


def p_u32(v):
    return struct.pack(">I", v)


def p_u64(v):
    return struct.pack(">Q", v)


def p_str(b):
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogateescape")
    return p_u32(len(b)) + b


def p_attrs(st):
    return (p_u32(A_SIZE | A_UIDGID | A_PERM | A_TIME) + p_u64(st.st_size) + p_u32(st.st_uid)
            + p_u32(st.st_gid) + p_u32(st.st_mode) + p_u32(int(st.st_atime) & 0xffffffff)
            + p_u32(int(st.st_mtime) & 0xffffffff))


def packet(ptype, payload):
    body = bytes([ptype]) + payload
    return p_u32(len(body)) + body


def status(rid, code, msg=""):
    return packet(STATUS, p_u32(rid) + p_u32(code) + p_str(msg or "") + p_str("en"))


def errno_status(rid, e):
    code = {errno.ENOENT: NO_SUCH_FILE, errno.ENOTDIR: NO_SUCH_FILE, errno.EACCES:
            PERMISSION_DENIED, errno.EPERM: PERMISSION_DENIED}.get(e.errno, FAILURE)
    return status(rid, code, e.strerror or "failure")


class Session:
    def __init__(self, config):
        self.cfg = config
        self.root = os.path.realpath(config["root"])
        self.state = config["state"]
        self.mode = config.get("mode", "normal")
        self.gen = int(config.get("generation", 0))
        exts = config.get("extensions")
        if exts is None:
            exts = [] if self.mode == "no-extensions" else DEFAULT_EXTENSIONS
        self.extensions = list(exts)
        self.after = int(config.get("after_bytes", 256 * 1024))
        self.rng = random.Random(int(config.get("seed", 1)) * 1000003 + os.getpid())
        self.handles, self.next_handle = {}, 0
        self.inbuf = bytearray()
        self.max_id = 0
        self.mute = False                 # reads on, answers nothing
        self.held = []                    # out-of-order: WRITE replies held back
        self.batches = 0
        self.stats = {"mode": self.mode, "pid": os.getpid(), "max_write": 0, "write_bytes": 0,
                      "writes": 0, "ops": {}, "extended": {}, "misbehaved": None}

    # -- I/O ----------------------------------------------------------------------------------
    def send(self, data):
        view = memoryview(data)
        while view:
            n = os.write(1, view)
            view = view[n:]

    def next_request(self, timeout=None):
        """A request body, None on timeout, b"" at end of input."""
        while True:
            if len(self.inbuf) >= 4:
                n = struct.unpack_from(">I", self.inbuf)[0]
                if n == 0 or n > MAX_PACKET:
                    raise Bad(f"request length {n}")
                if len(self.inbuf) >= 4 + n:
                    body = bytes(self.inbuf[4:4 + n])
                    del self.inbuf[:4 + n]
                    return body
            if timeout is not None and not select.select([0], [], [], timeout)[0]:
                return None
            chunk = os.read(0, 1 << 20)
            if not chunk:
                return b""
            self.inbuf += chunk

    def save_stats(self):
        path = os.path.join(self.state, f"stats-{self.gen}-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.stats, f)
        os.replace(path + ".tmp", path)

    def claim(self):
        """Whether this session may misbehave now: with "once" (the default) only the first
        session to ask, over all sessions until the test resets `state`."""
        if not self.cfg.get("once", True):
            return True
        try:
            os.close(os.open(os.path.join(self.state, f"misbehaved-{self.gen}"),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            return False

    def bogus_id(self):
        b = self.cfg.get("bogus_id")
        return self.max_id + 1000 if b is None else b

    def misbehave(self, what):
        self.stats["misbehaved"] = what
        self.save_stats()

    # -- paths and handles --------------------------------------------------------------------
    def local(self, p):
        p = posixpath.normpath("/" + p)          # "." and "" are "/", ".." stops at the root
        if p.startswith("//"):
            p = "/" + p.lstrip("/")
        return self.root if p == "/" else self.root + p

    def new_handle(self, obj):
        self.next_handle += 1
        h = f"h{self.next_handle}".encode()
        self.handles[h] = obj
        return h

    # -- main loop ----------------------------------------------------------------------------
    def run(self):
        body = self.next_request()
        if not body:
            return
        if body[0] != INIT:
            raise Bad("first packet is not INIT")
        payload = p_u32(3)
        for name in self.extensions:
            payload += p_str(name) + p_str(EXT_VERSION.get(name, "1"))
        self.send(packet(VERSION, payload))
        if self.mode == "garbage" and self.after == 0 and self.claim():
            self.send_garbage()
        while True:
            timeout = 0.02 if self.held else None
            body = self.next_request(timeout)
            if body is None:                      # idle: release what out-of-order held back
                self.release_held()
                continue
            if not body:
                self.release_held()
                return
            if self.mute:
                continue
            reply = self.handle(body)
            if reply is not None:
                self.send(reply)
            if self.held and (len(self.held) >= 16 or body[0] != WRITE):
                self.release_held()
            if self.mode == "slow-then-silent" and reply is not None:
                time.sleep(0.02)

    def release_held(self):
        if not self.held:
            return
        held, self.held = self.held, []
        self.batches += 1
        if len(held) > 1:
            self.stats["reordered"] = self.stats.get("reordered", 0) + 1
            self.save_stats()
        if self.batches % 2:
            held.reverse()
        else:
            self.rng.shuffle(held)
        self.send(b"".join(held))

    def send_garbage(self):
        self.misbehave("garbage")
        self.send(random.Random(int(self.cfg.get("seed", 1))).randbytes(4096))
        self.mute = True

    def handle(self, body):
        r = Reader(body)
        ptype = r.u8()
        rid = r.u32()
        self.max_id = max(self.max_id, rid)
        name = OP_NAMES.get(ptype, f"type{ptype}")
        self.stats["ops"][name] = self.stats["ops"].get(name, 0) + 1
        if ptype == WRITE:
            return self.write(r, rid)
        if self.mode == "unknown-id" and name == self.cfg.get("on", "write") and self.claim():
            bogus = self.bogus_id()
            self.misbehave(f"answered {name.upper()} {rid} as id {bogus}")
            return status(bogus, OK)
        try:
            reply = self.dispatch(ptype, rid, r)
        except OSError as e:
            reply = errno_status(rid, e)
        if ptype != WRITE:
            self.save_stats()
        return reply

    def write(self, r, rid):
        h, off, data = r.string(), r.u64(), r.string()
        before = self.stats["write_bytes"]
        self.stats["writes"] += 1
        self.stats["write_bytes"] += len(data)
        self.stats["max_write"] = max(self.stats["max_write"], len(data))
        trigger = before < self.after <= self.stats["write_bytes"] or (
            self.after == 0 and before == 0)
        m = self.mode
        if m == "unknown-id" and self.cfg.get("on", "write") != "write":
            trigger = False
        if trigger and m not in ("normal", "no-extensions", "out-of-order"):
            trigger = self.claim()
        if trigger and m == "close-mid-transfer":
            self.misbehave("exited without answering a WRITE")
            sys.stdout.flush()
            os._exit(0)
        if trigger and m == "oversized-reply":
            self.misbehave("sent a 100 MiB length field")
            self.send(p_u32(100 << 20) + bytes([STATUS]) + p_u32(rid) + p_u32(OK))
            self.mute = True
            return None
        if trigger and m == "unknown-id":
            bogus = self.bogus_id()
            self.misbehave(f"answered WRITE {rid} as id {bogus}")
            return status(bogus, OK)
        if trigger and m == "garbage":
            self.send_garbage()
            return None
        if trigger and m == "slow-then-silent":
            self.misbehave("went silent")
            self.mute = True
            return None
        if trigger and m == "flip-written-byte" and data:
            self.misbehave(f"stored WRITE {rid} at offset {off} with its first byte flipped")
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if trigger and m == "write-fails-once":
            self.misbehave(f"failed WRITE {rid} at offset {off}")
            return status(rid, FAILURE, "injected failure")
        obj = self.handles.get(h)
        if not isinstance(obj, int):
            reply = status(rid, FAILURE, "bad handle")
        else:
            try:
                view = memoryview(data)
                while view:
                    n = os.pwrite(obj, view, off)
                    view, off = view[n:], off + n
                reply = status(rid, OK, "Success")
            except OSError as e:
                reply = errno_status(rid, e)
        self.save_stats()
        if m == "out-of-order":
            self.held.append(reply)
            return None
        return reply

    def dispatch(self, ptype, rid, r):
        if ptype == OPEN:
            path, pflags, attrs = self.local(r.text()), r.u32(), r.attrs()
            acc = pflags & 3
            flags = {1: os.O_RDONLY, 2: os.O_WRONLY, 3: os.O_RDWR}.get(acc)
            if flags is None:
                return status(rid, BAD_MESSAGE, "neither read nor write")
            flags |= (os.O_APPEND if pflags & 4 else 0) | (os.O_CREAT if pflags & 8 else 0)
            flags |= (os.O_TRUNC if pflags & 0x10 else 0) | (os.O_EXCL if pflags & 0x20 else 0)
            fd = os.open(path, flags, attrs.get("perm", 0o644) & 0o7777)
            return packet(HANDLE, p_u32(rid) + p_str(self.new_handle(fd)))
        if ptype in (CLOSE, FSTAT, FSETSTAT, READ, READDIR):
            h = r.string()
            obj = self.handles.get(h)
            if obj is None:
                return status(rid, FAILURE, "bad handle")
            if ptype == CLOSE:
                del self.handles[h]
                if isinstance(obj, int):
                    os.close(obj)
                return status(rid, OK, "Success")
            if ptype == READDIR:
                if isinstance(obj, int):
                    return status(rid, FAILURE, "not a directory handle")
                if not obj["names"]:
                    return status(rid, EOF, "End of file")
                chunk, obj["names"] = obj["names"][:100], obj["names"][100:]
                out = p_u32(len(chunk))
                for n in chunk:
                    st = os.lstat(os.path.join(obj["path"], n))
                    out += p_str(n) + p_str(n) + p_attrs(st)
                return packet(NAME, p_u32(rid) + out)
            if not isinstance(obj, int):
                return status(rid, FAILURE, "not a file handle")
            if ptype == FSTAT:
                return packet(ATTRS, p_u32(rid) + p_attrs(os.fstat(obj)))
            if ptype == FSETSTAT:
                self.setattrs(r.attrs(), fd=obj)
                return status(rid, OK, "Success")
            off, n = r.u64(), r.u32()
            data = os.pread(obj, min(n, MAX_WRITE), off)
            if not data:
                return status(rid, EOF, "End of file")
            return packet(DATA, p_u32(rid) + p_str(data))
        if ptype in (STAT, LSTAT):
            st = (os.stat if ptype == STAT else os.lstat)(self.local(r.text()))
            return packet(ATTRS, p_u32(rid) + p_attrs(st))
        if ptype == SETSTAT:
            path = self.local(r.text())
            self.setattrs(r.attrs(), path=path)
            return status(rid, OK, "Success")
        if ptype == OPENDIR:
            path = self.local(r.text())
            names = [".", ".."] + sorted(os.listdir(path))
            return packet(HANDLE, p_u32(rid) + p_str(self.new_handle(
                {"path": path, "names": names})))
        if ptype == REMOVE:
            os.unlink(self.local(r.text()))
            return status(rid, OK, "Success")
        if ptype == MKDIR:
            path, attrs = self.local(r.text()), r.attrs()
            os.mkdir(path, attrs.get("perm", 0o755) & 0o7777)
            return status(rid, OK, "Success")
        if ptype == RMDIR:
            os.rmdir(self.local(r.text()))
            return status(rid, OK, "Success")
        if ptype == REALPATH:
            p = posixpath.normpath("/" + r.text())
            return packet(NAME, p_u32(rid) + p_u32(1) + p_str(p) + p_str(p) + p_u32(0))
        if ptype == RENAME:
            old, new = self.local(r.text()), self.local(r.text())
            os.link(old, new)                    # like OpenSSH: never replaces `new`
            os.unlink(old)
            return status(rid, OK, "Success")
        if ptype == EXTENDED:
            return self.extended(rid, r)
        return status(rid, OP_UNSUPPORTED, f"unsupported request {ptype}")

    def extended(self, rid, r):
        name = r.text()
        self.stats["extended"][name] = self.stats["extended"].get(name, 0) + 1
        if name not in self.extensions:
            return status(rid, OP_UNSUPPORTED, f"{name} not offered")
        if name == "posix-rename@openssh.com":
            os.rename(self.local(r.text()), self.local(r.text()))
            return status(rid, OK, "Success")
        if name == "fsync@openssh.com":
            obj = self.handles.get(r.string())
            if not isinstance(obj, int):
                return status(rid, FAILURE, "bad handle")
            os.fsync(obj)
            return status(rid, OK, "Success")
        if name == "statvfs@openssh.com":
            s = os.statvfs(self.local(r.text()))
            vals = (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                    s.f_ffree, s.f_favail, s.f_fsid, s.f_flag, s.f_namemax)
            return packet(EXTENDED_REPLY, p_u32(rid) + b"".join(p_u64(v) for v in vals))
        if name == "limits@openssh.com":
            return packet(EXTENDED_REPLY, p_u32(rid) + p_u64(262144) + p_u64(MAX_WRITE)
                          + p_u64(MAX_WRITE) + p_u64(64))
        return status(rid, OP_UNSUPPORTED, f"{name} not implemented")

    def setattrs(self, a, fd=None, path=None):
        target = fd if fd is not None else path
        if "size" in a:
            (os.ftruncate if fd is not None else os.truncate)(target, a["size"])
        if "perm" in a:
            os.chmod(target, stat.S_IMODE(a["perm"]))
        if "atime" in a:
            os.utime(target, (a["atime"], a["mtime"]))


def main():
    with open(sys.argv[1]) as f:
        config = json.load(f)
    s = Session(config)
    try:
        s.run()
    except BrokenPipeError:
        pass                              # the client went away: not our failure
    except Exception:  # noqa: BLE001 - logged for the test to show
        with open(os.path.join(config["state"], f"errors-{s.gen}-{os.getpid()}.log"),
                  "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        try:
            s.save_stats()
        except OSError:
            pass


if __name__ == "__main__":
    main()
