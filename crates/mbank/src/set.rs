//! `mbank set`: a new version of a machine with a changed configuration (memory, CPUs)
//! and the head's disk, kernel and initrd; and the machine's settings kept in the bank
//! beside its versions (the checkpoint interval), which change without a new version.

use anyhow::{Context, Result, bail};
use mbank_bank::{Bank, ImportOptions, Progress, VersionSource};
use mbank_catalog::MachineSettings;
use mbank_core::{MachineName, VersionId};
use mbank_vm::MachineConfig;
use serde::Serialize;

use crate::fmt::parse_size;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["memory", "cpus", "checkpoint_minutes"])))]
pub struct Args {
    /// The machine, as user/name: its head is the new version's parent.
    pub machine: MachineName,
    /// Memory, e.g. 2G or 512M.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Minutes between the checkpoints of this machine's sessions on any station (0:
    /// none; `default`: the station's default, 15 unless $MBANK_CHECKPOINT_SECONDS
    /// says otherwise). A setting of the machine, not a new version; it applies from the
    /// next session. `attach` or `run --checkpoint-minutes` overrides it for a session.
    #[arg(long, value_name = "N|default", value_parser = parse_minutes)]
    pub checkpoint_minutes: Option<Minutes>,
}

/// A `--checkpoint-minutes` value: a count, or `None` for the default.
#[derive(Clone, Copy, Debug)]
pub struct Minutes(pub Option<u64>);

fn parse_minutes(s: &str) -> Result<Minutes, String> {
    if s == "default" {
        return Ok(Minutes(None));
    }
    s.parse::<u64>()
        .map(|m| Minutes(Some(m)))
        .map_err(|_| format!("{s:?} is not a number of minutes (or `default`)"))
}

/// What `set` made.
#[derive(Serialize)]
pub struct SetReport {
    pub machine: String,
    /// The new version, when memory or CPUs changed.
    pub version: Option<String>,
    pub parent: Option<String>,
    pub memory_mib: Option<u64>,
    pub cpus: Option<u32>,
    /// False when another writer moved the head meanwhile: the version is kept beside it.
    pub head_moved: bool,
    /// The machine's settings after the change.
    pub settings: MachineSettings,
}

pub fn run(bank: &mut Bank, a: &Args, progress: &dyn Progress) -> Result<SetReport> {
    let m = &a.machine;
    if a.memory.is_none() && a.cpus.is_none() && a.checkpoint_minutes.is_none() {
        bail!("nothing to change: give --memory SIZE, --cpus N and/or --checkpoint-minutes N");
    }
    let mut settings = bank
        .catalog()
        .settings(m)
        .with_context(|| format!("cannot read the settings of {m}"))?;
    if let Some(Minutes(c)) = a.checkpoint_minutes {
        settings.checkpoint_minutes = c;
        bank.catalog_mut()
            .set_settings(m, &settings)
            .with_context(|| format!("cannot change the settings of {m}"))?;
    }
    let mut report = SetReport {
        machine: m.to_string(),
        version: None,
        parent: None,
        memory_mib: None,
        cpus: None,
        head_moved: false,
        settings,
    };
    if a.memory.is_none() && a.cpus.is_none() {
        return Ok(report);
    }
    if let Some(l) = bank.catalog().lease(m)? {
        bail!(
            "{m} is in use on {} (pid {}, since {}): its check-in would not carry the new \
             configuration; end that session (`mbank poweroff {m}` or `mbank suspend {m}` \
             there) and run `mbank set` again",
            l.station_name,
            l.pid,
            crate::fmt::date(l.started_ms)
        );
    }
    let head = bank
        .catalog()
        .resolve(m, None)
        .with_context(|| format!("cannot read the head of {m}"))?;
    if head.has_memory() {
        bail!(
            "the head of {m} ({}) is suspended: its saved memory can only be resumed on the \
             hardware it was saved with, so its memory and CPUs cannot change; run it \
             (`mbank run {m}`), power it off, then `mbank set` it",
            head.id.short()
        );
    }
    let mut config = match head.config.as_deref() {
        Some(c) => MachineConfig::from_json(c)
            .with_context(|| format!("the configuration of {m}@{}", head.id.short()))?,
        None => bail!(
            "{m}@{} has no configuration (it was imported, not created): make a virtual PC \
             of it with `mbank create NEW --from {m} --memory ... --cpus ...`",
            head.id.short()
        ),
    };
    if let Some(mem) = a.memory {
        if mem % (1 << 20) != 0 || mem == 0 {
            bail!("--memory must be a whole number of MiB, e.g. 512M or 2G");
        }
        config.memory_mib = mem >> 20;
    }
    if let Some(n) = a.cpus {
        config.cpus = n;
    }
    config.check()?;
    let base = bank.catalog().disk_index(&head)?;
    let writer = bank.begin_write(&format!("set {m}"))?;
    let id = VersionId::random();
    let source = VersionSource {
        description: format!("set memory {} MiB, {} CPUs", config.memory_mib, config.cpus),
        parent: Some(head.id),
        expected_head: Some(head.id),
        base,
        items: Box::new(std::iter::empty()),
        total_bytes: 0,
        id: Some(id),
        config: Some(config.to_json()),
        streams: Vec::new(),
        streams_stored: (0, 0),
    };
    let r = bank.derive_version(m, id, source, &writer, &ImportOptions::default(), progress)?;
    report.version = Some(r.version);
    report.parent = Some(head.id.to_hex());
    report.memory_mib = Some(config.memory_mib);
    report.cpus = Some(config.cpus);
    report.head_moved = r.head_moved;
    Ok(report)
}

/// How often the machine's sessions checkpoint: `every 5 minutes`, `none`, or the
/// station's default.
pub fn describe_settings(s: &MachineSettings) -> String {
    match s.checkpoint_minutes {
        None => format!(
            "the station's default (every {} minutes unless $MBANK_CHECKPOINT_SECONDS says otherwise)",
            mbank_station::checkpoint::DEFAULT_MINUTES
        ),
        Some(0) => "none".to_string(),
        Some(1) => "every minute".to_string(),
        Some(m) => format!("every {m} minutes"),
    }
}
