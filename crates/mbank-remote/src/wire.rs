//! What travels between a station and the bank server (`docs/api.md`). Both sides use
//! these types, so a change here is a change of the API.

use mbank_catalog::{CommitOutcome, Lease, Policy, VersionInfo};
use mbank_core::{ChunkId, MachineName, VersionId};
use serde::{Deserialize, Serialize};

/// The API's version: every path starts with `/v1`.
pub const PREFIX: &str = "/v1";
/// Largest JSON body the server reads.
pub const MAX_JSON: usize = 1 << 20;
/// Largest commit body (header, disk index, stream indexes).
pub const MAX_COMMIT: usize = 64 << 20;
/// Most ids in one `have` query.
pub const MAX_HAVE: usize = 4096;
/// Most chunks, and most bytes, in one upload batch (`POST /v1/chunks`).
pub const MAX_BATCH_CHUNKS: usize = 256;
pub const MAX_BATCH_BYTES: usize = 64 << 20;
/// Most ids in one `POST /v1/chunks/get`.
pub const MAX_GET_MANY: usize = 64;
/// Most bytes in one answer to `POST /v1/chunks/get` (unless its first chunk alone is
/// larger): the server answers a prefix of the ids asked and the client asks again.
pub const MAX_GET_BYTES: usize = 64 << 20;
/// Most ids in one `POST /v1/chunks/urls`.
pub const MAX_URLS: usize = 256;
/// The error kind of `POST /v1/chunks/urls` on a bank that hands out no direct URLs
/// (its chunks are in a directory, or `serve --no-direct-reads`): fetch through the
/// server.
pub const NO_DIRECT_READS: &str = "no_direct_reads";

/// The answer to `POST /v1/chunks/urls`: for each id asked, in order, a URL to GET its
/// stored bytes from straight from the object store, or `null` for a chunk the user
/// cannot read (or the bank lacks: the two are not told apart). Each URL is valid for
/// `valid_secs` from when the server made it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkUrls {
    pub valid_secs: u64,
    pub urls: Vec<Option<String>>,
}

/// Most chunks in one `POST /v1/chunks/upload-urls` or `POST /v1/chunks/confirm`.
pub const MAX_DIRECT_UPLOADS: usize = MAX_BATCH_CHUNKS;
/// The error kind of the direct-upload routes on a bank that takes no direct uploads
/// (its chunks are in a directory, or `serve --no-direct-writes`): upload through the
/// server.
pub const NO_DIRECT_WRITES: &str = "no_direct_writes";

/// The answer to `POST /v1/chunks/upload-urls`: for each chunk asked, in order, a URL
/// to PUT its stored bytes to, with the header `x-amz-checksum-sha256` set to the
/// base64 SHA-256 of those bytes (the one asked with); valid for `valid_secs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadUrls {
    pub valid_secs: u64,
    pub urls: Vec<String>,
}

/// One chunk of a direct upload: its id, and the SHA-256 and length of its stored
/// bytes (what the presigned URL takes and the confirmation checks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upload {
    pub id: ChunkId,
    pub sha256: [u8; 32],
    pub len: u32,
}

impl Upload {
    /// The entry for `bytes`, the stored bytes of chunk `id`.
    pub fn of(id: ChunkId, bytes: &[u8]) -> Upload {
        Upload {
            id,
            sha256: mbank_store::sha256(bytes),
            len: bytes.len() as u32,
        }
    }
}

/// Bytes of one [`Upload`] in a list.
const UPLOAD_ENTRY: usize = ChunkId::LEN + 32 + 4;

/// The body of `POST /v1/chunks/upload-urls` and `POST /v1/chunks/confirm`: for each
/// chunk its 32-byte id, the SHA-256 of its stored bytes and their length (u32
/// little-endian).
pub fn upload_list_body(uploads: &[Upload]) -> Vec<u8> {
    let mut out = Vec::with_capacity(uploads.len() * UPLOAD_ENTRY);
    for u in uploads {
        out.extend_from_slice(u.id.as_bytes());
        out.extend_from_slice(&u.sha256);
        out.extend_from_slice(&u.len.to_le_bytes());
    }
    out
}

