//! `mbank run` and `mbank suspend`: a machine as a running virtual PC.
//!
//! This file is the user interface and QEMU; the session itself (lease, heartbeat,
//! fetches through the station cache, check-in) is an `mbank_station::Session`.
//!
//! `run` checks the machine out on this station (the lease), serves its disk over NBD
//! on a socket in the session directory, and starts QEMU with a QMP control socket.
//! A version holding a memory state is resumed: QEMU starts paused with `-incoming`
//! reading the state from a FIFO that a thread fills from the bank (through the station
//! cache, several chunks in flight), then continues. The session ends when:
//!
//! - the guest powers off (QEMU exits): the disk is checked in;
//! - `mbank suspend` (over `<session>/control.sock`), SIGTERM, or Ctrl-C and "suspend":
//!   the guest is paused, its memory state streams out through QMP migration
//!   (`exec:cat > FIFO`) into content-defined chunks, and one version holds disk and
//!   memory;
//! - Ctrl-C and "power off": ACPI power button, then a hard stop if the guest ignores it.
//!
//! The control socket takes one request a connection: `attach` (a front: the session's
//! messages, then its outcome), `suspend`, `poweroff`, and `stats`, answered with one JSON
//! line `{"ok": true, "stats": {...}}` holding the session's statistics so far
//! (`mbank_station::device::SessionStats`: bytes fetched, misses the guest waited on and
//! their wait, prefetch hits, the working set recorded and replayed).
//!
//! QEMU runs in its own process group (a terminal's Ctrl-C reaches only `mbank`) and
//! dies with `mbank` (`PR_SET_PDEATHSIG`); a `run` killed with -9 leaves its session
//! for the next `mbank` on the station to recover, like `attach`.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mbank_bank::{Bank, ImportOptions, Progress, StreamStats, Unit};
use mbank_core::{MachineRef, MemoryIndex};
use mbank_nbd::ServerOptions;
use mbank_station::device::{Disk, NbdDisk};
use mbank_station::memory::{
    LazyRam, RAM_CHUNK, RAM_SET_STREAM, RAM_STREAM, RamStats, RamStatsHandle, SavedRam,
    decode_ram_set, ram_set_bound,
};
use mbank_station::{CheckinExtras, Session, SessionOptions, SessionReport, Station};
use mbank_vm::qmp::Qmp;
use mbank_vm::thp::HugePageAdvice;
use mbank_vm::{Accel, Boot, Display, Launch, MachineConfig, SavedHardware};
use serde::Serialize;

use crate::attach::{checkin_failed, describe};
use crate::fmt::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// user/name for the head, or user/name@VERSION.
    pub machine: MachineRef,
    /// Serial console on this terminal instead of a screen (for scripts and tests).
    #[arg(long)]
    pub console: bool,
    /// Show the screen over VNC at this address (unix:PATH or HOST:DISPLAY)
    /// [default: a window on a desktop, else VNC on a socket in the session].
    #[arg(long, value_name = "ADDR", conflicts_with = "console")]
    pub vnc: Option<String>,
    /// Accelerator: kvm or tcg [default: kvm where it works].
    #[arg(long, value_name = "ACCEL")]
    pub accel: Option<mbank_vm::Accel>,
    /// Add to the kernel command line for this boot (kernel-boot machines only).
    #[arg(long, value_name = "TEXT")]
    pub append: Option<String>,
    /// Take the machine over from the session holding it.
    #[arg(long)]
    pub force: bool,
    /// Keep the guest's RAM on the station's lazy memory file system: a suspend stores
    /// the device state and the RAM chunks written since the start, a resume fetches RAM
    /// chunks as the guest touches them (a version suspended so always resumes so).
    #[arg(long, env = "MBANK_LAZY_MEMORY")]
    pub lazy_memory: bool,
    #[command(flatten)]
    pub session: crate::attach::SessionFlags,
    /// Worker threads (the global `-j`).
    #[arg(skip)]
    pub jobs: usize,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    /// The guest powered itself off (or was powered off on request).
    Poweroff,
    /// Memory and disk were saved; `run` resumes.
    Suspend,
    /// QEMU stopped on its own with an error; the disk was checked in as after a
    /// power loss.
    Crash,
}

/// What `run --json` prints.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub machine: String,
    pub ending: Ending,
    pub resumed: bool,
    pub accel: Accel,
    /// Seconds from the start of `run` until the guest ran (after a resume, until the
    /// memory state was loaded).
    pub seconds_to_running: f64,
    pub memory_loaded_bytes: u64,
    pub memory_load_seconds: f64,
    pub memory_saved: Option<StreamStats>,
    pub memory_save_seconds: f64,
    /// With lazy memory: what the suspend stored of the RAM (`ram` stream), and what
    /// the RAM device did.
    pub ram_saved: Option<StreamStats>,
    /// With lazy memory: the dirty RAM chunks the suspend took from the background
    /// write-back instead of reading and sending them.
    pub ram_written_back: u64,
    pub ram: Option<RamStats>,
    pub session: SessionReport,
}

/// Requests over the control socket: a front that shows the session (`mbank run`
/// itself, or a later `mbank run` of the same machine on this station), `mbank
/// suspend`, `mbank poweroff`. Each connection then receives the session's messages
/// and, at the end, one JSON line with the outcome.
enum Request {
    Suspend(UnixStream),
    Poweroff(UnixStream, PowerOff),
}

/// How `mbank poweroff` waits for the guest after pressing the power button.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PowerOff {
    /// Seconds to wait for the guest to power itself off.
    pub timeout: u64,
    /// After the timeout, switch the machine off (quit QEMU) rather than give up.
    pub force: bool,
}

impl PowerOff {
    /// What a bare `poweroff` request (the Ctrl-C menu) means: the button, then a
    /// forced switch-off after a minute.
    pub const MENU: PowerOff = PowerOff {
        timeout: POWERDOWN_GRACE.as_secs(),
        force: true,
    };

    /// Parses the control socket's `poweroff` line: bare, or followed by this as JSON.
    fn parse(rest: &str) -> Result<PowerOff, String> {
        if rest.trim().is_empty() {
            return Ok(PowerOff::MENU);
        }
        serde_json::from_str(rest).map_err(|e| format!("bad poweroff request {rest:?}: {e}"))
    }
}

/// One `poweroff` waiting for the guest: where to answer if it gives up, and when.
struct PowerWait {
    conn: Option<UnixStream>,
    deadline: Instant,
    how: PowerOff,
}

