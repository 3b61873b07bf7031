//! A real small Linux guest for the integration tests: Debian's cloud kernel and a
//! busybox initramfs built (once, cached) by `scripts/build-guest.sh`, booted under QEMU
//! TCG with one virtio-blk disk that is a raw file or an NBD export on a unix socket.
//!
//! Self-contained: include it with `#[path = "common/guest.rs"] mod guest;`.
//!
//! The guest's `/init` runs the job named by `mbank.job=` on the kernel command line and
//! prints markers on the serial console (see the script's header):
//! `ready`, `write` (`mbank.token=`, `mbank.file=NAME:TEXT`, `mbank.size_mib=`), `check`,
//! `counter`, `shell`. Timeouts here only guard against hangs; no test should assert
//! on wall-clock time.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A generous hang guard for one boot (a boot takes a few seconds under TCG).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The serial console markers printed by the guest's `/init`.
pub mod marker {
    pub const READY: &str = "MBANK-GUEST-READY";
    pub const JOB: &str = "MBANK-JOB";
    pub const DONE: &str = "MBANK-JOB-DONE";
    pub const FAILED: &str = "MBANK-JOB-FAILED";
    pub const MD5: &str = "MBANK-MD5";
    pub const FILE_BEGIN: &str = "MBANK-FILE-BEGIN";
    pub const FILE_END: &str = "MBANK-FILE-END";
    pub const COUNTER: &str = "MBANK-COUNTER";
}

/// The built guest: a kernel and an initramfs in the cache.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The disk given to the guest as virtio-blk (`/dev/vda`).
#[derive(Debug, Clone)]
pub enum DriveSpec {
    /// No disk (enough for `ready` and `counter`).
    None,
    /// A raw image file.
    Raw(PathBuf),
    /// The default export of an NBD server listening on a unix socket.
    Nbd(PathBuf),
    /// A named export of an NBD server listening on a unix socket.
    NbdExport { socket: PathBuf, export: String },
    /// Anything else: the value of one `-drive` option.
    Custom(String),
}

impl DriveSpec {
    /// The QEMU `-drive` value, or `None` for no disk. The NBD form is the one that
    /// QEMU 7.2 and 10 both take.
    pub fn drive_arg(&self) -> Option<String> {
        match self {
            DriveSpec::None => None,
            DriveSpec::Raw(p) => Some(format!("file={},format=raw,if=virtio", qemu_escape(p))),
            DriveSpec::Nbd(s) => Some(format!(
                "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},if=virtio",
                qemu_escape(s)
            )),
            DriveSpec::NbdExport { socket, export } => Some(format!(
                "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={},if=virtio",
                qemu_escape(socket),
                export.replace(',', ",,")
            )),
            DriveSpec::Custom(s) => Some(s.clone()),
        }
    }
}

/// QEMU option values double their commas.
fn qemu_escape(p: &Path) -> String {
    p.to_str().expect("path is not UTF-8").replace(',', ",,")
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-guest.sh")
}

static BUILT: OnceLock<Result<Guest, String>> = OnceLock::new();

impl Guest {
    /// Runs `scripts/build-guest.sh` once per test process (it returns at once when the
    /// guest is cached) and returns the kernel and initramfs. Panics with the script's
    /// output when it fails.
    pub fn build() -> &'static Guest {
        let built = BUILT.get_or_init(|| {
            let script = script_path();
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}):\n{stdout}\n{stderr}",
                    script.display(),
                    out.status
                ));
            }
            let value = |key: &str| {
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("no {key} in the output of build-guest.sh:\n{stdout}"))
            };
            Ok(Guest {
                kernel: value("KERNEL=")?,
                initrd: value("INITRD=")?,
            })
        });
        match built {
            Ok(g) => g,
            Err(e) => panic!("building the test guest: {e}"),
        }
    }

    /// The QEMU command for one boot: TCG, serial console on stdout, no other devices.
    /// Add options (QMP, `-incoming`, ...) before handing it to [`RunningGuest::spawn`].
    pub fn command(&self, job: &str, extra_append: &str, drives: &[DriveSpec]) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"]);
        c.args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ]);
        c.arg("-kernel").arg(&self.kernel);
        c.arg("-initrd").arg(&self.initrd);
        let append = format!("console=ttyS0 panic=-1 mbank.job={job} {extra_append}");
        c.arg("-append").arg(append.trim_end());
        for d in drives {
            if let Some(arg) = d.drive_arg() {
                c.arg("-drive").arg(arg);
            }
        }
        c
    }

    /// Boots `job` with one disk and waits until QEMU exits (the guest powers off at the
    /// end of every job but `counter` and `shell`). Panics with the serial log if it has
    /// not exited within `timeout`.
    pub fn run_job(
        &self,
        job: &str,
        extra_append: &str,
        drive: DriveSpec,
        timeout: Duration,
    ) -> GuestOutput {
        RunningGuest::spawn(self.command(job, extra_append, &[drive])).wait_exit(timeout)
    }

    /// Like [`Guest::run_job`], and panics with the serial log unless the job printed
    /// `MBANK-JOB-DONE` and no `MBANK-JOB-FAILED`.
    pub fn run_job_ok(
        &self,
        job: &str,
        extra_append: &str,
        drive: DriveSpec,
        timeout: Duration,
    ) -> GuestOutput {
        let out = self.run_job(job, extra_append, drive, timeout);
        out.assert_done();
        out
    }
}

