//! Power loss on the station, not only kill -9 (DESIGN invariant 4): the station cache
//! (overlay, dirty map, journal, session.json, cache.db, chunk files) lives on the power-fail
//! file system of `mbank-powerfs`, which loses what was not synced when the power is
//! cut. A client writes random blocks over NBD and flushes every few writes; the power
//! is cut after a random number of file system operations (it may land anywhere,
//! inside a flush too); attach is killed; `mbank recover` runs on what survived; the
//! head version must hold every write acknowledged before the last acknowledged flush
//! (or a later write over the same bytes), every acknowledged FUA write, and nothing
//! anywhere that no write and no base put there.
//!
//! In the rounds of even seeds the session folds its journal into a new dirty map at
//! nearly every flush (`MBANK_JOURNAL_COMPACT_BYTES=0`), so cuts land inside
//! compactions as well as inside journal appends.
//!
//! Each round prints its seed; `MBANK_POWER_SEED=<seed> MBANK_POWER_ROUNDS=1` replays
//! one. `MBANK_POWER_ROUNDS` (default 5) sets how many rounds run. Needs root (it
//! mounts a FUSE file system) and nbdsh.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Instant;

use common::{Bank, Rng, nbdsh_cmd, require_root, unique};
use mbank_powerfs::{Metadata, Options, PowerMount};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// The disk: 8 MiB, pseudo-random data in the first 6 MiB, zeros after.
const SIZE: usize = 8 * MIB;
/// Client operations per round.
const OPS: usize = 120;
/// The cut lands after 1..=CUT_RANGE file system operations once the client starts.
/// A round's workload makes about 600 (measured); a cut that did not come by the end
/// of the workload happens then.
const CUT_RANGE: u64 = 700;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Write,
    /// A write with FUA: durable once acknowledged.
    Fua,
    /// NBD WRITE_ZEROES (the station punches a hole).
    Zero,
    Flush,
}

#[derive(Clone, Debug)]
struct Op {
    kind: Kind,
    off: usize,
    data: Vec<u8>,
}

fn plan(rng: &mut Rng) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut until_flush = 1 + rng.below(5);
    while ops.len() < OPS {
        if until_flush == 0 {
            ops.push(Op {
                kind: Kind::Flush,
                off: 0,
                data: Vec::new(),
            });
            until_flush = 1 + rng.below(5);
            continue;
        }
        until_flush -= 1;
        // 4 KiB..64 KiB; a third of them of any length and at any offset.
        let (len, off) = if rng.below(3) == 0 {
            let len = 4 * KIB + rng.below(60 * KIB as u64) as usize;
            (len, rng.below((SIZE - len) as u64) as usize)
        } else {
            let len = 4 * KIB * (1 + rng.below(16) as usize);
            (
                len,
                4 * KIB * rng.below(((SIZE - len) / (4 * KIB)) as u64) as usize,
            )
        };
        let kind = match rng.below(10) {
            0 => Kind::Zero,
            1 => Kind::Fua,
            _ => Kind::Write,
        };
        let mut data = vec![0u8; len];
        if kind != Kind::Zero {
            rng.fill(&mut data);
        }
        ops.push(Op { kind, off, data });
    }
    ops
}

/// The client: runs `ops` in order, one at a time, and logs `ack I` after each one the
/// server acknowledged; stops at the first error.
fn start_client(uri: &str, ops: &[Op], dir: &Path) -> (Child, std::path::PathBuf) {
    let data_path = dir.join("data");
    let log = dir.join("acks");
    let mut blob = Vec::new();
    let mut lines = Vec::new();
    for op in ops {
        let (k, at) = match op.kind {
            Kind::Write => ("w", blob.len()),
            Kind::Fua => ("a", blob.len()),
            Kind::Zero => ("z", 0),
            Kind::Flush => ("f", 0),
        };
        if matches!(op.kind, Kind::Write | Kind::Fua) {
            blob.extend_from_slice(&op.data);
        }
        lines.push(format!("('{k}', {}, {}, {at})", op.off, op.data.len()));
    }
    fs::write(&data_path, &blob).unwrap();
    let script = format!(
        r#"
import nbd
data = open({data:?}, 'rb').read()
ops = [{ops}]
log = open({log:?}, 'w')
for i, (k, off, n, at) in enumerate(ops):
    try:
        if k == 'w':
            h.pwrite(data[at:at + n], off)
        elif k == 'a':
            h.pwrite(data[at:at + n], off, nbd.CMD_FLAG_FUA)
        elif k == 'z':
            h.zero(n, off)
        else:
            h.flush()
    except Exception as e:
        log.write('err %d %s\n' % (i, str(e).replace('\n', ' ')))
        log.flush()
        break
    log.write('ack %d\n' % i)
    log.flush()
"#,
        data = data_path.display().to_string(),
        ops = lines.join(", "),
        log = log.display().to_string(),
    );
    let child = nbdsh_cmd(uri, &script)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run nbdsh: apt-get install python3-libnbd");
    (child, log)
}

