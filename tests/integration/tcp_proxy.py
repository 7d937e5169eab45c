#!/usr/bin/env python3
"""Userspace TCP proxy on 127.0.0.1 for fault injection (Python 3.11 stdlib only).

The kernel here offers neither netem nor veth, so tests put this proxy between the client and
a test server:  client -> 127.0.0.1:proxy.port -> target.

Per direction ("up" = client->server, "down" = server->client):
  * one-way delay: every chunk read is stamped with read_time + delay and queued; a separate
    writer thread sends it when due.  Reading never sleeps, so a delay adds latency without
    cutting throughput below what the sender's window allows (RTT = delay_up + delay_down).
  * bandwidth cap (bytes/s, token bucket): shared by all connections of the proxy, like a link.
  * cut after N bytes: exactly N bytes are forwarded, then the connection is reset (RST to both
    peers; cut_mode="close" sends FIN instead).  Only for the first K connections if cut_first=K.
  * stall after N bytes: the connection (both directions) forwards nothing for S seconds while
    its sockets stay open (S = inf: until the proxy closes).  stall_first=K likewise.
  * counters: bytes forwarded each way per connection (proxy.connections[i].bytes_up/down).

In-process:
    with TcpProxy(("127.0.0.1", srv.port), delay_ms=15, rate=1_000_000) as px:
        ... connect to 127.0.0.1:px.port ...
        px.connections[0].bytes_up
CLI (prints the chosen port on stdout, runs until SIGINT/SIGTERM, per-connection stats on
stderr as JSON lines at exit):
    python3 tcp_proxy.py --listen 0 --target 127.0.0.1:2222 --delay-ms 15 --rate 1000000 \
        --cut-up 100000 --cut-first 1
"""
import argparse
import collections
import itertools
import json
import math
import signal
import socket
import sys
import threading
import time

__all__ = ["TcpProxy", "ConnStats"]

_POLL = 0.5          # how often blocked threads look at the abort flag
_CHUNK = 64 * 1024
_EOF, _CUT, _STALL = object(), object(), object()