/// Builds the guest (once) and boots `job`; see [`Guest::run_job`].
pub fn run_job(job: &str, extra_append: &str, drive: DriveSpec, timeout: Duration) -> GuestOutput {
    Guest::build().run_job(job, extra_append, drive, timeout)
}

#[derive(Default)]
struct Captured {
    serial: String,
    stderr: String,
    stdout_closed: bool,
}

type Shared = Arc<(Mutex<Captured>, Condvar)>;

/// A QEMU process whose serial console (stdout) and stderr are being collected.
/// Dropping it kills QEMU.
pub struct RunningGuest {
    child: Option<Child>,
    shared: Shared,
    readers: Vec<JoinHandle<()>>,
    what: String,
}

impl RunningGuest {
    /// Starts `cmd` (usually from [`Guest::command`]) with stdin closed and its output
    /// captured.
    pub fn spawn(mut cmd: Command) -> RunningGuest {
        let what = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let shared: Shared = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        readers.push(reader(stdout, shared.clone(), true));
        readers.push(reader(stderr, shared.clone(), false));
        RunningGuest {
            child: Some(child),
            shared,
            readers,
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("guest already reaped").id()
    }

    /// The serial console so far (`\r` removed).
    pub fn serial(&self) -> String {
        self.shared.0.lock().unwrap().serial.clone()
    }

    /// Waits until the serial console holds `count` lines containing `marker`; returns
    /// the last such line. Panics with the log on timeout or if QEMU exits first.
    pub fn wait_for_count(&mut self, marker: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut cap = lock.lock().unwrap();
        loop {
            // Complete lines only: one still being written may hold half a value.
            let complete = cap.serial.rfind('\n').map_or("", |end| &cap.serial[..end]);
            let hits: Vec<&str> = complete.lines().filter(|l| l.contains(marker)).collect();
            if hits.len() >= count {
                return hits[count - 1].to_string();
            }
            if cap.stdout_closed {
                let log = format_log(&cap.serial, &cap.stderr);
                drop(cap);
                self.kill();
                panic!(
                    "QEMU exited before printing {marker:?} ({count}x): {}\n{log}",
                    self.what
                );
            }
            let now = Instant::now();
            if now >= deadline {
                let log = format_log(&cap.serial, &cap.stderr);
                drop(cap);
                self.kill();
                panic!(
                    "timed out after {timeout:?} waiting for {marker:?}: {}\n{log}",
                    self.what
                );
            }
            cap = cv.wait_timeout(cap, deadline - now).unwrap().0;
        }
    }

    /// Waits for the first line containing `marker`.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_for_count(marker, 1, timeout)
    }

