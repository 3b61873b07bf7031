//! Virtual PCs with a real guest under QEMU TCG: `mbank create`, `run`, `suspend`.
//!
//! The guest is the project's test guest (Debian cloud kernel + busybox initramfs,
//! stored in the bank with the machine and booted directly); its disk is a 64 MiB ext4
//! image served by `run` from the bank through the station cache. Jobs are picked per
//! boot with `run --append mbank.job=...`.

mod common;
#[path = "common/guest.rs"]
mod guest;
#[path = "common/running.rs"]
mod running;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Bank;
use guest::DEFAULT_TIMEOUT;
use running::{KillSessions, Running, collect, create_machine_mib, start};
use serde_json::Value;

/// A 64 MiB ext4 machine that boots the test guest's kernel.
fn create_machine(bank: &Bank, name: &str) -> String {
    create_machine_mib(bank, name, 64)
}

/// Runs `job` to its end on `cache`; returns the report. The guest powers off itself.
fn run_job(bank: &Bank, cache: &Path, machine: &str, append: &str) -> (Value, String) {
    let mut r = start(bank, cache, machine, &["--append", append]);
    let (ok, report) = r.wait();
    assert!(
        ok,
        "run failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout(),
        r.stderr()
    );
    let report = report.unwrap_or_else(|| panic!("no JSON report in:\n{}", r.stdout()));
    (report, r.stdout())
}

fn suspend(bank: &Bank, cache: &Path, machine: &str) -> String {
    let mut c = bank.cmd();
    c.arg("--cache").arg(cache).args(["suspend", machine]);
    let r = common::run_cmd(c).ok();
    r.stdout.trim().to_string()
}

fn chunk_set(bank: &Bank) -> BTreeSet<String> {
    bank.chunk_files()
}

#[test]
fn a_file_written_on_one_station_is_there_on_another() {
    let bank = Bank::new();
    let a = bank.file("cacheA");
    let b = bank.file("cacheB");
    create_machine_mib(&bank, "alice/dev", 256);
    let (report, console) = run_job(
        &bank,
        &a,
        "alice/dev",
        "mbank.job=write mbank.token=persisted-on-A mbank.size_mib=2",
    );
    assert!(console.contains("MBANK-JOB-DONE"), "{console}");
    assert_eq!(report["ending"], "poweroff");
    assert_eq!(report["resumed"], false);
    let v = report["session"]["version"].as_str().unwrap().to_string();
    assert_eq!(bank.head("alice/dev").as_deref(), Some(v.as_str()));
    let md5_a = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("MBANK-MD5 big.bin "))
        .unwrap()
        .to_string();

    // Station B, empty cache: the file is there, and B fetched far less than the disk.
    let (report, console) = run_job(&bank, &b, "alice/dev", "mbank.job=check");
    assert!(
        console.contains("MBANK-FILE-BEGIN hello.txt\npersisted-on-A"),
        "{console}"
    );
    assert!(console.contains(&format!("MBANK-MD5 big.bin {md5_a}")));
    let fetched = report["session"]["bytes_fetched"].as_u64().unwrap();
    assert!(fetched > 0);
    // What B fetched: the kernel and initrd (stored with the machine), the file
    // system's metadata and the files read; far less than the disk.
    assert!(
        fetched < (256 << 20) / 4,
        "station B fetched {fetched} bytes of a 256 MiB disk"
    );
    // Mounting wrote a little (the superblock), checked in on top of A's version.
    let log = bank.log("alice/dev");
    assert_eq!(log[0]["parent"], v.as_str());
    assert!(report["session"]["chunks_written"].as_u64().unwrap() < 16);
    bank.verify_ok();
}

