//! The stored form of a chunk.
//!
//! ```text
//! offset size  field
//!      0    4  magic "MBCK"
//!      4    1  format version (1)
//!      5    1  codec: 0 = raw, 1 = zstd
//!      6    2  reserved, zero
//!      8    4  plaintext length, u32 little-endian, 1 ..= MAX_PLAIN_LEN
//!     12    4  payload length, u32 little-endian, must equal the bytes that follow
//!     16    …  payload: the plaintext (raw) or one zstd frame (zstd)
//! ```
//!
//! The chunk's id is not in the header: it is the BLAKE3-256 hash of the plaintext and
//! names the chunk wherever it is stored. [`decode`] always re-hashes and compares.

use crate::ids::ChunkId;

pub const MAGIC: [u8; 4] = *b"MBCK";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest plaintext a chunk may hold (16 MiB): bounds every allocation in [`decode`].
pub const MAX_PLAIN_LEN: usize = 16 << 20;
/// Largest stored chunk: header plus a payload no larger than the plaintext (raw is used
/// whenever compression does not help).
pub const MAX_STORED_LEN: usize = HEADER_LEN + MAX_PLAIN_LEN;
/// zstd level used for new chunks: fast, and within a few percent of level 9 on disk images.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// One zstd decompression context per thread: making one per chunk cost about a
    /// fifth of the decompression of a 64 KiB chunk (profile of an export, issue 12).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// How a chunk's payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

/// Why stored chunk bytes could not be turned back into the plaintext they claim to be.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk {id}: stored data is {len} bytes, shorter than the 16-byte header")]
    Truncated { id: ChunkId, len: usize },
    #[error("chunk {id}: bad magic (not a Machine Bank chunk)")]
    BadMagic { id: ChunkId },
    #[error("chunk {id}: format version {version} is not supported by this mbank (knows 1)")]
    UnsupportedVersion { id: ChunkId, version: u8 },
    #[error("chunk {id}: reserved header bytes are not zero")]
    BadReserved { id: ChunkId },
    #[error("chunk {id}: unknown codec {codec}")]
    UnknownCodec { id: ChunkId, codec: u8 },
    #[error("chunk {id}: header says {claimed} bytes, which is out of bounds ({why})")]
    BadLength {
        id: ChunkId,
        claimed: u64,
        why: &'static str,
    },
    #[error("chunk {id}: payload does not decompress: {why}")]
    Decompress { id: ChunkId, why: String },
    #[error("chunk {id}: content hash mismatch (the data is damaged; it hashes to {actual})")]
    HashMismatch { id: ChunkId, actual: ChunkId },
}

impl ChunkError {
    /// The chunk the error is about.
    pub fn id(&self) -> ChunkId {
        match self {
            ChunkError::Truncated { id, .. }
            | ChunkError::BadMagic { id }
            | ChunkError::UnsupportedVersion { id, .. }
            | ChunkError::BadReserved { id }
            | ChunkError::UnknownCodec { id, .. }
            | ChunkError::BadLength { id, .. }
            | ChunkError::Decompress { id, .. }
            | ChunkError::HashMismatch { id, .. } => *id,
        }
    }
}

/// A chunk ready to be stored: its id and its stored bytes (header + payload).
#[derive(Clone, Debug)]
pub struct EncodedChunk {
    pub id: ChunkId,
    pub bytes: Vec<u8>,
    pub codec: Codec,
}

/// A decoded, verified chunk.
#[derive(Clone, Debug)]
pub struct DecodedChunk {
    pub plain: Vec<u8>,
    pub codec: Codec,
}

fn header(codec: Codec, plain_len: usize, payload_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = FORMAT_VERSION;
    h[5] = codec as u8;
    h[8..12].copy_from_slice(&(plain_len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h
}

/// Hashes and compresses `plain` into its stored form. Compression is kept only when it
/// saves at least 1/32 of the size; otherwise the chunk is stored raw.
///
/// # Panics
/// If `plain` is empty or larger than [`MAX_PLAIN_LEN`]: callers chunk their input first.
pub fn encode(plain: &[u8], level: i32) -> EncodedChunk {
    let id = ChunkId::of(plain);
    encode_with_id(id, plain, level)
}

/// Like [`encode`] for a plaintext whose id the caller has already computed.
pub fn encode_with_id(id: ChunkId, plain: &[u8], level: i32) -> EncodedChunk {
    assert!(!plain.is_empty() && plain.len() <= MAX_PLAIN_LEN);
    let limit = plain.len() - plain.len() / 32;
    let mut bytes = Vec::with_capacity(HEADER_LEN + limit);
    bytes.extend_from_slice(&[0u8; HEADER_LEN]);
    // Compress with this thread's reusable context (creating one per chunk costs more
    // than compressing a small chunk); output beyond `limit` fails and the chunk goes raw.
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        let (_, z) = c.as_mut()?;
        let mut out = Vec::with_capacity(limit);
        match z.compress_to_buffer(plain, &mut out) {
            Ok(n) if n < limit => Some(out),
            _ => None,
        }
    });
    let codec = match compressed {
        Some(c) => {
            bytes.extend_from_slice(&c);
            Codec::Zstd
        }
        None => {
            bytes.extend_from_slice(plain);
            Codec::Raw
        }
    };
    let payload_len = bytes.len() - HEADER_LEN;
    bytes[..HEADER_LEN].copy_from_slice(&header(codec, plain.len(), payload_len));
    EncodedChunk { id, bytes, codec }
}

