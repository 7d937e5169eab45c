#!/usr/bin/env python3
"""Read every data extent of a file (SEEK_DATA/SEEK_HOLE), skipping holes; print bytes read.

With --time, print "BYTES SECONDS": the seconds spent finding and reading the data, without
Python's own start-up (about 0.1-0.2 s on a small VM, which would swamp a 100 MiB read).

Used by bench/run.sh to warm the page cache like `cat img > /dev/null` would, without reading
gigabytes of holes as zeros, and as the "time to read the data" reference for the sparse image.
"""
import os
import sys
import time

args = sys.argv[1:]
timing = args[:1] == ["--time"]
if timing:
    args = args[1:]
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
if timing:
    print(total, f"{time.perf_counter() - t0:.3f}")
else:
    print(total)
