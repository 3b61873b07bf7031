//! Files from a version without booting it: `ls`, `cat`, `restore` and `diff`.
//!
//! A version's disk is read lazily, chunk by chunk, through the station's
//! [`CachedStore`] (the cache every session on this PC shares; a chunk not cached is
//! fetched from the bank, local or served, verified, and kept), so reading one file of a
//! 20 GiB disk fetches the few chunks its blocks and metadata are in. Zero chunks cost
//! nothing. On the disk: an MBR or GPT partition table (primary partitions; logical
//! partitions inside an extended one are not read), or a file system on the whole
//! disk. File systems: ext2/3/4, read by the `ext4-view` crate (pure Rust, read-only,
//! MIT/Apache-2.0, two small dependencies): it needs only a "read these bytes at this
//! offset" trait, which [`PartReader`] implements over the chunks, so nothing is
//! mounted or run as root, and it replays the journal in memory, so a version checked
//! in from a running guest reads as the guest would after a crash. A partition holding
//! another file system is named with what was found there.
//!
//! Paths: `user/name[@VERSION]:/path` is the path in the first partition whose file
//! system can be read; `user/name[@VERSION]:p2/path` names partition 2 (`p0` is a file
//! system on the whole disk).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType};
use mbank_bank::Bank;
use mbank_catalog::VersionInfo;
use mbank_core::{ChunkId, DiskIndex, MachineRef};
use mbank_station::Station;
use mbank_station::cached::CachedStore;
use serde::Serialize;

const SECTOR: u64 = 512;
/// Decoded chunks kept in memory per disk: a file system reads many small blocks of
/// the same chunk.
const HOT_CHUNKS: usize = 32;

/// A version's disk, read lazily through the station cache.
pub struct VersionDisk {
    pub what: String,
    pub index: DiskIndex,
    chunks: Arc<CachedStore>,
    hot: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl VersionDisk {
    /// Opens version `r` of the bank for reading through `station`'s cache.
    pub fn open(bank: &Bank, station: &Station, r: &MachineRef) -> Result<(VersionInfo, Self)> {
        let v = bank.resolve(r)?;
        let index = bank.catalog().disk_index(&v).with_context(|| {
            format!(
                "cannot read the disk index of {}@{}",
                v.machine,
                v.id.short()
            )
        })?;
        let what = format!("{}@{}", v.machine, v.id.short());
        let chunks = Arc::new(CachedStore::new(station.cache.clone(), bank.store_arc()));
        Ok((
            v,
            VersionDisk {
                what,
                index,
                chunks,
                hot: Mutex::new(VecDeque::new()),
            },
        ))
    }

    pub fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn chunk(&self, i: usize, id: &ChunkId) -> std::io::Result<Arc<Vec<u8>>> {
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = hot.iter().position(|(j, _)| *j == i) {
            let e = hot.remove(p).expect("found");
            let d = e.1.clone();
            hot.push_front(e);
            return Ok(d);
        }
        drop(hot);
        let want = self.index.chunk_len(i);
        let d = match self.chunks.cache().get(id) {
            Some(d) => Arc::new(d),
            None => {
                self.chunks
                    .fetch_missing(id, |n| n == want)
                    .map_err(|e| std::io::Error::other(format!("{}: chunk {i}: {e}", self.what)))?
                    .data
            }
        };
        if d.len() != want {
            return Err(std::io::Error::other(format!(
                "{}: chunk {i} is {} bytes, its place holds {want}",
                self.what,
                d.len()
            )));
        }
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        hot.push_front((i, d.clone()));
        hot.truncate(HOT_CHUNKS);
        Ok(d)
    }

    /// Fills `buf` from byte `off` of the disk; past the end is an error.
    pub fn read_at(&self, mut off: u64, mut buf: &mut [u8]) -> std::io::Result<()> {
        if off.saturating_add(buf.len() as u64) > self.size() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{}: read past the end of the disk", self.what),
            ));
        }
        let cs = self.index.chunk_size as u64;
        while !buf.is_empty() {
            let i = (off / cs) as usize;
            let within = (off % cs) as usize;
            let n = buf.len().min(self.index.chunk_len(i) - within);
            let (now, rest) = buf.split_at_mut(n);
            match &self.index.chunks[i] {
                None => now.fill(0),
                Some(id) => now.copy_from_slice(&self.chunk(i, id)?[within..within + n]),
            }
            buf = rest;
            off += n as u64;
        }
        Ok(())
    }
}

