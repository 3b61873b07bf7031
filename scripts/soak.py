#!/usr/bin/python3
"""Helpers for scripts/soak.sh (Debian's python3: python3-libnbd).

  soak.py base FILE SIZE DATA          a sparse disk: DATA bytes of random data in 16
                                       extents spread over SIZE bytes (seeded)
  soak.py station ARGS.json            one station's loop until the deadline (below)
  soak.py sample OUT.csv MBANK SECS STOPFILE ROOT_PID
                                       every SECS, the VmRSS of every process running
                                       MBANK under ROOT_PID, as "unix_s,kind,pid,rss_kib" lines, until
                                       STOPFILE exists; kind: the mbank subcommand
  soak.py total FILE KEY               the sum of KEY over the JSON objects in FILE
  soak.py rss OUT.csv                  the largest RSS per kind, as a Markdown table

A station (ARGS.json: k, mbank, url, cache, cfg, mirror, socket, deadline, writes,
pause, out) repeats until the deadline: `mbank attach sK/dev` with its own cache;
through NBD it first reads back what it wrote in its last cycle and 4 random ranges and
compares them with its mirror (a local file holding what the disk must hold), then
makes WRITES writes of 1-256 KiB (random data, 1/4 of them unaligned, some zeros) at
random offsets, applying each to the mirror as well, and flushes; SIGTERM makes attach
check in. Every 5th cycle, once the machine has more than 4 versions, it removes the
oldest (`mbank rm`, so GC has garbage to collect). One JSON line per cycle goes to OUT;
at the end one line {"final": true, "sha256": ...} with the mirror's hash.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

KIB = 1 << 10
MIB = 1 << 20


def base(path, size, data):
    rng = random.Random(20261211)
    per = data // 16
    step = size // 16
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(16):
            f.seek(i * step + (step - per) // 2 // 4096 * 4096)
            f.write(rng.randbytes(per))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                return h.hexdigest()
            h.update(b)


def station(a):
    import nbd  # python3-libnbd

    rng = random.Random(a["k"] * 7919)
    env = dict(os.environ, XDG_CONFIG_HOME=a["cfg"])
    env.pop("MBANK_BANK", None)
    mbank, url, machine = a["mbank"], a["url"], f"s{a['k']}/dev"
    size = os.path.getsize(a["mirror"])
    out = open(a["out"], "a")
    mirror = open(a["mirror"], "r+b")

    current = [None]

    def on_term(*_):  # the soak is being torn down: end the attach too (it checks in)
        if current[0] is not None and current[0].poll() is None:
            current[0].terminate()
            try:
                current[0].wait(120)
            except subprocess.TimeoutExpired:
                current[0].kill()
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_term)

    def record(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()

    try:
        cycle = loop(a, mbank, url, machine, size, rng, env, record, current, mirror, nbd)
    finally:
        if current[0] is not None and current[0].poll() is None:
            current[0].kill()
            current[0].wait()
    mirror.close()
    record(final=True, cycles=cycle, sha256=sha256(a["mirror"]))


def loop(a, mbank, url, machine, size, rng, env, record, current, mirror, nbd):
    last = []  # (offset, length) written in the last cycle
    cycle = 0
    while time.time() < a["deadline"]:
        cycle += 1
        t0 = time.time()
        if os.path.exists(a["socket"]):
            os.unlink(a["socket"])
        err = open(f"{a['out']}.attach.err", "a")
        p = subprocess.Popen([mbank, "-q", "--bank", url, "--cache", a["cache"], "attach",
                              machine, "--socket", a["socket"], "--json"],
                             stdout=subprocess.PIPE, stderr=err, env=env)
        current[0] = p
        # Bounded wait for the socket.
        while not os.path.exists(a["socket"]) and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.05)
        if not os.path.exists(a["socket"]):
            if p.poll() is None:
                p.kill()
            p.wait()
            record(cycle=cycle, ok=False, why=f"attach did not serve (exit {p.returncode})")
            time.sleep(a["pause"])
            continue
        h = nbd.NBD()
        mismatches = 0
        written = 0
        try:
            h.connect_unix(a["socket"])
            if h.get_size() != size:
                raise RuntimeError(f"disk size {h.get_size()} is not {size}")
            checks = last + [(rng.randrange(0, size - 64 * KIB), rng.randrange(1, 64 * KIB))
                             for _ in range(4)]
            for off, n in checks:
                mirror.seek(off)
                if h.pread(n, off) != mirror.read(n):
                    mismatches += 1
            last = []
            for _ in range(a["writes"]):
                n = rng.randrange(1, 65) * 4 * KIB
                off = rng.randrange(0, (size - n) // (4 * KIB) - 1) * 4 * KIB
                if rng.random() < 0.25:  # unaligned
                    n -= rng.randrange(1, 4096)
                    off += rng.randrange(1, 4096)
                data = bytes(n) if rng.random() < 0.1 else rng.randbytes(n)
                h.pwrite(data, off)
                mirror.seek(off)
                mirror.write(data)
                last.append((off, n))
                written += n
            h.flush()
            mirror.flush()
            os.fsync(mirror.fileno())
            h.shutdown()
        except Exception as e:  # recorded; the attach still checks in what it got
            record(cycle=cycle, ok=False, why=f"nbd: {e}")
        finally:
            del h
        p.send_signal(signal.SIGTERM)
        try:
            so, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            so, _ = p.communicate()
        version = None
        try:
            version = json.loads(so.decode() or "{}").get("version")
        except ValueError:
            pass
        record(cycle=cycle, ok=p.returncode == 0 and version is not None and mismatches == 0,
               exit=p.returncode, version=version, mismatches=mismatches, bytes=written,
               seconds=round(time.time() - t0, 2))
        if cycle % 5 == 0:
            r = subprocess.run([mbank, "-q", "--bank", url, "log", machine, "--json"],
                               env=env, capture_output=True, text=True)
            if r.returncode == 0:
                versions = json.loads(r.stdout)
                if len(versions) > 4:
                    oldest = versions[-1]["version"]
                    r = subprocess.run([mbank, "-q", "--bank", url, "rm", f"{machine}@{oldest}"],
                                       env=env, capture_output=True, text=True)
                    record(cycle=cycle, rm=oldest, ok=r.returncode == 0, why=r.stderr.strip()[-300:])
        time.sleep(a["pause"])
    return cycle


KINDS = {"serve", "attach", "gc", "verify", "export", "create", "login", "rm", "log", "import",
         "admin", "init", "recover"}


def descends_from(pid, root):
    """True if process `pid` is `root` or one of its descendants."""
    for _ in range(64):
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # ppid
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def sample(out, mbank, secs, stopfile, root):
    mbank = os.path.realpath(mbank)
    with open(out, "a") as f:
        while not os.path.exists(stopfile):
            now = time.time()
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if os.readlink(f"/proc/{pid}/exe") != mbank or not descends_from(int(pid), root):
                        continue
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        argv = c.read().decode(errors="replace").split("\0")
                    kind = next((x for x in argv[1:] if x in KINDS), "other")
                    with open(f"/proc/{pid}/status") as s:
                        rss = next(int(line.split()[1]) for line in s if line.startswith("VmRSS:"))
                except (OSError, StopIteration, ValueError):
                    continue  # gone meanwhile
                f.write(f"{now:.1f},{kind},{pid},{rss}\n")
            f.flush()
            time.sleep(secs)


def rss(path):
    peak, pids, samples = {}, {}, {}
    with open(path) as f:
        for line in f:
            _, kind, pid, kib = line.strip().split(",")
            peak[kind] = max(peak.get(kind, 0), int(kib))
            pids.setdefault(kind, set()).add(pid)
            samples[kind] = samples.get(kind, 0) + 1
    print("| process | max RSS MiB | processes seen | samples |")
    print("|---|---:|---:|---:|")
    for kind in sorted(peak, key=lambda k: -peak[k]):
        print(f"| {kind} | {peak[kind] / 1024:.1f} | {len(pids[kind])} | {samples[kind]} |")


def total(path, key):
    """The sum of `key` over the JSON objects written one after another to `path`."""
    dec, n, at = json.JSONDecoder(), 0, 0
    try:
        text = open(path).read()
    except OSError:
        return 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return n
        obj, at = dec.raw_decode(text, at)
        n += obj.get(key, 0)


def main():
    cmd = sys.argv[1]
    if cmd == "base":
        base(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "station":
        with open(sys.argv[2]) as f:
            station(json.load(f))
    elif cmd == "sample":
        sample(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    elif cmd == "total":
        print(total(sys.argv[2], sys.argv[3]))
    elif cmd == "rss":
        rss(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
