//! The station end to end: `mbank attach` serving a machine's disk to real NBD clients
//! (nbdinfo, qemu-io, qemu-img, nbdcopy, fio, nbdsh), check-in traffic, crashes of the
//! attach process (DESIGN invariant 4), two stations and the lease (invariant 6), and the
//! station cache's size bound and verification (invariant 3).
//!
//! Every test runs the real binary on a bank and cache in a temporary directory, serves
//! on a Unix socket there, and compares what `mbank export` gives back after check-in
//! with an image built locally by applying the same writes.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Attached, Bank, Rng, Run, assert_same_bytes, nbdsh, require_tool, run_cmd, unique};
use serde_json::Value;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// The default chunk size of an import.
const CS: usize = 64 * KIB;

// ----------------------------------------------------------------------------------
// Helpers
// ----------------------------------------------------------------------------------

fn need(tools: &[(&str, &str)]) {
    for (t, p) in tools.iter().filter(|(t, _)| *t != "nbdsh") {
        require_tool(t, p);
    }
    if tools.iter().any(|(t, _)| *t == "nbdsh") {
        // nbdsh -c with a script that only imports the libnbd module.
        let ok = common::nbdsh_cmd("", "pass")
            .args(["--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test needs nbdsh (with the system python3): apt-get install python3-libnbd"
        );
    }
}

/// Runs a tool with the bank's scratch directory as its working directory (fio, for
/// one, may leave state files in it), so nothing is ever written in the repository.
fn run_tool<S: AsRef<OsStr>>(bank: &Bank, program: &str, args: &[S]) -> Run {
    let mut c = Command::new(program);
    c.args(args).current_dir(&bank.scratch).stdin(Stdio::null());
    run_cmd(c)
}

/// An image of `size` bytes: pseudo-random data in the `data` ranges, zeros elsewhere.
fn image(size: usize, data: &[(usize, usize)], seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut rng = Rng::new(seed);
    for &(a, b) in data {
        rng.fill(&mut v[a..b]);
    }
    v
}

/// Writes `img` to `path` sparsely: only its non-zero 4 KiB blocks are written, so tools
/// that look for holes in the file (nbdcopy, qemu-img) see them.
fn write_sparse(path: &Path, img: &[u8]) {
    let f = fs::File::create(path).unwrap();
    f.set_len(img.len() as u64).unwrap();
    for (i, block) in img.chunks(4 * KIB).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * 4 * KIB) as u64).unwrap();
        }
    }
}

/// Writes `img` to a scratch file and imports it; returns (version id, image path).
fn import(bank: &Bank, machine: &str, img: &[u8], extra: &[&str]) -> (String, PathBuf) {
    let path = bank.file(&format!("image-{}.raw", unique()));
    write_sparse(&path, img);
    let j = bank.import(machine, &path, extra);
    (j["version"].as_str().expect("version").to_string(), path)
}

/// `mbank export` of `reference`, as bytes (the file is removed).
fn export(bank: &Bank, reference: &str) -> Vec<u8> {
    let out = bank.file(&format!("export-{}.raw", unique()));
    let got = bank.export(reference, &out);
    fs::remove_file(&out).unwrap();
    got
}

/// `log --json` entry of `version`.
fn log_entry(bank: &Bank, machine: &str, version: &str) -> Value {
    bank.log(machine)
        .into_iter()
        .find(|v| v["version"] == version)
        .unwrap_or_else(|| panic!("{version} is not in the log of {machine}"))
}

fn apply(img: &mut [u8], off: usize, data: &[u8]) {
    img[off..off + data.len()].copy_from_slice(data);
}

