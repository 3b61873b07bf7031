#!/usr/bin/python3
"""The bank server under floods (scripts/bench-floods.sh runs this; standard library only).

  bench_floods.py run OUT_DIR LABEL=MBANK...   the benchmark: prints the report (Markdown)
  bench_floods.py flood KIND SECONDS ARGS.json  one flood (a child process of `run`)
  bench_floods.py probe SECONDS ARGS.json OUT   the legitimate user (a child of `run`)

For every binary (LABEL=PATH, e.g. before=/work/wt-old/target/release/mbank
after=target/release/mbank) `run` makes a bank (users alice and bob; alice imports one
random 16 MiB chunk, PUT /v1/chunks/ID through the server), then for each case starts a fresh
`mbank -q serve` with TLS on 127.0.0.1, takes bob's token, and runs at once

- the flood (a separate process; its connections come from distinct loopback source
  addresses 127.1.x.y, FLOOD_ADDRESSES of them, so per-address caps do not end it at
  once),
- the probe (a separate process): bob, from 127.0.0.1, sending GET /v1/health and
  GET /v1/whoami (with his token) alternately, each on a new TLS connection, one at a
  time, 20 ms apart, each with a 30 s timeout,
- a sampler of the server's VmRSS every 100 ms; VmHWM (peak) read when the flood ends,
  VmRSS again 3 s after it ended (what the server keeps).

Cases (the hardening issue's items 1-4), each FLOOD_SECONDS long (default 15):

  idle      no flood: the baseline
  bodies    80 connections, each POST /v1/chunks with a 32-64 MiB body and no token,
            again and again
  logins    100 connections posting logins with wrong passwords (random user names:
            the worst case for per-user backoff), kept alive, again and again
  slow      1,100 connections that finish TLS, then send a request's headers one byte
            a second; reconnecting when closed
  amplify   4 connections at once, each POST /v1/chunks/get naming alice's 16 MiB chunk
            64 times (with alice's token), again and again

Env: FLOOD_SECONDS, FLOOD_CASES (default "idle bodies logins slow amplify"),
FLOOD_ADDRESSES (distinct source addresses for flood connections; default one per
connection), BODY_CONNS, LOGIN_CONNS, SLOW_CONNS, AMP_CONNS, FLOOD_CACHE_DIR (where the
16 MiB chunk's id is kept).
"""
import json
import struct
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

MIB = 1 << 20
PROBE_TIMEOUT = 30.0
PROBE_GAP = 0.02
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22"}


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v else default


def log(msg):
    sys.stderr.write(time.strftime("[%H:%M:%S] ") + msg + "\n")
    sys.stderr.flush()


# ---- BLAKE3 (chunk ids; not in Python's hashlib) -----------------------------------

IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
PERM = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
SCHED = []
_s = list(range(16))
for _r in range(7):
    SCHED.append(tuple(_s))
    _s = [_s[PERM[i]] for i in range(16)]
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
M = 0xFFFFFFFF


