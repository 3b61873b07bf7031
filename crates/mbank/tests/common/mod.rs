//! Shared helpers for the integration tests: run the real `mbank` binary against a bank
//! in a temporary directory, parse its `--json` output, make test images, and mount
//! small tmpfs file systems for the read-only and full-disk cases.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mbank");

/// A command for the binary, with no bank from the environment.
pub fn mbank() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("MBANK_BANK");
    c.stdin(Stdio::null());
    c
}

/// What one run of a command did.
#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(what: String, o: Output) -> Run {
        Run {
            what,
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics unless the command exited 0.
    pub fn ok(self) -> Run {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics unless the command exited with `code`.
    pub fn code(self, code: i32) -> Run {
        assert_eq!(self.code, Some(code), "unexpected exit status:\n{self}");
        self
    }

    /// Panics unless the command failed (non-zero exit, no signal).
    pub fn failed(self) -> Run {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a failure:\n{self}"
        );
        self
    }

    /// Standard output parsed as one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("standard output is not JSON ({e}):\n{self}"))
    }

    /// Panics unless standard error contains every one of `needles` (case-insensitive).
    pub fn stderr_has(&self, needles: &[&str]) -> &Run {
        let low = self.stderr.to_lowercase();
        for n in needles {
            assert!(
                low.contains(&n.to_lowercase()),
                "standard error does not mention {n:?}:\n{self}"
            );
        }
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cut = |s: &str| -> String {
            if s.len() > 4000 {
                format!("{}… ({} bytes)", &s[..s.floor_char_boundary(4000)], s.len())
            } else {
                s.to_string()
            }
        };
        write!(
            f,
            "$ {}\nexit: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.code,
            cut(&self.stdout),
            cut(&self.stderr)
        )
    }
}

/// Runs a prepared command to completion.
pub fn run_cmd(mut c: Command) -> Run {
    let what = format!("{c:?}");
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Run::from_output(what, o)
}

/// Runs `mbank` with `args` and no bank.
pub fn mbank_run<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let mut c = mbank();
    c.args(args);
    run_cmd(c)
}

/// A bank directory, with the temporary directory that holds it (if we own it).
pub struct Bank {
    pub path: PathBuf,
    /// Scratch space next to the bank for images and exports.
    pub scratch: PathBuf,
    /// Environment variables set (`Some`) or removed (`None`) for every command.
    pub env: Vec<(String, Option<String>)>,
    /// The network namespace every command runs in (`ip netns exec NS mbank ...`), for
    /// a station of a lab (`lab.rs`); `None`: this process's.
    pub netns: Option<String>,
    _tmp: Option<TempDir>,
}

impl Bank {
    /// A new, initialised bank in a fresh temporary directory.
    pub fn new() -> Bank {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("bank");
        let scratch = tmp.path().join("scratch");
        fs::create_dir(&scratch).unwrap();
        let b = Bank {
            path,
            scratch,
            env: Vec::new(),
            netns: None,
            _tmp: Some(tmp),
        };
        b.run(&["init"]).ok();
        assert!(b.path.join("MBANK").is_file());
        b
    }

    /// A bank at `path` (initialised by this call); scratch files go to `scratch`.
    pub fn init_at(path: &Path, scratch: &Path) -> Bank {
        let b = Bank::at(path, scratch);
        b.run(&["init"]).ok();
        b
    }

    /// A bank at `path`, not initialised by this call; scratch files go to `scratch`.
    pub fn at(path: &Path, scratch: &Path) -> Bank {
        Bank {
            path: path.to_path_buf(),
            scratch: scratch.to_path_buf(),
            env: Vec::new(),
            netns: None,
            _tmp: None,
        }
    }

    /// A path in the scratch directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }

