//! [`Session`]: one live session of a machine on this station, from check-out to
//! check-in or discard. `mbank attach` and `mbank run` are its users: they serve its
//! devices (over NBD, to QEMU) and decide when it ends; the session owns the rest.
//!
//! - the **lease**: taken by [`Session::start`] ([`Station::check_out`]), kept fresh by
//!   a heartbeat thread on its own catalog connection (every [`HEARTBEAT`]), released
//!   by the check-in or the discard;
//! - the **fetchers**: the disk's background fetchers (read-ahead and the replay of the
//!   version's recorded working set, [`crate::workset`]) and, if asked, a fetch of the
//!   whole disk into the cache;
//! - its **devices**: the disk ([`Disk`]) and the streams it reads through the station
//!   cache ([`Session::fetch_stream`]: kernel, initrd, a saved memory state);
//! - its **write-back** ([`crate::writeback`]): a thread that sends the chunks the
//!   guest writes to the bank in the background, under a bandwidth cap, protected from
//!   GC by the session's writer registration, held until the check-in committed;
//! - its **checkpoints** ([`crate::checkpoint`]): a thread that commits the flushed
//!   state every [`SessionOptions::checkpoint_minutes`] when a flush made blocks
//!   durable since the last one, on its own catalog connection;
//! - its **end**: [`Session::check_in`] or [`Session::discard`], which first stop the
//!   heartbeat and the fetchers. A session dropped without either (its user failed)
//!   stops its threads and leaves its directory and lease for `recover`, like a
//!   process killed with -9.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mbank_bank::{Bank, ImportOptions, Progress, WriterGuard};
use mbank_core::{MachineName, MachineRef, MemoryIndex};

use crate::cached::{CachedStore, StreamError};
use crate::device::Disk;
use crate::{CheckinExtras, SessionReport, Station, StationError};

/// How often the heartbeat refreshes the session's lease.
pub const HEARTBEAT: Duration = Duration::from_secs(30);

/// Background fetchers per session: read-ahead and the working set's replay.
pub const FETCHERS: usize = 4;

/// Where a session's warnings go (from its own threads too).
pub type Warn = Arc<dyn Fn(String) + Send + Sync>;

/// How to start a [`Session`].
pub struct SessionOptions {
    /// Take the machine over from the session holding it.
    pub force: bool,
    /// Fetch the whole disk into the cache in the background (the guest's reads first).
    pub whole_disk: bool,
    /// Messages: the working set queued, a working set skipped, the machine taken over
    /// by another station, a checkpoint failed.
    pub say: Warn,
    /// Minutes between checkpoints (0: none); `None`: [`crate::checkpoint::interval`]'s
    /// default (the machine's setting, else `$MBANK_CHECKPOINT_SECONDS`, else 15
    /// minutes).
    pub checkpoint_minutes: Option<u64>,
    /// The background write-back's bandwidth cap in Mbit/s (0: none); `None`:
    /// [`crate::writeback::cap`]'s default (`$MBANK_WRITEBACK_MBIT`, else 25).
    pub writeback_mbit: Option<u64>,
}

/// A live session; see the module docs.
pub struct Session<'s> {
    station: &'s Station,
    disk: Arc<Disk>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The session's writer registration, which keeps what its write-back sent from
    /// GC; released once the check-in committed (or the session ended otherwise).
    writer: Option<Arc<Mutex<WriterGuard>>>,
    /// The write-back's bandwidth cap, shared with the RAM's write-back.
    pacer: Option<Arc<crate::writeback::Pacer>>,
}

