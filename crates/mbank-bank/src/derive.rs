//! The rules of a **derived version**: a version made from another version of the same
//! machine (a station's check-in, a suspend), and what protects a session's base. The
//! bank owns them; the station calls [`Bank::derive_version`] and the bank server calls
//! [`repeated_commit`] and [`check_not_in_use`] on its catalog, so the rules live here
//! only.
//!
//! - **Parent**: the version the session checked out; the head moves by compare-and-swap
//!   from the head the session saw at its start (`VersionSource::expected_head`).
//! - **Inheritance**: the parent's configuration unless a new one is given, and its
//!   streams (kernel, initrd, working set) unless replaced, but never its `memory` nor
//!   its `ram` (a lazily saved RAM, which goes with that memory): the disk has moved on
//!   from that state.
//! - **Idempotence by version id**: a commit repeated after a crash (or after its answer
//!   was lost) names the same id, and answers the first commit's outcome instead of
//!   making a second version.
//! - **A session's base is protected**: `rm` refuses a version a session reads from
//!   (its clean chunks come from it, and GC would take them), and a whole machine while
//!   any session runs on it, displaced sessions included until they check in.

use mbank_catalog::{CatalogApi, CatalogError, CommitOutcome, NamedStream, VersionInfo};
use mbank_core::{MachineName, VersionId};

use crate::{Bank, BankError, ImportOptions, ImportReport, Progress, VersionSource, WriterGuard};

/// The stream a derived version never inherits.
pub const MEMORY_STREAM: &str = "memory";

/// The stream of a lazily saved RAM (fixed chunks; docs/formats.md), never inherited
/// either: it is half of the suspended state whose other half is [`MEMORY_STREAM`].
pub const RAM_STREAM: &str = "ram";

/// The order in which a lazy resume's guest first touched RAM chunks (docs/formats.md,
/// "RAM working set"), stored with the `ram` it applies to and never inherited either.
pub const RAM_SET_STREAM: &str = "ramset";

/// The outcome of the commit of version `id` of `m` if it exists already (the commit is
/// a repeat); `None` if it does not.
pub fn repeated_commit(
    cat: &dyn CatalogApi,
    m: &MachineName,
    id: VersionId,
) -> Result<Option<CommitOutcome>, CatalogError> {
    let Ok(done) = cat.resolve(m, Some(&id.to_hex())) else {
        return Ok(None);
    };
    if done.id != id {
        return Ok(None);
    }
    let head = cat.machine(m)?.and_then(|x| x.head);
    Ok(Some(if head == Some(id) {
        CommitOutcome::HeadMoved
    } else {
        CommitOutcome::Kept { head }
    }))
}

/// Refuses ([`BankError::InUse`], naming the station) to remove version `going` of `m`,
/// or with `None` the whole machine, while a session reads from it.
pub fn check_not_in_use(
    cat: &dyn CatalogApi,
    m: &MachineName,
    going: Option<VersionId>,
) -> Result<(), BankError> {
    let bases = cat.session_bases(m)?;
    match bases
        .into_iter()
        .find(|(b, _)| going.is_none_or(|g| g == *b))
    {
        Some((_, station)) => Err(BankError::InUse {
            machine: m.clone(),
            station,
        }),
        None => Ok(()),
    }
}

/// What a version made from `parent` holds besides its disk: `config` or else the
/// parent's, and `streams` with the parent's other streams but its memory and RAM.
pub fn inherited(
    cat: &dyn CatalogApi,
    parent: &VersionInfo,
    config: Option<String>,
    streams: &[NamedStream],
) -> Result<(Option<String>, Vec<NamedStream>), CatalogError> {
    let mut all = cat.streams(parent)?;
    all.retain(|(n, _)| {
        n != MEMORY_STREAM
            && n != RAM_STREAM
            && n != RAM_SET_STREAM
            && !streams.iter().any(|(e, _)| e == n)
    });
    all.extend(streams.iter().cloned());
    Ok((config.or_else(|| parent.config.clone()), all))
}

