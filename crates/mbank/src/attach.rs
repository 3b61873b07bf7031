//! `mbank attach`: serve a machine's disk over NBD until a signal, then check in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use mbank_bank::{Bank, ImportOptions, Progress};
use mbank_core::MachineRef;
use mbank_nbd::{BlockDevice, DeviceError, Extent, ServerOptions, TlsConfig};
use mbank_station::device::{Disk, NbdDisk};
use mbank_station::{CheckinExtras, Session, SessionOptions, SessionReport, Station};

use crate::fmt::bytes;

#[derive(clap::Args)]
pub struct Args {
    /// user/name for the head, or user/name@VERSION.
    pub machine: MachineRef,
    /// Serve on this Unix socket (URI: nbd+unix:///?socket=PATH).
    #[arg(long, value_name = "PATH", required_unless_present = "listen")]
    pub socket: Option<PathBuf>,
    /// The socket's permission bits, in octal [default: 600, its owner only]; e.g. 660
    /// with --socket-owner :GROUP for a QEMU run by libvirt (docs/libvirt.md).
    #[arg(long, value_name = "MODE", requires = "socket", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
    /// The socket's owner and group, as USER, USER:GROUP or :GROUP (names or numbers)
    /// [default: this process's].
    #[arg(long, value_name = "USER[:GROUP]", requires = "socket", value_parser = parse_owner)]
    pub socket_owner: Option<(Option<u32>, Option<u32>)>,
    /// Serve on this TCP address instead, e.g. 127.0.0.1:10809 (port 0: any free port,
    /// printed). An address other than loopback needs --tls-cert and --tls-key, or
    /// --insecure.
    #[arg(long, value_name = "ADDR", conflicts_with = "socket")]
    pub listen: Option<SocketAddr>,
    /// Speak NBD over TLS with this certificate chain (PEM), and require it: clients
    /// connect with nbds:// URIs or QEMU's tls-creds-x509. Needs --tls-key and --listen.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "socket"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Let in only clients presenting a certificate signed by this CA (PEM), as
    /// qemu-nbd's x509 credentials with verify-peer. Without it, TLS encrypts but any
    /// client may connect.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve plain NBD on an address other than loopback: no encryption and no
    /// authentication, so anyone who reaches the port can read and write the disk.
    /// Only for a network you trust.
    #[arg(long, conflicts_with_all = ["socket", "tls_cert"])]
    pub insecure: bool,
    /// End without checking in: everything written is dropped.
    #[arg(long)]
    pub discard: bool,
    /// Serve the disk read-only: clients see NBD_FLAG_READ_ONLY and every write, trim
    /// or write-zeroes is refused with EPERM. Nothing is checked in. The machine's
    /// lease is still taken while it serves (as for any session, so a version is never
    /// served while another station changes the machine); it is released unchanged at
    /// the end.
    #[arg(long, conflicts_with = "discard")]
    pub read_only: bool,
    /// Take the machine over from the session holding it (that session's work is
    /// still kept as a version when it checks in).
    #[arg(long)]
    pub force: bool,
    /// Fetch the whole disk into the cache in the background (reads the guest waits
    /// on go first).
    #[arg(long)]
    pub prefetch: bool,
    #[command(flatten)]
    pub session: SessionFlags,
    /// Worker threads (the global `-j`).
    #[arg(skip)]
    pub jobs: usize,
}

/// The options of a session's background work, shared by `attach` and `run`.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct SessionFlags {
    /// Commit a checkpoint version of what the guest flushed every N minutes while it
    /// writes (tagged `checkpoint`; 0: none). Default: the machine's setting (`mbank set
    /// MACHINE --checkpoint-minutes`), else $MBANK_CHECKPOINT_SECONDS in seconds (the
    /// station's default), else 15.
    #[arg(long, value_name = "N")]
    pub checkpoint_minutes: Option<u64>,
    /// Send what the guest writes to the bank in the background, at most N Mbit/s, so
    /// the check-in has little left to send (0: not before the check-in). Default: 25,
    /// or $MBANK_WRITEBACK_MBIT.
    #[arg(long, value_name = "N")]
    pub writeback_mbit: Option<u64>,
}

