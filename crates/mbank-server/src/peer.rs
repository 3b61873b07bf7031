//! **LAN sharing** (lookaside, issue 17): stations of a lab hand each other chunks
//! from their caches, so that a class starting one base does not pull every byte
//! through the bank server. Off by default (`mbank serve --lan-sharing`, and
//! `MBANK_PEERS` on the stations).
//!
//! - **Grants**: a station asks the server (`POST /v1/peers/grant`) for a grant over
//!   the chunks it is about to fetch. The server keeps those the caller may read (the
//!   rule of its own chunk reads: another user's chunk is left out exactly as an absent
//!   one is) and signs, with its Ed25519 key (`peer-key.pk8` in the bank directory,
//!   made on the first `serve --lan-sharing`), who asked, until when
//!   ([`GRANT_SECONDS`]), and the chunk ids. The public key is `GET /v1/peers/key`.
//! - **Peers** (`mbank peer`, one per station): [`peer_router`] answers `POST
//!   /v1/peer/chunks` with those of the asked chunks that its station cache holds,
//!   only against a grant whose signature checks with the server's key, that has not
//!   expired and that names each chunk; anything else is `403`. It serves each chunk
//!   in the bank's stored form when asked (`encoded`: compressed once, and kept in a
//!   64 MiB memory cache, since a class asks one peer for the same chunks), else
//!   plaintext (the cache's form); the asking station checks every chunk it receives
//!   by its hash and takes the rest from the bank.
//!
//! A grant's bytes ([`GRANT_MAGIC`]): `MBGR`, format 1, the expiry (ms since the epoch,
//! u64 LE), the user (u16 LE length, UTF-8), the count (u32 LE) and the 32-byte chunk
//! ids. Grants and signatures travel in hex.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use mbank_core::ChunkId;
use mbank_remote::wire;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// How long a grant is good for.
pub const GRANT_SECONDS: u64 = 120;
/// The first bytes of a grant.
pub const GRANT_MAGIC: [u8; 4] = *b"MBGR";
const GRANT_FORMAT: u8 = 1;
/// Most chunks one grant or one peer request names.
pub const MAX_CHUNKS: usize = wire::MAX_GET_MANY;
/// The key's file in the bank directory.
pub const KEY_FILE: &str = "peer-key.pk8";

/// The server's signing key for grants.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl Signer {
    /// The key in `bank_dir` ([`KEY_FILE`]), made (readable by its owner only) if
    /// there is none.
    pub fn load_or_create(bank_dir: &Path) -> Result<Signer, String> {
        let path = bank_dir.join(KEY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| "cannot generate the LAN sharing key".to_string())?;
                let tmp = path.with_extension("tmp");
                {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .and_then(|mut f| f.write_all(doc.as_ref()).map(|_| f))
                        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
                    f.flush().ok();
                    f.sync_all()
                        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
                }
                std::fs::rename(&tmp, &path)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let pair = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| {
            format!(
                "{} is not an Ed25519 key ({e}); remove it and a new one is made",
                path.display()
            )
        })?;
        Ok(Signer { pair })
    }

    /// The public key, in hex.
    pub fn public_hex(&self) -> String {
        hex(self.pair.public_key().as_ref())
    }

    /// A grant to `user` over `chunks` until `now_ms` + [`GRANT_SECONDS`]: the grant's
    /// bytes and their signature, in hex.
    pub fn grant(&self, user: &str, chunks: &[ChunkId], now_ms: i64) -> (String, String) {
        let expires = now_ms.max(0) as u64 + GRANT_SECONDS * 1000;
        let mut b = Vec::with_capacity(19 + user.len() + 32 * chunks.len());
        b.extend_from_slice(&GRANT_MAGIC);
        b.push(GRANT_FORMAT);
        b.extend_from_slice(&expires.to_le_bytes());
        b.extend_from_slice(&(user.len() as u16).to_le_bytes());
        b.extend_from_slice(user.as_bytes());
        b.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        for id in chunks {
            b.extend_from_slice(id.as_bytes());
        }
        let sig = self.pair.sign(&b);
        (hex(&b), hex(sig.as_ref()))
    }
}

/// What a checked grant allows.
#[derive(Debug)]
pub struct Granted {
    pub user: String,
    pub expires_ms: u64,
    pub chunks: HashSet<ChunkId>,
}