/// Where a supervised session's messages go: its log file, and every front attached.
/// Before the session is ready they go to standard output (read by the front that
/// started it) as `say <text>` lines.
pub struct Hub {
    ready: AtomicBool,
    fronts: Mutex<Vec<UnixStream>>,
    log: Mutex<Option<std::fs::File>>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            ready: AtomicBool::new(false),
            fronts: Mutex::new(Vec::new()),
            log: Mutex::new(None),
        }
    }

    fn line(&self, line: &str) {
        if let Some(f) = &mut *self.log.lock().expect("hub lock") {
            let _ = writeln!(f, "{line}");
        }
        if self.ready.load(Ordering::SeqCst) {
            // A front that went away (detached) is dropped.
            self.fronts
                .lock()
                .expect("hub lock")
                .retain_mut(|c| writeln!(c, "{line}").is_ok());
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "say {line}");
            let _ = out.flush();
        }
    }

    pub fn say(&self, s: &str) {
        for l in s.lines() {
            self.line(l);
        }
    }

    fn add(&self, c: UnixStream) {
        self.fronts.lock().expect("hub lock").push(c);
    }

    /// The session is up: fronts may attach; standard output and error are done with.
    fn set_ready(&self, session: &str, log: &Path) {
        *self.log.lock().expect("hub lock") = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .ok();
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ready {session}");
            let _ = out.flush();
        }
        self.ready.store(true, Ordering::SeqCst);
        // Nobody reads them once the front that started us goes; a write to a closed
        // pipe must not fail the session.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 on two valid descriptors; fds 1 and 2 stay open (now /dev/null).
            unsafe {
                libc::dup2(null.as_raw_fd(), 1);
                libc::dup2(null.as_raw_fd(), 2);
            }
        }
    }

    /// The final line for every front: `{"ok": true, "report": …}` or an error.
    fn finish(&self, result: &Result<RunReport>) {
        let line = match result {
            Ok(r) => serde_json::json!({ "ok": true, "report": r }),
            Err(e) => serde_json::json!({ "ok": false, "error": flatten(e) }),
        };
        if self.ready.load(Ordering::SeqCst) {
            self.line(&line.to_string());
        } else if let Err(e) = result {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "error {}", flatten(e).replace('\n', " "));
            let _ = out.flush();
        }
    }
}

/// An error with the causes its message does not already contain.
pub fn flatten(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

/// Progress of a supervised session's long steps, as lines with bytes and rate.
pub struct HubProgress<'a> {
    hub: &'a Hub,
    state: Mutex<(String, u64, u64, Instant, Instant)>,
}

impl<'a> HubProgress<'a> {
    pub fn new(hub: &'a Hub) -> Self {
        HubProgress {
            hub,
            state: Mutex::new((String::new(), 0, 0, Instant::now(), Instant::now())),
        }
    }
}

impl Progress for HubProgress<'_> {
    fn start(&self, what: &str, total: u64, _unit: Unit) {
        *self.state.lock().expect("progress lock") =
            (what.to_string(), total, 0, Instant::now(), Instant::now());
    }

    fn advance(&self, n: u64) {
        let mut st = self.state.lock().expect("progress lock");
        st.2 += n;
        if st.4.elapsed() >= Duration::from_secs(1) {
            st.4 = Instant::now();
            let rate = st.2 as f64 / st.3.elapsed().as_secs_f64().max(1e-3);
            let of = if st.1 > 0 {
                format!(" of {}", bytes(st.1))
            } else {
                String::new()
            };
            self.hub.say(&format!(
                "{}: {}{of} ({}/s)",
                st.0,
                bytes(st.2),
                bytes(rate as u64)
            ));
        }
    }

    fn finish(&self) {
        let st = self.state.lock().expect("progress lock");
        let secs = st.3.elapsed().as_secs_f64();
        if secs >= 1.0 {
            self.hub.say(&format!(
                "{}: {} in {secs:.1} s ({}/s)",
                st.0,
                bytes(st.2),
                bytes((st.2 as f64 / secs) as u64)
            ));
        }
    }
}

/// Seconds a guest gets to power off after the ACPI power button.
const POWERDOWN_GRACE: Duration = Duration::from_secs(60);

/// The file in a run session's directory that holds its VNC address, if it has one.
pub const DISPLAY_FILE: &str = "vnc";

fn session_file(disk: &Disk, name: &str) -> PathBuf {
    disk.dir.dir.join(name)
}

/// Where a session's Unix sockets live: a private directory with a short path
/// (`$XDG_RUNTIME_DIR` or `/tmp`, then `mbank-<session>`), because a socket's path
/// must fit in 108 bytes and a cache directory may be deep.
pub fn socket_dir(session: &str) -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join(format!("mbank-{session}"))
}

fn make_socket_dir(session: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = socket_dir(session);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by a crashed run of this session? Only if it is ours and private.
            let m = std::fs::symlink_metadata(&dir)?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if !m.is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
                bail!(
                    "{} exists and is not a private directory of this user; remove it",
                    dir.display()
                );
            }
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
}

/// Records SIGINT as 1 and SIGTERM as 2 in `s`, for a loop that polls it.
async fn record_signals(s: Arc<AtomicUsize>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => s.store(1, Ordering::SeqCst),
            _ = term.recv() => s.store(2, Ordering::SeqCst),
        }
    }
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// Shows the progress of a phase whose bytes another thread counts in `n`.
fn watch(progress: &dyn Progress, what: &str, total: u64, n: &AtomicU64, until: &AtomicBool) {
    progress.start(what, total, Unit::Bytes);
    let mut shown = 0;
    while !until.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let now = n.load(Ordering::Relaxed);
        progress.advance(now - shown);
        shown = now;
    }
    progress.finish();
}

/// A running QEMU with its control connection.
struct Vm {
    child: Child,
    qmp: Qmp,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().expect("stderr lock");
        let n = lines.len();
        lines[n.saturating_sub(5)..].join("; ")
    }

    /// Waits for QEMU to exit, up to `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_qemu(
    args: &[String],
    log: &Path,
    advice: HugePageAdvice,
) -> Result<(Child, Arc<Mutex<Vec<String>>>)> {
    let bin = mbank_vm::qemu_binary();
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // prctl(2), which is async-signal-safe; it touches no memory of the parent but
    // the seccomp program, a constant.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            advice.apply()
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // Not a missing binary: most likely the filter set before exec failed.
        Err(e) if advice == HugePageAdvice::Ignore && e.kind() != std::io::ErrorKind::NotFound => {
            bail!(
                "cannot start QEMU ({}) under the seccomp filter that keeps its huge-page \
                 advice off the lazily served RAM file: {e}; the kernel needs seccomp \
                 filters (CONFIG_SECCOMP_FILTER), or run without --lazy-memory",
                bin.display()
            )
        }
        Err(source) => {
            return Err(mbank_vm::VmError::NoQemu {
                binary: bin.clone(),
                source,
            }
            .into());
        }
    };
    let stderr = Arc::new(Mutex::new(Vec::new()));
    if let Some(err) = child.stderr.take() {
        let keep = stderr.clone();
        let log = log.to_path_buf();
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ok();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(f) = &mut file {
                    let _ = writeln!(f, "{line}");
                }
                eprintln!("qemu: {line}");
                keep.lock().expect("stderr lock").push(line);
            }
        });
    }
    Ok((child, stderr))
}