    /// Waits until QEMU exits by itself; on timeout kills it and panics with the log.
    pub fn wait_exit(mut self, timeout: Duration) -> GuestOutput {
        let deadline = Instant::now() + timeout;
        let status = loop {
            let child = self.child.as_mut().expect("guest already reaped");
            if let Some(st) = child.try_wait().expect("waiting for QEMU") {
                break st;
            }
            if Instant::now() >= deadline {
                self.kill();
                let out = self.finish(None);
                panic!(
                    "QEMU did not exit within {timeout:?}, killed: {}\n{}",
                    self.what,
                    format_log(&out.serial, &out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        self.finish(Some(status))
    }

    /// Kills QEMU (SIGKILL) and returns what it printed.
    pub fn kill_and_collect(mut self) -> GuestOutput {
        self.kill();
        self.finish(None)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn finish(&mut self, status: Option<ExitStatus>) -> GuestOutput {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let cap = self.shared.0.lock().unwrap();
        GuestOutput {
            serial: cap.serial.clone(),
            stderr: cap.stderr.clone(),
            status,
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn reader(mut src: impl Read + Send + 'static, shared: Shared, is_serial: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let (lock, cv) = &*shared;
            let mut cap = lock.lock().unwrap();
            if n == 0 {
                if is_serial {
                    cap.stdout_closed = true;
                }
                cv.notify_all();
                return;
            }
            let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            if is_serial {
                cap.serial.push_str(&text);
            } else {
                cap.stderr.push_str(&text);
            }
            cv.notify_all();
        }
    })
}

fn format_log(serial: &str, stderr: &str) -> String {
    format!("--- serial console ---\n{serial}\n--- qemu stderr ---\n{stderr}\n--- end ---")
}

/// What one boot printed.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The serial console, `\r` removed.
    pub serial: String,
    /// QEMU's own stderr.
    pub stderr: String,
    /// QEMU's exit status, `None` when it was killed by the harness.
    pub status: Option<ExitStatus>,
}

impl GuestOutput {
    /// Serial log and stderr, for panic messages.
    pub fn log(&self) -> String {
        format_log(&self.serial, &self.stderr)
    }

    pub fn has(&self, marker: &str) -> bool {
        self.serial.lines().any(|l| l.contains(marker))
    }

    /// What follows `marker ` on each line that holds it (kernel messages may share a
    /// line with a marker, so the marker is looked for anywhere in the line).
    pub fn values(&self, marker: &str) -> Vec<String> {
        let with_space = format!("{marker} ");
        self.serial
            .lines()
            .filter_map(|l| {
                l.find(&with_space)
                    .map(|i| l[i + with_space.len()..].trim().to_string())
            })
            .collect()
    }

    /// The md5 the guest printed for `file` on its disk (the last one, if several).
    pub fn md5(&self, file: &str) -> Option<String> {
        self.values(marker::MD5).into_iter().rev().find_map(|v| {
            let (name, sum) = v.split_once(' ')?;
            (name == file).then(|| sum.trim().to_string())
        })
    }

    /// The content the `check` job printed for `file` (lines between the markers, joined
    /// with `\n`, without the final newline).
    pub fn file_content(&self, file: &str) -> Option<String> {
        let begin = format!("{} {file}", marker::FILE_BEGIN);
        let end = format!("{} {file}", marker::FILE_END);
        let mut lines = self.serial.lines();
        lines.by_ref().find(|l| l.trim_end().ends_with(&begin))?;
        let mut body = Vec::new();
        for l in lines {
            if l.trim_end().ends_with(&end) {
                return Some(body.join("\n"));
            }
            body.push(l);
        }
        None
    }

    /// The values of the `counter` job's `MBANK-COUNTER <n>` lines, in order.
    pub fn counters(&self) -> Vec<u64> {
        self.values(marker::COUNTER)
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect()
    }

    /// Panics with the log unless the job finished and reported no failure.
    pub fn assert_done(&self) {
        assert!(
            self.has(marker::DONE) && !self.has(marker::FAILED),
            "the guest job did not finish cleanly\n{}",
            self.log()
        );
    }
}

/// Makes `path` a fresh raw ext4 image of `mib` MiB (`mkfs.ext4 -F -q`).
pub fn make_ext4(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(mib << 20).expect("size image");
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a unix socket at `path` is listening, read from `/proc/net/unix` (without
/// connecting, which some servers would log as a failed client).
pub fn socket_listening(path: &Path) -> bool {
    const ACCEPTCON: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == ACCEPTCON && f[7..].join(" ") == want
    })
}

/// Waits until a server listens on the unix socket `path` (absolute); panics if
/// `server` exits first or after `timeout`.
pub fn wait_for_socket(path: &Path, timeout: Duration, server: &mut Child) {
    let deadline = Instant::now() + timeout;
    loop {
        // A server may bind a temp name and rename it into place (mbank attach does,
        // so the socket never exists with loose permissions); /proc/net/unix then shows
        // the old name, so also try a connection.
        if socket_listening(path) || std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(st)) = server.try_wait() {
            panic!("the server for {} exited early: {st}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {} after {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-nbd --persistent` serving a raw image on a unix socket; stopped on drop.
pub struct QemuNbd {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl QemuNbd {
    pub fn serve(image: &Path, socket: &Path) -> QemuNbd {
        let socket = &std::path::absolute(socket).expect("absolute socket path");
        let mut child = Command::new("qemu-nbd")
            .arg("--socket")
            .arg(socket)
            .args(["-f", "raw", "--persistent"])
            .arg(image)
            .stdin(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        wait_for_socket(socket, Duration::from_secs(30), &mut child);
        QemuNbd {
            child: Some(child),
            socket: socket.to_path_buf(),
        }
    }

    pub fn drive(&self) -> DriveSpec {
        DriveSpec::Nbd(self.socket.clone())
    }

    /// Asks qemu-nbd to finish (SIGTERM: it flushes and exits) and waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; `pid` is our own child, not yet reaped,
        // so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A hang guard for one boot with the root on the disk: the disk's systemd takes tens of
/// seconds under TCG, more on a loaded machine.
pub const ROOT_BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The kernel command line option that makes the initramfs mount `/dev/vda` and
/// `switch_root` into the disk's own system (whose jobs keep their files in /srv/mbank).
pub const ROOT_ON_VDA: &str = "mbank.root=/dev/vda";

/// Printed by the initramfs just before it switches to the root on the disk.
pub const SWITCH_ROOT_MARKER: &str = "MBANK-SWITCH-ROOT";

static ROOT_DISK: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The root disk built (once, cached; the first build runs debootstrap, as root) by
/// `scripts/build-guest.sh rootdisk`: a raw ext4 Debian 12 system that boots systemd and
/// runs the `mbank.job=` jobs. It is shared: import it or copy it, never boot it in place.
pub fn root_disk() -> &'static Path {
    let built = ROOT_DISK.get_or_init(|| {
        let script = script_path();
        let out = Command::new("bash")
            .arg(&script)
            .arg("rootdisk")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{} rootdisk failed ({}):\n{stdout}\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("ROOTDISK="))
            .map(PathBuf::from)
            .ok_or_else(|| {
                format!("no ROOTDISK= in the output of build-guest.sh rootdisk:\n{stdout}")
            })
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("building the root disk: {e}"),
    }
}