/// One partition (or the whole disk, `p0`).
#[derive(Clone, Debug, Serialize)]
pub struct Partition {
    pub name: String,
    pub start: u64,
    pub len: u64,
    /// The partition table's type: `0x83`, or a GPT type GUID.
    pub kind: String,
}

/// Reads bytes of one partition, for `ext4-view`.
pub struct PartReader {
    disk: Arc<VersionDisk>,
    part: Partition,
}

impl Ext4Read for PartReader {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start.saturating_add(dst.len() as u64) > self.part.len {
            return Err(format!("read past the end of partition {}", self.part.name).into());
        }
        Ok(self.disk.read_at(self.part.start + start, dst)?)
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32_at(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// The disk's partitions: from a GPT, an MBR, else the whole disk as `p0`.
pub fn partitions(disk: &VersionDisk) -> Result<Vec<Partition>> {
    let size = disk.size();
    let whole = || {
        vec![Partition {
            name: "p0".into(),
            start: 0,
            len: size,
            kind: "whole disk".into(),
        }]
    };
    if size < 2 * SECTOR {
        return Ok(whole());
    }
    let mut mbr = [0u8; 512];
    disk.read_at(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(whole());
    }
    let entries: Vec<&[u8]> = (0..4).map(|k| &mbr[446 + 16 * k..462 + 16 * k]).collect();
    if entries.iter().any(|e| e[4] == 0xee) {
        return gpt(disk);
    }
    let mut out = Vec::new();
    for (k, e) in entries.iter().enumerate() {
        let (kind, lba, n) = (e[4], u32_at(e, 8) as u64, u32_at(e, 12) as u64);
        // Empty entries, and extended partitions (their logical ones are not read).
        if kind == 0 || n == 0 || matches!(kind, 0x05 | 0x0f | 0x85) {
            continue;
        }
        let (start, len) = (lba * SECTOR, n * SECTOR);
        if start.saturating_add(len) > size {
            bail!(
                "{}: partition {} of the MBR (sectors {lba}..{}) ends past the disk's end ({} bytes): the partition table is damaged",
                disk.what,
                k + 1,
                lba + n,
                size
            );
        }
        out.push(Partition {
            name: format!("p{}", k + 1),
            start,
            len,
            kind: format!("0x{kind:02x}"),
        });
    }
    // An MBR with no partition but a boot signature may be a file system's boot sector
    // (FAT, NTFS on the whole disk).
    Ok(if out.is_empty() { whole() } else { out })
}

fn gpt(disk: &VersionDisk) -> Result<Vec<Partition>> {
    let mut h = [0u8; 512];
    disk.read_at(SECTOR, &mut h)?;
    if &h[0..8] != b"EFI PART" {
        bail!(
            "{}: the MBR announces a GPT but sector 1 holds no GPT header (the partition table is damaged)",
            disk.what
        );
    }
    let (lba, n, esize) = (u64_at(&h, 72), u32_at(&h, 80) as u64, u32_at(&h, 84) as u64);
    if !(128..=4096).contains(&esize) || n > 1024 {
        bail!(
            "{}: the GPT header gives {n} entries of {esize} bytes: the partition table is damaged",
            disk.what
        );
    }
    let mut table = vec![0u8; (n * esize) as usize];
    disk.read_at(lba * SECTOR, &mut table)
        .with_context(|| format!("{}: cannot read the GPT's entries", disk.what))?;
    let mut out = Vec::new();
    for k in 0..n as usize {
        let e = &table[k * esize as usize..(k + 1) * esize as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        let (start, len) = (first * SECTOR, (last + 1).saturating_sub(first) * SECTOR);
        if last < first || start.saturating_add(len) > disk.size() {
            bail!(
                "{}: GPT partition {} (sectors {first}..={last}) does not fit the disk: the partition table is damaged",
                disk.what,
                k + 1
            );
        }
        out.push(Partition {
            name: format!("p{}", k + 1),
            start,
            len,
            kind: guid(&e[0..16]),
        });
    }
    Ok(out)
}

/// What a partition seems to hold, by the signatures of common file systems.
fn sniff(disk: &VersionDisk, p: &Partition) -> String {
    let mut b = vec![0u8; 8192.min(p.len) as usize];
    if disk.read_at(p.start, &mut b).is_err() {
        return "nothing readable".into();
    }
    let at = |o: usize, sig: &[u8]| b.len() >= o + sig.len() && &b[o..o + sig.len()] == sig;
    if at(1080, &[0x53, 0xef]) {
        "an ext2/3/4 superblock".into()
    } else if at(0, b"XFSB") {
        "XFS".into()
    } else if at(3, b"NTFS    ") {
        "NTFS".into()
    } else if at(82, b"FAT32   ") || at(54, b"FAT") {
        "FAT".into()
    } else if at(0, b"LUKS\xba\xbe") {
        "a LUKS encrypted volume".into()
    } else if at(4086, b"SWAPSPACE2") {
        "Linux swap".into()
    } else if at(0, b"LABELONE") || at(512, b"LABELONE") {
        "an LVM physical volume".into()
    } else if b.iter().all(|&x| x == 0) {
        "only zeros (no file system)".into()
    } else {
        "no file system mbank knows".into()
    }
}

/// The ext file system of partition `p`, or why it cannot be read.
pub fn open_fs(disk: &Arc<VersionDisk>, p: &Partition) -> Result<Ext4> {
    let found = sniff(disk, p);
    if found != "an ext2/3/4 superblock" {
        bail!(
            "{}: partition {} ({}, {} bytes at offset {}) holds {found}; mbank reads ext2/3/4 file systems only",
            disk.what,
            p.name,
            p.kind,
            p.len,
            p.start
        );
    }
    Ext4::load(Box::new(PartReader {
        disk: disk.clone(),
        part: p.clone(),
    }))
    .map_err(|e| {
        anyhow::anyhow!(
            "{}: partition {} has an ext2/3/4 superblock but cannot be read: {e}",
            disk.what,
            p.name
        )
    })
}

/// A version, a partition and a path in it: `user/name[@V]:[pN]/path`.
#[derive(Clone, Debug)]
pub struct Spec {
    pub version: MachineRef,
    pub part: Option<String>,
    pub path: String,
}

impl std::str::FromStr for Spec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (m, p) = s.split_once(':').ok_or_else(|| {
            format!(
                "{s:?} names no path: write user/name[@VERSION]:/path (or :p2/path for partition 2)"
            )
        })?;
        let version = m.parse::<MachineRef>().map_err(|e| e.to_string())?;
        let (part, path) = match p.strip_prefix('p') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
                let end = rest.find('/').unwrap_or(rest.len());
                (Some(format!("p{}", &rest[..end])), rest[end..].to_string())
            }
            _ => (None, p.to_string()),
        };
        if !path.is_empty() && !path.starts_with('/') {
            return Err(format!("the path in {s:?} must start with /"));
        }
        let path = if path.is_empty() { "/".into() } else { path };
        Ok(Spec {
            version,
            part,
            path,
        })
    }
}