/// Accepts `mbank suspend` connections on the session's control socket.
fn spawn_control(
    path: &Path,
    tx: mpsc::Sender<Request>,
    hub: Arc<Hub>,
    disk: Arc<Disk>,
    ram: Option<RamStatsHandle>,
) -> Result<()> {
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(reader) = conn.try_clone() else {
                continue;
            };
            let mut line = String::new();
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            if BufReader::new(reader).read_line(&mut line).is_err() {
                continue;
            }
            let _ = conn.set_read_timeout(None);
            let req = match line.trim() {
                "attach" => {
                    hub.add(conn);
                    continue;
                }
                "stats" => {
                    let mut c = conn;
                    let _ = writeln!(
                        c,
                        "{}",
                        serde_json::json!({"ok": true, "stats": disk.stats(),
                            "ram": ram.as_ref().map(RamStatsHandle::stats)})
                    );
                    continue;
                }
                "suspend" => Request::Suspend(conn),
                l if l == "poweroff" || l.starts_with("poweroff ") => {
                    match PowerOff::parse(&l["poweroff".len()..]) {
                        Ok(how) => Request::Poweroff(conn, how),
                        Err(e) => {
                            let mut c = conn;
                            let _ = writeln!(c, "{}", serde_json::json!({"ok": false, "error": e}));
                            continue;
                        }
                    }
                }
                other => {
                    let mut c = conn;
                    let _ = writeln!(
                        c,
                        "{}",
                        serde_json::json!({"ok": false, "error": format!("unknown request {other:?}")})
                    );
                    continue;
                }
            };
            if tx.send(req).is_err() {
                return;
            }
        }
    });
    Ok(())
}

fn run(bank: &mut Bank, station: &Station, args: Args, hub: &Arc<Hub>) -> Result<RunReport> {
    let say = &|s: String| hub.say(&s);
    let started = Instant::now();
    let opts = ImportOptions {
        jobs: args.jobs,
        ..Default::default()
    };
    crate::attach::report_recovery(&station.recover(bank, &opts)?, say);
    let v = bank.resolve(&args.machine)?;
    let config = match &v.config {
        Some(c) => MachineConfig::from_json(c)
            .with_context(|| format!("{}@{}", v.machine, v.id.short()))?,
        None => {
            say(format!(
                "{} has no machine configuration (it was imported, not created); using {} MiB, {} CPU, booting from the disk",
                v.machine,
                MachineConfig::default().memory_mib,
                MachineConfig::default().cpus
            ));
            MachineConfig::new()
        }
    };
    if let Some(have) = mbank_vm::station_memory_mib()
        && config.memory_mib > have
    {
        bail!(
            "{} needs {} of memory, more than this station has ({})",
            v.machine,
            bytes(config.memory_mib << 20),
            bytes(have << 20)
        );
    }
    let resume = v.has_memory();
    if resume && args.append.is_some() {
        bail!(
            "{}@{} is suspended: it resumes where it stopped, so --append cannot change its kernel command line",
            v.machine,
            v.id.short()
        );
    }
    let (accel, machine_type) = match &config.saved {
        Some(saved) if resume => {
            if args.accel.is_some_and(|a| a != saved.accel) {
                bail!(
                    "{}@{} was suspended under {}; it can be resumed only under {}",
                    v.machine,
                    v.id.short(),
                    saved.accel.name(),
                    saved.accel.name()
                );
            }
            if saved.accel == Accel::Kvm && !mbank_vm::kvm_works() {
                bail!(
                    "{}@{} was suspended under KVM, which does not work on this station; resume it on a station with KVM, or run its parent version",
                    v.machine,
                    v.id.short()
                );
            }
            (saved.accel, saved.machine_type.clone())
        }
        _ => {
            let accel = match args.accel {
                Some(a) => a,
                None if mbank_vm::kvm_works() => Accel::Kvm,
                None => {
                    say("KVM does not work on this station; using TCG (slower)".into());
                    Accel::Tcg
                }
            };
            (accel, mbank_vm::resolve_machine_type(&config.machine_type)?)
        }
    };
    let qemu_version = mbank_vm::qemu_version()?;

    // The lease, the heartbeat, and fetches ahead of the kernel, the initrd and the
    // guest's first reads.
    let h = hub.clone();
    let mut session = Session::start(
        station,
        bank,
        &args.machine,
        &SessionOptions {
            force: args.force,
            whole_disk: false,
            say: Arc::new(move |s: String| h.say(&s)),
            checkpoint_minutes: args.session.checkpoint_minutes,
            writeback_mbit: args.session.writeback_mbit,
        },
    )?;
    let plan = Plan {
        v,
        config,
        accel,
        machine_type,
        qemu_version,
        resume,
        started,
    };
    run_session(bank, &mut session, plan, &args, hub)
}

/// What `run` decided before the session began: the version, its configuration and
/// the hardware it runs on.
struct Plan {
    v: mbank_catalog::VersionInfo,
    config: MachineConfig,
    accel: Accel,
    machine_type: String,
    qemu_version: String,
    resume: bool,
    started: Instant,
}

