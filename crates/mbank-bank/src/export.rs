//! `export`: a version becomes a raw disk image again, sparse where chunks are zero.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use mbank_core::{ChunkId, DiskIndex, MachineRef};
use mbank_store::ChunkStore;
use serde::Serialize;

use crate::{Bank, BankError, Progress, Unit, WrongLength};

/// What an export did.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub machine: String,
    pub version: String,
    pub path: String,
    pub disk_size: u64,
    pub chunks_read: u64,
    pub chunks_zero: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    /// What came from the version's pack, when the bank offered one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack: Option<crate::pack::PackUse>,
}

/// A version's pack as an export uses it.
struct Packed {
    src: Arc<dyn mbank_store::PackSource>,
    /// `None` when the index could not be had (`used.fell_back` says why).
    idx: Option<mbank_core::pack::PackIndex>,
    used: crate::pack::PackUse,
}

impl Packed {
    /// Hands the disk's places to `out` from the pack ([`crate::pack::walk`]), unless
    /// it failed already; the first place left for the chunks.
    fn write(
        &mut self,
        store: &dyn ChunkStore,
        v: &mbank_catalog::VersionInfo,
        index: &DiskIndex,
        jobs: usize,
        progress: &dyn Progress,
        out: &mut crate::pack::Place<'_>,
    ) -> Result<usize, BankError> {
        let Some(idx) = &self.idx else {
            return Ok(0);
        };
        let (used, next) =
            crate::pack::walk(&*self.src, store, v, index, idx, jobs, progress, out)?;
        self.used = used;
        Ok(next)
    }
}

/// Removes a partial file (an export's, a pack's) unless disarmed (`None`) once it is
/// complete.
pub(crate) struct PartialFile(pub(crate) Option<PathBuf>);
impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes the disk of version `v` (whose index is `index`) to `w` as a raw image, in
/// order, each chunk verified before it is written; `name` names `w` in errors. What
/// the bank server streams to a browser: `w` sees the image's bytes as they come, so a
/// damaged chunk ends the stream early with the error (the reader must not take a
/// short stream for the image). The number of non-zero chunks read.
pub fn write_disk(
    store: &dyn ChunkStore,
    v: &mbank_catalog::VersionInfo,
    index: &DiskIndex,
    w: &mut (dyn Write + Send),
    name: &str,
    jobs: usize,
) -> Result<u64, BankError> {
    let damaged = |source| BankError::Damaged {
        machine: v.machine.clone(),
        version: v.id,
        source: Box::new(source),
    };
    let wrong = |wl| BankError::WrongLength {
        machine: v.machine.clone(),
        version: v.id,
        wrong: Box::new(wl),
    };
    let n = write_in_order(
        store,
        index,
        0,
        w,
        name,
        jobs,
        &crate::NoProgress,
        (damaged, wrong),
    )?;
    w.flush().map_err(|e| BankError::io("write to", name, e))?;
    Ok(n)
}

