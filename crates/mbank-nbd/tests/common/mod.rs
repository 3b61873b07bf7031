//! Shared test helpers: a server on a unix socket in a temp dir, external tools run with a
//! watchdog, and a small blocking NBD client written from `mbank_nbd::proto`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mbank_nbd::proto::*;
use mbank_nbd::{BlockDevice, ServeError, ServerOptions, ServerStats, StatsSnapshot};

/// Generous bound on anything a test waits for; only there so a bug hangs no CI run.
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// A server running `serve_unix` on its own runtime, in a fresh temp dir.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub export: String,
    pub stats: Arc<ServerStats>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    pub fn start<D: BlockDevice>(device: Arc<D>) -> Self {
        Self::start_with(device, ServerOptions::with_export_name("disk"))
    }

    pub fn start_with<D: BlockDevice>(device: Arc<D>, opts: ServerOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let export = opts.export_name.clone();
        let stats = opts.stats.clone();
        let path = socket.clone();
        let task = rt.spawn(async move {
            mbank_nbd::serve_unix(&path, device, opts, async {
                let _ = rx.await;
            })
            .await
        });
        let server = Self {
            dir,
            socket,
            export,
            stats,
            rt,
            stop: Some(tx),
            task: Some(task),
        };
        // The socket appears (already listening) by rename once the server is ready.
        wait_until("the server socket to appear", || server.socket.exists());
        server
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export,
            self.socket.display()
        )
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub fn client(&self) -> RawClient {
        RawClient::connect(&self.socket)
    }

    /// Runs a future on the server's runtime (e.g. to drive the device directly).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Asks the server to shut down without waiting for it.
    pub fn request_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts the server down, waits for `serve_unix` to return, and checks it cleaned up.
    pub fn stop(mut self) {
        self.request_stop();
        let task = self.task.take().expect("running");
        let result = self
            .rt
            .block_on(async { tokio::time::timeout(WATCHDOG, task).await })
            .expect("the server did not stop")
            .expect("the server task panicked");
        result.expect("serve_unix failed");
        assert!(!self.socket.exists(), "socket file left behind");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.request_stop();
    }
}

/// Polls `cond` until it holds (bounded by the watchdog).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WATCHDOG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fails (never skips) when a tool the test needs is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}`: install it with `apt-get install -y --no-install-recommends {package}`"
    );
}

