//! **Checkpoints**: while a session runs, every few minutes ([`interval`]: the
//! `--checkpoint-minutes` option, the machine's setting in the bank,
//! `MBANK_CHECKPOINT_SECONDS`, or [`DEFAULT_MINUTES`]) a session with new
//! flushed writes commits a version of its flushed state, so a station that dies loses
//! at most that long as far as the bank is concerned, and another station can take the
//! machine over from the last checkpoint (`--force`).
//!
//! - **What**: exactly what recovery would check in after a power cut at that moment:
//!   the blocks the durable dirty map and journal name, over the version checked out,
//!   assembled as check-in does. [`Disk::snapshot_flushed`] reads those blocks under
//!   the flush lock (no flush completes meanwhile; flushed blocks cannot be rewritten
//!   and are held to their checksums), so the guest keeps running and writing; only
//!   its flushes wait for the local read. Base chunks are merged and the chunks sent
//!   after the lock is released.
//! - **Lineage**: a checkpoint's parent is the session's previous checkpoint, else its
//!   base; it moves the head by compare-and-swap like a check-in. The session goes on
//!   from it: `session.json` records it ([`crate::session::Checkpoint`]), so the next
//!   checkpoint, the check-in and a recovery after a crash derive from it and expect
//!   it as the head. The dirty state is not reset: the check-in sends every dirty
//!   chunk again, and those the checkpoint stored cost one `have` query, not an upload.
//!   A later checkpoint of the same process reads and sends only the chunks whose
//!   flushed blocks changed since the previous one (by their checksums), over the
//!   previous checkpoint's index, so its flush-lock time and memory follow what
//!   changed, not the whole session.
//! - **Marked**: the version's source reads `checkpoint from <station>`, and it gets
//!   the tag [`TAG`] (shown by `mbank log`), set just after its commit.
//! - **Retention**: the machine's policy (`forget --set-policy`) runs after a
//!   checkpoint that became the head, as after a check-in.
//! - **Ids**: the n-th checkpoint of a session has an id derived from the session and
//!   n, so a repeat is recognised as such by the bank.
//!
//! A crash between a checkpoint's commit and the rewrite of `session.json` leaves the
//! checkpoint as the head and the session expecting the one before: its recovered
//! check-in is kept beside the head, its writes all there.

use std::sync::Arc;
use std::time::Duration;

use mbank_bank::{Bank, BankError, ImportOptions, NoProgress, VersionSource};
use mbank_catalog::LabelChange;
use mbank_core::{ChunkId, MachineName, MachineRef, VersionId};
use serde::Serialize;

use crate::StationError;
use crate::device::Disk;
use crate::session::Checkpoint;

/// Minutes between checkpoints unless told otherwise.
pub const DEFAULT_MINUTES: u64 = 15;

/// The tag every checkpoint version carries.
pub const TAG: &str = "checkpoint";

/// The environment variable that sets the interval in seconds (for tests and
/// benchmarks); `0` turns checkpoints off.
pub const ENV_SECONDS: &str = "MBANK_CHECKPOINT_SECONDS";

/// The interval between checkpoints: `minutes` if given (a command-line option), else
/// `machine` (the machine's setting in the bank), else `$MBANK_CHECKPOINT_SECONDS` (the
/// station's default, in seconds), else [`DEFAULT_MINUTES`]; `None` when 0 (off).
pub fn interval(minutes: Option<u64>, machine: Option<u64>) -> Option<Duration> {
    let station = || {
        std::env::var(ENV_SECONDS)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
    };
    let d = match minutes.or(machine) {
        Some(m) => Duration::from_secs(m.saturating_mul(60)),
        None => Duration::from_secs(station().unwrap_or(DEFAULT_MINUTES * 60)),
    };
    (!d.is_zero()).then_some(d)
}

/// What one checkpoint did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckpointReport {
    pub version: String,
    pub head_moved: bool,
    /// Chunks the checkpoint read and assembled: those flushed since the session's
    /// previous checkpoint (all flushed chunks for the first).
    pub chunks: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    /// The flush count ([`Disk::flush_seq`]) the checkpoint reflects.
    pub flush_seq: u64,
    /// Versions the machine's retention policy removed after the checkpoint.
    pub forgotten: Vec<String>,
    /// What went wrong without failing the checkpoint (the tag not set, say).
    pub warnings: Vec<String>,
}

