#!/usr/bin/python3
"""Fault injection for Machine Bank: run by scripts/fault-inject.sh, which builds mbank,
makes the work directory and cleans up. Run directly with
`MBANK=path fault_inject.py --work DIR [--minutes N] [--seed S] [--quick] [--only P,..]`.

Phases (each bounded in count and time; every child process has a timeout):

1. kill-write: `mbank attach` is killed (SIGKILL) at a random moment while an NBD client
   writes and flushes; `mbank recover`, export, and every sector must hold what the
   client last flushed there (or a newer write the client had sent).
2. kill-checkin: SIGINT starts a check-in, SIGKILL follows after a random delay;
   `recover` must leave exactly one new version holding every flushed write.
3. disk-full: imports into a bank on a small tmpfs until it is full; check-ins into a
   full bank; a session whose station cache (on a tmpfs) fills up. The error must say
   the disk is full, nothing committed may be lost, and once space is back the
   writes must be checked in.
4. stress: for N minutes at once: imports (some killed), attach sessions (checked in or
   killed and recovered), gc, rm of old versions, verify, exports. Each committed
   version's sha256 is recorded; at the end verify exits 0 and every surviving version
   exports with its sha256.
5. malformed-nbd: random option and request bytes against attach while a good client
   writes and reads back; the server must not crash and the good client's data must
   survive into the check-in.

Writes in phases 1 and 3 are made of 512-byte sectors whose content names the write,
so the check says which write each sector holds. Prints a summary of counts on stdout;
exits 1 on any lost write, wrong data, crash, hang or unexpected error.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import nbd

MBANK = os.environ.get("MBANK", "mbank")
CMD_TIMEOUT = 300  # seconds any one mbank command may take before it counts as a hang
SECTOR = 512
FULL_RE = re.compile(r"no space|disk is full|ENOSPC|quota", re.I)


def log(msg):
    print(time.strftime("[%H:%M:%S] ") + msg, file=sys.stderr, flush=True)


class Ctx:
    """What every phase shares: the work directory, the seed, the counts, the failures."""

    def __init__(self, work, seed):
        self.work = work
        self.seed = seed
        self.counts = Counter()
        self.failures = []
        self.lock = threading.Lock()
        self.mounts = []
        self.n = 0

    def count(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def fail(self, kind, msg):
        with self.lock:
            self.failures.append((kind, msg))
        log(f"FAIL [{kind}] {msg}")

    def path(self, *parts):
        p = os.path.join(self.work, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def unique(self):
        with self.lock:
            self.n += 1
            return self.n

    def rng(self, what):
        return random.Random(f"{self.seed}:{what}")

    # -- tmpfs --------------------------------------------------------------------
    def mount_tmpfs(self, path, size):
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
        self.mounts.append(path)

    def resize_tmpfs(self, path, size):
        subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True)

    def umount(self, path):
        subprocess.run(["umount", "-l", path], check=False)
        if path in self.mounts:
            self.mounts.remove(path)

    def umount_all(self):
        for p in reversed(list(self.mounts)):
            self.umount(p)


def tail(text, n=600):
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def crashed(rc, err):
    """A panic, a signal other than ours, or Rust's panic exit code."""
    return rc is None or rc < 0 or rc == 101 or "panicked" in err


def mbank(ctx, bank, args, cache=None, timeout=CMD_TIMEOUT, binary=False):
    """Runs `mbank -q --bank BANK [--cache C] ARGS...`; returns (rc, stdout, stderr).
    A hang is killed and reported as rc None."""
    cmd = [MBANK, "-q", "--bank", bank]
    if cache:
        cmd += ["--cache", cache]
    cmd += args
    env = {k: v for k, v in os.environ.items() if k not in ("MBANK_BANK", "MBANK_CACHE")}
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        ctx.fail("hang", f"`{' '.join(cmd)}` did not end within {timeout} s")
        return None, b"" if binary else "", ""
    out = p.stdout if binary else p.stdout.decode(errors="replace")
    return p.returncode, out, p.stderr.decode(errors="replace")


def mbank_json(ctx, bank, args, what, cache=None):
    """A command that must succeed and print JSON; None (and a failure) otherwise."""
    rc, out, err = mbank(ctx, bank, args + ["--json"], cache=cache)
    if rc is None:
        return None
    if rc != 0:
        kind = "crash" if crashed(rc, err) else "unexpected error"
        ctx.fail(kind, f"{what}: `mbank {' '.join(args)}` exited {rc}: {tail(err)}")
        return None
    try:
        return json.loads(out)
    except ValueError:
        ctx.fail("unexpected error", f"{what}: `mbank {' '.join(args)}` printed no JSON: {tail(out)}")
        return None


def export(ctx, bank, ref):
    """(rc, bytes, stderr) of `export REF -`."""
    return mbank(ctx, bank, ["export", ref, "-"], binary=True)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def head_of(ctx, bank, machine):
    ls = mbank_json(ctx, bank, ["ls"], f"ls of {bank}") or []
    for m in ls:
        if m["machine"] == machine:
            return m["head"]
    return None


def versions_of(ctx, bank, machine):
    return mbank_json(ctx, bank, ["log", machine], f"log of {machine}") or []


def all_versions(ctx, bank):
    out = {}
    for m in mbank_json(ctx, bank, ["ls"], f"ls of {bank}") or []:
        for v in versions_of(ctx, bank, m["machine"]):
            out[v["version"]] = v
    return out


def import_image(ctx, bank, machine, data, extra=()):
    img = ctx.path("images", f"img-{ctx.unique()}.raw")
    with open(img, "wb") as f:
        f.write(data)
    r = mbank_json(ctx, bank, ["import", machine, img] + list(extra), f"import into {machine}")
    os.unlink(img)
    return r["version"] if r else None


def recover(ctx, cache, bank, what):
    """`recover --json`, which must exit 0 with no problems; returns the report or None."""
    rc, out, err = mbank(ctx, bank, ["recover", "--json"], cache=cache)
    if rc is None:
        return None
    try:
        rep = json.loads(out)
    except ValueError:
        rep = None
    if rc != 0 or rep is None or rep.get("problems"):
        kind = "crash" if crashed(rc, err) else "unexpected error"
        ctx.fail(kind, f"{what}: recover exited {rc}: {tail(out)} {tail(err)}")
        return None
    return rep