impl Bank {
    /// Writes the disk of `r` to `out` as a raw image. `out` of `-` means standard
    /// output; a device or FIFO is written in order. A regular file is written beside its final name and renamed into place
    /// only once every chunk has been read and verified, so a damaged bank never leaves
    /// a wrong image behind.
    pub fn export(
        &self,
        r: &MachineRef,
        out: &Path,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<ExportReport, BankError> {
        let started = Instant::now();
        let v = self.resolve(r)?;
        let index = self.catalog.disk_index(&v)?;
        let damaged = |source| BankError::Damaged {
            machine: v.machine.clone(),
            version: v.id,
            source: Box::new(source),
        };
        let wrong = |w| BankError::WrongLength {
            machine: v.machine.clone(),
            version: v.id,
            wrong: Box::new(w),
        };
        progress.start(
            &format!("exporting {}@{}", v.machine, v.id.short()),
            index.disk_size,
            Unit::Bytes,
        );
        let mut pack = self.pack_for(&v);
        // Standard output, a device or a FIFO (e.g. /dev/null) is written in order,
        // in place: renaming a temp file onto it would replace it.
        let special = out != Path::new("-")
            && fs::metadata(out).is_ok_and(|m| !m.file_type().is_file() && !m.is_dir());
        // Non-zero places written from the chunks (from `from` on).
        let from_chunks = if out == Path::new("-") || special {
            let (sink, name): (Box<dyn Write + Send>, String) = if special {
                let f = OpenOptions::new()
                    .write(true)
                    .open(out)
                    .map_err(|e| BankError::io("open", out, e))?;
                (Box::new(f), out.display().to_string())
            } else {
                (Box::new(std::io::stdout()), "standard output".into())
            };
            let mut w = std::io::BufWriter::with_capacity(1 << 20, sink);
            let mut from = 0;
            if let Some(packed) = &mut pack {
                // Zero places are written as runs, before the next chunk.
                let mut zeros = 0u64;
                from = packed.write(
                    &*self.store,
                    &v,
                    &index,
                    jobs,
                    progress,
                    &mut |place, plain| {
                        let Some(p) = plain else {
                            zeros += index.chunk_len(place) as u64;
                            return Ok(());
                        };
                        write_zeros(&mut w, std::mem::take(&mut zeros))
                            .and_then(|()| w.write_all(p))
                            .map_err(|e| BankError::io("write to", &name, e))
                    },
                )?;
                write_zeros(&mut w, zeros).map_err(|e| BankError::io("write to", &name, e))?;
            }
            let n = write_in_order(
                &*self.store,
                &index,
                from,
                &mut w,
                &name,
                jobs,
                progress,
                (damaged, wrong),
            )?;
            w.flush().map_err(|e| BankError::io("write to", &name, e))?;
            n
        } else {
            // A symlink is written through: the export replaces the file it points to
            // (renamed into place in that file's directory), not the link.
            let target = follow_links(out);
            let out = target.as_path();
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = out.file_name().ok_or_else(|| {
                BankError::io("write to", out, std::io::Error::other("not a file name"))
            })?;
            let tmp = dir.join(format!(
                ".{}.mbank-partial-{}",
                name.to_string_lossy(),
                std::process::id()
            ));
            let mut guard = PartialFile(Some(tmp.clone()));
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| BankError::io("create", &tmp, e))?;
            file.set_len(index.disk_size)
                .map_err(|e| BankError::io("size", &tmp, e))?;
            let mut from = 0;
            let written = AtomicU64::new(0);
            if let Some(packed) = &mut pack {
                from = packed.write(
                    &*self.store,
                    &v,
                    &index,
                    jobs,
                    progress,
                    &mut |place, plain| {
                        let Some(p) = plain else { return Ok(()) };
                        file.write_all_at(p, place as u64 * index.chunk_size as u64)
                            .map_err(|e| BankError::io("write", &tmp, e))?;
                        wrote(&file, &written, p.len());
                        Ok(())
                    },
                )?;
            }
            let n = write_chunks(
                &*self.store,
                &index,
                from,
                &file,
                &tmp,
                jobs,
                progress,
                (damaged, wrong),
            )?;
            file.sync_all()
                .map_err(|e| BankError::io("sync", &tmp, e))?;
            fs::rename(&tmp, out).map_err(|e| BankError::io("rename the export to", out, e))?;
            guard.0 = None;
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            n
        };
        progress.finish();
        Ok(ExportReport {
            machine: v.machine.to_string(),
            version: v.id.to_hex(),
            path: out.display().to_string(),
            disk_size: index.disk_size,
            chunks_read: from_chunks + pack.as_ref().map_or(0, |p| p.used.chunks),
            chunks_zero: index.chunks.iter().filter(|c| c.is_none()).count() as u64,
            bytes_written: index.disk_size,
            seconds: started.elapsed().as_secs_f64(),
            pack: pack.map(|p| p.used),
        })
    }

