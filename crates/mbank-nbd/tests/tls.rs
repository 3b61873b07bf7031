//! NBD over TLS (STARTTLS, FORCEDTLS mode): the codec-level rules with a raw client, and
//! real clients (nbdinfo, nbdsh, qemu-io) with certificates from a test CA made by
//! openssl. Everything listens on 127.0.0.1 or a unix socket in a temp dir.

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::io::Read;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use mbank_nbd::proto::*;
use mbank_nbd::{BlockDevice, MemDevice, ServeError, ServerOptions, ServerStats, TlsConfig};
use pki::Ca;

const MIB: u64 = 1024 * 1024;

/// A CA, a server certificate from it, and a temp dir for client directories.
struct Pki {
    root: tempfile::TempDir,
    ca: Ca,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        require("openssl", "openssl");
        let root = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new(root.path(), "lab");
        let (cert, key) = ca.server(&root.path().join("server"));
        Pki {
            root,
            ca,
            cert,
            key,
        }
    }

    fn config(&self, client_ca: Option<&Path>) -> TlsConfig {
        TlsConfig::from_pem_files(&self.cert, &self.key, client_ca).expect("TLS config")
    }
}

/// `serve_tcp_listener` on 127.0.0.1 (a free port) on its own runtime.
struct TcpServer {
    port: u16,
    stats: Arc<ServerStats>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl TcpServer {
    fn start(device: Arc<MemDevice>, tls: TlsConfig) -> TcpServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().unwrap().port();
        let opts = ServerOptions {
            tls: Some(tls),
            ..ServerOptions::with_export_name("disk")
        };
        let stats = opts.stats.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            mbank_nbd::serve_tcp_listener(listener, device, opts, async {
                let _ = rx.await;
            })
            .await
        });
        TcpServer {
            port,
            stats,
            rt,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn read(&self, dev: &MemDevice, offset: u64, len: u32) -> Vec<u8> {
        self.rt
            .block_on(dev.read(offset, len))
            .expect("device read")
    }

    fn tls_uri(&self, client_dir: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/disk?tls-certificates={}",
            self.port,
            client_dir.display()
        )
    }

    /// qemu-io against the export over TLS with the x509 credentials in `client_dir`.
    fn qemu_io(&self, client_dir: &Path, cmds: &[&str]) -> std::process::Output {
        let mut c = Command::new("qemu-io");
        c.arg("--object").arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            client_dir.display()
        ));
        c.arg("--image-opts").arg(format!(
            "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
            self.port
        ));
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        run_output(&mut c)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(WATCHDOG, task).await });
        }
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// nbdsh running `script` with `URI` defined (the system python3, as `common::nbdsh`).
fn nbdsh_uri(uri: &str, script: &str) -> std::process::Output {
    require("nbdsh", "libnbd-bin python3-libnbd");
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin"), PathBuf::from("/bin")];
    dirs.extend(std::env::split_paths(&path_var));
    let path_var = std::env::join_paths(dirs).expect("PATH");
    run_output(
        Command::new("nbdsh")
            .env("PATH", path_var)
            .arg("-c")
            .arg(format!("URI = {uri:?}\n{script}")),
    )
}

fn tls_reqd(r: &[OptionReply]) -> bool {
    matches!(
        r,
        [OptionReply::Error {
            kind: RepError::TlsReqd,
            ..
        }]
    )
}

#[test]
fn before_starttls_every_option_is_refused_with_tls_reqd() {
    let pki = Pki::new();
    let opts = ServerOptions {
        tls: Some(pki.config(None)),
        ..ServerOptions::with_export_name("disk")
    };
    let server = TestServer::start_with(Arc::new(MemDevice::new(MIB)), opts);

    let mut c = server.client();
    assert!(tls_reqd(&c.option(&ClientOption::List)));
    assert!(tls_reqd(&c.option(&ClientOption::StructuredReply)));
    let go = ClientOption::Go(InfoRequest {
        export: "disk".into(),
        requests: vec![],
    });
    assert!(tls_reqd(&c.option(&go)));
    let info = ClientOption::Info(InfoRequest {
        export: "disk".into(),
        requests: vec![],
    });
    assert!(tls_reqd(&c.option(&info)));
    assert!(tls_reqd(&c.raw_option(99, b"unknown option")));
    // STARTTLS carries no data.
    let r = c.raw_option(OPT_STARTTLS, b"junk");
    assert!(
        matches!(
            &r[..],
            [OptionReply::Error {
                kind: RepError::Invalid,
                ..
            }]
        ),
        "{r:?}"
    );
    assert_eq!(c.option(&ClientOption::Abort), vec![OptionReply::Ack]);

    // EXPORT_NAME cannot carry an error: the server hangs up instead of serving.
    let mut c = server.client();
    c.write(&ClientOption::ExportName("disk".into()).encode());
    assert!(c.closed_by_server(), "the export was served without TLS");

    // STARTTLS is acknowledged; a client that then speaks no TLS is dropped.
    let mut c = server.client();
    assert_eq!(c.option(&ClientOption::StartTls), vec![OptionReply::Ack]);
    c.write(&ClientOption::List.encode());
    // The server may send a TLS alert before it hangs up; then the connection ends.
    let mut rest = Vec::new();
    c.sock
        .read_to_end(&mut rest)
        .expect("the server closes the connection");
    assert!(rest.len() < 64, "{rest:?}");
    wait_until("the failed handshakes to be counted", || {
        server.stats().connections_failed >= 2
    });
    assert_eq!(server.stats().requests, 0);
}

