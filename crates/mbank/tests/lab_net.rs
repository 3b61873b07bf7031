//! The lab network (`scripts/lab-net.sh`, `common/lab.rs`): `mbank serve` in its own
//! network namespace, a station in another behind a link shaped to 100 Mbit/s in both
//! directions, and a disk's round trip through the server across them: import from the
//! station, export to the station, attach on the station and read through NBD. The
//! shaping is checked from the qdiscs' own counters (configured rate, bytes sent,
//! packets held back), never from the clock. Runs as root (CI does).

mod common;
#[path = "common/garage.rs"]
mod garage;
#[path = "common/lab.rs"]
mod lab;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::*;
use lab::{Lab, LabServer, Tbf};

const MIB: usize = 1024 * 1024;
/// 100 Mbit/s in bytes/s, as tc reports a tbf rate.
const RATE_100MBIT: u64 = 100_000_000 / 8;

/// Asserts that `after` sent at least `bytes` more than `before` and held packets back
/// for tokens while doing it (a link without shaping never does).
fn assert_shaped(before: Tbf, after: Tbf, bytes: usize, what: &str) {
    assert!(
        after.bytes - before.bytes >= bytes as u64,
        "{what}: the shaped link sent {} bytes, less than the {bytes} the transfer needs \
         (before {before:?}, after {after:?}): did the traffic go around the lab's link?",
        after.bytes - before.bytes
    );
    assert!(
        after.overlimits > before.overlimits,
        "{what}: tbf held no packet back (before {before:?}, after {after:?}): the link is not shaped"
    );
}

#[test]
fn a_disk_goes_through_the_server_across_a_shaped_link() {
    let lab = Lab::up(1, "100mbit");
    assert_eq!(lab.rate_bit, 100_000_000);
    let (down0, up0) = (lab.download(1), lab.upload(1));
    assert_eq!(down0.rate, RATE_100MBIT, "download shaping: {down0:?}");
    assert_eq!(up0.rate, RATE_100MBIT, "upload shaping: {up0:?}");

    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    let alice = server.login(lab.station(1), "alice", "alice-lab-secret");

    // 8 MiB of random data then an 8 MiB hole: the data crosses the link, the hole not.
    let data = random_bytes(8 * MIB, 12);
    let image = alice.file("disk.raw");
    write_image(&image, &data, 8 * MIB as u64);

    // Import from the station: the chunks go up the station's link.
    let up1 = lab.upload(1);
    let v = alice.import("alice/disk", &image, &[]);
    assert_eq!(
        v["chunks_new"].as_u64(),
        Some(128),
        "64 KiB chunks of data: {v}"
    );
    assert_eq!(v["chunks_zero"].as_u64(), Some(128), "the hole: {v}");
    let up2 = lab.upload(1);
    assert_shaped(up1, up2, data.len(), "import from the station");

    // Export to the station: they come back down, byte for byte.
    let down1 = lab.download(1);
    alice.assert_exports("alice/disk", &image);
    let down2 = lab.download(1);
    assert_shaped(down1, down2, data.len(), "export to the station");

    // Attach on the station with an empty cache, read every byte through NBD.
    let cache = alice.file("cache");
    let mut a = alice.attach(&cache, "alice/disk", &[]);
    let r = common::compare_raw(&image, &a.uri());
    assert!(
        r.success(),
        "the attached disk differs from the image:\n{r}"
    );
    let done = a.stop();
    assert!(done.success(), "attach on the station:\n{done}");
    let down3 = lab.download(1);
    assert_shaped(down2, down3, data.len(), "attach's fetches");
    assert!(
        !server.log().contains("ERROR"),
        "server log:\n{}",
        server.log()
    );
}