    /// The pack of `v` and where to read it, when this bank offers packs and `v` has
    /// one. A pack that cannot be had is no error: the export reads the chunks, and
    /// says why in its report.
    fn pack_for(&self, v: &mbank_catalog::VersionInfo) -> Option<Packed> {
        let src = self.packs.clone()?;
        let index = match src.pack_index(v.machine.as_str(), v.id) {
            Ok(None) => return None,
            Ok(Some(b)) => mbank_core::pack::PackIndex::from_bytes(&b)
                .map_err(|e| format!("the pack's index is not valid: {e}")),
            Err(e) => Err(format!("cannot read the pack's index: {e}")),
        };
        let (idx, fell_back) = match index {
            Ok(idx) => (Some(idx), None),
            Err(why) => (None, Some(why)),
        };
        Some(Packed {
            src,
            idx,
            used: crate::pack::PackUse {
                fell_back,
                ..Default::default()
            },
        })
    }
}

/// Reads, verifies and writes every non-zero chunk on `jobs` threads
/// ([`ChunkStore::read_each`]: from a bank server, each chunk is written as it arrives),
/// each only if it is as long as its place. Zero chunks are left as holes of the
/// pre-sized file.
#[allow(clippy::too_many_arguments)]
fn write_chunks(
    store: &dyn ChunkStore,
    index: &DiskIndex,
    from: usize,
    file: &File,
    path: &Path,
    jobs: usize,
    progress: &dyn Progress,
    (damaged, wrong): (
        impl Fn(mbank_store::StoreError) -> BankError + Sync,
        impl Fn(WrongLength) -> BankError + Sync,
    ),
) -> Result<u64, BankError> {
    let (at, ids) = nonzero(index, from);
    let err: Mutex<Option<BankError>> = Mutex::new(None);
    let written = AtomicU64::new(0);
    let fail = |e: BankError| {
        err.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        ControlFlow::Break(())
    };
    store
        .read_each(&ids, jobs, &|k, plain| {
            let i = at[k];
            // A chunk longer than its place would overwrite the next.
            if let Some(w) = WrongLength::disk(index, i, ids[k], plain.len()) {
                return fail(wrong(w));
            }
            if let Err(e) = file.write_all_at(&plain, i as u64 * index.chunk_size as u64) {
                return fail(BankError::io("write", path, e));
            }
            wrote(file, &written, plain.len());
            progress.advance(plain.len() as u64);
            ControlFlow::Continue(())
        })
        .map_err(damaged)?;
    if let Some(e) = err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    // The zero chunks, as holes.
    progress.advance(
        (from..index.chunks.len())
            .filter(|&i| index.chunks[i].is_none())
            .map(|i| index.chunk_len(i) as u64)
            .sum(),
    );
    Ok(ids.len() as u64)
}

/// Writes `n` zero bytes to `w`: a long run straight to the writer under it, in 1 MiB
/// writes, rather than copied through its buffer.
fn write_zeros<W: Write>(w: &mut std::io::BufWriter<W>, mut n: u64) -> std::io::Result<()> {
    const RUN: usize = 1 << 20;
    static ZEROS: [u8; RUN] = [0; RUN];
    if n >= RUN as u64 {
        w.flush()?;
        while n >= RUN as u64 {
            w.get_mut().write_all(&ZEROS)?;
            n -= RUN as u64;
        }
    }
    w.write_all(&ZEROS[..n as usize])
}

/// Bytes an export writes between asking the kernel to start writing its file back:
/// the disk works while the chunks arrive, and the final `fsync` finds little left
/// (before, an export through a server at 1 Gbit/s spent about a third of its time in
/// that `fsync`, after the last chunk came).
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Counts `n` more bytes written to `file` into `written`, and starts its writeback
/// each time the count passes a multiple of [`WRITEBACK_EVERY`].
fn wrote(file: &File, written: &AtomicU64, n: usize) {
    let before = written.fetch_add(n as u64, Ordering::Relaxed);
    if (before + n as u64) / WRITEBACK_EVERY > before / WRITEBACK_EVERY {
        start_writeback(file);
    }
}

/// Asks the kernel to start writing back `file`'s dirty pages without waiting for
/// them: a hint; durability comes from the `fsync` at the end.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open
    // for the life of `file`, which the caller borrows.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// The places and ids of an index's non-zero chunks.
