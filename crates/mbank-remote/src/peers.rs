//! LAN sharing on the station side ([`PeerStore`]): before fetching chunks from the bank
//! server, ask the lab's other stations (`MBANK_PEERS`, their `mbank peer` services)
//! for them, under a grant the server signed for this user and these chunks
//! (`mbank-server`'s `peer` module has the scheme). Every chunk a peer sends is hashed
//! and kept only if it is the chunk asked for; what no peer had (or sent right) comes
//! from the bank as before. A peer that is slow, gone, refuses or sends a wrong chunk
//! costs one short timeout or one answer, and is then left alone for [`PEER_REST`].
//! Chunks travel in the bank's stored form (compressed). With several peers, each
//! request starts at the next one in turn, from a place of its own per process, so
//! that a class's stations spread their asking over the peers rather than all asking
//! the first.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mbank_core::ChunkId;
use mbank_core::chunk::EncodedChunk;
use mbank_store::{ChunkStore, Each, StoreError, StoreStats, SweepStats};

use crate::client::{Client, ClientOptions, Payload};
use crate::wire;
use ureq::http;

/// The environment variable naming the peers: `HOST:PORT` (or `http://HOST:PORT`),
/// separated by commas or spaces.
pub const PEERS_ENV: &str = "MBANK_PEERS";
/// How long one request to a peer may take, connection included (`MBANK_PEER_TIMEOUT_MS`
/// overrides it).
pub const PEER_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a peer that failed is left alone.
pub const PEER_REST: Duration = Duration::from_secs(30);

/// The peers `MBANK_PEERS` names, as URLs; empty when it is unset.
pub fn peers_from_env() -> Vec<String> {
    std::env::var(PEERS_ENV)
        .unwrap_or_default()
        .split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.starts_with("http://") || s.starts_with("https://") {
                s.trim_end_matches('/').to_string()
            } else {
                format!("http://{s}")
            }
        })
        .collect()
}

/// The bank server's public key for LAN sharing grants (`GET /v1/peers/key`), for a
/// peer service to check grants with.
pub fn server_key(bank: &Client) -> Result<Vec<u8>, crate::ClientError> {
    let k: wire::PeerKey = bank.get_json("/peers/key", "the LAN sharing key")?;
    let bad = |why: &str| bank.bad_answer("the LAN sharing key", why.to_string());
    if k.key.len() != 64 {
        return Err(bad("not a 32-byte key in hex"));
    }
    (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&k.key[i..i + 2], 16).map_err(|_| bad("not hex")))
        .collect()
}

struct Peer {
    url: String,
    client: Client,
    resting_until: Mutex<Option<Instant>>,
}

/// A [`ChunkStore`] over a bank server's store that fetches through the lab's peers
/// first; see the module docs. Everything but reads goes straight to the bank.
pub struct PeerStore {
    inner: Arc<dyn ChunkStore>,
    bank: Client,
    peers: Vec<Peer>,
    /// Where the next request starts in `peers`.
    next: std::sync::atomic::AtomicUsize,
}

impl PeerStore {
    /// Reads of `inner` (the bank server `bank`'s store) go through `peers` first.
    pub fn new(inner: Arc<dyn ChunkStore>, bank: Client, peers: &[String]) -> Self {
        let timeout = std::env::var("MBANK_PEER_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(PEER_TIMEOUT);
        let peers = peers
            .iter()
            .filter_map(|url| {
                let o = ClientOptions {
                    retry_budget: Duration::ZERO,
                    connect_timeout: timeout,
                    request_timeout: timeout,
                    ..ClientOptions::default()
                };
                Client::with_options(url, o).ok().map(|client| Peer {
                    url: url.clone(),
                    client,
                    resting_until: Mutex::new(None),
                })
            })
            .collect();
        // A start of its own: the process id and the clock's nanoseconds.
        let seed = std::process::id() as usize
            ^ SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as usize);
        PeerStore {
            inner,
            bank,
            peers,
            next: std::sync::atomic::AtomicUsize::new(seed),
        }
    }