/// The session directories left in a station cache.
fn sessions(cache: &Path) -> Vec<PathBuf> {
    match fs::read_dir(cache.join("sessions")) {
        Ok(d) => d.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// What `recover --json` prints when there is nothing to recover.
fn nothing_recovered() -> Value {
    serde_json::json!({"recovered": [], "problems": []})
}

/// `mbank --cache CACHE recover --json`.
fn recover(bank: &Bank, cache: &Path) -> Run {
    bank.run(&[
        OsStr::new("--cache"),
        cache.as_os_str(),
        OsStr::new("recover"),
        OsStr::new("--json"),
    ])
}

/// The JSON an attach printed at the end of its session.
fn report(r: &Run) -> Value {
    r.json()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// A Python script for nbdsh, built from writes, flushes and reads whose data go
/// through files in the scratch directory.
struct Script {
    dir: PathBuf,
    lines: Vec<String>,
}

const PRELUDE: &str = r#"
import sys
def put(off, path, flags):
    d = open(path, 'rb').read()
    for o in range(0, len(d), 4 << 20):
        h.pwrite(d[o:o + (4 << 20)], off + o, flags)
def expect(off, path):
    d = open(path, 'rb').read()
    for o in range(0, len(d), 4 << 20):
        want = d[o:o + (4 << 20)]
        if h.pread(len(want), off + o) != want:
            raise Exception('the read at %d does not return what was expected' % (off + o))
"#;

impl Script {
    fn new(bank: &Bank) -> Script {
        let dir = bank.file(&format!("nbdsh-{}", unique()));
        fs::create_dir(&dir).unwrap();
        Script {
            dir,
            lines: Vec::new(),
        }
    }

    fn file(&self, data: &[u8]) -> String {
        let p = self.dir.join(format!("d{}", unique()));
        fs::write(&p, data).unwrap();
        format!("{:?}", p.display().to_string())
    }

    /// A write (FUA when `fua`).
    fn write(&mut self, off: usize, data: &[u8], fua: bool) -> &mut Self {
        let f = self.file(data);
        let flags = if fua { "nbd.CMD_FLAG_FUA" } else { "0" };
        self.lines.push(format!("put({off}, {f}, {flags})"));
        self
    }

    fn flush(&mut self) -> &mut Self {
        self.lines.push("h.flush()".into());
        self
    }

    /// A read that must return `data`.
    fn expect(&mut self, off: usize, data: &[u8]) -> &mut Self {
        let f = self.file(data);
        self.lines.push(format!("expect({off}, {f})"));
        self
    }

    fn line(&mut self, l: &str) -> &mut Self {
        self.lines.push(l.to_string());
        self
    }

    fn text(&self) -> String {
        format!("{PRELUDE}\n{}\n", self.lines.join("\n"))
    }

    /// Runs the script to completion; it must succeed.
    fn run(&self, uri: &str) -> Run {
        nbdsh(uri, &self.text()).ok()
    }
}

/// Extents of `nbdinfo --map`: the hole ranges (merged), checking that the extents
/// cover the whole disk in order.
fn holes(bank: &Bank, uri: &str, size: usize) -> Vec<(usize, usize)> {
    let r = run_tool(bank, "nbdinfo", &["--map", "--json", uri]).ok();
    let map: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json is not JSON ({e}):\n{r}"));
    let mut at = 0;
    let mut out: Vec<(usize, usize)> = Vec::new();
    for e in map.as_array().expect("an array of extents") {
        let (off, len, ty) = (
            u(e, "offset") as usize,
            u(e, "length") as usize,
            u(e, "type"),
        );
        assert_eq!(off, at, "extents must be contiguous: {r}");
        at += len;
        if ty & 1 != 0 {
            match out.last_mut() {
                Some(last) if last.1 == off => last.1 = off + len,
                _ => out.push((off, off + len)),
            }
        }
    }
    assert_eq!(at, size, "extents must cover the disk: {r}");
    out
}

/// qemu-io operations, applied both to the export and to the local image.
enum Op {
    Pattern(usize, usize, u8),
    Zero(usize, usize),
    Discard(usize, usize),
}

impl Op {
    fn write_cmd(&self) -> String {
        match *self {
            Op::Pattern(off, len, p) => format!("write -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) => format!("write -z {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    fn read_cmd(&self) -> String {
        match *self {
            Op::Pattern(off, len, p) => format!("read -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) | Op::Discard(off, len) => format!("read -P 0 {off} {len}"),
        }
    }

    fn apply(&self, img: &mut [u8]) {
        match *self {
            Op::Pattern(off, len, p) => img[off..off + len].fill(p),
            Op::Zero(off, len) | Op::Discard(off, len) => img[off..off + len].fill(0),
        }
    }
}

fn qemu_io(bank: &Bank, uri: &str, cmds: &[String]) -> Run {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(uri.into());
    let r = run_tool(bank, "qemu-io", &args);
    assert!(
        r.success() && !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io failed:\n{r}"
    );
    r
}

// ----------------------------------------------------------------------------------
// 1. Real clients
// ----------------------------------------------------------------------------------

/// nbdinfo, qemu-img compare/convert, nbdcopy, qemu-io and fio against one attach; after
/// SIGINT the printed version is exactly what the clients wrote, and its parent is the
/// version checked out.
#[test]
fn real_nbd_clients_against_attach() {
    need(&[
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
        ("qemu-io", "qemu-utils"),
        ("qemu-img", "qemu-utils"),
        ("fio", "fio"),
    ]);
    let bank = Bank::new();
    // 32 MiB and a partial last chunk of 12 KiB; three runs of zero chunks, one of them
    // starting mid-chunk (10M + 100K: that chunk is data).
    let size = 32 * MIB + 12 * KIB;
    let base_img = image(
        size,
        &[
            (0, 6 * MIB),
            (10 * MIB, 10 * MIB + 100 * KIB),
            (20 * MIB, 28 * MIB),
            (32 * MIB, size),
        ],
        11,
    );
    let (base, base_path) = import(&bank, "alice/dev", &base_img, &[]);
    let cache = bank.file("cache");
    let mut a = bank.attach(&cache, "alice/dev", &[]);
    let uri = a.uri();

    // nbdinfo: the size, and the map: exactly the base's zero chunks are holes.
    let r = run_tool(&bank, "nbdinfo", &["--size", &uri]).ok();
    assert_eq!(r.stdout.trim(), size.to_string(), "{r}");
    assert_eq!(
        holes(&bank, &uri, size),
        vec![
            (6 * MIB, 10 * MIB),
            (10 * MIB + 128 * KIB, 20 * MIB),
            (28 * MIB, 32 * MIB)
        ]
    );

    // Before any write the export is the base image.
    let p = |p: &Path| p.display().to_string();
    run_tool(
        &bank,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &p(&base_path), &uri],
    )
    .ok();
    let converted = bank.file("converted.raw");
    run_tool(
        &bank,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &p(&converted)],
    )
    .ok();
    assert_same_bytes(
        &fs::read(&converted).unwrap(),
        &base_img,
        "qemu-img convert of the export",
    );

    // nbdcopy a different image (sparse: its holes go as zero writes) into the export.
    let new_img = image(
        size,
        &[
            (0, 2 * MIB),
            (8 * MIB, 12 * MIB),
            (12 * MIB + 64 * KIB + 512, 24 * MIB),
            (26 * MIB, size),
        ],
        12,
    );
    let new_path = bank.file("new.raw");
    write_sparse(&new_path, &new_img);
    run_tool(&bank, "nbdcopy", &[p(&new_path), uri.clone()]).ok();
    run_tool(
        &bank,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &p(&new_path), &uri],
    )
    .ok();
    // What the export must hold from now on: the new image, then the writes below.
    let mut expected = new_img.clone();

    // qemu-io: patterns (unaligned, across chunk boundaries, in the partial last chunk),
    // write-zeroes and discard, then read back in another process.
    let ops = [
        Op::Pattern(1000, 3000, 0x5a),
        Op::Pattern(65000, 1000, 0xa5),
        Op::Pattern(3 * MIB + 17, 70000, 0x42),
        Op::Pattern(5 * MIB, 64 * KIB, 0x33),
        Op::Pattern(29 * MIB - 512, 2 * KIB, 0x77),
        Op::Zero(9 * MIB + 4096, 200 * KIB),
        Op::Discard(10 * MIB, 128 * KIB),
        Op::Pattern(32 * MIB + 8 * KIB, 4 * KIB, 0xee),
    ];
    let mut writes: Vec<String> = ops.iter().map(Op::write_cmd).collect();
    writes.push("flush".into());
    qemu_io(&bank, &uri, &writes);
    for op in &ops {
        op.apply(&mut expected);
    }
    qemu_io(
        &bank,
        &uri,
        &ops.iter().map(Op::read_cmd).collect::<Vec<_>>(),
    );
    let expected_path = bank.file("expected.raw");
    fs::write(&expected_path, &expected).unwrap();
    run_tool(
        &bank,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &p(&expected_path),
            &uri,
        ],
    )
    .ok();

    // fio, verifying with crc32c as it goes: random 4K writes over [16M, 18M), and
    // two jobs (two connections) of 8 requests in flight each, of random sizes from
    // 512 bytes to 64K, over [18M, 20M).
    let (fio_off, fio_len) = (16 * MIB, 4 * MIB);
    let fio_jobs = |target: &str, verify_only: bool| -> Vec<Vec<String>> {
        let common = |name: &str| -> Vec<String> {
            let mut v: Vec<String> = vec![
                format!("--name={name}"),
                "--rw=randwrite".into(),
                "--verify=crc32c".into(),
                "--verify_fatal=1".into(),
                "--verify_state_save=0".into(),
                "--randrepeat=1".into(),
                "--randseed=4242".into(),
            ];
            if verify_only {
                v.push(format!("--filename={target}"));
                v.push("--verify_only".into());
            } else {
                v.push("--ioengine=nbd".into());
                v.push(format!("--uri={target}"));
                v.push("--do_verify=1".into());
            }
            v
        };
        let mut small = common("station");
        small.extend([
            "--bs=4k".to_string(),
            format!("--offset={fio_off}"),
            format!("--size={}", 2 * MIB),
        ]);
        let mut parallel = common("parallel");
        parallel.extend([
            "--bsrange=512-64k".to_string(),
            "--numjobs=2".into(),
            "--iodepth=8".into(),
            format!("--offset={}", fio_off + 2 * MIB),
            format!("--offset_increment={MIB}"),
            format!("--size={MIB}"),
        ]);
        vec![small, parallel]
    };
    for job in fio_jobs(&uri, false) {
        run_tool(&bank, "fio", &job).ok();
    }

    // The whole export through qemu-img convert: everything but fio's range is as
    // expected; fio's range is what fio wrote (it verified it): take it as expected.
    run_tool(
        &bank,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, &p(&converted)],
    )
    .ok();
    let live = fs::read(&converted).unwrap();
    assert_eq!(live.len(), size);
    let fio_range = fio_off..fio_off + fio_len;
    for m in fio_range.clone().step_by(MIB) {
        assert_ne!(
            live[m..m + MIB],
            expected[m..m + MIB],
            "fio wrote nothing at {m}?"
        );
    }
    assert_same_bytes(
        &live[..fio_off],
        &expected[..fio_off],
        "export before fio's range",
    );
    assert_same_bytes(
        &live[fio_range.end..],
        &expected[fio_range.end..],
        "export after fio's range",
    );
    expected[fio_range.clone()].copy_from_slice(&live[fio_range]);

    // SIGINT: check in; the version id is printed.
    let r = a.stop().ok();
    let version = r.stdout.trim().to_string();
    assert_eq!(version.len(), 32, "attach must print the version id:\n{r}");
    assert!(sessions(&cache).is_empty(), "the session is gone");
    let got = export(&bank, &format!("alice/dev@{version}"));
    assert_same_bytes(&got, &expected, "export of the checked-in version");
    let exported = bank.file("checked-in.raw");
    fs::write(&exported, &got).unwrap();
    for job in fio_jobs(&p(&exported), true) {
        run_tool(&bank, "fio", &job).ok();
    }
    let e = log_entry(&bank, "alice/dev", &version);
    assert_eq!(
        e["parent"],
        base.as_str(),
        "parent is the version checked out: {e}"
    );
    assert_eq!(e["head"], true, "{e}");
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{base}")),
        &base_img,
        "base",
    );
    bank.verify_ok();
}

// ----------------------------------------------------------------------------------
// 2. Check-in traffic
// ----------------------------------------------------------------------------------

/// Check-in sends only the chunks written; a station with an empty cache fetches only
/// the chunks read, plus the chunks a partial write had to merge with.
#[test]
fn checkin_sends_only_written_chunks_and_fetches_only_what_is_read() {
    need(&[("nbdsh", "python3-libnbd")]);
    let mut bank = Bank::new();
    // What the check-in itself sends: no write-back before it.
    bank.env
        .push(("MBANK_WRITEBACK_MBIT".into(), Some("0".into())));
    let size = 64 * MIB;
    let base_img = image(size, &[(0, size)], 21);
    let (base, _) = import(&bank, "alice/dev", &base_img, &[]);
    let chunks_before = bank.chunk_files();
    assert_eq!(chunks_before.len(), size / CS);

    let cache = bank.file("cache");
    let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
    let mut expected = base_img.clone();
    let mut s = Script::new(&bank);
    // Reads of 3 clean chunks (4 KiB each, at odd offsets): 3 fetches.
    let read_chunks = [100usize, 200, 300];
    for (n, &c) in read_chunks.iter().enumerate() {
        let off = c * CS + 1000 * (n + 1);
        s.expect(off, &base_img[off..off + 4 * KIB]);
    }
    // The same chunk again: a cache hit, no fetch.
    s.expect(100 * CS, &base_img[100 * CS..101 * CS]);
    // 4 KiB writes into N = 5 distinct chunks, one of them twice. The dirty map tracks
    // 4 KiB blocks: a first write that is not block-aligned merges its edge blocks
    // with the base chunk, fetching it (chunks 10, 501 and the last: 3 fetches); an
    // aligned one (chunks 500 and 700) fetches nothing.
    let mut rng = Rng::new(22);
    let written = [10usize, 500, 501, 700, size / CS - 1];
    let mut offs: Vec<usize> = written.iter().map(|&c| c * CS + 512 * (c % 100)).collect();
    offs.push(10 * CS + 60 * KIB);
    for &off in &offs {
        let mut d = vec![0u8; 4 * KIB];
        rng.fill(&mut d);
        s.write(off, &d, false);
        apply(&mut expected, off, &d);
    }
    // Reading a written chunk back: its written blocks from the overlay, the rest from
    // the cache (a hit), no fetch.
    s.expect(10 * CS, &expected[10 * CS..11 * CS]);
    s.run(&a.uri());
    let r = a.stop().ok();
    let j = report(&r);
    let n = written.len() as u64;
    assert_eq!(u(&j, "chunks_written"), n, "{r}");
    // The written chunks, and the working set the session recorded (the 4 chunks read
    // from the base, in one record chunk of 32 + 4 × 48 + 32 bytes).
    assert_eq!(u(&j, "workset_stored"), 4, "{r}");
    assert_eq!(u(&j, "chunks_uploaded"), n + 1, "{r}");
    // Random data is stored raw: 64 KiB and a 16-byte header per chunk.
    let up = u(&j, "bytes_uploaded");
    assert!(
        (n * CS as u64..=n * (CS as u64 + 16) + 256 + 16).contains(&up),
        "bytes_uploaded {up} should be about {n} chunks, not the disk:\n{r}"
    );
    let fetched = read_chunks.len() as u64 + 3;
    assert_eq!(u(&j, "chunks_fetched"), fetched, "{r}");
    assert_eq!(u(&j, "bytes_fetched"), fetched * CS as u64, "{r}");
    assert_eq!(u(&j, "cache_misses"), fetched, "{r}");
    assert_eq!(u(&j, "cache_hits"), 2, "{r}");
    assert_eq!(j["head_moved"], true, "{r}");
    assert_eq!(j["base"], base.as_str(), "{r}");
    // The bank grew by exactly the written chunks and the working set's record.
    let new_chunks = bank.chunk_files().len() - chunks_before.len();
    assert_eq!(new_chunks as u64, n + 1);
    let version = j["version"].as_str().unwrap();
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{version}")),
        &expected,
        "checked-in version",
    );
    assert_eq!(
        log_entry(&bank, "alice/dev", version)["parent"],
        base.as_str()
    );
}

// ----------------------------------------------------------------------------------
// 3. Crashes
// ----------------------------------------------------------------------------------

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < common::ATTACH_TIMEOUT,
            "timed out waiting for {what}"
        );
        sleep(Duration::from_millis(5));
    }
}

