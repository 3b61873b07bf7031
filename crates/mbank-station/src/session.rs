//! A session's state on the station's disk, enough to check it in after a crash.
//!
//! ```text
//! <cache>/sessions/<session id>/session.json   what was checked out (below)
//! <cache>/sessions/<session id>/overlay        sparse file, the disk's size: written blocks
//! <cache>/sessions/<session id>/dirty          the durable dirty map (docs/formats.md)
//! <cache>/sessions/<session id>/journal        flushes since the map was written
//! <cache>/sessions/.new-<session id>/          a session being created (renamed when ready)
//! <cache>/damaged/<session id>/                a session recovery could not account for, kept
//! ```
//!
//! A session directory appears under its own name only once it is complete: it is
//! made as `.new-<id>` (metadata, an empty overlay, an empty durable dirty map and an
//! empty journal, all synced) and renamed. So a missing `session.json`, `dirty` or
//! (format 3) `journal` in a session directory
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
//! block reaches the durable state only after its overlay data was fsynced, so after a
//! crash every block it names holds what the guest last flushed (or newer), and the
//! rest of a partly written chunk comes from its base chunk. Blocks written but never
//! flushed may be lost, as on a real disk.
//!
//! ## The journal, and checksums of flushed blocks
//!
//! The durable state is the `dirty` map file plus the `journal` that extends it (both
//! in docs/formats.md). A FLUSH does not rewrite the map: it takes the checksum of each
//! block written since the last flush (reading it back from the overlay), syncs the
//! overlay, then appends one `Sum` record per block and a `Flush` record to the
//! journal and syncs that: two syncs whatever the map's size. Now and then the journal
//! is folded into a map of the next generation ([`DIRTY_VERSION`] 3 carries the
//! checksums) and a new, empty journal; cut between the two, the journal is older than
//! the map and is skipped, the map holding all it said.
//!
//! Recovery and check-in re-hash every flushed block and store nothing if one
//! differs: a flipped bit in the overlay is reported, naming the blocks, never stored
//! as valid data. The pitfall is that the overlay is updated in place: after a crash,
//! a block the guest rewrote after its last flush legitimately holds old, new or torn
//! data, and after a power loss the journal's unsynced tail and the overlay's unsynced
//! pages survive independently, so a record of the rewrite cannot be relied on to
//! have survived with the data. Hence the rule: a block whose checksum is durable
//! (*sealed*) is rewritten only after an `Intent` record naming it is appended and
//! synced; a block with a durable intent after its last checksum is not checked. So
//! a block whose data differs from its checksum had no write issued since the flush
//! that recorded it: it is damage. The cost is one journal sync on the first rewrite
//! of a flushed block after each flush (the next flush seals it again); writes to
//! blocks never flushed, and rewrites between two flushes, cost nothing more.
//!
//! A copy-on-write overlay (flushed data never overwritten) would avoid that sync
//! but needs a block table and moves blocks away from their place in the raw
//! `overlay`, which a user reads when a session is set aside; appending checksums
//! without syncing them before the overlay write cannot tell a rewrite whose record
//! was lost from a flipped bit.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use mbank_core::VersionId;
use serde::{Deserialize, Serialize};

use crate::StationError;

pub const DIRTY_MAGIC: [u8; 4] = *b"MBDM";
/// The dirty map format this build writes: 3 (a generation, and a checksum of every
/// block flushed, beside format 2's per-block masks). Versions 1 (one bit per chunk,
/// every dirty chunk whole in the overlay) and 2 (no checksums, no journal) are still read.
pub const DIRTY_VERSION: u8 = 3;
const DIRTY_HEADER_V1: usize = 16;
const DIRTY_HEADER_V2: usize = 32;
const DIRTY_HEADER_V3: usize = 48;
const DIRTY_ENTRY: usize = 16;
const DIRTY_SUM_ENTRY: usize = 8 + BLOCK_SUM;
const DIRTY_TRAILER: usize = 32;
/// Format of `session.json` this build writes: 3 (the session keeps a journal beside
/// its dirty map). Formats 1 and 2 are still read; an older mbank refuses format 3
/// (and sets the session aside) rather than miss the writes only the journal names.
pub const SESSION_FORMAT: u32 = 3;