impl<'s> Session<'s> {
    /// Checks `r` out on `station` (the lease, the session directory), starts the
    /// disk's background fetchers with the version's working set queued, and the
    /// heartbeat.
    pub fn start(
        station: &'s Station,
        bank: &mut Bank,
        r: &MachineRef,
        opts: &SessionOptions,
    ) -> Result<Session<'s>, StationError> {
        let catalog = bank.catalog().reopen()?;
        let store = bank.store_arc();
        let disk = station.check_out(bank, r, opts.force, store)?;
        disk.start_background(FETCHERS);
        match station.replay_working_set(bank, &disk) {
            Ok(0) => {}
            Ok(n) => (opts.say)(format!(
                "fetching the {n} chunks of {}'s recorded working set ahead of the guest",
                disk.meta.machine
            )),
            Err(e) => (opts.say)(format!("warning: {e}")),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![spawn_heartbeat(
            catalog,
            r.machine.clone(),
            disk.meta.session.clone(),
            stop.clone(),
            opts.say.clone(),
        )];
        let setting = match bank.catalog().settings(&r.machine) {
            Ok(s) => s.checkpoint_minutes,
            Err(e) => {
                (opts.say)(format!(
                    "warning: cannot read the settings of {} ({e}); checkpoints every {} \
                     minutes unless told otherwise",
                    r.machine,
                    crate::checkpoint::DEFAULT_MINUTES
                ));
                None
            }
        };
        let every = crate::checkpoint::interval(opts.checkpoint_minutes, setting);
        if opts.checkpoint_minutes.is_none()
            && let Some(m) = setting
        {
            (opts.say)(match every {
                Some(_) => format!(
                    "checkpoints of {} every {m} minute(s), its setting in the bank",
                    r.machine
                ),
                None => format!("no checkpoints of {}: its setting in the bank", r.machine),
            });
        }
        if let Some(every) = every {
            let ckpt = Bank::with_parts(
                bank.location().to_string(),
                bank.store_arc(),
                bank.catalog().reopen()?,
            );
            threads.push(spawn_checkpoints(
                ckpt,
                disk.clone(),
                station.name.clone(),
                every,
                stop.clone(),
                opts.say.clone(),
            ));
        }
        let (mut writer, mut pacer) = (None, None);
        if let Some(bps) = crate::writeback::cap(opts.writeback_mbit) {
            let w = Arc::new(Mutex::new(
                bank.begin_write(&format!("write-back of {}", disk.meta.machine))?,
            ));
            let p = crate::writeback::Pacer::new(bps);
            threads.push(crate::writeback::spawn(
                disk.clone(),
                bank.store_arc(),
                w.clone(),
                p.clone(),
                ImportOptions::default().zstd_level,
                stop.clone(),
                opts.say.clone(),
            ));
            writer = Some(w);
            pacer = Some(p);
        } else {
            (opts.say)(format!(
                "no background write-back of {}: what the guest writes goes to the bank at \
                 the check-in",
                disk.meta.machine
            ));
        }
        if opts.whole_disk {
            let (d, stop) = (disk.clone(), stop.clone());
            threads.push(std::thread::spawn(move || d.prefetch(&stop)));
        }
        Ok(Session {
            station,
            disk,
            stop,
            threads,
            writer,
            pacer,
        })
    }

    /// The session's disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// The session's write-back, if it has one: its writer registration (which keeps
    /// what it sends from GC until the check-in commits) and its bandwidth cap, for the
    /// RAM's write-back to share ([`crate::memory::LazyRam::start_writeback`]).
    pub fn writeback(&self) -> Option<(Arc<Mutex<WriterGuard>>, Arc<crate::writeback::Pacer>)> {
        Some((self.writer.clone()?, self.pacer.clone()?))
    }

