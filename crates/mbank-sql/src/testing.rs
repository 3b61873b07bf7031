//! A throw-away PostgreSQL server for tests: Debian's `postgresql` binaries, a new
//! cluster in a temporary directory (run as the `postgres` user when the tests run as
//! root, since PostgreSQL refuses root), listening on 127.0.0.1 on a free port, with
//! fsync off. Stopped and removed on drop.
//!
//! Tests need it, so it does not skip: without the binaries it fails and says to
//! install `postgresql` (`scripts/setup.sh` does).

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running PostgreSQL server.
pub struct TempPostgres {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The directory of Debian's PostgreSQL binaries (the newest installed).
pub fn bin_dir() -> Result<PathBuf, String> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or_else(|| {
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
         install Debian's `postgresql` package (scripts/setup.sh does)"
            .to_string()
    })
}

/// The uid and gid of `postgres` when running as root; `None` otherwise.
fn run_as() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: a valid NUL-terminated name; the result is read at once, before any
    // other getpw* call in this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(
            "running as root and there is no `postgres` user to run PostgreSQL as: \
                    install Debian's `postgresql` package"
                .into(),
        );
    }
    // SAFETY: pw is non-null and points to getpwnam's static record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

fn command(bin: &Path, user: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(bin);
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c.env("LC_ALL", "C.UTF-8");
    c
}

impl TempPostgres {
    /// Makes a cluster and starts its server; waits until it takes connections.
    pub fn start() -> Result<Self, String> {
        let bin = bin_dir()?;
        let user = run_as()?;
        let dir = tempdir_for(user)?;
        let data = dir.join("data");
        let out = command(&bin.join("initdb"), user)
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "mbank", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let log = fs::File::create(dir.join("postgres.log"))
            .map_err(|e| format!("cannot create the server's log: {e}"))?;
        let mut server = command(&bin.join("postgres"), user);
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=32MB",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child =
            spawn_bound_to_process(server).map_err(|e| format!("cannot start postgres: {e}"))?;
        let mut pg = TempPostgres {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match postgres::Client::connect(&pg.url_of("postgres"), postgres::NoTls) {
                Ok(_) => return Ok(pg),
                Err(e) if Instant::now() > deadline => {
                    let log = fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default();
                    return Err(format!(
                        "PostgreSQL did not take connections within 60 s: {e}\n{log}"
                    ));
                }
                Err(_) => {
                    if let Some(Ok(Some(status))) = pg.child.as_mut().map(|c| c.try_wait()) {
                        let log =
                            fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default();
                        return Err(format!("postgres exited ({status}):\n{log}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` (which may not exist yet).
    pub fn url_of(&self, name: &str) -> String {
        format!("postgresql://mbank@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database; returns its URL.
    pub fn new_database(&self) -> Result<String, String> {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = postgres::Client::connect(&self.url_of("postgres"), postgres::NoTls)
            .map_err(|e| e.to_string())?;
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
        Ok(self.url_of(&name))
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `cmd` so that it gets SIGINT (PostgreSQL's fast shutdown) when this process
/// ends, even without running [`TempPostgres`]'s drop (a server in a `static` is never
/// dropped): the child asks for a parent-death signal, and the parent is a thread that
/// lives as long as the process (Linux sends it when the spawning *thread* exits).
fn spawn_bound_to_process(mut cmd: Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; it runs in the child after the uid change
    // (which would clear the setting).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("temp-postgres".into())
        .spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the spawning thread ended"))?
}

/// Removes the directories of earlier test processes that are gone (a server kept in
/// a `static` is never dropped, so its directory stays behind).
fn remove_dead_runs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mbank-pg-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn tempdir_for(user: Option<(u32, u32)>) -> Result<PathBuf, String> {
    remove_dead_runs();
    let dir = std::env::temp_dir().join(format!(
        "mbank-pg-{}-{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give {} to postgres: {e}", dir.display()))?;
    }
    Ok(dir)
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            // SAFETY: kill with a pid we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
