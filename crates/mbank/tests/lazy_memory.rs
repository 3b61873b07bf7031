//! Lazy memory with a real guest under QEMU TCG (`mbank run --lazy-memory`): the RAM
//! lives on the station's memory file system, a suspend stores the device state and the
//! RAM chunks written since the start, a resume on another station fetches RAM chunks
//! as the guest touches them. Only counts and guest state are asserted.

mod common;
#[path = "common/guest.rs"]
mod guest;
#[path = "common/running.rs"]
mod running;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::Bank;
use running::{Running, create_machine_mib, start};
use serde_json::Value;

fn suspend(bank: &Bank, cache: &Path, machine: &str) -> String {
    let mut c = bank.cmd();
    c.arg("--cache").arg(cache).args(["suspend", machine]);
    let r = common::run_cmd(c).ok();
    r.stdout.trim().to_string()
}

/// The session of the one `run` on station `cache`: its control socket's `stats`.
fn session_stats(cache: &Path) -> Value {
    let dir = std::fs::read_dir(cache.join("sessions"))
        .unwrap()
        .flatten()
        .find(|d| d.path().join("session.json").exists())
        .expect("a session on the station");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("session.json")).unwrap()).unwrap();
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let sock = base
        .join(format!("mbank-{}", meta["session"].as_str().unwrap()))
        .join("control.sock");
    let mut c = UnixStream::connect(&sock).unwrap();
    writeln!(c, "stats").unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn lazy_suspend(bank: &Bank, cache: &Path, run: &mut Running) -> (String, Value) {
    let v = suspend(bank, cache, "alice/dev");
    let (ok, report) = run.wait();
    assert!(ok, "{}", run.stderr());
    let report = report.unwrap_or_else(|| panic!("no report in:\n{}", run.stdout()));
    assert_eq!(report["ending"], "suspend");
    assert_eq!(report["session"]["version"], v.as_str());
    (v, report)
}

/// The most RAM a lazy resume of the counter guest may fetch before it answers.
const RESUME_FETCH_BOUND: u64 = 32 << 20;

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn lazy_memory_resumes_on_another_station_fetching_part_and_storing_only_dirty_chunks() {
    let bank = Bank::new();
    let (a, b, c) = (
        bank.file("cacheA"),
        bank.file("cacheB"),
        bank.file("cacheC"),
    );
    create_machine_mib(&bank, "alice/dev", 64);

    // Station A boots with lazy memory and suspends: device state + RAM chunks.
    let mut run_a = start(
        &bank,
        &a,
        "alice/dev",
        &["--append", "mbank.job=counter", "--lazy-memory"],
    );
    run_a.wait_for("MBANK-COUNTER 5\n");
    let (v_a, rep_a) = lazy_suspend(&bank, &a, &mut run_a);
    let last_a = *run_a.counters().last().unwrap();
    let ram_a = &rep_a["ram_saved"];
    let state_a = n(&rep_a["memory_saved"]["bytes"]);
    assert!(
        state_a < 32 << 20,
        "the memory stream should hold device state only, it holds {state_a} bytes"
    );
    assert_eq!(n(&ram_a["bytes"]), 256 << 20);
    let nonzero_a = n(&ram_a["chunks"]) - n(&ram_a["chunks_zero"]);
    assert!(nonzero_a > 0 && n(&ram_a["chunks_new"]) > 0, "{ram_a}");
    assert_eq!(bank.log("alice/dev")[0]["suspended"], true);

    // Station B, empty cache: the counter goes on, with part of the RAM fetched.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.first_counter();
    let at_answer = session_stats(&b);
    let ram = &at_answer["ram"];
    assert_eq!(n(&ram["chunks_nonzero"]), nonzero_a, "{at_answer}");
    assert!(
        n(&ram["chunks_fetched"]) < nonzero_a,
        "the guest answered after fetching {} of {nonzero_a} non-zero RAM chunks",
        ram["chunks_fetched"]
    );
    // QEMU advises its RAM MADV_HUGEPAGE, and the kernel then reads 4 MiB around each
    // fault on the file (930-980 chunks, about 60 MiB, before the counter showed);
    // with the advice ignored a fault reads one chunk's worth around it.
    assert!(
        n(&ram["bytes_fetched"]) < RESUME_FETCH_BOUND,
        "the guest answered after {} bytes of RAM were fetched ({} chunks): \
         the kernel's huge-page read-around?",
        ram["bytes_fetched"],
        ram["chunks_fetched"]
    );
    let first_b = run_b.counters()[0];
    assert!(
        first_b + 1 >= last_a && first_b <= last_a + 2,
        "A stopped at {last_a}, B started at {first_b}"
    );
    run_b.wait_for(&format!("MBANK-COUNTER {}\n", first_b + 3));
    let (v_b, rep_b) = lazy_suspend(&bank, &b, &mut run_b);
    let last_b = *run_b.counters().last().unwrap();
    assert_eq!(rep_b["resumed"], true);
    // Only the chunks the guest wrote are new; the rest is A's.
    let ram_b = &rep_b["ram_saved"];
    let dirty_b = n(&rep_b["ram"]["chunks_dirty"]);
    assert!(
        n(&ram_b["chunks_new"]) <= dirty_b && dirty_b < nonzero_a,
        "B stored {} new RAM chunks, wrote {dirty_b}, A's RAM had {nonzero_a} non-zero",
        ram_b["chunks_new"]
    );
    assert_ne!(v_a, v_b);
    eprintln!(
        "lazy memory: device state {state_a} B; A stored {} RAM chunks ({nonzero_a} non-zero); \
         B fetched {} before answering, {} in all, wrote {dirty_b}, stored {} new",
        ram_a["chunks_new"],
        ram["chunks_fetched"],
        rep_b["ram"]["chunks_fetched"],
        ram_b["chunks_new"]
    );

    // Station C resumes B's version without asking for lazy memory: a version whose RAM
    // was saved so resumes so, and its RAM is A's chunks under B's.
    let mut run_c = start(&bank, &c, "alice/dev", &[]);
    let first_c = run_c.first_counter();
    assert!(
        first_c + 1 >= last_b && first_c <= last_b + 2,
        "B stopped at {last_b}, C started at {first_c}"
    );
    run_c.wait_for(&format!("MBANK-COUNTER {}\n", first_c + 2));
    let (_, rep_c) = lazy_suspend(&bank, &c, &mut run_c);
    assert!(rep_c["ram"]["chunks_fetched"].as_u64().unwrap() > 0);
    bank.verify_ok();
}