/// Checks a grant (hex) and its signature (hex) against the server's public key
/// `public` at `now_ms`; the reason it is refused otherwise.
pub fn check_grant(public: &[u8], grant: &str, sig: &str, now_ms: i64) -> Result<Granted, String> {
    let b = unhex(grant).ok_or("the grant is not hex")?;
    let s = unhex(sig).ok_or("the signature is not hex")?;
    UnparsedPublicKey::new(&ED25519, public)
        .verify(&b, &s)
        .map_err(|_| "the grant's signature does not check with the bank server's key")?;
    let bad = || "the grant is malformed".to_string();
    if b.len() < 19 || b[..4] != GRANT_MAGIC || b[4] != GRANT_FORMAT {
        return Err(bad());
    }
    let expires_ms = u64::from_le_bytes(b[5..13].try_into().map_err(|_| bad())?);
    let ulen = u16::from_le_bytes(b[13..15].try_into().map_err(|_| bad())?) as usize;
    let rest = &b[15..];
    if rest.len() < ulen + 4 {
        return Err(bad());
    }
    let user = String::from_utf8(rest[..ulen].to_vec()).map_err(|_| bad())?;
    let n = u32::from_le_bytes(rest[ulen..ulen + 4].try_into().map_err(|_| bad())?) as usize;
    let ids = &rest[ulen + 4..];
    if ids.len() != n.saturating_mul(32) {
        return Err(bad());
    }
    if (now_ms.max(0) as u64) > expires_ms {
        return Err("the grant has expired; ask the bank server for a new one".into());
    }
    let chunks = ids
        .chunks_exact(32)
        .map(|c| ChunkId::from_bytes(c.try_into().expect("32 bytes")))
        .collect();
    Ok(Granted {
        user,
        expires_ms,
        chunks,
    })
}

/// What a peer served so far (`GET /v1/peer/stats`).
#[derive(Default, Debug)]
pub struct PeerStats {
    pub requests: AtomicU64,
    pub chunks_served: AtomicU64,
    pub bytes_served: AtomicU64,
    pub refused: AtomicU64,
}

/// Reads a chunk's plaintext from the station cache, if it holds a good copy.
pub type CacheGet = Arc<dyn Fn(&ChunkId) -> Option<Vec<u8>> + Send + Sync>;

#[derive(Clone)]
struct PeerState {
    public: Arc<Vec<u8>>,
    get: CacheGet,
    stats: Arc<PeerStats>,
    encoded: Arc<Encoded>,
}

/// Bytes of encoded chunks a peer keeps in memory.
const ENCODED_CACHE_BYTES: usize = 64 << 20;

/// Chunks a peer encoded lately, oldest evicted first.
#[derive(Default)]
struct Encoded(std::sync::Mutex<EncodedInner>);

#[derive(Default)]
struct EncodedInner {
    map: std::collections::HashMap<ChunkId, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<ChunkId>,
    bytes: usize,
}

impl Encoded {
    /// `id`'s stored form: remembered, or encoded from the plaintext `get` gives.
    fn get(&self, id: &ChunkId, get: &CacheGet) -> Option<Arc<Vec<u8>>> {
        if let Some(e) = self.0.lock().unwrap_or_else(|p| p.into_inner()).map.get(id) {
            return Some(e.clone());
        }
        let plain = get(id)?;
        let e = Arc::new(
            mbank_core::chunk::encode_with_id(*id, &plain, mbank_core::chunk::DEFAULT_ZSTD_LEVEL)
                .bytes,
        );
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if c.map.insert(*id, e.clone()).is_none() {
            c.order.push_back(*id);
            c.bytes += e.len();
        }
        while c.bytes > ENCODED_CACHE_BYTES {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(v) = c.map.remove(&old) {
                c.bytes -= v.len();
            }
        }
        Some(e)
    }
}

/// A station's peer service over its cache `get`, checking grants with the bank
/// server's public key `public`; see the module docs.
pub fn peer_router(public: Vec<u8>, get: CacheGet, stats: Arc<PeerStats>) -> Router {
    Router::new()
        .route("/v1/peer/chunks", post(peer_chunks))
        .route("/v1/peer/stats", axum::routing::get(peer_stats))
        .layer(DefaultBodyLimit::max(64 * MAX_CHUNKS + (64 << 10)))
        .with_state(PeerState {
            public: Arc::new(public),
            get,
            stats,
            encoded: Arc::default(),
        })
}

