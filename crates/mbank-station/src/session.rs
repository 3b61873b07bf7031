//! A session's state on the station's disk, enough to check it in after a crash.
//!
//! ```text
//! <cache>/sessions/<session id>/session.json   what was checked out (below)
//! <cache>/sessions/<session id>/overlay        sparse file, the disk's size: written blocks
//! <cache>/sessions/<session id>/dirty          the durable dirty map (docs/formats.md)
//! <cache>/sessions/.new-<session id>/          a session being created (renamed when ready)
//! <cache>/damaged/<session id>/                a session recovery could not account for, kept
//! ```
//!
//! A session directory appears under its own name only once it is complete: it is
//! made as `.new-<id>` (metadata, an empty overlay, an empty durable dirty map, all
//! synced) and renamed. So a missing `session.json` or `dirty` in a session directory
//! is damage, never a session half made, and recovery sets such a session aside
//! rather than guess (format 1 sessions, from before the empty map, are told apart by
//! their `session.json` format).
//!
//! The process serving a session holds an exclusive `flock` on its directory for the
//! session's life, and recovery takes the same lock before it touches a session: a
//! session whose lock is held is alive (or being recovered by another process), and
//! the kernel drops the lock when its holder dies, however it dies.
//!
//! The dirty map ([`DirtyMap`]) names, per chunk, the blocks the overlay holds. A
//! block reaches the durable map only after its overlay data was fsynced, so after a
//! crash every block the map names holds what the guest last flushed (or newer), and
//! the rest of a partly written chunk comes from its base chunk. Blocks written but
//! never flushed may be lost, as on a real disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use mbank_core::VersionId;
use serde::{Deserialize, Serialize};

use crate::StationError;

pub const DIRTY_MAGIC: [u8; 4] = *b"MBDM";
/// The dirty map format this build writes: 2 (per-block masks of partly dirty chunks).
/// Version 1 (one bit per chunk, every dirty chunk whole in the overlay) is still read.
pub const DIRTY_VERSION: u8 = 2;
const DIRTY_HEADER_V1: usize = 16;
const DIRTY_HEADER_V2: usize = 32;
const DIRTY_ENTRY: usize = 16;
const DIRTY_TRAILER: usize = 32;
/// Format of `session.json` this build writes: 2 (the session's directory is complete,
/// with an empty durable dirty map, before it appears). Format 1 is still read.
pub const SESSION_FORMAT: u32 = 2;

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

/// A session directory being made (see [`SessionDir::begin`]).
#[derive(Debug)]
pub struct NewSession {
    tmp: SessionDir,
    dir: PathBuf,
    lock: SessionLock,
}

impl NewSession {
    /// Writes the metadata, an empty overlay of the disk's size and an empty durable
    /// dirty map, all synced, and renames the directory into place.
    pub fn finish(
        self,
        meta: &SessionMeta,
    ) -> Result<(SessionDir, File, SessionLock), StationError> {
        let tmp = &self.tmp;
        let made = (|| {
            write_atomic(
                &tmp.meta_path(),
                &serde_json::to_vec_pretty(meta).expect("serialises"),
            )?;
            let overlay = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(tmp.overlay_path())
                .map_err(io("create", &tmp.overlay_path()))?;
            overlay
                .set_len(meta.disk_size)
                .map_err(io("size", &tmp.overlay_path()))?;
            overlay
                .sync_all()
                .map_err(io("sync", &tmp.overlay_path()))?;
            tmp.write_dirty(&DirtyMap::clean(meta.disk_size, meta.chunk_size))?;
            fs::rename(&tmp.dir, &self.dir).map_err(io("rename into place", &tmp.dir))?;
            let parent = self.dir.parent().unwrap_or(Path::new("."));
            sync_dir(parent).map_err(io("sync", parent))?;
            Ok(overlay)
        })();
        match made {
            Ok(overlay) => Ok((SessionDir { dir: self.dir }, overlay, self.lock)),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp.dir);
                Err(e)
            }
        }
    }

    /// Gives up: removes the directory.
    pub fn abandon(self) {
        let _ = fs::remove_dir_all(&self.tmp.dir);
    }
}