    /// A bank served at `url`, used with the credentials in `config` (the client's
    /// XDG_CONFIG_HOME); scratch files go to `scratch`.
    pub fn remote(url: &str, scratch: &Path, config: &Path) -> Bank {
        fs::create_dir_all(scratch).unwrap();
        Bank {
            path: PathBuf::from(url),
            scratch: scratch.to_path_buf(),
            env: vec![("XDG_CONFIG_HOME".into(), Some(config.display().to_string()))],
            netns: None,
            _tmp: None,
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = match &self.netns {
            None => mbank(),
            Some(ns) => {
                // `ip netns exec` execs the binary: the child's pid is mbank's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c.env_remove("MBANK_BANK");
                c.stdin(Stdio::null());
                c
            }
        };
        c.arg("--bank").arg(&self.path);
        for (k, v) in &self.env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        let mut c = self.cmd();
        c.args(args);
        run_cmd(c)
    }

    /// Runs a command that must succeed and print JSON; returns the JSON.
    pub fn json<S: AsRef<OsStr>>(&self, args: &[S]) -> Value {
        self.run(args).ok().json()
    }

    /// `import --json` of `image` into `machine`, which must succeed.
    pub fn import(&self, machine: &str, image: &Path, extra: &[&str]) -> Value {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("-q"),
            OsStr::new("import"),
            OsStr::new("--json"),
            OsStr::new(machine),
            image.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.json(&args)
    }

    /// Exports `reference` to `out` (replacing it), which must succeed, and returns the
    /// file's bytes.
    pub fn export(&self, reference: &str, out: &Path) -> Vec<u8> {
        self.run(&[
            OsStr::new("-q"),
            OsStr::new("export"),
            OsStr::new("--force"),
            OsStr::new(reference),
            out.as_os_str(),
        ])
        .ok();
        fs::read(out).unwrap_or_else(|e| panic!("cannot read export {}: {e}", out.display()))
    }

    /// Exports `reference` and asserts that it equals `image` byte for byte.
    pub fn assert_exports(&self, reference: &str, image: &Path) {
        let out = self.file(&format!("export-{}.raw", unique()));
        let got = self.export(reference, &out);
        let want = fs::read(image).unwrap();
        assert_same_bytes(&got, &want, &format!("export of {reference}"));
        fs::remove_file(&out).unwrap();
    }

    /// `log --json` of a machine.
    pub fn log(&self, machine: &str) -> Vec<Value> {
        self.json(&["log", "--json", machine])
            .as_array()
            .expect("log --json is an array")
            .clone()
    }

    /// The head of a machine, from `ls --json`.
    pub fn head(&self, machine: &str) -> Option<String> {
        let ls = self.json(&["ls", "--json"]);
        let m = ls
            .as_array()
            .expect("ls --json is an array")
            .iter()
            .find(|m| m["machine"] == machine)
            .unwrap_or_else(|| panic!("{machine} is not in ls --json: {ls}"));
        m["head"].as_str().map(String::from)
    }

    /// `verify --json`, which must exit 0 and report nothing damaged.
    pub fn verify_ok(&self) -> Value {
        let r = self.run(&["verify", "--json"]);
        assert_eq!(r.code, Some(0), "verify must pass:\n{r}");
        let v = r.json();
        assert_eq!(v["damaged_chunks"], Value::Array(vec![]), "{r}");
        assert_eq!(v["damaged_indexes"], Value::Array(vec![]), "{r}");
        v
    }

    /// `gc --json`, which must succeed.
    pub fn gc(&self) -> Value {
        self.json(&["-q", "gc", "--json"])
    }

    /// Everything the catalog shows: `ls --json` and every machine's `log --json`.
    pub fn catalog(&self) -> Value {
        let ls = self.json(&["ls", "--json"]);
        let mut logs = serde_json::Map::new();
        for m in ls.as_array().unwrap() {
            let name = m["machine"].as_str().unwrap();
            logs.insert(name.to_string(), Value::Array(self.log(name)));
        }
        serde_json::json!({ "ls": ls, "logs": logs })
    }

    /// The names of every chunk file (`chunks/xx/<64 hex>`).
    pub fn chunk_files(&self) -> BTreeSet<String> {
        chunk_files(&self.path)
    }

    /// Every temp file in the chunk store.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        temp_files(&self.path)
    }

    /// Every file in the bank directory (recursively), for "nothing changed" checks;
    /// without the records of the last gc and verify (`last-JOB.json`), which the
    /// checks' own `verify` writes.
    pub fn all_files(&self) -> BTreeSet<PathBuf> {
        let mut files = all_files(&self.path);
        files.retain(|p| {
            let name = p.to_string_lossy();
            !(name.starts_with("last-") && name.ends_with(".json") && !name.contains('/'))
        });
        files
    }

