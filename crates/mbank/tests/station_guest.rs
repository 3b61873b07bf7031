//! A real Linux guest on a disk served by `mbank attach`: it mounts the ext4 disk,
//! writes files and powers off; after check-in, the new version holds the files, and a
//! second station with an empty cache sees them having fetched far less than the disk.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Bank, mbank};
use guest::{DEFAULT_TIMEOUT, DriveSpec, Guest};
use serde_json::Value;

/// Kills the attach process if the test fails before ending it.
struct Session(Option<Child>);

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `mbank attach` on `socket` with the cache `cache`; returns once it listens.
fn attach(
    bank: &Bank,
    cache: &std::path::Path,
    machine: &str,
    socket: &std::path::Path,
) -> Session {
    let mut session = Session(None);
    let child = mbank()
        .arg("--bank")
        .arg(&bank.path)
        .arg("--cache")
        .arg(cache)
        .args(["-q", "attach", "--json", machine, "--socket"])
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mbank attach");
    let child = session.0.insert(child);
    guest::wait_for_socket(socket, Duration::from_secs(60), child);
    session
}

/// Sends SIGINT and returns the session report.
fn end(mut session: Session) -> Value {
    let child = session.0.take().expect("a running attach");
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "attach failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "attach printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn guest_writes_through_attach_and_another_station_reads_them() {
    let g = Guest::build();
    let bank = Bank::new();
    let image = bank.file("disk.raw");
    guest::make_ext4(&image, 256);
    let v1 = bank.import("alice/dev", &image, &[])["version"]
        .as_str()
        .unwrap()
        .to_string();
    let token = format!("tok-{}", common::unique());

    // Station A: the guest writes a file and powers off; the session checks in.
    let cache_a = bank.file("cache-a");
    let sock_a = bank.file("a.sock");
    let a = attach(&bank, &cache_a, "alice/dev", &sock_a);
    let wrote = g.run_job_ok(
        "write",
        &format!("mbank.token={token}"),
        DriveSpec::Nbd(sock_a.clone()),
        DEFAULT_TIMEOUT,
    );
    let md5 = wrote.md5("big.bin").expect("the guest printed the md5");
    let report = end(a);
    let v2 = report["version"]
        .as_str()
        .expect("a new version")
        .to_string();
    assert_eq!(report["base"].as_str(), Some(v1.as_str()));
    assert!(report["chunks_written"].as_u64().unwrap() > 0);
    let log = bank.log("alice/dev");
    assert_eq!(log[0]["version"].as_str(), Some(v2.as_str()));
    assert_eq!(log[0]["parent"].as_str(), Some(v1.as_str()));

    // The export of the new version holds the files (read by a guest from the raw file).
    let out = bank.file("v2.raw");
    bank.export(&format!("alice/dev@{}", &v2[..8]), &out);
    let check = g.run_job_ok("check", "", DriveSpec::Raw(out.clone()), DEFAULT_TIMEOUT);
    assert_eq!(
        check.file_content("hello.txt").as_deref().map(str::trim),
        Some(token.as_str()),
        "{}",
        check.log()
    );
    assert_eq!(check.md5("big.bin").as_deref(), Some(md5.as_str()));

    // Station B, empty cache: the guest reads the files through attach; B fetches far
    // less than the 256 MiB disk.
    let cache_b = bank.file("cache-b");
    let sock_b = bank.file("b.sock");
    let b = attach(&bank, &cache_b, "alice/dev", &sock_b);
    let check = g.run_job_ok("check", "", DriveSpec::Nbd(sock_b.clone()), DEFAULT_TIMEOUT);
    assert_eq!(
        check.file_content("hello.txt").as_deref().map(str::trim),
        Some(token.as_str()),
        "{}",
        check.log()
    );
    assert_eq!(check.md5("big.bin").as_deref(), Some(md5.as_str()));
    let report = end(b);
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    assert!(fetched > 0, "B must have fetched something: {report}");
    assert!(
        fetched < 64 << 20,
        "B fetched {fetched} bytes of a 256 MiB disk: {report}"
    );
}
