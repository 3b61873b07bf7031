//! What one user may make a bank keep: the catalog bytes of their commits count toward
//! their quota, every field the catalog stores is capped, writers and leases are
//! capped per user; and a bank and a station cache are private to their owner.
//!
//! The server tests start the real `mbank serve` (plain HTTP on loopback) and speak raw
//! HTTP, so that a request can be exactly what a hostile client sends.
//! `MBANK_TEST_SERVER_BIN` runs the server from another build (to show that these tests
//! fail on a server without the caps).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use mbank_catalog::{Lease, VersionInfo, VersionStats};
use mbank_core::{DiskIndex, MachineName, VersionId};
use mbank_remote::wire;
use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;
const PATIENCE: Duration = Duration::from_secs(60);

const USERS: &[(&str, &str, bool)] = &[
    ("alice", "alice-secret-1", false),
    ("bob", "bob-secret-22", false),
];

struct Server(PlainServer);

impl std::ops::Deref for Server {
    type Target = PlainServer;
    fn deref(&self) -> &PlainServer {
        &self.0
    }
}

impl Server {
    /// A served bank whose users are [`USERS`], alice with quota `alice_quota`.
    fn start(alice_quota: &str) -> Server {
        let quota = |dir: &Path| {
            let mut c = mbank();
            c.arg("--bank")
                .arg(dir)
                .args(["admin", "user", "quota", "alice", alice_quota]);
            run_cmd(c).ok();
        };
        Server(PlainServer::start(USERS, &quota, &[]))
    }