fn run_session(
    bank: &mut Bank,
    session: &mut Session<'_>,
    plan: Plan,
    args: &Args,
    hub: &Arc<Hub>,
) -> Result<RunReport> {
    let Plan {
        v,
        mut config,
        accel,
        machine_type,
        qemu_version,
        resume,
        started,
    } = plan;
    let (v, config, machine_type) = (&v, &mut config, machine_type.as_str());
    let disk = &session.disk().clone();
    let station = session.station();
    let say = &|s: String| hub.say(&s);
    let progress = &HubProgress::new(hub);
    let opts = ImportOptions {
        jobs: args.jobs,
        ..Default::default()
    };
    let machine = v.machine.to_string();
    let sockets = make_socket_dir(&disk.meta.session);
    let fail_clean = |bank: &mut Bank, session: &mut Session, e: anyhow::Error| -> anyhow::Error {
        // Nothing ran: give the machine back unchanged.
        let _ = std::fs::remove_dir_all(socket_dir(&disk.meta.session));
        match session.discard(bank) {
            Ok(_) => anyhow!("{e:#}; {machine} was released unchanged"),
            Err(d) => anyhow!("{e:#}; also, releasing {machine} failed: {d}"),
        }
    };
    let sockets = match sockets {
        Ok(d) => d,
        Err(e) => return Err(fail_clean(bank, session, e)),
    };
    // Kernel and initrd, from the bank through the station cache.
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    if let Boot::Kernel { .. } = config.boot {
        for name in ["kernel", "initrd"] {
            let Some(idx) = bank.catalog().stream(v, name)? else {
                continue;
            };
            let path = session_file(disk, name);
            let f = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let n = AtomicU64::new(0);
            if let Err(e) = session.fetch_stream(&idx, std::io::BufWriter::new(f), args.jobs, &n) {
                return Err(fail_clean(
                    bank,
                    session,
                    anyhow::Error::from(e).context(format!(
                        "cannot read the {name} of {machine}@{}",
                        v.id.short()
                    )),
                ));
            }
            files.push((name.to_string(), path));
        }
    }
    let file = |n: &str| files.iter().find(|(k, _)| k == n).map(|(_, p)| p.as_path());
    // The disk service.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let disk_socket = sockets.join("disk.sock");
    let end_service = Arc::new(tokio::sync::Notify::new());
    let service = {
        let end = end_service.clone();
        let device = Arc::new(NbdDisk(disk.clone()));
        let sopts = ServerOptions {
            export_name: machine.clone(),
            description: Some(format!("Machine Bank: {machine}")),
            sparse_reads: false,
            ..Default::default()
        };
        let path = disk_socket.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let h = rt.spawn(async move {
            let path2 = path.clone();
            let fut = mbank_nbd::serve_unix(path, device, sopts, async move {
                end.notified().await;
            });
            // serve_unix binds before its first await point returns control.
            let _ = ready_tx.send(());
            let r = fut.await;
            let _ = std::fs::remove_file(path2);
            r
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        h
    };
    // Wait for the socket to exist before QEMU connects to it.
    let t = Instant::now();
    while !disk_socket.exists() && t.elapsed() < Duration::from_secs(10) {
        if service.is_finished() {
            let e = match rt.block_on(service) {
                Ok(Err(e)) => anyhow!("cannot serve the disk on {}: {e}", disk_socket.display()),
                Ok(Ok(())) => anyhow!("the disk service ended at once"),
                Err(e) => anyhow!("the disk service failed: {e}"),
            };
            return Err(fail_clean(bank, session, e));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Lazy memory: the guest's RAM on the station's memory file system.
    let ram = match lazy_ram(bank, session, v, config, args.lazy_memory, say) {
        Ok(r) => r,
        Err(e) => {
            end_service.notify_one();
            let _ = rt.block_on(service);
            return Err(fail_clean(bank, session, e));
        }
    };
    // The RAM goes to the bank in the background too, under the disk's write-back cap.
    if let (Some(ram), Some((writer, pacer))) = (&ram, session.writeback()) {
        let d = disk.clone();
        let h = hub.clone();
        ram.start_writeback(
            bank.store_arc(),
            writer,
            pacer,
            move || d.guest_waiting(),
            Arc::new(move |s: String| h.say(&s)),
        );
    }
    let ram_stats = ram.as_ref().map(LazyRam::stats_handle);
    // Fronts and `mbank suspend` may connect from now on.
    let (tx, requests) = mpsc::channel();
    if let Err(e) = spawn_control(
        &sockets.join("control.sock"),
        tx,
        hub.clone(),
        disk.clone(),
        ram_stats.clone(),
    ) {
        end_service.notify_one();
        let _ = rt.block_on(service);
        return Err(fail_clean(bank, session, e));
    }
    hub.set_ready(&disk.meta.session, &session_file(disk, "run.log"));
    let signals = Arc::new(AtomicUsize::new(0)); // 1 = SIGINT, 2 = SIGTERM
    {
        let s = signals.clone();
        rt.spawn(record_signals(s));
    }
    let stop_service = |rt: &tokio::runtime::Runtime| {
        end_service.notify_one();
        end_service.notify_waiters();
        let _ = rt.block_on(service);
    };

    let qmp_socket = sockets.join("qmp.sock");
    let serial_log = session_file(disk, "console.log");
    let mem_in = session_file(disk, "memory.in");
    if resume {
        mbank_vm::make_fifo(&mem_in)?;
    }
    let display = if args.console {
        Display::Console {
            socket: sockets.join("console.sock"),
            log: serial_log.clone(),
        }
    } else if let Some(vnc) = &args.vnc {
        Display::Vnc(vnc.clone())
    } else if mbank_vm::window_available() {
        Display::Window
    } else {
        Display::Vnc(format!("unix:{}", sockets.join("vnc.sock").display()))
    };
    let launch = Launch {
        name: &machine,
        config,
        accel,
        machine_type,
        disk_socket: &disk_socket,
        qmp_socket: &qmp_socket,
        kernel: file("kernel"),
        initrd: file("initrd"),
        extra_append: args.append.as_deref(),
        display: display.clone(),
        serial_log: &serial_log,
        incoming: resume.then_some(mem_in.as_path()),
        shared_ram: ram.as_ref().map(LazyRam::file),
    };
    let qargs = mbank_vm::qemu_args(&launch)?;
    if let Display::Vnc(to) = &display {
        // For `mbank status`: where this session's screen is.
        std::fs::write(session_file(disk, DISPLAY_FILE), to)
            .context("cannot record the session's VNC address")?;
    }
    std::fs::write(session_file(disk, "qemu.args"), qargs.join("\n"))
        .context("cannot record the QEMU command line")?;
    // A lazily served RAM file must not carry QEMU's MADV_HUGEPAGE: the kernel would
    // read 4 MiB around every guest fault (mbank_vm::thp).
    let advice = if ram.is_some() {
        HugePageAdvice::Ignore
    } else {
        HugePageAdvice::Keep
    };
    let (child, stderr) = match spawn_qemu(&qargs, &session_file(disk, "qemu.log"), advice) {
        Ok(x) => x,
        Err(e) => {
            stop_service(&rt);
            return Err(fail_clean(bank, session, e));
        }
    };
    let mut vm = Vm {
        qmp: match Qmp::connect(&qmp_socket, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                stop_service(&rt);
                let tail = stderr.lock().expect("stderr lock").join("; ");
                return Err(fail_clean(
                    bank,
                    session,
                    anyhow!("QEMU did not start: {e} {tail}"),
                ));
            }
        },
        child,
        stderr,
    };

    // Resume: feed the memory state, wait for QEMU to load it, continue.
    let mut memory_loaded_bytes = 0;
    let mut memory_load_seconds = 0.0;
    if resume {
        let t = Instant::now();
        let idx = bank
            .catalog()
            .stream(v, "memory")?
            .context("the version's memory state is missing")?;
        let total = idx.total_len;
        if ram.is_some() {
            // The state goes in only now, after x-ignore-shared where the RAM was saved.
            // (The version's stream names say it; the index itself was read once, for
            // the mount: at 4 GiB of RAM it is a megabyte or two over the link.)
            let ram_saved = v.streams.iter().any(|s| s == RAM_STREAM);
            if let Err(e) = incoming_lazy(&mut vm.qmp, &mem_in, ram_saved) {
                vm.kill();
                stop_service(&rt);
                return Err(fail_clean(bank, session, e));
            }
        }
        let n = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let fed = std::thread::scope(|s| {
            let feeder = s.spawn(|| {
                let r = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&mem_in)
                    .context("cannot open the memory FIFO")
                    .and_then(|f| {
                        let out = std::io::BufWriter::with_capacity(1 << 20, f);
                        Ok(session.fetch_stream(&idx, out, args.jobs, &n)?)
                    });
                done.store(true, Ordering::Relaxed);
                r
            });
            s.spawn(|| watch(progress, "loading memory", total, &n, &done));
            feeder.join().expect("feeder thread")
        });
        if let Err(e) = fed {
            vm.kill();
            stop_service(&rt);
            return Err(fail_clean(
                bank,
                session,
                e.context(format!(
                    "the saved memory of {machine}@{} cannot be read; that version's disk and every older version are untouched (run an older one with `mbank run {machine}@VERSION`, see `mbank log {machine}`)",
                    v.id.short()
                )),
            ));
        }
        // QEMU has the whole stream; wait until it has loaded it.
        let loaded = loop {
            match vm.qmp.migration() {
                Ok((s, _, _)) if s == "completed" => break Ok(()),
                Ok((s, _, err)) if s == "failed" => {
                    break Err(anyhow!(
                        "QEMU could not load the memory state: {}",
                        err.unwrap_or_default()
                    ));
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => break Err(anyhow!("QEMU stopped while loading the memory state: {e}")),
            }
        };
        if let Err(e) = loaded {
            let tail = vm.stderr_tail();
            vm.kill();
            stop_service(&rt);
            return Err(fail_clean(bank, session, e.context(tail)));
        }
        vm.qmp.execute("cont", None)?;
        memory_loaded_bytes = total;
        memory_load_seconds = t.elapsed().as_secs_f64();
        say(format!(
            "resumed {machine}@{}: loaded {} of memory in {:.1} s{}",
            v.id.short(),
            bytes(total),
            memory_load_seconds,
            display_note(&display)
        ));
    } else {
        say(format!(
            "booting {machine}@{} ({} MiB, {} CPU, {}){}",
            v.id.short(),
            config.memory_mib,
            config.cpus,
            accel.name(),
            display_note(&display)
        ));
    }
    let seconds_to_running = started.elapsed().as_secs_f64();
    say(format!(
        "{machine} is running; `mbank suspend {machine}` (or Ctrl-C, or SIGTERM) ends the session and keeps everything"
    ));

    // The session.
    let mut waiting_since: Option<Instant> = None;
    let mut power_waits: Vec<PowerWait> = Vec::new();
    let mut shutdown_seen = false;
    let mut memory_saved = None;
    let mut ram_saved = None;
    let mut ram_written_back = 0;
    let mut memory_save_seconds = 0.0;
    let mut streams = Vec::new();
    let mut streams_stored = (0, 0);
    let mut writer_guard = None;
    // Saves the memory state; on failure the guest goes on running and nothing is lost.
    let mut try_suspend = |vm: &mut Vm, bank: &mut Bank| -> Result<()> {
        let t = Instant::now();
        say("pausing the guest and saving its memory".into());
        let (idx, stats, guard, ram_idx) =
            save_memory(bank, vm, disk, config, progress, ram.as_ref())?;
        memory_save_seconds = t.elapsed().as_secs_f64();
        say(format!(
            "saved {} of memory in {:.1} s: {} new in the bank",
            bytes(stats.bytes),
            memory_save_seconds,
            bytes(stats.bytes_stored)
        ));
        streams.push(("memory".to_string(), idx));
        streams_stored = (stats.chunks_new, stats.bytes_stored);
        if let Some(SavedRam {
            index,
            stats: st,
            working_set,
            written_back,
        }) = ram_idx
        {
            say(format!(
                "saved the guest's RAM: {} chunks new in the bank ({}), {} sent during the session",
                st.chunks_new,
                bytes(st.bytes_stored),
                written_back
            ));
            streams.push((RAM_STREAM.to_string(), index));
            if let Some((ws, _)) = working_set {
                streams.push((RAM_SET_STREAM.to_string(), ws));
            }
            streams_stored.0 += st.chunks_new;
            streams_stored.1 += st.bytes_stored;
            ram_saved = Some(st);
            ram_written_back = written_back;
        }
        memory_saved = Some(stats);
        writer_guard = Some(guard);
        Ok(())
    };
    let suspend_failed = |e: &anyhow::Error| {
        say(format!(
            "saving the memory state failed: {}; {machine} keeps running (try again, or power it off)",
            flatten(e)
        ));
    };
    let ending = loop {
        if let Ok(Some(st)) = vm.child.try_wait() {
            // The guest powered off, or QEMU died.
            let asked = waiting_since.is_some();
            let events = vm.qmp.take_events();
            let guest_off = shutdown_seen || events.iter().any(|e| e.name == "SHUTDOWN");
            break if st.success() || guest_off || asked {
                Ending::Poweroff
            } else {
                say(format!(
                    "QEMU stopped unexpectedly ({st}): {}",
                    vm.stderr_tail()
                ));
                Ending::Crash
            };
        }
        let now = Instant::now();
        if let Some(w) = power_waits
            .iter()
            .find(|w| w.how.force && now >= w.deadline)
        {
            say(format!(
                "the guest did not power off within {} s; switching it off like pulling the \
                 plug (the disk keeps what the guest flushed; writes it had not flushed are lost)",
                w.how.timeout
            ));
            let _ = vm.qmp.execute("quit", None);
            vm.wait_exit(Duration::from_secs(10));
            vm.kill();
            break Ending::Poweroff;
        }
        // A poweroff that may not force gives up at its deadline: the guest runs on.
        power_waits.retain_mut(|w| {
            if now < w.deadline {
                return true;
            }
            if let Some(c) = w.conn.take() {
                give_up(c, &machine, w.how.timeout);
            }
            false
        });
        if power_waits.is_empty() && !shutdown_seen {
            waiting_since = None;
        }
        match requests.try_recv() {
            Ok(Request::Suspend(mut c)) => match try_suspend(&mut vm, bank) {
                Ok(()) => {
                    hub.add(c);
                    break Ending::Suspend;
                }
                Err(e) => {
                    suspend_failed(&e);
                    let _ = writeln!(
                        c,
                        "{}",
                        serde_json::json!({"ok": false, "error": format!("{}; the machine keeps running", flatten(&e))})
                    );
                }
            },
            Ok(Request::Poweroff(c, how)) => {
                // The waiter hears the session's messages, and its own answer if it
                // gives up.
                let own = c.try_clone().ok();
                hub.add(c);
                if waiting_since.is_none() {
                    say("pressing the power button".into());
                    let _ = vm.qmp.execute("system_powerdown", None);
                    waiting_since = Some(Instant::now());
                }
                power_waits.push(PowerWait {
                    conn: own,
                    // A year is as good as for ever, and cannot overflow an Instant.
                    deadline: Instant::now() + Duration::from_secs(how.timeout.min(31_536_000)),
                    how,
                });
            }
            Err(_) => {}
        }
        if signals.swap(0, Ordering::SeqCst) != 0 {
            match try_suspend(&mut vm, bank) {
                Ok(()) => break Ending::Suspend,
                Err(e) => suspend_failed(&e),
            }
        }
        // Events (and a poll of QEMU) every 100 ms.
        if let Ok(Some(e)) = vm.qmp.wait_event(Duration::from_millis(100))
            && e.name == "SHUTDOWN"
        {
            shutdown_seen = true;
        }
    };

    // Suspended: the memory is saved; stop QEMU.
    if ending == Ending::Suspend {
        config.saved = Some(SavedHardware {
            accel,
            machine_type: machine_type.to_string(),
            qemu_version: qemu_version.to_string(),
        });
        let _ = vm.qmp.execute("quit", None);
        if vm.wait_exit(Duration::from_secs(30)).is_none() {
            vm.kill();
        }
    }
    stop_service(&rt);
    drop(rt);
    let _ = std::fs::remove_dir_all(&sockets);
    let ram_final = ram_stats.as_ref().map(RamStatsHandle::stats);
    if let Some(r) = ram
        && let Err(e) = r.unmount()
    {
        say(format!("warning: {e}"));
    }

    // Check in.
    if ending != Ending::Suspend {
        config.saved = None;
    }
    config.machine_type = machine_type.to_string();
    let extras = CheckinExtras {
        config: Some(config.to_json()),
        streams,
        // A version with memory is always made on suspend; after a power-off, a base
        // that held memory must not be resumed again.
        always: ending == Ending::Suspend || (resume && ending == Ending::Poweroff),
        streams_stored,
        // A machine's first boot stores the working set it recorded.
        first_working_set: true,
    };
    let report = session
        .check_in(bank, &extras, &opts, progress)
        .map_err(|e| {
            let lost = (ending == Ending::Suspend).then_some(
                "the saved memory state is not: the machine will boot from its disk, as after a power loss",
            );
            checkin_failed(e, bank, station, disk, lost)
        })?;
    drop(writer_guard);
    for w in &report.warnings {
        say(format!("warning: {w}"));
    }
    say(describe(&report));
    let session = report;
    let report = RunReport {
        machine,
        ending,
        resumed: resume,
        accel,
        seconds_to_running,
        memory_loaded_bytes,
        memory_load_seconds,
        memory_saved,
        memory_save_seconds,
        ram_saved,
        ram_written_back,
        ram: ram_final,
        session,
    };
    if ending == Ending::Crash
        && let Some(ram) = &report.ram
        && ram.fetch_errors > 0
    {
        bail!(
            "the saved RAM of {m}@{} could not be read from the bank: {}; QEMU stopped, as a \
             guest cannot go on without its memory. {m} was released ({}); older versions are \
             untouched: run one with `mbank run {m}@VERSION` (see `mbank log {m}`), and run \
             `mbank verify` on the bank's host to see what else is damaged",
            v.id.short(),
            ram.last_error.as_deref().unwrap_or("a fetch failed"),
            match report.session.version.as_deref() {
                Some(v) => format!("its disk was checked in as {v}"),
                None => "its disk was unchanged".to_string(),
            },
            m = report.machine,
        );
    }
    if ending == Ending::Crash {
        bail!(
            "{} stopped abnormally; its disk was checked in as {} (as after a power loss)",
            report.machine,
            report
                .session
                .version
                .as_deref()
                .unwrap_or("no new version")
        );
    }
    Ok(report)
}

/// A saved memory state: its index and what storing it did, the writer that keeps it
/// from GC, and with lazy memory the `ram` stream.
type SavedMemory = (
    MemoryIndex,
    StreamStats,
    mbank_bank::WriterGuard,
    Option<SavedRam>,
);

/// With lazy memory (`--lazy-memory`, or a version whose RAM was saved so), mounts the
/// guest's RAM over the version's `ram` stream (none: a fresh RAM).
fn lazy_ram(
    bank: &Bank,
    session: &Session<'_>,
    v: &mbank_catalog::VersionInfo,
    config: &MachineConfig,
    asked: bool,
    say: &dyn Fn(String),
) -> Result<Option<LazyRam>> {
    let base = bank.catalog().stream(v, RAM_STREAM)?;
    if !asked && base.is_none() {
        return Ok(None);
    }
    let mut ram = LazyRam::mount(
        session.chunks().clone(),
        &session.disk().dir.dir,
        config.memory_mib << 20,
        base.as_ref(),
    )
    .with_context(|| format!("{}@{}", v.machine, v.id.short()))?;
    // The chunks the last resume's guest waited for, fetched ahead of this one's. The
    // list is advice: one that cannot be read is a warning.
    if base.is_some()
        && let Some(idx) = bank.catalog().stream(v, RAM_SET_STREAM)?
    {
        let chunks = ((config.memory_mib << 20) as usize).div_ceil(RAM_CHUNK as usize);
        let list = if idx.total_len > ram_set_bound(chunks) {
            Err(format!("{} bytes is too long", idx.total_len))
        } else {
            let mut b = Vec::new();
            session
                .fetch_stream(&idx, &mut b, 1, &AtomicU64::new(0))
                .map_err(|e| e.to_string())
                .and_then(|()| decode_ram_set(&b, chunks))
        };
        match list {
            Ok(list) => ram.prefetch(list),
            Err(e) => say(format!(
                "warning: the RAM working set of {}@{} is not used: {e}; the guest fetches its RAM as it needs it",
                v.machine,
                v.id.short()
            )),
        }
    }
    Ok(Some(ram))
}

fn set_ignore_shared(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true}]})),
    )
    .map_err(|e| {
        anyhow!("QEMU refused x-ignore-shared (lazy memory needs QEMU 7.2 or later): {e}")
    })?;
    Ok(())
}