/// A version's disk with the file system a spec names.
pub struct Opened {
    pub disk: Arc<VersionDisk>,
    pub part: Partition,
    pub fs: Ext4,
}

impl Opened {
    /// `what:pN/path`, for messages.
    pub fn name(&self, path: &str) -> String {
        format!("{}:{}{}", self.disk.what, self.part.name, path)
    }
}

/// Opens the file system `spec` names: its partition, else the first readable one.
pub fn open_spec(bank: &Bank, station: &Station, spec: &Spec) -> Result<Opened> {
    let (_, disk) = VersionDisk::open(bank, station, &spec.version)?;
    let disk = Arc::new(disk);
    let parts = partitions(&disk)?;
    if let Some(want) = &spec.part {
        let p = parts.iter().find(|p| &p.name == want).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no partition {want}; the disk has {}",
                disk.what,
                parts
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let fs = open_fs(&disk, p)?;
        return Ok(Opened {
            part: p.clone(),
            disk,
            fs,
        });
    }
    let mut why = Vec::new();
    for p in &parts {
        match open_fs(&disk, p) {
            Ok(fs) => {
                return Ok(Opened {
                    part: p.clone(),
                    disk,
                    fs,
                });
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    bail!(
        "{}: no partition holds a file system mbank can read:\n  {}",
        disk.what,
        why.join("\n  ")
    )
}

fn fs_err(o: &Opened, path: &str, e: Ext4Error) -> anyhow::Error {
    match e {
        Ext4Error::NotFound => anyhow::anyhow!("no such file or directory: {}", o.name(path)),
        Ext4Error::NotADirectory => anyhow::anyhow!("not a directory: {}", o.name(path)),
        Ext4Error::IsADirectory => anyhow::anyhow!(
            "{} is a directory: list it with `mbank ls`, or copy it with `mbank restore`",
            o.name(path)
        ),
        e => anyhow::anyhow!("cannot read {}: {e}", o.name(path)),
    }
}

/// One entry `ls` shows.
#[derive(Serialize)]
pub struct Entry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    pub mode: u16,
    pub mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn kind(t: FileType) -> &'static str {
    match t {
        FileType::Directory => "dir",
        FileType::Regular => "file",
        FileType::Symlink => "symlink",
        FileType::BlockDevice => "block",
        FileType::CharacterDevice => "char",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn entry(o: &Opened, path: &str, name: String) -> Result<Entry> {
    let m =
        o.fs.symlink_metadata(path)
            .map_err(|e| fs_err(o, path, e))?;
    let target = if m.is_symlink() {
        o.fs.read_link(path).ok().map(|t| t.display().to_string())
    } else {
        None
    };
    Ok(Entry {
        name,
        kind: kind(m.file_type()),
        size: m.len(),
        mode: m.mode() & 0o7777,
        mtime: m.modified().seconds(),
        target,
    })
}

/// The entries of directory `path` (sorted by name), or the one entry of a file.
pub fn ls(o: &Opened, path: &str) -> Result<Vec<Entry>> {
    let m =
        o.fs.symlink_metadata(path)
            .map_err(|e| fs_err(o, path, e))?;
    if !m.is_dir() {
        return Ok(vec![entry(o, path, path.to_string())?]);
    }
    let mut out = Vec::new();
    for d in o.fs.read_dir(path).map_err(|e| fs_err(o, path, e))? {
        let d = d.map_err(|e| fs_err(o, path, e))?;
        let name = d.file_name().display().to_string();
        if name == "." || name == ".." {
            continue;
        }
        out.push(entry(o, &join(path, &name), name)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Streams file `path` into `w`.
pub fn cat(o: &Opened, path: &str, w: &mut dyn Write) -> Result<u64> {
    let mut f = o.fs.open(path).map_err(|e| fs_err(o, path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = f.read_bytes(&mut buf).map_err(|e| fs_err(o, path, e))?;
        if n == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// What `restore` wrote.
#[derive(Default, Serialize)]
pub struct Restored {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Devices, FIFOs and sockets, which are not recreated.
    pub skipped: Vec<String>,
}

/// Copies `path` (a file or a directory tree) to `dest`. An existing `dest` is
/// refused unless `force` (a directory then receives what is missing or replaced).
pub fn restore(o: &Opened, path: &str, dest: &Path, force: bool) -> Result<Restored> {
    let m =
        o.fs.symlink_metadata(path)
            .map_err(|e| fs_err(o, path, e))?;
    let dest = if !m.is_dir() && dest.is_dir() {
        let base = path.rsplit('/').next().unwrap_or(path);
        dest.join(base)
    } else {
        dest.to_path_buf()
    };
    if !force && std::fs::symlink_metadata(&dest).is_ok() && !(m.is_dir() && is_empty_dir(&dest)) {
        bail!(
            "{} exists; restore does not replace it unless you give --force",
            dest.display()
        );
    }
    let mut r = Restored::default();
    copy(o, path, &dest, &mut r)?;
    Ok(r)
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

fn copy(o: &Opened, path: &str, dest: &Path, r: &mut Restored) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m =
        o.fs.symlink_metadata(path)
            .map_err(|e| fs_err(o, path, e))?;
    let perm = std::fs::Permissions::from_mode((m.mode() & 0o7777) as u32);
    match m.file_type() {
        FileType::Directory => {
            if !dest.is_dir() {
                std::fs::create_dir(dest)
                    .with_context(|| format!("cannot create directory {}", dest.display()))?;
            }
            r.dirs += 1;
            for e in ls(o, path)? {
                copy(o, &join(path, &e.name), &dest.join(&e.name), r)?;
            }
            std::fs::set_permissions(dest, perm)
                .with_context(|| format!("cannot set the mode of {}", dest.display()))?;
        }
        FileType::Regular => {
            // A temp file beside the destination, renamed over it once complete.
            let tmp = dest.with_file_name(format!(
                ".{}.mbank-restore",
                dest.file_name().unwrap_or_default().to_string_lossy()
            ));
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let n = cat(o, path, &mut f).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            f.set_permissions(perm)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dest)
                .with_context(|| format!("cannot write {}", dest.display()))?;
            r.files += 1;
            r.bytes += n;
        }
        FileType::Symlink => {
            let t = o.fs.read_link(path).map_err(|e| fs_err(o, path, e))?;
            let t = PathBuf::from(std::ffi::OsStr::new(&t.display().to_string()));
            if std::fs::symlink_metadata(dest).is_ok() {
                std::fs::remove_file(dest)
                    .with_context(|| format!("cannot replace {}", dest.display()))?;
            }
            std::os::unix::fs::symlink(&t, dest)
                .with_context(|| format!("cannot create symlink {}", dest.display()))?;
            r.symlinks += 1;
        }
        _ => r.skipped.push(path.to_string()),
    }
    Ok(())
}

/// Every path of the file system under `/` with its type and, for files, size and
/// BLAKE3 of the content (for `diff`).
/// A path's type (with a symlink's target), size and content hash, for `diff`.
type Seen = (String, u64, Option<[u8; 32]>);

fn tree(o: &Opened) -> Result<BTreeMap<String, Seen>> {
    let mut out = BTreeMap::new();
    let mut todo = vec!["/".to_string()];
    while let Some(dir) = todo.pop() {
        for e in ls(o, &dir)? {
            let p = join(&dir, &e.name);
            let sum = match e.kind {
                "file" => {
                    let mut h = HashWriter(blake3::Hasher::new());
                    cat(o, &p, &mut h)?;
                    Some(*h.0.finalize().as_bytes())
                }
                "dir" => {
                    todo.push(p.clone());
                    // A directory changes with what it holds, which is listed.
                    out.insert(p, ("dir".into(), 0, None));
                    continue;
                }
                _ => None,
            };
            let kind = match e.target {
                Some(t) => format!("symlink {t}"),
                None => e.kind.to_string(),
            };
            out.insert(p, (kind, e.size, sum));
        }
    }
    Ok(out)
}

struct HashWriter(blake3::Hasher);
impl Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `diff` found between two versions.
#[derive(Default, Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    pub disk_size_a: u64,
    pub disk_size_b: u64,
    /// Chunks whose content differs (compared by chunk id when both versions use the
    /// same chunk size, else byte by byte per chunk of A).
    pub chunks_differ: u64,
    pub bytes_differ: u64,
    /// Per partition both disks have with a readable file system.
    pub partitions: Vec<PartDiff>,
    /// Partitions whose files were not compared, and why.
    pub not_compared: Vec<String>,
}

#[derive(Default, Serialize)]
pub struct PartDiff {
    pub partition: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// Compares versions `a` and `b`: their chunks, then the files of each partition
/// whose byte range holds a differing chunk.
pub fn diff(bank: &Bank, station: &Station, a: &MachineRef, b: &MachineRef) -> Result<Diff> {
    let (_, da) = VersionDisk::open(bank, station, a)?;
    let (_, db) = VersionDisk::open(bank, station, b)?;
    let (da, db) = (Arc::new(da), Arc::new(db));
    let mut d = Diff {
        a: da.what.clone(),
        b: db.what.clone(),
        disk_size_a: da.size(),
        disk_size_b: db.size(),
        ..Default::default()
    };
    // Byte ranges that differ, chunk by chunk of A (the tail of the longer disk too).
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let cs = da.index.chunk_size as u64;
    let same_cs = da.index.chunk_size == db.index.chunk_size;
    let common = da.size().min(db.size());
    for i in 0..da.index.chunks.len() {
        let off = i as u64 * cs;
        if off >= common {
            break;
        }
        let len = (da.index.chunk_len(i) as u64).min(common - off);
        let differs = if same_cs && len == da.index.chunk_len(i) as u64 {
            da.index.chunks[i] != db.index.chunks[i]
        } else {
            let mut x = vec![0u8; len as usize];
            let mut y = vec![0u8; len as usize];
            da.read_at(off, &mut x)?;
            db.read_at(off, &mut y)?;
            x != y
        };
        if differs {
            d.chunks_differ += 1;
            d.bytes_differ += len;
            ranges.push((off, len));
        }
    }
    if da.size() != db.size() {
        let (lo, hi) = (common, da.size().max(db.size()));
        d.bytes_differ += hi - lo;
        d.chunks_differ += (hi - lo).div_ceil(cs);
        ranges.push((lo, hi - lo));
    }
    let pa = partitions(&da)?;
    let pb = partitions(&db)?;
    for p in &pa {
        let Some(q) = pb.iter().find(|q| q.name == p.name) else {
            d.not_compared.push(format!("{}: only in {}", p.name, d.a));
            continue;
        };
        let touched = |p: &Partition| {
            ranges
                .iter()
                .any(|&(o, l)| o < p.start + p.len && p.start < o + l)
        };
        if !touched(p) && !touched(q) && p.start == q.start && p.len == q.len {
            continue; // not one byte of it differs
        }
        let (fa, fb) = match (open_fs(&da, p), open_fs(&db, q)) {
            (Ok(fa), Ok(fb)) => (fa, fb),
            (Err(e), _) | (_, Err(e)) => {
                d.not_compared.push(e.to_string());
                continue;
            }
        };
        let oa = Opened {
            disk: da.clone(),
            part: p.clone(),
            fs: fa,
        };
        let ob = Opened {
            disk: db.clone(),
            part: q.clone(),
            fs: fb,
        };
        let (ta, tb) = (tree(&oa)?, tree(&ob)?);
        let mut pd = PartDiff {
            partition: p.name.clone(),
            ..Default::default()
        };
        for (k, v) in &ta {
            match tb.get(k) {
                None => pd.removed.push(k.clone()),
                Some(w) if w != v => pd.changed.push(k.clone()),
                Some(_) => {}
            }
        }
        pd.added = tb
            .keys()
            .filter(|k| !ta.contains_key(*k))
            .cloned()
            .collect();
        d.partitions.push(pd);
    }
    for q in &pb {
        if !pa.iter().any(|p| p.name == q.name) {
            d.not_compared.push(format!("{}: only in {}", q.name, d.b));
        }
    }
    Ok(d)
}