    /// The station the session runs on.
    pub fn station(&self) -> &'s Station {
        self.station
    }

    /// The station cache and the bank, as this session fetches from them.
    pub fn chunks(&self) -> &Arc<CachedStore> {
        self.disk.chunks()
    }

    /// Writes the stream `idx` (kernel, initrd, memory) to `out` through the station
    /// cache, `jobs` chunks in flight, recording its chunks in the working set; `done`
    /// counts the bytes written.
    pub fn fetch_stream(
        &self,
        idx: &MemoryIndex,
        out: impl Write,
        jobs: usize,
        done: &AtomicU64,
    ) -> Result<(), StreamError> {
        CachedStore::write_stream(idx, out, jobs, done, |id| {
            self.disk.fetch(id).map_err(|e| e.to_string())
        })
    }

    /// Stops the heartbeat and the whole-disk fetch (the disk's own background
    /// fetchers stop at check-in).
    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Checks the session in with `extras` ([`Station::check_in_with`]): a version
    /// holding what was written, the lease released, the session directory removed. On
    /// failure the session stays on the station for `recover`.
    pub fn check_in(
        &mut self,
        bank: &mut Bank,
        extras: &CheckinExtras,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<SessionReport, StationError> {
        self.stop_threads();
        let r = self
            .station
            .check_in_with(bank, &self.disk, extras, opts, progress);
        if r.is_ok() {
            self.writer = None;
        }
        r
    }

    /// Ends the session without a check-in: its writes are dropped and the machine is
    /// released unchanged. Returns what the session did.
    pub fn discard(&mut self, bank: &Bank) -> Result<SessionReport, StationError> {
        self.stop_threads();
        self.disk.stop_background();
        self.station.discard(bank, &self.disk)?;
        let (disk, cache) = (&self.disk, &self.station.cache);
        Ok(SessionReport {
            machine: disk.meta.machine.clone(),
            session: disk.meta.session.clone(),
            base: disk.meta.base.clone(),
            chunks_written: disk.dirty_chunks().len() as u64,
            bytes_fetched: disk.counters.bytes_fetched.load(Ordering::Relaxed),
            chunks_fetched: disk.counters.chunks_fetched.load(Ordering::Relaxed),
            cache_hits: cache.counters.hits.load(Ordering::Relaxed),
            cache_misses: cache.counters.misses.load(Ordering::Relaxed),
            seconds: (mbank_catalog::now_ms() - disk.meta.started_ms) as f64 / 1000.0,
            stats: disk.stats(),
            ..Default::default()
        })
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Commits a checkpoint every `every` while a flush made blocks durable since the last
/// one, until `stop` (a checkpoint under way is finished first); a failure is said and
/// tried again at the next tick.
fn spawn_checkpoints(
    mut bank: Bank,
    disk: Arc<Disk>,
    station: String,
    every: Duration,
    stop: Arc<AtomicBool>,
    say: Warn,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let tick = Duration::from_millis(100);
        let mut since = 0;
        loop {
            let mut waited = Duration::ZERO;
            while waited < every {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(tick.min(every - waited));
                waited += tick;
            }
            let opts = ImportOptions {
                jobs: 1,
                ..Default::default()
            };
            match crate::checkpoint::checkpoint(&mut bank, &disk, &station, since, &opts) {
                Ok(None) => {}
                Ok(Some(r)) => {
                    since = r.flush_seq;
                    if !r.forgotten.is_empty() {
                        say(format!(
                            "checkpoint {} of {}: its retention policy removed {} older \
                             version(s)",
                            &r.version[..8.min(r.version.len())],
                            disk.meta.machine,
                            r.forgotten.len()
                        ));
                    }
                    for w in r.warnings {
                        say(format!("warning: {w}"));
                    }
                }
                Err(e) => say(format!(
                    "warning: a checkpoint of {} failed: {e}; the session goes on and tries \
                     again in {} s (its writes are still checked in when it ends)",
                    disk.meta.machine,
                    every.as_secs()
                )),
            }
        }
    })
}

/// Keeps the session's lease fresh (every [`HEARTBEAT`], on its own catalog connection)
/// until `stop`; says once if another station took the machine over.
fn spawn_heartbeat(
    cat: Box<dyn mbank_catalog::CatalogApi>,
    machine: MachineName,
    session: String,
    stop: Arc<AtomicBool>,
    say: Warn,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut warned = false;
        let tick = Duration::from_millis(100);
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..HEARTBEAT.as_millis() / tick.as_millis() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(tick);
            }
            if let Ok(false) = cat.heartbeat_lease(&machine, &session)
                && !warned
            {
                say(format!(
                    "warning: another station took {machine} over (--force); this session's \
                     writes will still be checked in as their own version"
                ));
                warned = true;
            }
        }
    })
}
