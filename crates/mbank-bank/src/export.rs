//! `export`: a version becomes a raw disk image again, sparse where chunks are zero.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use mbank_core::{DiskIndex, MachineRef};
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
}

/// Removes the partial output unless the export completed.
struct PartialFile(Option<PathBuf>);
impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
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
        // Standard output, a device or a FIFO (e.g. /dev/null) is written in order,
        // in place: renaming a temp file onto it would replace it.
        let special = out != Path::new("-")
            && fs::metadata(out).is_ok_and(|m| !m.file_type().is_file() && !m.is_dir());
        let (chunks_read, bytes_written) = if out == Path::new("-") || special {
            let (sink, name): (Box<dyn Write>, String) = if special {
                let f = OpenOptions::new()
                    .write(true)
                    .open(out)
                    .map_err(|e| BankError::io("open", out, e))?;
                (Box::new(f), out.display().to_string())
            } else {
                (Box::new(std::io::stdout().lock()), "standard output".into())
            };
            let mut w = std::io::BufWriter::with_capacity(1 << 20, sink);
            let zeros = vec![0u8; index.chunk_size as usize];
            let mut n = 0;
            // Runs of 16 chunks, fetched with one request each from a bank server.
            for (run_no, run) in index.chunks.chunks(16).enumerate() {
                let ids: Vec<_> = run.iter().flatten().copied().collect();
                let mut plains = self.store.read_many(&ids).map_err(damaged)?.into_iter();
                n += ids.len() as u64;
                for (k, c) in run.iter().enumerate() {
                    let i = run_no * 16 + k;
                    let len = index.chunk_len(i);
                    let res = match c {
                        Some(id) => {
                            let plain = plains.next().expect("one per id");
                            if let Some(w) = WrongLength::disk(&index, i, *id, plain.len()) {
                                return Err(wrong(w));
                            }
                            w.write_all(&plain)
                        }
                        None => w.write_all(&zeros[..len]),
                    };
                    res.map_err(|e| BankError::io("write to", &name, e))?;
                    progress.advance(len as u64);
                }
            }
            w.flush().map_err(|e| BankError::io("write to", &name, e))?;
            (n, index.disk_size)
        } else {
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
            let n = write_chunks(
                &*self.store,
                &index,
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
            (n, index.disk_size)
        };
        progress.finish();
        Ok(ExportReport {
            machine: v.machine.to_string(),
            version: v.id.to_hex(),
            path: out.display().to_string(),
            disk_size: index.disk_size,
            chunks_read,
            chunks_zero: index.chunks.iter().filter(|c| c.is_none()).count() as u64,
            bytes_written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Reads, verifies and writes every non-zero chunk on `jobs` threads, each only if it
/// is as long as its place. Zero chunks are left as holes of the pre-sized file.
fn write_chunks(
    store: &dyn ChunkStore,
    index: &DiskIndex,
    file: &File,
    path: &Path,
    jobs: usize,
    progress: &dyn Progress,
    (damaged, wrong): (
        impl Fn(mbank_store::StoreError) -> BankError + Sync,
        impl Fn(WrongLength) -> BankError + Sync,
    ),
) -> Result<u64, BankError> {
    // Workers take runs of chunks, fetched with one request each from a bank server.
    const RUN: usize = 16;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let err: Mutex<Option<BankError>> = Mutex::new(None);
    let read = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let first = next.fetch_add(RUN, Ordering::Relaxed);
                    if first >= index.chunks.len() {
                        return;
                    }
                    let run = first..(first + RUN).min(index.chunks.len());
                    let (at, ids): (Vec<usize>, Vec<_>) = run
                        .clone()
                        .filter_map(|i| index.chunks[i].map(|id| (i, id)))
                        .unzip();
                    let r = store.read_many(&ids).map_err(&damaged).and_then(|plains| {
                        for ((i, id), plain) in at.iter().zip(&ids).zip(plains) {
                            // A chunk longer than its place would overwrite the next.
                            if let Some(w) = WrongLength::disk(index, *i, *id, plain.len()) {
                                return Err(wrong(w));
                            }
                            file.write_all_at(&plain, *i as u64 * index.chunk_size as u64)
                                .map_err(|e| BankError::io("write", path, e))?;
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        stop.store(true, Ordering::Relaxed);
                        err.lock().expect("error slot poisoned").get_or_insert(e);
                        return;
                    }
                    read.fetch_add(ids.len(), Ordering::Relaxed);
                    progress.advance(run.map(|i| index.chunk_len(i) as u64).sum());
                }
            });
        }
    });
    match err.into_inner().expect("error slot poisoned") {
        Some(e) => Err(e),
        None => Ok(read.into_inner() as u64),
    }
}