class _TokenBucket:
    """Reservation-style token bucket: acquire(n) returns after the n bytes 'fit' the rate."""

    def __init__(self, rate, burst=None):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(16384, rate / 50))
        self.tokens = self.burst
        self.t = time.monotonic()
        self.lock = threading.Lock()

    def reserve(self, n):
        """Take n tokens (may go negative); return how long the caller must wait."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            self.tokens -= n
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ConnStats:
    """Per-connection counters (read them any time; they only grow)."""

    def __init__(self, index, peer):
        self.index = index          # 0 for the first accepted connection
        self.peer = peer            # client address
        self.started = time.monotonic()
        self.ended = None
        self.bytes_up = 0           # forwarded client -> server
        self.bytes_down = 0         # forwarded server -> client
        self.read_up = 0            # read from the client (>= bytes_up: queued or dropped)
        self.read_down = 0
        self.cut = None             # "up"/"down"/"reset": why the proxy broke it
        self.stalled = False
        self.error = None           # first socket error seen, as text

    def as_dict(self):
        return {k: getattr(self, k) for k in (
            "index", "peer", "bytes_up", "bytes_down", "read_up", "read_down", "cut", "stalled",
            "error")} | {"seconds": round((self.ended or time.monotonic()) - self.started, 3)}

    def __repr__(self):
        return f"ConnStats({self.as_dict()})"


class _Pipe:
    """One direction of one connection: reader thread -> timed queue -> writer thread."""

    def __init__(self, conn, name, src, dst, bucket, cut_after, stall_after):
        self.conn, self.name, self.src, self.dst = conn, name, src, dst
        self.bucket = bucket
        self.cut_after, self.stall_after = cut_after, stall_after
        self.q = collections.deque()
        self.qbytes = 0
        self.cv = threading.Condition()
        self.buffer_limit = conn.proxy.buffer_limit(name)

    # -- reader ------------------------------------------------------------------------------
    def read_loop(self):
        c = self.conn
        got = 0
        try:
            if self.stall_after == 0:
                self.put(_STALL)
            if self.cut_after == 0:
                self.put(_CUT)
                return
            while not c.aborted:
                try:
                    data = self.src.recv(_CHUNK)
                except socket.timeout:
                    continue
                if not data:
                    self.put(_EOF)
                    return
                setattr(c.stats, "read_" + self.name, getattr(c.stats, "read_" + self.name)
                        + len(data))
                markers = []
                # split at the cut / stall byte positions; markers travel through the queue so
                # they take effect after the bytes before them were delivered (delayed)
                for limit, marker in ((self.cut_after, _CUT), (self.stall_after, _STALL)):
                    if limit is not None and got < limit <= got + len(data):
                        markers.append((limit - got, marker))
                markers.sort(key=lambda m: m[0])
                pos = 0
                for at, marker in markers:
                    if at > pos:
                        self.put(data[pos:at])
                    pos = at
                    self.put(marker)
                    if marker is _CUT:
                        return      # nothing more is read on a cut connection
                if pos < len(data):
                    self.put(data[pos:])
                got += len(data)
        except OSError as e:
            c.fail(e)

    def put(self, item):
        now = time.monotonic()
        with self.cv:
            if isinstance(item, bytes):
                # backpressure: stop reading while too much is queued (the sender's TCP window
                # then fills, as behind a real slow link)
                while self.qbytes > self.buffer_limit and not self.conn.aborted:
                    self.cv.wait(_POLL)
                self.qbytes += len(item)
            self.q.append((now + self.conn.proxy.delay_for(self.name), item))
            self.cv.notify_all()

    # -- writer ------------------------------------------------------------------------------
    def write_loop(self):
        c = self.conn
        try:
            while True:
                with self.cv:
                    while not self.q and not c.aborted:
                        self.cv.wait(_POLL)
                    if c.aborted:
                        return
                    due, item = self.q[0]
                # wait until due, and through any stall of the connection
                while not c.aborted:
                    wait = max(due, c.stall_until) - time.monotonic()
                    if wait <= 0:
                        break
                    c.wake.wait(min(wait, _POLL))
                if c.aborted:
                    return
                with self.cv:
                    self.q.popleft()
                    if isinstance(item, bytes):
                        self.qbytes -= len(item)
                        self.cv.notify_all()
                if item is _EOF:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    c.half_closed(self.name)
                    return
                if item is _CUT:
                    c.cut(self.name)
                    return
                if item is _STALL:
                    c.stall()
                    continue
                self.send(item)
        except OSError as e:
            c.fail(e)

    def send(self, data):
        c = self.conn
        view = memoryview(data)
        while view:
            piece = view[:16384] if self.bucket else view
            if self.bucket:
                wait = self.bucket.reserve(len(piece))
                if wait > 0 and c.wake.wait(wait) and c.aborted:
                    return
            off = 0
            while off < len(piece):
                if c.aborted:
                    return
                try:
                    off += self.dst.send(piece[off:])
                except socket.timeout:
                    continue
            setattr(c.stats, "bytes_" + self.name, getattr(c.stats, "bytes_" + self.name)
                    + len(piece))
            view = view[len(piece):]


class _Conn:
    def __init__(self, proxy, index, client, peer):
        self.proxy = proxy
        self.client = client
        self.server = None
        self.stats = ConnStats(index, peer)
        self.aborted = False
        self.stall_until = 0.0
        self.wake = threading.Event()   # set on abort: interrupts timed waits
        self.lock = threading.Lock()
        self.done_dirs = set()
        self.threads = []
        self.reset = False

    def start(self):
        p = self.proxy
        i = self.stats.index
        try:
            self.server = socket.create_connection(p.target, timeout=p.connect_timeout)
        except OSError as e:
            self.stats.error = f"connect to target: {e}"
            self._close_sockets(reset=True)
            return
        for s in (self.client, self.server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(_POLL)
        cut_on = p.cut_first is None or i < p.cut_first
        stall_on = p.stall_first is None or i < p.stall_first
        cut_up, cut_down = (p.cut_up(i) if callable(p.cut_up) else p.cut_up,
                            p.cut_down(i) if callable(p.cut_down) else p.cut_down)
        up = _Pipe(self, "up", self.client, self.server, p._bucket_up,
                   cut_up if cut_on else None, p.stall_up if stall_on else None)
        down = _Pipe(self, "down", self.server, self.client, p._bucket_down,
                     cut_down if cut_on else None, p.stall_down if stall_on else None)
        self.pipes = (up, down)
        for pipe in self.pipes:
            for fn in (pipe.read_loop, pipe.write_loop):
                t = threading.Thread(target=self._run, args=(fn,), daemon=True,
                                     name=f"proxy-{i}-{pipe.name}-{fn.__name__}")
                self.threads.append(t)
        for t in self.threads:
            t.start()

    def _run(self, fn):
        try:
            fn()
        finally:
            with self.lock:
                self.threads_done = getattr(self, "threads_done", 0) + 1
                last = self.threads_done == len(self.threads)
            if last:
                self._close_sockets(self.reset)
                self.stats.ended = time.monotonic()

    def stall(self):
        s = self.proxy.stall_seconds
        self.stats.stalled = True
        self.stall_until = math.inf if s is None or s == math.inf else time.monotonic() + s

    def half_closed(self, direction):
        with self.lock:
            self.done_dirs.add(direction)
            both = len(self.done_dirs) == 2
        if both:
            self.abort(reset=False)

    def cut(self, direction):
        self.stats.cut = self.stats.cut or direction
        self.abort(reset=self.proxy.cut_mode == "reset")

    def fail(self, err):
        if self.stats.error is None and not self.aborted:
            self.stats.error = repr(err)
        self.abort(reset=True)

    def abort(self, reset=True):
        """Stop both directions now; the last thread out closes the sockets (RST if reset)."""
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
            self.reset = reset
        self.wake.set()
        for s in (self.client, self.server):
            if s is None:
                continue
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    s.shutdown(socket.SHUT_RD)      # wakes the reader, sends nothing yet
                else:
                    s.shutdown(socket.SHUT_RDWR)    # FIN now
            except OSError:
                pass
        for pipe in getattr(self, "pipes", ()):
            with pipe.cv:
                pipe.cv.notify_all()

    def _close_sockets(self, reset):
        for s in (self.client, self.server):
            if s is None:
                continue
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                s.close()
            except OSError:
                pass
        if self.stats.ended is None:
            self.stats.ended = time.monotonic()

    def join(self, timeout):
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))


class TcpProxy:
    """A fault-injecting TCP proxy; see the module docstring.

    TcpProxy(target, *, listen_host="127.0.0.1", listen_port=0,
             delay_ms=0, delay_up_ms=None, delay_down_ms=None,
             rate=None, rate_up=None, rate_down=None,
             cut_up=None, cut_down=None, cut_first=None, cut_mode="reset",
             stall_up=None, stall_down=None, stall_seconds=5.0, stall_first=None,
             max_buffer=None, connect_timeout=5.0)

    target: (host, port).  delay_*: one-way delay in ms (delay_up_ms/delay_down_ms override
    delay_ms for one direction).  rate*: bytes/s cap (rate sets both directions).
    cut_up/cut_down: reset a connection once that many bytes went that way; cut_first=K: only
    connections 0..K-1. Either may be a function of the connection's index returning the byte
    count or None (no cut), called when the connection is accepted (random offsets per
    connection).  stall_up/stall_down: after that many bytes, forward nothing in either
    direction for stall_seconds (None/inf: forever); stall_first=K likewise.
    max_buffer: bytes queued per direction before the proxy stops reading (default: 4 MiB
    without a rate cap, else max(64 KiB, rate * (delay + 50 ms))).
    Delay and rate attributes may be changed while running (affect data read afterwards);
    cut/stall settings are taken by each connection when it is accepted."""

    def __init__(self, target, *, listen_host="127.0.0.1", listen_port=0,
                 delay_ms=0, delay_up_ms=None, delay_down_ms=None,
                 rate=None, rate_up=None, rate_down=None,
                 cut_up=None, cut_down=None, cut_first=None, cut_mode="reset",
                 stall_up=None, stall_down=None, stall_seconds=5.0, stall_first=None,
                 max_buffer=None, connect_timeout=5.0):
        if cut_mode not in ("reset", "close"):
            raise ValueError("cut_mode must be 'reset' or 'close'")
        self.target = (target[0], int(target[1]))
        self.listen_host, self.listen_port = listen_host, listen_port
        self.delay_up_ms = delay_ms if delay_up_ms is None else delay_up_ms
        self.delay_down_ms = delay_ms if delay_down_ms is None else delay_down_ms
        self.rate_up = rate if rate_up is None else rate_up
        self.rate_down = rate if rate_down is None else rate_down
        self.cut_up, self.cut_down, self.cut_first, self.cut_mode = (
            cut_up, cut_down, cut_first, cut_mode)
        self.stall_up, self.stall_down = stall_up, stall_down
        self.stall_seconds, self.stall_first = stall_seconds, stall_first
        self.max_buffer = max_buffer
        self.connect_timeout = connect_timeout
        self.refuse = False           # True: accept and reset at once (server "unreachable")
        self.connections = []         # ConnStats, in accept order
        self._conns = []
        self._lock = threading.Lock()
        self._sock = None
        self._thread = None
        self._closed = False
        self._counter = itertools.count()
        self._bucket_up = self._bucket_down = None
        self.port = None
        self.host = listen_host

    # settings used by pipes
    def delay_for(self, direction):
        return (self.delay_up_ms if direction == "up" else self.delay_down_ms) / 1000.0

    def buffer_limit(self, direction):
        if self.max_buffer is not None:
            return self.max_buffer
        rate = self.rate_up if direction == "up" else self.rate_down
        if not rate:
            return 4 * 1024 * 1024
        return max(65536, int(rate * (self.delay_for(direction) + 0.05)))

    def set_rate(self, rate=None, *, up=None, down=None):
        """Change the bandwidth cap (bytes/s, None = unlimited) while running."""
        self.rate_up = rate if up is None else up
        self.rate_down = rate if down is None else down
        self._bucket_up = _TokenBucket(self.rate_up) if self.rate_up else None
        self._bucket_down = _TokenBucket(self.rate_down) if self.rate_down else None

    # lifecycle
    def start(self):
        self.set_rate(up=self.rate_up, down=self.rate_down)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.listen_host, self.listen_port))
        self._sock.listen(64)
        self._sock.settimeout(_POLL)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"proxy-accept-{self.port}")
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    def _accept_loop(self):
        while not self._closed:
            try:
                client, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            if self.refuse:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                client.close()
                continue
            c = _Conn(self, next(self._counter), client, f"{peer[0]}:{peer[1]}")
            with self._lock:
                self._conns.append(c)
                self.connections.append(c.stats)
            threading.Thread(target=c.start, daemon=True, name="proxy-connect").start()

    def reset_all(self):
        """Reset every open connection now (a network drop); new connections still work."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            if not c.aborted:
                c.stats.cut = c.stats.cut or "reset"
                c.abort(reset=True)

    def stall_all(self, seconds=None):
        """Stall every open connection for `seconds` (None: until release_all/close)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.stats.stalled = True
            c.stall_until = math.inf if seconds is None else time.monotonic() + seconds

    def release_all(self):
        """End all stalls now."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.stall_until = 0.0

    def active(self):
        """Number of connections still open."""
        with self._lock:
            return sum(1 for c in self._conns if c.stats.ended is None)

    def wait_idle(self, timeout=5.0):
        """Wait until every accepted connection has ended (counters final); True if so."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.active() == 0:
                return True
            time.sleep(0.02)
        return self.active() == 0

    def close(self, timeout=5.0):
        """Stop accepting, reset open connections, join the threads."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort(reset=True)
        for c in conns:
            c.join(timeout)

    @property
    def bytes_up(self):
        return sum(s.bytes_up for s in self.connections)

    @property
    def bytes_down(self):
        return sum(s.bytes_down for s in self.connections)