def verify_ok(ctx, bank, what):
    rc, out, err = mbank(ctx, bank, ["verify", "--json"])
    if rc != 0:
        ctx.fail("crash" if crashed(rc, err) else "wrong data", f"{what}: verify exited {rc}: {tail(out)} {tail(err)}")
        return False
    ctx.count("verify runs")
    return True


def check_versions(ctx, bank, expected, what):
    """Every version in `expected` (machine@version -> sha256) exports with its sha256."""
    for v, want in expected.items():
        rc, data, err = export(ctx, bank, v)
        if rc != 0:
            ctx.fail("lost write", f"{what}: version {v} no longer exports (exit {rc}): {tail(err)}")
        elif sha(data) != want:
            ctx.fail("wrong data", f"{what}: version {v} exports with sha256 {sha(data)}, recorded {want}")
        else:
            ctx.count("versions checked by sha256")


class Attach:
    """`mbank attach --socket` in the background."""

    def __init__(self, ctx, bank, cache, machine, extra=()):
        n = ctx.unique()
        self.ctx = ctx
        self.sock = ctx.path("sock", f"a{n}.sock")
        self.out_path = ctx.path("logs", f"attach-{n}.out")
        self.err_path = ctx.path("logs", f"attach-{n}.err")
        self.cmd = [MBANK, "-q", "--bank", bank, "--cache", cache, "attach", machine, "--socket", self.sock, "--json", *extra]
        env = {k: v for k, v in os.environ.items() if k not in ("MBANK_BANK", "MBANK_CACHE")}
        with open(self.out_path, "wb") as o, open(self.err_path, "wb") as e:
            self.p = subprocess.Popen(self.cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env)

    def ready(self, timeout=120):
        """True once the socket is there; False (with a failure) if attach ended or hung."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if stat.S_ISSOCK(os.lstat(self.sock).st_mode):
                    return True
            except FileNotFoundError:
                pass
            if self.p.poll() is not None:
                err = self.err()
                self.ctx.fail("crash" if crashed(self.p.returncode, err) else "unexpected error",
                              f"attach ended before serving (exit {self.p.returncode}): {tail(err)}")
                return False
            time.sleep(0.02)
        self.kill9()
        self.ctx.fail("hang", f"attach did not serve on {self.sock} within {timeout} s")
        return False

    def running(self):
        return self.p.poll() is None

    def wait(self, timeout=CMD_TIMEOUT):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            self.ctx.fail("hang", f"attach did not end within {timeout} s after SIGINT: {tail(self.err())}")
            return None
        self.check_panic()
        return rc

    def check_panic(self):
        """A panic caught inside the server (a task, a thread) is a crash too."""
        err = self.err()
        if "panicked" in err:
            self.ctx.fail("crash", f"attach panicked: {tail(err[err.index('panicked') - 200:], 1200)}")

    def stop(self):
        """SIGINT (check in); returns the exit code."""
        if self.running():
            self.p.send_signal(signal.SIGINT)
        return self.wait()

    def kill9(self):
        if self.running():
            self.p.kill()
        self.p.wait()
        self.check_panic()

    def out(self):
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def err(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def report(self):
        try:
            return json.loads(self.out())
        except ValueError:
            return None


def close(h):
    """Closes a libnbd handle now (older bindings have no close(): then on collection)."""
    getattr(h, "close", lambda: None)()


def guarded(ctx, fn):
    """A thread target that turns an exception into a failure instead of a traceback."""
    def run(*args):
        try:
            fn(*args)
        except Exception as e:
            import traceback
            traceback.print_exc()
            ctx.fail("script error", f"{fn.__name__}: {type(e).__name__}: {e}")
    return run


def connect(sock):
    h = nbd.NBD()
    h.connect_unix(sock)
    return h


# -- sector-named writes ---------------------------------------------------------------


class Write:
    __slots__ = ("wid", "s0", "n", "acked", "durable")

    def __init__(self, wid, s0, n):
        self.wid, self.s0, self.n = wid, s0, n
        self.acked = self.durable = False


class Writer:
    """An NBD client that writes sectors naming their write, flushes now and then, and
    records which writes the server acknowledged and which it made durable."""

    def __init__(self, key, sectors):
        self.key = key.encode()
        self.sectors = sectors
        self.writes = []
        self.error = None
        self.flushes = 0

    def content(self, wid, s):
        return hashlib.blake2b(b"%s:%d:%d" % (self.key, wid, s), digest_size=64).digest() * 8

    def data(self, w):
        return b"".join(self.content(w.wid, s) for s in range(w.s0, w.s0 + w.n))

    def flushed(self):
        for w in self.writes:
            if w.acked:
                w.durable = True
        self.flushes += 1

    def run(self, sock, rng, ops, sizes=(1, 8, 64, 256), sequential=False, stop=None):
        """Up to `ops` operations; ends at the first error (the server was killed or
        refused), which it keeps in `error`."""
        try:
            h = connect(sock)
        except nbd.Error as e:
            self.error = f"connect: {e}"
            return
        try:
            at = 0
            for _ in range(ops):
                if stop is not None and stop.is_set():
                    break
                if rng.random() < 0.2 and self.writes:
                    h.flush()
                    self.flushed()
                    continue
                n = rng.randint(1, rng.choice(sizes))
                if sequential:
                    if at >= self.sectors:
                        break
                    s0, n = at, min(n, self.sectors - at)
                    at += n
                else:
                    s0 = rng.randrange(0, self.sectors - n + 1)
                w = Write(len(self.writes), s0, n)
                self.writes.append(w)
                fua = rng.random() < 0.15
                h.pwrite(self.data(w), s0 * SECTOR, nbd.CMD_FLAG_FUA if fua else 0)
                w.acked = True
                if fua:
                    w.durable = True
            if self.writes:
                h.flush()
                self.flushed()
            h.shutdown()
        except nbd.Error as e:
            self.error = str(e)
        finally:
            close(h)

    def run_aio(self, sock, rng, ops, depth=16, sizes=(1, 8, 64, 256)):
        """Like `run`, with up to `depth` requests in flight (as QEMU sends them). Writes
        in flight never overlap, so of two writes to a sector the later one was sent
        after the earlier one completed; a flush makes durable only the writes that had
        completed when it was sent."""
        try:
            h = connect(sock)
        except nbd.Error as e:
            self.error = f"connect: {e}"
            return
        inflight = {}  # cookie -> (write or None, writes a flush covers, buffer)
        fua = set()
        sent = 0

        def overlaps(s0, n):
            return any(w is not None and s0 < w.s0 + w.n and w.s0 < s0 + n for w, _, _ in inflight.values())

        try:
            while sent < ops or inflight:
                while sent < ops and len(inflight) < depth:
                    sent += 1
                    if rng.random() < 0.1 and self.writes:
                        covered = [w for w in self.writes if w.acked]
                        inflight[h.aio_flush()] = (None, covered, None)
                        continue
                    n = rng.randint(1, rng.choice(sizes))
                    s0 = rng.randrange(0, self.sectors - n + 1)
                    if overlaps(s0, n):
                        continue
                    w = Write(len(self.writes), s0, n)
                    self.writes.append(w)
                    buf = nbd.Buffer.from_bytearray(bytearray(self.data(w)))
                    flags = nbd.CMD_FLAG_FUA if rng.random() < 0.15 else 0
                    cookie = h.aio_pwrite(buf, s0 * SECTOR, flags=flags)
                    if flags:
                        fua.add(cookie)
                    inflight[cookie] = (w, None, buf)
                h.poll(-1)
                for cookie in list(inflight):
                    if h.aio_command_completed(cookie):
                        w, covered, _ = inflight.pop(cookie)
                        if w is not None:
                            w.acked = True
                            w.durable = w.durable or cookie in fua
                        else:
                            for c in covered:
                                c.durable = True
                            self.flushes += 1
            h.flush()
            self.flushed()
            h.shutdown()
        except nbd.Error as e:
            self.error = str(e)
        finally:
            close(h)

    def check(self, base, got):
        """Sectors whose content is not allowed: [(sector, what)]. A sector may hold its
        last durable write or any later write; with no durable write, also its base."""
        per = {}
        for w in self.writes:
            for s in range(w.s0, w.s0 + w.n):
                per.setdefault(s, []).append(w)
        bad = []
        if len(got) != len(base):
            return [(-1, f"disk is {len(got)} bytes, was {len(base)}")]
        for s in range(self.sectors):
            have = got[s * SECTOR:(s + 1) * SECTOR]
            ws = per.get(s)
            if not ws:
                if have != base[s * SECTOR:(s + 1) * SECTOR]:
                    bad.append((s, "changed though never written"))
                continue
            d = max((i for i, w in enumerate(ws) if w.durable), default=None)
            allowed = ws[d:] if d is not None else ws
            if any(have == self.content(w.wid, s) for w in allowed):
                continue
            if d is None and have == base[s * SECTOR:(s + 1) * SECTOR]:
                continue
            older = [w.wid for w in ws[:d] if have == self.content(w.wid, s)] if d is not None else []
            if d is not None:
                what = (f"lost flushed write #{ws[d].wid}" + (f" (holds older write #{older[0]})" if older else
                        " (holds the base)" if have == base[s * SECTOR:(s + 1) * SECTOR] else " (holds other bytes)"))
            else:
                what = "holds bytes no write put there"
            bad.append((s, what))
        return bad


def report_bad(ctx, what, bad, writer):
    if not bad:
        return
    kinds = {"lost write" if "lost" in b[1] else "wrong data" for b in bad}
    first = ", ".join(f"sector {s}: {w}" for s, w in bad[:4])
    ctx.fail(sorted(kinds)[0], f"{what}: {len(bad)} bad sectors ({len(writer.writes)} writes, "
             f"{sum(w.durable for w in writer.writes)} durable): {first}")


# -- phase 1: kill -9 during writes ------------------------------------------------------


def phase_kill_write(ctx, trials):
    rng = ctx.rng("kill-write")
    bank, cache = ctx.path("p1", "bank"), ctx.path("p1", "cache")
    mbank(ctx, bank, ["init"])
    size = 4 << 20
    base = bytearray(rng.randbytes(size))
    base[1 << 20:2 << 20] = bytes(1 << 20)  # a zero chunk range too
    machine = "fi/w"
    if import_image(ctx, bank, machine, bytes(base), ["--chunk-size", rng.choice(["4K", "16K", "64K"])]) is None:
        return
    for t in range(trials):
        if rng.random() < 0.2:
            # Killed while starting: recovering the last session, checking out.
            a = Attach(ctx, bank, cache, machine)
            time.sleep(rng.uniform(0, 0.5))
            a.kill9()
            ctx.count("kill-write: attach killed while starting")
            recover(ctx, cache, bank, f"kill-write trial {t}, after a kill while starting")
        before = head_of(ctx, bank, machine)
        a = Attach(ctx, bank, cache, machine)
        if not a.ready():
            recover(ctx, cache, bank, "after a failed attach")
            continue
        w = Writer(f"{ctx.seed}:kw:{t}", size // SECTOR)
        aio = rng.random() < 0.5
        ctx.count(f"kill-write: trials with {'16 requests' if aio else 'one request'} in flight")
        th = threading.Thread(daemon=True, target=guarded(ctx, w.run_aio if aio else w.run),
                              args=(a.sock, random.Random(rng.random()), 3000))
        th.start()
        time.sleep(rng.uniform(0, 1.0) if rng.random() < 0.8 else 0)
        a.kill9()
        th.join(120)
        if th.is_alive():
            ctx.fail("hang", f"kill-write trial {t}: the NBD client did not end after attach was killed")
            return
        ctx.count("kill-write: attach killed")
        ctx.count("kill-write: writes acknowledged", sum(x.acked for x in w.writes))
        ctx.count("kill-write: writes durable", sum(x.durable for x in w.writes))
        ctx.count("kill-write: flushes", w.flushes)
        rep = recover(ctx, cache, bank, f"kill-write trial {t}")
        if rep is None:
            continue
        head = head_of(ctx, bank, machine)
        rc, data, err = export(ctx, bank, machine)
        if rc != 0:
            ctx.fail("unexpected error", f"kill-write trial {t}: export exited {rc}: {tail(err)}")
            continue
        report_bad(ctx, f"kill-write trial {t} (seed {ctx.seed})", w.check(base, data), w)
        if any(x.durable for x in w.writes) and head == before:
            ctx.fail("lost write", f"kill-write trial {t}: flushed writes but recover made no version")
        base = bytearray(data)
    verify_ok(ctx, bank, "after kill-write")


# -- phase 2: kill -9 during check-in ----------------------------------------------------


def random_writes(rng, h, model, total):
    """Random writes of random bytes (to `model` as well) until `total` bytes, then flush."""
    done = 0
    while done < total:
        n = rng.choice([512, 4096, 65536, rng.randint(1, 300_000)])
        off = rng.randrange(0, len(model) - n)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
        done += n
    h.flush()


def phase_kill_checkin(ctx, trials):
    rng = ctx.rng("kill-checkin")
    bank, cache = ctx.path("p2", "bank"), ctx.path("p2", "cache")
    mbank(ctx, bank, ["init"])
    machine = "fi/c"
    model = bytearray(rng.randbytes(8 << 20))
    if import_image(ctx, bank, machine, bytes(model), ["--chunk-size", "16K"]) is None:
        return
    est = None  # seconds from SIGINT to the end of an unkilled check-in
    expected = {}
    for t in range(trials):
        before = head_of(ctx, bank, machine)
        nversions = len(versions_of(ctx, bank, machine))
        a = Attach(ctx, bank, cache, machine)
        if not a.ready():
            recover(ctx, cache, bank, "after a failed attach")
            continue
        try:
            h = connect(a.sock)
            random_writes(rng, h, model, rng.randint(256 << 10, 2 << 20))
            h.shutdown()
            close(h)
        except nbd.Error as e:
            ctx.fail("unexpected error", f"kill-checkin trial {t}: the NBD client failed: {e}")
            a.kill9()
            recover(ctx, cache, bank, "after a client error")
            continue
        start = time.monotonic()
        a.p.send_signal(signal.SIGINT)
        killed = False
        if est is not None:
            end = start + rng.uniform(0, est * 1.3)
            while time.monotonic() < end and a.running():
                time.sleep(0.002)
            if a.running():
                a.kill9()
                killed = True
        rc = a.wait()
        if not killed:
            took = time.monotonic() - start
            est = took if est is None else 0.7 * est + 0.3 * took
            if rc != 0:
                ctx.fail("crash" if crashed(rc, a.err()) else "unexpected error",
                         f"kill-checkin trial {t}: check-in exited {rc}: {tail(a.err())}")
                continue
            ctx.count("kill-checkin: check-in finished before the kill")
        else:
            ctx.count("kill-checkin: killed during check-in")
        rep = recover(ctx, cache, bank, f"kill-checkin trial {t}")
        if rep is None:
            continue
        head = head_of(ctx, bank, machine)
        vs = versions_of(ctx, bank, machine)
        if len(vs) != nversions + 1:
            ctx.fail("wrong data" if len(vs) > nversions else "lost write",
                     f"kill-checkin trial {t} (killed={killed}): {len(vs) - nversions} new versions, want 1")
        parent = next((v["parent"] for v in vs if v["version"] == head), None)
        if head == before or parent != before:
            ctx.fail("lost write", f"kill-checkin trial {t}: head {head} (parent {parent}) is not a check-in of {before}")
        rc, data, err = export(ctx, bank, machine)
        if rc != 0 or data != model:
            ctx.fail("lost write", f"kill-checkin trial {t} (killed={killed}): the head does not hold the flushed writes "
                     f"(export exit {rc}, sha256 {sha(data)} want {sha(model)})")
            model = bytearray(data) if rc == 0 else model
        expected[f"{machine}@{head}"] = sha(bytes(model))
    mbank_json(ctx, bank, ["gc"], "gc after kill-checkin")
    verify_ok(ctx, bank, "after kill-checkin")
    check_versions(ctx, bank, expected, "after kill-checkin")


# -- phase 3: disk full ------------------------------------------------------------------


def fill(dir_, leave):
    """Fills the file system of `dir_` until `leave` bytes are free; returns the filler."""
    path = os.path.join(dir_, "filler")
    st = os.statvfs(dir_)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    block = b"\x5a" * (1 << 20)
    with open(path, "wb") as f:
        try:
            while want > 0:
                f.write(block[:min(want, len(block))])
                want -= min(want, len(block))
            f.flush()
        except OSError:
            pass
    return path


def clear_error(ctx, what, rc, err, need=()):
    """A failure must be exit 1 saying the disk is full (and `need`), never a crash."""
    if crashed(rc, err):
        ctx.fail("crash", f"{what}: exit {rc}: {tail(err)}")
        return False
    if rc != 1 or not FULL_RE.search(err) or any(n not in err for n in need):
        ctx.fail("unexpected error", f"{what}: exit {rc}, the message does not say the disk is full"
                 f"{' and ' + ', '.join(need) if need else ''}: {tail(err)}")
        return False
    return True


def phase_import_full(ctx, rounds):
    rng = ctx.rng("import-full")
    for r in range(rounds):
        mnt = ctx.path("p3a", f"r{r}", "mnt")
        ctx.mount_tmpfs(mnt, f"{rng.randint(6, 16)}m")
        try:
            bank = os.path.join(mnt, "bank")
            mbank(ctx, bank, ["init"])
            expected = {}
            fulls = 0
            for i in range(60):
                machine = f"fi/full{i % 3}"
                data = rng.randbytes(rng.randint(64, 768) * 4096)
                img = ctx.path("p3a", f"r{r}", "img.raw")
                with open(img, "wb") as f:
                    f.write(data)
                rc, out, err = mbank(ctx, bank, ["import", "--json", machine, img, "--chunk-size", "16K"])
                if rc == 0:
                    expected[f"{machine}@{json.loads(out)['version']}"] = sha(data)
                    continue
                ctx.count("disk-full cases")
                ctx.count("disk-full: import into a full bank")
                clear_error(ctx, f"import-full round {r}: import of {len(data)} bytes into a full bank", rc, err)
                fulls += 1
                if len(all_versions(ctx, bank)) != len(expected):
                    ctx.fail("wrong data", f"import-full round {r}: the failed import changed the catalog")
                verify_ok(ctx, bank, f"import-full round {r}, full")
                check_versions(ctx, bank, expected, f"import-full round {r}, full")
                mbank_json(ctx, bank, ["gc"], f"gc on a full bank (round {r})")
                if fulls == 2:
                    break
                ctx.resize_tmpfs(mnt, "64m")
                rc, out, err = mbank(ctx, bank, ["import", "--json", machine, img])
                if rc != 0:
                    ctx.fail("unexpected error", f"import-full round {r}: import after space came back exited {rc}: {tail(err)}")
                else:
                    expected[f"{machine}@{json.loads(out)['version']}"] = sha(data)
                fill(mnt, rng.randint(0, 2 << 20))
            verify_ok(ctx, bank, f"import-full round {r}, end")
        finally:
            ctx.umount(mnt)


def phase_checkin_full(ctx, trials):
    rng = ctx.rng("checkin-full")
    mnt = ctx.path("p3b", "mnt")
    ctx.mount_tmpfs(mnt, "48m")
    try:
        bank, cache = os.path.join(mnt, "bank"), ctx.path("p3b", "cache")
        mbank(ctx, bank, ["init"])
        machine = "fi/cf"
        model = bytearray(rng.randbytes(4 << 20))
        v = import_image(ctx, bank, machine, bytes(model), ["--chunk-size", "16K"])
        if v is None:
            return
        expected = {f"{machine}@{v}": sha(bytes(model))}
        for t in range(trials):
            a = Attach(ctx, bank, cache, machine)
            if not a.ready():
                recover(ctx, cache, bank, "after a failed attach")
                continue
            try:
                h = connect(a.sock)
                random_writes(rng, h, model, rng.randint(256 << 10, 3 << 20))
                h.shutdown()
                close(h)
            except nbd.Error as e:
                ctx.fail("unexpected error", f"checkin-full trial {t}: NBD client: {e}")
                a.kill9()
                continue
            filler = fill(mnt, rng.choice([0, 4096, rng.randint(0, 3 << 20)]))
            rc = a.stop()
            ctx.count("disk-full cases")
            if rc == 0:
                ctx.count("disk-full: check-in fit in what was left")
            else:
                ctx.count("disk-full: check-in into a full bank failed")
                clear_error(ctx, f"checkin-full trial {t}", rc, a.err(), ["writes are kept on this station", "recover"])
            os.unlink(filler)
            if rc != 0:
                rep = recover(ctx, cache, bank, f"checkin-full trial {t}")
                if rep is None or len(rep["recovered"]) != 1:
                    ctx.fail("lost write", f"checkin-full trial {t}: recover did not check the session in: {rep}")
            head = head_of(ctx, bank, machine)
            rc, data, err = export(ctx, bank, machine)
            if rc != 0 or data != model:
                ctx.fail("lost write", f"checkin-full trial {t}: head {head} lacks flushed writes (export exit {rc})")
                if rc == 0:
                    model = bytearray(data)
            expected[f"{machine}@{head}"] = sha(bytes(model))
            # Keep the bank small: forget all but the last two versions.
            for old in list(expected)[:-2]:
                if mbank_json(ctx, bank, ["rm", old], "rm of an old version") is not None:
                    del expected[old]
            mbank_json(ctx, bank, ["gc"], "gc in checkin-full")
        verify_ok(ctx, bank, "after checkin-full")
        check_versions(ctx, bank, expected, "after checkin-full")
    finally:
        ctx.umount(mnt)


def phase_cache_full(ctx, trials):
    rng = ctx.rng("cache-full")
    bank = ctx.path("p3c", "bank")
    mbank(ctx, bank, ["init"])
    machine = "fi/cache"
    size = 16 << 20
    base = bytearray(size)
    base[:1 << 20] = rng.randbytes(1 << 20)
    if import_image(ctx, bank, machine, bytes(base)) is None:
        return
    for t in range(trials):
        mnt = ctx.path("p3c", f"t{t}", "mnt")
        ctx.mount_tmpfs(mnt, f"{rng.randint(3, 10)}m")
        try:
            cache = os.path.join(mnt, "cache")
            a = Attach(ctx, bank, cache, machine)
            if not a.ready():
                continue
            w = Writer(f"{ctx.seed}:cf:{t}", size // SECTOR)
            w.run(a.sock, random.Random(rng.random()), 100_000, sizes=(512,), sequential=True)
            ctx.count("disk-full cases")
            ctx.count("disk-full: station cache filled by writes")
            if w.error is None:
                ctx.fail("wrong data", f"cache-full trial {t}: {size} bytes written into a smaller cache were all acknowledged")
            if not a.running():
                ctx.fail("crash", f"cache-full trial {t}: attach died when its cache filled: exit {a.p.returncode}: {tail(a.err())}")
                a.wait()
            else:
                rc = a.stop()
                if rc != 0:
                    clear_error(ctx, f"cache-full trial {t}: check-in with a full cache", rc, a.err(),
                                ["writes are kept on this station", "recover"])
                    ctx.count("disk-full: check-in with a full cache failed")
                else:
                    ctx.count("disk-full: check-in with a full cache worked")
            ctx.resize_tmpfs(mnt, "128m")
            rep = recover(ctx, cache, bank, f"cache-full trial {t}")
            if rep is None:
                continue
            rc, data, err = export(ctx, bank, machine)
            if rc != 0:
                ctx.fail("unexpected error", f"cache-full trial {t}: export exited {rc}: {tail(err)}")
                continue
            report_bad(ctx, f"cache-full trial {t} (seed {ctx.seed})", w.check(base, data), w)
            base = bytearray(data)
        finally:
            ctx.umount(mnt)
    verify_ok(ctx, bank, "after cache-full")


# -- phase 4: stress ---------------------------------------------------------------------


class Stress:
    def __init__(self, ctx, seconds):
        self.ctx = ctx
        self.bank, self.cache = ctx.path("p4", "bank"), ctx.path("p4", "cache")
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.expected = {}  # version -> sha256
        self.machine_of = {}  # version -> machine
        self.removed = set()
        self.killed_imports = {}  # machine -> set of sha256 that a killed import may have committed
        self.busy = set()  # versions being exported (not removed meanwhile)
        self.images = {}

    def live(self):
        return time.monotonic() < self.deadline and len(self.ctx.failures) < 20

    def record(self, machine, version, digest):
        with self.lock:
            self.expected[version] = digest
            self.machine_of[version] = machine

    def pause(self, rng, most):
        end = time.monotonic() + rng.uniform(0, most)
        while self.live() and time.monotonic() < end:
            time.sleep(0.05)

    def importer(self, rng):
        ctx = self.ctx
        first = True  # one whole import however slow the machine is
        while first or self.live():
            self.pause(rng, 1.0)
            machine = f"s/imp{rng.randrange(3)}"
            old = self.images.get(machine)
            if old is not None and rng.random() < 0.6:
                data = bytearray(old)
                for _ in range(rng.randint(1, 5)):
                    n = rng.randint(1, 200_000)
                    off = rng.randrange(0, len(data) - n)
                    data[off:off + n] = rng.randbytes(n)
                data = bytes(data)
            else:
                data = rng.randbytes(rng.randint(128, 768) * 4096) + bytes(rng.randint(0, 256) * 4096)
            img = ctx.path("p4", f"imp-{ctx.unique()}.raw")
            with open(img, "wb") as f:
                f.write(data)
            cmd = [MBANK, "-q", "--bank", self.bank, "import", "--json", machine, img]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            kill = not first and rng.random() < 0.2
            first = False
            try:
                if kill:
                    time.sleep(rng.uniform(0, 0.8))
                    p.kill()
                out, err = p.communicate(timeout=CMD_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                ctx.fail("hang", f"stress: import into {machine} did not end")
                continue
            finally:
                os.unlink(img)
            err = err.decode(errors="replace")
            if p.returncode == 0:
                v = json.loads(out)["version"]
                self.record(machine, v, sha(data))
                self.images[machine] = data
                ctx.count("stress: imports")
            elif kill and p.returncode == -signal.SIGKILL:
                with self.lock:
                    self.killed_imports.setdefault(machine, set()).add(sha(data))
                ctx.count("stress: imports killed")
            else:
                ctx.fail("crash" if crashed(p.returncode, err) else "unexpected error",
                         f"stress: import into {machine} exited {p.returncode}: {tail(err)}")

    def session(self, rng, machine):
        ctx = self.ctx
        model = bytearray(rng.randbytes(6 << 20))
        v = import_image(ctx, self.bank, machine, bytes(model), ["--chunk-size", rng.choice(["4K", "64K"])])
        if v is None:
            return
        self.record(machine, v, sha(bytes(model)))
        first = True  # one whole check-in however slow the machine is
        while first or self.live():
            self.pause(rng, 0.5)
            before = head_of(ctx, self.bank, machine)
            a = Attach(ctx, self.bank, self.cache, machine)
            if not a.ready():
                recover(ctx, self.cache, self.bank, f"stress: after a failed attach of {machine}")
                continue
            try:
                h = connect(a.sock)
                random_writes(rng, h, model, rng.randint(4096, 1 << 20))
                h.shutdown()
                close(h)
            except nbd.Error as e:
                ctx.fail("unexpected error", f"stress: NBD client of {machine}: {e}")
                a.kill9()
                return
            if first or rng.random() < 0.6:
                first = False
                rc = a.stop()
                rep = a.report()
                if rc != 0 or not rep or not rep.get("version"):
                    ctx.fail("crash" if crashed(rc, a.err()) else "unexpected error",
                             f"stress: check-in of {machine} exited {rc}: {tail(a.err())}")
                    return
                self.record(machine, rep["version"], sha(bytes(model)))
                ctx.count("stress: sessions checked in")
            else:
                a.kill9()
                ctx.count("stress: sessions killed (kill -9)")
                # Another session's attach or recover may be checking it in: wait for
                # the head to move.
                end = time.monotonic() + 120
                head = before
                while head == before and time.monotonic() < end:
                    if recover(ctx, self.cache, self.bank, f"stress: recover after killing {machine}") is None:
                        return
                    head = head_of(ctx, self.bank, machine)
                    if head == before:
                        time.sleep(0.2)
                if head == before:
                    ctx.fail("lost write", f"stress: the killed session of {machine} was never checked in")
                    return
                self.record(machine, head, sha(bytes(model)))
                ctx.count("stress: sessions recovered")

    def periodic(self, rng, what, every, fn):
        while self.live():
            end = time.monotonic() + rng.uniform(every / 2, every * 1.5)
            while self.live() and time.monotonic() < end:
                time.sleep(0.05)
            if self.live():
                fn(rng)
                self.ctx.count(f"stress: {what}")

    def gc(self, rng):
        mbank_json(self.ctx, self.bank, ["gc"], "stress: gc")

    def verify(self, rng):
        verify_ok(self.ctx, self.bank, "stress: verify during the run")

    def rm(self, rng):
        """Removes up to three versions older than each machine's last three."""
        for _ in range(rng.randint(1, 3)):
            self.rm_one(rng)

    def rm_one(self, rng):
        with self.lock:
            by = {}
            for v, m in self.machine_of.items():
                if v not in self.removed and v not in self.busy:
                    by.setdefault(m, []).append(v)
            cands = [vs[:-3] for vs in by.values() if len(vs) > 3]
            if not cands:
                return
            v = rng.choice(rng.choice(cands))
            self.removed.add(v)  # before the rm: a concurrent export may fail from now
        m = self.machine_of[v]
        rc, out, err = mbank(self.ctx, self.bank, ["rm", f"{m}@{v}", "--json"])
        if rc == 0:
            self.ctx.count("stress: versions removed")
        elif rc == 1 and "session" in err:
            with self.lock:
                self.removed.discard(v)
            self.ctx.count("stress: rm refused (a session's base)")
        else:
            self.ctx.fail("crash" if crashed(rc, err) else "unexpected error", f"stress: rm {m}@{v} exited {rc}: {tail(err)}")

    def export(self, rng):
        with self.lock:
            cands = [v for v in self.expected if v not in self.removed]
            if not cands:
                return
            v = rng.choice(cands)
            self.busy.add(v)
        try:
            rc, data, err = export(self.ctx, self.bank, f"{self.machine_of[v]}@{v}")
        finally:
            with self.lock:
                self.busy.discard(v)
        if rc != 0:
            self.ctx.fail("lost write", f"stress: version {v} of {self.machine_of[v]} does not export (exit {rc}): {tail(err)}")
        elif sha(data) != self.expected[v]:
            self.ctx.fail("wrong data", f"stress: version {v} exports with sha256 {sha(data)}, recorded {self.expected[v]}")

    def finish(self):
        ctx = self.ctx
        recover(ctx, self.cache, self.bank, "stress: final recover")
        mbank_json(ctx, self.bank, ["gc"], "stress: final gc")
        verify_ok(ctx, self.bank, "stress: final verify")
        present = all_versions(ctx, self.bank)
        alive = {v: d for v, d in self.expected.items() if v not in self.removed}
        for v in alive:
            if v not in present:
                ctx.fail("lost write", f"stress: version {v} of {self.machine_of[v]} is gone, never removed")
        for v, info in present.items():
            if v in self.expected:
                continue
            rc, data, err = export(ctx, self.bank, f"{info['machine']}@{v}")
            if rc == 0 and sha(data) in self.killed_imports.get(info["machine"], ()):
                ctx.count("stress: imports committed just before their kill")
                continue
            ctx.fail("wrong data", f"stress: version {v} of {info['machine']} appeared from nowhere")
        check_versions(ctx, self.bank, {f"{self.machine_of[v]}@{v}": d for v, d in alive.items() if v in present},
                       "stress: at the end")
        ctx.count("stress: surviving versions", len([v for v in alive if v in present]))


