//! `mbank serve`: the bank server (crate `mbank-server`) on this bank's directory.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

#[derive(clap::Args)]
pub struct Args {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// The server's TLS certificate chain (PEM). With --tls-key, the server speaks HTTPS.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address other than loopback. Passwords and tokens then
    /// cross the network unencrypted: only for a network you trust.
    #[arg(long)]
    pub insecure_http: bool,
    /// Seconds a client has for its TLS handshake, for a request's headers, and to
    /// start its next request on an idle connection.
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,
    /// Open connections at most, in all.
    #[arg(long, default_value_t = 512, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Open connections at most from one client address.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_address: u64,
    /// MiB of request bodies held in memory at once (a request waits for room).
    #[arg(long, default_value_t = 512, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub body_memory: u64,
    /// LAN sharing: sign grants with which stations fetch chunks from each other's
    /// caches (`mbank peer` on each station, `MBANK_PEERS` naming them) before the
    /// bank, each chunk checked by its hash. Off by default: a station then serves
    /// what its users read to other stations of the lab that may read it too.
    #[arg(long)]
    pub lan_sharing: bool,
    /// Send every chunk through the server, even when the bank's chunks are in an
    /// object store (S3) that stations could read from directly (by presigned URLs, the
    /// default for such a bank): for stations that cannot reach the store.
    #[arg(long)]
    pub no_direct_reads: bool,
    /// Take every chunk upload through the server, even when the bank's chunks are in
    /// an object store stations could upload to directly (by presigned URLs, which the
    /// server verifies before any commit may name the chunks; the default for such a
    /// bank).
    #[arg(long)]
    pub no_direct_writes: bool,
    /// Seconds a presigned URL for a direct chunk read or upload stays valid.
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=604800))]
    pub direct_url_secs: u64,
    /// For tests: URLs are made as if this many seconds ago (so they may be expired
    /// when handed out).
    #[arg(long, default_value_t = 0, value_name = "SECS", hide = true)]
    pub direct_url_age_secs: u64,
}

pub fn run(bank_dir: &Path, args: Args, quiet: bool) -> Result<()> {
    if args.tls_cert.is_none() && !args.listen.ip().is_loopback() && !args.insecure_http {
        bail!(
            "refusing to serve plain HTTP on {}: give --tls-cert and --tls-key, or --insecure-http for a trusted network",
            args.listen
        );
    }
    // One line per request and per event, as key=value fields; MBANK_LOG sets the level.
    let level = std::env::var("MBANK_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(if quiet {
            tracing_subscriber::filter::LevelFilter::WARN
        } else {
            tracing_subscriber::filter::LevelFilter::INFO
        });
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    if let Some(w) = mbank_bank::open_to_others(bank_dir) {
        eprintln!("mbank: warning: {w}");
    }
    let cfg = mbank_server::Config {
        bank_dir: bank_dir.to_path_buf(),
        listen: args.listen,
        tls: args.tls_cert.zip(args.tls_key),
        limits: mbank_server::Limits {
            header_timeout: std::time::Duration::from_secs(args.header_timeout),
            max_connections: args.max_connections as usize,
            max_connections_per_address: args.max_connections_per_address as usize,
            body_memory: (args.body_memory as usize).saturating_mul(1 << 20),
            ..Default::default()
        },
        lan_sharing: args.lan_sharing,
        direct_reads: !args.no_direct_reads,
        direct_writes: !args.no_direct_writes,
        direct_urls: mbank_server::DirectUrls {
            valid: std::time::Duration::from_secs(args.direct_url_secs),
            age: std::time::Duration::from_secs(args.direct_url_age_secs),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // In the runtime: the signal listeners are set up now, before the server binds.
    let _in_runtime = rt.enter();
    let stop = crate::attach::shutdown_signal();
    rt.block_on(mbank_server::serve(
        cfg,
        |addr| {
            // Scripts wait for this line (on standard output) to know the port. A
            // server whose starter stopped reading keeps serving.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {scheme}://{addr}");
            let _ = out.flush();
            sd_notify(&format!("READY=1\nSTATUS=listening on {scheme}://{addr}"));
        },
        async move {
            stop.await;
            sd_notify("STOPPING=1");
        },
    ))
    .map_err(anyhow::Error::msg)?;
    if !quiet {
        crate::out::say("mbank: server stopped");
    }
    Ok(())
}

/// Tells systemd (a `Type=notify` unit) how the server is: one datagram of the notify
/// protocol, `KEY=VALUE` lines, to the socket `$NOTIFY_SOCKET` names (a path, or an
/// abstract name after `@`). Nothing without that variable; a failure is only a warning
/// (systemd then says the service did not become ready).
pub fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(&name))?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        eprintln!(
            "mbank: warning: cannot tell systemd the service's state at NOTIFY_SOCKET={}: {e}",
            name.to_string_lossy()
        );
    }
}
