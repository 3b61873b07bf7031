//! New machines: from an image, an empty disk, or another machine's version (a fork,
//! or a published base). A new machine's first version has no parent; its statistics
//! name where it came from.

use std::path::Path;

use mbank_catalog::{NamedStream, VersionInfo};
use mbank_core::{DEFAULT_CHUNK_SIZE, DiskIndex, MachineName, VersionId};

use crate::image::open_image;
use crate::import::image_items;
use crate::{Bank, BankError, ImportOptions, ImportReport, Progress, VersionSource, WriterGuard};

/// How a fork's first version names its source in its statistics (`source`):
/// `create from <machine>@<version id>`.
const FORK_SOURCE: &str = "create from ";

/// The version a fork's first version was made from, read from its statistics'
/// `source` (as [`Bank::create`] writes it), if it is a fork's: a bank server trusts
/// the chunk lengths of that version (checked when it was committed) when the fork
/// commits, rather than reading every chunk's header again.
pub fn fork_source(source: &str) -> Option<(MachineName, VersionId)> {
    let (m, v) = source.strip_prefix(FORK_SOURCE)?.rsplit_once('@')?;
    Some((m.parse().ok()?, v.parse().ok()?))
}

/// The `source` a fork's first version records: `create from M@V` ([`fork_source`]
/// reads it back).
pub fn fork_source_text(m: &MachineName, v: VersionId) -> String {
    format!("{FORK_SOURCE}{m}@{}", v.to_hex())
}

/// Where a new machine's disk comes from.
pub enum DiskFrom<'a> {
    /// An image file (raw, qcow2, vmdk, vdi, vhdx, qed).
    Image(&'a Path),
    /// A disk of zeros of this many bytes.
    Empty(u64),
    /// The disk of an existing version, shared chunk for chunk.
    Version(&'a VersionInfo),
}

/// A new machine.
pub struct NewMachine<'a> {
    pub machine: &'a MachineName,
    pub disk: DiskFrom<'a>,
    /// Grow the disk to this size (bytes); never shrinks.
    pub grow_to: Option<u64>,
    /// The machine configuration (JSON).
    pub config: String,
    /// Streams stored with the first version; chunks already durable under `writer`.
    pub streams: Vec<NamedStream>,
    /// Chunks and bytes storing those streams added to the bank.
    pub streams_stored: (u64, u64),
}

impl Bank {
    /// Creates a machine with one version. Refuses a name that exists.
    pub fn create(
        &mut self,
        new: NewMachine<'_>,
        writer: &WriterGuard,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<ImportReport, BankError> {
        self.require_writable("create a machine")?;
        if self.catalog.machine(new.machine)?.is_some() {
            return Err(BankError::MachineExists(new.machine.clone()));
        }
        let cs = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        let image = match new.disk {
            DiskFrom::Image(path) => Some((path, open_image(path, opts.format, &opts.temp_dir)?)),
            _ => None,
        };
        let (description, base, items, total): (String, DiskIndex, Items<'_>, u64) = match new.disk
        {
            DiskFrom::Image(_) => {
                let (path, image) = image.as_ref().expect("opened above");
                let len = image.len.max(new.grow_to.unwrap_or(0));
                (
                    format!("create from image {}", path.display()),
                    DiskIndex::zeroed(len, cs),
                    Box::new(image_items(path, image, cs as u64, len)),
                    len,
                )
            }
            DiskFrom::Empty(size) => (
                "create with an empty disk".to_string(),
                DiskIndex::zeroed(size, cs),
                none(),
                0,
            ),
            DiskFrom::Version(v) => {
                // Read after `writer` registered: the chunks must outlive a removal of
                // `v` racing with this commit, and they do without being touched (a
                // copy of each object on S3: minutes for a large base), because a GC
                // defers its sweep while a writer older than the last removal of a
                // version is in flight (`mbank-store`'s crate docs, "forks").
                let idx = self.catalog.disk_index(v)?;
                (fork_source_text(&v.machine, v.id), idx, none(), 0)
            }
        };
        let (base, items, total) = match new.grow_to {
            Some(size) if size > base.disk_size => {
                let from = match new.disk {
                    DiskFrom::Version(v) => Some(v),
                    _ => None,
                };
                let (grown, last) = self.grow(base, size, from)?;
                match last {
                    Some(item) => (grown, one(item), total + size),
                    None => (grown, items, total),
                }
            }
            _ => (base, items, total),
        };
        let source = VersionSource {
            description,
            parent: None,
            expected_head: None,
            base,
            items,
            total_bytes: total,
            id: None,
            config: Some(new.config),
            streams: new.streams,
            streams_stored: new.streams_stored,
        };
        self.write_version(new.machine, source, writer, opts, progress)
    }

    /// `idx` grown to `size` bytes with zeros. A partial last chunk that holds data is
    /// padded and returned as an item to store (its id changes).
    fn grow(
        &self,
        mut idx: DiskIndex,
        size: u64,
        from: Option<&VersionInfo>,
    ) -> Result<(DiskIndex, Option<crate::ChunkItem>), BankError> {
        let cs = idx.chunk_size as u64;
        let old = idx.disk_size;
        let mut item = None;
        if !old.is_multiple_of(cs) {
            let last = idx.chunks.len() - 1;
            if let Some(id) = idx.chunks[last] {
                let mut plain = self.store.read(&id)?;
                if let (Some(w), Some(v)) =
                    (crate::WrongLength::disk(&idx, last, id, plain.len()), from)
                {
                    return Err(BankError::WrongLength {
                        machine: v.machine.clone(),
                        version: v.id,
                        wrong: Box::new(w),
                    });
                }
                plain.resize(cs.min(size - last as u64 * cs) as usize, 0);
                item = Some((last, Some(plain)));
            }
        }
        let n = DiskIndex::chunk_count(size, idx.chunk_size) as usize;
        idx.chunks.resize(n, None);
        idx.disk_size = size;
        Ok((idx, item))
    }

    /// Stores a file (a kernel, an initrd) as a stream under `writer`.
    pub fn store_file(
        &self,
        writer: &WriterGuard,
        path: &Path,
    ) -> Result<(mbank_core::MemoryIndex, crate::StreamStats), BankError> {
        let f = std::fs::File::open(path).map_err(|e| BankError::Io {
            action: "open",
            path: path.to_path_buf(),
            source: e,
        })?;
        self.store_stream(writer, std::io::BufReader::new(f))
    }
}

type Items<'a> = Box<dyn Iterator<Item = Result<crate::ChunkItem, BankError>> + Send + 'a>;

fn none<'a>() -> Items<'a> {
    Box::new(std::iter::empty())
}

fn one<'a>(item: crate::ChunkItem) -> Items<'a> {
    Box::new(std::iter::once(Ok(item)))
}