/// A pack across the lab: `mbank pack` through the server builds it there, and an
/// export to the station then takes every chunk from it. The disk's chunks are alike
/// (one random block, a few bytes changed in each), which one frame per chunk cannot
/// see and a segment of many can: the export moves a fraction of the bytes, counted by
/// the link's qdisc. A damaged pack is a warning and the export is still whole; a user
/// who may not read the machine gets no segment of its pack.
#[test]
fn an_export_takes_a_packed_version_across_the_lab_in_fewer_bytes() {
    let lab = Lab::up(1, "100mbit");
    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    server.add_user("bob", "bob-lab-secret");
    let alice = server.login(lab.station(1), "alice", "alice-lab-secret");
    let bob = server.login(lab.station(1), "bob", "bob-lab-secret");

    let block = random_bytes(64 << 10, 41);
    let mut data = Vec::with_capacity(4 * MIB);
    for i in 0..64u32 {
        let mut c = block.clone();
        c[(i as usize * 997) % (64 << 10)..][..4].copy_from_slice(&i.to_le_bytes());
        data.extend_from_slice(&c);
    }
    let image = alice.file("alike.raw");
    write_image(&image, &data, 4 * MIB as u64);
    alice.import("alice/alike", &image, &[]);

    // Without a pack: a frame per chunk, each as large as the chunk.
    let out = alice.file("alike.out");
    let export = || {
        alice.json(&[
            "export".as_ref(),
            "--json".as_ref(),
            "--force".as_ref(),
            "alice/alike".as_ref(),
            out.as_os_str(),
        ])
    };
    let d0 = lab.download(1);
    let r = export();
    assert!(r.get("pack").is_none(), "no pack yet: {r}");
    let d1 = lab.download(1);
    let plain_bytes = d1.bytes - d0.bytes;
    assert!(plain_bytes >= data.len() as u64, "{plain_bytes}");

    // `mbank pack` through the server: for administrators (a pack is a second copy of
    // the data that no quota counts).
    let refused = alice.run(&["pack", "alice/alike"]);
    assert!(
        !refused.success() && refused.stderr.contains("administrators"),
        "{refused}"
    );
    let mut c = server.host().cmd();
    c.args([
        "admin",
        "user",
        "add",
        "root",
        "--admin",
        "--password-stdin",
    ]);
    run_with_input(c, b"root-lab-secret\n").ok();
    let root = server.login(lab.station(1), "root", "root-lab-secret");
    let p = root.json(&["pack", "--json", "alice/alike"]);
    assert_eq!(p["chunks"].as_u64(), Some(64), "{p}");
    let version = p["version"].as_str().unwrap().to_string();
    let pack_file = server
        .bank_dir
        .join("packs")
        .join(format!("{version}.pack"));
    assert!(pack_file.exists(), "the server built no pack: {p}");
    assert!(
        p["pack_bytes"].as_u64().unwrap() < p["stored_bytes"].as_u64().unwrap() / 8,
        "alike chunks pack to far less than their frames: {p}"
    );

    let d2 = lab.download(1);
    let r = export();
    let d3 = lab.download(1);
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        &std::fs::read(&image).unwrap(),
        "export from the pack",
    );
    assert_eq!(r["pack"]["chunks"].as_u64(), Some(64), "{r}");
    assert!(r["pack"]["fell_back"].is_null(), "{r}");
    let packed_bytes = d3.bytes - d2.bytes;
    assert!(
        packed_bytes * 4 < plain_bytes,
        "the export from the pack moved {packed_bytes} bytes down the link, against {plain_bytes} without"
    );

    // Bob may not read alice's machine: nor its pack's segments.
    let token = {
        let p = server
            .tmp
            .path()
            .join(format!("config-bob-{}", lab.station(1)))
            .join("mbank/credentials.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        find_token(&v).expect("bob's token")
    };
    for path in ["pack", "pack/0"] {
        let url = format!(
            "{}/v1/machines/alice/alike/versions/{version}/{path}",
            server.url()
        );
        let o = Lab::cmd_in(lab.station(1), "curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&server.ca)
            .args(["-H", &format!("Authorization: Bearer {token}"), &url])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "404",
            "bob's GET {path}"
        );
    }
    let refused = bob.run(&["export", "alice/alike", bob.file("x.raw").to_str().unwrap()]);
    assert!(!refused.success(), "{refused}");

    // A damaged segment: a warning, and the export is whole.
    let mut b = std::fs::read(&pack_file).unwrap();
    let n = b.len();
    b[n - 8] ^= 0x5a;
    std::fs::write(&pack_file, &b).unwrap();
    let run = alice.run(&[
        "export".as_ref(),
        "--force".as_ref(),
        "alice/alike".as_ref(),
        out.as_os_str(),
    ]);
    assert!(run.success(), "{run}");
    assert!(
        run.stderr.contains("pack was not used to the end"),
        "no warning of the damaged pack:\n{run}"
    );
    assert_same_bytes(
        &std::fs::read(&out).unwrap(),
        &std::fs::read(&image).unwrap(),
        "export past a damaged pack",
    );
    assert!(
        !server.log().contains("ERROR"),
        "server log:\n{}",
        server.log()
    );
}