impl SessionFlags {
    /// The flags as arguments again, for a session process started for them (`run`'s
    /// supervisor).
    pub fn as_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(n) = self.checkpoint_minutes {
            a.extend(["--checkpoint-minutes".to_string(), n.to_string()]);
        }
        if let Some(n) = self.writeback_mbit {
            a.extend(["--writeback-mbit".to_string(), n.to_string()]);
        }
        a
    }
}

/// `--socket-mode`: octal permission bits, at most 777.
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not a mode in octal such as 600 or 660")),
    }
}

/// `--socket-owner`: `USER`, `USER:GROUP` or `:GROUP`, each a name or a number.
fn parse_owner(s: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let (user, group) = s.split_once(':').unwrap_or((s, ""));
    let id = |name: &str, group: bool| -> Result<Option<u32>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        if let Ok(n) = name.parse::<u32>() {
            return Ok(Some(n));
        }
        let c = std::ffi::CString::new(name).map_err(|_| format!("bad name {name:?}"))?;
        // SAFETY: getpwnam/getgrnam with a valid C string; the result is read at once,
        // before any other call that could reuse its static buffer.
        let found = unsafe {
            if group {
                let g = libc::getgrnam(c.as_ptr());
                (!g.is_null()).then(|| (*g).gr_gid)
            } else {
                let p = libc::getpwnam(c.as_ptr());
                (!p.is_null()).then(|| (*p).pw_uid)
            }
        };
        found.map(Some).ok_or_else(|| {
            format!(
                "there is no {} named {name:?} on this station",
                if group { "group" } else { "user" }
            )
        })
    };
    let owner = (id(user, false)?, id(group, true)?);
    if owner == (None, None) {
        return Err(format!("{s:?} names neither a user nor a group"));
    }
    Ok(owner)
}

/// One line about a finished session.
pub fn describe(r: &SessionReport) -> String {
    let what = if r.recovered {
        "recovered session"
    } else {
        "session"
    };
    match &r.version {
        Some(v) => {
            format!(
                "{what} of {} checked in as {}@{}: {} chunks written, {} uploaded ({}){}",
                r.machine,
                r.machine,
                &v[..12],
                r.chunks_written,
                r.chunks_uploaded,
                bytes(r.bytes_uploaded),
                if r.head_moved {
                    String::new()
                } else {
                    "; another session moved the head first, so this version is kept beside it"
                        .into()
                }
            ) + &policy_note(r)
        }
        None => format!(
            "{what} of {} ended with nothing written; no new version",
            r.machine
        ),
    }
}

/// What the machine's retention policy did after the check-in, if anything.
fn policy_note(r: &SessionReport) -> String {
    match (&r.policy_error, r.forgotten.len()) {
        (Some(e), _) => format!(
            "; its retention policy could not be applied ({e}); run `mbank forget {}` with its rules later",
            r.machine
        ),
        (None, 0) => String::new(),
        (None, n) => format!(
            "; its retention policy removed {n} older versions (run gc to free their chunks)"
        ),
    }
}

/// Says what recovering the station's dead sessions did: each session checked in, and
/// each that could not be (damaged and set aside, or left for the next try) with why
/// and what to do. Other sessions' trouble is a warning, never a reason to stop.
pub fn report_recovery(r: &mbank_station::Recovery, say: &dyn Fn(String)) {
    for s in &r.recovered {
        say(describe(s));
    }
    for p in &r.problems {
        say(format!("warning: {p}"));
    }
}

/// The error of a failed check-in: what failed, that the session's writes are kept on
/// this station and where, and the command that checks them in once the cause is fixed.
/// `lost` says what the session had that the writes do not hold (a saved memory state),
/// if anything.
pub fn checkin_failed(
    e: impl Into<anyhow::Error>,
    bank: &Bank,
    station: &Station,
    disk: &Disk,
    lost: Option<&str>,
) -> anyhow::Error {
    let e = e.into();
    anyhow::anyhow!(
        "the check-in of {} failed: {}; the session's writes are kept on this station in {}{}; \
         once the cause is fixed, run `mbank --bank {} --cache {} recover` to check them in \
         (the next `mbank attach` or `mbank run` with this bank on this station does it too)",
        disk.meta.machine,
        crate::run::flatten(&e),
        disk.dir.dir.display(),
        lost.map(|l| format!(" ({l})")).unwrap_or_default(),
        bank.location(),
        station.dir.display(),
    )
}