/// The id of the `n`-th checkpoint of `session`.
fn checkpoint_version_id(session: &str, n: u64) -> VersionId {
    let h = ChunkId::of(format!("mbank checkpoint {n} of session {session}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    VersionId::from_bytes(b)
}

/// Commits a checkpoint of `disk`'s flushed state to `bank` if a flush made blocks
/// durable since flush count `since` (see the module docs); `None` if none did.
/// `station` names the station in the version's source.
pub fn checkpoint(
    bank: &mut Bank,
    disk: &Disk,
    station: &str,
    since: u64,
    opts: &ImportOptions,
) -> Result<Option<CheckpointReport>, StationError> {
    if disk.flush_seq() == since {
        return Ok(None);
    }
    let meta = disk.meta_now();
    let machine: MachineName = meta.machine.parse().map_err(|e| StationError::BadSession {
        path: disk.dir.meta_path(),
        why: format!("{e}"),
    })?;
    // After a checkpoint of this process, only the chunks changed since are read and
    // sent, over the checkpoint's index; else every flushed chunk, over the base's.
    let prev = match (&meta.checkpoint, disk.checkpoint_map()) {
        (Some(c), Some(m)) => {
            let v = bank.resolve(&MachineRef {
                machine: machine.clone(),
                version: Some(c.version.clone()),
            })?;
            Some((bank.catalog().disk_index(&v)?, m))
        }
        _ => None,
    };
    let (map, seq, chunks) = disk.snapshot_flushed(prev.as_ref().map(|(_, m)| m))?;
    let count = meta.checkpoint.as_ref().map_or(0, |c| c.count) + 1;
    let id = checkpoint_version_id(&meta.session, count);
    let writer = bank.begin_write(&format!("checkpoint of {machine}"))?;
    let parent = meta.parent_version()?;
    let expected_head = meta.expected_head(meta.base_version()?);
    let total = chunks.iter().map(|(_, b)| b.len() as u64).sum();
    let n = chunks.len() as u64;
    let base = &disk.base;
    let over_index = prev.map_or_else(|| disk.base.clone(), |(idx, _)| idx);
    let new_map = map.clone();
    let fetcher = disk.chunks().clone();
    let bs = map.block_size as usize;
    let items = chunks.into_iter().map(move |(i, over)| {
        let mask = map.masks[i];
        if mask == map.full_mask(i) {
            return Ok((i, Some(over)));
        }
        // Partly written: the base chunk, verified now, under the flushed blocks.
        let mut data = match &base.chunks[i] {
            Some(id) => fetcher
                .fetch_verified(id)
                .map(Arc::unwrap_or_clone)
                .map_err(|e| BankError::Image {
                    path: disk.dir.overlay_path(),
                    why: format!(
                        "fetch base chunk {id} to merge with the writes to chunk {i}: {e}"
                    ),
                })?,
            None => vec![0u8; over.len()],
        };
        if data.len() != over.len() {
            return Err(BankError::Image {
                path: disk.dir.overlay_path(),
                why: format!(
                    "base chunk {i} is {} bytes, its place in the disk {}",
                    data.len(),
                    over.len()
                ),
            });
        }
        for b in (0..over.len().div_ceil(bs)).filter(|b| mask & (1 << b) != 0) {
            let r = map.block_range(i, b);
            data[r.clone()].copy_from_slice(&over[r]);
        }
        Ok((i, Some(data)))
    });
    let source = VersionSource {
        description: format!("checkpoint from {station}"),
        parent,
        expected_head,
        base: over_index,
        items: Box::new(items),
        total_bytes: total,
        id: Some(id),
        config: None,
        streams: Vec::new(),
        streams_stored: (0, 0),
    };
    let r = bank.derive_version(&machine, id, source, &writer, opts, &NoProgress)?;
    drop(writer);
    let mut report = CheckpointReport {
        version: r.version.clone(),
        head_moved: r.head_moved,
        chunks: n,
        chunks_uploaded: r.chunks_new,
        bytes_uploaded: r.bytes_stored,
        flush_seq: seq,
        forgotten: Vec::new(),
        warnings: Vec::new(),
    };
    // Protected like the session's base from now on: the next checkpoint and the
    // check-in derive from it, so neither `rm` nor a policy may take it.
    let protected = match bank.catalog().lease_checkpoint(&machine, &meta.session, id) {
        Ok(held) => held,
        Err(e) => {
            report.warnings.push(format!(
                "checkpoint {} of {} is not recorded with the session's lease, so it is not                  protected from `rm` until the session ends: {e}",
                id.short(),
                meta.machine
            ));
            false
        }
    };
    let expect = match (r.head_moved, expected_head) {
        (true, _) => id.to_hex(),
        (false, Some(h)) => h.to_hex(),
        (false, None) => "none".into(),
    };
    disk.set_checkpoint(
        Checkpoint {
            version: id.to_hex(),
            count,
            expect,
        },
        new_map,
    )?;
    let tag = LabelChange {
        note: None,
        add_tags: vec![TAG.to_string()],
        remove_tags: Vec::new(),
    };
    let at = MachineRef {
        machine,
        version: Some(id.to_hex()),
    };
    if let Err(e) = bank.label(&at, &tag) {
        report.warnings.push(format!(
            "checkpoint {} of {} was committed but not tagged {TAG:?}: {e}",
            id.short(),
            meta.machine
        ));
    }
    // The machine's retention policy, as after a check-in; only when the checkpoint is
    // protected (with the lease) or the head, which the policy never removes: a
    // checkpoint kept beside a head moved by someone else is what the next checkpoint
    // and the check-in derive from.
    if r.head_moved || protected {
        match bank.apply_policy(&at.machine) {
            Ok(Some(f)) => report.forgotten = f.removed.iter().map(|v| v.to_hex()).collect(),
            Ok(None) => {}
            Err(e) => report.warnings.push(format!(
                "the retention policy of {} could not be applied after checkpoint {} (more \
                 versions stay than it wants; it runs again after the next one): {e}",
                meta.machine,
                id.short()
            )),
        }
    }
    Ok(Some(report))
}
