//! Faults around the command line: a reader of standard output that goes away, a
//! check-in that cannot reach the bank, and a damaged chunk that nothing has read yet.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{Bank, Tmpfs};

/// A pipe whose read end is already closed: a write to the other end fails with EPIPE,
/// as when `mbank log M | head -1` has read its line.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two descriptors, which are then owned here exactly once.
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(r, 0, "pipe failed");
    // SAFETY: fds[0] and fds[1] are fresh descriptors nothing else owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

/// A bank with one machine of two versions, `alice/dev`.
fn small_bank() -> (Bank, PathBuf) {
    let bank = Bank::new();
    let img = bank.file("disk.raw");
    common::write_image(&img, &common::random_bytes(256 << 10, 11), 64 << 10);
    bank.import("alice/dev", &img, &[]);
    let img2 = bank.file("disk2.raw");
    common::write_image(&img2, &common::random_bytes(256 << 10, 12), 64 << 10);
    bank.import("alice/dev", &img2, &[]);
    (bank, img2)
}

#[test]
fn a_closed_standard_output_ends_every_printing_command_quietly() {
    let (bank, _) = small_bank();
    let commands: &[&[&str]] = &[
        &["log", "alice/dev"],
        &["log", "--json", "alice/dev"],
        &["ls"],
        &["ls", "--json"],
        &["stats"],
        &["stats", "--json"],
        &["verify", "--json"],
        &["export", "alice/dev", "-"],
    ];
    for args in commands {
        let mut c = bank.cmd();
        c.arg("-q").args(*args);
        c.stdout(Stdio::from(closed_pipe())).stderr(Stdio::piped());
        let what = format!("{c:?}");
        let o = c
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !stderr.contains("panicked") && o.status.code() != Some(101),
            "{what} panicked on a closed standard output ({:?}):\n{stderr}",
            o.status
        );
        // Like other Unix tools: no message, ended by SIGPIPE (a shell's status 141).
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGPIPE),
            "{what} should end by SIGPIPE, as `cat` does, not {:?}:\n{stderr}",
            o.status
        );
        assert!(
            stderr.is_empty(),
            "{what} printed on standard error:\n{stderr}"
        );
    }
    // The bank is unharmed and the same commands still work on an open pipe.
    bank.verify_ok();
    assert_eq!(bank.log("alice/dev").len(), 2);
}

/// Fills the file system holding `dir` to the last byte with a file in `dir`.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    for block in [1 << 20, 4096, 1] {
        let buf = vec![0x5au8; block];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

#[test]
fn a_failed_check_in_says_where_the_writes_are_and_recover_checks_them_in() {
    common::require_tool("nbdsh", "nbdsh");
    let mnt = Tmpfs::mount("16m");
    let bank = Bank::init_at(&mnt.dir.join("bank"), &mnt.outside);
    let cache = mnt.outside.join("cache");
    let img = bank.file("disk.raw");
    let mut want = common::random_bytes(1 << 20, 21);
    common::write_image(&img, &want, 0);
    bank.import("alice/dev", &img, &[]);

    // The session writes 512 KiB of new data and flushes it to the station.
    let mut a = bank.attach(&cache, "alice/dev", &[]);
    let data = common::random_bytes(512 << 10, 22);
    let data_file = bank.file("data.bin");
    fs::write(&data_file, &data).unwrap();
    let off = 256 << 10;
    common::nbdsh(
        &a.uri(),
        &format!(
            "h.pwrite(open({:?}, 'rb').read(), {off})\nh.flush()",
            data_file.display().to_string()
        ),
    )
    .ok();
    want[off..off + data.len()].copy_from_slice(&data);

    // The bank's disk fills up before the check-in.
    let filler = fill(&mnt.dir);
    let r = a.stop();
    let r = r.failed();
    let sessions: Vec<PathBuf> = fs::read_dir(cache.join("sessions"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(sessions.len(), 1, "the session must be kept:\n{r}");
    let session = sessions[0].display().to_string();
    r.stderr_has(&[
        "check-in of alice/dev failed",
        "no space",
        "writes are kept on this station",
        &session,
        "recover",
        &format!("--cache {}", cache.display()),
    ]);

    // The cause is fixed: recover checks the writes in.
    fs::remove_file(&filler).unwrap();
    let rec = bank
        .run(&[
            OsStr::new("--cache"),
            cache.as_os_str(),
            OsStr::new("recover"),
            OsStr::new("--json"),
        ])
        .ok();
    let reports = rec.json();
    assert_eq!(reports.as_array().map(Vec::len), Some(1), "{rec}");
    assert_eq!(reports[0]["chunks_written"], 8, "{rec}");
    let expected = bank.file("expected.raw");
    fs::write(&expected, &want).unwrap();
    bank.assert_exports("alice/dev", &expected);
    bank.verify_ok();
}

/// Flips one byte in the middle of a chunk file, as a failing disk might.
fn damage(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(path, bytes).unwrap();
}

#[test]
fn import_repair_rewrites_a_damaged_chunk_that_nothing_has_read() {
    let bank = Bank::new();
    let img = bank.file("disk.raw");
    common::write_image(&img, &common::random_bytes(512 << 10, 31), 128 << 10);
    let v = bank.import("alice/dev", &img, &[]);
    let chunk = bank.chunk_files().into_iter().nth(3).unwrap();
    damage(&bank.chunk_path(&chunk));

    let r = bank
        .run(&[
            OsStr::new("import"),
            OsStr::new("--repair"),
            OsStr::new("--json"),
            OsStr::new("alice/dev"),
            img.as_os_str(),
        ])
        .ok();
    let rep = r.json();
    assert_eq!(rep["chunks_repaired"], 1, "{r}");
    assert_eq!(rep["chunks_stored"], 0, "{r}");
    assert!(
        r.stderr.contains("1 damaged and rewritten"),
        "the summary must say what was repaired:\n{r}"
    );
    // A repair makes no version: the history is as it was.
    let log = bank.log("alice/dev");
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["version"], v["version"]);
    bank.verify_ok();
    bank.assert_exports("alice/dev", &img);
}

#[test]
fn damage_messages_name_the_repair_command() {
    let bank = Bank::new();
    let img = bank.file("disk.raw");
    common::write_image(&img, &common::random_bytes(512 << 10, 41), 0);
    bank.import("alice/dev", &img, &[]);
    let chunk = bank.chunk_files().into_iter().next().unwrap();
    damage(&bank.chunk_path(&chunk));

    let out = bank.file("out.raw");
    let r = bank.run(&[
        OsStr::new("export"),
        OsStr::new("alice/dev"),
        out.as_os_str(),
    ]);
    r.failed()
        .stderr_has(&["damaged", "mbank import --repair alice/dev"]);

    let r = bank.run(&["verify"]).code(3);
    r.stderr_has(&["mbank import --repair alice/dev"]);
    // And the command named repairs it.
    bank.run(&[
        OsStr::new("import"),
        OsStr::new("--repair"),
        OsStr::new("alice/dev"),
        img.as_os_str(),
    ])
    .ok();
    bank.verify_ok();
    bank.assert_exports("alice/dev", &img);
}