def phase_stress(ctx, seconds):
    s = Stress(ctx, seconds)
    mbank(ctx, s.bank, ["init"])
    rng = ctx.rng("stress")
    threads = [
        threading.Thread(daemon=True, target=guarded(ctx, s.importer), args=(random.Random(rng.random()),)),
        threading.Thread(daemon=True, target=guarded(ctx, s.session), args=(random.Random(rng.random()), "s/ses0")),
        threading.Thread(daemon=True, target=guarded(ctx, s.session), args=(random.Random(rng.random()), "s/ses1")),
        threading.Thread(daemon=True, target=guarded(ctx, s.periodic), args=(random.Random(rng.random()), "gc runs", 3, s.gc)),
        threading.Thread(daemon=True, target=guarded(ctx, s.periodic), args=(random.Random(rng.random()), "verify runs", 6, s.verify)),
        threading.Thread(daemon=True, target=guarded(ctx, s.periodic), args=(random.Random(rng.random()), "rm runs", 1, s.rm)),
        threading.Thread(daemon=True, target=guarded(ctx, s.periodic), args=(random.Random(rng.random()), "exports checked", 2, s.export)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 2 * CMD_TIMEOUT)
        if t.is_alive():
            ctx.fail("hang", "stress: a worker did not end")
            return
    s.finish()


# -- phase 5: malformed NBD ----------------------------------------------------------------

NBDMAGIC, IHAVEOPT = 0x4E42444D41474943, 0x49484156454F5054
REQUEST_MAGIC = 0x25609513


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise ConnectionError("closed")
        buf += b
    return buf


def drain(s, limit=8 << 20):
    """Reads what the server sends until it closes or goes quiet; True if it closed."""
    got = 0
    s.settimeout(2)
    try:
        while got < limit:
            b = s.recv(1 << 16)
            if not b:
                return True
            got += len(b)
    except (socket.timeout, OSError):
        pass
    return False


def go(s, rng):
    """Fixed newstyle handshake up to transmission; False if the server refused."""
    hello = recv_exact(s, 18)
    if struct.unpack(">QQ", hello[:16]) != (NBDMAGIC, IHAVEOPT):
        raise ValueError(f"bad greeting {hello.hex()}")
    s.sendall(struct.pack(">I", 3))
    if rng.random() < 0.5:
        s.sendall(struct.pack(">QII", IHAVEOPT, 8, 0))  # structured replies
        _, _, _, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        if rtype == 1:
            return True
        if rtype & 0x80000000:
            return False


def fuzz_option(rng):
    opt = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, rng.getrandbits(32)])
    n = rng.choice([0, 1, 4, 6, 7, rng.randint(0, 64), rng.randint(0, 4096), 0xFFFFFFFF, rng.getrandbits(32)])
    if n <= 4096:
        have = n if rng.random() < 0.8 else rng.randint(0, n)
    else:
        have = rng.randint(0, 64)  # claims more than it sends
    magic = IHAVEOPT if rng.random() < 0.9 else rng.getrandbits(64)
    return struct.pack(">QII", magic, opt, n) + rng.randbytes(have), have == n and magic == IHAVEOPT