fn nonzero(index: &DiskIndex, from: usize) -> (Vec<usize>, Vec<ChunkId>) {
    index
        .chunks
        .iter()
        .enumerate()
        .skip(from)
        .filter_map(|(i, c)| c.map(|id| (i, id)))
        .unzip()
}

/// Chunks [`write_in_order`] may hold that are ahead of the next one to write: bounds
/// its memory to this many chunks, and lets the reading threads run that far ahead of
/// a chunk that is slow to come. At least a run of one thread of
/// [`ChunkStore::read_each`] (its chunks arrive in order, so the thread that holds the
/// next chunk to write is never the one waiting for room).
pub const ORDER_WINDOW: usize = 256;

/// The disk written in order to `w` (a pipe, a device): the chunks are read by
/// [`ChunkStore::read_each`] on `jobs` threads, and written as soon as every chunk
/// before them is; a thread with a chunk [`ORDER_WINDOW`] or more ahead of the next
/// one to write waits. Zero chunks are written as zeros.
#[allow(clippy::too_many_arguments)]
fn write_in_order(
    store: &dyn ChunkStore,
    index: &DiskIndex,
    from: usize,
    w: &mut (dyn Write + Send),
    name: &str,
    jobs: usize,
    progress: &dyn Progress,
    (damaged, wrong): (
        impl Fn(mbank_store::StoreError) -> BankError + Sync,
        impl Fn(WrongLength) -> BankError + Sync,
    ),
) -> Result<u64, BankError> {
    struct Order<'w> {
        /// The next non-zero chunk to write (a place in `ids`).
        next: usize,
        /// The next place of the disk to write.
        place: usize,
        /// Chunks that came before their turn.
        ahead: BTreeMap<usize, Vec<u8>>,
        w: &'w mut (dyn Write + Send),
        err: Option<BankError>,
    }
    let (at, ids) = nonzero(index, from);
    let zeros = vec![0u8; index.chunk_size as usize];
    // Writes the zero chunks before place `to`.
    let zeros_to = |o: &mut Order<'_>, to: usize| -> std::io::Result<()> {
        while o.place < to {
            let len = index.chunk_len(o.place);
            o.w.write_all(&zeros[..len])?;
            progress.advance(len as u64);
            o.place += 1;
        }
        Ok(())
    };
    let order = Mutex::new(Order {
        next: 0,
        place: from,
        ahead: BTreeMap::new(),
        w,
        err: None,
    });
    let room = Condvar::new();
    let window = ORDER_WINDOW.max(1);
    store
        .read_each(&ids, jobs, &|k, plain| {
            let mut o = order.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(w) = WrongLength::disk(index, at[k], ids[k], plain.len()) {
                o.err.get_or_insert(wrong(w));
                room.notify_all();
                return ControlFlow::Break(());
            }
            while k >= o.next + window && o.err.is_none() {
                o = room.wait(o).unwrap_or_else(|p| p.into_inner());
            }
            if o.err.is_some() {
                return ControlFlow::Break(());
            }
            o.ahead.insert(k, plain);
            let mut wrote = false;
            loop {
                let next = o.next;
                let Some(plain) = o.ahead.remove(&next) else {
                    break;
                };
                let r = zeros_to(&mut o, at[next]).and_then(|()| o.w.write_all(&plain));
                if let Err(e) = r {
                    o.err.get_or_insert(BankError::io("write to", name, e));
                    room.notify_all();
                    return ControlFlow::Break(());
                }
                progress.advance(plain.len() as u64);
                o.place = at[next] + 1;
                o.next += 1;
                wrote = true;
            }
            if wrote {
                room.notify_all();
            }
            ControlFlow::Continue(())
        })
        .map_err(damaged)?;
    let mut o = order.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = o.err.take() {
        return Err(e);
    }
    zeros_to(&mut o, index.chunks.len()).map_err(|e| BankError::io("write to", name, e))?;
    Ok(ids.len() as u64)
}

/// `path` with every symlink in its last component followed (a dangling link gives the
/// path it names); `path` itself when it is no link, or after 40 links (a loop: the
/// rename then fails with the OS's message).
fn follow_links(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match fs::read_link(&p) {
            Ok(to) => {
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            Err(_) => return p,
        }
    }
    p
}