/// A future that ends at the first SIGINT or SIGTERM. The listeners are set up when
/// this is called, not when the future is first polled: called before the socket is
/// bound, a signal that arrives once the socket exists (a client or a script may send
/// it at once) is never lost nor the process killed by its default action.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        match (int, term) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            (Ok(mut i), Err(_)) => {
                i.recv().await;
            }
            (Err(_), Ok(mut t)) => {
                t.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

/// Refuses plain NBD beyond loopback (unless --insecure), and reads the TLS
/// credentials: before anything is recovered or checked out.
fn tls_setup(args: &Args) -> Result<Option<TlsConfig>> {
    if let Some(addr) = args.listen
        && args.tls_cert.is_none()
        && !addr.ip().is_loopback()
        && !args.insecure
    {
        bail!(
            "refusing to serve {} as plain NBD on {addr}: anyone who reaches that address \
             could read and write the disk. Give --tls-cert and --tls-key (and --tls-ca to \
             require client certificates), listen on 127.0.0.1, or give --insecure for a \
             network you trust",
            args.machine
        );
    }
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let tls = TlsConfig::from_pem_files(cert, key, args.tls_ca.as_deref())
        .context("cannot set up TLS for the NBD server; nothing was checked out")?;
    Ok(Some(tls))
}

/// Where a session's messages go from its own threads: standard error, unless quiet.
pub fn session_say(quiet: bool) -> mbank_station::live::Warn {
    Arc::new(move |s: String| {
        if !quiet {
            crate::out::say(&s);
        }
    })
}

pub fn run(
    bank: &mut Bank,
    station: &Station,
    args: Args,
    progress: &dyn Progress,
    say: &dyn Fn(String),
    quiet: bool,
) -> Result<SessionReport> {
    let tls = tls_setup(&args)?;
    let opts = ImportOptions {
        jobs: args.jobs,
        ..Default::default()
    };
    report_recovery(&station.recover(bank, &opts)?, say);
    let mut session = Session::start(
        station,
        bank,
        &args.machine,
        &SessionOptions {
            force: args.force,
            whole_disk: args.prefetch,
            say: session_say(quiet),
            checkpoint_minutes: args.session.checkpoint_minutes,
            writeback_mbit: args.session.writeback_mbit,
        },
    )?;
    let disk = session.disk().clone();
    let what = format!(
        "{}@{} ({}, {} chunks of {})",
        disk.meta.machine,
        disk.meta.base.as_deref().map_or("-", |b| &b[..12]),
        bytes(disk.base.disk_size),
        disk.base.chunks.len(),
        bytes(disk.base.chunk_size as u64)
    );
    let served = serve(&args, &disk, &what, tls, say);
    if let Err(e) = served {
        // Nothing was served (the socket could not be bound, say) or nothing written:
        // give the machine back rather than hold its lease until a recover.
        if disk.dirty_chunks().is_empty() {
            session.discard(bank)?;
            return Err(e.context(format!(
                "the NBD server failed; {} was released unchanged",
                disk.meta.machine
            )));
        }
        return Err(e.context(format!(
            "the NBD server failed; the session is kept in {} and the next `mbank attach` or \
             `mbank recover` on this station checks in what was flushed",
            disk.dir.dir.display()
        )));
    }
    if args.discard || args.read_only {
        let report = session.discard(bank)?;
        say(if args.read_only {
            format!(
                "ended the read-only session of {}: released unchanged",
                disk.meta.machine
            )
        } else {
            format!(
                "discarded the session of {}: nothing checked in",
                disk.meta.machine
            )
        });
        return Ok(report);
    }
    let report = session
        .check_in(bank, &CheckinExtras::default(), &opts, progress)
        .map_err(|e| checkin_failed(e, bank, station, &disk, None))?;
    for w in &report.warnings {
        say(format!("warning: {w}"));
    }
    say(describe(&report));
    Ok(report)
}

/// Serves `disk` over NBD on the socket or address `args` name until SIGINT or SIGTERM.
fn serve(
    args: &Args,
    disk: &Arc<Disk>,
    what: &str,
    tls: Option<TlsConfig>,
    say: &dyn Fn(String),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let device = Arc::new(Served {
        disk: NbdDisk(disk.clone()),
        read_only: args.read_only,
    });
    rt.block_on(async {
        let opts = ServerOptions {
            export_name: disk.meta.machine.clone(),
            description: Some(format!("Machine Bank: {what}")),
            // Zero chunks are reported by BLOCK_STATUS; scanning every read for zeros
            // costs more than it saves on a local socket.
            sparse_reads: false,
            tls: tls.clone(),
            socket_mode: args.socket_mode.unwrap_or(0o600),
            socket_owner: args.socket_owner.unwrap_or((None, None)),
            ..Default::default()
        };
        let (ro, ends) = if args.read_only {
            (" read-only", "ends it")
        } else {
            ("", "checks in and ends")
        };
        match (&args.socket, args.listen) {
            (Some(path), _) => {
                if let Some(parent) = path.parent()
                    && !parent.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                say(format!(
                    "serving {what}{ro} on nbd+unix:///?socket={}; Ctrl-C or SIGTERM {ends}",
                    path.display()
                ));
                mbank_nbd::serve_unix(path, device, opts, shutdown_signal()).await?;
            }
            (None, Some(addr)) => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| {
                    mbank_nbd::ServeError::Bind {
                        endpoint: addr.to_string(),
                        source,
                    }
                })?;
                let local = listener.local_addr().unwrap_or(addr);
                let how = match &tls {
                    None => format!("nbd://{local}"),
                    Some(t) if t.requires_client_certificates() => format!(
                        "nbds://{local} (TLS required, clients need a certificate from the --tls-ca CA)"
                    ),
                    Some(_) => format!("nbds://{local} (TLS required)"),
                };
                say(format!(
                    "serving {what}{ro} on {how}; Ctrl-C or SIGTERM {ends}"
                ));
                mbank_nbd::serve_tcp_listener(listener, device, opts, shutdown_signal()).await?;
            }
            (None, None) => anyhow::bail!("give --socket PATH or --listen ADDR"),
        }
        anyhow::Ok(())
    })
}