/// kill -9 of the attach while a client writes, after it flushed some writes (FLUSH and
/// FUA): the next attach on the station checks the session in first; every flushed
/// write is in that version; unflushed writes are either there or not, never torn.
#[test]
fn sigkill_during_writes_keeps_every_flushed_write() {
    need(&[("nbdsh", "python3-libnbd"), ("qemu-img", "qemu-utils")]);
    let bank = Bank::new();
    let size = 16 * MIB;
    let base_img = image(size, &[(0, 12 * MIB)], 31);
    let (base, _) = import(&bank, "alice/dev", &base_img, &[]);
    let cache = bank.file("cache");
    let mut a = bank.attach(&cache, "alice/dev", &[]);

    let mut expected = base_img.clone();
    let mut rng = Rng::new(32);
    let mut data = |n: usize| {
        let mut d = vec![0u8; n];
        rng.fill(&mut d);
        d
    };
    let mut s = Script::new(&bank);
    // Flushed by FLUSH: a small write, one across three chunks, one in a zero chunk.
    for (off, len) in [
        (3 * CS + 100, 4 * KIB),
        (20 * CS - 5000, 140 * KIB),
        (13 * MIB, 8 * KIB),
    ] {
        let d = data(len);
        s.write(off, &d, false);
        apply(&mut expected, off, &d);
    }
    s.flush();
    // Flushed by FUA (the write itself; no FLUSH follows).
    let d = data(8 * KIB);
    s.write(40 * CS + 4096, &d, true);
    apply(&mut expected, 40 * CS + 4096, &d);
    // Tell the test, then write without flushing until killed: whole chunks 100..110
    // filled with a byte that changes every time.
    let marker = bank.file("flushed");
    s.line(&format!(
        "open({:?}, 'w').close()",
        marker.display().to_string()
    ));
    s.line("i = 0\nwhile True:\n    h.pwrite(bytes([i % 255 + 1]) * 65536, (100 + i % 10) * 65536)\n    i += 1");
    let mut client = common::nbdsh_cmd(&a.uri(), &s.text())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the client's flushed writes", || marker.exists());
    // Let the unflushed writes run a little (no assertion depends on how long).
    sleep(Duration::from_millis(200));
    let r = a.kill9();
    assert_eq!(
        r.code, None,
        "attach must have been killed, not have exited:\n{r}"
    );
    let _ = client.kill();
    let _ = client.wait();
    let left = sessions(&cache);
    assert_eq!(left.len(), 1, "the killed session stays on the station");
    assert!(left[0].join("dirty").is_file(), "its dirty map is on disk");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(base.as_str()));

    // The next attach on this station checks the dead session in, then serves the head:
    // the recovered version.
    let mut b = bank.attach(&cache, "alice/dev", &["--json"]);
    let head = bank.head("alice/dev").unwrap();
    assert_ne!(head, base, "recovery must have made a version");
    let got = export(&bank, &format!("alice/dev@{head}"));
    // Chunks 100..110 were never flushed: each holds either the base or one whole
    // pattern the client wrote (the overlay holds whole chunks), nothing else.
    for c in 100..110 {
        let chunk = &got[c * CS..(c + 1) * CS];
        if chunk != &base_img[c * CS..(c + 1) * CS] {
            assert!(
                chunk[0] != 0 && chunk.iter().all(|&x| x == chunk[0]),
                "unflushed chunk {c} is neither the base nor a whole written pattern"
            );
            expected[c * CS..(c + 1) * CS].copy_from_slice(chunk);
        }
    }
    assert_same_bytes(&got, &expected, "recovered version");
    // The live session on the recovered version reads the same bytes.
    let live = bank.file("live.raw");
    run_tool(
        &bank,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &b.uri(),
            &live.display().to_string(),
        ],
    )
    .ok();
    assert_same_bytes(
        &fs::read(&live).unwrap(),
        &expected,
        "attach of the recovered head",
    );
    let r = b.stop().ok();
    r.stderr_has(&["recovered session of alice/dev checked in"]);
    let j = report(&r);
    assert_eq!(
        j["version"],
        Value::Null,
        "nothing written, no version:\n{r}"
    );
    assert_eq!(j["base"], head.as_str());
    let e = log_entry(&bank, "alice/dev", &head);
    assert_eq!(e["parent"], base.as_str(), "{e}");
    assert_eq!(bank.log("alice/dev").len(), 2);
    assert!(sessions(&cache).is_empty());
    bank.verify_ok();
}

/// The background write-back sends what the guest writes while the session runs; GC
/// running again and again meanwhile deletes none of it (the session's writer protects
/// it); the check-in then sends none of those chunks again, and the version holds every
/// write.
#[test]
fn writeback_racing_gc_loses_nothing_and_checkin_sends_less() {
    need(&[("nbdsh", "python3-libnbd")]);
    let mut bank = Bank::new();
    bank.env
        .push(("MBANK_WRITEBACK_MBIT".into(), Some("1000".into())));
    // No checkpoint stores the chunks instead.
    bank.env
        .push(("MBANK_CHECKPOINT_SECONDS".into(), Some("0".into())));
    let size = 16 * MIB;
    let base_img = image(size, &[(0, 12 * MIB)], 61);
    import(&bank, "alice/dev", &base_img, &[]);
    let before = bank.chunk_files().len();
    let cache = bank.file("cache");
    let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
    let mut expected = base_img.clone();
    let mut rng = Rng::new(62);
    let mut s = Script::new(&bank);
    // 32 whole chunks, and part of one more (merged with its base chunk).
    for (off, len) in [(100 * CS, 32 * CS), (5 * CS + 300, 5000)] {
        let mut d = vec![0u8; len];
        rng.fill(&mut d);
        s.write(off, &d, false);
        apply(&mut expected, off, &d);
    }
    s.flush().run(&a.uri());
    let written = 33;
    wait_for("the write-back of 33 chunks, GC running meanwhile", || {
        bank.run(&["gc"]).ok();
        bank.chunk_files().len() >= before + written
    });
    // Past GC's timestamp margin: without the session's writer, GC would delete them now.
    sleep(Duration::from_millis(1500));
    bank.run(&["gc"]).ok();
    assert_eq!(bank.chunk_files().len(), before + written);
    // Two of them written again: the check-in must not take what the write-back
    // stored for those unless the write-back stored them again.
    let mut s = Script::new(&bank);
    for off in [100 * CS + 10, 131 * CS + 7000] {
        let mut d = vec![0u8; 3000];
        rng.fill(&mut d);
        s.write(off, &d, false);
        apply(&mut expected, off, &d);
    }
    s.flush().run(&a.uri());
    let r = a.stop().ok();
    let j = report(&r);
    assert_eq!(u(&j, "chunks_written"), written as u64, "{j}");
    assert!(
        u(&j["stats"], "written_back_chunks") >= written as u64,
        "{j}"
    );
    // The check-in took what the write-back stored without reading those chunks again
    // (all of them if the write-back also sent the two rewritten ones in time).
    let taken = u(&j, "chunks_written_back");
    assert!(
        (written as u64 - 2..=written as u64).contains(&taken),
        "the check-in takes the written-back chunks as they are: {j}"
    );
    assert_eq!(
        u(&j, "chunks_uploaded"),
        written as u64 - taken,
        "the check-in sends only the rewritten chunks the write-back had not: {j}"
    );
    let v = j["version"].as_str().expect("a version");
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{v}")),
        &expected,
        "check-in after write-back",
    );
    bank.verify_ok();
}