/// Parses [`upload_list_body`]: at least one and at most [`MAX_DIRECT_UPLOADS`] entries.
pub fn parse_upload_list(body: &[u8]) -> Option<Vec<Upload>> {
    let n = body.len() / UPLOAD_ENTRY;
    if !body.len().is_multiple_of(UPLOAD_ENTRY) || n == 0 || n > MAX_DIRECT_UPLOADS {
        return None;
    }
    Some(
        body.chunks_exact(UPLOAD_ENTRY)
            .map(|e| Upload {
                id: ChunkId::from_bytes(e[..32].try_into().expect("32 bytes")),
                sha256: e[32..64].try_into().expect("32 bytes"),
                len: u32::from_le_bytes(e[64..].try_into().expect("4 bytes")),
            })
            .collect(),
    )
}

/// Default and longest token lifetimes.
pub const DEFAULT_TTL_SECS: u64 = 30 * 24 * 3600;
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// An error answer: `kind` is one of the kinds in `docs/api.md`, `message` is for people.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub station: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<ChunkId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub need: Option<u64>,
    /// The request field over a limit (`too_large`, `bad_request`, `too_many`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// That limit: bytes for a field, a count for `too_many`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// `head_moved`: the head found, and the head the request expected (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<VersionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_head: Option<VersionId>,
}

/// `POST /v1/login`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub label: Option<String>,
}

/// The answer to a login.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
    pub expires_ms: i64,
}

/// `GET /v1/whoami`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub admin: bool,
    pub quota: Option<u64>,
    pub used: u64,
}

/// The JSON header of a commit body (`POST /v1/machines/{m}/versions`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitHeader {
    pub info: VersionInfo,
    pub expected_head: Option<VersionId>,
    pub index_len: u64,
    /// Each stream's name and the length of its index, in body order.
    pub streams: Vec<(String, u64)>,
}

/// The answer to a commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitResponse {
    pub outcome: CommitOutcome,
}

/// `PUT /v1/machines/{m}/lease`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub lease: Lease,
    pub replace: Option<String>,
}

/// The answer to taking a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub replaced: Option<Lease>,
}

/// `POST /v1/machines/{m}/lease/heartbeat`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionBody {
    pub session: String,
}

/// `POST /v1/machines/{m}/lease/checkpoint`: `session`'s last checkpoint is `version`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointBody {
    pub session: String,
    pub version: String,
}

/// `POST /v1/peers/grant`: the chunks a station is about to fetch (hex ids).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrantRequest {
    pub chunks: Vec<String>,
}

/// The answer to a [`GrantRequest`]: the signed grant (hex) over the chunks the caller
/// may read, and for each asked chunk whether it is in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrantAnswer {
    pub grant: String,
    pub sig: String,
    pub granted: Vec<bool>,
}

/// `GET /v1/peers/key`: the bank server's public key for grants (hex, Ed25519).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerKey {
    pub key: String,
}

/// `POST /v1/peer/chunks` to a station's peer service: a grant, its signature, and the
/// chunks wanted (hex ids, each in the grant).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerRequest {
    pub grant: String,
    pub sig: String,
    pub chunks: Vec<String>,
    /// Each chunk in the bank's stored form (`mbank_core::chunk`: header, zstd), not
    /// plain: a third of the bytes of a typical system disk's chunks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encoded: bool,
}

/// `{held}`, `{released}`, `{removed}`, `{head}`, `{bytes}` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Held {
    pub held: bool,
}
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Released {
    pub released: bool,
}
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Removed {
    pub removed: u64,
}
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Head {
    pub head: Option<VersionId>,
}
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    pub bytes: u64,
}

/// `POST /v1/machines/{m}/forget`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ForgetRequest {
    pub policy: Policy,
    #[serde(default)]
    pub dry_run: bool,
}

/// `PUT /v1/machines/{m}/head`: move the head to `to` if it is still `expected`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadRequest {
    pub to: VersionId,
    pub expected: Option<VersionId>,
}

/// `POST /v1/machines/{m}/rename`: the machine's new name (same owner); the answer
/// repeats it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenameRequest {
    pub to: MachineName,
}

/// `GET` and `PUT /v1/machines/{m}/policy` (`null`: no policy).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyBody {
    pub policy: Option<Policy>,
}

/// `POST /v1/writers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriterRequest {
    pub pid: u32,
    pub host: String,
    pub what: String,
}

/// `POST /v1/admin/jobs`: start `gc`, `verify` or `stats` on the server's bank.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRequest {
    pub job: String,
}