    /// One request on its own connection: (status, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("no answer to {method} {path}: {e}"));
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer to {method} {path}"));
        let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!(
            !head.contains("transfer-encoding: chunked"),
            "these tests read only answers with a length"
        );
        (status, raw[end + 4..].to_vec())
    }

    fn json(&self, method: &str, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let (code, b) = self.request(method, path, Some(token), body.to_string().as_bytes());
        (code, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    fn token(&self, user: &str) -> String {
        let pw = USERS.iter().find(|u| u.0 == user).unwrap().1;
        let body = json!({"user": user, "password": pw}).to_string();
        let (code, b) = self.request("POST", "/v1/login", None, body.as_bytes());
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    fn used(&self, token: &str) -> u64 {
        let (code, b) = self.request("GET", "/v1/whoami", Some(token), b"");
        assert_eq!(code, 200);
        let v: Value = serde_json::from_slice(&b).unwrap();
        v["used"].as_u64().unwrap()
    }

    fn versions(&self, machine: &str) -> usize {
        let bank = mbank_bank::Bank::open(&self.dir, true).unwrap();
        let m: MachineName = machine.parse().unwrap();
        bank.catalog().versions(&m).map_or(0, |v| v.len())
    }
}

/// A version of `machine` with an all-zero disk of `disk_size` bytes (4 KiB chunks, so
/// its index has 32 bytes per 4 KiB of disk) and `config`.
fn version(machine: &str, disk_size: u64, config: Option<String>) -> (VersionInfo, Vec<u8>) {
    let chunk_size = 4096u32;
    let index = DiskIndex {
        chunk_size,
        disk_size,
        chunks: vec![None; disk_size.div_ceil(chunk_size as u64) as usize],
    }
    .to_bytes();
    let info = VersionInfo {
        id: VersionId::random(),
        machine: machine.parse().unwrap(),
        parent: None,
        created_ms: 1,
        disk_size,
        chunk_size,
        stats: VersionStats::default(),
        config,
        streams: vec![],
    };
    (info, index)
}

fn commit_body(info: &VersionInfo, index: &[u8], streams: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let h = wire::CommitHeader {
        info: info.clone(),
        expected_head: None,
        index_len: index.len() as u64,
        streams: streams
            .iter()
            .map(|(n, b)| (n.to_string(), b.len() as u64))
            .collect(),
    };
    let bodies: Vec<Vec<u8>> = streams.iter().map(|(_, b)| b.clone()).collect();
    wire::commit_body(&h, index, &bodies)
}

fn commit(s: &Server, token: &str, info: &VersionInfo, body: &[u8]) -> (u16, Value) {
    let path = format!("/v1/machines/{}/versions", info.machine);
    let (code, b) = s.request("POST", &path, Some(token), body);
    (code, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn lease(machine: &str, session: &str, station_name: &str) -> Value {
    serde_json::to_value(Lease {
        machine: machine.into(),
        session: session.into(),
        station: "station-1".into(),
        station_name: station_name.into(),
        pid: 1,
        base: None,
        started_ms: 1,
        heartbeat_ms: 1,
    })
    .unwrap()
}

#[test]
fn commits_count_toward_the_quota_and_one_over_it_is_refused_whole() {
    let s = Server::start("3M");
    let alice = s.token("alice");
    assert_eq!(s.used(&alice), 0);
    // An empty 128 MiB disk at 4 KiB chunks: a 1 MiB index, and 200 KiB of
    // configuration would be 1.2 MiB; the configuration cap refuses that first.
    let (info, index) = version("alice/big", 128 * MIB, Some("x".repeat(200 << 10)));
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 413, "{v}");
    assert_eq!(v["kind"], "too_large");
    assert_eq!(v["field"], "info.config", "{v}");
    assert!(v["limit"].as_u64().unwrap() < 200 << 10);
    assert_eq!(s.versions("alice/big"), 0);

    let (info, index) = version("alice/big", 128 * MIB, Some("{}".into()));
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 200, "{v}");
    let used = s.used(&alice);
    assert!(
        used >= index.len() as u64,
        "alice's use ({used}) counts her version's {} index bytes",
        index.len()
    );
    // Twice more does not fit in 3 MiB: the third is refused whole.
    let (info, index) = version("alice/big", 128 * MIB, Some("{}".into()));
    let mut info = info;
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 200, "{v}");
    info.id = VersionId::random();
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 507, "{v}");
    assert_eq!(v["kind"], "quota_exceeded");
    assert_eq!(v["user"], "alice");
    assert!(v["need"].as_u64().unwrap() >= index.len() as u64, "{v}");
    assert_eq!(
        s.versions("alice/big"),
        2,
        "the refused version is not kept"
    );
    let before = s.used(&alice);
    assert!(before > 2 * MIB, "{before}");

    // Removing a version gives its catalog bytes back at once.
    let path = format!("/v1/machines/alice/big/versions/{}", {
        let bank = mbank_bank::Bank::open(&s.dir, true).unwrap();
        bank.catalog()
            .versions(&"alice/big".parse().unwrap())
            .unwrap()[1]
            .id
            .to_hex()
    });
    let (code, b) = s.request("DELETE", &path, Some(&alice), b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    assert!(s.used(&alice) < before - MIB);
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 200, "{v}");

    // bob has no quota: the same commit is his to make.
    let bob = s.token("bob");
    let (info, index) = version("bob/big", 128 * MIB, Some("{}".into()));
    let (code, v) = commit(&s, &bob, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 200, "{v}");
    assert!(s.used(&bob) >= index.len() as u64);
}