pub const JOURNAL_MAGIC: [u8; 4] = *b"MBJL";
pub const JOURNAL_VERSION: u8 = 1;
pub const JOURNAL_HEADER: usize = 32;
pub const JOURNAL_RECORD: usize = 48;
/// Bytes of a block's checksum: the first 16 bytes of its BLAKE3 hash.
pub const BLOCK_SUM: usize = 16;
/// A block's checksum ([`block_sum`]).
pub type BlockSum = [u8; BLOCK_SUM];
/// Zeros a journal is extended by ahead of its records, so an append overwrites bytes
/// the file already has and its `fdatasync` changes no file metadata.
pub const JOURNAL_PREALLOC: u64 = 256 << 10;

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
    /// The machine's head when the session began (a version id in hex, or `none`):
    /// check-in moves the head only if it is still that, so a session started from an
    /// older version moves the head when nobody else did. Absent in sessions of an
    /// older mbank; their check-in expects the base, which at worst keeps the version
    /// beside the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_at_start: Option<String>,
    /// The session's last checkpoint, if it committed one ([`crate::checkpoint`]):
    /// the parent of its next checkpoint or check-in. Absent until the first one (an
    /// older mbank ignores it, and at worst keeps its check-in beside the head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// A checkpoint a session committed, as its `session.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// The checkpoint's version id (hex).
    pub version: String,
    /// How many checkpoints the session committed, this one included.
    pub count: u64,
    /// The head the session's next commit expects (hex, or `none`): this checkpoint
    /// if it moved the head, else what the session expected before (someone else
    /// moved the head first, and the checkpoint was kept beside it).
    pub expect: String,
}

impl SessionMeta {
    /// The version the session's next commit derives from: its last checkpoint, else
    /// the version it checked out.
    pub fn parent_version(&self) -> Result<Option<VersionId>, StationError> {
        match &self.checkpoint {
            Some(c) => c
                .version
                .parse()
                .map(Some)
                .map_err(|_| StationError::BadSession {
                    path: PathBuf::from(&self.session),
                    why: format!("checkpoint version {:?} is not a version id", c.version),
                }),
            None => self.base_version(),
        }
    }