/// The processes in namespace `ns` whose command is `comm`.
fn pids_named(ns: &str, comm: &str) -> Vec<String> {
    let o = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .map(String::from)
        .collect()
}

/// The bank server's chunks on the lab's three-node Garage cluster (`lab-net.sh
/// --store garage`, its nodes in the server's namespace): a disk imported from a station
/// lands in the bucket, not in the bank directory, and comes back down the shaped link
/// byte for byte; the cluster goes down with the lab.
#[test]
fn a_disk_on_the_labs_garage_cluster_goes_through_the_server() {
    garage::require_garage();
    let lab = Lab::up_with(1, "100mbit", "garage");
    let nodes = pids_named(&lab.server_ns, "garage");
    assert_eq!(
        nodes.len(),
        3,
        "three Garage nodes in the server's namespace"
    );
    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    let alice = server.login(lab.station(1), "alice", "alice-lab-secret");
    let data = random_bytes(4 * MIB, 45);
    let image = alice.file("disk.raw");
    write_image(&image, &data, 0);
    let up1 = lab.upload(1);
    let v = alice.import("alice/disk", &image, &[]);
    assert_eq!(v["chunks_new"].as_u64(), Some(64), "{v}");
    assert_shaped(
        up1,
        lab.upload(1),
        data.len(),
        "import to Garage from the station",
    );
    assert!(
        server.host().chunk_files().is_empty(),
        "chunks in the bank directory: they belong in Garage"
    );
    let st = server.host().json(&["stats", "--json"]);
    assert!(st["chunks"].as_u64().unwrap() >= 64, "{st}");
    let down1 = lab.download(1);
    alice.assert_exports("alice/disk", &image);
    assert_shaped(down1, lab.download(1), data.len(), "export from Garage");
    let gdir = std::env::temp_dir().join(format!("{}-garage", lab.name));
    assert!(gdir.is_dir(), "{}", gdir.display());
    drop(server);
    drop(lab);
    // A node that ended may stay a zombie until whoever adopted it reaps it: gone means
    // no /proc entry, or one in state Z.
    let running = |p: &str| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
            st.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
    };
    for p in &nodes {
        assert!(!running(p), "Garage node {p} outlived its lab");
    }
    assert!(!gdir.exists(), "the cluster's directory outlived its lab");
}

#[test]
fn labs_coexist_and_leave_nothing_when_a_test_panics() {
    let mut names = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let a = Lab::up(2, "none");
        let b = Lab::up(1, "1gbit");
        names.push(a.name.clone());
        names.push(b.name.clone());
        assert_eq!(a.namespaces().len(), 4, "switch, server, 2 stations");
        assert_eq!(b.namespaces().len(), 3, "switch, server, 1 station");
        assert_eq!(b.download(1).rate, 1_000_000_000 / 8);
        // The same addresses in both labs: each station reaches its own server.
        assert_eq!(a.server_addr, b.server_addr);
        panic!("a test fails with two labs up");
    }));
    assert!(r.is_err());
    assert_eq!(names.len(), 2);
    for n in &names {
        let left: Vec<_> = lab::namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{n}-")))
            .collect();
        assert!(left.is_empty(), "lab {n} left namespaces behind: {left:?}");
    }
}