/// The versions of `machine` tagged `checkpoint`, oldest first, once there are `n`.
fn wait_checkpoints(bank: &Bank, machine: &str, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    wait_for(&format!("{n} checkpoints of {machine}"), || {
        let mut log = bank.log(machine);
        log.sort_by_key(|e| e["created_ms"].as_i64());
        found = log
            .iter()
            .filter(|e| {
                e["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == "checkpoint"))
            })
            .map(|e| e["version"].as_str().unwrap().to_string())
            .collect();
        found.len() >= n
    });
    found
}

/// A session commits checkpoints of what the guest flushed while it runs (tagged
/// `checkpoint`, each derived from the one before); after kill -9 of its station,
/// another station with an empty cache takes the machine over with --force from the
/// last checkpoint and reads every write flushed before it. The dead session's
/// recovery, and a live session's check-in, derive from their last checkpoint.
#[test]
fn checkpoint_then_kill9_another_station_takes_over_from_it() {
    need(&[("nbdsh", "python3-libnbd")]);
    let mut bank = Bank::new();
    bank.env
        .push(("MBANK_CHECKPOINT_SECONDS".into(), Some("1".into())));
    let size = 16 * MIB;
    let base_img = image(size, &[(0, 12 * MIB)], 51);
    let (base, _) = import(&bank, "alice/dev", &base_img, &[]);
    let (c1, c2) = (bank.file("station-1"), bank.file("station-2"));
    let mut a = bank.attach(&c1, "alice/dev", &[]);
    let mut rng = Rng::new(52);
    let mut data = |n: usize| {
        let mut d = vec![0u8; n];
        rng.fill(&mut d);
        d
    };

    // Flushed: part of a block, a write across three chunks, one in a zero chunk.
    let mut expected = base_img.clone();
    let mut s = Script::new(&bank);
    for (off, len) in [
        (3 * CS + 100, 4 * KIB),
        (20 * CS - 5000, 140 * KIB),
        (13 * MIB, 8 * KIB),
    ] {
        let d = data(len);
        s.write(off, &d, false);
        apply(&mut expected, off, &d);
    }
    s.flush().run(&a.uri());
    let ck1 = wait_checkpoints(&bank, "alice/dev", 1)[0].clone();
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{ck1}")),
        &expected,
        "first checkpoint",
    );
    let e = log_entry(&bank, "alice/dev", &ck1);
    assert_eq!(e["parent"], base.as_str(), "{e}");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(ck1.as_str()));

    // More writes, over some of the first ones; a FUA write makes them durable.
    let mut s = Script::new(&bank);
    for (off, len) in [(3 * CS, 8 * KIB), (30 * CS + 512, 3 * KIB)] {
        let d = data(len);
        s.write(off, &d, false);
        apply(&mut expected, off, &d);
    }
    let d = data(4 * KIB);
    s.write(40 * CS, &d, true);
    apply(&mut expected, 40 * CS, &d);
    s.run(&a.uri());
    let ck2 = wait_checkpoints(&bank, "alice/dev", 2)[1].clone();
    let e = log_entry(&bank, "alice/dev", &ck2);
    assert_eq!(
        e["parent"],
        ck1.as_str(),
        "the session goes on from its checkpoint: {e}"
    );
    assert_eq!(bank.head("alice/dev").as_deref(), Some(ck2.as_str()));

    let r = a.kill9();
    assert_eq!(r.code, None, "attach must have been killed:\n{r}");

    // Another station, its cache empty, takes over from the last checkpoint.
    let mut b = bank.attach(&c2, "alice/dev", &["--force", "--json"]);
    Script::new(&bank).expect(0, &expected).run(&b.uri());
    let j = report(&b.stop().ok());
    assert_eq!(j["base"], ck2.as_str(), "{j}");
    assert_eq!(
        j["version"],
        Value::Null,
        "nothing written, no version: {j}"
    );

    // The killed session, recovered on its station, derives from its last checkpoint
    // and, the head still there, moves it.
    let r = recover(&bank, &c1).ok();
    let rec = r.json()["recovered"][0]["version"]
        .as_str()
        .unwrap_or_else(|| panic!("a recovered version: {r}"))
        .to_string();
    let e = log_entry(&bank, "alice/dev", &rec);
    assert_eq!(e["parent"], ck2.as_str(), "{e}");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(rec.as_str()));
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{rec}")),
        &expected,
        "recovered session",
    );

    // A live session's check-in derives from its checkpoint and sends only what the
    // checkpoint did not store.
    let mut a = bank.attach(&c1, "alice/dev", &["--json"]);
    let d = data(64 * KIB);
    Script::new(&bank).write(50 * CS, &d, true).run(&a.uri());
    apply(&mut expected, 50 * CS, &d);
    let ck3 = wait_checkpoints(&bank, "alice/dev", 3)[2].clone();
    let d = data(4 * KIB);
    Script::new(&bank).write(60 * CS, &d, true).run(&a.uri());
    apply(&mut expected, 60 * CS, &d);
    let r = a.stop().ok();
    let j = report(&r);
    assert!(u(&j, "checkpoints") >= 1, "{j}");
    let v = j["version"].as_str().expect("a version").to_string();
    let e = log_entry(&bank, "alice/dev", &v);
    let parent = e["parent"].as_str().unwrap().to_string();
    let checkpoints = wait_checkpoints(&bank, "alice/dev", 3);
    assert_eq!(
        Some(&parent),
        checkpoints.last(),
        "the check-in derives from the session's last checkpoint ({ck3} or a later one): {e}"
    );
    assert_eq!(j["head_moved"], true, "{j}");
    assert!(
        u(&j, "chunks_uploaded") < u(&j, "chunks_written"),
        "the chunk the checkpoint stored is not sent again: {j}"
    );
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{v}")),
        &expected,
        "check-in after a checkpoint",
    );
    bank.verify_ok();
}

/// A session's last checkpoint, which its next checkpoint and its check-in derive
/// from, cannot be removed while the session runs (as its base cannot); the one before
/// it can. The check-in then derives from the last one, with every write.
#[test]
fn a_sessions_last_checkpoint_is_protected_until_it_checks_in() {
    need(&[("nbdsh", "python3-libnbd")]);
    let mut bank = Bank::new();
    bank.env
        .push(("MBANK_CHECKPOINT_SECONDS".into(), Some("1".into())));
    let size = 8 * MIB;
    let base_img = image(size, &[(0, 4 * MIB)], 71);
    import(&bank, "alice/dev", &base_img, &[]);
    let c1 = bank.file("station-1");
    let mut a = bank.attach(&c1, "alice/dev", &["--json"]);
    let mut rng = Rng::new(72);
    let mut expected = base_img.clone();
    let mut write = |at: usize| {
        let mut d = vec![0u8; 8 * KIB];
        rng.fill(&mut d);
        Script::new(&bank).write(at, &d, true).run(&a.uri());
        apply(&mut expected, at, &d);
    };
    write(CS);
    let ck1 = wait_checkpoints(&bank, "alice/dev", 1)[0].clone();
    bank.run(&["rm", &format!("alice/dev@{ck1}")])
        .code(1)
        .stderr_has(&["checked out on station", "until the session ends"]);
    write(5 * CS);
    let ck2 = wait_checkpoints(&bank, "alice/dev", 2)[1].clone();
    bank.run(&["rm", &format!("alice/dev@{ck1}")]).ok();
    bank.run(&["rm", &format!("alice/dev@{ck2}")])
        .code(1)
        .stderr_has(&["checked out on station"]);
    let r = a.stop().ok();
    let j = report(&r);
    let v = j["version"].as_str().expect("a version").to_string();
    let e = log_entry(&bank, "alice/dev", &v);
    let last = wait_checkpoints(&bank, "alice/dev", 1);
    assert_eq!(
        Some(&e["parent"].as_str().unwrap().to_string()),
        last.last(),
        "{e}"
    );
    assert_eq!(j["head_moved"], true, "{j}");
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{v}")),
        &expected,
        "check-in after a removed checkpoint",
    );
    // Checked in: the checkpoint is an ordinary version again.
    bank.run(&["rm", &format!("alice/dev@{ck2}")]).ok();
    bank.verify_ok();
}

/// A machine's checkpoint setting in the bank (`set --checkpoint-minutes`) wins over
/// the station's default ($MBANK_CHECKPOINT_SECONDS here): 0 turns its checkpoints off;
/// `default` gives the station's back; `info` shows it. The machine's retention policy
/// runs after each checkpoint, as after a check-in.
#[test]
fn a_machines_checkpoint_setting_and_policy_apply_to_its_checkpoints() {
    need(&[("nbdsh", "python3-libnbd")]);
    let mut bank = Bank::new();
    bank.env
        .push(("MBANK_CHECKPOINT_SECONDS".into(), Some("1".into())));
    let size = 8 * MIB;
    let base_img = image(size, &[(0, 4 * MIB)], 61);
    let (base, _) = import(&bank, "alice/dev", &base_img, &[]);
    let c1 = bank.file("station-1");
    let mut rng = Rng::new(62);

    // Off for this machine: no checkpoint, though the station's default is 1 s.
    let r = bank.json(&["set", "alice/dev", "--checkpoint-minutes", "0", "--json"]);
    assert_eq!(r["version"], Value::Null, "a setting makes no version: {r}");
    assert_eq!(r["settings"]["checkpoint_minutes"], 0, "{r}");
    let info = bank.json(&["info", "alice/dev", "--json"]);
    assert_eq!(info["settings"]["checkpoint_minutes"], 0, "{info}");
    let r = bank.run(&["info", "alice/dev"]).ok();
    assert!(r.stdout.contains("checkpoints none"), "{r}");
    let mut a = bank.attach(&c1, "alice/dev", &["--json"]);
    let mut d = vec![0u8; 8 * KIB];
    rng.fill(&mut d);
    Script::new(&bank).write(0, &d, true).run(&a.uri());
    let r = a.stop().ok();
    r.stderr_has(&["no checkpoints of alice/dev: its setting in the bank"]);
    assert_eq!(u(&report(&r), "checkpoints"), 0, "{r}");

    // Back to the station's default, with a policy that keeps the last 2.
    bank.run(&["set", "alice/dev", "--checkpoint-minutes", "default"])
        .ok()
        .stderr_has(&["checkpoints the station's default"]);
    let info = bank.json(&["info", "alice/dev", "--json"]);
    assert_eq!(info["settings"], serde_json::json!({}), "{info}");
    bank.run(&["forget", "alice/dev", "--keep-last", "2", "--set-policy"])
        .ok();
    let start = bank.head("alice/dev").unwrap();
    let mut a = bank.attach(&c1, "alice/dev", &["--json"]);
    let mut heads = vec![start.clone()];
    for round in 0..4usize {
        rng.fill(&mut d);
        Script::new(&bank).write(round * CS, &d, true).run(&a.uri());
        wait_for("a checkpoint that moves the head", || {
            let h = bank.head("alice/dev").unwrap();
            if h != *heads.last().unwrap() {
                heads.push(h);
                true
            } else {
                false
            }
        });
    }
    // The session's base stays (protected) and the policy keeps the last 2: the
    // checkpoints before them are gone.
    let log: Vec<String> = bank
        .log("alice/dev")
        .iter()
        .map(|e| e["version"].as_str().unwrap().to_string())
        .collect();
    assert!(log.contains(&start), "the session's base is kept: {log:?}");
    assert!(
        log.contains(&heads[4]) && log.contains(&heads[3]),
        "{log:?}"
    );
    assert!(
        !log.contains(&heads[1]) && !log.contains(&heads[2]),
        "the policy ran after the checkpoints: {log:?} (heads {heads:?}, base {base})"
    );
    let r = a.stop().ok();
    assert!(u(&report(&r), "checkpoints") >= 4, "{r}");
    bank.verify_ok();
}