/// Waits for the client to end (bounded), killing it past the timeout.
fn wait_client(mut c: Child) {
    let start = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if start.elapsed() > common::ATTACH_TIMEOUT {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// How many operations were acknowledged (they run in order, one at a time).
fn acknowledged(log: &Path) -> (usize, String) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let acked = text
        .lines()
        .filter_map(|l| l.strip_prefix("ack "))
        .filter_map(|n| n.parse::<usize>().ok())
        .map(|n| n + 1)
        .max()
        .unwrap_or(0);
    let err = text
        .lines()
        .find(|l| l.starts_with("err "))
        .unwrap_or("")
        .to_string();
    (acked, err)
}

/// Checks the recovered disk: every byte is what the last write that must be durable
/// (before the last acknowledged flush, or an acknowledged FUA write) put there, or
/// what a later issued write put there; a byte no durable write covers is the base's
/// or some issued write's.
fn check(got: &[u8], base: &[u8], ops: &[Op], acked: usize) -> Result<(), String> {
    if got.len() != base.len() {
        return Err(format!(
            "the disk is {} bytes, not {}",
            got.len(),
            base.len()
        ));
    }
    let last_flush = (0..acked).rev().find(|&i| ops[i].kind == Kind::Flush);
    let issued = (acked + 1).min(ops.len());
    let durable =
        |i: usize| last_flush.is_some_and(|f| i < f) || (i < acked && ops[i].kind == Kind::Fua);
    // floor[b]: the last write that must be durable at byte b.
    let mut floor = vec![usize::MAX; got.len()];
    for (i, op) in ops[..issued].iter().enumerate() {
        if op.kind != Kind::Flush && durable(i) {
            floor[op.off..op.off + op.data.len()].fill(i);
        }
    }
    let mut ok: Vec<bool> = (0..got.len())
        .map(|b| match floor[b] {
            usize::MAX => got[b] == base[b],
            i => got[b] == ops[i].data[b - ops[i].off],
        })
        .collect();
    for (i, op) in ops[..issued].iter().enumerate() {
        for (k, &v) in op.data.iter().enumerate() {
            let b = op.off + k;
            if !ok[b] && (floor[b] == usize::MAX || i > floor[b]) && got[b] == v {
                ok[b] = true;
            }
        }
    }
    let Some(bad) = ok.iter().position(|&x| !x) else {
        return Ok(());
    };
    let count = ok.iter().filter(|&&x| !x).count();
    let covering: Vec<String> = ops[..issued]
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind != Kind::Flush && (o.off..o.off + o.data.len()).contains(&bad))
        .map(|(i, o)| format!("#{i} {:?} {}+{}", o.kind, o.off, o.data.len()))
        .collect();
    Err(format!(
        "{count} bytes are wrong; the first at offset {bad} (chunk {}): it is {}, base {}, \
         the write that must be durable there is {}; writes over it: [{}]; {acked} of {} \
         operations acknowledged, last acknowledged flush #{last_flush:?}",
        bad / (64 * KIB),
        got[bad],
        base[bad],
        match floor[bad] {
            usize::MAX => "none".to_string(),
            i => format!("#{i}"),
        },
        covering.join(", "),
        ops.len()
    ))
}

fn cache_cmd(bank: &Bank, cache: &Path, args: &[&str]) -> common::Run {
    let mut all = vec![OsStr::new("--cache"), cache.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    bank.run(&all)
}

/// Whether the station was used before the session that loses power.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Station {
    /// Used before, and the machine shut down cleanly since: its cache directory,
    /// STATION marker, sessions/ and cache.db are durable.
    UsedBefore,
    /// First use: the session creates the cache directory.
    New,
}

