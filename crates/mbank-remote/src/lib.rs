//! # mbank-remote
//!
//! The bank server's HTTP API (`docs/api.md`): the types both sides put on the wire
//! ([`wire`]), and the client that lets every bank operation run against a server:
//!
//! - [`Client`]: one server, one token, a pool of kept-alive connections, retries with
//!   backoff for as long as `MBANK_RETRY_SECS` allows;
//! - [`RemoteCatalog`]: a [`CatalogApi`] over the server's machine, version, lease and
//!   writer endpoints;
//! - [`RemoteStore`]: a [`ChunkStore`] over its chunk endpoints;
//! - [`credentials`]: [`login`], and the tokens kept in the user's credentials file.
//!
//! [`open_bank`] puts them together; the CLI hands the result to
//! `mbank_bank::Bank::with_parts`.

pub mod catalog;
pub mod client;
pub mod credentials;
pub mod packs;
pub mod peers;
pub mod store;
mod tls;
pub mod wire;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use mbank_catalog::CatalogApi;
use mbank_store::ChunkStore;

pub use catalog::RemoteCatalog;
pub use client::{Client, ClientError, ClientOptions, is_url, normalize_url};
pub use credentials::{Credential, Credentials, login};
pub use store::RemoteStore;

/// A bank's chunk store and catalog, as `Bank::with_parts` takes them.
pub type BankParts = (Arc<dyn ChunkStore>, Box<dyn CatalogApi>);

/// A bank server's store and catalog, ready for `Bank::with_parts(url, store, catalog)`.
/// The token is `MBANK_TOKEN` or the credentials file's for `url` (none: requests go
/// without one and the server answers `unauthorized`); the CA certificate is `ca`, else
/// the one filed with the credential. With `MBANK_PEERS` set, reads go through the
/// lab's peers first ([`peers::PeerStore`]). Makes no request.
pub fn open_bank(url: &str, ca: Option<&Path>) -> Result<BankParts, ClientError> {
    open_bank_with_packs(url, ca).map(|(parts, _)| parts)
}

/// [`open_bank`], and the server's packs (`mbank_bank::Bank::with_packs`), on one
/// connection pool.
pub fn open_bank_with_packs(
    url: &str,
    ca: Option<&Path>,
) -> Result<(BankParts, Arc<dyn mbank_store::PackSource>), ClientError> {
    let client = connect(url, ca)?;
    let packs: Arc<dyn mbank_store::PackSource> = Arc::new(packs::RemotePacks::new(client.clone()));
    let store: Arc<dyn ChunkStore> = Arc::new(RemoteStore::new(client.clone()));
    let peers = peers::peers_from_env();
    let store: Arc<dyn ChunkStore> = if peers.is_empty() {
        store
    } else {
        Arc::new(peers::PeerStore::new(store, client.clone(), &peers))
    };
    Ok(((store, Box::new(RemoteCatalog::new(client))), packs))
}

/// A [`Client`] of the bank at `url` with the token and CA [`open_bank`] would use.
pub fn connect(url: &str, ca: Option<&Path>) -> Result<Client, ClientError> {
    let env_token = std::env::var(credentials::TOKEN_ENV).ok();
    connect_with(
        url,
        ca,
        env_token.as_deref(),
        credentials::default_path().as_deref(),
        ClientOptions::from_env(),
    )
}

/// [`connect`] with its environment spelled out: `env_token` (`MBANK_TOKEN`) wins over
/// the token filed for `url` in the credentials file at `creds`; `ca` wins over the CA
/// filed with it. A missing credentials file is no credential.
pub fn connect_with(
    url: &str,
    ca: Option<&Path>,
    env_token: Option<&str>,
    creds: Option<&Path>,
    mut o: ClientOptions,
) -> Result<Client, ClientError> {
    let env_token = env_token.map(str::trim).filter(|t| !t.is_empty());
    let filed = match creds {
        // The file is needed only for what the caller and environment do not give.
        Some(p) if env_token.is_none() || ca.is_none() => {
            Credentials::load_from(p)?.get(url).cloned()
        }
        _ => None,
    };
    o.token = env_token
        .map(str::to_string)
        .or_else(|| filed.as_ref().map(|c| c.token.clone()));
    let others = match creds {
        Some(p) if o.token.is_none() && filed.is_none() => Credentials::load_from(p)?.others(url),
        _ => Vec::new(),
    };
    o.ca_file = ca
        .map(Path::to_path_buf)
        .or_else(|| filed.and_then(|c| c.ca));
    Ok(Client::with_options(url, o)?.with_filed_elsewhere(others))
}
