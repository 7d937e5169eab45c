#!/usr/bin/env python3
"""Turns VHDX files into fuzz_vhdx seeds (the sparse form fuzz_vhdx.cpp describes): the file size
and the runs of non-zero 256-byte grains, CRC fix-up flag set. Keep the images tiny (1 MiB
blocks, a few MiB of disk, little data): a seed holds every non-zero byte.

Run: vhdx_seed.py IMAGE.vhdx SEED   (max file size 16 MiB - 256)
"""
import struct
import sys

GRAIN = 256


def seed(image):
    data = open(image, "rb").read()
    if len(data) % GRAIN or len(data) // GRAIN > 0xffff:
        raise SystemExit(f"{image}: size {len(data)} is not a multiple of 256 below 16 MiB")
    out = bytearray(struct.pack("<BH", 1, len(data) // GRAIN))
    g = 0
    n = len(data) // GRAIN
    nonzero = lambda i: any(data[i * GRAIN:(i + 1) * GRAIN])  # noqa: E731
    while g < n:
        if not nonzero(g):
            g += 1
            continue
        start = g
        while g < n and nonzero(g) and (g - start + 1) * GRAIN <= 0xff00:
            g += 1
        run = data[start * GRAIN:g * GRAIN].rstrip(b"\0")
        out += struct.pack("<HH", start, len(run)) + run
    return bytes(out)


if __name__ == "__main__":
    open(sys.argv[2], "wb").write(seed(sys.argv[1]))