/// kill -9 during check-in (a large dirty set; SIGINT, then SIGKILL once check-in has
/// uploaded part of it): `recover` checks the session in, with every flushed write.
#[test]
fn sigkill_during_checkin_then_recover() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let size = 64 * MIB;
    let base_img = vec![0u8; size];
    let (base, _) = import(&bank, "alice/dev", &base_img, &[]);
    assert!(bank.chunk_files().is_empty());
    let cache = bank.file("cache");
    // One worker, so that check-in of 48 MiB takes a while.
    let mut a = bank.attach(&cache, "alice/dev", &["-j", "1", "--json"]);
    let mut expected = base_img.clone();
    let d = common::random_bytes(48 * MIB, 33);
    let mut s = Script::new(&bank);
    s.write(8 * MIB, &d, false).flush();
    apply(&mut expected, 8 * MIB, &d);
    s.run(&a.uri());

    a.signal(libc::SIGINT);
    let mut ran_on = true;
    // Kill mid-upload: once a quarter of the dirty chunks are written to the store's
    // temp files (they are renamed into place only when the store flushes, just before
    // the version is committed, so a renamed chunk means check-in is nearly done).
    wait_for("check-in to upload a quarter of the chunks", || {
        ran_on = a.running();
        !ran_on || bank.temp_files().len() >= 192 || !bank.chunk_files().is_empty()
    });
    let r = a.kill9();
    assert!(
        ran_on && r.code.is_none(),
        "check-in finished before it could be killed (make the dirty set bigger):\n{r}"
    );
    assert_eq!(sessions(&cache).len(), 1, "the session is left behind");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(base.as_str()));

    let r = recover(&bank, &cache);
    let reports = r.ok().json();
    assert_eq!(reports["problems"], serde_json::json!([]));
    let reports = reports["recovered"]
        .as_array()
        .expect("recover --json lists the sessions recovered");
    assert_eq!(reports.len(), 1, "{reports:?}");
    let j = &reports[0];
    assert_eq!(j["recovered"], true);
    assert_eq!(u(j, "chunks_written"), 48 * MIB as u64 / CS as u64);
    assert_eq!(j["head_moved"], true);
    let version = j["version"].as_str().expect("a version").to_string();
    assert!(sessions(&cache).is_empty(), "recovery removes the session");
    bank.verify_ok();
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{version}")),
        &expected,
        "recovered version",
    );
    assert_eq!(
        log_entry(&bank, "alice/dev", &version)["parent"],
        base.as_str()
    );
    assert_eq!(bank.head("alice/dev").as_deref(), Some(version.as_str()));
    // Nothing is left to recover.
    let again = recover(&bank, &cache);
    assert_eq!(again.ok().json(), nothing_recovered());
}

// ----------------------------------------------------------------------------------
// 4. Two stations and the lease
// ----------------------------------------------------------------------------------

/// A second station is refused, naming the holder; --force takes over; both sessions'
/// writes become versions. The version a live session reads from cannot be removed.
#[test]
fn second_station_is_refused_then_takes_over_with_force() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let size = 16 * MIB;
    let base_img = image(size, &[(0, size)], 41);
    let (base, _) = import(&bank, "alice/dev", &base_img, &[]);
    let (c1, c2) = (bank.file("station-1"), bank.file("station-2"));
    let mut a1 = bank.attach(&c1, "alice/dev", &["--json"]);

    // Another station: refused, exit 1, naming the holder and since when.
    let r = match bank.try_attach(&c2, "alice/dev", &["--json"]) {
        Ok(mut a) => panic!("a second station must be refused:\n{}", a.kill9()),
        Err(r) => r.code(1),
    };
    let holder = fs::canonicalize(&c1).unwrap();
    r.stderr_has(&[
        &holder.display().to_string(),
        "since",
        &format!("pid {}", a1.pid()),
        "--force",
    ]);
    assert!(sessions(&c2).is_empty());
    // The holder's own station: a second attach is refused too, and `recover` leaves
    // the live session alone.
    match bank.try_attach(&c1, "alice/dev", &["--json"]) {
        Ok(mut a) => panic!(
            "a second session on the same station must be refused:\n{}",
            a.kill9()
        ),
        Err(r) => r.code(1).stderr_has(&["since"]),
    };
    assert_eq!(recover(&bank, &c1).ok().json(), nothing_recovered());
    assert_eq!(sessions(&c1).len(), 1);

    // Removing the version the session reads from, or the machine, is refused.
    for what in [format!("alice/dev@{base}"), "alice/dev".to_string()] {
        bank.run(&["rm", &what])
            .code(1)
            .stderr_has(&["checked out", "alice/dev"]);
    }
    assert_eq!(bank.log("alice/dev").len(), 1);

    let mut rng = Rng::new(42);
    let mut x = vec![0u8; 4 * KIB];
    rng.fill(&mut x);
    let mut y = vec![0u8; 4 * KIB];
    rng.fill(&mut y);
    Script::new(&bank)
        .write(5 * CS + 7, &x, false)
        .run(&a1.uri());

    let mut a2 = bank.attach(&c2, "alice/dev", &["--force", "--json"]);
    Script::new(&bank)
        .write(9 * CS, &y, false)
        // The second session reads from the base, not from the first one's overlay.
        .expect(5 * CS + 7, &base_img[5 * CS + 7..5 * CS + 7 + 4 * KIB])
        .run(&a2.uri());
    // The first session still serves its own writes.
    Script::new(&bank).expect(5 * CS + 7, &x).run(&a1.uri());
    // Still refused while the second session lives.
    bank.run(&["rm", &format!("alice/dev@{base}")]).code(1);

    // SIGTERM ends a session like SIGINT.
    a2.signal(libc::SIGTERM);
    let r2 = a2.wait().ok();
    let j2 = report(&r2);
    assert_eq!(j2["head_moved"], true, "{r2}");
    // The displaced first session still reads from the base: removing it is refused
    // although no lease names it any more.
    bank.run(&["rm", &format!("alice/dev@{base}")])
        .code(1)
        .stderr_has(&["checked out", &holder.display().to_string()]);
    let r1 = a1.stop().ok();
    let j1 = report(&r1);
    assert_eq!(
        j1["head_moved"], false,
        "the earlier session lost the race:\n{r1}"
    );
    let (v1, v2) = (
        j1["version"].as_str().expect("first session's version"),
        j2["version"].as_str().expect("second session's version"),
    );
    assert_eq!(bank.head("alice/dev").as_deref(), Some(v2));
    let log = bank.log("alice/dev");
    assert_eq!(log.len(), 3);
    for v in [v1, v2] {
        assert_eq!(log_entry(&bank, "alice/dev", v)["parent"], base.as_str());
    }
    let mut e1 = base_img.clone();
    apply(&mut e1, 5 * CS + 7, &x);
    let mut e2 = base_img.clone();
    apply(&mut e2, 9 * CS, &y);
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{v1}")),
        &e1,
        "first session",
    );
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{v2}")),
        &e2,
        "second session",
    );
    assert!(sessions(&c1).is_empty() && sessions(&c2).is_empty());
    // With no session left, the lease is free: a plain attach from either station works.
    let mut a3 = bank.attach(&c1, "alice/dev", &["--json"]);
    a3.stop().ok();
    bank.verify_ok();
}

// ----------------------------------------------------------------------------------
// 5. Cache bound
// ----------------------------------------------------------------------------------