#[test]
fn a_version_saved_with_its_whole_memory_resumes_into_lazy_memory() {
    let bank = Bank::new();
    let (a, b) = (bank.file("cacheA"), bank.file("cacheB"));
    create_machine_mib(&bank, "alice/dev", 64);
    // Station A: the default, eager path; the memory stream holds the RAM.
    let mut run_a = start(&bank, &a, "alice/dev", &["--append", "mbank.job=counter"]);
    run_a.wait_for("MBANK-COUNTER 3\n");
    let (_, rep_a) = lazy_suspend(&bank, &a, &mut run_a);
    assert!(rep_a["ram_saved"].is_null() && rep_a["ram"].is_null());
    let last_a = *run_a.counters().last().unwrap();
    // Station B with lazy memory: the whole stream loads into the RAM file, and the
    // next suspend stores the RAM as its own stream.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    let first_b = run_b.first_counter();
    assert!(
        first_b + 1 >= last_a && first_b <= last_a + 2,
        "A stopped at {last_a}, B started at {first_b}"
    );
    run_b.wait_for(&format!("MBANK-COUNTER {}\n", first_b + 2));
    let (_, rep_b) = lazy_suspend(&bank, &b, &mut run_b);
    assert_eq!(n(&rep_b["ram"]["chunks_fetched"]), 0, "a fresh RAM file");
    assert!(n(&rep_b["ram_saved"]["chunks_new"]) > 0);
    assert!(n(&rep_b["memory_saved"]["bytes"]) < 32 << 20);
}

/// Mounts under `dir` (from /proc/mounts): a RAM file system a session left.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|m| m.starts_with(&dir))
        })
        .map(str::to_string)
        .collect()
}

