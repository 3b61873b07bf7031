//! Caps on what a client may make the catalog keep (docs/api.md, "Limits"): the size of
//! every field a request stores, the writers and leases one user may hold, and the
//! catalog bytes a user's versions cost, which count toward their quota.
//!
//! A machine's catalog rows belong to the user its name starts with; that user's quota
//! pays for them (an administrator committing to `alice/x` is charged to alice). Usage
//! is chunks charged in `access.db` plus [`mbank_catalog::Catalog::owner_usage`], so
//! removing a version gives its catalog bytes back at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use mbank_catalog::{Lease, VersionInfo};

use crate::ApiError;

/// Bytes of a version's configuration (JSON). A real one has about a kilobyte.
pub const MAX_CONFIG: usize = 64 << 10;
/// Bytes of a version's statistics as JSON (its `source` names the imported file).
pub const MAX_STATS: usize = 8 << 10;
/// Streams one version may have, and the bytes of a stream's name.
pub const MAX_STREAMS: usize = 8;
pub const MAX_STREAM_NAME: usize = 32;
/// Bytes of a lease's session and station ids, and of its station name (a host and a
/// cache directory).
pub const MAX_SESSION: usize = 128;
pub const MAX_STATION: usize = 128;
pub const MAX_STATION_NAME: usize = 4096;
/// Live writer registrations of one user.
pub const MAX_WRITERS: usize = 64;
/// Leases held on one user's machines, and their sessions displaced in the last
/// [`DISPLACED_WINDOW_MS`] that have not checked in.
pub const MAX_LEASES: u64 = 64;
pub const MAX_DISPLACED: u64 = 64;
pub const DISPLACED_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// A writer not heard from for this long is dead (as `mbank gc` judges a writer of
/// another host) and no longer counts; the server drops it.
pub const WRITER_SILENCE_MS: i64 = 600_000;

/// `413 too_large` for `field` over `limit` bytes.
pub fn field_too_large(field: &str, len: usize, limit: usize) -> ApiError {
    let mut e = ApiError::too_large(format!(
        "{field} has {len} bytes; the server keeps at most {limit}"
    ));
    e.body.field = Some(field.to_string());
    e.body.limit = Some(limit as u64);
    e
}

/// `409 too_many`: the user holds `limit` of `what` already.
pub fn too_many(field: &str, user: &str, limit: u64, what: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::CONFLICT,
        "too_many",
        format!("{user} holds {limit} {field} already, the most one user may; {what}"),
    );
    e.body.field = Some(field.to_string());
    e.body.user = Some(user.to_string());
    e.body.limit = Some(limit);
    e
}

/// Checks the fields of a committed version that the catalog stores as sent.
pub fn check_version(info: &VersionInfo, stats_len: usize) -> Result<(), ApiError> {
    if let Some(c) = &info.config
        && c.len() > MAX_CONFIG
    {
        return Err(field_too_large("info.config", c.len(), MAX_CONFIG));
    }
    if stats_len > MAX_STATS {
        return Err(field_too_large("info.stats", stats_len, MAX_STATS));
    }
    Ok(())
}

/// Checks a commit's stream names (each once, checked by the caller).
pub fn check_streams<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Result<(), ApiError> {
    if names.len() > MAX_STREAMS {
        let mut e = ApiError::bad_request(format!(
            "the commit has {} streams; a version may have at most {MAX_STREAMS}",
            names.len()
        ));
        e.body.field = Some("streams".into());
        e.body.limit = Some(MAX_STREAMS as u64);
        return Err(e);
    }
    for n in names {
        let ok = !n.is_empty()
            && n.len() <= MAX_STREAM_NAME
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b));
        if !ok {
            let shown: String = n.chars().take(40).collect();
            let mut e = ApiError::bad_request(format!(
                "stream name {shown:?} is not valid: 1 to {MAX_STREAM_NAME} characters from a-z 0-9 _ - ."
            ));
            e.body.field = Some("streams".into());
            e.body.limit = Some(MAX_STREAM_NAME as u64);
            return Err(e);
        }
    }
    Ok(())
}

/// Checks the fields of a lease that the catalog stores as sent.
pub fn check_lease(l: &Lease) -> Result<(), ApiError> {
    if l.session.is_empty() || l.session.len() > MAX_SESSION {
        let mut e = ApiError::bad_request(format!(
            "lease.session has {} bytes; a session id has 1 to {MAX_SESSION}",
            l.session.len()
        ));
        e.body.field = Some("lease.session".into());
        e.body.limit = Some(MAX_SESSION as u64);
        return Err(e);
    }
    if l.station.len() > MAX_STATION {
        return Err(field_too_large(
            "lease.station",
            l.station.len(),
            MAX_STATION,
        ));
    }
    if l.station_name.len() > MAX_STATION_NAME {
        return Err(field_too_large(
            "lease.station_name",
            l.station_name.len(),
            MAX_STATION_NAME,
        ));
    }
    Ok(())
}

/// One lock per user, held while their quota is checked and what it pays for is
/// recorded (an upload in `access.db`, a version in the catalog: two databases, so
/// neither transaction alone can keep two requests of one user from both passing).
#[derive(Default)]
pub struct UserLocks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl UserLocks {
    pub fn run<R>(&self, user: &str, f: impl FnOnce() -> R) -> R {
        let lock = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user.to_string())
            .or_default()
            .clone();
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }
}