def _parse_target(s):
    host, _, port = s.rpartition(":")
    return (host or "127.0.0.1", int(port))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, default=0, help="port to listen on (0: pick one)")
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--target", required=True, type=_parse_target, help="HOST:PORT")
    ap.add_argument("--delay-ms", type=float, default=0, help="one-way delay, both directions")
    ap.add_argument("--delay-up-ms", type=float)
    ap.add_argument("--delay-down-ms", type=float)
    ap.add_argument("--rate", type=float, help="bytes/s cap, both directions")
    ap.add_argument("--rate-up", type=float)
    ap.add_argument("--rate-down", type=float)
    ap.add_argument("--cut-up", type=int, help="reset after N bytes client->server")
    ap.add_argument("--cut-down", type=int, help="reset after N bytes server->client")
    ap.add_argument("--cut-first", type=int, help="only the first K connections are cut")
    ap.add_argument("--cut-mode", choices=("reset", "close"), default="reset")
    ap.add_argument("--stall-up", type=int, help="stall after N bytes client->server")
    ap.add_argument("--stall-down", type=int, help="stall after N bytes server->client")
    ap.add_argument("--stall-seconds", type=float, default=5.0, help="inf: forever")
    ap.add_argument("--stall-first", type=int)
    ap.add_argument("--max-buffer", type=int)
    a = ap.parse_args(argv)
    px = TcpProxy(a.target, listen_host=a.listen_host, listen_port=a.listen,
                  delay_ms=a.delay_ms, delay_up_ms=a.delay_up_ms, delay_down_ms=a.delay_down_ms,
                  rate=a.rate, rate_up=a.rate_up, rate_down=a.rate_down,
                  cut_up=a.cut_up, cut_down=a.cut_down, cut_first=a.cut_first,
                  cut_mode=a.cut_mode, stall_up=a.stall_up, stall_down=a.stall_down,
                  stall_seconds=a.stall_seconds, stall_first=a.stall_first,
                  max_buffer=a.max_buffer)
    px.start()
    print(px.port, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    px.close()
    for s in px.connections:
        print(json.dumps(s.as_dict()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