/// One round: a station cache on the power-fail file system, a client, a cut, kill -9,
/// recover from the durable state, check. Returns what went wrong.
fn round(seed: u64, metadata: Metadata, station: Station) -> Result<String, String> {
    let mut rng = Rng::new(seed);
    let mut bank = Bank::new();
    let compact = seed.is_multiple_of(2);
    if compact {
        bank.env
            .push(("MBANK_JOURNAL_COMPACT_BYTES".into(), Some("0".into())));
    }
    let mut base = vec![0u8; SIZE];
    rng.fill(&mut base[..6 * MIB]);
    let image = bank.file("base.raw");
    common::write_image(&image, &base[..6 * MIB], (2 * MIB) as u64);
    let v0 = bank.import("alice/dev", &image, &[])["version"]
        .as_str()
        .unwrap()
        .to_string();

    let mnt = bank.file(&format!("powerfs-{}", unique()));
    fs::create_dir(&mnt).unwrap();
    let fs_ = PowerMount::mount(
        &mnt,
        Options {
            metadata,
            keep_unsynced: Some(seed),
            cut_after: None,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cache = mnt.join("cache");
    if station == Station::UsedBefore {
        let mut a = bank.attach(&cache, "alice/dev", &[]);
        a.stop().ok();
        fs_.sync_all().unwrap();
    }

    let mut a = bank.attach(&cache, "alice/dev", &[]);
    let ops = plan(&mut rng);
    let cut_at = 1 + rng.below(CUT_RANGE);
    let before = fs_.ops();
    fs_.cut_after(cut_at);
    let dir = bank.file(&format!("client-{}", unique()));
    fs::create_dir(&dir).unwrap();
    let (client, log) = start_client(&a.uri(), &ops, &dir);
    wait_client(client);
    let by_itself = fs_.is_cut();
    fs_.cut();
    let made = fs_.ops() - before;
    a.kill9();
    let (acked, err) = acknowledged(&log);
    let durable = bank.file("durable");
    fs::create_dir(&durable).unwrap();
    fs_.dump(&durable).unwrap();
    fs_.unmount().unwrap();
    let what = format!(
        "{} after {made} file system operations; {acked} of {} client operations \
         acknowledged{}",
        if by_itself {
            format!("cut at operation {cut_at}")
        } else {
            format!("no cut by operation {cut_at}: cut at the end")
        },
        ops.len(),
        if err.is_empty() {
            String::new()
        } else {
            format!(" ({err})")
        }
    );

    let r = cache_cmd(&bank, &durable.join("cache"), &["recover", "--json"]);
    if !r.success() {
        return Err(format!("{what}\nrecover failed:\n{r}"));
    }
    let head = bank.head("alice/dev").unwrap();
    let recovered = r.json()["recovered"].as_array().map_or(0, |a| a.len());
    let what = format!(
        "{what}; {recovered} session(s) recovered{}",
        if compact {
            "; compacting at every flush"
        } else {
            ""
        }
    );
    let out = bank.file("head.raw");
    let got = bank.export(&format!("alice/dev@{head}"), &out);
    check(&got, &base, &ops, acked).map_err(|e| {
        let files: Vec<String> = common::all_files(&durable)
            .iter()
            .map(|p| {
                let len = fs::metadata(durable.join(p)).map(|m| m.len()).unwrap_or(0);
                format!("{} ({len} bytes)", p.display())
            })
            .filter(|p| !p.starts_with("cache/chunks/"))
            .collect();
        format!(
            "{what}\nhead {head} (base {v0}); recover said {} {}\nthe durable state: {}\n{e}",
            r.stdout.trim(),
            r.stderr.trim(),
            files.join(", ")
        )
    })?;
    Ok(what)
}

fn rounds(metadata: Metadata, station: Station) {
    require_root("the power-loss test");
    common::require_tool("qemu-img", "qemu-utils");
    let n: u64 = std::env::var("MBANK_POWER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let first = std::env::var("MBANK_POWER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Rng::from_clock("power loss").next_u64() >> 1);
    let mut failures = Vec::new();
    for k in 0..n {
        let seed = first.wrapping_add(k);
        match round(seed, metadata, station) {
            Ok(what) => eprintln!("power loss round, seed {seed} ({metadata:?}): ok, {what}"),
            Err(e) => {
                eprintln!("power loss round, seed {seed} ({metadata:?}): FAILED: {e}");
                failures.push(format!(
                    "seed {seed} (replay: MBANK_POWER_SEED={seed} MBANK_POWER_ROUNDS=1): {e}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} power-loss rounds lost acknowledged data or failed to recover:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Metadata as a journaling file system (ext4, XFS) keeps it: any fsync makes every
/// earlier name durable.
#[test]
fn power_loss_keeps_every_acknowledged_flush_on_a_journaling_fs() {
    rounds(Metadata::Journal, Station::UsedBefore);
}

/// Metadata as POSIX promises it: a name is durable only after its directory's fsync.
#[test]
fn power_loss_keeps_every_acknowledged_flush_with_posix_metadata() {
    rounds(Metadata::Posix, Station::UsedBefore);
}

/// The power goes during a new station's first session.
#[test]
fn power_loss_in_the_first_session_of_a_new_station() {
    rounds(Metadata::Journal, Station::New);
}
