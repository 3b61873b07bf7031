//! `mbank run --console --json` in the background for the tests with a real guest
//! (`vm_guest.rs`, `lazy_memory.rs`): a machine of the test guest, the run's console
//! collected, and its session processes killed if a test fails while they run.
//!
//! Include it beside `mod common;` and `mod guest;` with
//! `#[path = "common/running.rs"] mod running;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::Bank;
use crate::guest::{DEFAULT_TIMEOUT, Guest, make_ext4};

pub fn create_machine_mib(bank: &Bank, name: &str, mib: u64) -> String {
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
pub fn OsStr(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `mbank run --console --json` in the background, its console collected.
pub struct Running {
    pub child: Option<Child>,
    pub stdin: Option<ChildStdin>,
    pub out: Arc<Mutex<String>>,
    pub err: Arc<Mutex<String>>,
    pub cache: std::path::PathBuf,
    /// The threads collecting standard output and error, ending at end of file.
    readers: Vec<std::thread::JoinHandle<()>>,
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

/// Kills the station's session processes when dropped (a test that fails while a
/// detached session runs must not leave it behind).
pub struct KillSessions(pub std::path::PathBuf);

impl Drop for KillSessions {
    fn drop(&mut self) {
        kill_sessions(&self.0);
    }
}

/// Kills every live session process of the station `cache` (from session.json).
pub fn kill_sessions(cache: &Path) {
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
        // A killed session with lazy memory leaves its RAM file system mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(d.path().join("ram.mnt"))
            .stderr(Stdio::null())
            .status();
    }
}

pub fn collect(r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    collect_until_eof(r).0
}

/// [`collect`], and the reader thread, which ends at end of file.
pub fn collect_until_eof(
    mut r: impl Read + Send + 'static,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    let h = std::thread::spawn(move || {
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
    (buf, h)
}

pub fn start(bank: &Bank, cache: &Path, machine: &str, extra: &[&str]) -> Running {
    let mut c = bank.cmd();
    c.arg("--cache")
        .arg(cache)
        .args(["run", machine, "--console", "--json"])
        .args(extra)
        .stdin(Stdio::piped());
    Running::spawn(c, cache)
}

/// What a test that timed out waiting on a session can show of it: each session's
/// files and the ends of its logs, and the station's processes with where their
/// threads wait in the kernel.
pub fn diagnose(cache: &Path) -> String {
    let mut out = String::new();
    if let Ok(dirs) = std::fs::read_dir(cache.join("sessions")) {
        for d in dirs.flatten() {
            let mut names: Vec<String> = std::fs::read_dir(d.path())
                .map(|r| {
                    r.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            out += &format!("session {}: {names:?}\n", d.path().display());
            for log in ["run.log", "qemu.log"] {
                if let Ok(t) = std::fs::read_to_string(d.path().join(log)) {
                    let tail: Vec<&str> = t.lines().rev().take(20).collect();
                    out += &format!("{log} (end):\n");
                    for l in tail.into_iter().rev() {
                        out += &format!("  {l}\n");
                    }
                }
            }
        }
    }
    let ps = std::process::Command::new("ps")
        .args(["-eo", "pid,ppid,stat,etime,args"])
        .output();
    if let Ok(ps) = ps {
        for l in String::from_utf8_lossy(&ps.stdout).lines() {
            if !(l.contains("mbank") || l.contains("qemu")) {
                continue;
            }
            out += &format!("{l}\n");
            let pid = l.split_whitespace().next().unwrap_or("");
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let read = |f: &str| {
                    std::fs::read_to_string(t.path().join(f))
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                };
                out += &format!("    thread {} wchan {}\n", read("comm"), read("wchan"));
            }
        }
    }
    out
}

impl Running {
    /// Spawns `c` (an `mbank run`) with its standard output and error collected.
    pub fn spawn(mut c: std::process::Command, cache: &Path) -> Running {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn mbank run");
        let (out, o) = collect_until_eof(child.stdout.take().unwrap());
        let (err, e) = collect_until_eof(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        Running {
            child: Some(child),
            stdin,
            out,
            err,
            cache: cache.to_path_buf(),
            readers: vec![o, e],
        }
    }

    /// The session's state (see [`diagnose`]), for a test that timed out.
    pub fn diagnose(&self) -> String {
        diagnose(&self.cache)
    }

    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits until the console shows `needle`; panics with both outputs on a timeout or
    /// if `run` exits first.
    pub fn wait_for(&mut self, needle: &str) {
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
                "no {needle:?} after {DEFAULT_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}\n{}",
                self.stdout(),
                self.stderr(),
                self.diagnose()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn type_line(&mut self, line: &str) {
        let s = self.stdin.as_mut().unwrap();
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    /// Waits for `run` to exit; returns (success, its JSON report if it printed one).
    pub fn wait(&mut self) -> (bool, Option<Value>) {
        let mut child = self.child.take().expect("running");
        let t = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > DEFAULT_TIMEOUT {
                let state = self.diagnose();
                let _ = child.kill();
                panic!(
                    "mbank run did not end\nstdout:\n{}\nstderr:\n{}\n{state}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The output threads finish at end of file (bounded: a process `run` left
        // behind could hold its output open).
        let t = Instant::now();
        while !self.readers.iter().all(|h| h.is_finished()) && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = self.stdout();
        let report = out
            .rfind("\n{\n")
            .or_else(|| out.starts_with("{\n").then_some(0))
            .and_then(|i| serde_json::from_str(out[i..].trim()).ok());
        (st.success(), report)
    }

    /// Waits for the `shell` job's prompt and until the shell reads the console (it
    /// may not at once: asks until it answers, bounded).
    pub fn wait_shell(&mut self) {
        self.wait_for("exit it to power off");
        self.shell_answers();
    }

    /// Waits until the guest's shell answers on the console (after a resume: the
    /// prompt was printed before the suspend).
    pub fn shell_answers(&mut self) {
        for n in 1.. {
            self.type_line("echo MBANK-\"\"UP");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(1) {
                if self.stdout().contains("MBANK-UP") {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                n < 120,
                "the guest's shell never answered:\n{}\n{}",
                self.stdout(),
                self.diagnose()
            );
        }
    }

    /// Complete lines of the console that start with `marker` (the rest of each,
    /// trimmed). A last line without its end of line is still arriving: left out.
    pub fn lines(&self, marker: &str) -> Vec<String> {
        let out = self.stdout();
        let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter_map(|l| l.trim().strip_prefix(marker))
            .map(|r| r.trim().to_string())
            .collect()
    }

    /// Runs `cmd` in the guest's shell (the `shell` job) and returns what it printed,
    /// each line after `MBANK-<tag>`; the marker is split in the typed line, so the
    /// console's echo never matches.
    pub fn ask(&mut self, tag: &str, cmd: &str) -> String {
        let marker = format!("MBANK-{tag} ");
        let n = self.lines(&marker).len();
        self.type_line(&format!("{cmd} | sed \"s/^/MBANK-\"\"{tag} /\""));
        let t = Instant::now();
        loop {
            let got = self.lines(&marker);
            if got.len() > n {
                return got[n].clone();
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mbank run exited ({st}) before answering {cmd:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                t.elapsed() < DEFAULT_TIMEOUT,
                "no answer to {cmd:?} after {DEFAULT_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}\n{}",
                self.stdout(),
                self.stderr(),
                self.diagnose()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until the console shows a complete `MBANK-COUNTER` line; returns the first
    /// value shown.
    pub fn first_counter(&mut self) -> u64 {
        self.wait_for("MBANK-COUNTER");
        let t = Instant::now();
        loop {
            if let Some(&c) = self.counters().first() {
                return c;
            }
            assert!(
                t.elapsed() < DEFAULT_TIMEOUT,
                "no complete counter line after {DEFAULT_TIMEOUT:?}\nstdout:\n{}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn counters(&self) -> Vec<u64> {
        self.lines("MBANK-COUNTER ")
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }
}