    /// Plaintexts of `ids` from the peers, where they had them and sent them right.
    fn ask_peers(&self, ids: &[ChunkId]) -> Vec<Option<Vec<u8>>> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ids.len()];
        let n = self.peers.len().max(1);
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        let awake: Vec<&Peer> = self.peers[start..]
            .iter()
            .chain(&self.peers[..start])
            .filter(|p| {
                let r = p.resting_until.lock().expect("peer lock");
                r.is_none_or(|t| Instant::now() >= t)
            })
            .collect();
        if awake.is_empty() || ids.is_empty() {
            return out;
        }
        let req = wire::GrantRequest {
            chunks: ids.iter().map(|i| i.to_hex()).collect(),
        };
        let grant: wire::GrantAnswer = match self.bank.send_json(
            http::Method::POST,
            "/peers/grant",
            "a LAN sharing grant",
            &req,
        ) {
            Ok(g) => g,
            // LAN sharing off on the server, or it cannot be reached: the bank path
            // says what is wrong, if anything.
            Err(_) => return out,
        };
        for peer in awake {
            let want: Vec<usize> = (0..ids.len())
                .filter(|&i| out[i].is_none() && grant.granted.get(i) == Some(&true))
                .collect();
            if want.is_empty() {
                break;
            }
            match self.ask(peer, &grant, ids, &want) {
                Ok(got) => {
                    for (i, plain) in got {
                        out[i] = Some(plain);
                    }
                }
                Err(why) => {
                    *peer.resting_until.lock().expect("peer lock") =
                        Some(Instant::now() + PEER_REST);
                    eprintln!(
                        "mbank: warning: peer {} is skipped for {} s: {why}",
                        peer.url,
                        PEER_REST.as_secs()
                    );
                }
            }
        }
        out
    }

    /// Asks `peer` for the chunks `want` (places in `ids`); the chunks it sent, each
    /// checked by its hash, or why the whole answer is not trusted.
    fn ask(
        &self,
        peer: &Peer,
        grant: &wire::GrantAnswer,
        ids: &[ChunkId],
        want: &[usize],
    ) -> Result<Vec<(usize, Vec<u8>)>, String> {
        let req = wire::PeerRequest {
            grant: grant.grant.clone(),
            sig: grant.sig.clone(),
            chunks: want.iter().map(|&i| ids[i].to_hex()).collect(),
            encoded: true,
        };
        let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let limit = (want.len() as u64)
            * (mbank_core::chunk::MAX_PLAIN_LEN + mbank_core::chunk::HEADER_LEN + 36) as u64;
        let answer = peer
            .client
            .call(
                http::Method::POST,
                "/peer/chunks",
                "chunks from a peer",
                Payload::Json(body),
                limit,
            )
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut rest = &answer[..];
        while !rest.is_empty() {
            if rest.len() < 36 {
                return Err("its answer ends inside a chunk's header".into());
            }
            let id = ChunkId::from_bytes(rest[..32].try_into().expect("32 bytes"));
            let len = u32::from_le_bytes(rest[32..36].try_into().expect("4 bytes")) as usize;
            rest = &rest[36..];
            if rest.len() < len {
                return Err(format!("its answer ends inside chunk {id}"));
            }
            let stored = &rest[..len];
            rest = &rest[len..];
            let Some(&i) = want.iter().find(|&&i| ids[i] == id) else {
                return Err(format!("it sent chunk {id}, which was not asked for"));
            };
            // Decoding checks the plaintext's hash against the id.
            let plain = mbank_core::chunk::decode(&id, stored)
                .map_err(|e| format!("it sent chunk {id} damaged or false: {e}"))?
                .plain;
            got.push((i, plain));
        }
        Ok(got)
    }
}

impl ChunkStore for PeerStore {
    fn put(&self, chunk: &EncodedChunk) -> Result<u64, StoreError> {
        self.inner.put(chunk)
    }
    fn put_many(&self, chunks: &[EncodedChunk]) -> Result<Vec<u64>, StoreError> {
        self.inner.put_many(chunks)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn touch(&self, id: &ChunkId) -> Result<bool, StoreError> {
        self.inner.touch(id)
    }
    fn touch_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        self.inner.touch_many(ids)
    }
    fn get_raw(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        self.inner.get_raw(id)
    }
    fn get_raw_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.get_raw_many(ids)
    }
    fn get_raw_each(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(usize, Result<Vec<u8>, StoreError>) -> std::ops::ControlFlow<()>,
    ) {
        self.inner.get_raw_each(ids, each)
    }
    fn quarantine(&self, id: &ChunkId) -> Result<Option<PathBuf>, StoreError> {
        self.inner.quarantine(id)
    }
    fn sweep(
        &self,
        cutoff: SystemTime,
        keep: &(dyn Fn(&ChunkId) -> bool + Sync),
    ) -> Result<SweepStats, StoreError> {
        self.inner.sweep(cutoff, keep)
    }
    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }
    fn plain_len(&self, id: &ChunkId) -> Result<usize, StoreError> {
        self.inner.plain_len(id)
    }
    fn plain_len_many(&self, ids: &[ChunkId]) -> Result<Vec<usize>, StoreError> {
        self.inner.plain_len_many(ids)
    }
    fn read_each(&self, ids: &[ChunkId], jobs: usize, each: &Each<'_>) -> Result<(), StoreError> {
        self.inner.read_each(ids, jobs, each)
    }

    fn read(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        match self.ask_peers(std::slice::from_ref(id)).pop().flatten() {
            Some(plain) => Ok(plain),
            None => self.inner.read(id),
        }
    }

    fn read_many(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut got = self.ask_peers(ids);
        let rest: Vec<ChunkId> = ids
            .iter()
            .zip(&got)
            .filter(|(_, g)| g.is_none())
            .map(|(id, _)| *id)
            .collect();
        if rest.is_empty() {
            return Ok(got.into_iter().map(|g| g.expect("every chunk")).collect());
        }
        let mut from_bank = self.inner.read_many(&rest)?.into_iter();
        Ok(got
            .iter_mut()
            .map(|g| match g.take() {
                Some(p) => p,
                None => from_bank.next().expect("one per missing chunk"),
            })
            .collect())
    }
}