def compress(cv, m, counter, block_len, flags):
    s0, s1, s2, s3, s4, s5, s6, s7 = cv
    s8, s9, s10, s11 = IV[0], IV[1], IV[2], IV[3]
    s12, s13, s14, s15 = counter & M, (counter >> 32) & M, block_len, flags
    for p in SCHED:
        # columns
        s0 = (s0 + s4 + m[p[0]]) & M; s12 ^= s0; s12 = ((s12 >> 16) | (s12 << 16)) & M
        s8 = (s8 + s12) & M; s4 ^= s8; s4 = ((s4 >> 12) | (s4 << 20)) & M
        s0 = (s0 + s4 + m[p[1]]) & M; s12 ^= s0; s12 = ((s12 >> 8) | (s12 << 24)) & M
        s8 = (s8 + s12) & M; s4 ^= s8; s4 = ((s4 >> 7) | (s4 << 25)) & M
        s1 = (s1 + s5 + m[p[2]]) & M; s13 ^= s1; s13 = ((s13 >> 16) | (s13 << 16)) & M
        s9 = (s9 + s13) & M; s5 ^= s9; s5 = ((s5 >> 12) | (s5 << 20)) & M
        s1 = (s1 + s5 + m[p[3]]) & M; s13 ^= s1; s13 = ((s13 >> 8) | (s13 << 24)) & M
        s9 = (s9 + s13) & M; s5 ^= s9; s5 = ((s5 >> 7) | (s5 << 25)) & M
        s2 = (s2 + s6 + m[p[4]]) & M; s14 ^= s2; s14 = ((s14 >> 16) | (s14 << 16)) & M
        s10 = (s10 + s14) & M; s6 ^= s10; s6 = ((s6 >> 12) | (s6 << 20)) & M
        s2 = (s2 + s6 + m[p[5]]) & M; s14 ^= s2; s14 = ((s14 >> 8) | (s14 << 24)) & M
        s10 = (s10 + s14) & M; s6 ^= s10; s6 = ((s6 >> 7) | (s6 << 25)) & M
        s3 = (s3 + s7 + m[p[6]]) & M; s15 ^= s3; s15 = ((s15 >> 16) | (s15 << 16)) & M
        s11 = (s11 + s15) & M; s7 ^= s11; s7 = ((s7 >> 12) | (s7 << 20)) & M
        s3 = (s3 + s7 + m[p[7]]) & M; s15 ^= s3; s15 = ((s15 >> 8) | (s15 << 24)) & M
        s11 = (s11 + s15) & M; s7 ^= s11; s7 = ((s7 >> 7) | (s7 << 25)) & M
        # diagonals
        s0 = (s0 + s5 + m[p[8]]) & M; s15 ^= s0; s15 = ((s15 >> 16) | (s15 << 16)) & M
        s10 = (s10 + s15) & M; s5 ^= s10; s5 = ((s5 >> 12) | (s5 << 20)) & M
        s0 = (s0 + s5 + m[p[9]]) & M; s15 ^= s0; s15 = ((s15 >> 8) | (s15 << 24)) & M
        s10 = (s10 + s15) & M; s5 ^= s10; s5 = ((s5 >> 7) | (s5 << 25)) & M
        s1 = (s1 + s6 + m[p[10]]) & M; s12 ^= s1; s12 = ((s12 >> 16) | (s12 << 16)) & M
        s11 = (s11 + s12) & M; s6 ^= s11; s6 = ((s6 >> 12) | (s6 << 20)) & M
        s1 = (s1 + s6 + m[p[11]]) & M; s12 ^= s1; s12 = ((s12 >> 8) | (s12 << 24)) & M
        s11 = (s11 + s12) & M; s6 ^= s11; s6 = ((s6 >> 7) | (s6 << 25)) & M
        s2 = (s2 + s7 + m[p[12]]) & M; s13 ^= s2; s13 = ((s13 >> 16) | (s13 << 16)) & M
        s8 = (s8 + s13) & M; s7 ^= s8; s7 = ((s7 >> 12) | (s7 << 20)) & M
        s2 = (s2 + s7 + m[p[13]]) & M; s13 ^= s2; s13 = ((s13 >> 8) | (s13 << 24)) & M
        s8 = (s8 + s13) & M; s7 ^= s8; s7 = ((s7 >> 7) | (s7 << 25)) & M
        s3 = (s3 + s4 + m[p[14]]) & M; s14 ^= s3; s14 = ((s14 >> 16) | (s14 << 16)) & M
        s9 = (s9 + s14) & M; s4 ^= s9; s4 = ((s4 >> 12) | (s4 << 20)) & M
        s3 = (s3 + s4 + m[p[15]]) & M; s14 ^= s3; s14 = ((s14 >> 8) | (s14 << 24)) & M
        s9 = (s9 + s14) & M; s4 ^= s9; s4 = ((s4 >> 7) | (s4 << 25)) & M
    return (s0 ^ s8, s1 ^ s9, s2 ^ s10, s3 ^ s11, s4 ^ s12, s5 ^ s13, s6 ^ s14, s7 ^ s15)


