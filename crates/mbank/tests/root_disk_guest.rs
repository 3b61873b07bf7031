//! A real machine booting from a disk in the bank: the test guest's initramfs
//! switches to the Debian 12 root disk from `scripts/build-guest.sh rootdisk`, served
//! by `mbank attach` with an empty station cache. Its systemd boots, the job writes files
//! in /srv/mbank and the machine powers off; the station fetched only the boot's working
//! set, far less than the disk holds, and the checked-in version holds the files.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::process::{Command, Stdio};

use common::Bank;
use guest::{DriveSpec, Guest, ROOT_BOOT_TIMEOUT, ROOT_ON_VDA, SWITCH_ROOT_MARKER, marker};

/// `debugfs -R CMD image`, which must succeed; returns its standard output.
fn debugfs(image: &std::path::Path, cmd: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "debugfs -R {cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn machine_boots_its_own_root_through_attach_with_an_empty_cache() {
    let g = Guest::build();
    let root = guest::root_disk();
    let bank = Bank::new();
    let imported = bank.import("alice/pc", root, &[]);
    let chunk_size = imported["chunk_size"].as_u64().unwrap();
    let data = (imported["chunks_total"].as_u64().unwrap()
        - imported["chunks_zero"].as_u64().unwrap())
        * chunk_size;
    let token = format!("tok-{}", common::unique());

    let cache = bank.file("cache");
    let mut session = bank.attach(&cache, "alice/pc", &["--json", "-q"]);
    let out = g.run_job_ok(
        "write",
        &format!("{ROOT_ON_VDA} mbank.token={token}"),
        DriveSpec::Nbd(session.socket.clone()),
        ROOT_BOOT_TIMEOUT,
    );
    assert!(
        out.has(SWITCH_ROOT_MARKER) && out.has(marker::READY),
        "the disk's system did not boot\n{}",
        out.log()
    );
    let md5 = out.md5("big.bin").expect("the guest printed the md5");
    let report = session.stop().ok().json();

    // Only the boot's working set came from the bank.
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    assert!(fetched > 0, "the boot fetched nothing: {report}");
    assert!(
        fetched < data / 3,
        "the boot fetched {fetched} bytes of the {data} bytes of data on the disk: {report}"
    );

    // The files are in the checked-in version, where the root disk's jobs keep them.
    let version = report["version"].as_str().expect("a new version");
    let exported = bank.file("pc.raw");
    bank.export(&format!("alice/pc@{}", &version[..12]), &exported);
    let hello = debugfs(&exported, "cat /srv/mbank/hello.txt");
    assert_eq!(String::from_utf8_lossy(&hello).trim(), token);
    let big = bank.file("big.bin");
    debugfs(
        &exported,
        &format!("dump /srv/mbank/big.bin {}", big.display()),
    );
    let host_md5 = Command::new("md5sum").arg(&big).output().unwrap();
    let host_md5 = String::from_utf8_lossy(&host_md5.stdout);
    assert_eq!(host_md5.split_whitespace().next(), Some(md5.as_str()));
}