/// Reading 64 MiB through a station whose cache is bounded to 2 MiB: the cache stays
/// within its bound, and what is read is still right.
#[test]
fn station_cache_stays_within_its_bound() {
    need(&[("nbdcopy", "libnbd-bin")]);
    let bank = Bank::new();
    let size = 64 * MIB;
    let base_img = image(size, &[(0, size)], 51);
    let (_, base_path) = import(&bank, "alice/dev", &base_img, &[]);
    let cache = bank.file("cache");
    let bound = 2 * MIB as u64;
    let mut a = bank.attach(&cache, "alice/dev", &["--cache-size", "2M", "--json"]);
    // The slack: ChunkCache::insert checks the bound only once the bytes added since the
    // last check reach 1/64 of the bound, and the insert that crosses that threshold is
    // one whole chunk, so at most bound/64 + one chunk is ever unchecked. Each check
    // evicts (least recently used first) until the recorded total is within the bound.
    // (Sizes are the files' own: the 256 `xx/` directories are not counted, as the
    // bound is on chunk data.)
    let slack = bound / 64 + CS as u64;
    let chunks_dir = cache.join("chunks");
    run_tool(&bank, "nbdcopy", &[a.uri().as_str(), "null:"]).ok();
    let after_first = common::file_bytes(&chunks_dir);
    assert!(
        after_first <= bound + slack,
        "after reading 64 MiB the cache holds {after_first} bytes, over {bound} + {slack}"
    );
    assert!(after_first > 0, "the cache is used at all");
    // A second read still returns the right bytes.
    let copy = bank.file("copy.raw");
    run_tool(&bank, "nbdcopy", &[a.uri(), copy.display().to_string()]).ok();
    assert_same_bytes(
        &fs::read(&copy).unwrap(),
        &base_img,
        "second read through a small cache",
    );
    let after_second = common::file_bytes(&chunks_dir);
    assert!(
        after_second <= bound + slack,
        "after the second read the cache holds {after_second} bytes, over {bound} + {slack}"
    );
    let r = a.stop().ok();
    let j = report(&r);
    let all = (size / CS) as u64;
    // The second read found almost nothing in the cache: it fetched nearly every chunk
    // again (all but at most what fits in the bound and its slack).
    let kept = (bound + slack) / CS as u64;
    assert!(
        u(&j, "chunks_fetched") >= 2 * all - kept,
        "chunks were evicted, so the second read fetches them again:\n{r}"
    );
    assert_eq!(j["version"], Value::Null);
    let _ = base_path;
}

// ----------------------------------------------------------------------------------
// 6. Cache verification
// ----------------------------------------------------------------------------------

/// A damaged chunk in the station cache is never served: a new attach re-fetches it
/// from the bank, for a read and for the merge of a partial write.
#[test]
fn damaged_cache_chunk_is_fetched_again() {
    need(&[("nbdcopy", "libnbd-bin"), ("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let size = 16 * MIB;
    let base_img = image(size, &[(0, size)], 61);
    let (_, _) = import(&bank, "alice/dev", &base_img, &[]);
    let cache = bank.file("cache");
    // Fill the cache by reading the whole disk.
    let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
    run_tool(&bank, "nbdcopy", &[a.uri().as_str(), "null:"]).ok();
    let j = report(&a.stop().ok());
    assert_eq!(u(&j, "chunks_fetched"), (size / CS) as u64);

    // Which cache file holds which chunk: by content (every chunk is distinct).
    let by_content: HashMap<&[u8], usize> = base_img
        .chunks(CS)
        .enumerate()
        .map(|(i, c)| (c, i))
        .collect();
    let mut files: HashMap<usize, PathBuf> = HashMap::new();
    for d in fs::read_dir(cache.join("chunks")).unwrap().flatten() {
        for f in fs::read_dir(d.path()).unwrap().flatten() {
            if let Some(&i) = by_content.get(&fs::read(f.path()).unwrap()[..]) {
                files.insert(i, f.path());
            }
        }
    }
    assert_eq!(files.len(), size / CS, "every chunk is in the cache");
    // Damage two: one flipped byte (same length), one truncated.
    let (read_c, write_c, clean_c) = (17usize, 99usize, 200usize);
    let mut bad = fs::read(&files[&read_c]).unwrap();
    bad[CS / 2] ^= 0x40;
    fs::write(&files[&read_c], &bad).unwrap();
    fs::write(
        &files[&write_c],
        &base_img[write_c * CS..write_c * CS + CS / 2],
    )
    .unwrap();

    let mut b = bank.attach(&cache, "alice/dev", &["--json"]);
    let mut expected = base_img.clone();
    let w = common::random_bytes(4 * KIB, 62);
    apply(&mut expected, write_c * CS + 1000, &w);
    Script::new(&bank)
        .expect(read_c * CS, &base_img[read_c * CS..(read_c + 1) * CS])
        .write(write_c * CS + 1000, &w, false)
        .expect(write_c * CS, &expected[write_c * CS..(write_c + 1) * CS])
        .expect(clean_c * CS, &base_img[clean_c * CS..(clean_c + 1) * CS])
        .run(&b.uri());
    let r = b.stop().ok();
    let j = report(&r);
    // The two damaged chunks came from the bank; the good one from the cache, and so
    // did the blocks of the written chunk that the write did not cover.
    assert_eq!(u(&j, "chunks_fetched"), 2, "{r}");
    assert_eq!(u(&j, "cache_hits"), 2, "{r}");
    let version = j["version"].as_str().unwrap();
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{version}")),
        &expected,
        "version written over a damaged cache",
    );
    // The cache holds good copies again.
    for c in [read_c, write_c] {
        assert_same_bytes(
            &fs::read(&files[&c]).unwrap(),
            &base_img[c * CS..(c + 1) * CS],
            &format!("cache file of chunk {c}"),
        );
    }
}

// ----------------------------------------------------------------------------------
// 7. One station, two banks
// ----------------------------------------------------------------------------------

/// A station cache is shared by every session on the PC, whatever bank it serves: a
/// crashed session of one bank must not stop attaches to another bank, and is recovered
/// into its own bank.
#[test]
fn crashed_session_of_another_bank_does_not_block_attach() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank_a = Bank::new();
    let bank_b = Bank::new();
    let img_a = image(4 * MIB, &[(0, 4 * MIB)], 71);
    let img_b = image(4 * MIB, &[(0, 4 * MIB)], 72);
    let (base_a, _) = import(&bank_a, "alice/dev", &img_a, &[]);
    let (base_b, _) = import(&bank_b, "alice/dev", &img_b, &[]);
    let cache = bank_a.file("cache");

    let mut a: Attached = bank_a.attach(&cache, "alice/dev", &[]);
    let w = common::random_bytes(4 * KIB, 73);
    Script::new(&bank_a)
        .write(CS, &w, false)
        .flush()
        .run(&a.uri());
    a.kill9();

    // Bank B on the same station: attach works and leaves bank A's session alone.
    let mut b = bank_b.attach(&cache, "alice/dev", &["--json"]);
    let j = report(&b.stop().ok());
    assert_eq!(j["base"], base_b.as_str());
    assert_eq!(
        bank_b.log("alice/dev").len(),
        1,
        "nothing was checked in to bank B"
    );
    assert_eq!(sessions(&cache).len(), 1, "bank A's session is kept");
    let r = recover(&bank_b, &cache);
    assert_eq!(r.ok().json(), nothing_recovered());

    // Bank A recovers it.
    let r = recover(&bank_a, &cache);
    let reports = r.ok().json();
    assert_eq!(
        reports["recovered"].as_array().unwrap().len(),
        1,
        "{reports}"
    );
    let v = reports["recovered"][0]["version"].as_str().unwrap();
    let mut expected = img_a.clone();
    apply(&mut expected, CS, &w);
    assert_same_bytes(
        &export(&bank_a, &format!("alice/dev@{v}")),
        &expected,
        "bank A",
    );
    assert_eq!(
        log_entry(&bank_a, "alice/dev", v)["parent"],
        base_a.as_str()
    );
    assert!(sessions(&cache).is_empty());
}

// ----------------------------------------------------------------------------------
// 8. Older versions, --discard, and a crash before any flush
// ----------------------------------------------------------------------------------

/// `attach --discard` checks nothing in; attaching an older version checks in a version
/// whose parent is that version and leaves the head alone (SIGTERM ends it like
/// SIGINT); a session killed before its first flush recovers to no version, and its
/// lease is released so that another station may attach without --force.
#[test]
fn discard_older_version_and_crash_before_any_flush() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let img1 = image(4 * MIB, &[(0, 4 * MIB)], 81);
    let img2 = image(4 * MIB, &[(0, 4 * MIB)], 82);
    let (v1, _) = import(&bank, "alice/dev", &img1, &[]);
    let (v2, _) = import(&bank, "alice/dev", &img2, &[]);
    let cache = bank.file("cache");
    let w = common::random_bytes(4 * KIB, 83);

    // --discard: the writes are dropped.
    let mut a = bank.attach(&cache, "alice/dev", &["--discard", "--json"]);
    Script::new(&bank)
        .expect(0, &img2[..CS])
        .write(CS, &w, false)
        .flush()
        .run(&a.uri());
    let r = a.stop().ok();
    let j = report(&r);
    assert_eq!(j["version"], Value::Null, "{r}");
    assert_eq!(u(&j, "chunks_written"), 1, "{r}");
    // Its statistics still say what the session did.
    assert!(u(&j, "bytes_fetched") >= CS as u64, "{r}");
    assert!(u(&j, "cache_misses") >= 1, "{r}");
    assert_eq!(bank.log("alice/dev").len(), 2);
    assert!(sessions(&cache).is_empty());

    // An older version: served as it was; nobody moved the head meanwhile, so its
    // check-in moves the head.
    let mut a = bank.attach(&cache, &format!("alice/dev@{v1}"), &["--json"]);
    Script::new(&bank)
        .expect(0, &img1[..CS])
        .write(2 * CS + 10, &w, false)
        .run(&a.uri());
    a.signal(libc::SIGTERM);
    let r = a.wait().ok();
    let j = report(&r);
    assert_eq!(j["head_moved"], true, "{r}");
    let v3 = j["version"].as_str().expect("a version").to_string();
    assert_eq!(log_entry(&bank, "alice/dev", &v3)["parent"], v1.as_str());
    assert_eq!(bank.head("alice/dev").as_deref(), Some(v3.as_str()));
    assert!(log_entry(&bank, "alice/dev", &v2)["version"] == v2.as_str());
    let mut e3 = img1.clone();
    apply(&mut e3, 2 * CS + 10, &w);
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{v3}")),
        &e3,
        "version from v1",
    );

    // Killed before any flush: nothing was promised, nothing is checked in; the lease
    // goes with the session.
    let mut a = bank.attach(&cache, "alice/dev", &[]);
    Script::new(&bank).write(0, &w, false).run(&a.uri());
    a.kill9();
    let r = recover(&bank, &cache).ok();
    let reports = r.json()["recovered"].clone();
    assert_eq!(reports.as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(reports[0]["recovered"], true, "{r}");
    assert_eq!(reports[0]["version"], Value::Null, "{r}");
    assert!(sessions(&cache).is_empty());
    assert_eq!(bank.log("alice/dev").len(), 3);
    let mut b = bank.attach(&bank.file("other-station"), "alice/dev", &["--json"]);
    Script::new(&bank).expect(0, &e3[..CS]).run(&b.uri());
    assert_eq!(report(&b.stop().ok())["version"], Value::Null);
}

