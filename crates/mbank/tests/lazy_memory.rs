//! Lazy memory with a real guest under QEMU TCG (`mbank run --lazy-memory`): the RAM
//! lives on the station's memory file system, a suspend stores the device state and the
//! RAM chunks written since the start, a resume on another station fetches RAM chunks
//! as the guest touches them. Only counts and guest state are asserted.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Bank;
use guest::{DEFAULT_TIMEOUT, Guest, make_ext4};
use serde_json::Value;

fn create_machine_mib(bank: &Bank, name: &str, mib: u64) -> String {
    let g = Guest::build();
    let img = bank.file(&format!("{}.raw", name.replace('/', "-")));
    make_ext4(&img, mib);
    let r = bank
        .run(&[
            OsStr("-q"),
            OsStr("create"),
            OsStr("--json"),
            OsStr(name),
            OsStr("--image"),
            img.as_os_str(),
            OsStr("--memory"),
            OsStr("256M"),
            OsStr("--network"),
            OsStr("none"),
            OsStr("--display"),
            OsStr("none"),
            OsStr("--kernel"),
            g.kernel.as_os_str(),
            OsStr("--initrd"),
            g.initrd.as_os_str(),
            OsStr("--append"),
            OsStr("console=ttyS0 panic=-1"),
        ])
        .ok()
        .json();
    r["version"].as_str().unwrap().to_string()
}

#[allow(non_snake_case)]
fn OsStr(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `mbank run --console --json` in the background, its console collected.
struct Running {
    child: Option<Child>,
    /// Kept open: the console reads the test's standard input.
    _stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    cache: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // A test that failed while the session ran: the session process lives on
            // without its front (as after a detach); stop it, and QEMU goes with it.
            kill_sessions(&self.cache);
        }
    }
}

/// Kills every live session process of the station `cache` (from session.json).
fn kill_sessions(cache: &Path) {
    let Ok(dirs) = std::fs::read_dir(cache.join("sessions")) else {
        return;
    };
    for d in dirs.flatten() {
        let Ok(b) = std::fs::read(d.path().join("session.json")) else {
            continue;
        };
        if let Some(pid) = serde_json::from_slice::<Value>(&b)
            .ok()
            .and_then(|m| m["pid"].as_u64())
        {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            // The serial console ends lines with CR LF.
            b.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]).replace('\r', ""));
        }
    });
    buf
}

fn start(bank: &Bank, cache: &Path, machine: &str, extra: &[&str]) -> Running {
    let mut c = bank.cmd();
    c.arg("--cache")
        .arg(cache)
        .args(["run", machine, "--console", "--json"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn mbank run");
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let stdin = child.stdin.take();
    Running {
        child: Some(child),
        _stdin: stdin,
        out,
        err,
        cache: cache.to_path_buf(),
    }
}

impl Running {
    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until the console shows `needle`; panics with both outputs on a timeout or
    /// if `run` exits first.
    fn wait_for(&mut self, needle: &str) {
        let t = Instant::now();
        while !self.stdout().contains(needle) {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mbank run exited ({st}) before {needle:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                t.elapsed() < DEFAULT_TIMEOUT,
                "no {needle:?} after {DEFAULT_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `run` to exit; returns (success, its JSON report if it printed one).
    fn wait(&mut self) -> (bool, Option<Value>) {
        let mut child = self.child.take().expect("running");
        let t = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > DEFAULT_TIMEOUT {
                let _ = child.kill();
                panic!(
                    "mbank run did not end\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The output threads finish at EOF.
        std::thread::sleep(Duration::from_millis(200));
        let out = self.stdout();
        let report = out
            .rfind("\n{\n")
            .or_else(|| out.starts_with("{\n").then_some(0))
            .and_then(|i| serde_json::from_str(out[i..].trim()).ok());
        (st.success(), report)
    }

    fn counters(&self) -> Vec<u64> {
        self.stdout()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("MBANK-COUNTER "))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }
}

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
    run_b.wait_for("MBANK-COUNTER");
    let at_answer = session_stats(&b);
    let ram = &at_answer["ram"];
    assert_eq!(n(&ram["chunks_nonzero"]), nonzero_a, "{at_answer}");
    assert!(
        n(&ram["chunks_fetched"]) < nonzero_a,
        "the guest answered after fetching {} of {nonzero_a} non-zero RAM chunks",
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
    run_c.wait_for("MBANK-COUNTER");
    let first_c = run_c.counters()[0];
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
    run_b.wait_for("MBANK-COUNTER");
    let first_b = run_b.counters()[0];
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