/// The pid of the one session process on station `cache` (from its session.json).
fn session_pid(cache: &Path) -> u32 {
    let dirs: Vec<_> = std::fs::read_dir(cache.join("sessions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("session.json").exists())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dirs[0].join("session.json")).unwrap()).unwrap();
    meta["pid"].as_u64().unwrap() as u32
}

fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Kills the session process of station `cache` as a crash would, and waits for the
/// front to report it.
fn crash_session(cache: &Path, run: &mut Running) {
    let pid = session_pid(cache);
    assert_ne!(pid, run.pid());
    kill9(pid);
    let (ok, _) = run.wait();
    assert!(!ok, "the front reports the lost session");
    assert!(
        run.stderr().contains("ended without a result"),
        "{}",
        run.stderr()
    );
}

/// Fills `mib` MiB of the guest's memory (a file in its RAM-backed root) with random
/// bytes and returns their MD5.
fn fill_random(run: &mut Running, mib: u64) -> String {
    let sum = run.ask(
        "SUM",
        &format!(
            "dd if=/dev/urandom of=/r.bin bs=64k count={} 2>/dev/null; md5sum /r.bin",
            mib * 16
        ),
    );
    assert!(sum.ends_with("/r.bin"), "{sum}");
    sum
}

/// A machine whose guest runs the `shell` job, suspended lazily on station `a` with
/// `mib` MiB of random bytes in memory: (version, their MD5).
fn suspended_with_random(bank: &Bank, a: &Path, mib: u64) -> (String, String) {
    let mut run = start(
        bank,
        a,
        "alice/dev",
        &["--append", "mbank.job=shell", "--lazy-memory"],
    );
    run.wait_shell();
    let sum = fill_random(&mut run, mib);
    let (v, _) = lazy_suspend(bank, a, &mut run);
    (v, sum)
}

#[test]
fn a_random_region_reads_back_the_same_after_a_lazy_resume_on_another_station() {
    let bank = Bank::new();
    let (a, b) = (bank.file("cacheA"), bank.file("cacheB"));
    create_machine_mib(&bank, "alice/dev", 64);
    let (_, sum) = suspended_with_random(&bank, &a, 32);

    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.shell_answers();
    let before = session_stats(&b)["ram"].clone();
    let again = run_b.ask("SUM", "md5sum /r.bin");
    let after = session_stats(&b)["ram"].clone();
    assert_eq!(
        again, sum,
        "the random region changed across the lazy resume"
    );
    // The region came through the memory file system: reading it fetched chunks, and
    // by then at least its 512 chunks were fetched (random: none is zero).
    assert!(
        n(&after["chunks_fetched"]) > n(&before["chunks_fetched"])
            && n(&after["chunks_fetched"]) >= 512,
        "RAM chunks fetched before the checksum: {before}, after: {after}"
    );
    lazy_suspend(&bank, &b, &mut run_b);
    bank.verify_ok();
}

#[test]
fn a_killed_lazy_session_keeps_the_last_suspended_memory_and_its_flushed_writes() {
    let bank = Bank::new();
    let (a, b) = (bank.file("cacheA"), bank.file("cacheB"));
    create_machine_mib(&bank, "alice/dev", 64);
    // A: something in memory only, then a lazy suspend.
    let mut run_a = start(
        &bank,
        &a,
        "alice/dev",
        &["--append", "mbank.job=shell", "--lazy-memory"],
    );
    run_a.wait_shell();
    assert_eq!(
        run_a.ask("M", "echo in-memory-$((6*7)) > /m; cat /m"),
        "in-memory-42"
    );
    let (v_a, _) = lazy_suspend(&bank, &a, &mut run_a);
    // B resumes it lazily, writes and flushes a file on the disk, and its session dies.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.shell_answers();
    assert_eq!(
        run_b.ask(
            "W",
            "mount -t ext4 /dev/vda /mnt && echo flushed-before-kill > /mnt/hello.txt && sync && cat /mnt/hello.txt"
        ),
        "flushed-before-kill"
    );
    crash_session(&b, &mut run_b);
    // The next run on B recovers the session (the flushed write), detaches the RAM
    // mount the dead session left, and boots the recovered version from its disk.
    let mut next = start(&bank, &b, "alice/dev", &["--append", "mbank.job=check"]);
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
    assert_eq!(mounts_under(&b), Vec::<String>::new(), "mounts left on B");
    // The memory of the last suspend is still there: A's version resumes with it.
    let mut again = start(&bank, &b, &format!("alice/dev@{v_a}"), &["--lazy-memory"]);
    again.shell_answers();
    assert_eq!(again.ask("M", "cat /m"), "in-memory-42");
    lazy_suspend(&bank, &b, &mut again);
    bank.verify_ok();
}

#[test]
fn a_ram_mount_left_by_a_killed_session_is_removed_by_recover() {
    let bank = Bank::new();
    let a = bank.file("cacheA");
    create_machine_mib(&bank, "alice/dev", 64);
    let mut run = start(
        &bank,
        &a,
        "alice/dev",
        &["--append", "mbank.job=shell", "--lazy-memory"],
    );
    run.wait_shell();
    assert_eq!(mounts_under(&a).len(), 1, "the RAM file system is mounted");
    crash_session(&a, &mut run);
    // The killed process's mount stays until somebody detaches it.
    assert_eq!(mounts_under(&a).len(), 1, "{:?}", mounts_under(&a));
    let mut c = bank.cmd();
    c.arg("--cache").arg(&a).arg("recover");
    let r = common::run_cmd(c).ok();
    assert!(r.stderr.contains("alice/dev"), "{r}");
    assert_eq!(mounts_under(&a), Vec::<String>::new(), "mounts left");
    assert!(
        std::fs::read_dir(a.join("sessions"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "the session directory is gone"
    );
}

/// The chunk ids of version `v`'s `ram` stream (zero chunks left out).
fn ram_chunks(bank: &Bank, v: &str) -> std::collections::BTreeSet<String> {
    let b = mbank_bank::Bank::open(&bank.path, true).unwrap();
    let info = b
        .resolve(&format!("alice/dev@{v}").parse().unwrap())
        .unwrap();
    let idx = b
        .catalog()
        .stream(&info, "ram")
        .unwrap()
        .expect("a ram stream");
    idx.runs
        .iter()
        .filter_map(|r| r.id.map(|id| id.to_string()))
        .collect()
}

#[test]
fn a_damaged_ram_chunk_is_named_the_machine_released_and_an_older_version_resumes() {
    let bank = Bank::new();
    let (a, b, c) = (
        bank.file("cacheA"),
        bank.file("cacheB"),
        bank.file("cacheC"),
    );
    create_machine_mib(&bank, "alice/dev", 64);
    // v1: a booted shell with a mark in memory.
    let mut run_a = start(
        &bank,
        &a,
        "alice/dev",
        &["--append", "mbank.job=shell", "--lazy-memory"],
    );
    run_a.wait_shell();
    assert_eq!(run_a.ask("M", "echo mark-$((6*7)) > /m; cat /m"), "mark-42");
    let (v1, _) = lazy_suspend(&bank, &a, &mut run_a);
    // v2: the same guest with 16 MiB of random bytes in memory.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.shell_answers();
    let sum = fill_random(&mut run_b, 16);
    let (v2, _) = lazy_suspend(&bank, &b, &mut run_b);
    // Damage a few of v2's own chunks that hold random bytes (they do not compress):
    // the guest reads them all when it checksums its random region.
    let old = ram_chunks(&bank, &v1);
    let random: Vec<String> = ram_chunks(&bank, &v2)
        .into_iter()
        .filter(|id| !old.contains(id))
        .filter(|id| std::fs::metadata(bank.chunk_path(id)).unwrap().len() > 60_000)
        .collect();
    assert!(random.len() >= 200, "only {} random chunks", random.len());
    let damaged: Vec<&String> = random.iter().step_by(random.len() / 3).take(3).collect();
    for id in &damaged {
        let p = bank.chunk_path(id);
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&p, bytes).unwrap();
    }
    // Station C resumes v2: the checksum meets a damaged chunk and the session ends
    // with an error that names it, the machine and the version.
    let mut run_c = start(&bank, &c, "alice/dev", &["--lazy-memory"]);
    run_c.shell_answers();
    run_c.type_line("md5sum /r.bin");
    let (ok, _) = run_c.wait();
    assert!(!ok, "a guest whose RAM cannot be read cannot go on");
    let err = run_c.stderr();
    assert!(
        damaged.iter().any(|id| err.contains(id.as_str())),
        "the error names none of the damaged chunks {damaged:?}:\n{err}"
    );
    assert!(
        err.contains(&format!("alice/dev@{}", &v2[..12.min(v2.len())])),
        "the error does not name the version {v2}:\n{err}"
    );
    assert!(err.contains("RAM"), "{err}");
    assert!(
        !run_c.stdout().contains(&sum),
        "the checksum cannot come out right"
    );
    assert_eq!(mounts_under(&c), Vec::<String>::new(), "mounts left on C");
    // The machine was released, and the older version resumes (on the same station).
    let mut older = start(&bank, &c, &format!("alice/dev@{v1}"), &["--lazy-memory"]);
    older.shell_answers();
    assert_eq!(older.ask("M", "cat /m"), "mark-42");
    lazy_suspend(&bank, &c, &mut older);
}

/// Stops `server` and serves its bank again on the same port.
fn restart(server: &mut common::PlainServer) {
    let _ = server.child.kill();
    let _ = server.child.wait();
    let log = server.tmp.path().join("server-again.log");
    let mut c = common::mbank();
    c.env("MBANK_LOG", "warn")
        .arg("--bank")
        .arg(&server.dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", server.port)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    server.child = c.spawn().unwrap();
    assert_eq!(common::serve_port(&mut server.child, &log), server.port);
}

/// Polls station `cache`'s session statistics until `ok` holds (bounded).
fn wait_stats(cache: &Path, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t = std::time::Instant::now();
    loop {
        let s = session_stats(cache);
        if ok(&s) {
            return s;
        }
        assert!(
            t.elapsed() < guest::DEFAULT_TIMEOUT,
            "{what}: not after {:?}: {s}",
            guest::DEFAULT_TIMEOUT
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_lazy_resume_through_a_served_bank_waits_out_a_server_restart() {
    let mut server =
        common::PlainServer::start(&[("alice", "alice-secret-1", false)], &|_| {}, &[]);
    let url = format!("http://127.0.0.1:{}", server.port);
    let config = server.tmp.path().join("config");
    let mut login = common::mbank();
    login.env("XDG_CONFIG_HOME", &config).args([
        "login",
        &url,
        "--user",
        "alice",
        "--password-stdin",
    ]);
    common::run_with_input(login, b"alice-secret-1\n").ok();
    let bank = Bank::remote(&url, &server.tmp.path().join("scratch"), &config);
    let (a, b) = (bank.file("cacheA"), bank.file("cacheB"));
    create_machine_mib(&bank, "alice/dev", 64);
    let (_, sum) = suspended_with_random(&bank, &a, 16);

    // B resumes lazily through the server; the server goes away before the guest
    // reads its random region.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.shell_answers();
    let before = session_stats(&b)["ram"].clone();
    let _ = server.child.kill();
    let _ = server.child.wait();
    run_b.type_line("md5sum /r.bin | sed \"s/^/MBANK-\"\"SUM /\"");
    // The guest faults on a RAM chunk that only the server has, or reads a disk chunk
    // (md5sum's or sed's) that only the server has, and waits; or it was still waiting
    // on a fault from before the server went (a single TCG vCPU runs nothing else
    // meanwhile): a fault or a read in flight across two looks a second apart.
    let waiting =
        |s: &Value| n(&s["ram"]["faults_in_flight"]) > 0 || n(&s["stats"]["misses_waiting"]) > 0;
    let stalled = wait_stats(&b, "a fault or read waiting on the absent server", |s| {
        n(&s["ram"]["faults_waited"]) > n(&before["faults_waited"])
            || (waiting(s) && {
                std::thread::sleep(std::time::Duration::from_secs(1));
                waiting(&session_stats(&b))
            })
    });
    assert!(
        !run_b.stdout().contains(&format!("MBANK-SUM {sum}")),
        "the guest read its region without the server"
    );
    assert_eq!(
        stalled["ram"]["fetch_errors"].as_u64().unwrap_or(0),
        0,
        "a fetch failed instead of waiting: {stalled}"
    );
    // The server comes back: the guest goes on, with the same bytes.
    restart(&mut server);
    run_b.wait_for(&format!("MBANK-SUM {sum}"));
    lazy_suspend(&bank, &b, &mut run_b);
}

/// A lazy resume records the RAM chunks its guest waited for, in order, and stores the
/// list with its next suspend; a resume of that version on another empty station
/// fetches them ahead of the guest, which then waits on far fewer faults. Counts only.
#[test]
fn a_recorded_ram_working_set_spares_the_next_lazy_resume_its_faults() {
    let bank = Bank::new();
    let (a, b, c) = (
        bank.file("cacheA"),
        bank.file("cacheB"),
        bank.file("cacheC"),
    );
    create_machine_mib(&bank, "alice/dev", 64);
    let (v1, sum) = suspended_with_random(&bank, &a, 16);
    // A booted into a fresh RAM: it waited for nothing, so it stored no list.
    let streams = |v: &str| -> Vec<String> {
        let b = mbank_bank::Bank::open(&bank.path, true).unwrap();
        let info = b
            .resolve(&format!("alice/dev@{v}").parse().unwrap())
            .unwrap();
        info.streams
    };
    assert!(!streams(&v1).contains(&"ramset".to_string()));
    // B: nothing to replay; the guest faults its RAM in.
    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.shell_answers();
    assert_eq!(run_b.ask("SUM", "md5sum /r.bin"), sum);
    let at_b = session_stats(&b)["ram"].clone();
    assert_eq!(n(&at_b["chunks_prefetched"]), 0, "{at_b}");
    let (v2, _) = lazy_suspend(&bank, &b, &mut run_b);
    assert!(
        streams(&v2).contains(&"ramset".to_string()),
        "{:?}",
        streams(&v2)
    );
    // C, empty cache: the same work, with B's list fetched ahead of the guest.
    let mut run_c = start(&bank, &c, "alice/dev", &["--lazy-memory"]);
    run_c.shell_answers();
    assert_eq!(run_c.ask("SUM", "md5sum /r.bin"), sum);
    let at_c = session_stats(&c)["ram"].clone();
    eprintln!("RAM at the checksum: B (no list) {at_b}, C (B's list) {at_c}");
    assert!(n(&at_c["chunks_prefetched"]) > 0, "{at_c}");
    assert!(
        n(&at_c["faults_waited"]) * 2 < n(&at_b["faults_waited"]),
        "C waited on {} faults, B on {}",
        at_c["faults_waited"],
        at_b["faults_waited"]
    );
    lazy_suspend(&bank, &c, &mut run_c);
    bank.verify_ok();
}

/// While a lazy-memory guest runs, the RAM it wrote goes to the bank in the background
/// (under the session's write-back cap), and the suspend then sends only what changed
/// since: 16 MiB of random bytes written early are not sent again at the suspend, while
/// a session without write-back sends them then. Another station resumes the version
/// with the same bytes. Counts only.
#[test]
fn lazy_memory_is_written_back_while_the_guest_runs_and_the_suspend_sends_the_rest() {
    let bank = Bank::new();
    let (a, b, c) = (
        bank.file("cacheA"),
        bank.file("cacheB"),
        bank.file("cacheC"),
    );
    let v0 = create_machine_mib(&bank, "alice/dev", 64);
    let region = 16u64 << 20;

    // Without write-back (cap 0), the suspend sends the region.
    let mut off = start(
        &bank,
        &c,
        "alice/dev",
        &[
            "--append",
            "mbank.job=shell",
            "--lazy-memory",
            "--writeback-mbit",
            "0",
        ],
    );
    off.wait_shell();
    fill_random(&mut off, 16);
    let (_, r) = lazy_suspend(&bank, &c, &mut off);
    assert!(
        n(&r["ram_saved"]["bytes_stored"]) >= region,
        "without write-back the suspend sent {}",
        r["ram_saved"]
    );
    assert_eq!(n(&r["ram"]["written_back_chunks"]), 0, "{}", r["ram"]);
    assert!(
        off.stderr()
            .contains("no background write-back of alice/dev"),
        "the session process was not told: {}",
        off.stderr()
    );
    // Back to a fresh boot.
    bank.run(&["head", &format!("alice/dev@{v0}")]).ok();

    let mut run = start(
        &bank,
        &a,
        "alice/dev",
        &["--append", "mbank.job=shell", "--lazy-memory"],
    );
    run.wait_shell();
    let sum = fill_random(&mut run, 16);
    // The region settles and is written back while the guest runs.
    let during = wait_stats(&a, "the RAM's write-back of the region", |s| {
        n(&s["ram"]["written_back_bytes"]) >= region
    });
    let (_, r) = lazy_suspend(&bank, &a, &mut run);
    let saved = &r["ram_saved"];
    eprintln!(
        "RAM during the session: {}; the suspend stored {saved}",
        during["ram"]
    );
    // The region alone is 16 MiB of random bytes: had it been sent again, the suspend
    // would have stored at least that.
    assert!(
        n(&saved["bytes_stored"]) < region,
        "the suspend sent the written-back region again: {saved}"
    );
    assert!(
        n(&r["ram_written_back"]) >= region / (64 << 10),
        "the suspend took {} chunks from the write-back",
        r["ram_written_back"]
    );
    assert!(
        run.stderr().contains("sent during the session"),
        "{}",
        run.stderr()
    );

    let mut run_b = start(&bank, &b, "alice/dev", &["--lazy-memory"]);
    run_b.shell_answers();
    assert_eq!(run_b.ask("SUM", "md5sum /r.bin"), sum);
    lazy_suspend(&bank, &b, &mut run_b);
    bank.verify_ok();
}