    /// Sets every chunk file's mtime to an hour ago, as if the chunks had been in the
    /// bank for a long time: GC keeps unreferenced chunks younger than its safety margin
    /// (about a second), and this lets a test see what GC deletes without waiting. In a
    /// served bank the users' rights to chunks are moved an hour back too (GC's pruning
    /// keeps rights recorded since its cutoff).
    pub fn age_chunks(&self) {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for c in self.chunk_files() {
            let f = fs::File::options()
                .write(true)
                .open(self.chunk_path(&c))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        let access = self.path.join("access.db");
        if access.is_file() {
            let o = Command::new("sqlite3")
                .arg(&access)
                .arg("UPDATE chunk_owners SET recorded_ms = recorded_ms - 3600000;")
                .output()
                .expect("sqlite3 (Debian package sqlite3, scripts/setup.sh) is installed");
            assert!(o.status.success(), "sqlite3 {}: {o:?}", access.display());
        }
    }

    /// The path of a chunk's file.
    pub fn chunk_path(&self, id: &str) -> PathBuf {
        self.path.join("chunks").join(&id[..2]).join(id)
    }
}

fn is_chunk_name(n: &str) -> bool {
    n.len() == 64 && n.bytes().all(|c| c.is_ascii_hexdigit())
}

/// The names of every chunk file under `bank/chunks`.
pub fn chunk_files(bank: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(dirs) = fs::read_dir(bank.join("chunks")) else {
        return out;
    };
    for d in dirs.flatten() {
        let Ok(entries) = fs::read_dir(d.path()) else {
            continue;
        };
        for e in entries.flatten() {
            if let Some(n) = e.file_name().to_str()
                && is_chunk_name(n)
            {
                out.insert(n.to_string());
            }
        }
    }
    out
}

/// Every `.tmp-*` file under `bank/chunks`.
pub fn temp_files(bank: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = fs::read_dir(bank.join("chunks")) else {
        return out;
    };
    for d in dirs.flatten() {
        let Ok(entries) = fs::read_dir(d.path()) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp") {
                out.push(e.path());
            }
        }
    }
    out
}

/// Every file and directory under `root`, relative to it.
pub fn all_files(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Asserts two byte strings are equal without printing megabytes on failure.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got.len() != want.len() {
        panic!(
            "{what}: length {} differs from the expected {}",
            got.len(),
            want.len()
        );
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

/// A process-unique number, for file names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A small deterministic pseudo-random generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A generator seeded from the clock; the seed is printed so a failure can be rerun.
    pub fn from_clock(what: &str) -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("{what}: random seed {seed}");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// `n` pseudo-random (incompressible) bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v);
    v
}

/// Writes `len` bytes of random data, then `zeros` zero bytes (as a hole), to `path`.
pub fn write_image(path: &Path, data: &[u8], zeros: u64) {
    fs::write(path, data).unwrap();
    if zeros > 0 {
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(data.len() as u64 + zeros).unwrap();
    }
}

/// Panics with a clear message unless the tests run as root (mount tests need it).
pub fn require_root(what: &str) {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .expect("cannot run `id -u`");
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        uid, "0",
        "{what} needs root (it mounts a tmpfs); these tests run as root in CI. Run them as root."
    );
}

/// Panics with a clear message unless `tool` can be run.
pub fn require_tool(tool: &str, package: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "this test needs `{tool}`: install it with `apt-get install {package}`"
    );
}

