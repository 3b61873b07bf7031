//! What a user may do to the bank, one function per action, each enforcing its rules
//! (who may see or change what, isolation, quotas, the bank's rules). The API's
//! handlers (`lib.rs`) and the web console's (`web.rs`) parse their requests, call the
//! same function here, and only differ in how they answer; so there is no second set of
//! rules. Every function runs on the blocking pool (SQLite, the store).

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;

use axum::http::StatusCode;
use mbank_access::User;
use mbank_catalog::{
    CommitOutcome, ForgetReport, LabelChange, Labels, Lease, MachineInfo, NamedStream, Policy,
    VersionInfo, VersionStats,
};
use mbank_core::{ChunkId, DiskIndex, MachineName, VersionId};

use super::{ApiError, App, caps, check_lengths, check_not_in_use};

/// The machines `user` may see: their own, published ones, every one for an
/// administrator (`GET /v1/machines`, the console's home page).
pub(crate) fn machines(app: &App, user: &User) -> Result<Vec<MachineInfo>, ApiError> {
    let all = app.catalog(|c| Ok(c.machines()?))?;
    let mut out = Vec::new();
    app.access(|a| {
        for m in all {
            if a.can_read_machine(user, &m.name)? {
                out.push(m);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Machine `m`, if `user` may see it and it exists; else the `404` of an absent machine.
pub(crate) fn machine(app: &App, user: &User, m: &MachineName) -> Result<MachineInfo, ApiError> {
    app.readable_machine(user, m)?;
    app.catalog(|c| Ok(c.machine(m)?))?
        .ok_or_else(|| ApiError::no_machine(m.as_str()))
}

/// The session holding `m`, if `user` may see `m`.
pub(crate) fn lease(app: &App, user: &User, m: &MachineName) -> Result<Option<Lease>, ApiError> {
    app.readable_machine(user, m)?;
    app.catalog(|c| Ok(c.lease(m)?))
}

/// Moves the head of `m` to `to` if it is still `expected`: the owner only (others get
/// the `404` of an absent machine), refused while a session holds the machine.
pub(crate) fn set_head(
    app: &App,
    user: &User,
    m: &MachineName,
    to: VersionId,
    expected: Option<VersionId>,
) -> Result<(), ApiError> {
    app.owned_machine(user, m)?;
    app.catalog(|c| Ok(c.set_head(m, to, expected)?))?;
    tracing::info!(machine = %m, head = %to, user = %user.name, "head moved");
    Ok(())
}

/// Removes version `v` of `m` (which `user` may write), unless a session reads from
/// it; the new head.
pub(crate) fn remove_version(
    app: &App,
    user: &User,
    m: &MachineName,
    v: VersionId,
) -> Result<Option<VersionId>, ApiError> {
    let info = super::exact_version(app, user, m, v)?;
    app.writable_machine(user, m)?;
    check_not_in_use(app, m, Some(v))?;
    let head = app.catalog(|c| Ok(c.remove_version(&info)?))?;
    tracing::info!(machine = %m, version = %v, user = %user.name, "version removed");
    Ok(head)
}

/// The retention policy of `m`, if `user` may see it.
pub(crate) fn policy(app: &App, user: &User, m: &MachineName) -> Result<Option<Policy>, ApiError> {
    machine(app, user, m)?;
    app.catalog(|c| Ok(c.policy(m)?))
}

/// Sets (or, with `None`, clears) the retention policy of `m`: the owner only.
pub(crate) fn set_policy(
    app: &App,
    user: &User,
    m: &MachineName,
    policy: Option<&Policy>,
) -> Result<(), ApiError> {
    app.owned_machine(user, m)?;
    app.catalog(|c| Ok(c.set_policy(m, policy)?))?;
    tracing::info!(machine = %m, user = %user.name, policy = ?policy, "retention policy set");
    Ok(())
}

/// Applies `policy` to `m` now: the owner only.
pub(crate) fn forget(
    app: &App,
    user: &User,
    m: &MachineName,
    policy: &Policy,
    dry_run: bool,
) -> Result<ForgetReport, ApiError> {
    app.owned_machine(user, m)?;
    let r = app.catalog(|c| Ok(c.forget(m, policy, dry_run)?))?;
    if !dry_run {
        tracing::info!(machine = %m, removed = r.removed.len(), "forget");
    }
    Ok(r)
}

/// Changes the note and tags of version `v` of `m`: the owner only.
pub(crate) fn label(
    app: &App,
    user: &User,
    m: &MachineName,
    v: VersionId,
    change: &LabelChange,
) -> Result<Labels, ApiError> {
    app.owned_machine(user, m)?;
    let info = crate::exact_version(app, user, m, v)?;
    app.catalog(|c| Ok(c.label(&info, change)?))
}

/// A version to commit, parsed and checked for form.
pub(crate) struct NewVersion {
    pub info: VersionInfo,
    pub index: DiskIndex,
    /// The length of the disk index as sent (what the catalog keeps of it).
    pub index_len: u64,
    pub streams: Vec<NamedStream>,
    /// The streams' names and encoded indexes, in bytes.
    pub streams_len: u64,
    pub expected_head: Option<VersionId>,
}

/// Commits a version of `m` (which `user` may write): within the caps, naming only
/// chunks `user` may read and whose lengths fit their places, paid for by the
/// machine's owner within their quota; a repeated commit answers its outcome.
pub(crate) fn commit(
    app: &App,
    user: &User,
    m: &MachineName,
    new: NewVersion,
) -> Result<CommitOutcome, ApiError> {
    app.writable_machine(user, m)?;
    // From now on a writer of these users released without a commit keeps its
    // uploads' charge (a commit may name them).
    app.note_commit(&[&user.name, m.user()])?;
    let NewVersion {
        info,
        index,
        index_len,
        streams: named,
        streams_len,
        expected_head,
    } = new;
    if info.machine != *m {
        return Err(ApiError::bad_request(format!(
            "the commit is for {} but was sent to {m}",
            info.machine
        )));
    }
    if index.disk_size != info.disk_size || index.chunk_size != info.chunk_size {
        return Err(ApiError::bad_request(
            "the disk index's size or chunk size differs from the version's",
        ));
    }
    // What the catalog will keep, as it will encode it (docs/api.md, "quotas").
    let stats_len = serde_json::to_string(&info.stats).map_or(0, |s| s.len());
    caps::check_version(&info, stats_len)?;
    caps::check_streams(named.iter().map(|(n, _)| n.as_str()))?;
    // A repeated commit (the answer to the first was lost) answers its outcome (the
    // bank's rule, as for a station's check-in).
    if let Some(outcome) = app.catalog(|c| Ok(mbank_bank::repeated_commit(&*c, m, info.id)?))? {
        return Ok(outcome);
    }
    // Every chunk named must be one the user may read: ids alone grant nothing.
    let mut ids: HashSet<ChunkId> = index.chunks.iter().flatten().copied().collect();
    for (_, idx) in &named {
        ids.extend(idx.runs.iter().filter_map(|r| r.id));
    }
    let ids: Vec<ChunkId> = ids.into_iter().collect();
    let ok = app.access(|a| Ok(a.readable(user, &ids)?))?;
    if let Some((id, _)) = ids.iter().zip(&ok).find(|(_, ok)| !**ok) {
        let mut e = ApiError::bad_request(format!(
            "the version names chunk {id}, which is not in the bank for {}; send its bytes first",
            user.name
        ));
        e.body.chunk = Some(*id);
        return Err(e);
    }
    check_lengths(app, user, m, &info, &index, &named)?;
    let published = app.access(|a| Ok(a.is_published(m)?))?;
    let grants: Vec<(ChunkId, u64)> = ids.iter().map(|id| (*id, 0)).collect();
    app.access(|a| {
        a.grant(&user.name, &grants)?;
        if published {
            // A published machine's new version is published with it.
            a.publish(m, &user.name, ids.iter().copied())?;
        }
        Ok(())
    })?;
    // Invariant 1: the chunks are durable before the version names them.
    app.store.flush()?;
    let cost = mbank_catalog::version_cost(
        index_len,
        info.config.as_ref().map_or(0, |c| c.len() as u64),
        stats_len as u64,
        streams_len,
    );
    let owner = m.user().to_string();
    let outcome = app.user_lock(&owner, || {
        // The machine's owner pays for its catalog rows; over the quota, nothing is kept.
        if let Some(quota) = app.access(|a| Ok(a.quota(&owner)?))? {
            let used = app.usage(&owner)?;
            if used.saturating_add(cost) > quota {
                return Err(ApiError::from(mbank_access::AccessError::QuotaExceeded {
                    user: owner.clone(),
                    used,
                    quota,
                    need: cost,
                }));
            }
        }
        app.catalog(|c| {
            c.commit_version(&info, &index, &named, expected_head)
                .map_err(|e| {
                    if e.is_constraint() {
                        // Version ids are unique in the bank: this one belongs to a
                        // version of another machine (which must stay unnamed).
                        ApiError::new(
                            StatusCode::CONFLICT,
                            "version_exists",
                            format!(
                                "version id {} is already taken in this bank; commit the version under a new id",
                                info.id
                            ),
                        )
                    } else {
                        e.into()
                    }
                })
        })
    })?;
    app.metrics.commits.fetch_add(1, Relaxed);
    tracing::info!(user = %user.name, machine = %m, version = %info.id, ?outcome, "commit");
    Ok(outcome)
}

/// Forks version `v` of `from` (the head when `None`; a machine `user` may see: their
/// own or a published one) into the new machine `to` (which `user` may write), as
/// `mbank create --from` does: the new machine's first version shares the disk and
/// the streams, has no parent, and, unless the source is suspended (then it resumes on
/// the same hardware and keeps its memory), gets its own MAC address. Committed by
/// [`commit`], so quota, rights and caps are the API's.
pub(crate) fn fork(
    app: &App,
    user: &User,
    from: &MachineName,
    v: Option<VersionId>,
    to: &MachineName,
) -> Result<VersionInfo, ApiError> {
    machine(app, user, from)?;
    app.writable_machine(user, to)?;
    if app.catalog(|c| Ok(c.machine(to)?))?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "machine_exists",
            format!("there is already a machine {to}; choose another name"),
        ));
    }
    let src = match v {
        Some(v) => super::exact_version(app, user, from, v)?,
        None => app.catalog(|c| Ok(c.resolve(from, None)?))?,
    };
    let (index, mut streams) = app.catalog(|c| Ok((c.disk_index(&src)?, c.streams(&src)?)))?;
    let suspended = src.has_memory();
    let mut config = src.config.clone();
    if !suspended {
        streams.retain(|(n, _)| n != "memory");
        if let Some(c) = &config {
            let c = mbank_vm::MachineConfig::from_json(c).map_err(|e| {
                ApiError::internal(format!(
                    "the configuration of {from}@{} cannot be read: {e}",
                    src.id.short()
                ))
            })?;
            config = Some(c.forked().to_json());
        }
    }
    // The chunks must outlive a removal of the source racing with this commit:
    // touching them puts them after the cutoff of a GC that starts now.
    let mut ids: Vec<ChunkId> = index.chunks.iter().flatten().copied().collect();
    for (_, s) in &streams {
        ids.extend(s.runs.iter().filter_map(|r| r.id));
    }
    for batch in ids.chunks(1024) {
        let have = app.store.touch_many(batch)?;
        if let Some((id, _)) = batch.iter().zip(have).find(|(_, h)| !h) {
            return Err(ApiError::internal(format!(
                "{from}@{} cannot be forked: its chunk {id} is missing from the bank; an administrator should run `mbank verify`",
                src.id.short()
            )));
        }
    }
    let index_len = index.to_bytes().len() as u64;
    let streams_len = streams
        .iter()
        .map(|(n, s)| (n.len() + s.to_bytes().len()) as u64)
        .sum();
    let mut names: Vec<String> = streams.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    let info = VersionInfo {
        id: VersionId::random(),
        machine: to.clone(),
        parent: None,
        created_ms: mbank_catalog::now_ms(),
        disk_size: src.disk_size,
        chunk_size: src.chunk_size,
        stats: VersionStats {
            source: mbank_bank::fork_source_text(from, src.id),
            chunks_total: index.chunks.len() as u64,
            chunks_zero: index.chunks.iter().filter(|c| c.is_none()).count() as u64,
            chunks_dedup: index.chunks.iter().filter(|c| c.is_some()).count() as u64,
            ..Default::default()
        },
        config,
        streams: names,
    };
    let new = NewVersion {
        info: info.clone(),
        index,
        index_len,
        streams,
        streams_len,
        expected_head: None,
    };
    commit(app, user, to, new)?;
    tracing::info!(user = %user.name, from = %from, version = %src.id, to = %to, "fork");
    Ok(info)
}

/// Publishes machine `m` to every user (an administrator's action, `mbank admin
/// publish`): grants the chunks of all its versions to everyone.
pub(crate) fn publish(app: &App, user: &User, m: &MachineName) -> Result<usize, ApiError> {
    admin_only(user)?;
    if app.catalog(|c| Ok(c.machine(m)?))?.is_none() {
        return Err(ApiError::no_machine(m.as_str()));
    }
    let ids = app.catalog(|c| {
        let mut seen = HashSet::new();
        for v in c.versions(m)? {
            seen.extend(c.disk_index(&v)?.chunks.iter().flatten().copied());
            for (_, idx) in c.streams(&v)? {
                seen.extend(idx.runs.iter().filter_map(|r| r.id));
            }
        }
        Ok(seen)
    })?;
    let n = ids.len();
    app.access(|a| Ok(a.publish(m, &user.name, ids)?))?;
    tracing::info!(machine = %m, chunks = n, by = %user.name, "published");
    Ok(n)
}

/// Unpublishes machine `m`; `404` when it is not published.
pub(crate) fn unpublish(app: &App, user: &User, m: &MachineName) -> Result<(), ApiError> {
    admin_only(user)?;
    if !app.access(|a| Ok(a.unpublish(m)?))? {
        return Err(ApiError::not_found(format!("{m} is not published")));
    }
    tracing::info!(machine = %m, by = %user.name, "unpublished");
    Ok(())
}

/// Refuses a user who is not an administrator.
pub(crate) fn admin_only(user: &User) -> Result<(), ApiError> {
    if user.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this is for administrators; {} is not one",
            user.name
        )))
    }
}