#[test]
fn run_mode_tears_the_lab_down_when_its_command_fails_or_is_stopped() {
    require_root("a lab network (network namespaces)");
    let name = format!("mbt{}-900", std::process::id());
    let gone = |what: &str| {
        let left: Vec<_> = lab::namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{name}-")))
            .collect();
        assert!(left.is_empty(), "{what}: namespaces left behind: {left:?}");
    };

    // The command fails: its status comes back, the lab goes.
    let mut c = Command::new(lab::script());
    c.args(["run", "--name", &name, "--profile", "100mbit", "--"]);
    c.args(["sh", "-c", "test -n \"$MBANK_LAB_SERVER_NS\" && exit 7"]);
    let r = run_cmd(c);
    assert_eq!(r.code, Some(7), "{r}");
    gone("after a failing command");

    // The command runs (a process in the server's namespace too) when SIGTERM comes.
    let mut c = Command::new(lab::script());
    c.args(["run", "--name", &name, "--stations", "2", "--"]);
    c.args([
        "sh",
        "-c",
        "ip netns exec \"$MBANK_LAB_SERVER_NS\" sleep 600 & echo up; wait",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "up", "the command did not start");
    assert_eq!(
        lab::namespaces()
            .iter()
            .filter(|ns| ns.starts_with(&format!("{name}-")))
            .count(),
        4
    );
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0, "cannot signal lab-net.sh run");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{out:?}");
    gone("after SIGTERM");
}

// ----------------------------------------------------------------------------------
// Working sets and read-ahead across the lab (issue 12): counts from the sessions'
// statistics (`attach --json`), never times.
// ----------------------------------------------------------------------------------

const CS: usize = 64 * 1024;

/// The files of chunks in a station's cache (names of 64 hex digits, anywhere below).
fn cached_chunks(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().to_string();
        if t.is_dir() {
            n += cached_chunks(&e.path());
        } else if name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit()) {
            n += 1;
        }
    }
    n
}

