//! What one user's machines hold in the catalog, for the bank server's quotas and caps
//! (docs/api.md, "Limits"). A machine belongs to the user its name starts with.

use mbank_sql::params;

use crate::{Catalog, CatalogError, sql};

/// Catalog bytes counted for each version besides its blobs: its row, ids, times and
/// the index entries SQLite keeps for it.
pub const VERSION_OVERHEAD: u64 = 256;

/// What the machines `user/*` hold in the catalog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerUsage {
    /// Bytes their versions cost: see [`version_cost`].
    pub bytes: u64,
    /// Leases held on their machines.
    pub leases: u64,
    /// Sessions displaced from their machines since the `since_ms` asked about that
    /// have not checked in yet.
    pub displaced: u64,
}

/// What one version costs in the catalog: its encoded disk index, its configuration,
/// its statistics (JSON), each stream's name and encoded index, and
/// [`VERSION_OVERHEAD`].
pub fn version_cost(index_len: u64, config_len: u64, stats_len: u64, streams_len: u64) -> u64 {
    index_len
        .saturating_add(config_len)
        .saturating_add(stats_len)
        .saturating_add(streams_len)
        .saturating_add(VERSION_OVERHEAD)
}

impl Catalog {
    /// What `user`'s machines (`user/*`) hold in the catalog now, counting the sessions
    /// displaced since `since_ms` (a displaced session of a station that is gone for
    /// good never checks in).
    pub fn owner_usage(&self, user: &str, since_ms: i64) -> Result<OwnerUsage, CatalogError> {
        // Machine names `user/…` sort between `user/` and `user0` ('0' follows '/').
        let (lo, hi) = (format!("{user}/"), format!("{user}0"));
        let count = |q: &str, since_ms: Option<i64>| -> Result<i64, CatalogError> {
            let r = match since_ms {
                None => self.conn.query_row(q, params![lo, hi], |r| r.get(0)),
                Some(t) => self.conn.query_row(q, params![lo, hi, t], |r| r.get(0)),
            };
            r.map_err(sql("sum a user's catalog use"))
        };
        // Sums cast to BIGINT: PostgreSQL's sum of BIGINTs is a NUMERIC. Text is
        // counted in bytes (`octet_length`, in SQLite since 3.43).
        let versions = count(
            &format!(
                "SELECT CAST(coalesce(sum(length(disk_index) + coalesce(octet_length(config), 0)
                     + octet_length(stats) + {VERSION_OVERHEAD}), 0) AS BIGINT)
                 FROM versions WHERE machine > ?1 AND machine < ?2"
            ),
            None,
        )?;
        let streams = count(
            "SELECT CAST(coalesce(sum(length(s.idx) + octet_length(s.name)), 0) AS BIGINT)
             FROM version_streams s JOIN versions v ON v.id = s.version
             WHERE v.machine > ?1 AND v.machine < ?2",
            None,
        )?;
        let leases = count(
            "SELECT count(*) FROM leases WHERE machine > ?1 AND machine < ?2",
            None,
        )?;
        let displaced = count(
            "SELECT count(*) FROM displaced WHERE machine > ?1 AND machine < ?2 AND since_ms > ?3",
            Some(since_ms),
        )?;
        let n = |v: i64| v.max(0) as u64;
        Ok(OwnerUsage {
            bytes: n(versions).saturating_add(n(streams)),
            leases: n(leases),
            displaced: n(displaced),
        })
    }
}