/// Starts the deferred incoming migration from `fifo`; with `ram_saved` (the version's
/// RAM is its own stream) the state holds no RAM.
fn incoming_lazy(qmp: &mut Qmp, fifo: &Path, ram_saved: bool) -> Result<()> {
    if ram_saved {
        set_ignore_shared(qmp)?;
    }
    let uri = format!(
        "exec:cat '{}'",
        fifo.display().to_string().replace('\'', r"'\''")
    );
    qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
        .map_err(|e| anyhow!("QEMU refused to load the memory state: {e}"))?;
    Ok(())
}

/// Pauses the guest and streams its memory state into the bank.
fn save_memory(
    bank: &Bank,
    vm: &mut Vm,
    disk: &Disk,
    config: &MachineConfig,
    progress: &dyn Progress,
    ram: Option<&LazyRam>,
) -> Result<SavedMemory> {
    let guard = bank.begin_write(&format!("suspend {}", disk.meta.machine))?;
    vm.qmp.execute("stop", None)?;
    let saved = save_paused(bank, vm, disk, config, progress, &guard, ram.is_some()).and_then(
        |(idx, stats)| {
            let ram_idx = ram.map(|r| r.save(bank, &guard)).transpose()?;
            Ok((idx, stats, ram_idx))
        },
    );
    match saved {
        Ok((idx, stats, ram_idx)) => Ok((idx, stats, guard, ram_idx)),
        Err(e) => {
            // The guest goes on as if nothing happened.
            let _ = vm.qmp.execute("cont", None);
            Err(e)
        }
    }
}

