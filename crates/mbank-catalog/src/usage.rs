//! What one user's machines hold in the catalog, for the bank server's quotas and caps
//! (docs/api.md, "Limits"). A machine belongs to the user its name starts with.

use rusqlite::params;

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
        let count = |q: &str| -> Result<i64, CatalogError> {
            self.conn
                .prepare_cached(q)
                .and_then(|mut st| st.query_row(params![lo, hi], |r| r.get(0)))
                .map_err(sql("sum a user's catalog use"))
        };
        let versions = count(&format!(
            "SELECT coalesce(sum(length(disk_index) + coalesce(length(CAST(config AS BLOB)), 0)
                 + length(CAST(stats AS BLOB)) + {VERSION_OVERHEAD}), 0)
             FROM versions WHERE machine > ?1 AND machine < ?2"
        ))?;
        let streams = count(
            "SELECT coalesce(sum(length(s.idx) + length(CAST(s.name AS BLOB))), 0)
             FROM version_streams s JOIN versions v ON v.id = s.version
             WHERE v.machine > ?1 AND v.machine < ?2",
        )?;
        let leases = count("SELECT count(*) FROM leases WHERE machine > ?1 AND machine < ?2")?;
        let displaced: i64 = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM displaced WHERE machine > ?1 AND machine < ?2 AND since_ms > ?3",
            )
            .and_then(|mut st| st.query_row(params![lo, hi, since_ms], |r| r.get(0)))
            .map_err(sql("count a user's displaced sessions"))?;
        let n = |v: i64| v.max(0) as u64;
        Ok(OwnerUsage {
            bytes: n(versions).saturating_add(n(streams)),
            leases: n(leases),
            displaced: n(displaced),
        })
    }
}
