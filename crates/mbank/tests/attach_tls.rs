//! `mbank attach --listen`: plain NBD is refused beyond loopback; with `--tls-cert` the
//! disk is served over NBD with TLS (STARTTLS), and real clients (nbdinfo, qemu-io) reach
//! it with a certificate from the CA given by `--tls-ca`. Everything listens on 127.0.0.1.

mod common;
#[path = "../../mbank-nbd/tests/common/pki.rs"]
mod pki;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ATTACH_TIMEOUT, Bank, Rng, Run, require_tool, run_cmd, unique};
use pki::Ca;

const MIB: usize = 1 << 20;

/// An `mbank attach` started with `args`, its standard error in a file.
struct Attach {
    child: Option<Child>,
    err: PathBuf,
    out: PathBuf,
    what: String,
}

impl Attach {
    fn start(bank: &Bank, machine: &str, args: &[&str]) -> Attach {
        let n = unique();
        let err = bank.file(&format!("attach-{n}.stderr"));
        let out = bank.file(&format!("attach-{n}.stdout"));
        let mut c = bank.cmd();
        c.arg("--cache")
            .arg(bank.file("station"))
            .arg("attach")
            .arg(machine)
            .args(args)
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let what = format!("{c:?}");
        let child = c.spawn().expect("cannot run mbank attach");
        Attach {
            child: Some(child),
            err,
            out,
            what,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The address after "on " in the "serving ..." line once it is printed, or `None`
    /// if the process ended first.
    fn serving(&mut self) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.stderr().lines().find(|l| l.starts_with("serving ")) {
                let url = line.split(" on ").nth(1).expect("serving ... on URL");
                return Some(url.split([';', ' ']).next().unwrap().to_string());
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return None;
            }
            assert!(
                start.elapsed() < ATTACH_TIMEOUT,
                "attach neither served nor ended:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT (check in), then the finished run.
    fn stop(&mut self) -> Run {
        let child = self.child.as_mut().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(r, 0);
        self.wait()
    }

    fn wait(&mut self) -> Run {
        let mut child = self.child.take().expect("waited twice");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > ATTACH_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("attach did not end:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            what: self.what.clone(),
            code: status.code(),
            stdout: fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn machine(bank: &Bank, name: &str, size: usize) -> Vec<u8> {
    let mut img = vec![0u8; size];
    Rng::new(7).fill(&mut img[..MIB]);
    let path = bank.file(&format!("{}.raw", unique()));
    fs::write(&path, &img).unwrap();
    bank.import(name, &path, &[]);
    img
}

fn tool(program: &str, args: &[String]) -> Run {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null());
    run_cmd(c)
}

#[test]
fn plain_nbd_beyond_loopback_is_refused_before_the_machine_is_taken() {
    let bank = Bank::new();
    machine(&bank, "alice/dev", 4 * MIB);
    let mut a = Attach::start(&bank, "alice/dev", &["--listen", "0.0.0.0:0"]);
    if let Some(url) = a.serving() {
        panic!("attach served a writable disk without TLS on {url}");
    }
    let r = a.wait();
    assert_eq!(r.code, Some(1), "refused:\n{r}");
    r.stderr_has(&["0.0.0.0", "--tls-cert", "--insecure"]);
    // Only the key without the certificate: a usage error too.
    let r = bank.run(&[
        "attach",
        "alice/dev",
        "--listen",
        "127.0.0.1:0",
        "--tls-key",
        "k.pem",
    ]);
    assert_eq!(r.code, Some(2), "{r}");
    // The machine was never checked out: another attach takes it without --force.
    let sock = bank.file("after.sock");
    let mut b = Attach::start(
        &bank,
        "alice/dev",
        &["--socket", sock.to_str().unwrap(), "--discard"],
    );
    assert!(b.serving().is_some(), "{}", b.stderr());
    b.stop().ok();
}

#[test]
fn attach_serves_nbd_over_tls_to_clients_with_a_certificate() {
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let bank = Bank::new();
    let mut img = machine(&bank, "alice/dev", 4 * MIB);
    let root = bank.file("pki");
    let ca = Ca::new(&root, "lab");
    let (cert, key) = ca.server(&root.join("server"));
    let good = ca.client_dir_with_cert(&ca, &root, "station");
    let rogue = Ca::new(&root, "rogue");
    let stranger = rogue.client_dir_with_cert(&ca, &root, "stranger");

    let mut a = Attach::start(
        &bank,
        "alice/dev",
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-ca",
            ca.cert().to_str().unwrap(),
        ],
    );
    let url = a.serving().unwrap_or_else(|| panic!("{}", a.stderr()));
    let port = url
        .strip_prefix("nbds://127.0.0.1:")
        .unwrap_or_else(|| panic!("not a TLS URL: {url}"))
        .trim_end_matches('/')
        .to_string();

    let tls_uri = |dir: &PathBuf| {
        format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            dir.display()
        )
    };
    let info = tool("nbdinfo", &["--size".into(), tls_uri(&good)]).ok();
    assert_eq!(info.stdout.trim(), (4 * MIB).to_string());
    // No TLS, or a certificate from another CA: refused.
    let plain = tool(
        "nbdinfo",
        &["--size".into(), format!("nbd://127.0.0.1:{port}/")],
    );
    assert!(!plain.success(), "plain NBD was served:\n{plain}");
    let r = tool("nbdinfo", &["--size".into(), tls_uri(&stranger)]);
    assert!(!r.success(), "a stranger's certificate was accepted:\n{r}");

    // qemu-io writes over TLS; the check-in holds the write.
    let r = tool(
        "qemu-io",
        &[
            "--object".into(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                good.display()
            ),
            "--image-opts".into(),
            // The form the README gives for QEMU's -drive.
            format!(
                "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,\
                 file.server.port={port},file.tls-creds=tls0"
            ),
            "-c".into(),
            "write -P 0xab 1M 64k".into(),
            "-c".into(),
            "read -P 0xab 1M 64k".into(),
        ],
    )
    .ok();
    assert!(
        !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "{r}"
    );
    img[MIB..MIB + 65536].fill(0xab);
    let run = a.stop().ok();
    let version = run.stdout.trim().to_string();
    let out = bank.file("export.raw");
    assert!(
        bank.export(&format!("alice/dev@{version}"), &out) == img,
        "the export differs from what was written"
    );
}