fn save_paused(
    bank: &Bank,
    vm: &mut Vm,
    disk: &Disk,
    config: &MachineConfig,
    progress: &dyn Progress,
    guard: &mbank_bank::WriterGuard,
    ignore_shared: bool,
) -> Result<(MemoryIndex, StreamStats)> {
    if ignore_shared {
        // The RAM is a shared file the suspend stores itself: device state only.
        set_ignore_shared(&mut vm.qmp)?;
    }
    // QEMU 7.2 limits migration to 32 MiB/s by default.
    vm.qmp.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({"max-bandwidth": 1u64 << 40})),
    )?;
    let fifo = session_file(disk, "memory.out");
    let _ = std::fs::remove_file(&fifo);
    mbank_vm::make_fifo(&fifo)?;
    let n = Arc::new(AtomicU64::new(0));
    let done = AtomicBool::new(false);
    let total = config.memory_mib << 20;
    let quoted = format!("'{}'", fifo.display().to_string().replace('\'', r"'\''"));
    let (status, stored) = std::thread::scope(|s| {
        // QEMU's side on a thread; the bank (not Sync) stays on this one.
        let qmp = &mut vm.qmp;
        let fifo_ref = &fifo;
        let done_ref = &done;
        let qemu_side = s.spawn(move || -> Result<()> {
            let uri = format!("exec:cat > {quoted}");
            if let Err(e) = qmp.execute("migrate", Some(serde_json::json!({ "uri": uri }))) {
                // Unblock the reader: open the FIFO for writing and close it.
                let _ = std::fs::OpenOptions::new().write(true).open(fifo_ref);
                return Err(anyhow!("QEMU refused to save the memory state: {e}"));
            }
            loop {
                match qmp.migration() {
                    Ok((s, _, _)) if s == "completed" => return Ok(()),
                    Ok((s, _, err)) if s == "failed" || s == "cancelled" => {
                        bail!("QEMU failed to save the memory state: {}", err.unwrap_or(s));
                    }
                    Ok(_) => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => bail!("QEMU stopped while saving the memory state: {e}"),
                }
            }
        });
        s.spawn(|| watch(progress, "saving memory", total, &n, done_ref));
        let stored = std::fs::File::open(&fifo)
            .context("cannot open the memory FIFO")
            .and_then(|f| {
                let counting = Counting {
                    inner: std::io::BufReader::with_capacity(1 << 20, f),
                    n: n.clone(),
                };
                Ok(bank.store_stream(guard, counting)?)
            });
        done.store(true, Ordering::Relaxed);
        (qemu_side.join().expect("QMP thread"), stored)
    });
    status?;
    stored
}