#[test]
fn fields_over_their_caps_are_refused_naming_the_field() {
    let s = Server::start("none");
    let alice = s.token("alice");
    // A station name of 900 KB.
    let (code, v) = s.json(
        "PUT",
        "/v1/machines/alice/m/lease",
        &alice,
        &json!({"lease": lease("alice/m", "s1", &"n".repeat(900_000)), "replace": null}),
    );
    assert_eq!(code, 413, "{v}");
    assert_eq!(v["field"], "lease.station_name", "{v}");
    let (code, v) = s.json(
        "PUT",
        "/v1/machines/alice/m/lease",
        &alice,
        &json!({"lease": lease("alice/m", "s1", "host:/var/cache/mbank"), "replace": null}),
    );
    assert_eq!(code, 200, "{v}");

    // Statistics (the imported file's name) of 100 KB.
    let (mut info, index) = version("alice/m", MIB, None);
    info.stats.source = "s".repeat(100_000);
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &[]));
    assert_eq!(code, 413, "{v}");
    assert_eq!(v["field"], "info.stats", "{v}");

    // A stream name of 10 KB, and twenty streams.
    let mem = mbank_core::MemoryIndex::default().to_bytes();
    let (info, index) = version("alice/m", MIB, None);
    let long = "k".repeat(10_000);
    let body = commit_body(&info, &index, &[(long.as_str(), mem.clone())]);
    let (code, v) = commit(&s, &alice, &info, &body);
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["field"], "streams", "{v}");
    let names: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let streams: Vec<(&str, Vec<u8>)> = names.iter().map(|n| (n.as_str(), mem.clone())).collect();
    let (code, v) = commit(&s, &alice, &info, &commit_body(&info, &index, &streams));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["field"], "streams", "{v}");
    assert_eq!(s.versions("alice/m"), 0);
    // Within the caps, the same version is kept.
    let body = commit_body(&info, &index, &[("memory", mem)]);
    let (code, v) = commit(&s, &alice, &info, &body);
    assert_eq!(code, 200, "{v}");
}

#[test]
fn writers_and_leases_are_capped_per_user() {
    let s = Server::start("none");
    let alice = s.token("alice");
    let bob = s.token("bob");
    let writer = json!({"pid": 7, "host": "station", "what": "import"});
    let mut ids = Vec::new();
    let refused = (0..100).find_map(|_| {
        let (code, v) = s.json("POST", "/v1/writers", &alice, &writer);
        if code == 200 {
            ids.push(v["id"].as_i64().unwrap());
            None
        } else {
            Some((code, v))
        }
    });
    let (code, v) = refused.expect("a user's writers are capped");
    assert_eq!((code, v["kind"].as_str()), (409, Some("too_many")), "{v}");
    assert_eq!(v["field"], "writers");
    assert_eq!(ids.len() as u64, v["limit"].as_u64().unwrap());
    // Another user is not held back by alice's writers.
    let (code, v) = s.json("POST", "/v1/writers", &bob, &writer);
    assert_eq!(code, 200, "{v}");
    // A writer unregistered, or silent for over 10 minutes (its client died), no
    // longer counts.
    let (code, _) = s.request(
        "DELETE",
        &format!("/v1/writers/{}", ids[0]),
        Some(&alice),
        b"",
    );
    assert_eq!(code, 204);
    let (code, v) = s.json("POST", "/v1/writers", &alice, &writer);
    assert_eq!(code, 200, "{v}");
    let (code, _) = s.json("POST", "/v1/writers", &alice, &writer);
    assert_eq!(code, 409);
    sqlite(
        &s.dir,
        &format!("UPDATE writers SET heartbeat_ms = 0 WHERE id = {}", ids[1]),
    );
    let (code, v) = s.json("POST", "/v1/writers", &alice, &writer);
    assert_eq!(code, 200, "{v}: {}", s.log());

    // Leases on (possibly new) machines: capped per user too.
    let mut taken = 0;
    let refused = (0..100).find_map(|i| {
        let m = format!("alice/m{i}");
        let (code, v) = s.json(
            "PUT",
            &format!("/v1/machines/{m}/lease"),
            &alice,
            &json!({"lease": lease(&m, "s", "host:/cache"), "replace": null}),
        );
        if code == 200 {
            taken += 1;
            None
        } else {
            Some((code, v))
        }
    });
    let (code, v) = refused.expect("a user's leases are capped");
    assert_eq!((code, v["kind"].as_str()), (409, Some("too_many")), "{v}");
    assert_eq!(v["field"], "leases");
    assert_eq!(taken, v["limit"].as_u64().unwrap());
    // Taking a held lease again (a retry) still works; releasing one makes room.
    let again = json!({"lease": lease("alice/m0", "s", "host:/cache"), "replace": null});
    let (code, v) = s.json("PUT", "/v1/machines/alice/m0/lease", &alice, &again);
    assert_eq!(code, 200, "{v}");
    let (code, _) = s.request(
        "DELETE",
        "/v1/machines/alice/m0/lease?session=s",
        Some(&alice),
        b"",
    );
    assert_eq!(code, 200);
    let m = format!("alice/m{taken}");
    let (code, v) = s.json(
        "PUT",
        &format!("/v1/machines/{m}/lease"),
        &alice,
        &json!({"lease": lease(&m, "s", "host:/cache"), "replace": null}),
    );
    assert_eq!(code, 200, "{v}");

    // Takeovers each leave a displaced session behind: capped as well.
    let mut session = "s".to_string();
    let refused = (0..100).find_map(|i| {
        let next = format!("t{i}");
        let (code, v) = s.json(
            "PUT",
            "/v1/machines/alice/m1/lease",
            &alice,
            &json!({"lease": lease("alice/m1", &next, "host:/cache"), "replace": session}),
        );
        if code == 200 {
            session = next;
            None
        } else {
            Some((code, v))
        }
    });
    let (code, v) = refused.expect("displaced sessions are capped");
    assert_eq!((code, v["kind"].as_str()), (409, Some("too_many")), "{v}");
    assert_eq!(v["field"], "displaced sessions");
}