/// A job an administrator started on the server (`POST /v1/admin/jobs`, `GET
/// /v1/admin/jobs/{id}`): its progress while it runs, its report when done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    /// `gc`, `verify` or `stats`.
    pub job: String,
    /// The administrator who started it (over the API or from the web console).
    #[serde(default)]
    pub by: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// What it does now (a phase of the walk), and how far it is: `done` of `total`
    /// (0: unknown) `unit`s (`bytes` or `chunks`).
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub unit: String,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// The report (what `mbank JOB --json` prints on the bank's host), once done.
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

/// `PUT /v1/admin/users/{name}/quota`: bytes, or `null` for no bound.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuotaBody {
    pub quota: Option<u64>,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub version: String,
}

/// The answer to an upload batch: the stored size of each chunk, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredMany {
    pub bytes: Vec<u64>,
}

/// Builds an upload batch body: for each chunk its 32-byte id, its length (4 bytes,
/// little-endian) and its encoded bytes.
pub fn batch_body<'a>(chunks: impl IntoIterator<Item = (&'a ChunkId, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, bytes) in chunks {
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Splits an upload batch body into (id, encoded bytes) pairs, checking every length
/// and the caps.
pub fn parse_batch_body(body: &[u8]) -> Result<Vec<(ChunkId, &[u8])>, String> {
    let mut rest = body;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if out.len() == MAX_BATCH_CHUNKS {
            return Err(format!(
                "an upload batch holds at most {MAX_BATCH_CHUNKS} chunks"
            ));
        }
        if rest.len() < 36 {
            return Err(format!(
                "the batch ends inside the header of chunk {}",
                out.len()
            ));
        }
        let id = ChunkId::from_bytes(rest[..32].try_into().expect("32 bytes"));
        let len = u32::from_le_bytes(rest[32..36].try_into().expect("4 bytes")) as usize;
        rest = &rest[36..];
        if len > rest.len() {
            return Err(format!(
                "chunk {} of the batch claims {len} bytes; {} are left",
                out.len(),
                rest.len()
            ));
        }
        out.push((id, &rest[..len]));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Why a list of chunk ids (the body of `POST /v1/chunks/have` or `/v1/chunks/get`)
/// was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdListError {
    /// Its length is not a multiple of a chunk id's.
    Ragged { bytes: usize },
    /// It names more ids than the endpoint takes.
    TooMany { ids: usize, max: usize },
}

/// Parses a list of at most `max` chunk ids, each [`ChunkId::LEN`] bytes, in order
/// (repeats kept). Allocates only after the length is known to be within `max`.
pub fn parse_id_list(body: &[u8], max: usize) -> Result<Vec<ChunkId>, IdListError> {
    if !body.len().is_multiple_of(ChunkId::LEN) {
        return Err(IdListError::Ragged { bytes: body.len() });
    }
    let ids = body.len() / ChunkId::LEN;
    if ids > max {
        return Err(IdListError::TooMany { ids, max });
    }
    Ok(body
        .chunks_exact(ChunkId::LEN)
        .map(|c| ChunkId::from_bytes(c.try_into().expect("a whole id")))
        .collect())
}

/// Builds the answer to `POST /v1/chunks/get`: each chunk's length (u32 little-endian)
/// and stored bytes, in the order asked.
pub fn chunks_answer<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// Splits an answer to `POST /v1/chunks/get` that asked for `n` distinct chunks: the
/// first 1 to `n` of them, whole (the server stops at [`MAX_GET_BYTES`]).
pub fn parse_chunks_answer(body: &[u8], n: usize) -> Result<Vec<&[u8]>, String> {
    let mut rest = body;
    let mut out = Vec::with_capacity(n);
    while !rest.is_empty() {
        if out.len() == n {
            return Err(format!(
                "{} bytes follow the last of {n} chunks",
                rest.len()
            ));
        }
        let len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| format!("it ends inside the length of chunk {} of {n}", out.len()))?;
        let chunk = rest
            .get(4..4 + len)
            .ok_or_else(|| format!("it ends inside chunk {} of {n}", out.len()))?;
        out.push(chunk);
        rest = &rest[4 + len..];
    }
    if out.is_empty() && n > 0 {
        return Err(format!("it holds none of the {n} chunks asked"));
    }
    Ok(out)
}