/// Where the screen is, for the boot and resume messages.
fn display_note(display: &Display) -> String {
    match display {
        Display::Vnc(s) => format!("; display: VNC on {s}"),
        Display::Window => "; display: a window".into(),
        _ => String::new(),
    }
}

/// Answers a `poweroff` whose guest did not power off in time and that may not force
/// it: the machine keeps running; the answer says what the user can do. The connection
/// is shut down so the session's later messages no longer go to it.
fn give_up(mut c: UnixStream, machine: &str, timeout: u64) {
    let error = format!(
        "{machine} did not power off within {timeout} s of the power button (its guest may \
         ignore ACPI) and keeps running; `mbank poweroff --force {machine}` switches it off \
         like pulling the plug (the disk keeps what the guest flushed, unflushed writes are \
         lost), `mbank suspend {machine}` keeps everything including its memory"
    );
    let _ = writeln!(c, "{}", serde_json::json!({"ok": false, "error": error}));
    let _ = c.shutdown(std::net::Shutdown::Both);
}

/// `mbank suspend` (`poweroff` None) or `mbank poweroff`: asks the `run` of `machine`
/// on this station to suspend or power off, shows its progress, and returns the new
/// version.
pub fn suspend(
    station: &Station,
    machine: &mbank_core::MachineName,
    poweroff: Option<PowerOff>,
    say: &dyn Fn(String),
) -> Result<Option<String>> {
    let Some((dir, meta)) = station.live_session(machine) else {
        bail!(
            "{machine} is not running on this station (cache {}); `mbank suspend` must run on the station where `mbank run` runs",
            station.dir.display()
        );
    };
    let _ = dir;
    let path = socket_dir(&meta.session).join("control.sock");
    let mut c = UnixStream::connect(&path).with_context(|| {
        format!(
            "{machine} is checked out here (pid {}), but not by `mbank run` (an `attach`? end it with SIGTERM)",
            meta.pid
        )
    })?;
    match poweroff {
        Some(how) => writeln!(c, "poweroff {}", serde_json::to_string(&how)?)?,
        None => writeln!(c, "suspend")?,
    }
    for line in BufReader::new(c).lines() {
        let line = line.context("lost the connection to `mbank run`")?;
        if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v["ok"] == true {
                return Ok(v["report"]["session"]["version"]
                    .as_str()
                    .map(str::to_string));
            }
            bail!("{}", v["error"].as_str().unwrap_or("the session failed"));
        }
        say(line);
    }
    bail!("`mbank run` of {machine} ended without an answer; see its output")
}

/// `mbank run --supervise`: the session itself. The front that started it reads its
/// standard output until `ready`; from then on it talks over the control socket.
pub fn supervise(bank: &mut Bank, station: &Station, args: Args) -> std::process::ExitCode {
    let hub = Arc::new(Hub::new());
    let r = run(bank, station, args, &hub);
    hub.finish(&r);
    if r.is_ok() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

/// What the front passes on to the session process it starts.
pub struct Front<'a> {
    pub bank_dir: &'a Path,
    pub cache_dir: &'a Path,
    pub cache_size: Option<u64>,
    pub jobs: usize,
}

enum FrontEvent {
    Control(String),
    ControlEnd,
    Stdin(String),
}

/// Sends one request on a new control connection and lets the answer go.
fn request(sockets: &Path, what: &str) -> Result<()> {
    let mut c = UnixStream::connect(sockets.join("control.sock"))
        .context("cannot reach the session's control socket")?;
    writeln!(c, "{what}")?;
    Ok(())
}