    /// The head check-in expects to find: the one its last checkpoint expects next
    /// ([`Checkpoint::expect`]), else the one seen when the session began, or
    /// `fallback` (its base) when that was not recorded.
    pub fn expected_head(&self, fallback: Option<VersionId>) -> Option<VersionId> {
        let expect = match &self.checkpoint {
            Some(c) => Some(c.expect.as_str()),
            None => self.head_at_start.as_deref(),
        };
        match expect {
            Some("none") => None,
            Some(h) => h.parse().ok().or(fallback),
            None => fallback,
        }
    }

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
    /// Writes the metadata, an empty overlay of the disk's size, an empty durable
    /// dirty map (generation 1) and its empty journal, all synced, and renames the
    /// directory into place.
    pub fn finish(self, meta: &SessionMeta) -> Result<NewFiles, StationError> {
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
            let mut map = DirtyMap::clean(meta.disk_size, meta.chunk_size);
            map.generation = 1;
            tmp.write_dirty(&map)?;
            let journal = tmp.create_journal(map.generation, map.block_size)?;
            fs::rename(&tmp.dir, &self.dir).map_err(io("rename into place", &tmp.dir))?;
            let parent = self.dir.parent().unwrap_or(Path::new("."));
            sync_dir(parent).map_err(io("sync", parent))?;
            Ok((overlay, journal))
        })();
        match made {
            Ok((overlay, journal)) => Ok(NewFiles {
                dir: SessionDir { dir: self.dir },
                overlay,
                journal,
                lock: self.lock,
            }),
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

/// A session made by [`NewSession::finish`]: its directory, its open overlay and
/// journal, and its lock.
#[derive(Debug)]
pub struct NewFiles {
    pub dir: SessionDir,
    pub overlay: File,
    pub journal: File,
    pub lock: SessionLock,
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
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Makes a new, empty journal of `generation` durably (header and
    /// [`JOURNAL_PREALLOC`] zeros; temp file, fsync, rename, fsync the directory) and
    /// opens it for appending.
    pub fn create_journal(&self, generation: u64, block_size: u32) -> Result<File, StationError> {
        let mut bytes = journal_header(generation, block_size).to_vec();
        bytes.resize(JOURNAL_HEADER + JOURNAL_PREALLOC as usize, 0);
        let p = self.journal_path();
        write_atomic(&p, &bytes)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .map_err(io("open", &p))
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
        if !(1..=SESSION_FORMAT).contains(&m.format) {
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

    /// Rewrites `session.json` durably (temp file, fsync, rename, fsync the directory).
    pub fn write_meta(&self, meta: &SessionMeta) -> Result<(), StationError> {
        write_atomic(
            &self.meta_path(),
            &serde_json::to_vec_pretty(meta).expect("serialises"),
        )
    }

    /// Writes the dirty map durably: temp file, fsync, rename, fsync the directory.
    pub fn write_dirty(&self, map: &DirtyMap) -> Result<(), StationError> {
        write_atomic(&self.dirty_path(), &encode_dirty(map))
    }

    /// Reads the durable dirty map (format 1 or 2) of a disk of `disk_size` bytes in
    /// chunks of `chunk_size`; a session that never flushed has none (all clean).
    ///
    /// A map of format 3 is extended by the session's journal, which must be there: the
    /// result is the map with the journal replayed ([`replay_journal`]).
    pub fn read_dirty(&self, disk_size: u64, chunk_size: u32) -> Result<DirtyMap, StationError> {
        let p = self.dirty_path();
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DirtyMap::clean(disk_size, chunk_size));
            }
            Err(e) => return Err(io("read", &p)(e)),
        };
        let mut map = decode_dirty(&bytes, disk_size, chunk_size)
            .map_err(|why| StationError::BadSession { path: p, why })?;
        if bytes[4] < 3 {
            return Ok(map);
        }
        let j = self.journal_path();
        let journal = match fs::read(&j) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StationError::BadSession {
                    path: j,
                    why: "it is missing (the dirty map needs it)".into(),
                });
            }
            Err(e) => return Err(io("read", &j)(e)),
        };
        replay_journal(&mut map, &journal)
            .map_err(|why| StationError::BadSession { path: j, why })?;
        Ok(map)
    }

    pub fn remove(&self) -> Result<(), StationError> {
        // A session killed with lazy memory may have left its RAM mounted here.
        crate::memory::unmount_stale(&self.dir);
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

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StationError> {
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
///
/// A durable map also carries the checksum of each block as it was flushed
/// ([`DirtyMap::sums`]); a block in the overlay without one is not checked (a session
/// of an older mbank, or a block the guest began to rewrite after its last flush).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    pub disk_size: u64,
    pub chunk_size: u32,
    pub block_size: u32,
    /// Per chunk: bit *j* set = block *j* of the chunk is in the overlay.
    pub masks: Vec<u64>,
    /// The map file's generation: the journal that extends it has the same one.
    pub generation: u64,
    /// By block number (chunk × 64 + block in the chunk): the checksum the block's
    /// overlay data had when it was flushed.
    pub sums: BTreeMap<u64, BlockSum>,
}

impl DirtyMap {
    /// Every chunk clean.
    pub fn clean(disk_size: u64, chunk_size: u32) -> Self {
        DirtyMap {
            disk_size,
            chunk_size,
            block_size: block_size_for(chunk_size),
            masks: vec![0; disk_size.div_ceil(chunk_size as u64) as usize],
            generation: 0,
            sums: BTreeMap::new(),
        }
    }

    /// The bytes of block `j` of chunk `i` within the chunk (the last may be short).
    pub fn block_range(&self, i: usize, j: usize) -> std::ops::Range<usize> {
        let bs = self.block_size as usize;
        let len = self.chunk_len(i);
        (j * bs).min(len)..((j + 1) * bs).min(len)
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

/// The dirty map's bytes (format 3): header, one bit per chunk with any block in the
/// overlay, the block masks of the chunks only partly there, the checksums of the
/// blocks flushed, BLAKE3 trailer.
pub fn encode_dirty(map: &DirtyMap) -> Vec<u8> {
    let count = map.masks.len();
    let nbytes = count.div_ceil(8);
    let partial: Vec<(usize, u64)> = (0..count)
        .filter(|&i| map.masks[i] != 0 && map.masks[i] != map.full_mask(i))
        .map(|i| (i, map.masks[i]))
        .collect();
    let mut out = Vec::with_capacity(
        DIRTY_HEADER_V3
            + nbytes
            + partial.len() * DIRTY_ENTRY
            + map.sums.len() * DIRTY_SUM_ENTRY
            + DIRTY_TRAILER,
    );
    out.extend_from_slice(&DIRTY_MAGIC);
    out.push(DIRTY_VERSION);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(count as u64).to_le_bytes());
    out.extend_from_slice(&map.block_size.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(partial.len() as u64).to_le_bytes());
    out.extend_from_slice(&map.generation.to_le_bytes());
    out.extend_from_slice(&(map.sums.len() as u64).to_le_bytes());
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
    for (b, sum) in &map.sums {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(sum);
    }
    let sum = blake3_of(&out);
    out.extend_from_slice(&sum);
    out
}

/// The checksum of a block's bytes: the first [`BLOCK_SUM`] bytes of their BLAKE3 hash.
pub fn block_sum(data: &[u8]) -> BlockSum {
    let mut s = [0u8; BLOCK_SUM];
    s.copy_from_slice(&blake3_of(data)[..BLOCK_SUM]);
    s
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
        3 => DIRTY_HEADER_V3,
        v => return Err(format!("dirty map format {v} (this mbank knows 1 to 3)")),
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
    if !count.is_multiple_of(8) && bits[nbytes - 1] >> (count % 8) != 0 && b[4] >= 2 {
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
    let (generation, sums) = match b[4] {
        2 => (0, 0),
        _ => (le64(&b[32..40]), le64(&b[40..48])),
    };
    // A damaged count may be near u64::MAX: the size it implies may not fit.
    let expected = partial
        .checked_mul(DIRTY_ENTRY as u64)
        .and_then(|p| p.checked_add(sums.checked_mul(DIRTY_SUM_ENTRY as u64)?))
        .and_then(|e| e.checked_add((header + nbytes + DIRTY_TRAILER) as u64));
    if expected != Some(b.len() as u64) {
        let expected = expected.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        return Err(format!(
            "dirty map is {} bytes, expected {expected} for {partial} partly dirty chunks \
             and {sums} block checksums",
            b.len(),
        ));
    }
    map.generation = generation;
    let (entries, sum_entries) = entries.split_at(partial as usize * DIRTY_ENTRY);
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
    let mut last = None;
    for e in sum_entries.chunks_exact(DIRTY_SUM_ENTRY) {
        let block = le64(&e[..8]);
        let (i, j) = ((block / 64) as usize, block % 64);
        if last.is_some_and(|l| block <= l) || i >= count || map.masks[i] & (1 << j) == 0 {
            return Err(format!(
                "dirty map has a checksum of block {block}, which is out of order or not dirty"
            ));
        }
        last = Some(block);
        map.sums
            .insert(block, e[8..].try_into().expect("BLOCK_SUM bytes"));
    }
    Ok(map)
}

/// One record of the journal (docs/formats.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Block `block` (chunk × 64 + block in the chunk) of the overlay held data with
    /// checksum `sum` before the overlay was synced for the flush that follows.
    Sum { block: u64, sum: BlockSum },
    /// The blocks `mask` of chunk `chunk` may be rewritten from here on: synced before
    /// the overlay write that rewrites them is issued.
    Intent { chunk: u64, mask: u64 },
    /// A flush: the overlay was synced after the records before this one.
    Flush { seq: u64 },
}

/// A journal's header for a map of generation `generation` with blocks of `block_size`.
pub fn journal_header(generation: u64, block_size: u32) -> [u8; JOURNAL_HEADER] {
    let mut h = [0u8; JOURNAL_HEADER];
    h[..4].copy_from_slice(&JOURNAL_MAGIC);
    h[4] = JOURNAL_VERSION;
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..20].copy_from_slice(&block_size.to_le_bytes());
    let sum = blake3_of(&h[..24]);
    h[24..32].copy_from_slice(&sum[..8]);
    h
}

/// The bytes of `r` in a journal of generation `generation`.
pub fn encode_record(generation: u64, r: &Record) -> [u8; JOURNAL_RECORD] {
    let mut b = [0u8; JOURNAL_RECORD];
    match *r {
        Record::Sum { block, sum } => {
            b[0] = 1;
            b[8..16].copy_from_slice(&block.to_le_bytes());
            b[16..32].copy_from_slice(&sum);
        }
        Record::Intent { chunk, mask } => {
            b[0] = 2;
            b[8..16].copy_from_slice(&chunk.to_le_bytes());
            b[16..24].copy_from_slice(&mask.to_le_bytes());
        }
        Record::Flush { seq } => {
            b[0] = 3;
            b[8..16].copy_from_slice(&seq.to_le_bytes());
        }
    }
    let check = record_check(generation, &b[..32]);
    b[32..].copy_from_slice(&check);
    b
}

fn record_check(generation: u64, body: &[u8]) -> [u8; 16] {
    let mut h = [0u8; 40];
    h[..8].copy_from_slice(&generation.to_le_bytes());
    h[8..].copy_from_slice(body);
    let mut c = [0u8; 16];
    c.copy_from_slice(&blake3_of(&h)[..16]);
    c
}

/// The record in `b` (48 bytes), or `None` if it is not a whole, valid record of a
/// journal of generation `generation` (the zeros past the end, a torn append).
pub fn decode_record(generation: u64, b: &[u8]) -> Option<Record> {
    if b.len() != JOURNAL_RECORD
        || b[1..8] != [0; 7]
        || record_check(generation, &b[..32]) != b[32..]
    {
        return None;
    }
    match b[0] {
        1 => Some(Record::Sum {
            block: le64(&b[8..16]),
            sum: b[16..32].try_into().expect("16 bytes"),
        }),
        2 if b[24..32] == [0; 8] => Some(Record::Intent {
            chunk: le64(&b[8..16]),
            mask: le64(&b[16..24]),
        }),
        3 if b[16..32] == [0; 16] => Some(Record::Flush {
            seq: le64(&b[8..16]),
        }),
        _ => None,
    }
}

/// What [`replay_journal`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Whole valid records read, up to the first that is not.
    pub records: usize,
    /// Flush records among them.
    pub flushes: usize,
    /// The journal is of an older generation than the map (a compaction was cut after
    /// writing the map): everything it names is in the map already, and it was not read.
    pub superseded: bool,
}

