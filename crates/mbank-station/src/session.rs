//! A session's state on the station's disk, enough to check it in after a crash.
//!
//! ```text
//! <cache>/sessions/<session id>/session.json   what was checked out (below)
//! <cache>/sessions/<session id>/overlay        sparse file, the disk's size: dirty chunks
//! <cache>/sessions/<session id>/dirty          the durable dirty map (docs/formats.md)
//! ```
//!
//! A chunk's bit reaches the durable map only after its overlay data was fsynced, so
//! after a crash every chunk the map names holds what the guest last flushed (or
//! newer). Chunks written but never flushed may be lost, as on a real disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use mbank_core::VersionId;
use serde::{Deserialize, Serialize};

use crate::StationError;

pub const DIRTY_MAGIC: [u8; 4] = *b"MBDM";
pub const DIRTY_VERSION: u8 = 1;
const DIRTY_HEADER: usize = 16;
const DIRTY_TRAILER: usize = 32;
/// Format of `session.json`.
pub const SESSION_FORMAT: u32 = 1;

/// `session.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SessionMeta {
    pub format: u32,
    pub session: String,
    pub machine: String,
    pub base: Option<String>,
    pub disk_size: u64,
    pub chunk_size: u32,
    pub station: String,
    pub pid: u32,
    pub started_ms: i64,
    pub bank: String,
}

impl SessionMeta {
    pub fn base_version(&self) -> Result<Option<VersionId>, StationError> {
        self.base
            .as_deref()
            .map(|b| {
                b.parse().map_err(|_| StationError::BadSession {
                    path: PathBuf::from(&self.session),
                    why: format!("base version {b:?} is not a version id"),
                })
            })
            .transpose()
    }
}

/// Paths of one session's files.
#[derive(Clone, Debug)]
pub struct SessionDir {
    pub dir: PathBuf,
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StationError {
    let what = format!("{what} {}", path.display());
    move |e| StationError::Io { what, source: e }
}

impl SessionDir {
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join("session.json")
    }
    pub fn overlay_path(&self) -> PathBuf {
        self.dir.join("overlay")
    }
    pub fn dirty_path(&self) -> PathBuf {
        self.dir.join("dirty")
    }

    /// Creates the directory, the metadata and an empty overlay of the disk's size.
    pub fn create(dir: PathBuf, meta: &SessionMeta) -> Result<(SessionDir, File), StationError> {
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let s = SessionDir { dir };
        write_atomic(
            &s.meta_path(),
            &serde_json::to_vec_pretty(meta).expect("serialises"),
        )?;
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(s.overlay_path())
            .map_err(io("create", &s.overlay_path()))?;
        overlay
            .set_len(meta.disk_size)
            .map_err(io("size", &s.overlay_path()))?;
        Ok((s, overlay))
    }

    pub fn read_meta(&self) -> Result<SessionMeta, StationError> {
        let p = self.meta_path();
        let bytes = fs::read(&p).map_err(io("read", &p))?;
        if bytes.len() > 64 * 1024 {
            return Err(StationError::BadSession {
                path: p,
                why: "it is over 64 KiB".into(),
            });
        }
        let m: SessionMeta =
            serde_json::from_slice(&bytes).map_err(|e| StationError::BadSession {
                path: p.clone(),
                why: e.to_string(),
            })?;
        if m.format != SESSION_FORMAT {
            return Err(StationError::BadSession {
                path: p,
                why: format!("format {} (this mbank knows {SESSION_FORMAT})", m.format),
            });
        }
        Ok(m)
    }

    /// Writes the dirty map durably: temp file, fsync, rename, fsync the directory.
    pub fn write_dirty(&self, bits: &[u64], count: u64) -> Result<(), StationError> {
        write_atomic(&self.dirty_path(), &encode_dirty(bits, count))
    }

    /// Reads the durable dirty map; a session that never flushed has none (all clean).
    pub fn read_dirty(&self, count: u64) -> Result<Vec<u64>, StationError> {
        let p = self.dirty_path();
        match fs::read(&p) {
            Ok(b) => {
                decode_dirty(&b, count).map_err(|why| StationError::BadSession { path: p, why })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(vec![0; count.div_ceil(64) as usize])
            }
            Err(e) => Err(io("read", &p)(e)),
        }
    }

    pub fn remove(&self) -> Result<(), StationError> {
        fs::remove_dir_all(&self.dir).map_err(io("remove", &self.dir))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StationError> {
    let tmp = path.with_extension("tmp");
    let w = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        fs::rename(&tmp, path)?;
        File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
    };
    w().map_err(io("write", path))
}

/// The dirty map's bytes: header, one bit per chunk (LSB first), BLAKE3 trailer.
pub fn encode_dirty(bits: &[u64], count: u64) -> Vec<u8> {
    let nbytes = count.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(DIRTY_HEADER + nbytes + DIRTY_TRAILER);
    out.extend_from_slice(&DIRTY_MAGIC);
    out.push(DIRTY_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&count.to_le_bytes());
    for i in 0..nbytes {
        out.push((bits[i / 8] >> ((i % 8) * 8)) as u8);
    }
    let sum = blake3_of(&out);
    out.extend_from_slice(&sum);
    out
}

fn blake3_of(b: &[u8]) -> [u8; 32] {
    // The chunk id type is a BLAKE3 hash; reuse it rather than add a dependency.
    *mbank_core::ChunkId::of(b).as_bytes()
}

pub fn decode_dirty(b: &[u8], count: u64) -> Result<Vec<u64>, String> {
    let nbytes = count.div_ceil(8) as usize;
    if b.len() != DIRTY_HEADER + nbytes + DIRTY_TRAILER {
        return Err(format!(
            "dirty map is {} bytes, expected {}",
            b.len(),
            DIRTY_HEADER + nbytes + DIRTY_TRAILER
        ));
    }
    if b[..4] != DIRTY_MAGIC || b[4] != DIRTY_VERSION || b[5..8] != [0; 3] {
        return Err("dirty map has a bad magic or version".into());
    }
    if u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) != count {
        return Err("dirty map is for a disk of another size".into());
    }
    let body = b.len() - DIRTY_TRAILER;
    if blake3_of(&b[..body]) != b[body..] {
        return Err("dirty map checksum mismatch".into());
    }
    let mut bits = vec![0u64; count.div_ceil(64) as usize];
    for (i, byte) in b[DIRTY_HEADER..body].iter().enumerate() {
        bits[i / 8] |= (*byte as u64) << ((i % 8) * 8);
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_map_round_trip_and_damage() {
        let count = 1000;
        let mut bits = vec![0u64; 16];
        for i in [0usize, 7, 63, 64, 999] {
            bits[i / 64] |= 1 << (i % 64);
        }
        let b = encode_dirty(&bits, count);
        assert_eq!(decode_dirty(&b, count).unwrap(), bits);
        for pos in 0..b.len() {
            let mut bad = b.clone();
            bad[pos] ^= 1;
            assert!(decode_dirty(&bad, count).is_err(), "flip at {pos}");
        }
        assert!(decode_dirty(&b, 999).is_err());
    }
}