/// `mbank run`: starts the session in its own process (so that it outlives this
/// terminal when detached), or attaches to the one already running on this station,
/// and shows it: messages on standard error, with `--console` the serial console on
/// standard input and output. Ctrl-C asks how to end. Returns the session's JSON
/// report, or `None` when detached.
pub fn front(
    station: &Station,
    f: &Front<'_>,
    args: &Args,
    say: &dyn Fn(String),
) -> Result<Option<serde_json::Value>> {
    let machine = &args.machine.machine;
    let running = station
        .live_session(machine)
        .filter(|(_, m)| UnixStream::connect(socket_dir(&m.session).join("control.sock")).is_ok());
    let session = if let Some((_, meta)) = running {
        if args.machine.version.is_some() || args.append.is_some() || args.force {
            bail!(
                "{machine} is already running on this station (pid {}); `mbank run {machine}` shows it, `mbank suspend {machine}` ends it",
                meta.pid
            );
        }
        say(format!("{machine} is running here already; showing it"));
        meta.session
    } else {
        start_supervisor(f, args, say)?
    };
    let sockets = socket_dir(&session);
    let control = UnixStream::connect(sockets.join("control.sock"))
        .context("cannot reach the session's control socket")?;
    writeln!(&control, "attach")?;
    let (tx, events) = mpsc::channel();
    {
        let tx = tx.clone();
        let reader = control.try_clone()?;
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(FrontEvent::Control(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(FrontEvent::ControlEnd);
        });
    }
    // The console: QEMU waits for its first client before the guest starts.
    let console: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    if args.console {
        let (console, stop, path) = (console.clone(), stop.clone(), sockets.join("console.sock"));
        std::thread::spawn(move || {
            let c = loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match UnixStream::connect(&path) {
                    Ok(c) => break c,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let Ok(mut reader) = c.try_clone() else {
                return;
            };
            *console.lock().expect("console lock") = Some(c);
            let mut buf = [0u8; 4096];
            let stdout = std::io::stdout();
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut o = stdout.lock();
                let _ = o.write_all(&buf[..n]);
                let _ = o.flush();
            }
        });
    }
    let interactive = std::io::stdin().is_terminal();
    if args.console || interactive {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                if tx.send(FrontEvent::Stdin(line)).is_err() {
                    return;
                }
            }
        });
    }
    let signals = Arc::new(AtomicUsize::new(0)); // 1 = SIGINT, 2 = SIGTERM
    {
        let s = signals.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(record_signals(s));
        });
    }
    let mut asking = false;
    let result = loop {
        match signals.swap(0, Ordering::SeqCst) {
            1 if interactive && !asking => {
                eprint!(
                    "\nmbank: end the session of {machine}? [s]uspend (keep memory and disk), [p]ower off, [d]etach (keep it running), [c]ontinue: "
                );
                let _ = std::io::stderr().flush();
                asking = true;
            }
            1 | 2 if !asking => {
                say(format!("suspending {machine}"));
                request(&sockets, "suspend")?;
            }
            _ => {}
        }
        let event = match events.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => e,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break Err(anyhow!("lost the session")),
        };
        match event {
            FrontEvent::Control(line) if line.starts_with('{') => {
                let v: serde_json::Value =
                    serde_json::from_str(&line).context("the session sent a malformed result")?;
                break if v["ok"] == true {
                    Ok(Some(v["report"].clone()))
                } else {
                    Err(anyhow!(
                        "{}",
                        v["error"].as_str().unwrap_or("the session failed")
                    ))
                };
            }
            FrontEvent::Control(line) => say(line),
            FrontEvent::ControlEnd => {
                break Err(anyhow!(
                    "the session of {machine} ended without a result (killed?); the next `mbank run` or `mbank recover` on this station checks in what it flushed"
                ));
            }
            FrontEvent::Stdin(line) if asking => {
                asking = false;
                match line.trim() {
                    "s" | "suspend" => request(&sockets, "suspend")?,
                    "p" | "poweroff" | "power off" => request(&sockets, "poweroff")?,
                    "d" | "detach" => {
                        say(format!(
                            "detached: {machine} keeps running on this station; `mbank run {machine}` shows it again, `mbank suspend {machine}` or `mbank poweroff {machine}` ends it"
                        ));
                        break Ok(None);
                    }
                    _ => eprintln!("mbank: continuing"),
                }
            }
            FrontEvent::Stdin(line) => {
                if let Some(c) = &mut *console.lock().expect("console lock") {
                    let _ = writeln!(c, "{line}");
                }
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    // Let the console's last output through before the report.
    std::thread::sleep(Duration::from_millis(100));
    result
}

/// Starts `mbank run --supervise` in a new process session and waits until it is
/// ready; returns the session id.
fn start_supervisor(f: &Front<'_>, args: &Args, say: &dyn Fn(String)) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find the mbank binary")?;
    let mut c = Command::new(exe);
    c.arg("--bank")
        .arg(f.bank_dir)
        .arg("--cache")
        .arg(f.cache_dir)
        .arg("-j")
        .arg(f.jobs.to_string());
    if let Some(n) = f.cache_size {
        c.arg("--cache-size").arg(n.to_string());
    }
    c.args(["run", &args.machine.to_string(), "--supervise"]);
    if args.console {
        c.arg("--console");
    }
    if let Some(v) = &args.vnc {
        c.arg("--vnc").arg(v);
    }
    if let Some(a) = args.accel {
        c.arg("--accel").arg(a.name());
    }
    if let Some(a) = &args.append {
        c.arg("--append").arg(a);
    }
    if args.force {
        c.arg("--force");
    }
    if args.lazy_memory {
        c.arg("--lazy-memory");
    }
    c.args(args.session.as_args());
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the child between fork and exec; setsid(2) is async-signal-safe
    // and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().context("cannot start the session process")?;
    let err = child.stderr.take().expect("piped");
    let err_text = Arc::new(Mutex::new(String::new()));
    {
        let t = err_text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut t = t.lock().expect("stderr lock");
                t.push_str(&line);
                t.push('\n');
            }
        });
    }
    let out = child.stdout.take().expect("piped");
    for line in BufReader::new(out).lines() {
        let line = line.context("reading from the session process")?;
        if let Some(s) = line.strip_prefix("say ") {
            say(s.to_string());
        } else if let Some(s) = line.strip_prefix("ready ") {
            return Ok(s.trim().to_string());
        } else if let Some(e) = line.strip_prefix("error ") {
            let _ = child.wait();
            bail!("{e}");
        }
    }
    let st = child.wait()?;
    std::thread::sleep(Duration::from_millis(50));
    bail!(
        "the session process exited ({st}) before it was ready: {}",
        err_text.lock().expect("stderr lock").trim()
    )
}
