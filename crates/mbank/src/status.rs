//! `mbank status`: the sessions on this station, and where the bank says each of the
//! user's machines is checked out now.

use anyhow::{Context, Result};
use mbank_bank::Bank;
use mbank_station::Station;
use serde::Serialize;

use crate::fmt::date;

/// A live session on this station.
#[derive(Serialize)]
pub struct LocalSession {
    pub machine: String,
    /// The version checked out (hex), or none for an empty machine.
    pub version: Option<String>,
    /// `run` (a virtual PC) or `attach` (a disk served over NBD).
    pub kind: &'static str,
    pub since_ms: i64,
    pub since: String,
    pub pid: u32,
    /// Where the screen of a `run` is, when it is shown over VNC.
    pub vnc: Option<String>,
    pub session: String,
}

/// A machine checked out somewhere, as the bank's lease says.
#[derive(Serialize)]
pub struct Leased {
    pub machine: String,
    pub version: Option<String>,
    /// The station's name for people (host and cache directory).
    pub station: String,
    pub station_id: String,
    pub pid: u32,
    pub since_ms: i64,
    pub since: String,
    pub heartbeat_ms: i64,
    /// True when the station is this one.
    pub here: bool,
}

#[derive(Serialize)]
pub struct Status {
    pub station: String,
    pub sessions: Vec<LocalSession>,
    pub leased: Vec<Leased>,
    /// Machines whose lease could not be read (a published machine of another user on
    /// an older server, say), with why.
    pub warnings: Vec<String>,
}

pub fn status(bank: &Bank, station: &Station) -> Result<Status> {
    let mut sessions: Vec<LocalSession> = station
        .live_sessions()
        .into_iter()
        .map(|(dir, meta)| {
            let control = crate::run::socket_dir(&meta.session).join("control.sock");
            let kind = if control.exists() { "run" } else { "attach" };
            let vnc = std::fs::read_to_string(dir.dir.join(crate::run::DISPLAY_FILE)).ok();
            LocalSession {
                machine: meta.machine,
                version: meta.base,
                kind,
                since_ms: meta.started_ms,
                since: date(meta.started_ms),
                pid: meta.pid,
                vnc,
                session: meta.session,
            }
        })
        .collect();
    sessions.sort_by(|a, b| a.machine.cmp(&b.machine));
    let catalog = bank.catalog();
    let machines = catalog
        .machines()
        .with_context(|| format!("cannot list the machines of {}", bank.location()))?;
    let mut leased = Vec::new();
    let mut warnings = Vec::new();
    for m in machines {
        let lease = match catalog.lease(&m.name) {
            Ok(l) => l,
            Err(e) => {
                warnings.push(format!("cannot read the lease of {}: {e}", m.name));
                continue;
            }
        };
        if let Some(l) = lease {
            leased.push(Leased {
                machine: m.name.to_string(),
                version: l.base.map(|v| v.to_hex()),
                here: l.station == station.id,
                station: l.station_name,
                station_id: l.station,
                pid: l.pid,
                since_ms: l.started_ms,
                since: date(l.started_ms),
                heartbeat_ms: l.heartbeat_ms,
            });
        }
    }
    Ok(Status {
        station: station.dir.display().to_string(),
        sessions,
        leased,
        warnings,
    })
}

/// The human form: two short tables.
pub fn print(s: &Status) -> Result<()> {
    use crate::out::outln;
    if s.sessions.is_empty() {
        outln!("no sessions on this station ({})", s.station)?;
    } else {
        outln!("sessions on this station ({}):", s.station)?;
        for x in &s.sessions {
            outln!(
                "  {}@{}  {}  since {}  pid {}{}",
                x.machine,
                x.version.as_deref().map_or("-", |v| &v[..12]),
                x.kind,
                x.since,
                x.pid,
                x.vnc
                    .as_deref()
                    .map(|v| format!("  VNC {v}"))
                    .unwrap_or_default()
            )?;
        }
    }
    if s.leased.is_empty() {
        outln!("none of your machines is checked out")?;
    } else {
        outln!("checked out now:")?;
        for l in &s.leased {
            outln!(
                "  {}@{}  on {}{}  since {}",
                l.machine,
                l.version.as_deref().map_or("-", |v| &v[..12]),
                l.station,
                if l.here { " (this station)" } else { "" },
                l.since
            )?;
        }
    }
    Ok(())
}