/// A session started from an older version (`attach alice/dev@<older>`, a roll back by
/// hand) moves the head at check-in when nobody moved it while it ran; the "kept beside
/// it" message and a version beside the head appear only when someone did.
#[test]
fn a_session_from_an_older_version_moves_the_head_unless_someone_moved_it() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let img1 = image(2 * MIB, &[(0, 2 * MIB)], 91);
    let img2 = image(2 * MIB, &[(0, 2 * MIB)], 92);
    let (v1, _) = import(&bank, "alice/dev", &img1, &[]);
    let (v2, _) = import(&bank, "alice/dev", &img2, &[]);
    let cache = bank.file("cache");
    let w = common::random_bytes(4 * KIB, 93);

    let mut a = bank.attach(&cache, &format!("alice/dev@{v1}"), &["--json"]);
    Script::new(&bank)
        .expect(0, &img1[..CS])
        .write(CS + 7, &w, false)
        .run(&a.uri());
    let r = a.stop().ok();
    let j = report(&r);
    assert_eq!(j["head_moved"], true, "{r}");
    let v3 = j["version"].as_str().expect("a version").to_string();
    assert_eq!(bank.head("alice/dev").as_deref(), Some(v3.as_str()));
    assert_eq!(log_entry(&bank, "alice/dev", &v3)["parent"], v1.as_str());
    assert!(!r.stderr.contains("kept beside"), "{r}");
    assert!(log_entry(&bank, "alice/dev", &v2)["head"] == false);
    let mut e3 = img1.clone();
    apply(&mut e3, CS + 7, &w);
    assert_same_bytes(&export(&bank, "alice/dev"), &e3, "the head after check-in");

    // Someone moves the head while a session from an older version runs: now its
    // version is kept beside the head, and the session says so.
    let mut a = bank.attach(&cache, &format!("alice/dev@{v2}"), &["--json"]);
    Script::new(&bank).write(0, &w, false).run(&a.uri());
    let (v4, _) = import(&bank, "alice/dev", &img1, &[]);
    let r = a.stop().ok();
    let j = report(&r);
    assert_eq!(j["head_moved"], false, "{r}");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(v4.as_str()));
    r.stderr_has(&["another session moved the head first", "kept beside"]);
}

// ----------------------------------------------------------------------------------
// 9. A crashed session whose pid was reused
// ----------------------------------------------------------------------------------

/// After a power loss, pids start again: the pid a dead session recorded may belong to
/// some other live process. The next attach must still recover the session's flushed
/// writes. Simulated by dating the session a minute back and pointing session.json at
/// a live `sleep`, which plainly started after it. A live session whose start time
/// looks wrong (a clock step) must not be taken for dead.
#[test]
fn crashed_session_whose_pid_was_reused_is_recovered() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let img = image(4 * MIB, &[(0, 4 * MIB)], 91);
    let (base, _) = import(&bank, "alice/dev", &img, &[]);
    let cache = bank.file("cache");
    let w = common::random_bytes(4 * KIB, 92);
    let mut a = bank.attach(&cache, "alice/dev", &[]);
    Script::new(&bank)
        .write(CS, &w, false)
        .flush()
        .run(&a.uri());
    let left = sessions(&cache);
    assert_eq!(left.len(), 1);
    let meta_path = left[0].join("session.json");
    let edit_meta = |f: &dyn Fn(&mut Value)| {
        let mut meta: Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
        f(&mut meta);
        fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    };
    // Date the session a minute back (as a clock stepped forward would): its process
    // now looks younger than the session, but it holds the overlay open, so it is alive
    // and `recover` must leave it alone.
    edit_meta(&|m| m["started_ms"] = (m["started_ms"].as_i64().unwrap() - 60_000).into());
    assert_eq!(recover(&bank, &cache).ok().json(), nothing_recovered());
    assert_eq!(sessions(&cache).len(), 1);
    Script::new(&bank).expect(CS, &w).run(&a.uri());
    a.kill9();

    // Now a live process that started after the session has its pid.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let other = Reaped(
        Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = other.0.id();
    edit_meta(&|m| m["pid"] = pid.into());

    let mut b = bank.attach(&cache, "alice/dev", &["--json"]);
    let mut expected = img.clone();
    apply(&mut expected, CS, &w);
    Script::new(&bank)
        .expect(0, &expected[..2 * CS])
        .run(&b.uri());
    let r = b.stop().ok();
    r.stderr_has(&["recovered session of alice/dev"]);
    assert!(sessions(&cache).is_empty());
    let head = bank.head("alice/dev").unwrap();
    assert_eq!(
        log_entry(&bank, "alice/dev", &head)["parent"],
        base.as_str()
    );
    assert_same_bytes(&export(&bank, "alice/dev"), &expected, "recovered version");
}

/// An attach whose socket cannot be bound fails clearly and leaves the machine free.
#[test]
fn failed_bind_releases_the_machine() {
    let bank = Bank::new();
    let size = 4 * MIB;
    let img = image(size, &[(0, size)], 43);
    import(&bank, "alice/dev", &img, &[]);
    // A regular file where the socket should go: the server refuses to replace it.
    let blocker = bank.file("not-a-socket");
    fs::write(&blocker, b"precious").unwrap();
    let mut c = bank.cmd();
    c.arg("--cache")
        .arg(bank.file("station-1"))
        .args(["attach", "alice/dev", "--socket"])
        .arg(&blocker);
    let r = common::run_cmd(c).code(1);
    r.stderr_has(&["released unchanged"]);
    assert_eq!(
        fs::read(&blocker).unwrap(),
        b"precious",
        "the file was left alone"
    );
    // Another station can take the machine at once, without --force.
    let mut a = bank.attach(&bank.file("station-2"), "alice/dev", &["--json"]);
    a.stop();
}

// ----------------------------------------------------------------------------------
// 7. A station under damage: full disks, damaged sessions
// ----------------------------------------------------------------------------------

/// Fills the file system of `dir` with one file, until it is full.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = fs::File::create(&p).unwrap();
    let block = vec![0x5au8; 64 * KIB];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    let _ = f.sync_all();
    p
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

/// Recovery needs no space on the station: with the cache's file system full, a
/// session that wrote parts of many chunks is checked in (its partly written chunks
/// are made whole in memory, not in the overlay), and attach works again after it.
#[test]
fn recovery_on_a_full_station_disk_needs_no_space() {
    need(&[("nbdsh", "python3-libnbd")]);
    let tmpfs = common::Tmpfs::mount("24m");
    let bank = Bank::new();
    let size = 8 * MIB;
    let img = image(size, &[(0, size)], 71);
    let (base, _) = import(&bank, "alice/dev", &img, &[]);
    let cache = tmpfs.dir.join("cache");
    let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
    // One 4 KiB block into each of the 128 chunks: every chunk partly written.
    let mut expected = img.clone();
    let mut s = Script::new(&bank);
    for i in 0..size / CS {
        let block = random_bytes_for(i);
        s.write(i * CS + 8 * KIB, &block, false);
        apply(&mut expected, i * CS + 8 * KIB, &block);
    }
    s.flush().run(&a.uri());
    a.kill9();
    let filler = fill_up(&tmpfs.dir);
    assert!(
        tmpfs.free_bytes() < 64 * KIB as u64,
        "the file system is full"
    );

    let r = recover(&bank, &cache).ok();
    let j = r.json();
    assert_eq!(j["problems"], serde_json::json!([]), "{r}");
    let version = j["recovered"][0]["version"].as_str().expect("a version");
    assert_eq!(u(&j["recovered"][0], "chunks_written"), (size / CS) as u64);
    assert_same_bytes(
        &export(&bank, &format!("alice/dev@{version}")),
        &expected,
        "recovered on a full disk",
    );
    assert_eq!(
        log_entry(&bank, "alice/dev", version)["parent"],
        base.as_str()
    );
    // The space the session held is free again: the machine can be attached.
    fs::remove_file(filler).unwrap();
    let mut b = bank.attach(&cache, "alice/dev", &["--json"]);
    Script::new(&bank).expect(0, &expected[..CS]).run(&b.uri());
    b.stop().ok();
}

fn random_bytes_for(i: usize) -> Vec<u8> {
    common::random_bytes(4 * KIB, 1000 + i as u64)
}