def fuzz_request(rng, size):
    """A request, mostly well framed with odd fields. Requests that would change data
    and that a correct server accepts stay in the disk's second half."""
    magic = REQUEST_MAGIC if rng.random() < 0.9 else rng.getrandbits(32)
    typ = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, rng.getrandbits(16)])
    flags = rng.choice([0, 1, 2, 4, 8, 16, 32, rng.getrandbits(16)])
    length = rng.choice([0, 1, 511, 512, 4096, 65536, 1 << 20, 32 << 20, 0xFFFFFFFF, rng.getrandbits(32)])
    offset = rng.choice([size // 2, size // 2 + rng.randrange(size // 2), size - 1, size, size + 1,
                         2**64 - 1, 2**64 - 512, 2**63, rng.getrandbits(64)])
    if typ in (1, 4, 6) and offset < size // 2:
        offset += size // 2
    payload = b""
    if typ == 1:
        have = length if length <= 1 << 20 and rng.random() < 0.7 else rng.randint(0, 4096)
        payload = rng.randbytes(have)
    return struct.pack(">IHHQQI", magic, flags, typ, rng.getrandbits(64), offset, length) + payload


def fuzz_connection(ctx, sock, rng, size):
    """One connection of malformed traffic; returns the number of messages sent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    sent = 0
    try:
        s.connect(sock)
        mode = rng.random()
        if mode < 0.1:
            s.sendall(rng.randbytes(rng.randint(1, 2048)))
            sent += 1
        elif mode < 0.35:
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", rng.choice([0, 1, 2, 3, rng.getrandbits(32)])))
            for _ in range(rng.randint(1, 20)):
                msg, framed = fuzz_option(rng)
                s.sendall(msg)
                sent += 1
                if not framed:
                    break
        else:
            if not go(s, rng):
                ctx.fail("unexpected error", "malformed-nbd: the server refused a well-formed NBD_OPT_GO")
                return sent
            ctx.count("malformed-nbd: connections that reached transmission")
            for _ in range(rng.randint(1, 40)):
                s.sendall(fuzz_request(rng, size))
                sent += 1
            if rng.random() < 0.2:
                s.sendall(rng.randbytes(rng.randint(1, 100)))
                sent += 1
        s.shutdown(socket.SHUT_WR)
        drain(s)
    except (OSError, ConnectionError):
        pass  # the server may close a connection that misbehaves: that is its right
    finally:
        s.close()
    return sent


def good_client(ctx, sock, rng, half, model, stop, stats):
    """Writes and reads back random ranges of the first half of the disk until `stop`."""
    try:
        h = connect(sock)
        while not stop.is_set():
            n = rng.randint(1, 64) * 512
            off = rng.randrange(0, half - n, 512)
            if rng.random() < 0.5:
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
            got = h.pread(n, off)
            if got != bytes(model[off:off + n]):
                ctx.fail("wrong data", f"malformed-nbd: the good client read wrong data at {off}+{n}")
                return
            stats["ops"] += 1
        h.flush()
        h.shutdown()
        close(h)
    except nbd.Error as e:
        ctx.fail("unexpected error", f"malformed-nbd: the good client failed while the server was fuzzed: {e}")


def phase_malformed(ctx, requests):
    rng = ctx.rng("malformed")
    bank, cache = ctx.path("p5", "bank"), ctx.path("p5", "cache")
    mbank(ctx, bank, ["init"])
    machine = "fi/nbd"
    size = 8 << 20
    model = bytearray(rng.randbytes(size))
    if import_image(ctx, bank, machine, bytes(model)) is None:
        return
    a = Attach(ctx, bank, cache, machine)
    if not a.ready():
        return
    stop = threading.Event()
    stats = {"ops": 0}
    gc_th = threading.Thread(daemon=True, target=guarded(ctx, good_client), args=(ctx, a.sock, random.Random(rng.random()), size // 2, model, stop, stats))
    gc_th.start()
    sent = conns = 0
    end = time.monotonic() + max(120, requests / 20)
    while sent < requests and time.monotonic() < end:
        sent += fuzz_connection(ctx, a.sock, rng, size)
        conns += 1
        if conns % 50 == 0 and not a.running():
            break
    stop.set()
    gc_th.join(120)
    ctx.count("malformed-nbd: messages sent", sent)
    ctx.count("malformed-nbd: connections", conns)
    ctx.count("malformed-nbd: good client operations", stats["ops"])
    if not a.running():
        ctx.fail("crash", f"malformed-nbd: attach died (exit {a.p.returncode}): {tail(a.err())}")
        recover(ctx, cache, bank, "after the fuzzed attach died")
        return
    # A good client still gets served after all that.
    try:
        h = connect(a.sock)
        if h.pread(4096, 0) != bytes(model[:4096]):
            ctx.fail("wrong data", "malformed-nbd: a fresh client read wrong data after the fuzzing")
        h.shutdown()
        close(h)
    except nbd.Error as e:
        ctx.fail("unexpected error", f"malformed-nbd: a fresh client was not served after the fuzzing: {e}")
    rc = a.stop()
    if rc != 0:
        ctx.fail("crash" if crashed(rc, a.err()) else "unexpected error",
                 f"malformed-nbd: check-in after the fuzzing exited {rc}: {tail(a.err())}")
        return
    rc, data, err = export(ctx, bank, machine)
    if rc != 0 or data[:size // 2] != bytes(model[:size // 2]):
        ctx.fail("wrong data", f"malformed-nbd: the checked-in disk lacks the good client's writes (export exit {rc})")
    if len(data) != size:
        ctx.fail("wrong data", f"malformed-nbd: the disk is {len(data)} bytes after the fuzzing, was {size}")
    verify_ok(ctx, bank, "after malformed-nbd")


# ------------------------------------------------------------------------------------------

PHASES = ["kill-write", "kill-checkin", "disk-full", "stress", "malformed-nbd"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="an empty directory for banks, caches and mounts")
    ap.add_argument("--minutes", type=float, help="length of the stress phase (default 10; --quick: 0.33)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="few trials of each kind (for CI, about a minute)")
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {PHASES}")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 32)
    minutes = a.minutes if a.minutes is not None else (0.33 if a.quick else 10)
    q = a.quick
    n = {
        "kill-write": 4 if q else 45,
        "kill-checkin": 4 if q else 80,
        "import-full": 1 if q else 10,
        "checkin-full": 2 if q else 20,
        "cache-full": 1 if q else 11,
        "malformed": 600 if q else 9000,
    }
    only = a.only.split(",")
    for p in only:
        if p not in PHASES:
            ap.error(f"unknown phase {p}; phases: {', '.join(PHASES)}")
    ctx = Ctx(a.work, seed)
    log(f"fault injection with seed {seed} (repeat with --seed {seed}); mbank is {MBANK}")
    started = time.monotonic()
    try:
        if "kill-write" in only:
            log(f"1. kill -9 of attach during writes: {n['kill-write']} trials")
            phase_kill_write(ctx, n["kill-write"])
        if "kill-checkin" in only:
            log(f"2. kill -9 during check-in: {n['kill-checkin']} trials")
            phase_kill_checkin(ctx, n["kill-checkin"])
        if "disk-full" in only:
            log(f"3. disk full: {n['import-full']} import rounds, {n['checkin-full']} check-ins, {n['cache-full']} full caches")
            phase_import_full(ctx, n["import-full"])
            phase_checkin_full(ctx, n["checkin-full"])
            phase_cache_full(ctx, n["cache-full"])
        if "stress" in only:
            log(f"4. stress: {minutes} minutes of imports, sessions, kill -9 + recover, gc, rm, verify")
            phase_stress(ctx, minutes * 60)
        if "malformed-nbd" in only:
            log(f"5. malformed NBD: {n['malformed']} messages")
            phase_malformed(ctx, n["malformed"])
    except Exception as e:  # a bug in this script or an unforeseen state: say so, fail
        ctx.fail("script error", f"{type(e).__name__}: {e}")
        import traceback
        traceback.print_exc()
    finally:
        ctx.umount_all()
    took = time.monotonic() - started
    print(f"fault injection: seed {seed}, {took:.0f} s, mbank {MBANK}")
    for k in sorted(ctx.counts):
        print(f"  {k:<55} {ctx.counts[k]}")
    kinds = Counter(k for k, _ in ctx.failures)
    if ctx.failures:
        print(f"FAILED: {len(ctx.failures)} failures ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}):")
        for k, m in ctx.failures[:30]:
            print(f"  [{k}] {m}")
        return 1
    print("ok: no lost write, no wrong data, no crash, no unexpected error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