/// Runs a helper program that must succeed.
pub fn sh(program: &str, args: &[&OsStr]) -> Output {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A tmpfs mounted on a fresh temporary directory; unmounted (lazily) when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
    /// A directory on the ordinary disk, next to the mount, for images and exports.
    pub outside: PathBuf,
    _tmp: TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        require_root("this test");
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mnt");
        let outside = tmp.path().join("outside");
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&outside).unwrap();
        sh(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("tmpfs"),
                OsStr::new("-o"),
                OsStr::new(&format!("size={size}")),
                OsStr::new("tmpfs"),
                dir.as_os_str(),
            ],
        );
        Tmpfs {
            dir,
            outside,
            _tmp: tmp,
        }
    }

    pub fn remount_read_only(&self) {
        sh(
            "mount",
            &[
                OsStr::new("-o"),
                OsStr::new("remount,ro"),
                self.dir.as_os_str(),
            ],
        );
    }

    /// Bytes free on the mount, as `df` sees them.
    pub fn free_bytes(&self) -> u64 {
        let o = sh(
            "df",
            &[
                OsStr::new("-B1"),
                OsStr::new("--output=avail"),
                self.dir.as_os_str(),
            ],
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------
// Station helpers: `mbank attach` as a child process, and NBD clients against it.
// ---------------------------------------------------------------------------------

/// How long to wait for an attach to start serving, or to end after a signal: generous,
/// so that a slow CI machine does not fail a test (nothing asserts on the time taken).
pub const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A running `mbank attach`, serving on a Unix socket. Killed (SIGKILL) if dropped while
/// still running, so a failing test leaves no server behind.
pub struct Attached {
    pub child: Option<std::process::Child>,
    pub socket: PathBuf,
    pub what: String,
    out: PathBuf,
    err: PathBuf,
}

impl Bank {
    /// `mbank --bank B --cache CACHE attach MACHINE --socket <scratch>/attach-N.sock
    /// EXTRA...`, started in the background. Returns once the socket is there (it is
    /// listening by then), or the finished run if the process ended first.
    pub fn try_attach(&self, cache: &Path, machine: &str, extra: &[&str]) -> Result<Attached, Run> {
        let n = unique();
        let socket = self.file(&format!("attach-{n}.sock"));
        let out = self.file(&format!("attach-{n}.stdout"));
        let err = self.file(&format!("attach-{n}.stderr"));
        let mut c = self.cmd();
        c.arg("--cache").arg(cache).arg("attach").arg(machine);
        c.arg("--socket").arg(&socket).args(extra);
        c.stdout(fs::File::create(&out).unwrap());
        c.stderr(fs::File::create(&err).unwrap());
        let what = format!("{c:?}");
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let mut a = Attached {
            child: Some(child),
            socket,
            what,
            out,
            err,
        };
        let start = std::time::Instant::now();
        loop {
            let serving = fs::symlink_metadata(&a.socket)
                .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                .unwrap_or(false);
            if serving {
                return Ok(a);
            }
            if a.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return Err(a.wait());
            }
            if start.elapsed() > ATTACH_TIMEOUT {
                let socket = a.socket.display().to_string();
                panic!(
                    "attach did not start serving on {socket} in {ATTACH_TIMEOUT:?}:\n{}",
                    a.kill9()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Like [`Bank::try_attach`], but the attach must start serving.
    pub fn attach(&self, cache: &Path, machine: &str, extra: &[&str]) -> Attached {
        self.try_attach(cache, machine, extra)
            .unwrap_or_else(|r| panic!("attach ended before serving:\n{r}"))
    }
}

impl Attached {
    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("still running").id()
    }

    /// Sends a signal to the attach process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(r, 0, "cannot signal the attach process");
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Waits (up to [`ATTACH_TIMEOUT`], then SIGKILL and panic) for the process to end.
    pub fn wait(&mut self) -> Run {
        let mut child = self.child.take().expect("waited twice");
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > ATTACH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "attach did not end within {ATTACH_TIMEOUT:?}:\n{}",
                    self.collect(None)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        self.collect(status.code())
    }

    fn collect(&self, code: Option<i32>) -> Run {
        Run {
            what: self.what.clone(),
            code,
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }

    /// SIGINT (Ctrl-C): the server stops and checks in. Returns the finished run.
    pub fn stop(&mut self) -> Run {
        self.signal(libc::SIGINT);
        self.wait()
    }

    /// SIGKILL: no cleanup of any kind. Returns the run (code None).
    pub fn kill9(&mut self) -> Run {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
        self.wait()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `c` to completion with `input` and a newline on its standard input (a password
/// for `--password-stdin`).
pub fn with_stdin(mut c: Command, input: &str) -> Run {
    use std::io::Write;
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{c:?}");
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{input}\n").as_bytes())
        .unwrap();
    Run::from_output(what, child.wait_with_output().unwrap())
}

/// The first access token (`mbt_…`) anywhere in `v` (a credentials file).
pub fn find_token(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.starts_with("mbt_") => Some(s.clone()),
        Value::Object(m) => m.values().find_map(find_token),
        Value::Array(a) => a.iter().find_map(find_token),
        _ => None,
    }
}

/// Runs `program args...` to completion (standard input closed).
pub fn tool<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Run {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null());
    run_cmd(c)
}

/// `qemu-img compare` of the raw image `image` with the raw disk at `uri` (an NBD
/// URI): every byte read, a success when they are the same.
pub fn compare_raw(image: &Path, uri: &str) -> Run {
    tool(
        "qemu-img",
        &[
            "compare".to_string(),
            "-f".into(),
            "raw".into(),
            "-F".into(),
            "raw".into(),
            image.display().to_string(),
            uri.to_string(),
        ],
    )
}

/// The command for `nbdsh -u URI -c SCRIPT`. nbdsh is a Python program that needs the
/// system python3 (with the libnbd module): put /usr/bin first in PATH, since another
/// python3 earlier in PATH would not have it.
pub fn nbdsh_cmd(uri: &str, script: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new("/usr/bin/nbdsh");
    c.env("PATH", format!("/usr/bin:{path}"))
        .arg("-u")
        .arg(uri)
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null());
    c
}

/// Runs a Python script in nbdsh against `uri` (the handle is `h`) to completion.
pub fn nbdsh(uri: &str, script: &str) -> Run {
    run_cmd(nbdsh_cmd(uri, script))
}

/// The bytes of the regular files under `dir`, recursively (apparent sizes: what `du -b`
/// would count for the files, without the directories themselves).
pub fn file_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            total += file_bytes(&e.path());
        } else if t.is_file() {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

/// The port a just-started `mbank serve` (its standard output piped) says it listens
/// on, in its first line (`listening on https://127.0.0.1:PORT`, or http); panics with its log
/// (`log`) if it says anything else.
#[allow(dead_code)] // not every test file starts a server
pub fn serve_port(child: &mut std::process::Child, log: &Path) -> u16 {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("serve's stdout is piped"))
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("listening on ")
        .and_then(|url| url.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve did not say where it listens: {line:?}\n{}",
                fs::read_to_string(log).unwrap_or_default()
            )
        })
}

/// Runs `c` with `input` on its standard input (a password, say).
#[allow(dead_code)] // not every test file uses it
pub fn run_with_input(mut c: Command, input: &[u8]) -> Run {
    use std::io::Write;
    let what = format!("{c:?}");
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    Run::from_output(what, child.wait_with_output().unwrap())
}

/// A bank served by `mbank serve` over plain HTTP on 127.0.0.1 (`MBANK_TEST_SERVER_BIN`
/// may name another binary to serve it, e.g. an older build), with users added first;
/// killed when dropped.
#[allow(dead_code)] // not every test file starts one
pub struct PlainServer {
    pub tmp: TempDir,
    pub dir: PathBuf,
    pub port: u16,
    pub child: std::process::Child,
}

#[allow(dead_code)]
impl PlainServer {
    /// `users`: (name, password, administrator). `setup` runs on the bank directory
    /// after the users are added and before the server starts; `extra` are `serve`'s
    /// options.
    pub fn start(users: &[(&str, &str, bool)], setup: &dyn Fn(&Path), extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bank");
        let mut c = mbank();
        c.arg("--bank").arg(&dir).arg("init");
        run_cmd(c).ok();
        for (user, pw, admin) in users {
            let mut c = mbank();
            c.arg("--bank").arg(&dir);
            c.args(["admin", "user", "add", user, "--password-stdin"]);
            if *admin {
                c.arg("--admin");
            }
            run_with_input(c, format!("{pw}\n").as_bytes()).ok();
        }
        setup(&dir);
        let bin = std::env::var("MBANK_TEST_SERVER_BIN").unwrap_or_else(|_| BIN.to_string());
        let mut c = Command::new(bin);
        c.env_remove("MBANK_BANK").env("MBANK_LOG", "warn");
        c.arg("--bank")
            .arg(&dir)
            .args(["serve", "--listen", "127.0.0.1:0"]);
        c.args(extra);
        c.stdout(Stdio::piped()).stdin(Stdio::null());
        c.stderr(fs::File::create(tmp.path().join("server.log")).unwrap());
        let mut child = c.spawn().unwrap();
        let port = serve_port(&mut child, &tmp.path().join("server.log"));
        PlainServer {
            tmp,
            dir,
            port,
            child,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PlainServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