/// A damaged session of one machine does not stop the station: attach of another
/// machine recovers what it can, warns about the damaged one (where it is kept, what
/// to do), and serves; `recover` exits 1 naming it; the kept overlay holds the data.
#[test]
fn a_damaged_session_is_set_aside_and_others_go_on() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let size = 4 * MIB;
    let img = image(size, &[(0, size)], 72);
    import(&bank, "alice/dev", &img, &[]);
    import(&bank, "bob/dev", &img, &[]);
    let cache = bank.file("station");
    let data = common::random_bytes(64 * KIB, 73);
    let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
    Script::new(&bank).write(0, &data, true).run(&a.uri());
    a.kill9();
    // Alice's session loses the end of its dirty map.
    let dirty = sessions(&cache)[0].join("dirty");
    let bytes = fs::read(&dirty).unwrap();
    fs::write(&dirty, &bytes[..bytes.len() - 5]).unwrap();

    // Bob's attach sets Alice's session aside, says so, and serves.
    let mut b = bank.attach(&cache, "bob/dev", &["--json"]);
    Script::new(&bank).write(0, &data, true).run(&b.uri());
    b.kill9()
        .stderr_has(&["alice/dev", "is damaged", "dirty map", "damaged"]);
    // A third machine's attach recovers Bob's session.
    import(&bank, "carol/dev", &img, &[]);
    let mut c = bank.attach(&cache, "carol/dev", &["--json"]);
    Script::new(&bank).expect(0, &img[..CS]).run(&c.uri());
    c.stop().ok().stderr_has(&["recovered session of bob/dev"]);
    let mut want = img.clone();
    apply(&mut want, 0, &data);
    assert_same_bytes(&export(&bank, "bob/dev"), &want, "bob's recovered writes");
    assert_same_bytes(&export(&bank, "alice/dev"), &img, "nothing made of alice's");
    let kept: Vec<PathBuf> = fs::read_dir(cache.join("damaged"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 1);
    let overlay = fs::read(kept[0].join("overlay")).unwrap();
    assert!(
        overlay[..64 * KIB] == data[..],
        "the kept overlay holds the writes"
    );
    assert!(
        fs::read_to_string(kept[0].join("WHY"))
            .unwrap()
            .contains("dirty map")
    );
    // Alice's machine is free again.
    let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
    a.stop().ok();
    // And a damaged session.json is the same: recover reports it and exits 1.
    let mut b = bank.attach(&cache, "bob/dev", &["--json"]);
    Script::new(&bank)
        .write(0, &img[..4 * KIB], true)
        .run(&b.uri());
    b.kill9();
    let s = sessions(&cache);
    fs::write(s[0].join("session.json"), b"{\"format\": 2, \"sess").unwrap();
    let r = recover(&bank, &cache).code(1);
    r.stderr_has(&["is damaged", "session.json", "kept in"]);
    assert!(sessions(&cache).is_empty());
}

/// A guest read that needs a chunk the bank cannot give fails with an I/O error, and
/// attach says so on its standard error, once per chunk, with what to do.
#[test]
fn a_damaged_bank_chunk_read_is_reported_on_stderr() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let img = image(4 * CS, &[(0, 4 * CS)], 74);
    import(&bank, "alice/dev", &img, &[]);
    for id in bank.chunk_files() {
        let p = bank.chunk_path(&id);
        let mut b = fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x20;
        fs::write(&p, &b).unwrap();
    }
    let mut a = bank.attach(&bank.file("station"), "alice/dev", &["--json"]);
    Script::new(&bank)
        .line(
            "for i in range(3):\n    try:\n        h.pread(4096, 0)\n        raise SystemExit('a read of a damaged chunk succeeded')\n    except nbd.Error:\n        pass",
        )
        .run(&a.uri());
    let r = a.stop().ok();
    r.stderr_has(&["alice/dev", "a guest read needs chunk", "mbank verify"]);
    assert_eq!(
        r.stderr.matches("a guest read needs chunk").count(),
        1,
        "once per chunk:\n{r}"
    );
}

/// Attaches go on while `recover` runs in a loop on the same station: a session being
/// made is never taken for a dead one, and no recovery fails.
#[test]
fn attaches_go_on_while_recover_runs_in_a_loop() {
    need(&[("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let img = image(16 * CS, &[(0, 16 * CS)], 75);
    import(&bank, "alice/dev", &img, &[]);
    let cache = bank.file("station");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = 15;
    let recovers = std::thread::scope(|s| {
        let looper = s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = recover(&bank, &cache);
                assert!(r.success(), "a recover beside attaches failed:\n{r}");
                n += 1;
            }
            n
        });
        // The loop stops when the rounds end, also when one fails (a failed round
        // would otherwise wait for the loop forever).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let guard = Stop(&stop);
        for i in 0..rounds {
            let mut a = bank.attach(&cache, "alice/dev", &["--json"]);
            let data = common::random_bytes(4 * KIB, 500 + i);
            Script::new(&bank).write(0, &data, true).run(&a.uri());
            let j = report(&a.stop().ok());
            assert!(j["version"].is_string(), "round {i}: {j}");
        }
        drop(guard);
        looper.join().unwrap()
    });
    assert!(recovers > 0);
    assert_eq!(bank.log("alice/dev").len(), 1 + rounds as usize);
}

/// `attach --read-only`: the export carries NBD_FLAG_READ_ONLY (nbdsh and qemu-io see
/// it), a write the client sends anyway is refused with EPERM, reads give the version's
/// bytes, and the end makes no version and releases the machine.
#[test]
fn read_only_attach_refuses_writes() {
    need(&[("qemu-io", "qemu-utils"), ("nbdsh", "python3-libnbd")]);
    let bank = Bank::new();
    let cache = bank.file("cache");
    let img = image(4 * MIB, &[(0, MIB), (3 * MIB, 4 * MIB)], 71);
    let (v, _) = import(&bank, "alice/ro", &img, &[]);
    let mut a = bank.attach(&cache, "alice/ro", &["--read-only"]);

    // libnbd's strict mode would refuse the write itself; off, the server must.
    let r = nbdsh(
        &a.uri(),
        "import errno\n\
         print('read_only', h.is_read_only())\n\
         h.set_strict_mode(0)\n\
         try:\n    h.pwrite(b'x' * 4096, 4096)\n    print('written')\n\
         except nbd.Error as e:\n    print('refused', e.errno in ('EPERM', errno.EPERM), e)\n\
         try:\n    h.zero(4096, 0)\n    print('zeroed')\n\
         except nbd.Error as e:\n    print('zero refused', e.errno in ('EPERM', errno.EPERM), e)\n\
         print('first', h.pread(16, 0).hex())\n",
    )
    .ok();
    assert!(r.stdout.contains("read_only True"), "{r}");
    assert!(r.stdout.contains("refused True"), "{r}");
    assert!(r.stdout.contains("zero refused True"), "{r}");
    assert!(
        r.stdout.contains(&format!("first {}", hex(&img[..16]))),
        "{r}"
    );

    // qemu-io opened read-write cannot write either; read-only it reads the data.
    let w = run_tool(
        &bank,
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4096", &a.uri()],
    );
    assert!(
        !w.success() || w.stderr.contains("read-only") || w.stdout.contains("failed"),
        "qemu-io wrote to a read-only export:\n{w}"
    );
    let pattern = format!("read -P {:#04x} 0 1", img[0]);
    let r = run_tool(
        &bank,
        "qemu-io",
        &["-r", "-f", "raw", "-c", &pattern, &a.uri()],
    )
    .ok();
    assert!(!r.stdout.contains("failed"), "{r}");

    // `status` shows the session here, and the bank's lease on this station.
    let mut c = bank.cmd();
    c.arg("--cache").arg(&cache).args(["status", "--json"]);
    let st = run_cmd(c).ok().json();
    let s = &st["sessions"][0];
    assert_eq!(s["machine"], "alice/ro", "{st}");
    assert_eq!(s["version"], v.as_str(), "{st}");
    assert_eq!(s["kind"], "attach", "{st}");
    assert_eq!(s["pid"], a.pid(), "{st}");
    let log = bank.log("alice/ro");
    assert_eq!(log[0]["in_use"], true, "{log:?}");
    assert!(log[0]["session"]["station"].is_string(), "{log:?}");
    let l = &st["leased"][0];
    assert_eq!(l["machine"], "alice/ro", "{st}");
    assert_eq!(l["here"], true, "{st}");
    assert_eq!(l["version"], v.as_str(), "{st}");

    let end = a.stop().ok();
    end.stderr_has(&[
        "read-only on nbd+unix",
        "read-only session of alice/ro",
        "released unchanged",
    ]);
    assert_eq!(bank.head("alice/ro").as_deref(), Some(v.as_str()));
    let log = bank.log("alice/ro");
    assert_eq!(log.len(), 1, "a version was made");
    assert_eq!(log[0]["in_use"], false, "{log:?}");
    assert_same_bytes(&export(&bank, "alice/ro"), &img, "the disk after");
    let mut c = bank.cmd();
    c.arg("--cache").arg(&cache).args(["status", "--json"]);
    let st = run_cmd(c).ok().json();
    assert_eq!(st["sessions"], serde_json::json!([]), "{st}");
    assert_eq!(st["leased"], serde_json::json!([]), "{st}");
    // The lease is released: a read-write attach is not refused.
    let mut b = bank.attach(&cache, "alice/ro", &["--discard"]);
    b.stop().ok();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A SIGINT sent the moment attach's socket exists ends the session cleanly: attach
/// listens for signals before it binds the socket. Before, the listeners were set up
/// when the server first polled its shutdown future, after the bind: a signal in
/// between was lost (attach served on, ignoring it, until a second one) or killed the
/// process by the signal's default action (the power-loss test's warm-up attach
/// ending with no exit code).
#[test]
fn a_signal_as_soon_as_the_socket_exists_ends_the_session() {
    let bank = Bank::new();
    let img = image(2 * MIB, &[(0, 2 * MIB)], 77);
    import(&bank, "alice/dev", &img, &[]);
    let cache = bank.file("cache");
    for round in 0..20 {
        let mut a = bank.attach(&cache, "alice/dev", &[]);
        let r = a.stop();
        assert_eq!(r.code, Some(0), "round {round}: {r}");
    }
}
