//! `mbank peer`: this station's cache served to the lab's other stations (LAN sharing,
//! `mbank-server`'s `peer` module), against grants the bank server signed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct Args {
    /// Address and port to serve the cache on (the lab's network; the stations name it
    /// in MBANK_PEERS).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
}

/// Serves the station cache `cache_dir` to peers of the bank server `url` (whose key
/// checks the grants) until SIGINT or SIGTERM.
pub fn run(url: Option<&str>, cache_dir: &Path, cache_size: u64, args: Args) -> Result<()> {
    let Some(url) = url else {
        bail!(
            "mbank peer needs the bank server whose grants it honours: --bank https://HOST:PORT (LAN sharing is for served banks)"
        );
    };
    let client = mbank_remote::connect(url, None)?;
    let key = mbank_remote::peers::server_key(&client)
        .with_context(|| format!("cannot get the LAN sharing key of {url}"))?;
    let station = mbank_station::Station::open(cache_dir, cache_size)?;
    let cache = station.cache.clone();
    let get: mbank_server::peer::CacheGet = Arc::new(move |id| cache.get(id));
    let stats = Arc::new(mbank_server::peer::PeerStats::default());
    let router = mbank_server::peer::peer_router(key, get, stats);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _in_runtime = rt.enter();
    let stop = crate::attach::shutdown_signal();
    rt.block_on(async move {
        let tcp = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = tcp.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on http://{addr}");
            let _ = out.flush();
        }
        mbank_server::peer::serve(tcp, router, stop).await;
        Ok(())
    })
}
