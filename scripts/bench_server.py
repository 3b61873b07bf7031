#!/usr/bin/python3
"""Helpers for scripts/bench-server.sh (deterministic data, the stations' reads, summaries).

  bench_server.py image FILE SIZE            an image for the upload/download benchmark:
                                             per 1 MiB block, 70% random, 10% zero, 10% a
                                             copy of an earlier block, 10% compressible
  bench_server.py base FILE SIZE DATA        a sparse disk of SIZE bytes whose DATA bytes
                                             of content sit in 16 extents spread over it;
                                             prints the extents as "offset length" lines
  bench_server.py reads EXTENTS OUT N TOTAL  N reads of 4-64 KiB (4 KiB aligned) inside
                                             the extents, about TOTAL bytes in all, as
                                             "offset length" lines (seeded: the same list
                                             for every station and every run)
  bench_server.py read SOCKET READS START OUT
                                             connects to the NBD socket, waits until the
                                             wall-clock time START, issues the reads one
                                             at a time, timing each; writes JSON to OUT:
                                             {bytes, seconds, start, end, connected,
                                             latencies_ms}
  bench_server.py summary START OUT...       pools the readers' JSON: prints
                                             "bytes wall_seconds mibps p50_ms p99_ms
                                             max_ms late_connects"

The reader needs Debian's python3-libnbd (import nbd), hence /usr/bin/python3.
"""
import json
import math
import random
import sys
import time

MIB = 1 << 20
KIB = 1 << 10


def compressible(rng, n):
    # Text-like: words from a small vocabulary (zstd -3 makes it about 4x smaller).
    words = [b"mbank", b"chunk", b"station", b"version", b"disk", b"lab", b"user",
             b"\n", b"the", b"of", b"0x%04x" % rng.randrange(65536)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def image(path, size):
    rng = random.Random(20261203)
    blocks = []  # earlier random blocks, for copies
    with open(path, "wb") as f:
        for i in range(size // MIB):
            k = i % 10
            if k == 0:
                f.seek(MIB, 1)  # zero: a hole
                continue
            if k == 5 and blocks:
                b = blocks[rng.randrange(len(blocks))]
            elif k == 7:
                b = compressible(rng, MIB)
            else:
                b = rng.randbytes(MIB)
                if len(blocks) < 64:
                    blocks.append(b)
            f.write(b)
        f.truncate(size)


def base(path, size, data):
    rng = random.Random(4242)
    n_ext = 16
    ext_len = (data // n_ext) // (64 * KIB) * (64 * KIB)
    stride = (size // n_ext) // (64 * KIB) * (64 * KIB)
    assert ext_len > 0 and ext_len <= stride, "BENCH_BASE_DATA must be <= BENCH_BASE_SIZE"
    with open(path, "wb") as f:
        f.truncate(size)
        for e in range(n_ext):
            f.seek(e * stride)
            left = ext_len
            while left:
                n = min(left, MIB)
                # mostly random (a disk's binaries, compressed files), some text
                f.write(compressible(rng, n) if rng.random() < 0.25 else rng.randbytes(n))
                left -= n
            print(e * stride, ext_len)


def reads(extents_path, out, n, total):
    rng = random.Random(77)
    ext = [tuple(map(int, l.split())) for l in open(extents_path) if l.strip()]
    sizes = [4, 8, 16, 32, 64]
    weights = [32, 25, 21, 13, 9]  # mean 16.6 KiB: 2000 reads, about 32 MiB
    mean = sum(s * w for s, w in zip(sizes, weights)) / sum(weights) * KIB
    scale = total / (n * mean)  # adjust the mix towards TOTAL
    with open(out, "w") as f:
        for _ in range(n):
            s = rng.choices(sizes, weights)[0] * KIB
            s = max(4 * KIB, min(64 * KIB, int(s * scale + 2 * KIB) // (4 * KIB) * (4 * KIB)))
            o, l = ext[rng.randrange(len(ext))]
            off = o + rng.randrange((l - s) // (4 * KIB) + 1) * 4 * KIB
            f.write(f"{off} {s}\n")


def read(sock, reads_path, start, out):
    import nbd
    todo = [tuple(map(int, l.split())) for l in open(reads_path) if l.strip()]
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={sock}")
    connected = time.time()
    while time.time() < start:
        time.sleep(min(0.005, max(0.0, start - time.time())))
    lat = []
    total = 0
    t0 = time.time()
    pc = time.perf_counter
    for off, n in todo:
        s = pc()
        buf = h.pread(n, off)
        lat.append((pc() - s) * 1000.0)
        total += len(buf)
    t1 = time.time()
    h.shutdown()
    with open(out, "w") as f:
        json.dump({"bytes": total, "seconds": t1 - t0, "start": t0, "end": t1,
                   "connected": connected, "latencies_ms": lat}, f)


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    # nearest rank
    i = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[i]


def summary(start, outs):
    rs = [json.load(open(o)) for o in outs]
    total = sum(r["bytes"] for r in rs)
    wall = max(r["end"] for r in rs) - start
    lat = sorted(x for r in rs for x in r["latencies_ms"])
    late = sum(1 for r in rs if r["connected"] > start)
    print(f"{total} {wall:.2f} {total / MIB / wall:.1f} {pct(lat, 50):.2f} "
          f"{pct(lat, 99):.2f} {lat[-1]:.1f} {late}")


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd = a[0]
    if cmd == "image":
        image(a[1], int(a[2]))
    elif cmd == "base":
        base(a[1], int(a[2]), int(a[3]))
    elif cmd == "reads":
        reads(a[1], a[2], int(a[3]), int(a[4]))
    elif cmd == "read":
        read(a[1], a[2], float(a[3]), a[4])
    elif cmd == "summary":
        summary(float(a[1]), a[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