#[test]
fn nbdinfo_nbdsh_and_qemu_io_work_over_tls_and_plain_clients_are_refused() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let pki = Pki::new();
    let dev = Arc::new(MemDevice::new(64 * MIB));
    dev.write_at(MIB, &pattern(4096, 3)).expect("seed");
    let server = TcpServer::start(dev.clone(), pki.config(None));
    let client = Ca::client_dir(&pki.ca, pki.root.path(), "client");

    let json: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(server.tls_uri(&client))))
    .expect("nbdinfo --json");
    assert_eq!(json["TLS"], true, "{json}");
    assert_eq!(json["exports"][0]["export-size"], 64 * MIB);
    assert_eq!(json["structured"], true);

    let out = nbdsh_uri(
        &server.tls_uri(&client),
        "h.set_uri_allow_local_file(True)\n\
         h.connect_uri(URI)\n\
         assert h.get_tls_negotiated()\n\
         h.pwrite(b'tls!' * 1024, 8 * 1048576)\n\
         h.flush()\n\
         assert h.pread(4096, 8 * 1048576) == b'tls!' * 1024\n\
         h.shutdown()\n",
    );
    assert!(out.status.success(), "nbdsh: {}", text(&out));
    assert_eq!(server.read(&dev, 8 * MIB, 4096), b"tls!".repeat(1024));

    let out = server.qemu_io(
        &client,
        &[
            "write -P 0x5a 2M 1M",
            "read -P 0x5a 2M 1M",
            "read -P 0 3M 64k",
        ],
    );
    let all = text(&out);
    assert!(out.status.success() && !all.contains("failed"), "{all}");
    assert_eq!(
        server.read(&dev, 2 * MIB, MIB as u32),
        vec![0x5a; MIB as usize]
    );

    // Without TLS: refused, and told why.
    let out =
        run_output(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/disk", server.port)));
    assert!(!out.status.success(), "served without TLS: {}", text(&out));
    assert!(text(&out).contains("TLS"), "{}", text(&out));
    // A client that does not trust the server's CA stops at the handshake.
    let rogue = Ca::new(pki.root.path(), "rogue");
    let untrusting = Ca::client_dir(&rogue, pki.root.path(), "untrusting");
    let out = run_output(Command::new("nbdinfo").arg(server.tls_uri(&untrusting)));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(server.stats.snapshot().connections_failed >= 1);
}

#[test]
fn with_a_client_ca_only_its_certificates_get_in() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let pki = Pki::new();
    let root = pki.root.path();
    let dev = Arc::new(MemDevice::new(16 * MIB));
    let server = TcpServer::start(dev, pki.config(Some(&pki.ca.cert())));
    let member = pki.ca.client_dir_with_cert(&pki.ca, root, "member");
    let rogue = Ca::new(root, "rogue");
    let stranger = rogue.client_dir_with_cert(&pki.ca, root, "stranger");
    let anonymous = Ca::client_dir(&pki.ca, root, "anonymous");

    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(server.tls_uri(&member)));
    assert_eq!(size.trim(), (16 * MIB).to_string());
    let out = server.qemu_io(&member, &["write -P 7 0 64k", "read -P 7 0 64k"]);
    assert!(
        out.status.success() && !text(&out).contains("failed"),
        "{}",
        text(&out)
    );

    for (who, dir) in [("stranger", &stranger), ("anonymous", &anonymous)] {
        let out = run_output(Command::new("nbdinfo").arg(server.tls_uri(dir)));
        assert!(!out.status.success(), "{who} got in: {}", text(&out));
        let out = server.qemu_io(dir, &["read 0 64k"]);
        assert!(
            !out.status.success(),
            "{who} got in with qemu-io: {}",
            text(&out)
        );
    }
    assert_eq!(server.stats.snapshot().bytes_written, 64 * 1024);
}
