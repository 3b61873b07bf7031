//! The power-fail file system mounted for real (needs root and /dev/fuse): the
//! system calls the station makes reach the model, a cut fails every later call with
//! EIO, and the dump holds exactly what was synced.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use mbank_powerfs::{Metadata, Options, PowerMount};

fn mount(metadata: Metadata) -> (tempfile::TempDir, PowerMount) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test mounts a FUSE file system: run it as root (CI does)"
    );
    let t = tempfile::tempdir().unwrap();
    fs::create_dir(t.path().join("mnt")).unwrap();
    let m = PowerMount::mount(
        &t.path().join("mnt"),
        Options {
            metadata,
            ..Options::default()
        },
    )
    .unwrap();
    (t, m)
}

#[test]
fn synced_writes_survive_a_cut_and_the_rest_do_not() {
    let (t, m) = mount(Metadata::Posix);
    let dir = m.dir().to_path_buf();
    let sessions = dir.join("sessions/s1");
    fs::create_dir_all(&sessions).unwrap();
    // The station's overlay: sparse, written with pwrite, synced with fdatasync.
    let overlay = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(sessions.join("overlay"))
        .unwrap();
    overlay.set_len(1 << 30).unwrap();
    overlay.write_all_at(&[1u8; 70000], 12345).unwrap();
    // Punch a hole: what the station does for zero writes.
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            overlay.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            20000,
            10000,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    overlay.sync_data().unwrap();
    overlay.write_all_at(&[2u8; 4096], 0).unwrap();
    // The dirty map's pattern: temp file, fsync, rename, fsync the directory.
    let mut tmp = File::create(sessions.join("dirty.tmp")).unwrap();
    tmp.write_all(b"map").unwrap();
    tmp.sync_data().unwrap();
    fs::rename(sessions.join("dirty.tmp"), sessions.join("dirty")).unwrap();
    File::open(&sessions).unwrap().sync_all().unwrap();
    // Make the session directory's own names durable up to the root.
    File::open(dir.join("sessions"))
        .unwrap()
        .sync_all()
        .unwrap();
    File::open(&dir).unwrap().sync_all().unwrap();
    // Never synced.
    fs::write(sessions.join("late"), b"lost").unwrap();
    File::open(&sessions).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(sessions.join("dirty")).unwrap(), b"map");

    m.cut();
    let e = overlay.write_all_at(b"x", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        overlay.sync_data().unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    drop(overlay);
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    m.dump(&out).unwrap();
    m.unmount().unwrap();

    let s = out.join("sessions/s1");
    assert_eq!(fs::read(s.join("dirty")).unwrap(), b"map");
    assert_eq!(
        fs::read(s.join("late")).unwrap(),
        b"",
        "named, never synced"
    );
    let o = File::open(s.join("overlay")).unwrap();
    assert_eq!(o.metadata().unwrap().len(), 1 << 30);
    let mut got = vec![0u8; 90000];
    o.read_exact_at(&mut got, 0).unwrap();
    let mut want = vec![0u8; 90000];
    want[12345..12345 + 70000].fill(1);
    want[20000..30000].fill(0);
    assert!(
        got == want,
        "the overlay holds what was synced, not the later write"
    );
    // Sparse: only the written pages take room.
    use std::os::unix::fs::MetadataExt;
    assert!(o.metadata().unwrap().blocks() * 512 < 1 << 20);
}

#[test]
fn posix_metadata_loses_an_unsynced_directory_and_a_journal_keeps_it() {
    for metadata in [Metadata::Posix, Metadata::Journal] {
        let (t, m) = mount(metadata);
        let s = m.dir().join("sessions/s1");
        fs::create_dir_all(&s).unwrap();
        let mut f = File::create(s.join("session.json")).unwrap();
        f.write_all(b"{}").unwrap();
        f.sync_data().unwrap();
        File::open(&s).unwrap().sync_all().unwrap();
        m.cut();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        m.dump(&out).unwrap();
        m.unmount().unwrap();
        let found = fs::read(out.join("sessions/s1/session.json")).ok();
        match metadata {
            Metadata::Posix => assert_eq!(found, None, "sessions/ and s1 were never synced"),
            Metadata::Journal => assert_eq!(found.as_deref(), Some(&b"{}"[..])),
        }
    }
}

#[test]
fn the_binary_cuts_on_sigusr1_and_dumps_the_durable_state() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "run as root: it mounts FUSE");
    let t = tempfile::tempdir().unwrap();
    let (mnt, out) = (t.path().join("mnt"), t.path().join("out"));
    fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbank-powerfs"))
        .arg(&mnt)
        .arg(&out)
        .arg("--journal")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("mounted "), "{first}");
    let mut f = File::create(mnt.join("kept")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" and not").unwrap();
    drop(f);
    // SAFETY: kill(2) on our own child; no memory is involved.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(r, 0, "cannot signal mbank-powerfs");
    let last = lines.next().unwrap().unwrap();
    assert!(last.ends_with("(cut)"), "{last}");
    assert!(child.wait().unwrap().success());
    assert_eq!(fs::read(out.join("kept")).unwrap(), b"synced");
}