def blake3(data):
    """BLAKE3-256 of `data`, in hex (pure Python, about 3 s per MiB: run once, cached)."""
    n_chunks = max(1, (len(data) + 1023) // 1024)
    stack = []

    def chunk_output(i):
        c = data[i * 1024:(i + 1) * 1024]
        nb = max(1, (len(c) + 63) // 64)
        cv = IV
        for b in range(nb):
            blk = c[b * 64:(b + 1) * 64]
            words = struct.unpack("<16I", blk.ljust(64, b"\0"))
            flags = (CHUNK_START if b == 0 else 0) | (CHUNK_END if b == nb - 1 else 0)
            if b == nb - 1:
                return cv, words, i, len(blk), flags
            cv = compress(cv, words, i, 64, flags)

    for i in range(n_chunks - 1):
        cv, w, ctr, bl, fl = chunk_output(i)
        cv = compress(cv, w, ctr, bl, fl)
        total = i + 1
        while total & 1 == 0:
            cv = compress(IV, stack.pop() + cv, 0, 64, PARENT)
            total >>= 1
        stack.append(cv)
    out = chunk_output(n_chunks - 1)
    while stack:
        cv = compress(*out)
        out = (IV, stack.pop() + cv, 0, 64, PARENT)
    cv, w, ctr, bl, fl = out
    return struct.pack("<8I", *compress(cv, w, ctr, bl, fl | ROOT)).hex()


# ---- HTTP over TLS, by hand (exact control over what is sent) --------------------


def tls_context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


def connect(a, src=None, timeout=30.0):
    """A TLS connection to the server, from source address `src` (None: 127.0.0.1)."""
    raw = socket.create_connection(
        ("127.0.0.1", a["port"]), timeout=timeout,
        source_address=(src, 0) if src else None)
    try:
        return a["_ctx"].wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def read_response(s, sink=False):
    """One HTTP/1.1 answer: (status, headers dict, body bytes or length if sink)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError("closed before the answer's headers")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdr = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdr[k.strip().lower()] = v.strip()
    got = len(rest)
    body = [rest] if not sink else None
    if "content-length" in hdr:
        want = int(hdr["content-length"])
        while got < want:
            d = s.recv(min(MIB, want - got))
            if not d:
                raise ConnectionError("closed in the middle of the answer's body")
            got += len(d)
            if body is not None:
                body.append(d)
    else:  # chunked or until the end: Connection: close is always sent where this matters
        while True:
            d = s.recv(MIB)
            if not d:
                break
            got += len(d)
            if body is not None:
                body.append(d)
    return status, hdr, (got if sink else b"".join(body))


def request(s, method, path, token=None, body=b"", close=True):
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    if close:
        head += "Connection: close\r\n"
    s.sendall(head.encode() + b"\r\n" + body)


def login(a, user, password):
    with connect(a) as s:
        request(s, "POST", "/v1/login",
                body=json.dumps({"user": user, "password": password}).encode())
        code, _, body = read_response(s)
    if code != 200:
        raise RuntimeError(f"login of {user} failed: {code} {body[:200]!r}")
    return json.loads(body)["token"]


def source_address(i, n_addresses):
    k = i % n_addresses
    return f"127.1.{k // 250}.{1 + k % 250}"


# ---- the floods (child process) --------------------------------------------------


def flood(kind, seconds, a):
    a["_ctx"] = tls_context(a["ca"])
    threading.stack_size(256 * 1024)
    deadline = time.monotonic() + seconds
    stats = {"connections": 0, "errors": 0, "answers": {}, "bytes_sent": 0, "bytes_received": 0}
    lock = threading.Lock()

    def count(key, n=1):
        with lock:
            stats[key] += n

    def answer(code):
        with lock:
            stats["answers"][str(code)] = stats["answers"].get(str(code), 0) + 1

    def bodies(i, src):
        rng = random.Random(i)
        piece = b"\x5a" * MIB
        while time.monotonic() < deadline:
            try:
                with connect(a, src, timeout=5) as s:
                    count("connections")
                    n = rng.randrange(32, 65)
                    s.sendall(f"POST /v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Content-Length: {n * MIB}\r\n\r\n".encode())
                    try:
                        for _ in range(n):
                            if time.monotonic() >= deadline:
                                return
                            s.sendall(piece)
                            count("bytes_sent", MIB)
                    except OSError:
                        s.settimeout(2)  # refused early: the answer may have come
                        count("errors")
                    code, _, _ = read_response(s, sink=True)
                    answer(code)
            except (OSError, ValueError, IndexError):
                count("errors")
                time.sleep(0.01)

    def logins(i, src):
        rng = random.Random(i)
        s = None
        while time.monotonic() < deadline:
            try:
                if s is None:
                    s = connect(a, src, timeout=10)
                    count("connections")
                body = json.dumps({"user": "u%08x" % rng.getrandbits(32),
                                   "password": "wrong-%d" % rng.getrandbits(32)}).encode()
                request(s, "POST", "/v1/login", body=body, close=False)
                code, hdr, _ = read_response(s)
                answer(code)
                if hdr.get("connection", "").lower() == "close":
                    s.close()
                    s = None
            except (OSError, ValueError, IndexError):
                count("errors")
                if s is not None:
                    s.close()
                s = None
                time.sleep(0.01)
        if s is not None:
            s.close()

    def slow(i, src):
        line = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000
        # Spread the connections' start over the first seconds.
        time.sleep(random.Random(i).random() * 2)
        while time.monotonic() < deadline:
            try:
                with connect(a, src, timeout=30) as s:
                    count("connections")
                    for b in line:
                        if time.monotonic() >= deadline:
                            return
                        s.sendall(bytes([b]))
                        count("bytes_sent")
                        time.sleep(1)
            except (OSError, ValueError):
                count("errors")
                time.sleep(0.2)

    chunk = bytes.fromhex(a["chunk"])

    def amplify(i, src):
        ask = chunk * 64
        while time.monotonic() < deadline:
            try:
                with connect(a, src, timeout=120) as s:
                    count("connections")
                    request(s, "POST", "/v1/chunks/get", token=a["alice_token"], body=ask)
                    code, _, n = read_response(s, sink=True)
                    answer(code)
                    count("bytes_received", n)
            except (OSError, ValueError, IndexError):
                count("errors")
                time.sleep(0.01)

    fn, n = {
        "bodies": (bodies, env_int("BODY_CONNS", 80)),
        "logins": (logins, env_int("LOGIN_CONNS", 100)),
        "slow": (slow, env_int("SLOW_CONNS", 1100)),
        "amplify": (amplify, env_int("AMP_CONNS", 4)),
    }[kind]
    n_addr = env_int("FLOOD_ADDRESSES", n)
    threads = [threading.Thread(target=fn, args=(i, source_address(i, n_addr)), daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    # Bounded: a thread stuck in a read past the deadline is abandoned (daemon).
    for t in threads:
        t.join(max(0.0, deadline + 5 - time.monotonic()))
    stats["threads"] = n
    stats["addresses"] = n_addr
    with lock:
        print(json.dumps(stats), flush=True)
    os._exit(0)


# ---- the legitimate user (child process) -----------------------------------------


def probe(seconds, a, out):
    a["_ctx"] = tls_context(a["ca"])
    deadline = time.monotonic() + seconds
    results = []  # [kind, ok, ms, what]
    k = 0
    while time.monotonic() < deadline:
        kind = "health" if k % 2 == 0 else "whoami"
        k += 1
        t0 = time.monotonic()
        try:
            with connect(a, timeout=PROBE_TIMEOUT) as s:
                s.settimeout(PROBE_TIMEOUT)
                if kind == "health":
                    request(s, "GET", "/v1/health")
                else:
                    request(s, "GET", "/v1/whoami", token=a["bob_token"])
                code, _, _ = read_response(s)
            ms = (time.monotonic() - t0) * 1000
            results.append([kind, code == 200, ms, str(code)])
        except (OSError, ValueError, IndexError) as e:
            ms = (time.monotonic() - t0) * 1000
            results.append([kind, False, ms, type(e).__name__])
        time.sleep(PROBE_GAP)
    with open(out, "w") as f:
        json.dump(results, f)


# ---- orchestration ---------------------------------------------------------------

CHILDREN = []


def spawn(args, **kw):
    p = subprocess.Popen(args, **kw)
    CHILDREN.append(p)
    return p


def stop(p, sig=signal.SIGTERM, wait=30):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in CHILDREN:
        CHILDREN.remove(p)


def run_ok(args, stdin=None, env=None):
    r = subprocess.run(args, input=stdin, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def make_cert(d):
    os.makedirs(d, exist_ok=True)
    sh = """
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.pem -days 2 -subj "/CN=mbank flood bench CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout key.pem -out server.csr -subj /CN=127.0.0.1
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' >ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out cert.pem -days 2 -extfile ext.cnf
    """
    subprocess.run(["bash", "-ec", sh], cwd=d, check=True, capture_output=True)


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except (OSError, ValueError):
        pass
    return None


class Server:
    def __init__(self, mbank, bank, tls, log_path):
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("MBANK_BANK", None)
        self.p = spawn([mbank, "-q", "--bank", bank, "serve", "--listen", "127.0.0.1:0",
                        "--tls-cert", f"{tls}/cert.pem", "--tls-key", f"{tls}/key.pem"],
                       stdout=subprocess.PIPE, stderr=open(log_path, "ab"),
                       stdin=subprocess.DEVNULL, env=env)
        line = self.p.stdout.readline().decode()
        m = re.search(r":(\d+)\s*$", line)
        if not m:
            stop(self.p)
            raise RuntimeError(f"mbank serve did not say where it listens: {line!r}; "
                               f"see {log_path}")
        self.port = int(m.group(1))

    def stop(self):
        stop(self.p)


def pct(vals, p):
    if not vals:
        return None
    v = sorted(vals)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def big_chunk(cache_dir):
    """A 16 MiB chunk of random data (MAX_PLAIN_LEN) stored raw: (id hex, stored bytes).
    Made once and kept in cache_dir (its pure-Python hash takes about a minute)."""
    plain = random.Random(16).randbytes(16 * MIB)
    path = f"{cache_dir}/flood-chunk-16M.id"
    cid = None
    if os.path.exists(path):
        with open(path) as f:
            cid = f.read().strip()
    if not cid or not re.fullmatch(r"[0-9a-f]{64}", cid):
        log("hashing the 16 MiB chunk (BLAKE3 in Python, once)")
        cid = blake3(plain)
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(cid + "\n")
        os.rename(path + ".tmp", path)
    # docs/formats.md, "Stored chunk": MBCK, version 1, codec 0 (raw), lengths, payload
    stored = b"MBCK" + struct.pack("<BBHII", 1, 0, 0, len(plain), len(plain)) + plain
    return cid, stored


def setup_bank(label, mbank, t, tls, chunk):
    """A bank with alice and bob; alice uploads the 16 MiB chunk. Returns the bank's path."""
    bank = f"{t}/bank-{label}"
    run_ok([mbank, "-q", "--bank", bank, "init"])
    for u, pw in PASSWORDS.items():
        run_ok([mbank, "-q", "--bank", bank, "admin", "user", "add", u, "--password-stdin"],
               stdin=pw + "\n")
    cid, stored = chunk
    srv = Server(mbank, bank, tls, f"{t}/serve-{label}-setup.log")
    try:
        a = {"port": srv.port, "_ctx": tls_context(f"{tls}/ca.pem")}
        token = login(a, "alice", PASSWORDS["alice"])
        with connect(a, timeout=120) as s:
            request(s, "PUT", f"/v1/chunks/{cid}", token=token, body=stored)
            code, _, body = read_response(s)
        if code not in (200, 201):
            raise RuntimeError(f"{label}: alice's upload of the 16 MiB chunk failed: {code} {body[:300]!r}")
    finally:
        srv.stop()
    # The upload recorded alice's right to read the chunk; the server makes uploaded
    # chunks durable only when a version that names them is committed, so put the chunk
    # file in place on the host, as the store would (docs/formats.md, bank layout).
    path = f"{bank}/chunks/{cid[:2]}/{cid}"
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(stored)
        os.rename(path + ".tmp", path)
    return bank


def one_case(case, label, mbank, bank, chunk, t, tls, seconds):
    srv = Server(mbank, bank, tls, f"{t}/serve-{label}-{case}.log")
    pid = srv.p.pid
    a = {"port": srv.port, "ca": f"{tls}/ca.pem", "chunk": chunk}
    a["_ctx"] = tls_context(a["ca"])
    res = {"case": case, "label": label}
    try:
        a["bob_token"] = login(a, "bob", PASSWORDS["bob"])
        a["alice_token"] = login(a, "alice", PASSWORDS["alice"])
        args = f"{t}/args-{label}-{case}.json"
        with open(args, "w") as f:
            json.dump({k: v for k, v in a.items() if not k.startswith("_")}, f)
        res["rss_start_kib"] = proc_status(pid, "VmRSS")
        peak = [0]
        sampling = [True]

        def sampler():
            while sampling[0]:
                r = proc_status(pid, "VmRSS")
                if r is not None:
                    peak[0] = max(peak[0], r)
                time.sleep(0.1)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        me = os.path.abspath(__file__)
        fl = None
        if case != "idle":
            fl = spawn([sys.executable, me, "flood", case, str(seconds), args],
                       stdout=subprocess.PIPE, stderr=open(f"{t}/flood-{label}-{case}.err", "w"))
        time.sleep(1)  # the flood ramps up
        out = f"{t}/probe-{label}-{case}.json"
        pr = spawn([sys.executable, me, "probe", str(seconds - 1), args, out])
        pr.wait(seconds + PROBE_TIMEOUT + 30)
        CHILDREN.remove(pr)
        if fl is not None:
            try:
                fo, _ = fl.communicate(timeout=60)
                res["flood"] = json.loads(fo.decode() or "{}")
            except (subprocess.TimeoutExpired, ValueError):
                res["flood"] = {}
            stop(fl, signal.SIGKILL)
        sampling[0] = False
        th.join()
        res["alive"] = srv.p.poll() is None
        res["hwm_kib"] = proc_status(pid, "VmHWM")
        res["rss_peak_kib"] = peak[0]
        time.sleep(3)
        res["rss_after_kib"] = proc_status(pid, "VmRSS")
        with open(out) as f:
            probes = json.load(f)
        ok = [p[2] for p in probes if p[1]]
        res["requests"] = len(probes)
        res["failed"] = len(probes) - len(ok)
        res["fail_kinds"] = sorted({p[3] for p in probes if not p[1]})
        res["p50"], res["p99"], res["max"] = pct(ok, 50), pct(ok, 99), (max(ok) if ok else None)
        for kind in ("health", "whoami"):
            v = [p[2] for p in probes if p[1] and p[0] == kind]
            res[f"p99_{kind}"] = pct(v, 99)
    finally:
        srv.stop()
    return res


def mib(kib):
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def ms(v):
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.1f}×"


def report(results, labels, seconds):
    cases = []
    for r in results:
        if r["case"] not in cases:
            cases.append(r["case"])
    get = {(r["case"], r["label"]): r for r in results}
    out = []
    b, af = labels[0], labels[-1]
    out.append(f"| flood | {b}: peak RSS MiB | {b}: p99 ms | {b}: failed | "
               f"{af}: peak RSS MiB | {af}: p99 ms | {af}: failed | peak RSS {b}/{af} | p99 {b}/{af} |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        x, y = get.get((c, b)), get.get((c, af))
        if not x or not y:
            continue
        out.append(f"| {c} | {mib(x['hwm_kib'])} | {ms(x['p99'])} | {x['failed']}/{x['requests']} | "
                   f"{mib(y['hwm_kib'])} | {ms(y['p99'])} | {y['failed']}/{y['requests']} | "
                   f"{ratio(x['hwm_kib'], y['hwm_kib'])} | {ratio(x['p99'], y['p99'])} |")
    out.append("")
    out.append("| flood | server | VmHWM MiB | RSS sampled max MiB | RSS 3 s after MiB | "
               "p50 ms | p99 ms | max ms | p99 health / whoami ms | failed (why) | alive | flood answers |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for c in cases:
        for lab in labels:
            r = get.get((c, lab))
            if not r:
                continue
            fl = r.get("flood") or {}
            ans = ", ".join(f"{k}×{v}" for k, v in sorted(fl.get("answers", {}).items()))
            what = (f"{fl.get('connections', 0)} conns, {fl.get('errors', 0)} closed/refused"
                    + (f"; {ans}" if ans else "")) if c != "idle" else "-"
            why = f"{r['failed']}/{r['requests']}" + (f" ({', '.join(r['fail_kinds'])})" if r["failed"] else "")
            out.append(f"| {c} | {lab} | {mib(r['hwm_kib'])} | {mib(r['rss_peak_kib'])} | "
                       f"{mib(r['rss_after_kib'])} | {ms(r['p50'])} | {ms(r['p99'])} | {ms(r['max'])} | "
                       f"{ms(r['p99_health'])} / {ms(r['p99_whoami'])} | {why} | "
                       f"{'yes' if r['alive'] else '**no**'} | {what} |")
    return "\n".join(out)


def main_run(t, pairs):
    seconds = env_int("FLOOD_SECONDS", 15)
    cases = os.environ.get("FLOOD_CASES", "idle bodies logins slow amplify").split()
    tls = f"{t}/tls"
    make_cert(tls)
    big = big_chunk(os.environ.get("FLOOD_CACHE_DIR", t))
    chunk = big[0]
    bins = []
    for pair in pairs:
        label, _, path = pair.partition("=")
        log(f"{label}: bank with alice and bob, alice's 16 MiB chunk ({path})")
        bank = setup_bank(label, path, t, tls, big)
        bins.append((label, path, bank, chunk))
    results = []
    for c in cases:  # interleaved: both binaries see the same machine load
        for label, path, bank, chunk in bins:
            log(f"{c}: {label} ({seconds} s)")
            r = one_case(c, label, path, bank, chunk, t, tls, seconds)
            log(f"  peak {mib(r['hwm_kib'])} MiB, p99 {ms(r['p99'])} ms, "
                f"failed {r['failed']}/{r['requests']}, alive {r['alive']}")
            results.append(r)
    with open(f"{t}/results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(report(results, [b[0] for b in bins], seconds))


def main():
    cmd = sys.argv[1]
    if cmd == "flood":
        with open(sys.argv[4]) as f:
            flood(sys.argv[2], float(sys.argv[3]), json.load(f))
    elif cmd == "probe":
        with open(sys.argv[3]) as f:
            probe(float(sys.argv[2]), json.load(f), sys.argv[4])
    elif cmd == "run":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
        try:
            main_run(sys.argv[2], sys.argv[3:])
        finally:
            for p in list(CHILDREN):
                stop(p, signal.SIGKILL if p.args[1:2] != ["-q"] else signal.SIGTERM, wait=30)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