/// Applies a journal's bytes to `map`, the dirty map file it extends, giving the
/// session's durable state. The records are read up to the first that is not whole
/// and valid (what lies past it was never synced). A `Sum` counts only before the last
/// `Flush` read: the block joins the map with that checksum. An `Intent` counts
/// wherever it is (each was synced on its own): its blocks keep their place in the
/// map but lose their checksum, since the guest may have rewritten them after their
/// last flush (old, new or torn data are all what a disk may hold after a crash).
pub fn replay_journal(map: &mut DirtyMap, b: &[u8]) -> Result<Replay, String> {
    if b.len() < JOURNAL_HEADER
        || b[..4] != JOURNAL_MAGIC
        || b[4] != JOURNAL_VERSION
        || b[5..8] != [0; 3]
        || b[20..24] != [0; 4]
        || blake3_of(&b[..24])[..8] != b[24..32]
    {
        return Err("journal has a bad magic or header".into());
    }
    let generation = le64(&b[8..16]);
    let block = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    if block != map.block_size {
        return Err(format!(
            "journal tracks {block}-byte blocks, expected {}",
            map.block_size
        ));
    }
    if generation < map.generation {
        return Ok(Replay {
            superseded: true,
            ..Default::default()
        });
    }
    if generation > map.generation {
        return Err(format!(
            "journal is of generation {generation}, newer than its dirty map's {}",
            map.generation
        ));
    }
    let records: Vec<Record> = b[JOURNAL_HEADER..]
        .chunks_exact(JOURNAL_RECORD)
        .map_while(|r| decode_record(generation, r))
        .collect();
    let last_flush = records
        .iter()
        .rposition(|r| matches!(r, Record::Flush { .. }));
    let count = map.masks.len() as u64;
    for (k, r) in records.iter().enumerate() {
        match *r {
            Record::Sum { block, sum } if last_flush.is_some_and(|f| k < f) => {
                let (i, j) = (block / 64, block % 64);
                if i >= count || map.full_mask(i as usize) & (1 << j) == 0 {
                    return Err(format!(
                        "journal record {k} names block {block}, past the disk"
                    ));
                }
                map.masks[i as usize] |= 1 << j;
                map.sums.insert(block, sum);
            }
            Record::Sum { .. } => {}
            Record::Intent { chunk, mask } => {
                if chunk >= count || mask & !map.full_mask(chunk as usize) != 0 {
                    return Err(format!(
                        "journal record {k} names chunk {chunk}, past the disk"
                    ));
                }
                for j in (0..64).filter(|j| mask & (1 << j) != 0) {
                    map.sums.remove(&(chunk * 64 + j));
                }
            }
            Record::Flush { .. } => {}
        }
    }
    Ok(Replay {
        records: records.len(),
        flushes: records
            .iter()
            .filter(|r| matches!(r, Record::Flush { .. }))
            .count(),
        superseded: false,
    })
}