/// Serves `router` (a [`peer_router`]) on `tcp` until `shutdown`, with the bank
/// server's own connection limits (header timeouts, connection caps).
pub async fn serve(
    tcp: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    crate::conn::run(tcp, None, router, crate::Limits::default(), shutdown).await
}

async fn peer_stats(State(p): State<PeerState>) -> Response {
    let s = &p.stats;
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "requests": s.requests.load(Relaxed),
            "chunks_served": s.chunks_served.load(Relaxed),
            "bytes_served": s.bytes_served.load(Relaxed),
            "refused": s.refused.load(Relaxed),
        }),
    )
}

fn refuse(p: &PeerState, status: StatusCode, kind: &str, why: String) -> Response {
    p.stats.refused.fetch_add(1, Relaxed);
    json_response(status, serde_json::json!({"kind": kind, "message": why}))
}

async fn peer_chunks(State(p): State<PeerState>, body: axum::body::Bytes) -> Response {
    p.stats.requests.fetch_add(1, Relaxed);
    let req: wire::PeerRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                &p,
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the request is not a peer request: {e}"),
            );
        }
    };
    if req.chunks.len() > MAX_CHUNKS {
        return refuse(
            &p,
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("at most {MAX_CHUNKS} chunks per request"),
        );
    }
    let now = mbank_catalog::now_ms();
    let granted = match check_grant(&p.public, &req.grant, &req.sig, now) {
        Ok(g) => g,
        Err(why) => return refuse(&p, StatusCode::FORBIDDEN, "bad_grant", why),
    };
    let mut ids = Vec::with_capacity(req.chunks.len());
    for c in &req.chunks {
        match c.parse::<ChunkId>() {
            Ok(id) if granted.chunks.contains(&id) => ids.push(id),
            Ok(id) => {
                return refuse(
                    &p,
                    StatusCode::FORBIDDEN,
                    "bad_grant",
                    format!("chunk {id} is not in the grant"),
                );
            }
            Err(e) => {
                return refuse(&p, StatusCode::BAD_REQUEST, "bad_request", e.to_string());
            }
        }
    }
    let (get, stats, encoded) = (p.get.clone(), p.stats.clone(), p.encoded.clone());
    let out = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for id in ids {
            let bytes = match req.encoded {
                true => encoded.get(&id, &get),
                false => get(&id).map(Arc::new),
            };
            if let Some(b) = bytes {
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(&b);
                stats.chunks_served.fetch_add(1, Relaxed);
                stats.bytes_served.fetch_add(b.len() as u64, Relaxed);
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response()
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u8) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&[i])).collect()
    }

    #[test]
    fn a_grant_checks_with_its_key_until_it_expires_and_names_its_chunks() {
        let d = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(d.path()).unwrap();
        let again = Signer::load_or_create(d.path()).unwrap();
        assert_eq!(s.public_hex(), again.public_hex(), "the key is kept");
        let public = unhex(&s.public_hex()).unwrap();
        let (g, sig) = s.grant("alice", &ids(3), 1_000);
        let ok = check_grant(&public, &g, &sig, 2_000).unwrap();
        assert_eq!(ok.user, "alice");
        assert_eq!(ok.chunks, ids(3).into_iter().collect());
        let late = 1_000 + GRANT_SECONDS as i64 * 1000 + 1;
        assert!(
            check_grant(&public, &g, &sig, late)
                .unwrap_err()
                .contains("expired")
        );
        // Another key's signature, a changed grant, garbage: refused.
        let other = tempfile::tempdir().unwrap();
        let o = Signer::load_or_create(other.path()).unwrap();
        let (_, osig) = o.grant("alice", &ids(3), 1_000);
        assert!(check_grant(&public, &g, &osig, 2_000).is_err());
        let mut forged = g.clone();
        forged.replace_range(40..42, "ff");
        assert!(check_grant(&public, &forged, &sig, 2_000).is_err());
        assert!(check_grant(&public, "zz", &sig, 2_000).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