/// An exclusive `flock` on a session's directory: whoever holds it serves or recovers
/// the session. Released when dropped, or when the holding process dies.
#[derive(Debug)]
pub struct SessionLock {
    _dir: File,
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

    /// Starts making the session `dir` (which must not exist): a locked `.new-` directory
    /// beside it, which [`NewSession::finish`] completes and renames into place. A
    /// session exists under one of the two names, locked, from before its lease is
    /// taken to its end.
    pub fn begin(dir: PathBuf) -> Result<NewSession, StationError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
        let tmp = SessionDir {
            dir: parent.join(format!(".new-{name}")),
        };
        fs::create_dir_all(&tmp.dir).map_err(io("create", &tmp.dir))?;
        match tmp.try_lock() {
            Ok(Some(lock)) => Ok(NewSession { tmp, dir, lock }),
            other => {
                let _ = fs::remove_dir_all(&tmp.dir);
                Err(other.err().unwrap_or_else(|| StationError::BadSession {
                    path: tmp.dir.clone(),
                    why: "another process holds the new session's lock".into(),
                }))
            }
        }
    }

    /// Takes the session's lock without waiting: `None` if another process (or
    /// another open of it in this one) holds it.
    pub fn try_lock(&self) -> Result<Option<SessionLock>, StationError> {
        let f = File::open(&self.dir).map_err(io("open", &self.dir))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0
        {
            return Ok(Some(SessionLock { _dir: f }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        Err(io("lock", &self.dir)(e))
    }

    /// True if the overlay file holds any data (not only holes).
    pub fn overlay_has_data(&self) -> Result<bool, StationError> {
        let p = self.overlay_path();
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io("open", &p)(e)),
        };
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&f), 0, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(false),
            _ => Err(io("look for data in", &p)(e)),
        }
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
        if m.format != 1 && m.format != SESSION_FORMAT {
            return Err(StationError::BadSession {
                path: p,
                why: format!(
                    "format {} (this mbank knows 1 to {SESSION_FORMAT})",
                    m.format
                ),
            });
        }
        Ok(m)
    }

    /// Writes the dirty map durably: temp file, fsync, rename, fsync the directory.
    pub fn write_dirty(&self, map: &DirtyMap) -> Result<(), StationError> {
        write_atomic(&self.dirty_path(), &encode_dirty(map))
    }

    /// Reads the durable dirty map (format 1 or 2) of a disk of `disk_size` bytes in
    /// chunks of `chunk_size`; a session that never flushed has none (all clean).
    pub fn read_dirty(&self, disk_size: u64, chunk_size: u32) -> Result<DirtyMap, StationError> {
        let p = self.dirty_path();
        match fs::read(&p) {
            Ok(b) => decode_dirty(&b, disk_size, chunk_size)
                .map_err(|why| StationError::BadSession { path: p, why }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(DirtyMap::clean(disk_size, chunk_size))
            }
            Err(e) => Err(io("read", &p)(e)),
        }
    }

    pub fn remove(&self) -> Result<(), StationError> {
        fs::remove_dir_all(&self.dir).map_err(io("remove", &self.dir))
    }

    /// Moves the session to `<damaged>/<name>` (another name if that exists), with a
    /// `WHY` file saying what was wrong, and returns where it went.
    pub fn set_aside(&self, damaged: &Path, why: &str) -> Result<PathBuf, StationError> {
        fs::create_dir_all(damaged).map_err(io("create", damaged))?;
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().trim_start_matches(".new-").to_string())
            .unwrap_or_else(|| "session".into());
        let mut to = damaged.join(&name);
        let mut n = 1;
        while to.exists() {
            n += 1;
            to = damaged.join(format!("{name}.{n}"));
        }
        fs::rename(&self.dir, &to).map_err(io("move aside", &self.dir))?;
        let _ = sync_dir(damaged);
        let _ = fs::write(to.join("WHY"), format!("{why}\n"));
        Ok(to)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
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