/// Builds a commit body: header length, header, disk index, stream indexes.
pub fn commit_body(header: &CommitHeader, index: &[u8], streams: &[Vec<u8>]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("a commit header always serialises");
    let mut out = Vec::with_capacity(4 + json.len() + index.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(index);
    for s in streams {
        out.extend_from_slice(s);
    }
    out
}

/// A commit body, split: header, disk index, stream indexes.
pub type CommitParts<'a> = (CommitHeader, &'a [u8], Vec<&'a [u8]>);

/// Splits a commit body into its header, disk index and stream indexes, checking every
/// length against the body. The indexes themselves are parsed by their owners.
pub fn parse_commit_body(body: &[u8]) -> Result<CommitParts<'_>, String> {
    let n = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or("the commit body is shorter than its 4-byte header length")?;
    if n > MAX_JSON {
        return Err(format!(
            "the commit header claims {n} bytes; at most {MAX_JSON}"
        ));
    }
    let json = body
        .get(4..4 + n)
        .ok_or("the commit body ends inside its header")?;
    let header: CommitHeader =
        serde_json::from_slice(json).map_err(|e| format!("the commit header is not valid: {e}"))?;
    let mut rest = &body[4 + n..];
    let mut take = |len: u64, what: &str| -> Result<&[u8], String> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= rest.len())
            .ok_or_else(|| format!("the commit body ends inside {what} ({len} bytes announced)"))?;
        let (a, b) = rest.split_at(len);
        rest = b;
        Ok(a)
    };
    let index = take(header.index_len, "the disk index")?;
    let mut streams = Vec::with_capacity(header.streams.len());
    for (name, len) in &header.streams {
        streams.push(take(*len, &format!("stream {name:?}"))?);
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes follow the last index", rest.len()));
    }
    Ok((header, index, streams))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_body_round_trips_and_rejects_damage() {
        let info = VersionInfo {
            id: VersionId::random(),
            machine: "alice/dev".parse().unwrap(),
            parent: None,
            created_ms: 1,
            disk_size: 4096,
            chunk_size: 4096,
            stats: Default::default(),
            config: None,
            streams: vec![],
        };
        let h = CommitHeader {
            info,
            expected_head: None,
            index_len: 3,
            streams: vec![("memory".into(), 2)],
        };
        let body = commit_body(&h, b"abc", &[b"xy".to_vec()]);
        let (h2, idx, s) = parse_commit_body(&body).unwrap();
        assert_eq!(h2.info, h.info);
        assert_eq!(idx, b"abc");
        assert_eq!(s, vec![&b"xy"[..]]);
        for cut in 0..body.len() {
            assert!(parse_commit_body(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(parse_commit_body(&long).is_err());
        assert!(parse_commit_body(&[255, 255, 255, 255]).is_err());
    }

    #[test]
    fn chunks_answer_round_trips_and_rejects_damage() {
        let body = chunks_answer([&b"abc"[..], &b""[..], &b"z"[..]]);
        assert_eq!(
            parse_chunks_answer(&body, 3).unwrap(),
            vec![&b"abc"[..], &b""[..], &b"z"[..]]
        );
        assert!(parse_chunks_answer(&body, 2).is_err());
        // A prefix (the server's byte cap) is an answer; a cut inside a chunk is not.
        assert_eq!(parse_chunks_answer(&body, 4).unwrap().len(), 3);
        assert_eq!(parse_chunks_answer(&body[..7], 3).unwrap().len(), 1);
        assert!(parse_chunks_answer(&[], 3).is_err());
        for cut in (1..body.len()).filter(|c| ![7, 11].contains(c)) {
            assert!(
                parse_chunks_answer(&body[..cut], 3).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn batch_body_round_trips_and_rejects_damage() {
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let body = batch_body([(&a, &b"xyz"[..]), (&b, &b""[..])]);
        let parts = parse_batch_body(&body).unwrap();
        assert_eq!(parts, vec![(a, &b"xyz"[..]), (b, &b""[..])]);
        for cut in 1..body.len() {
            if cut != 39 {
                assert!(parse_batch_body(&body[..cut]).is_err(), "cut at {cut}");
            }
        }
        let many: Vec<u8> = (0..=MAX_BATCH_CHUNKS)
            .flat_map(|_| batch_body([(&a, &b"x"[..])]))
            .collect();
        assert!(parse_batch_body(&many).is_err());
    }
}