/// Parses the header of stored bytes without touching the payload: returns
/// (codec, plaintext length). Used by stores to sanity-check a file cheaply.
pub fn parse_header(id: &ChunkId, bytes: &[u8]) -> Result<(Codec, usize), ChunkError> {
    parse_header_of(id, bytes, bytes.len())
}

/// [`parse_header`] of a stored chunk of `stored_len` bytes of which `bytes` holds at
/// least the first [`HEADER_LEN`] (a store that reads only the header to learn the
/// plaintext length).
pub fn parse_header_of(
    id: &ChunkId,
    bytes: &[u8],
    stored_len: usize,
) -> Result<(Codec, usize), ChunkError> {
    let id = *id;
    if bytes.len() < HEADER_LEN || stored_len < HEADER_LEN {
        return Err(ChunkError::Truncated {
            id,
            len: bytes.len().min(stored_len),
        });
    }
    if bytes[..4] != MAGIC {
        return Err(ChunkError::BadMagic { id });
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(ChunkError::UnsupportedVersion {
            id,
            version: bytes[4],
        });
    }
    if bytes[6..8] != [0, 0] {
        return Err(ChunkError::BadReserved { id });
    }
    let codec = match bytes[5] {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        codec => return Err(ChunkError::UnknownCodec { id, codec }),
    };
    let plain_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let payload_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if plain_len == 0 || plain_len > MAX_PLAIN_LEN {
        return Err(ChunkError::BadLength {
            id,
            claimed: plain_len as u64,
            why: "plaintext must be 1 byte to 16 MiB",
        });
    }
    if payload_len != stored_len - HEADER_LEN {
        return Err(ChunkError::BadLength {
            id,
            claimed: payload_len as u64,
            why: "payload length differs from the stored size",
        });
    }
    if codec == Codec::Raw && payload_len != plain_len {
        return Err(ChunkError::BadLength {
            id,
            claimed: payload_len as u64,
            why: "a raw payload must be as long as the plaintext",
        });
    }
    Ok((codec, plain_len))
}

/// Decodes stored bytes and checks that the plaintext hashes to `id`.
pub fn decode(id: &ChunkId, bytes: &[u8]) -> Result<DecodedChunk, ChunkError> {
    let (codec, plain_len) = parse_header(id, bytes)?;
    let payload = &bytes[HEADER_LEN..];
    let plain = match codec {
        Codec::Raw => payload.to_vec(),
        Codec::Zstd => {
            let plain = DECOMPRESSOR
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new()?);
                    }
                    d.as_mut()
                        .expect("made above")
                        .decompress(payload, plain_len)
                })
                .map_err(|e| ChunkError::Decompress {
                    id: *id,
                    why: e.to_string(),
                })?;
            if plain.len() != plain_len {
                return Err(ChunkError::BadLength {
                    id: *id,
                    claimed: plain_len as u64,
                    why: "payload decompresses to a different length",
                });
            }
            plain
        }
    };
    let actual = ChunkId::of(&plain);
    if actual != *id {
        return Err(ChunkError::HashMismatch { id: *id, actual });
    }
    Ok(DecodedChunk { plain, codec })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_and_random() {
        let text = b"machine bank ".repeat(5000);
        let e = encode(&text, DEFAULT_ZSTD_LEVEL);
        assert_eq!(e.codec, Codec::Zstd);
        assert!(e.bytes.len() < text.len() / 10);
        assert_eq!(decode(&e.id, &e.bytes).unwrap().plain, text);

        let mut random = vec![0u8; 65536];
        getrandom::fill(&mut random).unwrap();
        let e = encode(&random, DEFAULT_ZSTD_LEVEL);
        assert_eq!(e.codec, Codec::Raw);
        assert_eq!(e.bytes.len(), HEADER_LEN + random.len());
        assert_eq!(decode(&e.id, &e.bytes).unwrap().plain, random);
    }

    #[test]
    fn damage_is_detected() {
        let text = b"0123456789".repeat(1000);
        let e = encode(&text, 3);
        // Every single-byte flip anywhere is caught by a header check or the hash.
        for pos in (0..e.bytes.len()).step_by(7) {
            let mut bad = e.bytes.clone();
            bad[pos] ^= 0x40;
            assert!(decode(&e.id, &bad).is_err(), "flip at {pos}");
        }
        assert!(matches!(
            decode(&e.id, &e.bytes[..10]),
            Err(ChunkError::Truncated { .. })
        ));
        let other = ChunkId::of(b"other");
        assert!(matches!(
            decode(&other, &e.bytes),
            Err(ChunkError::HashMismatch { .. })
        ));
    }

    #[test]
    fn hostile_header_lengths() {
        let id = ChunkId::of(b"x");
        let mut h = header(Codec::Zstd, MAX_PLAIN_LEN + 1, 4).to_vec();
        h.extend_from_slice(&[0; 4]);
        assert!(matches!(decode(&id, &h), Err(ChunkError::BadLength { .. })));
        // A zstd bomb claiming a small plaintext cannot allocate more than it claims.
        let big = vec![0u8; 1 << 20];
        let frame = zstd::bulk::compress(&big, 3).unwrap();
        let mut bomb = header(Codec::Zstd, 100, frame.len()).to_vec();
        bomb.extend_from_slice(&frame);
        assert!(decode(&id, &bomb).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 1..20000), rep in 1usize..4) {
            let data = data.repeat(rep);
            let e = encode(&data, 1);
            let d = decode(&e.id, &e.bytes).unwrap();
            prop_assert_eq!(d.plain, data);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&ChunkId::of(b"x"), &bytes);
        }
    }
}
