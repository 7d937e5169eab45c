#!/usr/bin/env python3
"""Read every data extent of a file (SEEK_DATA/SEEK_HOLE), skipping holes; print bytes read.

With --time, print "BYTES SECONDS": the seconds spent finding and reading the data, without
Python's own start-up (about 0.1-0.2 s on a small VM, which would swamp a 100 MiB read).

Used by bench/run.sh to warm the page cache like `cat img > /dev/null` would, without reading
gigabytes of holes as zeros, and as the "time to read the data" reference for the sparse image.

With --touch MIB, afterwards write MIB MiB of fresh memory and free it again. On a VM whose
balloon reports free pages to the host (virtio-balloon free page reporting), free guest memory
is given back to the host after ~2 s, and the next program to use it pays a host fault on
every page: writing a 1.7 GB output into the page cache then costs 0.5 s or 5 s of system time
by luck. Touching the memory right before a timed run hands the tool host-backed free pages,
so the run measures the tool, not the host.
"""
import os
import sys
import time

args = sys.argv[1:]
timing = False
touch_mib = 0
while args and args[0].startswith("--"):
    if args[0] == "--time":
        timing = True
        args = args[1:]
    elif args[0] == "--touch":
        touch_mib = int(args[1])
        args = args[2:]
    else:
        sys.exit(f"read_data.py: unknown option {args[0]}")
t0 = time.perf_counter()
fd = os.open(args[0], os.O_RDONLY)
size = os.fstat(fd).st_size
pos = total = 0
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:  # ENXIO: no data after pos
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    off = d
    while off < h:
        n = len(os.pread(fd, min(8 << 20, h - off), off))
        if n == 0:
            break
        off += n
        total += n
    pos = h
elapsed = time.perf_counter() - t0
if touch_mib:
    fresh = bytearray(touch_mib << 20)  # zero-filled by a write to every page
    del fresh
if timing:
    print(total, f"{elapsed:.3f}")
else:
    print(total)