/// The station's disk as served: read-only when asked, so the NBD server advertises
/// `NBD_FLAG_READ_ONLY` and answers writes with `EPERM` before they reach the disk.
struct Served {
    disk: NbdDisk,
    read_only: bool,
}

impl BlockDevice for Served {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        self.disk.multi_conn()
    }

    fn preferred_block_size(&self) -> u32 {
        self.disk.preferred_block_size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        self.disk.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.disk.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Ok(());
        }
        self.disk.flush().await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.disk.trim(offset, len).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.disk.write_zeroes(offset, len, no_hole, fua).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.disk.cache(offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.disk.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: super::Args,
    }

    fn parse(argv: &[&str]) -> Result<super::Args, clap::Error> {
        let argv = std::iter::once("attach").chain(argv.iter().copied());
        Cmd::try_parse_from(argv).map(|c| c.args)
    }

    fn allowed(argv: &[&str]) -> bool {
        super::tls_setup(&parse(argv).expect("valid arguments")).is_ok()
    }

    #[test]
    fn plain_nbd_only_on_loopback_unless_insecure() {
        assert!(allowed(&["a/b", "--socket", "/tmp/x.sock"]));
        assert!(allowed(&["a/b", "--listen", "127.0.0.1:10809"]));
        assert!(allowed(&["a/b", "--listen", "127.0.0.2:10809"]));
        assert!(allowed(&["a/b", "--listen", "[::1]:10809"]));
        for addr in ["0.0.0.0:10809", "192.168.1.5:10809", "[::]:10809"] {
            assert!(!allowed(&["a/b", "--listen", addr]), "{addr}");
            assert!(allowed(&["a/b", "--listen", addr, "--insecure"]), "{addr}");
        }
    }

    #[test]
    fn tls_options_go_together() {
        for argv in [
            &["a/b", "--listen", "0.0.0.0:1", "--tls-cert", "c.pem"][..],
            &["a/b", "--listen", "0.0.0.0:1", "--tls-key", "k.pem"],
            &["a/b", "--listen", "0.0.0.0:1", "--tls-ca", "ca.pem"],
            &[
                "a/b",
                "--socket",
                "s",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
            ],
            &["a/b", "--socket", "s", "--insecure"],
            &[
                "a/b",
                "--listen",
                "0.0.0.0:1",
                "--insecure",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
            ],
        ] {
            assert!(parse(argv).is_err(), "{argv:?} was accepted");
        }
    }
}