/// The blocks of `map` whose overlay data no longer has the checksum they were
/// flushed with, as block numbers (chunk × 64 + block in the chunk).
pub fn damaged_blocks(
    overlay: &File,
    overlay_path: &Path,
    map: &DirtyMap,
) -> Result<Vec<u64>, StationError> {
    use std::os::unix::fs::FileExt;
    let mut bad = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = None;
    for (&block, sum) in &map.sums {
        let (i, j) = ((block / 64) as usize, (block % 64) as usize);
        if chunk != Some(i) {
            let off = i as u64 * map.chunk_size as u64;
            buf.resize(map.chunk_len(i), 0);
            overlay
                .read_exact_at(&mut buf, off)
                .map_err(|e| StationError::Io {
                    what: format!(
                        "read chunk {i} (bytes {off}..{}) from the session overlay {} to check it",
                        off + buf.len() as u64,
                        overlay_path.display()
                    ),
                    source: e,
                })?;
            chunk = Some(i);
        }
        if block_sum(&buf[map.block_range(i, j)]) != *sum {
            bad.push(block);
        }
    }
    Ok(bad)
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
        map.generation = 7;
        map.sums.insert(3 * 64 + 15, [1; BLOCK_SUM]);
        map.sums.insert(999 * 64 + 1, [2; BLOCK_SUM]);
        let b = encode_dirty(&map);
        assert_eq!(b[4], 3);
        assert_eq!(b.len(), 48 + 125 + 3 * 16 + 2 * 24 + 32);
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
        for (at, byte) in [(entry + 8, 0xff), (entry + 10, 0x01), (48, 0)] {
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
