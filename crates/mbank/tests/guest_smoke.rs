//! The guest harness itself: a real Linux guest boots under QEMU TCG, writes to an ext4
//! disk served over NBD (by `qemu-nbd` here; the station tests use `mbank attach`), and
//! reads the same data back from the raw image after the server is gone.

#[path = "common/guest.rs"]
mod guest;

use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use guest::{DEFAULT_TIMEOUT, DriveSpec, Guest, QemuNbd, marker};

#[test]
fn guest_boots_and_powers_off() {
    let out = Guest::build().run_job_ok("ready", "", DriveSpec::None, DEFAULT_TIMEOUT);
    assert!(out.has(marker::READY), "no ready marker\n{}", out.log());
    assert!(
        out.status.is_some_and(|s| s.success()),
        "QEMU did not exit cleanly\n{}",
        out.log()
    );
}

#[test]
fn guest_writes_over_nbd_and_reads_back_from_the_raw_image() {
    let g = Guest::build();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let socket = dir.path().join("nbd.sock");
    guest::make_ext4(&image, 64);

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let token = format!("tok-{}-{nanos}", std::process::id());

    let nbd = QemuNbd::serve(&image, &socket);
    let wrote = g.run_job_ok(
        "write",
        &format!("mbank.token={token} mbank.file=second.txt:other-{token}"),
        nbd.drive(),
        DEFAULT_TIMEOUT,
    );
    nbd.stop();
    let md5 = wrote
        .md5("big.bin")
        .unwrap_or_else(|| panic!("no md5 printed\n{}", wrote.log()));
    assert_eq!(md5.len(), 32, "odd md5 {md5:?}\n{}", wrote.log());

    // The bytes really are in the image: read the file with debugfs on the host.
    let dumped = dir.path().join("big.bin");
    let st = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /big.bin {}", dumped.display()))
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run debugfs");
    assert!(st.success(), "debugfs failed");
    let bytes = std::fs::read(&dumped).unwrap();
    assert_eq!(bytes.len(), 4 << 20);
    let host_md5 = Command::new("md5sum")
        .arg(&dumped)
        .output()
        .expect("run md5sum");
    let host_md5 = String::from_utf8_lossy(&host_md5.stdout);
    assert_eq!(host_md5.split_whitespace().next(), Some(md5.as_str()));

    let checked = g.run_job_ok(
        "check",
        "mbank.file=second.txt:x",
        DriveSpec::Raw(image.clone()),
        DEFAULT_TIMEOUT,
    );
    assert_eq!(
        checked.file_content("hello.txt").as_deref(),
        Some(token.as_str()),
        "{}",
        checked.log()
    );
    assert_eq!(
        checked.file_content("second.txt"),
        Some(format!("other-{token}")),
        "{}",
        checked.log()
    );
    assert_eq!(
        checked.md5("big.bin").as_deref(),
        Some(md5.as_str()),
        "{}",
        checked.log()
    );
}