/// Waits until a station's cache holds `n` chunks (what the session fetched in the
/// background); panics with the attach's output after [`ATTACH_TIMEOUT`].
fn wait_cached(cache: &std::path::Path, n: usize, what: &str, a: &mut Attached) {
    let start = std::time::Instant::now();
    loop {
        let have = cached_chunks(cache);
        if have >= n {
            assert_eq!(have, n, "{what}: the cache holds more chunks than expected");
            return;
        }
        if start.elapsed() > ATTACH_TIMEOUT {
            panic!(
                "{what}: the cache holds {have} chunks, not {n}, after {ATTACH_TIMEOUT:?}:\n{}",
                a.kill9()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Reads `len` bytes at the start of each chunk of `places` through NBD (nbdsh, one
/// connection) and checks them against `image`.
fn read_places(uri: &str, image: &[u8], places: &[usize]) {
    let mut script = String::new();
    for &p in places {
        let len = 4096.min(image.len() - p * CS);
        script.push_str(&format!(
            "assert h.pread({len}, {}) == bytes.fromhex('{}'), 'place {p}'\n",
            p * CS,
            hex(&image[p * CS..p * CS + len])
        ));
    }
    let r = nbdsh(uri, &script);
    assert!(r.success(), "reading through NBD:\n{r}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn stat(report: &serde_json::Value, key: &str) -> u64 {
    report["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("stats.{key} is not a number in {report}"))
}

/// The places a "boot" reads: scattered, out of order, no two adjacent (no read-ahead).
const BOOT: [usize; 12] = [17, 3, 50, 45, 30, 7, 60, 40, 22, 1, 55, 33];

/// A session on station 1 through the server records the chunks its guest read and
/// check-in stores the list with the version; the next session of that version on
/// station 2 (an empty cache) fetches them ahead of the guest, across the shaped link,
/// and the guest then waits on none of them.
#[test]
fn a_working_set_recorded_through_the_server_spares_the_next_cold_station_its_misses() {
    require_tool("nbdsh", "python3-libnbd");
    let lab = Lab::up(2, "100mbit");
    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    let st1 = server.login(lab.station(1), "alice", "alice-lab-secret");
    let st2 = server.login(lab.station(2), "alice", "alice-lab-secret");

    let image = random_bytes(64 * CS, 41);
    let path = st1.file("disk.raw");
    write_image(&path, &image, 0);
    st1.import("alice/dev", &path, &[]);

    // Station 1, an empty cache: the guest reads BOOT, each a miss, and writes one
    // aligned block elsewhere (so that check-in commits a version to store the list with).
    let cache1 = st1.file("cache1");
    let mut a = st1.attach(&cache1, "alice/dev", &["--json"]);
    read_places(&a.uri(), &image, &BOOT);
    let r = nbdsh(
        &a.uri(),
        &format!("h.pwrite(b'\\x01' * 4096, {}); h.flush()", 62 * CS),
    );
    assert!(r.success(), "{r}");
    let first = a.stop().ok();
    let j1 = first.json();
    assert!(j1["version"].is_string(), "{first}");
    assert_eq!(stat(&j1, "misses_waited"), BOOT.len() as u64, "{first}");
    assert_eq!(stat(&j1, "prefetch_hits"), 0, "{first}");
    assert_eq!(stat(&j1, "readahead_chunks"), 0, "{first}");
    assert_eq!(j1["workset_stored"], BOOT.len() as u64, "{first}");

    // Station 2, an empty cache: the list comes down the link before the guest asks.
    let cache2 = st2.file("cache2");
    let down0 = lab.download(2);
    let mut b = st2.attach(&cache2, "alice/dev", &["--json"]);
    wait_cached(&cache2, BOOT.len(), "the working set's replay", &mut b);
    read_places(&b.uri(), &image, &BOOT);
    let second = b.stop().ok();
    let j2 = second.json();
    let down1 = lab.download(2);
    assert_shaped(down0, down1, BOOT.len() * CS, "the replay on station 2");
    assert_eq!(stat(&j2, "workset_queued"), BOOT.len() as u64, "{second}");
    assert_eq!(
        stat(&j2, "prefetched_chunks"),
        BOOT.len() as u64,
        "{second}"
    );
    assert_eq!(stat(&j2, "misses_waited"), 0, "{second}");
    assert_eq!(stat(&j2, "prefetch_hits"), BOOT.len() as u64, "{second}");
    assert_eq!(stat(&j2, "chunks_fetched"), BOOT.len() as u64, "{second}");
    assert_eq!(
        stat(&j2, "bytes_fetched"),
        (BOOT.len() * CS) as u64,
        "{second}"
    );
    assert_eq!(j2["warnings"], serde_json::json!([]), "{second}");
    // Nothing written, and the version has its list: no new version.
    assert!(j2["version"].is_null(), "{second}");
    assert!(!server.log().contains("ERROR"), "{}", server.log());
}

/// Commits, on the bank's host (the library, as a station on that host would), a
/// version of `machine` whose working-set stream holds `record`, with `extra` streams.
/// Returns the ids of the record's chunks.
fn host_commit_record(
    server: &LabServer,
    machine: &str,
    record: &[u8],
    extra: &[(&str, &[u8])],
) -> Vec<mbank_core::ChunkId> {
    use mbank_bank::{ImportOptions, NoProgress};
    use mbank_station::{CheckinExtras, Station, workset};
    let mut bank = mbank_bank::Bank::open(&server.bank_dir, false).unwrap();
    let station = Station::open(&server.tmp.path().join("host-station"), 64 << 20).unwrap();
    let store: std::sync::Arc<dyn mbank_store::ChunkStore> =
        std::sync::Arc::new(mbank_store::LocalStore::open(&server.bank_dir).unwrap());
    let r: mbank_core::MachineRef = machine.parse().unwrap();
    let disk = station.check_out(&mut bank, &r, false, store).unwrap();
    let w = bank.begin_write("test: a crafted working set").unwrap();
    let (idx, _) = bank.store_stream(&w, record).unwrap();
    let ids = idx.runs.iter().filter_map(|r| r.id).collect();
    let mut streams = vec![(workset::STREAM_NAME.to_string(), idx)];
    for (name, bytes) in extra {
        streams.push((name.to_string(), bank.store_stream(&w, *bytes).unwrap().0));
    }
    let extras = CheckinExtras {
        streams,
        always: true,
        ..Default::default()
    };
    let rep = station
        .check_in_with(
            &mut bank,
            &disk,
            &extras,
            &ImportOptions::default(),
            &NoProgress,
        )
        .unwrap();
    assert!(rep.version.is_some(), "{rep:?}");
    drop(w);
    ids
}

/// A published base whose working-set record is truncated, corrupted, gone from the
/// bank, or names a stream chunk gone from the bank; a user forks it and attaches the
/// fork on a station with an empty cache through the server: a warning, never an
/// error, and the disk reads right byte for byte.
#[test]
fn a_damaged_or_stale_working_set_is_a_warning_across_the_lab() {
    use mbank_station::workset::{Entry, WorkingSet};
    require_tool("qemu-img", "qemu-utils");
    let lab = Lab::up(1, "100mbit");
    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    let alice = server.login(lab.station(1), "alice", "alice-lab-secret");
    let host = server.host();
    let image = random_bytes(16 * CS, 43);
    let path = host.file("base.raw");
    write_image(&path, &image, 0);
    host.import("lab/base", &path, &[]);
    host.run(&["admin", "publish", "lab/base"]).ok();

    let kernel: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8 | 1).collect();
    let kid = mbank_core::ChunkId::of(&kernel);
    let good = |places: std::ops::Range<u64>, with_kernel: bool| {
        let mut entries: Vec<Entry> = places
            .map(|place| Entry::Disk {
                place,
                id: mbank_core::ChunkId::of(b"recorded"),
            })
            .collect();
        if with_kernel {
            entries.insert(0, Entry::Stream { id: kid });
        }
        WorkingSet {
            chunk_size: CS as u32,
            entries,
        }
        .encode()
    };
    let truncated = {
        let g = good(0..8, false);
        g[..g.len() - 20].to_vec()
    };
    let corrupted = {
        let mut g = good(0..8, false);
        g[40] ^= 1;
        g
    };
    let host_bank = mbank_bank::Bank::open(&server.bank_dir, true).unwrap();
    /// A case: its name, the record, other streams of the version, the warning.
    type Case<'a> = (&'a str, Vec<u8>, &'a [(&'a str, &'a [u8])], &'a str);
    let cases: [Case; 4] = [
        ("truncated", truncated, &[], "cannot be used"),
        ("corrupted", corrupted, &[], "cannot be used"),
        ("record-gone", good(0..6, false), &[], "cannot be used"),
        (
            "stream-chunk-gone",
            good(2..6, true),
            &[("kernel", &kernel[..])],
            "no longer has",
        ),
    ];
    for (n, (what, record, extra, warning)) in cases.into_iter().enumerate() {
        let record_ids = host_commit_record(&server, "lab/base", &record, extra);
        host.run(&["admin", "publish", "lab/base"]).ok();
        let fork = format!("alice/fork-{what}");
        alice
            .run(&["create", fork.as_str(), "--from", "lab/base"])
            .ok();
        let gone: Vec<mbank_core::ChunkId> = match what {
            "record-gone" => record_ids,
            "stream-chunk-gone" => vec![kid],
            _ => vec![],
        };
        for id in &gone {
            std::fs::remove_file(host_bank.chunk_path(id)).unwrap();
        }
        let cache = alice.file(&format!("cache-{n}"));
        let mut a = alice.attach(&cache, &fork, &["--json"]);
        if what == "stream-chunk-gone" {
            // The list's 4 disk chunks come first, so that the counts below do not
            // depend on whether the replay or the reader gets to them first.
            wait_cached(&cache, 4, "the replay of the list's disk entries", &mut a);
        }
        let r = common::compare_raw(&path, &a.uri());
        assert!(r.success(), "{what}: the disk reads wrong:\n{r}");
        let done = a.stop();
        assert!(done.success(), "{what}: the session failed:\n{done}");
        let j = done.json();
        let said = format!("{}\n{}", done.stderr, j["warnings"]);
        assert!(
            said.contains("warning") || !j["warnings"].as_array().unwrap().is_empty(),
            "{what}: no warning:\n{done}"
        );
        assert!(said.contains(warning), "{what}: no {warning:?}:\n{done}");
        assert_eq!(
            stat(&j, "chunks_fetched"),
            16,
            "{what}: each chunk once:\n{done}"
        );
        if what == "stream-chunk-gone" {
            // The list's disk entries were fetched; its missing stream chunk skipped.
            assert_eq!(stat(&j, "workset_queued"), 5, "{done}");
            assert_eq!(stat(&j, "workset_missing"), 1, "{done}");
            assert_eq!(stat(&j, "prefetched_chunks"), 4, "{done}");
        } else {
            assert_eq!(stat(&j, "workset_queued"), 0, "{what}:\n{done}");
            assert_eq!(stat(&j, "prefetched_chunks"), 0, "{what}:\n{done}");
        }
    }
}

/// Read-ahead through the server on a disk whose last chunk is short: two sequential
/// misses start it, the guest's reads of what it brought widen it, and it stops at the
/// disk's end (each chunk fetched once, no request past the end, no error).
#[test]
fn read_ahead_across_the_lab_stops_at_the_disk_end() {
    require_tool("nbdsh", "python3-libnbd");
    let lab = Lab::up(1, "100mbit");
    let server = LabServer::start(&lab);
    server.add_user("alice", "alice-lab-secret");
    let alice = server.login(lab.station(1), "alice", "alice-lab-secret");
    let n = 8;
    let image = random_bytes(n * CS - CS / 2, 44);
    let path = alice.file("disk.raw");
    write_image(&path, &image, 0);
    alice.import("alice/dev", &path, &[]);

    let cache = alice.file("cache");
    let mut a = alice.attach(&cache, "alice/dev", &["--json"]);
    // Two sequential misses: read-ahead brings the next READAHEAD_MIN (4) chunks.
    read_places(&a.uri(), &image, &[0, 1]);
    wait_cached(&cache, 6, "the first read-ahead", &mut a);
    // The guest reads what it brought: the window widens, up to the disk's end only.
    read_places(&a.uri(), &image, &[2, 3, 4, 5]);
    wait_cached(&cache, n, "read-ahead to the end", &mut a);
    read_places(&a.uri(), &image, &[6, 7]);
    let done = a.stop().ok();
    let j = done.json();
    assert_eq!(stat(&j, "misses_waited"), 2, "{done}");
    assert_eq!(stat(&j, "readahead_chunks"), (n - 2) as u64, "{done}");
    assert_eq!(stat(&j, "prefetch_hits"), (n - 2) as u64, "{done}");
    assert_eq!(stat(&j, "chunks_fetched"), n as u64, "{done}");
    assert_eq!(stat(&j, "bytes_fetched"), image.len() as u64, "{done}");
    assert_eq!(j["warnings"], serde_json::json!([]), "{done}");
    let log = server.log();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "server log:\n{log}"
    );
}