impl Bank {
    /// [`repeated_commit`] on this bank's catalog.
    pub fn repeated_commit(
        &self,
        m: &MachineName,
        id: VersionId,
    ) -> Result<Option<CommitOutcome>, BankError> {
        Ok(repeated_commit(&*self.catalog, m, id)?)
    }

    /// Commits version `id` of `machine`, derived from `source.parent` (see the module
    /// docs): if it exists already, answers its outcome and stores nothing; else
    /// `source.config` (or the parent's) and `source.streams` with the parent's other
    /// streams but its memory, and the chunks of `source.items` over `source.base`,
    /// through [`Bank::write_version`]. The caller fixes `id` in advance (a station
    /// derives it from the session) so that a repeat is recognised.
    pub fn derive_version(
        &mut self,
        machine: &MachineName,
        id: VersionId,
        mut source: VersionSource<'_>,
        writer: &WriterGuard,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<ImportReport, BankError> {
        source.id = Some(id);
        if let Some(outcome) = self.repeated_commit(machine, id)? {
            let (head_moved, head) = match outcome {
                CommitOutcome::HeadMoved => (true, Some(id)),
                CommitOutcome::Kept { head } => (false, head),
            };
            return Ok(ImportReport {
                machine: machine.to_string(),
                version: id.to_hex(),
                parent: source.parent.map(|p| p.to_hex()),
                head_moved,
                head: head.map(|h| h.to_hex()),
                format: "raw".into(),
                disk_size: source.base.disk_size,
                chunk_size: source.base.chunk_size,
                bytes_read: 0,
                chunks_total: source.base.chunks.len() as u64,
                chunks_zero: 0,
                chunks_new: 0,
                chunks_dedup: 0,
                bytes_stored: 0,
                seconds: 0.0,
            });
        }
        if let Some(p) = source.parent {
            let parent = self.resolve(&mbank_core::MachineRef {
                machine: machine.clone(),
                version: Some(p.to_hex()),
            })?;
            let (config, streams) = inherited(
                &*self.catalog,
                &parent,
                source.config.take(),
                &source.streams,
            )?;
            source.config = config;
            source.streams = streams;
        }
        self.write_version(machine, source, writer, opts, progress)
    }

    /// [`check_not_in_use`] on this bank's catalog.
    pub fn check_not_in_use(
        &self,
        m: &MachineName,
        going: Option<VersionId>,
    ) -> Result<(), BankError> {
        check_not_in_use(&*self.catalog, m, going)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mbank_catalog::{Catalog, VersionStats};
    use mbank_core::{DiskIndex, MemoryIndex, MemoryRun};

    #[test]
    fn a_derived_version_keeps_the_kernel_but_neither_memory_nor_ram() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&d.path().join("catalog.db"), true, false).unwrap();
        let idx = DiskIndex::zeroed(4096, 4096);
        let v = VersionInfo {
            id: VersionId::random(),
            machine: "alice/dev".parse().unwrap(),
            parent: None,
            created_ms: 1,
            disk_size: 4096,
            chunk_size: 4096,
            stats: VersionStats {
                chunks_total: 1,
                ..Default::default()
            },
            config: None,
            streams: Vec::new(),
        };
        let s = MemoryIndex {
            total_len: 4,
            runs: vec![MemoryRun { id: None, len: 4 }],
        };
        let streams: Vec<NamedStream> = [MEMORY_STREAM, RAM_STREAM, RAM_SET_STREAM, "kernel"]
            .iter()
            .map(|n| (n.to_string(), s.clone()))
            .collect();
        c.commit_version(&v, &idx, &streams, None).unwrap();
        let parent = c.resolve(&v.machine, None).unwrap();
        let (_, kept) = inherited(&c, &parent, None, &[]).unwrap();
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["kernel"]);
    }
}