#[test]
fn memory_moves_across_stations_and_a_damaged_memory_chunk_fails_clearly() {
    let bank = Bank::new();
    let (a, b, c) = (
        bank.file("cacheA"),
        bank.file("cacheB"),
        bank.file("cacheC"),
    );
    let created = create_machine(&bank, "alice/dev");

    // Station A: a counter kept in memory only.
    let mut run_a = start(&bank, &a, "alice/dev", &["--append", "mbank.job=counter"]);
    run_a.wait_for("MBANK-COUNTER 5\n");
    // The same machine on a second station while A runs: refused, naming A.
    let mut refused = bank.cmd();
    refused
        .arg("--cache")
        .arg(&b)
        .args(["run", "alice/dev", "--console"]);
    let r = common::run_cmd(refused).failed();
    r.stderr_has(&["alice/dev is in use", "station", "since", "--force"]);
    let suspended_a = suspend(&bank, &a, "alice/dev");
    let after_a = chunk_set(&bank);
    let (ok, report) = run_a.wait();
    assert!(ok, "{}", run_a.stderr());
    let report = report.unwrap();
    assert_eq!(report["ending"], "suspend");
    assert_eq!(report["session"]["version"], suspended_a.as_str());
    let saved = &report["memory_saved"];
    assert!(saved["bytes"].as_u64().unwrap() > 0);
    let last_a = *run_a.counters().last().unwrap();
    assert!(last_a >= 5);
    let log = bank.log("alice/dev");
    assert_eq!(log[0]["version"], suspended_a.as_str());
    assert_eq!(log[0]["suspended"], true);

    // Station B, empty cache: the counter goes on from where it was.
    let mut run_b = start(&bank, &b, "alice/dev", &[]);
    run_b.wait_for(&format!("MBANK-COUNTER {}\n", last_a + 3));
    let first_b = run_b.counters()[0];
    assert!(
        first_b > last_a - 1 && first_b <= last_a + 2,
        "A stopped at {last_a}, B started at {first_b}"
    );
    // A second suspend after a little work sends little.
    let suspended_b = suspend(&bank, &b, "alice/dev");
    let after_b = chunk_set(&bank);
    let (ok, report) = run_b.wait();
    assert!(ok, "{}", run_b.stderr());
    let report = report.unwrap();
    assert_eq!(report["resumed"], true);
    assert!(report["memory_loaded_bytes"].as_u64().unwrap() > 0);
    let saved_b = &report["memory_saved"];
    assert!(
        saved_b["bytes_stored"].as_u64().unwrap() * 4 < saved["bytes_stored"].as_u64().unwrap(),
        "second suspend stored {} bytes, the first {}",
        saved_b["bytes_stored"],
        saved["bytes_stored"]
    );
    // The guest's disk is consistent: verify passes and the disk is a clean ext4.
    bank.verify_ok();
    let img = bank.file("after.raw");
    bank.export(&format!("alice/dev@{suspended_b}"), &img);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // A fork of A's suspended version shares every chunk and resumes too.
    let fork = bank.json(&[
        "-q",
        "create",
        "--json",
        "alice/try",
        "--from",
        &format!("alice/dev@{suspended_a}"),
    ]);
    assert_eq!(fork["chunks_new"], 0);
    assert_eq!(fork["bytes_stored"], 0);
    assert_eq!(bank.log("alice/try")[0]["suspended"], true);

    // Damage a chunk only B's memory state has: resuming it on an empty station fails
    // clearly and releases the machine; the older suspended version still resumes.
    let b_only: Vec<String> = after_b.difference(&after_a).cloned().collect();
    assert!(!b_only.is_empty(), "B's suspend added no chunk");
    let target = b_only[b_only.len() / 2].clone();
    let p = bank.chunk_path(&target);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&p, bytes).unwrap();
    let mut resume_c = bank.cmd();
    resume_c
        .arg("--cache")
        .arg(&c)
        .args(["run", "alice/dev", "--console"]);
    let r = common::run_cmd(resume_c).failed();
    r.stderr_has(&["saved memory of alice/dev", "older", "released unchanged"]);
    // The lease was released, and the version before still resumes.
    let mut run_old = start(&bank, &c, &format!("alice/dev@{suspended_a}"), &[]);
    run_old.wait_for(&format!("MBANK-COUNTER {}\n", last_a + 2));
    // SIGTERM suspends too: nothing is lost when the session is told to end.
    let st = std::process::Command::new("kill")
        .args(["-TERM", &run_old.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let (ok, report) = run_old.wait();
    assert!(ok, "{}", run_old.stderr());
    let report = report.unwrap();
    assert_eq!(report["ending"], "suspend");
    let again = report["session"]["version"].as_str().unwrap();
    assert_ne!(again, suspended_a);
    // It was made from an older version, and nobody moved the head while it ran, so
    // it is the head now (B's suspended version stays, beside it).
    assert_eq!(report["session"]["head_moved"], true);
    assert_eq!(bank.head("alice/dev").as_deref(), Some(again));
    assert!(
        bank.log("alice/dev")
            .iter()
            .any(|v| v["version"] == suspended_b.as_str())
    );
    assert!(bank.log("alice/dev").iter().any(|v| v["version"] == again));
    // The created version is untouched by all of this.
    assert!(
        bank.log("alice/dev")
            .iter()
            .any(|v| v["version"] == created.as_str())
    );
}

#[test]
fn a_killed_run_is_recovered_with_its_flushed_writes() {
    let bank = Bank::new();
    let a = bank.file("cacheA");
    create_machine(&bank, "alice/dev");
    let mut r = start(&bank, &a, "alice/dev", &["--append", "mbank.job=shell"]);
    r.wait_for("exit it to power off");
    // Typed on the console: write, flush, and say so (the marker is computed, so the
    // echo of the typed line does not match it).
    r.type_line(
        "mount -t ext4 /dev/vda /mnt && echo flushed-before-kill > /mnt/hello.txt && sync && echo SYNCED-$((40+2))",
    );
    r.wait_for("SYNCED-42");
    // The session runs in its own process (so that `run` can detach from a terminal):
    // kill that one, as a crash would.
    let session = session_pid(&a);
    assert_ne!(session, r.pid());
    unsafe_free_kill(session);
    let (ok, _) = r.wait();
    assert!(!ok, "the front reports the lost session");
    assert!(
        r.stderr().contains("ended without a result"),
        "{}",
        r.stderr()
    );
    // The next run on this station recovers the session first, then boots its version.
    let mut next = start(&bank, &a, "alice/dev", &["--append", "mbank.job=check"]);
    let (ok, _) = next.wait();
    assert!(ok, "{}", next.stderr());
    assert!(
        next.stderr()
            .contains("recovered session of alice/dev checked in"),
        "{}",
        next.stderr()
    );
    assert!(
        next.stdout()
            .contains("MBANK-FILE-BEGIN hello.txt\nflushed-before-kill"),
        "{}",
        next.stdout()
    );
    bank.verify_ok();
    // QEMU died with mbank: nothing is left running on the machine's disk socket.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &a.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// The pid of the one session on the station `cache` (from its session.json).
fn session_pid(cache: &Path) -> u32 {
    let dirs: Vec<_> = std::fs::read_dir(cache.join("sessions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dirs[0].join("session.json")).unwrap()).unwrap();
    meta["pid"].as_u64().unwrap() as u32
}

fn unsafe_free_kill(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn bad_input_gets_clear_errors() {
    let bank = Bank::new();
    let cache = bank.file("cache");
    let run = |args: &[&str]| {
        let mut c = bank.cmd();
        c.arg("--cache").arg(&cache).args(args);
        common::run_cmd(c)
    };
    run(&["run", "nobody/here", "--console"])
        .failed()
        .stderr_has(&["no machine named nobody/here"]);
    create_machine(&bank, "alice/dev");
    run(&["run", "alice/dev@ffffffff", "--console"])
        .failed()
        .stderr_has(&["alice/dev has no version ffffffff"]);
    // An image that is not a disk.
    let text = bank.file("notes.txt");
    std::fs::write(&text, "not a disk image\n").unwrap();
    run(&["create", "alice/text", "--image", text.to_str().unwrap()])
        .failed()
        .stderr_has(&["notes.txt"]);
    // More memory than the station has: created with a warning, refused by run.
    run(&[
        "create",
        "alice/huge",
        "--disk-size",
        "1G",
        "--memory",
        "4T",
    ])
    .ok()
    .stderr_has(&["more than this station has"]);
    run(&["run", "alice/huge", "--console", "--accel", "tcg"])
        .failed()
        .stderr_has(&["alice/huge needs 4.0 TiB of memory, more than this station has"]);
    // Names that exist, and nothing to make a disk from.
    run(&["create", "alice/dev", "--disk-size", "1G"])
        .failed()
        .stderr_has(&["alice/dev exists already"]);
    run(&["create", "alice/nothing"])
        .failed()
        .stderr_has(&["--image", "--from", "--disk-size"]);
    run(&["create", "alice/bad", "--disk-size", "1G", "--memory", "0"])
        .failed()
        .stderr_has(&["memory 0 MiB is out of range"]);
    // None of this left a session or a lease behind.
    assert!(
        std::fs::read_dir(cache.join("sessions"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
    let machines: Vec<String> = bank
        .json(&["ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["machine"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        !machines
            .iter()
            .any(|m| m == "alice/text" || m == "alice/nothing")
    );
}

/// A process on a new pseudo-terminal, as a person at a terminal would run it.
struct OnPty {
    master: std::fs::File,
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Drop for OnPty {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl OnPty {
    fn spawn(mut cmd: std::process::Command) -> OnPty {
        use std::os::fd::FromRawFd;
        use std::os::unix::process::CommandExt;
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty stores two new descriptors in `m` and `s`; the name, termios
        // and window size arguments may be null.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
        let (master, slave) =
            unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) };
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: runs in the child before exec: setsid and ioctl are async-signal-safe;
        // the terminal becomes the new session's controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn on a pty");
        let out = collect(master.try_clone().unwrap());
        OnPty { master, child, out }
    }

    fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until `needle` has appeared `n` times.
    fn wait_for_n(&mut self, needle: &str, n: usize) {
        let t = Instant::now();
        while self.text().matches(needle).count() < n {
            assert!(
                t.elapsed() < DEFAULT_TIMEOUT,
                "no {needle:?} (x{n}) on the terminal:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_bytes(&mut self, b: &[u8]) {
        self.master.write_all(b).unwrap();
        self.master.flush().unwrap();
    }

    fn wait_exit(&mut self) -> bool {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                return st.success();
            }
            assert!(
                t.elapsed() < DEFAULT_TIMEOUT,
                "still running:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The counter's values in the complete lines so far (the last may be arriving).
    fn counters(&self) -> Vec<u64> {
        let t = self.text();
        t[..t.rfind('\n').map_or(0, |i| i + 1)]
            .lines()
            .filter_map(|l| l.trim().strip_prefix("MBANK-COUNTER "))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }
}

#[test]
fn ctrl_c_asks_and_a_detached_machine_keeps_running() {
    let bank = Bank::new();
    let a = bank.file("cacheA");
    let _cleanup = KillSessions(a.clone());
    create_machine(&bank, "alice/dev");
    let run = |extra: &[&str]| {
        let mut c = bank.cmd();
        c.arg("--cache")
            .arg(&a)
            .args(["run", "alice/dev", "--console"])
            .args(extra);
        OnPty::spawn(c)
    };
    let mut t = run(&["--append", "mbank.job=counter"]);
    t.wait_for_n("MBANK-COUNTER 3\n", 1);
    // Ctrl-C asks; "continue" goes on.
    t.type_bytes(b"\x03");
    t.wait_for_n("[c]ontinue", 1);
    t.type_bytes(b"c\n");
    t.wait_for_n("continuing", 1);
    // Ctrl-C, "detach": this terminal is free, the machine keeps running.
    t.type_bytes(b"\x03");
    t.wait_for_n("[c]ontinue", 2);
    t.type_bytes(b"d\n");
    t.wait_for_n("detached", 1);
    assert!(t.wait_exit(), "{}", t.text());
    let at_detach = *t.counters().last().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // `run` again on the station shows the running machine.
    let mut t2 = run(&[]);
    t2.wait_for_n("running here already", 1);
    t2.wait_for_n("MBANK-COUNTER", 3);
    let seen = t2.counters()[0];
    assert!(
        seen > at_detach + 5,
        "the guest stood still while detached: {at_detach} then {seen}"
    );
    // Ctrl-C, "suspend": memory and disk become a version.
    t2.type_bytes(b"\x03");
    t2.wait_for_n("[c]ontinue", 1);
    t2.type_bytes(b"s\n");
    assert!(t2.wait_exit(), "{}", t2.text());
    assert!(
        t2.text().contains("checked in as alice/dev@"),
        "{}",
        t2.text()
    );
    assert_eq!(bank.log("alice/dev")[0]["suspended"], true);
}

#[test]
fn a_suspend_that_finds_the_bank_disk_full_fails_and_the_machine_keeps_running() {
    let mnt = common::Tmpfs::mount("40m");
    let bank = Bank::init_at(&mnt.dir.join("bank"), &mnt.outside);
    let cache = mnt.outside.join("cache");
    create_machine(&bank, "alice/dev");
    let mut r = start(
        &bank,
        &cache,
        "alice/dev",
        &["--append", "mbank.job=counter"],
    );
    r.wait_for("MBANK-COUNTER 3\n");
    // The memory state does not fit: a clear error, and the guest goes on.
    let mut c = bank.cmd();
    c.arg("--cache").arg(&cache).args(["suspend", "alice/dev"]);
    common::run_cmd(c)
        .failed()
        .stderr_has(&["no space", "keeps running"]);
    let after = *r.counters().last().unwrap();
    r.wait_for(&format!("MBANK-COUNTER {}\n", after + 5));
    // With room again, the same session suspends.
    common::sh(
        "mount",
        &[
            std::ffi::OsStr::new("-o"),
            std::ffi::OsStr::new("remount,size=512m"),
            mnt.dir.as_os_str(),
        ],
    );
    let v = suspend(&bank, &cache, "alice/dev");
    let (ok, report) = r.wait();
    assert!(ok, "{}", r.stderr());
    assert_eq!(report.unwrap()["ending"], "suspend");
    assert_eq!(bank.head("alice/dev").as_deref(), Some(v.as_str()));
    bank.verify_ok();
}

/// A bank served by `mbank serve` (plain HTTP on loopback), with user alice logged in;
/// the server is killed when dropped.
struct ServedBank {
    _tmp: tempfile::TempDir,
    server: Child,
    client: Bank,
}

impl Drop for ServedBank {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn served_bank() -> ServedBank {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bank");
    let local = Bank::at(&dir, tmp.path());
    local.run(&["init"]).ok();
    let with_password = |mut c: std::process::Command| {
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"alice-password\n")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let mut add = local.cmd();
    add.args(["admin", "user", "add", "alice", "--password-stdin"]);
    with_password(add);
    let mut serve = local.cmd();
    serve
        .args(["-q", "serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped());
    let mut server = serve.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("serve said {line:?}"))
        .to_string();
    let config = tmp.path().join("config");
    let mut login = common::mbank();
    login.env("XDG_CONFIG_HOME", &config).args([
        "login",
        &url,
        "--user",
        "alice",
        "--password-stdin",
    ]);
    with_password(login);
    let client = Bank::remote(&url, &tmp.path().join("scratch"), &config);
    ServedBank {
        _tmp: tmp,
        server,
        client,
    }
}

/// `create`, `run`, `suspend` and a resume on another station, all with `--bank URL`.
#[test]
fn a_virtual_pc_suspends_and_resumes_through_the_bank_server() {
    let served = served_bank();
    let bank = &served.client;
    let (a, b) = (bank.file("cacheA"), bank.file("cacheB"));
    create_machine(bank, "alice/dev");
    let mut run_a = start(bank, &a, "alice/dev", &["--append", "mbank.job=counter"]);
    run_a.wait_for("MBANK-COUNTER 3\n");
    let suspended = suspend(bank, &a, "alice/dev");
    let (ok, report) = run_a.wait();
    assert!(ok, "{}", run_a.stderr());
    assert_eq!(report.unwrap()["ending"], "suspend");
    let last_a = *run_a.counters().last().unwrap();
    let log = bank.log("alice/dev");
    assert_eq!(log[0]["version"], suspended.as_str());
    assert_eq!(log[0]["suspended"], true);

    let mut run_b = start(bank, &b, "alice/dev", &[]);
    run_b.wait_for(&format!("MBANK-COUNTER {}\n", last_a + 2));
    let first_b = run_b.counters()[0];
    assert!(
        first_b > last_a - 1 && first_b <= last_a + 2,
        "A stopped at {last_a}, B started at {first_b}"
    );
    let again = suspend(bank, &b, "alice/dev");
    let (ok, report) = run_b.wait();
    assert!(ok, "{}", run_b.stderr());
    assert_eq!(report.unwrap()["resumed"], true);
    assert_eq!(bank.log("alice/dev")[0]["version"], again.as_str());
}

/// A boot records the chunks the guest needed (its working set) and stores the list
/// with the version it checks in; the next boot on a station with an empty cache
/// fetches them ahead of the guest and waits on fewer misses; a fork inherits the list.
/// Counts from `run --json`'s session statistics, never times.
#[test]
fn a_recorded_working_set_makes_the_next_cold_boot_wait_on_fewer_misses() {
    let bank = Bank::new();
    create_machine(&bank, "alice/dev");
    // The first boot, on a station with an empty cache: it records.
    let (first, console) = run_job(&bank, &bank.file("cacheA"), "alice/dev", "mbank.job=write");
    assert!(console.contains("MBANK-JOB-DONE"), "{console}");
    let s1 = &first["session"];
    let stored = s1["workset_stored"].as_u64().unwrap();
    let waited1 = s1["stats"]["misses_waited"].as_u64().unwrap();
    assert!(stored > 0, "no working set stored: {first}");
    assert_eq!(s1["stats"]["prefetch_hits"], 0, "{first}");
    assert!(waited1 > 0, "{first}");
    // Another station, an empty cache: the list is fetched ahead of the guest.
    let (second, console) = run_job(&bank, &bank.file("cacheB"), "alice/dev", "mbank.job=write");
    assert!(console.contains("MBANK-JOB-DONE"), "{console}");
    let s2 = &second["session"]["stats"];
    let waited2 = s2["misses_waited"].as_u64().unwrap();
    eprintln!("cold boot misses waited: {waited1} without the working set, {waited2} with it");
    assert!(
        waited2 < waited1,
        "the second cold boot waited on {waited2} misses, the first on {waited1}: {second}"
    );
    assert!(s2["prefetch_hits"].as_u64().unwrap() > 0, "{second}");
    assert!(s2["workset_queued"].as_u64().unwrap() > 0, "{second}");

    // A fork shares its source's working set.
    bank.run(&["create", "bob/dev", "--from", "alice/dev"]).ok();
    let (third, _) = run_job(&bank, &bank.file("cacheC"), "bob/dev", "mbank.job=write");
    let s3 = &third["session"]["stats"];
    assert!(s3["workset_queued"].as_u64().unwrap() > 0, "{third}");
    bank.verify_ok();
}

/// `mbank run` without the console (a VNC socket instead), in the background.
fn start_vnc(bank: &Bank, cache: &Path, machine: &str, vnc: &Path, extra: &[&str]) -> Running {
    let mut c = bank.cmd();
    c.arg("--cache")
        .arg(cache)
        .args(["run", machine, "--json", "--vnc"])
        .arg(format!("unix:{}", vnc.display()))
        .args(extra)
        .stdin(Stdio::null());
    Running::spawn(c, cache)
}

impl Running {
    /// Waits until `run`'s messages (standard error) show `needle`.
    fn wait_for_message(&mut self, needle: &str) {
        let t = Instant::now();
        while !self.stderr().contains(needle) {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mbank run exited ({st}) before {needle:?}\n{}",
                    self.stderr()
                );
            }
            assert!(
                t.elapsed() < DEFAULT_TIMEOUT,
                "no {needle:?} after {DEFAULT_TIMEOUT:?}\n{}\n{}",
                self.stderr(),
                self.diagnose()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The test guest has no ACPI daemon, so it ignores the power button: `poweroff
/// --timeout` gives up and says what to do while the machine runs on, a suspend and
/// resume say where the screen is (VNC) as a boot does, and `poweroff --force` then
/// switches it off and checks the disk in.
#[test]
fn poweroff_of_a_guest_that_ignores_acpi_times_out_or_is_forced() {
    let bank = Bank::new();
    let cache = bank.file("cache");
    let _cleanup = KillSessions(cache.clone());
    create_machine(&bank, "alice/dev");
    let vnc1 = bank.file("vnc1.sock");
    let mut r = start_vnc(
        &bank,
        &cache,
        "alice/dev",
        &vnc1,
        &["--append", "mbank.job=counter"],
    );
    r.wait_for_message("alice/dev is running");
    assert!(
        r.stderr()
            .contains(&format!("display: VNC on unix:{}", vnc1.display())),
        "{}",
        r.stderr()
    );

    // `status` names the run, its version and its screen.
    let mut c = bank.cmd();
    c.arg("--cache").arg(&cache).args(["status", "--json"]);
    let st = common::run_cmd(c).ok().json();
    let s = &st["sessions"][0];
    assert_eq!(s["machine"], "alice/dev", "{st}");
    assert_eq!(s["kind"], "run", "{st}");
    assert_eq!(
        s["vnc"],
        format!("unix:{}", vnc1.display()).as_str(),
        "{st}"
    );
    assert_eq!(st["leased"][0]["here"], true, "{st}");

    let poweroff = |extra: &[&str]| {
        let mut c = bank.cmd();
        c.arg("--cache")
            .arg(&cache)
            .args(["poweroff", "alice/dev"])
            .args(extra);
        common::run_cmd(c)
    };
    let gave_up = poweroff(&["--timeout", "2"]).code(1);
    gave_up.stderr_has(&[
        "did not power off within 2 s",
        "keeps running",
        "mbank poweroff --force alice/dev",
    ]);
    assert!(
        r.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the machine stopped after a poweroff that gave up:\n{}",
        r.stderr()
    );

    // `set` is refused while the machine runs, and for a suspended head.
    bank.run(&["set", "alice/dev", "--cpus", "2"])
        .code(1)
        .stderr_has(&["alice/dev is in use on", "mbank poweroff alice/dev"]);

    // Suspend, then resume with the screen on another VNC socket.
    let suspended = suspend(&bank, &cache, "alice/dev");
    let (ok, _) = r.wait();
    assert!(ok, "{}", r.stderr());
    bank.run(&["set", "alice/dev", "--cpus", "2"])
        .code(1)
        .stderr_has(&["is suspended", "cannot change", "mbank run alice/dev"]);
    let vnc2 = bank.file("vnc2.sock");
    let mut r2 = start_vnc(&bank, &cache, "alice/dev", &vnc2, &[]);
    r2.wait_for_message("alice/dev is running");
    assert!(
        r2.stderr().contains(&format!(
            "resumed alice/dev@{}",
            &suspended[..12.min(suspended.len())]
        )) && r2
            .stderr()
            .contains(&format!("display: VNC on unix:{}", vnc2.display())),
        "{}",
        r2.stderr()
    );

    let forced = poweroff(&["--timeout", "1", "--force"]).ok();
    forced.stderr_has(&["switching it off like pulling the plug"]);
    let version = forced.stdout.trim().to_string();
    let (ok, report) = r2.wait();
    assert!(ok, "{}", r2.stderr());
    let report = report.expect("a JSON report");
    assert_eq!(report["ending"], "poweroff", "{report}");
    let log = bank.log("alice/dev");
    assert_eq!(
        log[0]["version"].as_str(),
        Some(version.as_str()),
        "{log:?}"
    );
    assert_eq!(log[0]["suspended"], false, "{log:?}");
}

/// `set` makes a version with the new memory and CPUs and the head's disk; the next
/// `set` starts from that configuration.
#[test]
fn set_makes_a_version_with_new_memory_and_cpus() {
    let bank = Bank::new();
    let first = create_machine(&bank, "alice/pc");
    let r = bank.json(&[
        "set", "alice/pc", "--memory", "512M", "--cpus", "2", "--json",
    ]);
    assert_eq!(r["parent"], first.as_str(), "{r}");
    assert_eq!(r["memory_mib"], 512, "{r}");
    assert_eq!(r["cpus"], 2, "{r}");
    assert_eq!(r["head_moved"], true, "{r}");
    let second = r["version"].as_str().unwrap().to_string();
    assert_eq!(bank.head("alice/pc").as_deref(), Some(second.as_str()));
    // The stored configuration carries the memory into the next change.
    let r = bank.json(&["set", "alice/pc", "--cpus", "3", "--json"]);
    assert_eq!(r["parent"], second.as_str(), "{r}");
    assert_eq!(
        (r["memory_mib"].as_u64(), r["cpus"].as_u64()),
        (Some(512), Some(3)),
        "{r}"
    );
    // The disk is the first version's.
    let a = bank.file("a.raw");
    let b = bank.file("b.raw");
    assert_eq!(
        bank.export(&format!("alice/pc@{first}"), &a),
        bank.export("alice/pc", &b)
    );
    bank.run(&["set", "alice/pc"])
        .code(2)
        .stderr_has(&["--memory", "--cpus"]);
    bank.run(&["set", "alice/pc", "--memory", "1000k"])
        .code(1)
        .stderr_has(&["whole number of MiB"]);
}