/// Runs one SQL statement on the bank's catalog.
fn sqlite(bank: &Path, stmt: &str) {
    let o = Command::new("sqlite3")
        .arg(bank.join("catalog.db"))
        .arg(stmt)
        .output()
        .expect("sqlite3 (Debian package sqlite3) is installed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Every file and directory under `root` (itself included) that group or others may
/// read, write or enter.
fn open_to_others(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let md = fs::symlink_metadata(&p).unwrap();
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !md.file_type().is_symlink() && !is_socket(&md) {
            out.push(format!("{} {mode:o}", p.display()));
        }
        if md.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn is_socket(md: &fs::Metadata) -> bool {
    std::os::unix::fs::FileTypeExt::is_socket(&md.file_type())
}

#[test]
fn a_bank_and_a_station_cache_are_private_to_their_owner() {
    // The usual umask: what mbank makes must not depend on it.
    // SAFETY: umask(2) only sets this process's file creation mask.
    unsafe { libc::umask(0o022) };
    let bank = Bank::new();
    let img = bank.file("disk.img");
    let data: Vec<u8> = (0..4 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(&img, &data).unwrap();
    bank.import("alice/dev", &img, &[]);
    let mut c = bank.cmd();
    c.args(["admin", "user", "add", "alice", "--password-stdin"]);
    run_with_input(c, b"alice-secret-1\n").ok();
    let cache = bank.file("cache");
    let mut a = bank.attach(&cache, "alice/dev", &[]);
    // Read the disk through the export, so that the cache holds chunks.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read 0 4M"])
        .arg(a.uri())
        .output()
        .expect("qemu-io (Debian package qemu-utils) is installed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    a.stop();
    assert!(bank.path.join("access.db").is_file());
    let open = open_to_others(&bank.path);
    assert!(
        open.is_empty(),
        "open to others in the bank:\n{}",
        open.join("\n")
    );
    let open = open_to_others(&cache);
    assert!(
        open.is_empty(),
        "open to others in the station cache:\n{}",
        open.join("\n")
    );
}

#[test]
fn verify_warns_about_a_bank_open_to_others() {
    let bank = Bank::new();
    fs::set_permissions(&bank.path, fs::Permissions::from_mode(0o755)).unwrap();
    let r = bank.run(&["verify"]).ok();
    r.stderr_has(&["readable by other users", "chmod"]);
    fs::set_permissions(&bank.path, fs::Permissions::from_mode(0o700)).unwrap();
    let r = bank.run(&["verify"]).ok();
    assert!(!r.stderr.contains("readable by other users"), "{r}");
}