/// The size of the blocks the dirty map tracks inside a chunk of `chunk_size` bytes:
/// 4 KiB, or 1/64 of the chunk for chunks over 256 KiB, so a chunk's blocks fit a `u64`.
pub fn block_size_for(chunk_size: u32) -> u32 {
    (chunk_size / 64).clamp(4096, chunk_size.max(1))
}

/// The mask with a bit for every block of a chunk of `chunk_len` bytes.
pub fn full_mask(chunk_len: usize, block_size: u32) -> u64 {
    match chunk_len.div_ceil(block_size as usize) {
        n if n >= 64 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

/// Which blocks of each chunk the session overlay holds. A chunk is clean (mask 0),
/// whole in the overlay (every block of it set: its full mask), or partly dirty: the
/// overlay holds the set blocks, the base chunk holds the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    pub disk_size: u64,
    pub chunk_size: u32,
    pub block_size: u32,
    /// Per chunk: bit *j* set = block *j* of the chunk is in the overlay.
    pub masks: Vec<u64>,
}

impl DirtyMap {
    /// Every chunk clean.
    pub fn clean(disk_size: u64, chunk_size: u32) -> Self {
        DirtyMap {
            disk_size,
            chunk_size,
            block_size: block_size_for(chunk_size),
            masks: vec![0; disk_size.div_ceil(chunk_size as u64) as usize],
        }
    }

    /// Bytes in chunk `i` (the last chunk may be short).
    pub fn chunk_len(&self, i: usize) -> usize {
        let start = i as u64 * self.chunk_size as u64;
        (self.disk_size - start).min(self.chunk_size as u64) as usize
    }

    /// The mask of chunk `i` when it is whole in the overlay.
    pub fn full_mask(&self, i: usize) -> u64 {
        full_mask(self.chunk_len(i), self.block_size)
    }

    /// Indices of the chunks with at least one block in the overlay.
    pub fn dirty_chunks(&self) -> Vec<usize> {
        (0..self.masks.len())
            .filter(|&i| self.masks[i] != 0)
            .collect()
    }
}

/// The dirty map's bytes (format 2): header, one bit per chunk with any block in the
/// overlay, the block masks of the chunks only partly there, BLAKE3 trailer.
pub fn encode_dirty(map: &DirtyMap) -> Vec<u8> {
    let count = map.masks.len();
    let nbytes = count.div_ceil(8);
    let partial: Vec<(usize, u64)> = (0..count)
        .filter(|&i| map.masks[i] != 0 && map.masks[i] != map.full_mask(i))
        .map(|i| (i, map.masks[i]))
        .collect();
    let mut out =
        Vec::with_capacity(DIRTY_HEADER_V2 + nbytes + partial.len() * DIRTY_ENTRY + DIRTY_TRAILER);
    out.extend_from_slice(&DIRTY_MAGIC);
    out.push(DIRTY_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(count as u64).to_le_bytes());
    out.extend_from_slice(&map.block_size.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(partial.len() as u64).to_le_bytes());
    let mut bits = vec![0u8; nbytes];
    for (i, m) in map.masks.iter().enumerate() {
        if *m != 0 {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bits);
    for (i, m) in partial {
        out.extend_from_slice(&(i as u64).to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
    }
    let sum = blake3_of(&out);
    out.extend_from_slice(&sum);
    out
}

fn blake3_of(b: &[u8]) -> [u8; 32] {
    // The chunk id type is a BLAKE3 hash; reuse it rather than add a dependency.
    *mbank_core::ChunkId::of(b).as_bytes()
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Reads a dirty map of format 1 or 2 for a disk of `disk_size` bytes in chunks of
/// `chunk_size`. A format 1 map names whole chunks: each is whole in the overlay.
pub fn decode_dirty(b: &[u8], disk_size: u64, chunk_size: u32) -> Result<DirtyMap, String> {
    let mut map = DirtyMap::clean(disk_size, chunk_size);
    let count = map.masks.len();
    let nbytes = count.div_ceil(8);
    if b.len() < DIRTY_HEADER_V1 + DIRTY_TRAILER || b[..4] != DIRTY_MAGIC || b[5..8] != [0; 3] {
        return Err("dirty map has a bad magic or header".into());
    }
    let header = match b[4] {
        1 => DIRTY_HEADER_V1,
        2 => DIRTY_HEADER_V2,
        v => return Err(format!("dirty map format {v} (this mbank knows 1 and 2)")),
    };
    if b.len() < header + nbytes + DIRTY_TRAILER {
        return Err(format!("dirty map is {} bytes, too short", b.len()));
    }
    let body = b.len() - DIRTY_TRAILER;
    if blake3_of(&b[..body]) != b[body..] {
        return Err("dirty map checksum mismatch".into());
    }
    if le64(&b[8..16]) != count as u64 {
        return Err("dirty map is for a disk of another size".into());
    }
    let bits = &b[header..header + nbytes];
    let set = |i: usize| bits[i / 8] & (1 << (i % 8)) != 0;
    if !count.is_multiple_of(8) && bits[nbytes - 1] >> (count % 8) != 0 && b[4] == 2 {
        return Err("dirty map marks chunks past the end of the disk".into());
    }
    for i in 0..count {
        if set(i) {
            map.masks[i] = map.full_mask(i);
        }
    }
    let entries = &b[header + nbytes..body];
    if b[4] == 1 {
        if !entries.is_empty() {
            return Err(format!(
                "dirty map is {} bytes, expected {}",
                b.len(),
                header + nbytes + DIRTY_TRAILER
            ));
        }
        return Ok(map);
    }
    let block = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    if block != map.block_size || b[20..24] != [0; 4] {
        return Err(format!(
            "dirty map tracks {block}-byte blocks, expected {}",
            map.block_size
        ));
    }
    let partial = le64(&b[24..32]);
    if entries.len() as u64 != partial.saturating_mul(DIRTY_ENTRY as u64) {
        // A damaged count may be near u64::MAX: the size it implies may not fit.
        let expected = partial
            .checked_mul(DIRTY_ENTRY as u64)
            .and_then(|e| e.checked_add((header + nbytes + DIRTY_TRAILER) as u64))
            .map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        return Err(format!(
            "dirty map is {} bytes, expected {expected} for {partial} partly dirty chunks",
            b.len(),
        ));
    }
    let mut last = None;
    for e in entries.chunks_exact(DIRTY_ENTRY) {
        let (i, mask) = (le64(&e[..8]), le64(&e[8..]));
        if i >= count as u64 || last.is_some_and(|l| i <= l) {
            return Err(format!("dirty map entry for chunk {i} is out of order"));
        }
        last = Some(i);
        let i = i as usize;
        let full = map.full_mask(i);
        if !set(i) || mask == 0 || mask == full || mask & !full != 0 {
            return Err(format!(
                "dirty map entry for chunk {i} is not a partial mask"
            ));
        }
        map.masks[i] = mask;
    }
    Ok(map)
}

/// What an older mbank wrote: format 1, one bit per chunk (for tests).
#[cfg(test)]
pub(crate) fn encode_dirty_v1(bits: &[u64], count: u64) -> Vec<u8> {
    let nbytes = count.div_ceil(8) as usize;
    let mut out = Vec::new();
    out.extend_from_slice(&DIRTY_MAGIC);
    out.push(1);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&count.to_le_bytes());
    for i in 0..nbytes {
        out.push((bits[i / 8] >> ((i % 8) * 8)) as u8);
    }
    let sum = blake3_of(&out);
    out.extend_from_slice(&sum);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes() {
        assert_eq!(block_size_for(4096), 4096);
        assert_eq!(block_size_for(64 << 10), 4096);
        assert_eq!(block_size_for(256 << 10), 4096);
        assert_eq!(block_size_for(4 << 20), 64 << 10);
        assert_eq!(full_mask(64 << 10, 4096), 0xffff);
        assert_eq!(full_mask(4097, 4096), 0b11);
        assert_eq!(full_mask(256 << 10, 4096), u64::MAX);
    }

    #[test]
    fn dirty_map_round_trip_and_damage() {
        // 1000 chunks of 64 KiB, the last one 5000 bytes (two blocks).
        let disk = 999 * 65536 + 5000;
        let mut map = DirtyMap::clean(disk, 65536);
        assert_eq!(map.masks.len(), 1000);
        for i in [0usize, 7, 63, 64, 998] {
            map.masks[i] = map.full_mask(i);
        }
        map.masks[3] = 0b1000_0000_0000_0001;
        map.masks[500] = 0x7fff;
        map.masks[999] = 0b10;
        let b = encode_dirty(&map);
        assert_eq!(b[4], 2);
        assert_eq!(b.len(), 32 + 125 + 3 * 16 + 32);
        assert_eq!(decode_dirty(&b, disk, 65536).unwrap(), map);
        assert_eq!(map.dirty_chunks(), [0, 3, 7, 63, 64, 500, 998, 999]);
        for pos in 0..b.len() {
            let mut bad = b.clone();
            bad[pos] ^= 1;
            assert!(decode_dirty(&bad, disk, 65536).is_err(), "flip at {pos}");
        }
        assert!(decode_dirty(&b, disk - 65536, 65536).is_err());
        assert!(decode_dirty(&b[..b.len() - 1], disk, 65536).is_err());
    }

    #[test]
    fn a_map_that_lies_is_refused_even_with_a_good_checksum() {
        let disk = 16 * 65536;
        let mut map = DirtyMap::clean(disk, 65536);
        map.masks[2] = 0b11;
        let good = encode_dirty(&map);
        let reseal = |mut b: Vec<u8>| {
            let body = b.len() - 32;
            let sum = blake3_of(&b[..body]);
            b[body..].copy_from_slice(&sum);
            b
        };
        // The entry's mask is full (it should have been a plain bit), or names a block
        // past the chunk, or its chunk's bit is clear.
        let entry = good.len() - 32 - 16;
        for (at, byte) in [(entry + 8, 0xff), (entry + 10, 0x01), (32, 0)] {
            let mut b = good.clone();
            if byte == 0xff {
                b[at] = 0xff;
                b[at + 1] = 0xff;
            } else {
                b[at] = byte;
            }
            assert!(decode_dirty(&reseal(b), disk, 65536).is_err(), "at {at}");
        }
        // A block size other than the one this chunk size uses.
        let mut b = good.clone();
        b[17] = 0x20;
        assert!(decode_dirty(&reseal(b), disk, 65536).is_err());
    }

    #[test]
    fn format_1_maps_are_still_read_as_whole_chunks() {
        let count = 1000u64;
        let disk = count * 65536 - 100;
        let mut bits = vec![0u64; 16];
        for i in [0usize, 7, 63, 64, 999] {
            bits[i / 64] |= 1 << (i % 64);
        }
        let b = encode_dirty_v1(&bits, count);
        let map = decode_dirty(&b, disk, 65536).unwrap();
        assert_eq!(map.dirty_chunks(), [0, 7, 63, 64, 999]);
        assert_eq!(map.masks[0], 0xffff);
        assert_eq!(
            map.masks[999], 0xffff,
            "the short last chunk still has 16 blocks"
        );
        for pos in 0..b.len() {
            let mut bad = b.clone();
            bad[pos] ^= 1;
            assert!(decode_dirty(&bad, disk, 65536).is_err(), "flip at {pos}");
        }
        assert!(decode_dirty(&b, disk - 65536, 65536).is_err());
    }
}

#[cfg(test)]
mod fuzz_found {
    use super::*;

    /// Found by the `dirty_map` fuzz target: a partial count near `u64::MAX` overflowed
    /// the size the error message reports (a panic in builds with overflow checks).
    #[test]
    fn a_huge_partial_count_is_refused_not_overflowed() {
        let mut map = DirtyMap::clean(3 * 65536, 65536);
        map.masks[0] = 0b11;
        let mut b = encode_dirty(&map);
        let body = b.len() - DIRTY_TRAILER;
        for partial in [u64::MAX / 16 + 1, u64::MAX - 1, u64::MAX] {
            b[24..32].copy_from_slice(&partial.to_le_bytes());
            let sum = blake3_of(&b[..body]);
            b[body..].copy_from_slice(&sum);
            let why = decode_dirty(&b, 3 * 65536, 65536).unwrap_err();
            assert!(why.contains("partly dirty chunks"), "{why}");
        }
    }
}
