//! `verify` and `gc`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use mbank_catalog::{Catalog, CatalogError, RecordProblem, WriterInfo, now_ms};
use mbank_core::{ChunkId, MachineName};
use mbank_store::{ChunkStore, StoreError};
use serde::Serialize;

use crate::{Bank, BankError, Place, Progress, Unit, WrongLength, this_host};

/// A chunk that is missing or fails verification, and who needs it.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedChunk {
    pub chunk: String,
    pub problem: String,
    /// Where the damaged file was moved, if it was.
    pub moved_to: Option<String>,
    /// Every `machine@version` whose disk contains this chunk.
    pub needed_by: Vec<String>,
}

/// A version whose index cannot be read.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedIndex {
    pub version: String,
    pub problem: String,
}

/// A database file of the bank (`catalog.db`, a served bank's `access.db`) that
/// SQLite's integrity check, or reading it, found damaged.
#[derive(Clone, Debug, Serialize)]
pub struct DamagedDatabase {
    pub file: String,
    /// What SQLite reported (at most 100 lines).
    pub problems: Vec<String>,
    /// What the user can do.
    pub advice: String,
}

/// A version of a served bank whose owner (or, for a published machine, every user)
/// has no right to read some of its chunks: the server answers those reads as absent.
#[derive(Clone, Debug, Serialize)]
pub struct MissingRights {
    /// `machine@version`.
    pub version: String,
    /// Whose right is missing: the owner's name, or "(published)" for the rights of a
    /// published machine's users.
    pub user: String,
    /// How many of the version's chunks they cannot read, and the first of them.
    pub chunks: u64,
    pub first: String,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub versions: u64,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub damaged_chunks: Vec<DamagedChunk>,
    pub damaged_indexes: Vec<DamagedIndex>,
    pub damaged_databases: Vec<DamagedDatabase>,
    /// Version and machine records that fail their checksum, or whose links are broken.
    pub damaged_records: Vec<RecordProblem>,
    /// A served bank's versions whose owner cannot read some of their chunks
    /// (`access.db` lacks the rows); `mbank admin repair-rights` grants them again.
    pub missing_rights: Vec<MissingRights>,
    /// False when the catalog predates record checksums (schema 3, opened read-only).
    pub records_checked: bool,
    /// Chunks found missing or damaged that no version needed any more when verify
    /// finished (their versions were removed, e.g. by `rm` and `gc`, while it ran), or
    /// that read well on a second look: not damage.
    pub chunks_no_longer_needed: u64,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damaged_chunks.is_empty()
            && self.damaged_indexes.is_empty()
            && self.damaged_databases.is_empty()
            && self.damaged_records.is_empty()
            && self.missing_rights.is_empty()
    }

    fn catalog_damaged(&mut self, file: &std::path::Path, problems: Vec<String>) {
        let file = file.display().to_string();
        if let Some(d) = self.damaged_databases.iter_mut().find(|d| d.file == file) {
            d.problems.extend(problems);
            return;
        }
        let advice = if file.ends_with(mbank_access::FILE_NAME) {
            format!(
                "SQLite finds {file} damaged (who may read what, users, tokens): stop the server, \
                 copy the file aside and restore it from a backup"
            )
        } else {
            format!(
                "SQLite finds {file} damaged: stop writing to the bank (and do not run gc, which \
                 could delete chunks of versions the damaged catalog no longer lists), copy \
                 catalog.db aside and restore it from a backup; the chunks are not affected. \
                 Until then, versions not listed as damaged still export (`mbank export`)"
            )
        };
        self.damaged_databases.push(DamagedDatabase {
            file,
            problems,
            advice,
        });
    }
}

/// True when a failed walk over the catalog is damage to report rather than an error:
/// SQLite found the file damaged, a row does not parse, or the catalog is already
/// known to be damaged.
fn walk_failure_is_damage(e: &CatalogError, report: &VerifyReport) -> bool {
    e.is_corrupt()
        || matches!(e, CatalogError::BadRow(_))
        || !report.damaged_databases.is_empty()
        || !report.damaged_records.is_empty()
}