/// Runs a command to completion under the watchdog.
pub fn run_output(cmd: &mut Process) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {desc}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for child") {
            break status;
        }
        if start.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {WATCHDOG:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Process) -> String {
    let desc = format!("{cmd:?}");
    let out = run_output(cmd);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python script under `nbdsh` with `SOCK`, `EXPORT` and `SIZE` defined.
pub fn nbdsh(server: &TestServer, size: u64, script: &str) -> String {
    require("nbdsh", "libnbd-bin python3-libnbd");
    let prelude = format!(
        "import errno\nSOCK = {:?}\nEXPORT = {:?}\nSIZE = {size}\n",
        server.socket.display().to_string(),
        server.export
    );
    let path = server.dir.path().join("script.py");
    std::fs::write(&path, format!("{prelude}{script}")).expect("writing the script");
    // nbdsh runs `python3 -m nbd` from PATH; the bindings (python3-libnbd) belong to the
    // distribution's python3, which a pyenv or venv earlier in PATH would shadow.
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin"), PathBuf::from("/bin")];
    dirs.extend(std::env::split_paths(&path_var));
    let path_var = std::env::join_paths(dirs).expect("PATH");
    run(Process::new("nbdsh")
        .env("PATH", path_var)
        .arg("-c")
        .arg(format!(
            "exec(open({:?}).read())",
            path.display().to_string()
        )))
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---- a blocking client written from the codec ---------------------------------------

/// One transmission reply, simple or structured (all chunks gathered).
#[derive(Debug, Default)]
pub struct Reply {
    pub handle: u64,
    /// First nonzero error (simple reply error or error chunk).
    pub error: u32,
    pub message: String,
    /// Read data reassembled (holes as zeroes), if any content chunk/data came back.
    pub data: Vec<u8>,
    pub chunks: Vec<Chunk>,
    pub simple: bool,
}

pub struct RawClient {
    pub sock: UnixStream,
    pub handshake_flags: u16,
    pub structured: bool,
    pub export_flags: u16,
    pub size: u64,
    next_handle: u64,
    /// handle -> (offset, len) of reads in flight (simple replies carry no length).
    reads: HashMap<u64, (u64, u32)>,
}

impl RawClient {
    pub fn connect(path: &Path) -> Self {
        Self::connect_with_flags(path, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    pub fn connect_with_flags(path: &Path, client_flags: u32) -> Self {
        let sock = UnixStream::connect(path).expect("connecting to the server");
        Self::from_stream_with_flags(sock, client_flags)
    }

    pub fn from_stream(sock: UnixStream) -> Self {
        Self::from_stream_with_flags(sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    pub fn from_stream_with_flags(sock: UnixStream, client_flags: u32) -> Self {
        // A caller's shorter bound stays.
        if sock.read_timeout().expect("timeout").is_none() {
            sock.set_read_timeout(Some(WATCHDOG)).expect("timeout");
        }
        let mut c = Self {
            sock,
            handshake_flags: 0,
            structured: false,
            export_flags: 0,
            size: 0,
            next_handle: 1,
            reads: HashMap::new(),
        };
        let mut greeting = [0u8; GREETING_LEN];
        c.read_exact(&mut greeting);
        c.handshake_flags = parse_greeting(&greeting).expect("greeting");
        c.write(&client_flags.to_be_bytes());
        c
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("writing to the server");
    }

    pub fn read_exact(&mut self, buf: &mut [u8]) {
        self.sock.read_exact(buf).expect("reading from the server");
    }

    /// True if the server closed the connection (EOF or reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.sock.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    pub fn read_option_reply(&mut self) -> (OptionReplyHeader, OptionReply) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut h);
        let header = parse_option_reply_header(&h).expect("option reply header");
        let mut data = vec![0u8; header.len as usize];
        self.read_exact(&mut data);
        let reply = parse_option_reply(header.reply_type, &data).expect("option reply");
        (header, reply)
    }

    /// Sends an option and collects replies up to the final one (ACK or error).
    pub fn option(&mut self, opt: &ClientOption) -> Vec<OptionReply> {
        self.write(&opt.encode());
        self.replies_until_final(opt.code())
    }

    pub fn raw_option(&mut self, code: u32, data: &[u8]) -> Vec<OptionReply> {
        self.write(&encode_option(code, data));
        self.replies_until_final(code)
    }

    fn replies_until_final(&mut self, code: u32) -> Vec<OptionReply> {
        let mut out = Vec::new();
        loop {
            let (header, reply) = self.read_option_reply();
            assert_eq!(header.option, code, "reply to the wrong option");
            let last = matches!(reply, OptionReply::Ack | OptionReply::Error { .. });
            out.push(reply);
            if last {
                return out;
            }
        }
    }

    /// Negotiates structured replies (if asked), base:allocation (if asked), then GO.
    pub fn go(&mut self, export: &str, structured: bool, meta: bool) {
        if structured {
            let r = self.option(&ClientOption::StructuredReply);
            assert_eq!(r, vec![OptionReply::Ack]);
            self.structured = true;
        }
        if meta {
            let r = self.option(&ClientOption::SetMetaContext(MetaContextRequest {
                export: export.into(),
                queries: vec![META_BASE_ALLOCATION.into()],
            }));
            assert!(
                matches!(r[0], OptionReply::MetaContext { .. }),
                "no context: {r:?}"
            );
        }
        let replies = self.option(&ClientOption::Go(InfoRequest {
            export: export.into(),
            requests: vec![INFO_BLOCK_SIZE],
        }));
        assert_eq!(
            replies.last(),
            Some(&OptionReply::Ack),
            "GO failed: {replies:?}"
        );
        for r in &replies {
            if let OptionReply::Info(Info::Export { size, flags }) = r {
                self.size = *size;
                self.export_flags = *flags;
            }
        }
    }

    /// Sends one request (with payload for writes); returns its handle.
    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> u64 {
        let handle = self.next_handle;
        self.next_handle += 1;
        let req = Request {
            flags,
            command,
            handle,
            offset,
            len,
        };
        if command == Command::Read {
            self.reads.insert(handle, (offset, len));
        }
        let mut bytes = req.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.write(&bytes);
        handle
    }

    /// Reads the next complete reply (all chunks of one handle; other handles' chunks
    /// are not expected to interleave in these tests' single-chunk replies).
    pub fn recv(&mut self) -> Reply {
        let mut head = [0u8; 4];
        self.read_exact(&mut head);
        match reply_magic(&head).expect("magic") {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; SIMPLE_REPLY_LEN - 4];
                self.read_exact(&mut rest);
                let mut all = head.to_vec();
                all.extend_from_slice(&rest);
                let (handle, error) = parse_simple_reply(&all).expect("simple reply");
                let mut reply = Reply {
                    handle,
                    error,
                    simple: true,
                    ..Reply::default()
                };
                if let Some((_, len)) = self.reads.remove(&handle)
                    && error == 0
                {
                    reply.data = vec![0u8; len as usize];
                    self.read_exact(&mut reply.data);
                }
                reply
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut reply = Reply::default();
                let mut first = Some(head);
                loop {
                    let mut h = [0u8; CHUNK_HEADER_LEN];
                    match first.take() {
                        Some(m) => {
                            h[..4].copy_from_slice(&m);
                            self.read_exact(&mut h[4..]);
                        }
                        None => self.read_exact(&mut h),
                    }
                    let header = parse_chunk_header(&h, MAX_PAYLOAD + 64).expect("chunk header");
                    let mut payload = vec![0u8; header.len as usize];
                    self.read_exact(&mut payload);
                    let chunk = parse_chunk(header.kind, &payload).expect("chunk");
                    reply.handle = header.handle;
                    let base = self.reads.get(&header.handle).map(|r| r.0).unwrap_or(0);
                    let len = self.reads.get(&header.handle).map(|r| r.1).unwrap_or(0);
                    match &chunk {
                        Chunk::OffsetData { offset, data } => {
                            reply.data.resize(len as usize, 0);
                            let at = (offset - base) as usize;
                            reply.data[at..at + data.len()].copy_from_slice(data);
                        }
                        Chunk::OffsetHole { .. } => reply.data.resize(len as usize, 0),
                        Chunk::Error { error, message }
                        | Chunk::ErrorOffset { error, message, .. }
                            if reply.error == 0 =>
                        {
                            reply.error = *error;
                            reply.message = message.clone();
                        }
                        _ => {}
                    }
                    reply.chunks.push(chunk);
                    if header.done() {
                        self.reads.remove(&header.handle);
                        return reply;
                    }
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Reply {
        let handle = self.send(command, flags, offset, len, payload);
        let reply = self.recv();
        assert_eq!(reply.handle, handle);
        reply
    }

    pub fn disconnect(mut self) {
        self.send(Command::Disc, 0, 0, 0, &[]);
        assert!(
            self.closed_by_server(),
            "the server did not close after DISC"
        );
    }
}