/// What `gc` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub versions: u64,
    pub chunks_referenced: u64,
    pub chunks_deleted: u64,
    pub bytes_deleted: u64,
    /// Unreferenced chunks kept because a writer in flight may still use them.
    pub chunks_kept_for_writers: u64,
    pub temp_files_deleted: u64,
    pub live_writers: u64,
    pub stale_writers_removed: u64,
    /// True when nothing was swept because a version was removed while a writer in
    /// flight may have read it (or while this GC ran): such a writer may commit a
    /// version naming the removed one's chunks without having touched them (a fork).
    /// The next GC after those writers have finished collects what this one kept.
    pub sweep_deferred: bool,
    /// Packs (`<bank>/packs/`) of versions that are gone, removed.
    pub packs_removed: u64,
    pub seconds: f64,
    /// The cutoff, in ms since the epoch: what no writer in flight can rely on is older.
    #[serde(skip)]
    pub cutoff_ms: i64,
}

/// The versions of a served bank (of `machine`, or all) whose owner, if a user of the
/// server, cannot read some of their chunks, and those of published machines that not
/// every user can. Each finding is looked at twice, so that a version removed (and its
/// rights pruned by gc) while this ran is not reported.
fn missing_rights(
    catalog: &Catalog,
    root: &std::path::Path,
    machine: Option<&MachineName>,
) -> Result<Vec<MissingRights>, BankError> {
    let access = mbank_access::Access::open(root)?;
    let users: HashMap<String, bool> = access
        .users()?
        .into_iter()
        .map(|u| (u.name, u.admin))
        .collect();
    let published: HashSet<String> = access.published()?.into_iter().collect();
    // Whose rights a version needs: its owner's (unless an administrator, who reads
    // everything, or not a user at all), and the public ones if it is published.
    let readers = |m: &MachineName| -> Vec<mbank_access::User> {
        let mut out = Vec::new();
        if users.get(m.user()) == Some(&false) {
            out.push(mbank_access::User {
                name: m.user().to_string(),
                admin: false,
                quota: None,
            });
        }
        if published.contains(m.as_str()) {
            out.push(mbank_access::User {
                name: mbank_access::PUBLIC.to_string(),
                admin: false,
                quota: None,
            });
        }
        out
    };
    let check = |v: &mbank_catalog::VersionInfo,
                 ids: &[ChunkId]|
     -> Result<Vec<MissingRights>, BankError> {
        let mut out = Vec::new();
        for who in readers(&v.machine) {
            let ok = access.readable(&who, ids)?;
            let lacking: Vec<&ChunkId> = ids
                .iter()
                .zip(&ok)
                .filter(|(_, ok)| !**ok)
                .map(|(id, _)| id)
                .collect();
            if let Some(first) = lacking.first() {
                out.push(MissingRights {
                    version: version_name(v, None),
                    user: if who.name.is_empty() {
                        "(published)".into()
                    } else {
                        who.name.clone()
                    },
                    chunks: lacking.len() as u64,
                    first: first.to_hex(),
                });
            }
        }
        Ok(out)
    };
    let chunks_of = |v: &mbank_catalog::VersionInfo,
                     idx: &mbank_core::DiskIndex|
     -> Result<Vec<ChunkId>, CatalogError> {
        let mut ids: HashSet<ChunkId> = idx.chunks.iter().flatten().copied().collect();
        for (_, s) in catalog.streams(v)? {
            ids.extend(s.runs.iter().filter_map(|r| r.id));
        }
        Ok(ids.into_iter().collect())
    };
    let mut suspects = Vec::new();
    let mut failed = None;
    catalog.for_each_index(machine, |v, idx| {
        // Unreadable indexes are reported by the chunk check.
        if let Ok(idx) = idx {
            let ids = chunks_of(v, &idx)?;
            match check(v, &ids) {
                Ok(found) if !found.is_empty() => suspects.push((v.clone(), ids)),
                Ok(_) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        Ok(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut out = Vec::new();
    for (v, ids) in suspects {
        // Still there? (A version removed meanwhile needs no rights.)
        if catalog
            .resolve(&v.machine, Some(&v.id.to_hex()))
            .is_ok_and(|now| now.id == v.id)
        {
            out.extend(check(&v, &ids)?);
        }
    }
    Ok(out)
}

/// `machine@version`, or `machine@version (stream)`, as verify names what it found.
fn version_name(v: &mbank_catalog::VersionInfo, stream: Option<&str>) -> String {
    match stream {
        None => format!("{}@{}", v.machine, v.id.to_hex()),
        Some(s) => format!("{}@{} ({s})", v.machine, v.id.to_hex()),
    }
}

/// The versions (and streams) that exist now, named as [`version_name`] does, and which
/// of them need each of some chunks.
struct NeededNow {
    versions: HashSet<String>,
    needs: HashMap<ChunkId, Vec<String>>,
}

fn needed_now(
    catalog: &Catalog,
    machine: Option<&MachineName>,
    chunks: &HashSet<ChunkId>,
) -> Result<NeededNow, CatalogError> {
    let mut now = NeededNow {
        versions: HashSet::new(),
        needs: HashMap::new(),
    };
    let mut note = |name: String, ids: &mut dyn Iterator<Item = ChunkId>| {
        for c in ids.filter(|c| chunks.contains(c)) {
            let e = now.needs.entry(c).or_default();
            if e.last() != Some(&name) {
                e.push(name.clone());
            }
        }
        now.versions.insert(name);
    };
    catalog.for_each_index(machine, |v, idx| {
        let ids = idx.map(|i| i.chunks).unwrap_or_default();
        note(version_name(v, None), &mut ids.into_iter().flatten());
        Ok(())
    })?;
    catalog.for_each_stream(machine, |v, stream, idx| {
        let runs = idx.map(|i| i.runs).unwrap_or_default();
        note(
            version_name(v, Some(stream)),
            &mut runs.into_iter().filter_map(|r| r.id),
        );
        Ok(())
    })?;
    Ok(now)
}

/// Each chunk of a disk index with the length of its place.
fn disk_places(idx: &mbank_core::DiskIndex) -> impl Iterator<Item = (ChunkId, u64)> + '_ {
    idx.chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|id| (id, idx.chunk_len(i) as u64)))
}

/// Each chunk of a stream's index with the length its run claims.
fn stream_places(idx: &mbank_core::MemoryIndex) -> impl Iterator<Item = (ChunkId, u64)> + '_ {
    idx.runs
        .iter()
        .filter_map(|r| r.id.map(|id| (id, r.len as u64)))
}

/// The versions (and streams) that put a chunk of `actual` at a place of another
/// length, each with its first such place and how many there are.
fn misplaced(
    catalog: &Catalog,
    machine: Option<&MachineName>,
    actual: &HashMap<ChunkId, u64>,
) -> Result<Vec<DamagedIndex>, CatalogError> {
    let mut out = Vec::new();
    let mut judge = |name: String, wrong: Vec<WrongLength>| {
        if let Some(first) = wrong.first() {
            let more = match wrong.len() {
                1 => String::new(),
                n => format!(" ({} more places are wrong)", n - 1),
            };
            out.push(DamagedIndex {
                version: name,
                problem: format!(
                    "{first}{more}; export and attach refuse this version: remove it \
                     (`mbank rm`) or use another"
                ),
            });
        }
    };
    catalog.for_each_index(machine, |v, idx| {
        if let Ok(idx) = idx {
            let wrong = idx
                .chunks
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let id = (*c)?;
                    WrongLength::disk(&idx, i, id, *actual.get(&id)? as usize)
                })
                .collect();
            judge(version_name(v, None), wrong);
        }
        Ok(())
    })?;
    catalog.for_each_stream(machine, |v, stream, idx| {
        if let Ok(idx) = idx {
            let mut offset = 0;
            let mut wrong = Vec::new();
            for (k, r) in idx.runs.iter().enumerate() {
                if let Some(id) = r.id
                    && let Some(&n) = actual.get(&id)
                    && n != r.len as u64
                {
                    wrong.push(WrongLength {
                        chunk: id,
                        place: Place::Stream {
                            stream: stream.to_string(),
                            index: k,
                            offset,
                        },
                        expected: r.len as u64,
                        actual: n,
                    });
                }
                offset += r.len as u64;
            }
            judge(version_name(v, Some(stream)), wrong);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Margin under the GC cutoff for the kernel's coarse file timestamps.
const MTIME_MARGIN: Duration = Duration::from_secs(1);
/// A writer on another host that has not been heard from for this long is dead.
const WRITER_SILENCE: Duration = Duration::from_secs(600);

fn writer_is_alive(w: &WriterInfo, host: &str) -> bool {
    if w.host == host {
        std::path::Path::new(&format!("/proc/{}", w.pid)).exists()
    } else {
        now_ms() - w.heartbeat_ms < WRITER_SILENCE.as_millis() as i64
    }
}

impl Bank {
    /// Checks the catalog (SQLite's integrity check of `catalog.db` and `access.db`,
    /// every record against its checksum, the links between records), then re-hashes
    /// every chunk reachable from every version (or one machine's versions). Damaged
    /// chunks are moved aside (if the bank is writable) and reported with every version
    /// that needs them when verify finishes: a chunk no version needs by then (its
    /// version removed by `rm` and `gc` meanwhile) is not damage, nor one that reads
    /// well on a second try.
    pub fn verify(
        &self,
        machine: Option<&MachineName>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, BankError> {
        let started = Instant::now();
        let catalog = self.local_catalog("verify")?;
        if let Some(m) = machine
            && self.catalog.machine(m)?.is_none()
        {
            return Err(mbank_catalog::CatalogError::MachineNotFound(m.to_string()).into());
        }
        let root = self.local_root("verify")?.to_path_buf();
        let mut report = VerifyReport::default();
        self.verify_databases(&catalog, &root, machine, &mut report)?;
        // Every chunk some version needs, with the length of the first place it has and
        // whether another place wants another length; who needs a damaged chunk, and
        // which places a chunk does not fit, is asked at the end.
        let mut refs: HashMap<ChunkId, (u64, bool)> = HashMap::new();
        let mut note = |name: String, ids: Result<Vec<(ChunkId, u64)>, CatalogError>| match ids {
            Ok(ids) => {
                for (id, len) in ids {
                    let e = refs.entry(id).or_insert((len, false));
                    e.1 |= e.0 != len;
                }
            }
            Err(e) => report.damaged_indexes.push(DamagedIndex {
                version: name,
                problem: e.to_string(),
            }),
        };
        let mut versions = 0;
        let walked = catalog
            .for_each_index(machine, |v, idx| {
                versions += 1;
                let ids = idx.map(|i| disk_places(&i).collect());
                note(version_name(v, None), ids);
                Ok(())
            })
            .and_then(|()| {
                catalog.for_each_stream(machine, |v, stream, idx| {
                    let ids = idx.map(|i| stream_places(&i).collect());
                    note(version_name(v, Some(stream)), ids);
                    Ok(())
                })
            });
        if let Err(e) = walked {
            if !walk_failure_is_damage(&e, &report) {
                return Err(e.into());
            }
            report.catalog_damaged(
                &catalog_file(&catalog, &root),
                vec![format!("reading every version's index failed: {e}")],
            );
        }
        report.versions = versions;
        let chunks: Vec<(&ChunkId, &(u64, bool))> = refs.iter().collect();
        progress.start("verifying chunks", chunks.len() as u64, Unit::Chunks);
        let next = AtomicUsize::new(0);
        let bytes = AtomicU64::new(0);
        let bad: Mutex<Vec<(ChunkId, StoreError)>> = Mutex::new(Vec::new());
        // Good chunks some place wants at another length: (chunk, its length).
        let misfits: Mutex<HashMap<ChunkId, u64>> = Mutex::new(HashMap::new());
        let store: &dyn ChunkStore = &*self.store;
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((id, (len, varied))) = chunks.get(i) else {
                            return;
                        };
                        match store.read(id) {
                            Ok(plain) => {
                                let n = plain.len() as u64;
                                bytes.fetch_add(n, Ordering::Relaxed);
                                if *varied || n != *len {
                                    misfits.lock().expect("poisoned").insert(**id, n);
                                }
                            }
                            Err(e) => bad.lock().expect("poisoned").push((**id, e)),
                        }
                        progress.advance(1);
                    }
                });
            }
        });
        progress.finish();
        report.chunks_checked = chunks.len() as u64;
        report.bytes_checked = bytes.into_inner();
        let mut bad = bad.into_inner().expect("poisoned");
        bad.sort_by_key(|(id, _)| *id);
        // Judge what was found against the versions that exist now: `rm` and `gc` may
        // have removed a version, and its chunks, while verify read them.
        let now = if bad.is_empty() && report.damaged_indexes.is_empty() {
            None
        } else {
            let wanted: HashSet<ChunkId> = bad.iter().map(|(id, _)| *id).collect();
            Some(needed_now(&catalog, machine, &wanted)?)
        };
        if let Some(now) = &now {
            report
                .damaged_indexes
                .retain(|d| now.versions.contains(&d.version));
        }
        for (id, e) in bad {
            let needed_by = match &now {
                Some(now) => now.needs.get(&id).cloned().unwrap_or_default(),
                None => Vec::new(),
            };
            // Not needed any more, or good on a second read (written again meanwhile).
            if needed_by.is_empty() || store.read(&id).is_ok() {
                report.chunks_no_longer_needed += 1;
                continue;
            }
            let (problem, moved_to) = match e {
                StoreError::Missing(_) => ("missing".to_string(), None),
                StoreError::Corrupt { source, moved_to } => (
                    source.to_string(),
                    moved_to.map(|p| p.display().to_string()),
                ),
                other => (other.to_string(), None),
            };
            report.damaged_chunks.push(DamagedChunk {
                chunk: id.to_hex(),
                problem,
                moved_to,
                needed_by,
            });
        }
        // A good chunk at a place of another length is damage of the index that puts
        // it there: looked up now, in the versions that exist now.
        let misfits = misfits.into_inner().expect("poisoned");
        if !misfits.is_empty() {
            report
                .damaged_indexes
                .extend(misplaced(&catalog, machine, &misfits)?);
        }
        if root.join(mbank_access::FILE_NAME).is_file() && report.damaged_databases.is_empty() {
            report.missing_rights = missing_rights(&catalog, &root, machine)?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// What [`Bank::verify`] reports as `missing_rights`, alone (no chunk is read): the
    /// versions of this served bank whose users lack rights to read their chunks.
    pub fn verify_rights(&self) -> Result<Vec<MissingRights>, BankError> {
        let catalog = self.local_catalog("check the rights of")?;
        let root = self.local_root("check the rights of")?.to_path_buf();
        if !root.join(mbank_access::FILE_NAME).is_file() {
            return Ok(Vec::new());
        }
        missing_rights(&catalog, &root, None)
    }

    /// SQLite's integrity check of `catalog.db` (and of `access.db`, if the bank is
    /// served), and every version's and machine's record against its checksum.
    fn verify_databases(
        &self,
        catalog: &Catalog,
        root: &std::path::Path,
        machine: Option<&MachineName>,
        report: &mut VerifyReport,
    ) -> Result<(), BankError> {
        let file = catalog_file(catalog, root);
        let found = catalog.integrity_check()?;
        if !found.is_empty() {
            report.catalog_damaged(&file, found);
        }
        let access = root.join(mbank_access::FILE_NAME);
        if access.is_file() {
            let found = mbank_catalog::integrity_check_file(&access)?;
            if !found.is_empty() {
                report.catalog_damaged(&access, found);
            }
        }
        match catalog.check_records(machine) {
            Ok(check) => {
                report.records_checked = check.checksums_checked;
                report.damaged_records = check.problems;
            }
            Err(e) if walk_failure_is_damage(&e, report) => {
                report.catalog_damaged(&file, vec![format!("checking the records failed: {e}")]);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Deletes every chunk that no version references and no writer in flight can
    /// still use. The scheme is written down in `mbank-store`'s crate docs.
    pub fn gc(&self, progress: &dyn Progress) -> Result<GcReport, BankError> {
        let started = Instant::now();
        self.require_writable("collect garbage")?;
        let catalog = self.local_catalog("gc")?;
        let mut report = GcReport::default();
        // 1. Cutoff: now, or the start of the oldest live writer, less a margin.
        let removals = catalog.version_removals()?;
        let t0 = now_ms();
        let host = this_host();
        let mut oldest = t0;
        let mut oldest_writer: Option<i64> = None;
        for w in catalog.writers()? {
            if writer_is_alive(&w, &host) {
                report.live_writers += 1;
                oldest = oldest.min(w.started_ms);
                oldest_writer = Some(oldest_writer.map_or(w.started_ms, |o| o.min(w.started_ms)));
            } else {
                catalog.unregister_writer(w.id)?;
                report.stale_writers_removed += 1;
            }
        }
        let cutoff = UNIX_EPOCH + Duration::from_millis(oldest.max(0) as u64) - MTIME_MARGIN;
        report.cutoff_ms = oldest - MTIME_MARGIN.as_millis() as i64;
        // 2. Mark: every chunk of every version.
        let mut live = HashSet::new();
        let mut refused = None;
        let mut versions = HashSet::new();
        catalog.for_each_index(None, |v, idx| {
            report.versions += 1;
            versions.insert(v.id);
            match idx {
                Ok(idx) => live.extend(idx.chunks.iter().flatten().copied()),
                Err(_) => {
                    refused.get_or_insert((v.machine.clone(), v.id));
                }
            }
            Ok(())
        })?;
        catalog.for_each_stream(None, |v, _, idx| {
            match idx {
                Ok(idx) => live.extend(idx.runs.iter().filter_map(|r| r.id)),
                Err(_) => {
                    refused.get_or_insert((v.machine.clone(), v.id));
                }
            }
            Ok(())
        })?;
        if let Some((machine, version)) = refused {
            return Err(BankError::GcRefused { machine, version });
        }
        report.chunks_referenced = live.len() as u64;
        // Packs are derived from versions: those of removed versions go now (a pack
        // of a version committed since the mark would go too, and cost only speed).
        if let Some(root) = self.root() {
            report.packs_removed = crate::pack::prune(root, &|v| versions.contains(&v))?;
        }
        // 3. A version removed while this GC ran (after it read the writers), or
        // after the oldest live writer began, may have been read by a writer that will
        // commit its chunks without having touched them (a fork): its chunks are in no
        // version this GC saw, and may be old. Read after the mark, so that a removal
        // this misses happened after the mark, which then saw the version.
        let now = catalog.version_removals()?;
        let margin = MTIME_MARGIN.as_millis() as i64;
        if now.count != removals.count
            || oldest_writer.is_some_and(|w| now.count > 0 && now.last_ms >= w - margin)
        {
            report.sweep_deferred = true;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        // 4. Sweep.
        progress.start("sweeping unreferenced chunks", 0, Unit::Chunks);
        let s = self.store.sweep(cutoff, &|id| live.contains(id))?;
        progress.finish();
        report.chunks_deleted = s.chunks_deleted;
        report.bytes_deleted = s.bytes_deleted;
        report.chunks_kept_for_writers = s.chunks_too_new;
        report.temp_files_deleted = s.temp_files_deleted;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// The file that names the catalog in a report: `catalog.db`, or for a catalog in
/// PostgreSQL the bank's `postgres.url`.
fn catalog_file(catalog: &Catalog, root: &std::path::Path) -> std::path::PathBuf {
    match catalog.dialect() {
        mbank_sql::Dialect::Sqlite => root.join("catalog.db"),
        mbank_sql::Dialect::Postgres => root.join(mbank_sql::URL_FILE),
    }
}
